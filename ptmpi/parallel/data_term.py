"""The data term of APT as one distributed operator: ``D`` over all angles of all ranks.

In the spirit of PyLops-MPI's ``MPIVStack``: ``D = [D_0; D_1; ...]`` stacks the joint
models of the ranks' angle blocks. Each rank holds its block ``D_r`` (its angles, scan
positions, probe and illumination ``W``); the forward map is local (``z_local = D_r u``),
and every map that sums over angles (the adjoint, the normal operator ``D^H D``, its
diagonal and norm, the probe update, and the reductions of per-frame statistics) forms the
local sum in double precision and reduces it across the angle group once. A solver built
on it holds no communicator and calls no collective: it reads like Algorithm 1, and a new
layout of the ranks changes this class, not the solver.

Sums over angles are rounded once, after the reduction, so the result does not depend on
how the angles are split over ranks beyond the order of the double-precision sum.
"""

from __future__ import annotations

import numpy as np

from ptmpi.backend import get_xp, to_device
from ptmpi.operators.model import JointModel
from ptmpi.operators.ptycho import guard_probe
from ptmpi.parallel.volume import VolumeSpace

WIDE = np.complex128
"""Accumulation dtype of every sum over angles."""

SUBPIXEL_CG = 2
"""CG steps of the probe update with sub-pixel frames (:func:`probe_from_views`)."""


class SumBuffer:
    """A host array kept for the sums over angles of one data term where its communicator
    has no node-shared buffer (one rank, or one rank per node): the sums are written into
    it and reduced in place, so that the CG loop does not map (and fault in) a new
    complex128 volume for every application of the normal operator."""

    def __init__(self):
        self.array = None

    def get(self, shape):
        """The buffer for sums of ``shape``, made on first use (or when the shape changes)."""
        if self.array is None or self.array.shape != tuple(shape):
            self.array = np.empty(shape, dtype=WIDE)
        return self.array


def reduced_sum(comm, shape, local_sum, operand, spare: SumBuffer | None = None):
    """``local_sum(out)`` (this rank's complex128 part of a sum over angles, computed from
    ``operand`` and written into ``out`` when that is not None) summed over ``comm``.
    Host arrays go through the communicator's node-shared buffer
    (:class:`~ptmpi.parallel.shared_sum.SharedSum`): each rank writes its part into it and
    the parts are summed there; the result is that buffer, valid until the next sum of
    this shape. Without a shared buffer the sum is written into ``spare`` (when given) and
    reduced in place with ``allreduce_sum``: the result is then ``spare``'s array, valid
    until the next sum that uses it. Device arrays, or an ``operand`` inside the buffer,
    take an in-place ``allreduce_sum`` of a new array."""
    host = get_xp(operand) is np
    shared = comm.shared_sum(shape, WIDE) if host else None
    if shared is not None and not np.may_share_memory(operand, shared.buffer):
        return shared.reduce(local_sum(shared.buffer))
    if shared is None and host and spare is not None:
        buffer = spare.get(shape)
        if not np.may_share_memory(operand, buffer):
            return comm.allreduce_sum(local_sum(buffer))
    return comm.allreduce_sum(local_sum(None))


class FrameReductions:
    """Reductions of per-frame statistics over every rank that owns frames (``comm``);
    shared by :class:`DataTerm` and the slab layout's data term."""

    comm = None

    def reduce(self, values):
        """Sum of per-rank float64 statistics over ``comm`` (array or float)."""
        if np.isscalar(values):
            return self.comm.allreduce_scalar(float(values))
        return self.comm.allreduce_sum(np.asarray(values, dtype=np.float64))

    def all(self, flag: bool) -> bool:
        """True when ``flag`` holds on every rank."""
        return self.comm.allreduce_scalar(1.0 if flag else 0.0, "min") > 0


