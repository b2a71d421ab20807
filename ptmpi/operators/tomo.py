"""Parallel-beam tomography projector ``P_theta = Q R_theta`` (SPEC sections 1 and 7).

Discretization: each voxel is a unit square in its slice with constant value; a detector
bin of unit width records the mean over the bin of the line integrals through the slice.
A voxel with centre ``s0 = x cos(theta) + y sin(theta)`` then contributes to bin ``c``
exactly the area of the voxel square that lies in the strip ``|s - s_c| <= 1/2``, which is
the bin integral of its trapezoidal footprint (the convolution of two boxes of widths
``|cos(theta)|`` and ``|sin(theta)|``). Each voxel touches at most three bins.

Because the geometry is identical for every z-slice, the weights of all local angles form
one real sparse matrix ``M`` of shape ``(n_theta * n, n * n)`` and the projection of a slab
of slices is a sparse-times-dense product with the slab's slices (real and imaginary parts
as separate columns) as the dense operand. The adjoint is the product with the explicitly
stored transpose, so it is exact by construction.

Host path: compiled kernels (:mod:`ptmpi.operators.kernels`) run over blocks of up to 32
slices (``kernels.LANES`` real columns). A block of the volume is transposed, a tile of
pixel rows at a time, to one row of its values per pixel, and every detector bin's
projections are summed from the rows of the pixels it sees, in registers, with the
weights of ``P`` cut by tiles (:func:`ptmpi.operators.kernels.tiled_rows`) and stored in
chunks of eight (:func:`ptmpi.operators.kernels.chunk_rows`): a tile stays in the core's
own cache while all its weights are applied, and each bin's sum goes on from tile to tile
in index order. The back-projection sums each pixel from the rows of the bins it meets,
with the weights of ``P^T``, and :meth:`Projector.normal` weights a block's projections in
cache and sums them straight back, so the projections never reach main memory. Without
Numba (and for CuPy) the same products are scipy's sparse-times-dense on transposed slabs
whose dense operand is about ``SLAB_BYTES``; on a GPU one slab holds all slices.
"""

from __future__ import annotations

import logging

import numpy as np

from ptmpi.backend import complex_dtype, get_xp, real_dtype, sparse_module
from ptmpi.operators import kernels

logger = logging.getLogger(__name__)

# Below this box width the two-box CDF formula loses precision; use the single box.
_THIN_BOX = 1e-7
# Target size of a slab's dense operand on the host (bytes): well inside the shared L3.
SLAB_BYTES = 2 * 2**20


def _ramp_sq(t: np.ndarray) -> np.ndarray:
    t = np.maximum(t, 0.0)
    return 0.5 * t * t


def footprint_cdf(t: np.ndarray, a: float, b: float) -> np.ndarray:
    """CDF of the convolution of two centred boxes of widths ``a >= b >= 0``.

    This is the fraction of a unit voxel lying at signed distance below ``t`` from its
    centre, measured along the detector axis.
    """
    if b < _THIN_BOX:
        return np.clip((t + 0.5 * a) / a, 0.0, 1.0)
    h1, h2 = 0.5 * (a + b), 0.5 * (a - b)
    return (_ramp_sq(t + h1) - _ramp_sq(t + h2) - _ramp_sq(t - h2) + _ramp_sq(t - h1)) / (a * b)


def projection_matrix(n: int, theta: np.ndarray, dtype=np.float32):
    """Sparse weights ``M`` with ``(P u)[a, k, c] = sum_{i,j} M[a*n + c, i*n + j] u[k, i, j]``.

    Parameters
    ----------
    n : int
        Slice size (slices are ``(n, n)``, detector has ``n`` columns).
    theta : (N_THETA,) float
        Rotation angles in radians.
    dtype : real dtype of the weights.

    Returns
    -------
    scipy.sparse.csr_matrix, shape ``(N_THETA * n, n * n)``.
    """
    import scipy.sparse

    theta = np.asarray(theta, dtype=np.float64).ravel()
    centre = 0.5 * (n - 1)
    coord = np.arange(n, dtype=np.float64) - centre
    y, x = np.meshgrid(coord, coord, indexing="ij")
    x, y = x.ravel(), y.ravel()
    cols = np.arange(n * n, dtype=np.int64)
    rows_all, cols_all, vals_all = [], [], []
    for a, th in enumerate(theta):
        cos, sin = np.cos(th), np.sin(th)
        wa, wb = max(abs(cos), abs(sin)), min(abs(cos), abs(sin))
        t0 = x * cos + y * sin + centre  # voxel centre in detector-bin coordinates
        c0 = np.rint(t0).astype(np.int64)
        for dc in (-1, 0, 1):
            c = c0 + dc
            w = footprint_cdf(c + 0.5 - t0, wa, wb) - footprint_cdf(c - 0.5 - t0, wa, wb)
            keep = (c >= 0) & (c < n) & (w > 0)
            rows_all.append(a * n + c[keep])
            cols_all.append(cols[keep])
            vals_all.append(w[keep])
    rows = np.concatenate(rows_all)
    matrix = scipy.sparse.csr_matrix(
        (np.concatenate(vals_all).astype(dtype), (rows, np.concatenate(cols_all))),
        shape=(len(theta) * n, n * n),
    )
    matrix.sum_duplicates()
    return matrix


