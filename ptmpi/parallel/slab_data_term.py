"""The data term of APT on the angle x slab grid (``--slabs S > 1``): ``D`` on z-slabs.

The same maps as :class:`~ptmpi.parallel.data_term.DataTerm` (the solver cannot tell them
apart), with the volume split in z-slabs (:mod:`ptmpi.parallel.volume`) and the frames kept
by the rank that reads them. Parallel-beam projection is slice-separable: row ``k`` of
``P_t u`` depends on slice ``k`` of ``u`` only, so

- ``P_t`` restricted to a slab is the projector of that slab (:class:`Projector` of shape
  ``(nz_slab, n, n)``), for every angle ``t`` of the rank's angle group;
- ``W_t`` (the illumination) is pointwise on the projection, so the normal operator
  ``sum_t P_t^H W_t P_t`` stays in the slab: each rank applies it to its slab for all the
  group's angles with the rows of ``W_t`` of its slab, and the ranks that hold the same
  slab in other groups sum theirs (one Allreduce of a slab-sized complex128 array in
  ``slab_comm``; none with one group);
- the forward map and the adjoint, which need a projection's full height for the windows,
  transpose projections within the group (:func:`to_owners`, :func:`to_slabs`: one
  Alltoallv each): the slab-major rows ``(N_THETA_GROUP, nz_slab, n)`` of every slab
  become the angle-major projections ``(N_THETA_LOCAL, nz, n)`` of the angles' owner, and
  back. ``W`` takes the second path once per probe (or position) change.

On a GPU (``xp`` CuPy) every array stays on the device; the communicator stages the MPI
buffers (the transposes, the Allreduce over ``slab_comm``, halos) through host memory.

Frame statistics (the R-factor, the likelihood, the probe update's sums) are summed over
all ranks: every frame has exactly one owner.
"""

from __future__ import annotations

import numpy as np

from ptmpi.backend import get_xp, real_dtype, to_device
from ptmpi.operators.fft import FarField
from ptmpi.operators.ptycho import Ptycho, guard_probe
from ptmpi.operators.tomo import Projector
from ptmpi.parallel.comm import Comm
from ptmpi.parallel.data_term import (
    WIDE,
    DataTerm,
    FrameReductions,
    SumBuffer,
    probe_from_views,
    reduced_sum,
)
from ptmpi.parallel.volume import SlabGradient, VolumeSpace


class SlabGrid:
    """The angle x slab process grid of ``comm``: ``S`` slabs, ``comm.size / S`` groups.

    Rank ``r`` is slab ``r % S`` of group ``r // S``. ``group`` and ``slab_comm`` are the
    two sub-communicators (:mod:`ptmpi.parallel.volume`).
    """

    def __init__(self, comm: Comm, n_slabs: int):
        if n_slabs < 1 or comm.size % n_slabs:
            raise ValueError(f"--slabs {n_slabs} must divide the rank count {comm.size}")
        self.comm = comm
        self.n_slabs = int(n_slabs)
        self.n_groups = comm.size // self.n_slabs
        self.slab = comm.rank % self.n_slabs
        self.group_index = comm.rank // self.n_slabs
        self.group = comm.split(self.group_index, self.slab)
        self.slab_comm = comm.split(self.slab, self.group_index)

    def volume(self, shape) -> VolumeSpace:
        return VolumeSpace(shape, self.group)


def to_owners(rows, group: Comm, counts: list[int], bounds: list[tuple[int, int]]):
    """Slab-major -> angle-major: ``rows`` ``(N_THETA_GROUP, nz_slab, n)`` (this rank's slab
    of every angle of the group, angles in owner order, ``counts[j]`` of member ``j``)
    becomes ``(counts[me], nz, n)``, the full projections of this rank's own angles
    (on the array module of ``rows``; device buffers are staged through host memory by
    the communicator)."""
    xp = get_xp(rows)
    me, n = group.rank, rows.shape[-1]
    z0, z1 = bounds[me]
    rows = xp.ascontiguousarray(rows)
    nz = bounds[-1][1]
    send_counts = [c * (z1 - z0) * n for c in counts]
    recv_counts = [counts[me] * (b1 - b0) * n for b0, b1 in bounds]
    recv = xp.empty(sum(recv_counts), dtype=rows.dtype)
    group.alltoallv(rows.reshape(-1), send_counts, recv, recv_counts)
    out = xp.empty((counts[me], nz, n), dtype=rows.dtype)
    start = 0
    for (b0, b1), size in zip(bounds, recv_counts, strict=True):
        out[:, b0:b1] = recv[start:start + size].reshape(counts[me], b1 - b0, n)
        start += size
    return out