class DataTerm(FrameReductions):
    """``D(omega, u)`` for this rank's angles, with the collectives of the data term.

    Parameters
    ----------
    shape : (nz, n, n)
        Volume shape (replicated volume).
    theta_local : (N_THETA_LOCAL,) float
        This rank's angles in radians.
    probe : (M, M) complex, or (K, M, M) incoherent probe modes
        Initial probe ``omega`` (numpy or CuPy). With ``K`` modes the far fields
        (``fwd``, the adjoint's input) are ``(K, N_FRAMES_LOCAL, M, M)``, the adjoint sums
        the modes and ``W = sum_k W_k`` (:mod:`ptmpi.operators.modes`).
    positions_local, frame_offset_local :
        This rank's window corners and frame offsets (see :class:`JointModel`).
    comm :
        Communicator of the angle group (``SerialComm`` for one process).
    xp : array module of the iterates.
    dtype : complex dtype of the iterates.
    """

    def __init__(self, shape, theta_local, probe, positions_local, frame_offset_local, comm,
                 *, xp=np, dtype=np.complex64):
        self.comm = comm
        self.xp = xp
        self.dtype = np.dtype(dtype)
        self.model = JointModel(shape, theta_local, probe, positions_local, frame_offset_local,
                                dtype=dtype)
        self.weight = self.model.illumination(xp)
        self.mode_mixing = None
        self._sums = SumBuffer()

    @property
    def n_modes(self) -> int:
        """Incoherent probe modes ``K`` (1: one ``(M, M)`` probe)."""
        return self.probe.shape[0] if self.probe.ndim == 3 else 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.model.shape

    @property
    def probe(self):
        return self.model.ptycho.probe

    def set_probe(self, probe) -> None:
        """Replace ``omega``; the illumination ``W`` follows."""
        self.model.set_probe(probe)
        self.weight = self.model.illumination(self.xp)

    def set_positions(self, positions_local) -> None:
        """Move this rank's frames to ``positions_local`` (alignment); ``W`` follows."""
        self.model.set_positions(positions_local)
        self.weight = self.model.illumination(self.xp)

    # -- maps --------------------------------------------------------------------------
    def fwd(self, u):
        """``z_local = D_r u``: this rank's far fields ``(N_FRAMES_LOCAL, M, M)`` (with
        modes ``(K, N_FRAMES_LOCAL, M, M)``)."""
        return self.model.fwd(u)

    def adj(self, z_local):
        """``D^H z = sum_r D_r^H z_r`` over all ranks, complex128 ``(nz, n, n)``.

        Like :meth:`normal`, the result is a buffer that the next call of either
        overwrites (:func:`reduced_sum`): use it before then."""
        return reduced_sum(self.comm, self.shape,
                           lambda out: self.model.adj(z_local, WIDE, out), z_local, self._sums)

    def normal(self, x):
        """``D^H D x = sum_t P_t^H (W_t P_t x)`` over all angles, complex128 (a buffer, as
        in :meth:`adj`)."""
        return reduced_sum(self.comm, self.shape,
                           lambda out: self.model.normal(x, self.weight, WIDE, out), x,
                           self._sums)

    def diagonal(self, keep: bool = True):
        """The diagonal of ``D^H D`` (float64 volume), for Jacobi preconditioning.
        ``keep``: cache the projector's squared matrix for later calls (False: a one-off)."""
        local = self.model.projector.adj_squared_weights(self.weight.astype(np.float64),
                                                         keep=keep)
        return self.comm.allreduce_sum(local)

    def norm(self, iterations: int) -> float:
        """``||D^H D||`` by power iteration from the same start vector on every rank."""
        nz, n, _ = self.shape
        rng = np.random.default_rng(0)
        x = to_device(rng.standard_normal((nz, n, n)).astype(self.dtype), self.xp)
        volume = VolumeSpace(self.shape)  # norms summed slice by slice, as on z-slabs
        x /= volume.norm(x)
        value = 0.0
        for _ in range(max(1, iterations)):
            y = self.normal(x).astype(self.dtype)
            value = volume.norm(y)
            if value == 0.0:
                break
            x = y / value
        return value

    def update_probe(self, u, target_local, guard: bool = False):
        """The paper's closed-form probe update from the views ``S_j P_t u`` and the far
        fields ``target_local = z + lam2``; sets and returns the new probe. ``guard``:
        the new probe (every mode) keeps its last row and column at zero
        (:func:`~ptmpi.operators.ptycho.guard_probe`; ``--align`` with a guarded probe).

        With ``K`` modes each mode gets the closed form from its own far fields, then the
        modes are rotated into their orthogonal basis (:func:`orthogonalise`); the
        ``K x K`` unitary of that rotation is kept in ``mode_mixing``: the solver mixes its
        per-mode fields (``lam2``) by it (:func:`~ptmpi.operators.modes.mix_modes`)."""
        views = self.model.ptycho.extract(self.model.projector.fwd(u))
        if self.n_modes > 1:
            from ptmpi.operators.fft import fft2
            from ptmpi.operators.modes import orthogonalise

            omega = probe_modes_from_views(views, fft2(target_local, inverse=True), self.comm,
                                           ptycho=self.model.ptycho.geometry)
            omega, self.mode_mixing = orthogonalise(omega.astype(self.dtype))
        else:
            omega = probe_from_views(views, target_local, self.comm,
                                     ptycho=self.model.ptycho).astype(self.dtype)
        if guard:
            omega = guard_probe(omega)
        self.set_probe(omega)
        return omega