def footprint_on_detector(n: int, theta) -> np.ndarray:
    """Per voxel of an ``(n, n)`` slice, the smallest fraction of its footprint that falls
    on the detector (``|s| <= n/2``) over the angles ``theta``: ``(n, n)`` float64, 1 for
    no angle. A voxel with fraction 0 is missed entirely at some angle; those with a
    positive fraction at every angle make the field of view of the scan (for angles over
    ``[0, pi)``, about the inscribed cylinder, radius ``n/2`` plus part of a voxel)."""
    theta = np.asarray(theta, dtype=np.float64).ravel()
    coord = np.arange(n, dtype=np.float64) - 0.5 * (n - 1)
    y, x = np.meshgrid(coord, coord, indexing="ij")
    seen = np.ones((n, n))
    for th in theta:
        cos, sin = np.cos(th), np.sin(th)
        wa, wb = max(abs(cos), abs(sin)), min(abs(cos), abs(sin))
        s0 = x * cos + y * sin
        inside = footprint_cdf(0.5 * n - s0, wa, wb) - footprint_cdf(-0.5 * n - s0, wa, wb)
        seen = np.minimum(seen, inside)
    return seen


class Projector:
    """Projector ``P_theta`` for a set of angles, with its exact adjoint.

    Parameters
    ----------
    shape : (nz, n, n)
        Volume shape; axis 0 is the rotation axis.
    theta : (N_THETA,) float
        Rotation angles in radians (usually this rank's local angles).
    dtype : numpy dtype
        Complex (or real) dtype of the volumes it is applied to; sets the weights' precision.

    Notes
    -----
    ``fwd``: ``(nz, n, n) -> (N_THETA, nz, n)``; ``adj``: the reverse. Both accept numpy
    or CuPy arrays and return the same kind. See the module docstring for the
    discretization. Orientation (SPEC 1): at ``theta = 0`` column ``c`` sums ``u[k, :, c]``;
    at ``theta = pi/2`` it sums ``u[k, c, :]``.
    """

    def __init__(self, shape, theta, dtype=np.complex64):
        nz, ny, nx = (int(s) for s in shape)
        if ny != nx:
            raise ValueError(f"Projector: volume slices must be square, got shape {tuple(shape)}")
        self.shape = (nz, ny, nx)
        self.theta = np.asarray(theta, dtype=np.float64).ravel()
        self.dtype = np.dtype(dtype)
        self.n_theta = self.theta.size
        self._matrices: dict = {}

    @property
    def data_shape(self) -> tuple[int, int, int]:
        return (self.n_theta, self.shape[0], self.shape[2])

    def _matrix_pair(self, xp, rdtype):
        key = (xp.__name__, np.dtype(rdtype).str)
        if key not in self._matrices:
            host_key = ("numpy", key[1])
            if host_key not in self._matrices:
                m = projection_matrix(self.shape[1], self.theta, rdtype)
                self._matrices[host_key] = (m, m.T.tocsr())
            if xp is not np:
                sp = sparse_module(xp)
                m, mt = self._matrices[host_key]
                self._matrices[key] = (sp.csr_matrix(m), sp.csr_matrix(mt))
        return self._matrices[key]

    @staticmethod
    def _apply(matrix, cols, xp, out_dtype=None):
        """``matrix @ cols`` for a 2-D ``cols`` whose rows are pixels (or bins); complex via
        a real view; the sums are formed in ``out_dtype`` (default: ``cols``' dtype)."""
        is_complex = xp.iscomplexobj(cols)
        real_cols = cols.view(real_dtype(cols.dtype)) if is_complex else cols
        rdtype = real_dtype(out_dtype or cols.dtype)
        out = xp.ascontiguousarray(matrix @ real_cols.astype(rdtype, copy=False))
        return out.view(complex_dtype(rdtype)) if is_complex else out

    def slabs(self, xp, itemsize: int | None = None) -> list[tuple[int, int]]:
        """``(k0, k1)`` slice ranges of the scipy (or CuPy) products (module docstring)."""
        nz, n, _ = self.shape
        if xp is not np:
            return [(0, nz)]
        step = max(1, min(nz, SLAB_BYTES // (n * n * (itemsize or self.dtype.itemsize))))
        return [(k0, min(nz, k0 + step)) for k0 in range(0, nz, step)]

    def kernel_step(self, itemsize: int) -> int:
        """Slices per block of the compiled kernels: ``kernels.LANES // 2``, all of a
        block's real columns (fewer only for a thinner volume)."""
        return max(1, min(self.shape[0], kernels.LANES // 2))

    def tile_rows(self, rdtype) -> int:
        """Pixel rows per tile of the compiled forward projection (:func:`kernels.tile_rows`)."""
        return kernels.tile_rows(self.shape[1], 2 * np.dtype(rdtype).itemsize)

    def _chunks(self, kind: str, rdtype):
        """The weights of ``P`` (``kind="fwd"``) or ``P^T`` (``"adj"``) in ``rdtype``,
        chunked for the compiled kernels (:func:`ptmpi.operators.kernels.chunk_rows`):
        ``P`` cut by tiles of pixel rows (:func:`ptmpi.operators.kernels.tiled_rows`), its
        operand rows the pixels of a tile; ``P^T``'s operand rows the bins, each angle's
        padded by one row."""
        tile = self.tile_rows(rdtype) if kind == "fwd" else 0
        key = ("chunks", kind, np.dtype(rdtype).str, tile)
        if key not in self._matrices:
            n = self.shape[1]
            pair = self._matrices.get(("numpy", np.dtype(rdtype).str))
            if pair is None:  # built for this copy only: the kernels need no CSR matrix
                m = projection_matrix(n, self.theta, rdtype)
                pair = (m, m.T.tocsr() if kind == "adj" else None)
            if kind == "fwd":
                matrix, column_row = kernels.tiled_rows(pair[0], n, tile)
            else:
                index = np.arange(self.n_theta * n, dtype=np.int64)
                matrix, column_row = pair[1], (index // n) * (n + 1) + index % n
            self._matrices[key] = kernels.chunk_rows(matrix, column_row, rdtype)
        return self._matrices[key]

    def _base_rdtype(self):
        return real_dtype(self.dtype)

    def _fwd_slab(self, matrix, u_slab, xp):
        """Projections of a slab ``(k, n, n)``, returned as ``(N_THETA, n, k)``."""
        k, n, _ = u_slab.shape
        cols = xp.ascontiguousarray(u_slab.reshape(k, n * n).T)  # (pixels, slices)
        return self._apply(matrix, cols, xp).reshape(self.n_theta, n, k)

    def _adj_slab(self, matrix_t, p_slab, xp, out_dtype=None):
        """Back-projection of ``(N_THETA, n, k)`` slab projections, as ``(k, n, n)``."""
        _, n, k = p_slab.shape
        out = self._apply(matrix_t, p_slab.reshape(self.n_theta * n, k), xp, out_dtype)
        return out.T.reshape(k, n, n)  # (pixels, k) -> (k, n, n)

    def adj_squared_weights(self, w, keep: bool = True):
        """``sum_c M[c, pixel]^2 w[c]`` per voxel: the diagonal of ``P^H diag(w) P``.

        ``w``: ``(N_THETA, nz, n)`` real; returns ``(nz, n, n)`` real (a Jacobi
        preconditioner of the normal operator). ``keep``: cache the squared matrix for
        later calls (False: a one-off, the matrix is freed on return).
        """
        xp = get_xp(w)
        nz, n, _ = self.shape
        key = ("squared", xp.__name__, np.dtype(w.dtype).str)
        sq = self._matrices.get(key)
        if sq is None:
            _, mt = self._matrix_pair(np, w.dtype)
            sq = mt.multiply(mt).tocsr()
            sq = sq if xp is np else sparse_module(xp).csr_matrix(sq)
            if keep:
                self._matrices[key] = sq
        cols = xp.ascontiguousarray(w.transpose(0, 2, 1)).reshape(self.n_theta * n, nz)
        return xp.ascontiguousarray((sq @ cols).T).reshape(nz, n, n)

    def fwd(self, u):
        """Project: ``u (nz, n, n) -> (N_THETA, nz, n)``, same dtype as ``u``."""
        xp = get_xp(u)
        if u.shape != self.shape:
            raise ValueError(f"Projector.fwd: expected volume {self.shape}, got {u.shape}")
        if kernels.available(u) and xp.iscomplexobj(u):
            rdtype = real_dtype(u.dtype)
            return kernels.project_fwd(self._chunks("fwd", rdtype), u, self.n_theta,
                                       self.kernel_step(u.dtype.itemsize), self.tile_rows(rdtype))
        m, _ = self._matrix_pair(xp, real_dtype(u.dtype))
        out = xp.empty(self.data_shape, dtype=u.dtype)
        for k0, k1 in self.slabs(xp, u.dtype.itemsize):
            out[:, k0:k1, :] = self._fwd_slab(m, u[k0:k1], xp).transpose(0, 2, 1)
        return out

    def adj(self, p, accumulate=None, out=None):
        """Back-project (exact adjoint): ``p (N_THETA, nz, n) -> (nz, n, n)``.

        ``accumulate``: optional wider complex (or real) dtype in which the sum over angles
        is formed and returned (e.g. complex128 for complex64 data), so that partial sums
        over different blocks of angles add up to the same rounded result. ``out``:
        optional C-contiguous array of the result's shape and dtype to write it into.
        """
        xp = get_xp(p)
        if p.shape != self.data_shape:
            raise ValueError(f"Projector.adj: expected data {self.data_shape}, got {p.shape}")
        dtype = p.dtype if accumulate is None else np.result_type(p.dtype, accumulate)
        if kernels.available(p) and xp.iscomplexobj(p):
            return kernels.project_adj(self._chunks("adj", real_dtype(dtype)), p, self.shape,
                                       self.kernel_step(p.dtype.itemsize), dtype, out)
        _, mt = self._matrix_pair(xp, real_dtype(dtype))
        out = kernels.result_array(out, self.shape, dtype, xp, contiguous=False)
        for k0, k1 in self.slabs(xp, p.dtype.itemsize):
            slab = xp.ascontiguousarray(p[:, k0:k1, :].transpose(0, 2, 1))
            out[k0:k1] = self._adj_slab(mt, slab, xp, dtype)
        return out

    def normal(self, u, weight, accumulate=None, out=None):
        """``P^H (weight * P u)``, slab by slab: ``(nz, n, n) -> (nz, n, n)``.

        ``weight``: ``(N_THETA, nz, n)`` real; ``accumulate`` and ``out`` as in :meth:`adj`.
        Equal to ``adj(weight * fwd(u), accumulate)`` up to rounding.
        """
        xp = get_xp(u)
        if u.shape != self.shape:
            raise ValueError(f"Projector.normal: expected volume {self.shape}, got {u.shape}")
        dtype = u.dtype if accumulate is None else np.result_type(u.dtype, accumulate)
        if kernels.available(u, weight) and xp.iscomplexobj(u):
            rdtype = real_dtype(u.dtype)
            return kernels.project_normal(self._chunks("fwd", rdtype),
                                          self._chunks("adj", real_dtype(dtype)), u, weight,
                                          self.kernel_step(u.dtype.itemsize),
                                          self.tile_rows(rdtype), dtype, out)
        m, _ = self._matrix_pair(xp, real_dtype(u.dtype))
        _, mt = self._matrix_pair(xp, real_dtype(dtype))
        out = kernels.result_array(out, self.shape, dtype, xp, contiguous=False)
        for k0, k1 in self.slabs(xp, u.dtype.itemsize):
            proj = self._fwd_slab(m, u[k0:k1], xp)  # (N_THETA, n, k)
            proj *= weight[:, k0:k1, :].transpose(0, 2, 1)
            out[k0:k1] = self._adj_slab(mt, proj, xp, dtype)
        return out
