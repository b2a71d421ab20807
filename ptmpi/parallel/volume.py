"""The volume space of the angle x slab process grid (``--slabs S``).

Ranks form ``A = size / S`` angle groups of ``S`` consecutive ranks: rank ``r`` is in
group ``a = r // S`` and holds z-slab ``s = r % S`` (``block_partition(nz, S, s)``; uneven
slabs allowed). Two sub-communicators:

``group``
    the ``S`` ranks of one angle group (one per slab): halos of the gradient, the
    projection transposes of :class:`~ptmpi.parallel.slab_data_term.SlabDataTerm`, and the
    sums over slabs of every reduction over the volume (CG's dot products, norms, TV, SNR);
``slab_comm``
    the ``A`` ranks that hold the same slab (one per group): the sums over angles of the
    volume-space terms of the data term.

Frames keep today's owner: rank ``r`` reads and holds the angles
``block_partition(n_theta, size, r)``, so the group's angles are the union of its ranks'.
With ``S = 1`` the group is one rank, the slab is the whole volume and every method here
is the identity of the replicated layout (bit for bit).
"""

from __future__ import annotations

import math

import numpy as np

from ptmpi.backend import get_xp, to_host
from ptmpi.operators import kernels
from ptmpi.operators.grad import Gradient
from ptmpi.parallel.comm import Comm, SerialComm
from ptmpi.parallel.partition import block_partition