def to_slabs(proj, group: Comm, counts: list[int], bounds: list[tuple[int, int]]):
    """The reverse of :func:`to_owners`: ``proj`` ``(counts[me], nz, n)`` -> this rank's
    slab rows of every angle of the group, ``(N_THETA_GROUP, nz_slab, n)``."""
    xp = get_xp(proj)
    me, n = group.rank, proj.shape[-1]
    z0, z1 = bounds[me]
    send = xp.concatenate([xp.ascontiguousarray(proj[:, b0:b1]).reshape(-1)
                           for b0, b1 in bounds]) if proj.size else xp.empty(0, proj.dtype)
    send_counts = [counts[me] * (b1 - b0) * n for b0, b1 in bounds]
    recv_counts = [c * (z1 - z0) * n for c in counts]
    out = xp.empty((sum(counts), z1 - z0, n), dtype=proj.dtype)
    group.alltoallv(send, send_counts, out.reshape(-1), recv_counts)
    return out


class SlabDataTerm(FrameReductions):
    """``D(omega, u)`` with ``u`` split in z-slabs (module doc); the interface of
    :class:`~ptmpi.parallel.data_term.DataTerm`.

    Parameters
    ----------
    grid : SlabGrid
    shape : (nz, n, n) global volume shape.
    theta_local, probe, positions_local, frame_offset_local :
        This rank's own angles and frames, as for ``DataTerm`` (one ``(M, M)`` probe).
    xp, dtype : as for ``DataTerm``: numpy, or a device module (CuPy) with one GPU per
        rank; the MPI buffers of device arrays are staged through host memory.
    """

    def __init__(self, grid: SlabGrid, shape, theta_local, probe, positions_local,
                 frame_offset_local, *, xp=np, dtype=np.complex64):
        if probe.ndim != 2:
            raise ValueError("--slabs > 1 supports one probe mode only")
        self.grid = grid
        self.comm = grid.comm
        self.xp = xp
        self.dtype = np.dtype(dtype)
        self.volume = grid.volume(shape)
        self.global_shape = tuple(int(s) for s in shape)
        nz, n, _ = self.global_shape
        theta_local = np.asarray(theta_local, dtype=np.float64).ravel()
        thetas = grid.group.allgather(theta_local)
        self.counts = [t.size for t in thetas]
        self.projector = Projector(self.volume.local_shape, np.concatenate(thetas),
                                   dtype=self.dtype)
        self.ptycho = Ptycho(probe, positions_local, frame_offset_local, (nz, n))
        self.farfield = FarField()
        self.mode_mixing = None
        self._sums = SumBuffer()
        self._update_weight()

    n_modes = 1

    @property
    def shape(self) -> tuple[int, int, int]:
        """The global volume shape."""
        return self.global_shape

    @property
    def probe(self):
        return self.ptycho.probe

    def _update_weight(self) -> None:
        own = self.ptycho.illumination(real_dtype(self.dtype))
        self.weight = self._to_slabs(own)

    def set_probe(self, probe) -> None:
        """Replace ``omega`` (collective: the illumination's rows are redistributed)."""
        self.ptycho.probe = probe
        self._update_weight()

    def set_positions(self, positions_local) -> None:
        self.ptycho = self.ptycho.moved(positions_local)
        self._update_weight()

    def _to_owners(self, rows):
        return to_owners(rows, self.grid.group, self.counts, self.volume.bounds)

    def _to_slabs(self, proj):
        return to_slabs(proj, self.grid.group, self.counts, self.volume.bounds)

    def project(self, u):
        """``P_t u`` of this rank's own angles, full height ``(N_THETA_LOCAL, nz, n)``."""
        return self._to_owners(self.projector.fwd(u))

    # -- maps --------------------------------------------------------------------------
    def fwd(self, u):
        """``z_local = D_r u``: this rank's far fields ``(N_FRAMES_LOCAL, M, M)``."""
        return self.farfield.fwd(self.ptycho.fwd(self.project(u)))

    def adj(self, z_local):
        """``D^H z`` on this rank's slab, summed over all angles, complex128."""
        rows = self._to_slabs(self.ptycho.adj(self.farfield.adj(z_local)))
        return reduced_sum(self.grid.slab_comm, self.volume.local_shape,
                           lambda out: self.projector.adj(rows, WIDE, out), rows, self._sums)

    def normal(self, x):
        """``D^H D x`` on this rank's slab (no transpose), complex128 (a buffer that the
        next :meth:`adj` or :meth:`normal` may overwrite, as in :class:`DataTerm`)."""
        return reduced_sum(self.grid.slab_comm, self.volume.local_shape,
                           lambda out: self.projector.normal(x, self.weight, WIDE, out), x,
                           self._sums)

    def diagonal(self, keep: bool = True):
        """The slab of the diagonal of ``D^H D`` (float64); ``keep`` as in
        :meth:`DataTerm.diagonal`."""
        local = self.projector.adj_squared_weights(self.weight.astype(np.float64), keep=keep)
        return self.grid.slab_comm.allreduce_sum(local)

    def norm(self, iterations: int) -> float:
        """``||D^H D||`` by power iteration from the start vector of ``DataTerm.norm``."""
        x = to_device(random_slab(self.global_shape, self.volume.z0, self.volume.z1)
                      .astype(self.dtype), self.xp)
        x /= self.volume.norm(x)
        value = 0.0
        for _ in range(max(1, iterations)):
            y = self.normal(x).astype(self.dtype)
            value = self.volume.norm(y)
            if value == 0.0:
                break
            x = y / value
        return value

    def update_probe(self, u, target_local, guard: bool = False):
        """The closed-form probe update of ``DataTerm.update_probe`` (one mode); ``guard``
        keeps the new probe's last row and column at zero, as there."""
        views = self.ptycho.extract(self.project(u))
        omega = probe_from_views(views, target_local, self.comm,
                                 ptycho=self.ptycho).astype(self.dtype)
        if guard:
            omega = guard_probe(omega)
        self.set_probe(omega)
        return omega