def probe_from_views(views_local, target_local, comm, ptycho=None):
    """``omega = sum_j v_j^* F^H(target_j) / sum_j |v_j|^2`` over all frames of all ranks.

    ``views_local``: ``(N_FRAMES_LOCAL, M, M)`` windows ``S_j P_t u`` (or ``S_j v``);
    ``target_local``: the far fields ``z + lam2`` of the same frames. With sub-pixel
    positions pass ``ptycho`` (the frames' :class:`~ptmpi.operators.ptycho.Ptycho`): frame
    ``j`` then uses ``shift_j(omega)``, the pixels of the probe are coupled and the
    least-squares probe is solved for (:func:`_subpixel_probe`). (A closed form
    ``sum_j shift_j^H(v_j^* y_j) / sum_j shift_j^H(|v_j|^2)`` was used before: Fourier
    interpolation of ``|v_j|^2`` rings below zero at windows over the image edge, and
    with ``--refine-probe`` on jittered positions the demo diverged, R 1e14; with
    ``--align --refine-probe`` on drift data it collapsed once ``r2`` was raised.)
    Whether the frames are sub-pixel is agreed by all ranks (the solve has collectives).
    """
    from ptmpi.operators.fft import fft2

    back = fft2(target_local, inverse=True)
    return probe_modes_from_views(views_local, back[None], comm, ptycho)[0]


def _any_subpixel(ptycho, comm) -> bool:
    """True when some rank's frames have sub-pixel positions (``ptycho`` None: none)."""
    if ptycho is None:
        return False
    return comm.allreduce_scalar(1.0 if ptycho.subpixel else 0.0, "max") > 0


def _subpixel_probe(views_local, exits_local, comm, ptycho, iterations: int | None = None):
    """Probe update with sub-pixel frames: per mode ``k`` the least-squares probe
    ``argmin sum_j || shift_j(omega) v_j - y_{k,j} ||^2`` (``y`` the exit targets
    ``exits_local`` ``(K, N, M, M)``), whose normal equations
    ``sum_j shift_j^H(|v_j|^2 shift_j(omega)) = sum_j shift_j^H(v_j^* y_j)`` couple the
    probe's pixels. Started from the closed form that moves the numerator and ``|v_j|^2``
    back separately (exact where ``|v_j|^2`` is locally constant, 4e-3 off with windows
    over the image edge), then ``iterations`` steps of Jacobi-preconditioned CG on the
    normal equations. The normal operator is one convolution whose kernel is built once
    from all frames and summed over the ranks in one Allreduce
    (:class:`~ptmpi.operators.probe_normal.ProbeNormal`): a CG step costs a few FFTs of
    the probe's size, none per frame. Per-frame FFTs run in the views' precision, sums
    in double. Returns ``(K, M, M)``."""
    from ptmpi.solvers.cg import conjugate_gradient  # (solvers import this module)

    if iterations is None:
        iterations = SUBPIXEL_CG
    xp = get_xp(views_local)
    cdtype = views_local.dtype
    weights = xp.abs(views_local)
    weights *= weights
    normal = ptycho.probe_normal_operator(weights)  # sum_j shift_j^H(|v_j|^2 shift_j(x))
    normal.reduce(comm)  # (the applications then need no communication)
    den = normal.denominator()  # float64, the moved-back |v_j|^2
    lit = den > 1e-8 * float(den.max())
    inv_den = xp.where(lit, 1.0 / xp.where(lit, den, 1.0), 0.0)

    modes = []
    for exits in exits_local:
        rhs = ptycho.unshift_sum(exits.astype(cdtype, copy=False), factor=views_local)
        comm.allreduce_sum(rhs)
        modes.append(conjugate_gradient(normal, rhs, rhs * inv_den, iterations,
                                        inv_diag=inv_den))
    return xp.stack(modes).astype(views_local.dtype)


def probe_modes_from_views(views_local, exit_local, comm, ptycho=None):
    """:func:`probe_from_views` for ``K`` probe modes at once, from real-space fields.

    ``exit_local``: ``(K, N_FRAMES_LOCAL, M, M)``, the targets already propagated back,
    ``F^H(z_k + lam2_k)``; ``views_local`` as there (common to all modes). Each mode gets
    ``omega_k = sum_j v_j^* y_{k,j} / sum_j |v_j|^2``: the denominator is formed once and
    the ``K`` numerators are reduced in one call. Returns ``(K, M, M)``.
    """
    xp = get_xp(views_local)
    if _any_subpixel(ptycho, comm):
        return _subpixel_probe(views_local, exit_local, comm, ptycho)
    conj_views = xp.conj(views_local)
    num = xp.stack([xp.sum(conj_views * exit_local[k], axis=0, dtype=np.complex128)
                    for k in range(exit_local.shape[0])])
    den = xp.sum(xp.abs(views_local) ** 2, axis=0, dtype=np.float64).astype(np.complex128)
    comm.allreduce_sum(num)
    comm.allreduce_sum(den)
    floor = 1e-8 * float(xp.abs(den).max())
    lit = xp.abs(den) > floor
    omega = xp.where(lit[None], num / xp.where(lit, den, 1)[None], 0)
    return omega.astype(views_local.dtype)