class VolumeSpace:
    """This rank's z-slab of a ``(nz, n, n)`` volume and the reductions over slabs.

    Parameters
    ----------
    shape : (nz, n, n) global volume shape.
    group : communicator of the ``S`` slabs of this rank's angle group (rank ``s`` holds
        slab ``s``); ``SerialComm`` (default): the replicated layout.
    """

    def __init__(self, shape, group: Comm | None = None):
        self.shape = tuple(int(s) for s in shape)
        self.group = group if group is not None else SerialComm()
        self.n_slabs = self.group.size
        self.slab = self.group.rank
        self.bounds = [block_partition(self.shape[0], self.n_slabs, s)
                       for s in range(self.n_slabs)]
        self.z0, self.z1 = self.bounds[self.slab]

    @property
    def split(self) -> bool:
        """True when the volume is split over more than one slab."""
        return self.n_slabs > 1

    @property
    def local_shape(self) -> tuple[int, int, int]:
        return (self.z1 - self.z0, *self.shape[1:])

    def local(self, x):
        """This rank's slab of a global ``(..., nz, n, n)`` array (a view); a slab-shaped
        array is returned as it is."""
        if x is None or x.shape[-3] == self.local_shape[0] and not (
                self.split and x.shape[-3] == self.shape[0]):
            return x
        return x[..., self.z0:self.z1, :, :]

    # -- reductions over the slabs ---------------------------------------------------
    # Sums over the volume are formed per slice (float64, over the interleaved partial
    # sums of kernels.SUM_LANES, each in index order) and the slices'
    # sums are added in slice order on every rank: the result does not depend on how the
    # slices are split into slabs, bit for bit. (The nonconvex iteration amplifies rounding
    # differences of CG's scalars from 1e-7 to 1e-3 within a few iterations.)
    def total(self, partial):
        """Sum over all slices of per-slice float64 partial sums ``(nz_slab, ...)`` of this
        slab: the slabs' partials are placed in a zero volume-length array and summed
        over the group (exact: each entry has one non-zero term), then added in order."""
        partial = np.asarray(partial, dtype=np.float64)
        if self.split:
            full = np.zeros((self.shape[0], *partial.shape[1:]), dtype=np.float64)
            full[self.z0:self.z1] = partial
            partial = self.group.allreduce_sum(full)
        return partial.sum(axis=0)

    def sum(self, values):
        """Sum of float64 values over the slabs (scalar or array, a new value); for
        statistics, not for the iteration's scalars (see :meth:`total`)."""
        if not self.split:
            return values
        if np.isscalar(values):
            return self.group.allreduce_scalar(float(values))
        return self.group.allreduce_sum(np.array(values, dtype=np.float64))

    def max(self, value: float) -> float:
        return self.group.allreduce_scalar(float(value), "max") if self.split else value

    def mean(self, x) -> float:
        """Mean of a real volume-space array over the whole volume."""
        xp = get_xp(x)
        partial = xp.sum(x.reshape(x.shape[0], -1), axis=1, dtype=xp.float64)
        return float(self.total(to_host(partial))) / (self.shape[0] * self.shape[1]
                                                      * self.shape[2])

    def vdot(self, x, y) -> complex:
        """``vdot(x, y)`` over the whole volume (``x``, ``y``: ``(nz_slab, n, n)``)."""
        parts = self.total(slice_vdot(x, y))
        return complex(parts[0], parts[1])

    def norm(self, x) -> float:
        """``||x||_2`` over the whole volume."""
        return math.sqrt(max(self.vdot(x, x).real, 0.0))

    def step(self, u, u_old, prev=None):
        """An iteration's step and its metrics over the whole volume: returns ``(step,
        ||step||, ||u||, Re <prev, step>)`` (the last 0.0 without ``prev``), with the sums
        of :meth:`norm` and :meth:`vdot`. On the host the step is written over ``prev`` (the
        previous step, no longer needed) where it can be, so that no new volume is made."""
        if kernels.available(u, u_old) and (prev is None or kernels.available(prev)):
            step, parts = kernels.step_sums(u, u_old, prev)
            sums = self.total(parts)
        else:  # (a new step array: the device's memory pool reuses the old one's)
            step = u - u_old
            sums = (self.total(slice_vdot(step, step))[0], self.total(slice_vdot(u, u))[0],
                    0.0 if prev is None else self.vdot(prev, step).real)
        return (step, math.sqrt(max(float(sums[0]), 0.0)), math.sqrt(max(float(sums[1]), 0.0)),
                float(sums[2]))

    # -- halos and the global volume --------------------------------------------------
    def halos(self, x, before: int, after: int):
        """The ``before`` last slices of the previous slab and the ``after`` first slices of
        the next one (``(..., k, n, n)`` arrays; None at the ends of the volume, where there
        are none, and when not asked for; on the device of ``x``, staged through host memory
        for MPI). Every slab holds at least one slice (S <= nz),
        so one-slice halos come from the neighbours themselves."""
        if not self.split:
            return None, None
        xp = get_xp(x)
        s, last = self.slab, self.n_slabs - 1
        prev = s - 1 if s > 0 else None
        nxt = s + 1 if s < last else None
        head = tail = None
        if after:  # my first slices go to the previous slab, the next slab's come to me
            tail = self.group.sendrecv(xp.ascontiguousarray(x[..., :after, :, :]), prev, nxt)
        if before:
            head = self.group.sendrecv(xp.ascontiguousarray(x[..., -before:, :, :]), nxt, prev)
        return head, tail

    def extend(self, x, before: int, after: int):
        """``x`` (``(..., nz_slab, n, n)``) with its :meth:`halos` attached; returns
        ``(x_ext, offset)``, ``x_ext[..., offset:offset + nz_slab]`` being ``x``."""
        head, tail = self.halos(x, before, after)
        if head is None and tail is None:
            return x, 0
        xp = get_xp(x)
        parts = ([head] if head is not None else []) + [x] + ([tail] if tail is not None else [])
        return xp.concatenate(parts, axis=-3), 0 if head is None else head.shape[-3]

    def gather(self, x):
        """The global array on this group's first rank (None elsewhere): ``x`` as it is
        when the volume is not split. The root holds the global array and its own slab,
        nothing more."""
        if not self.split:
            return x
        x = np.ascontiguousarray(to_host(x))  # (nz_slab, n, n): slabs are contiguous
        plane = int(np.prod(x.shape[1:]))
        counts = [(z1 - z0) * plane for z0, z1 in self.bounds]
        out = np.empty((self.shape[0], *x.shape[1:]), dtype=x.dtype) \
            if self.group.rank == 0 else None
        self.group.gatherv(x.reshape(-1), None if out is None else out.reshape(-1), counts)
        return out