def layout_terms(problem, probe, comm: Comm, layout: SlabGrid | None = None, *, xp=np,
                 dtype=np.complex64):
    """The data term of ``problem`` (a :class:`~ptmpi.solvers.admm.LocalProblem`) with the
    probe ``probe``, its volume space and its gradient, for ``layout``: on the angle x slab
    grid of more than one slab :class:`SlabDataTerm`, the slab's
    :class:`~ptmpi.parallel.volume.VolumeSpace` and a
    :class:`~ptmpi.parallel.volume.SlabGradient`; otherwise (None, or one slab)
    :class:`~ptmpi.parallel.data_term.DataTerm` on ``comm``, the whole volume and its
    :class:`~ptmpi.operators.grad.Gradient`."""
    from ptmpi.operators.grad import Gradient

    if layout is not None and layout.n_slabs > 1:
        data = SlabDataTerm(layout, problem.volume_shape, problem.theta_local, probe,
                            problem.positions_local, problem.frame_offset_local, xp=xp,
                            dtype=dtype)
        return data, data.volume, SlabGradient(data.volume)
    data = DataTerm(problem.volume_shape, problem.theta_local, probe, problem.positions_local,
                    problem.frame_offset_local, comm, xp=xp, dtype=dtype)
    return data, VolumeSpace(problem.volume_shape), Gradient(problem.volume_shape)


def random_slab(shape, z0: int, z1: int, seed: int = 0):
    """Slices ``[z0, z1)`` of ``default_rng(seed).standard_normal(shape)``, drawn slice by
    slice so that the whole volume is never held (the stream is the same)."""
    nz, n, _ = shape
    rng = np.random.default_rng(seed)
    chunk = max(1, (1 << 22) // max(1, n * n))
    for k0 in range(0, z0, chunk):
        rng.standard_normal((min(chunk, z0 - k0), n, n))
    return rng.standard_normal((z1 - z0, n, n))
