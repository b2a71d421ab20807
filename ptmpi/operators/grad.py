"""3-D forward-difference gradient and its adjoint ``grad^H = -div`` (Neumann boundary).

``(grad u)[d]`` is the forward difference along axis ``d`` of ``(z, y, x)``; the difference
at the last index of each axis is zero (no wrap-around), the usual choice for isotropic TV.
"""

from __future__ import annotations

from ptmpi.backend import get_xp
from ptmpi.operators import kernels


class Gradient:
    """``grad``: ``(nz, n, n) -> (3, nz, n, n)``; ``adj = -div``: the reverse."""

    def __init__(self, shape):
        self.shape = tuple(int(s) for s in shape)

    def fwd(self, u, out=None):
        xp = get_xp(u)
        g = xp.zeros((3, *u.shape), dtype=u.dtype) if out is None else out
        xp.subtract(u[1:], u[:-1], out=g[0, :-1])
        xp.subtract(u[:, 1:], u[:, :-1], out=g[1, :, :-1])
        xp.subtract(u[:, :, 1:], u[:, :, :-1], out=g[2, :, :, :-1])
        if out is not None:
            g[0, -1] = 0
            g[1, :, -1] = 0
            g[2, :, :, -1] = 0
        return g

    def adj(self, g):
        """``-div g`` with the exact transpose of the forward differences."""
        xp = get_xp(g)
        out = xp.zeros(g.shape[1:], dtype=g.dtype)
        for axis in range(3):
            gd = g[axis]
            head = [slice(None)] * 3
            tail = [slice(None)] * 3
            head[axis], tail[axis] = slice(None, -1), slice(1, None)
            # D^T g: -g[k] for the term where voxel k is the "minus" end, +g[k-1] otherwise.
            out[tuple(head)] -= gd[tuple(head)]
            out[tuple(tail)] += gd[tuple(head)]
        return out

    def normal(self, u, out=None):
        """``grad^H grad u = -Lap u``: one compiled pass on the host when available (into
        ``out`` when given), else ``adj(fwd(u))``."""
        if kernels.available(u):
            return kernels.neg_laplacian(u, out)
        return self.adj(self.fwd(u))

    def normal_plus(self, u, wide, a: float, b: float, out=None):
        """``a * wide + b * grad^H grad u`` rounded once to ``u``'s dtype (``wide``: a sum
        in a wider dtype, e.g. the data term's normal operator): one compiled pass on the
        host when available (into ``out`` when given), else the sum of :meth:`normal`."""
        if kernels.available(u, wide):
            return kernels.combine_neg_laplacian(wide, a, u, b, out)
        total = wide.astype(u.dtype)
        total *= a
        total += b * self.normal(u)
        return total

    def adj_sum(self, a, b):
        """``adj(a + b) = -div(a + b)`` (one compiled pass on the host when available)."""
        if kernels.available(a, b):
            return kernels.neg_div_sum(a, b)
        return self.adj(a + b)

    def normal_diagonal(self, xp, dtype):
        """Diagonal of ``grad^H grad = -Lap``: the number of differences touching a voxel."""
        return self.normal_diagonal_slab(xp, dtype, 0, self.shape[0])

    def normal_diagonal_slab(self, xp, dtype, z0: int, z1: int):
        """Slices ``[z0, z1)`` of :meth:`normal_diagonal` (a z-slab of the volume)."""
        diag = xp.zeros((z1 - z0, *self.shape[1:]), dtype=dtype)
        for axis, size in enumerate(self.shape):
            count = xp.full(size, 2, dtype=dtype)
            count[0] = count[-1] = 1
            if size == 1:
                count[0] = 0
            if axis == 0:
                count = count[z0:z1]
            shape = [1, 1, 1]
            shape[axis] = count.shape[0]
            diag += count.reshape(shape)
        return diag

    def with_next(self, u):
        """``u`` with the slice that follows it (none: the whole volume)."""
        return u

    def laplacian(self, u):
        """``Lap u = -grad^H grad u = div grad u``."""
        return -self.adj(self.fwd(u))