class SlabGradient:
    """:class:`~ptmpi.operators.grad.Gradient` of the global volume applied to z-slabs.

    Each map applies the serial operator (compiled kernels where available) to the slab,
    which gives every slice but the slab's first and last their global value, then
    recomputes those two slices from windows of at most three slices with the one-slice
    halos of the neighbouring slabs (:meth:`VolumeSpace.halos`). Each voxel is computed by
    the same arithmetic as in the serial operator (bit for bit), the boundary conditions at
    the ends of the volume are the serial ones, and no slab-sized copy is made.
    """

    def __init__(self, volume: VolumeSpace):
        self.volume = volume
        self.shape = volume.local_shape

    def _apply(self, fn, arrays, before, after, out=None):
        """``fn(Gradient, *arrays)`` on the slab, its first and last slices recomputed;
        ``out``: passed on to that first call (``fn(..., out=out)``)."""
        out = fn(Gradient(arrays[0].shape[-3:]), *arrays, **({} if out is None else
                                                               {"out": out}))
        if not self.volume.split:
            return out
        xp = get_xp(out)
        halos = [self.volume.halos(a, before, after) for a in arrays]
        nzl = self.shape[0]
        for k in sorted({0, nzl - 1}):
            lo, hi = max(0, k - 1), min(nzl, k + 2)
            windows, offset = [], k - lo
            for a, (head, tail) in zip(arrays, halos, strict=True):
                parts = [a[..., lo:hi, :, :]]
                if k == 0 and head is not None:
                    parts.insert(0, head)
                if k == nzl - 1 and tail is not None:
                    parts.append(tail)
                windows.append(xp.ascontiguousarray(xp.concatenate(parts, axis=-3)))
            if k == 0 and halos[0][0] is not None:
                offset += 1
            value = fn(Gradient(windows[0].shape[-3:]), *windows)
            out[..., k, :, :] = value[..., offset, :, :]
        return out

    def with_next(self, u):
        """``u`` and the next slab's first slice (for the fused TV split)."""
        return self.volume.extend(u, 0, 1)[0]

    def fwd(self, u, out=None):
        g = self._apply(lambda op, x: op.fwd(x), [u], 0, 1)
        if out is None:
            return g
        out[...] = g
        return out

    def adj(self, g):
        return self._apply(lambda op, x: op.adj(x), [g], 1, 1)

    def normal(self, u, out=None):
        return self._apply(lambda op, x, out=None: op.normal(x, out), [u], 1, 1, out)

    def normal_plus(self, u, wide, a: float, b: float, out=None):
        """:meth:`Gradient.normal_plus` on the slab (``wide``: this slab's part): the slab's
        first and last slices are recomputed from windows with the halos of ``u`` (and
        zero slices of ``wide`` beside them, whose results are dropped)."""
        out = Gradient(u.shape).normal_plus(u, wide, a, b, out)
        if not self.volume.split:
            return out
        xp = get_xp(out)
        head, tail = self.volume.halos(u, 1, 1)
        nzl = self.shape[0]
        for k in sorted({0, nzl - 1}):
            lo, hi = max(0, k - 1), min(nzl, k + 2)
            parts, spread = [u[lo:hi]], [wide[lo:hi]]
            offset = k - lo
            if k == 0 and head is not None:
                parts.insert(0, head)
                spread.insert(0, xp.zeros_like(wide[:1]))
                offset += 1
            if k == nzl - 1 and tail is not None:
                parts.append(tail)
                spread.append(xp.zeros_like(wide[:1]))
            window = xp.ascontiguousarray(xp.concatenate(parts, axis=0))
            value = Gradient(window.shape).normal_plus(
                window, xp.ascontiguousarray(xp.concatenate(spread, axis=0)), a, b)
            out[k] = value[offset]
        return out

    def adj_sum(self, a, b):
        return self._apply(lambda op, x, y: op.adj_sum(x, y), [a, b], 1, 1)

    def normal_diagonal(self, xp, dtype):
        return Gradient(self.volume.shape).normal_diagonal_slab(xp, dtype, self.volume.z0,
                                                                self.volume.z1)

    def laplacian(self, u):
        return -self.adj(self.fwd(u))


def slice_vdot(x, y):
    """``vdot(x[k], y[k])`` of every slice ``k`` (axis 0), float64 host ``(nz, 2)`` (real,
    imaginary): the compiled kernel on the host, else array expressions of the arrays'
    module (numpy or the device's) in complex128, a few slices at a time (each slice's
    sum does not depend on which slices are computed with it, so the split into slabs
    does not change the sums)."""
    if kernels.available(x, y) and np.iscomplexobj(x) and x.dtype == y.dtype:
        return kernels.slice_vdot(x, y)
    xp = get_xp(x, y)
    nz = x.shape[0]
    plane = max(1, int(np.prod(x.shape[1:])))
    chunk = max(1, (1 << 22) // plane)  # complex128 temporaries of at most 64 MiB
    out = np.zeros((nz, 2), dtype=np.float64)
    for k0 in range(0, nz, chunk):
        k1 = min(nz, k0 + chunk)
        xs = x[k0:k1].reshape(k1 - k0, -1).astype(xp.complex128)
        ys = y[k0:k1].reshape(k1 - k0, -1).astype(xp.complex128)
        part = to_host(xp.sum(xp.conj(xs) * ys, axis=1))
        out[k0:k1, 0], out[k0:k1, 1] = part.real, part.imag
    return out
