"""Compiled host kernels (Numba) for the hot loops; the only module that imports Numba.

Each kernel is a fused, single-pass version of numpy code that stays beside it as the
reference (and as the path for CuPy arrays, or when Numba is missing or disabled with
``PTMPI_NUMBA=0``); tests check that both agree. Kernels are single-threaded: a rank owns
a core, and ranks, not threads, share out the work.

- :func:`csr_matmat`: ``y = A @ x`` for a CSR matrix and a dense ``(cols, k)`` block,
  accumulating in ``y``'s dtype (float64 sums of float32 data without a converted copy);
  the inner loop over the block's columns is vectorized.
- :func:`neg_laplacian`: ``grad^H grad u = -Lap u`` (Neumann) in one pass.
- :func:`cg_update`: CG's ``x += a d``, ``r -= a Ad``, ``s = M r`` and ``<r, s>`` in one pass.
- :func:`cg_direction`: ``d = s + b d`` in place.
"""

from __future__ import annotations

import os

import numpy as np

try:  # pragma: no cover - exercised where Numba is installed
    import numba
except ImportError:  # pragma: no cover
    numba = None

ENABLED = numba is not None and os.environ.get("PTMPI_NUMBA", "1") != "0"


def available(*arrays) -> bool:
    """True when the compiled kernels can run on these arrays (numpy, Numba present)."""
    return ENABLED and all(type(a).__module__ == "numpy" for a in arrays)


if numba is not None:
    _jit = numba.njit(cache=True, fastmath=False, boundscheck=False, nogil=True)

    @_jit
    def _csr_matmat(indptr, indices, data, x, y):
        n_rows, width = y.shape
        for i in range(n_rows):
            row = y[i]
            for k in range(width):
                row[k] = 0
            for jj in range(indptr[i], indptr[i + 1]):
                a = data[jj]
                xj = x[indices[jj]]
                for k in range(width):
                    row[k] += a * xj[k]

    @_jit
    def _neg_laplacian(u, out):
        nz, ny, nx = u.shape
        for k in range(nz):
            for i in range(ny):
                for j in range(nx):
                    c = u[k, i, j]
                    acc = 0 * c
                    if k > 0:
                        acc += c - u[k - 1, i, j]
                    if k < nz - 1:
                        acc += c - u[k + 1, i, j]
                    if i > 0:
                        acc += c - u[k, i - 1, j]
                    if i < ny - 1:
                        acc += c - u[k, i + 1, j]
                    if j > 0:
                        acc += c - u[k, i, j - 1]
                    if j < nx - 1:
                        acc += c - u[k, i, j + 1]
                    out[k, i, j] = acc

    @_jit
    def _neg_div_sum(a, b, out):
        _, nz, ny, nx = a.shape
        for k in range(nz):
            for i in range(ny):
                for j in range(nx):
                    acc = out[k, i, j]  # zero: out comes zero-filled
                    if k < nz - 1:
                        acc -= a[0, k, i, j] + b[0, k, i, j]
                    if k > 0:
                        acc += a[0, k - 1, i, j] + b[0, k - 1, i, j]
                    if i < ny - 1:
                        acc -= a[1, k, i, j] + b[1, k, i, j]
                    if i > 0:
                        acc += a[1, k, i - 1, j] + b[1, k, i - 1, j]
                    if j < nx - 1:
                        acc -= a[2, k, i, j] + b[2, k, i, j]
                    if j > 0:
                        acc += a[2, k, i, j - 1] + b[2, k, i, j - 1]
                    out[k, i, j] = acc

    @_jit
    def _tv_step(u, lam1, threshold, p):
        nz, ny, nx = u.shape
        zero = 0 * u[0, 0, 0]
        for k in range(nz):
            for i in range(ny):
                for j in range(nx):
                    c = u[k, i, j]
                    g0 = u[k + 1, i, j] - c if k < nz - 1 else zero
                    g1 = u[k, i + 1, j] - c if i < ny - 1 else zero
                    g2 = u[k, i, j + 1] - c if j < nx - 1 else zero
                    t0 = g0 - lam1[0, k, i, j]
                    t1 = g1 - lam1[1, k, i, j]
                    t2 = g2 - lam1[2, k, i, j]
                    mag = np.sqrt(t0.real * t0.real + t0.imag * t0.imag + t1.real * t1.real
                                  + t1.imag * t1.imag + t2.real * t2.real + t2.imag * t2.imag)
                    scale = (mag - threshold) / mag if mag > threshold else 0 * mag
                    p0, p1, p2 = t0 * scale, t1 * scale, t2 * scale
                    p[0, k, i, j] = p0
                    p[1, k, i, j] = p1
                    p[2, k, i, j] = p2
                    lam1[0, k, i, j] += p0 - g0
                    lam1[1, k, i, j] += p1 - g1
                    lam1[2, k, i, j] += p2 - g2

    @_jit
    def _combine(wide, a, extra, b, out):
        for i in range(out.size):
            out[i] = a * wide[i] + b * extra[i]

    @_jit
    def _cg_update(x, r, d, ad, alpha, inv_diag, s):
        acc = 0.0
        for i in range(x.size):
            x[i] += alpha * d[i]
            ri = r[i] - alpha * ad[i]
            r[i] = ri
            si = inv_diag[i] * ri
            s[i] = si
            acc += ri.real * si.real + ri.imag * si.imag
        return acc

    @_jit
    def _cg_update_plain(x, r, d, ad, alpha):
        acc = 0.0
        for i in range(x.size):
            x[i] += alpha * d[i]
            ri = r[i] - alpha * ad[i]
            r[i] = ri
            acc += ri.real * ri.real + ri.imag * ri.imag
        return acc

    @_jit
    def _cg_direction(d, s, beta):
        for i in range(d.size):
            d[i] = s[i] + beta * d[i]


def csr_matmat(matrix, x, out_dtype=None):
    """``matrix @ x`` for a scipy CSR ``matrix`` and a C-contiguous 2-D real ``x``."""
    y = np.empty((matrix.shape[0], x.shape[1]), dtype=out_dtype or x.dtype)
    _csr_matmat(matrix.indptr, matrix.indices, matrix.data, x, y)
    return y


def neg_laplacian(u):
    """``-Lap u`` with Neumann boundary, ``u`` of shape ``(nz, ny, nx)``."""
    out = np.empty_like(u)
    _neg_laplacian(np.ascontiguousarray(u), out)
    return out


def cg_update(x, r, d, ad, alpha, inv_diag=None, s=None) -> float:
    """In place: ``x += alpha d``, ``r -= alpha ad``, ``s = inv_diag r``; returns
    ``Re <r, s>`` (``<r, r>`` without ``inv_diag``, when ``s`` is ``r``)."""
    if not all(v.flags.c_contiguous for v in (x, r, d) + (() if s is None else (s,))):
        raise ValueError("cg_update: x, r, d and s must be C-contiguous (updated in place)")
    dtype = x.dtype
    alpha = dtype.type(alpha)
    flat = [v.reshape(-1) for v in (x, r, d, ad)]
    if inv_diag is None:
        return float(_cg_update_plain(*flat, alpha))
    return float(_cg_update(*flat, alpha, inv_diag.reshape(-1), s.reshape(-1)))


def cg_direction(d, s, beta) -> None:
    """In place: ``d = s + beta d``."""
    if not d.flags.c_contiguous:
        raise ValueError("cg_direction: d must be C-contiguous (updated in place)")
    _cg_direction(d.reshape(-1), s.reshape(-1), d.dtype.type(beta))


def neg_div_sum(a, b):
    """``grad^H (a + b) = -div(a + b)`` for two ``(3, nz, ny, nx)`` fields, in one pass."""
    out = np.zeros(a.shape[1:], dtype=np.result_type(a, b))
    _neg_div_sum(np.ascontiguousarray(a), np.ascontiguousarray(b), out)
    return out


def tv_step(u, lam1, threshold: float, p=None):
    """TV split and multiplier in one pass: ``g = grad u``,
    ``p = shrink(g - lam1, threshold)``, ``lam1 += p - g`` (in place); returns ``p``."""
    if not lam1.flags.c_contiguous:
        raise ValueError("tv_step: lam1 must be C-contiguous (updated in place)")
    if p is None or p is lam1 or not p.flags.c_contiguous:
        p = np.empty_like(lam1)
    rdtype = np.finfo(u.dtype).dtype
    _tv_step(np.ascontiguousarray(u), lam1, rdtype.type(threshold), p)
    return p


def combine(wide, a: float, extra, b: float, dtype):
    """``a * wide + b * extra`` rounded once to ``dtype`` (e.g. the complex128 sum of a
    normal operator and the complex64 TV term)."""
    out = np.empty(wide.shape, dtype=dtype)
    _combine(wide.reshape(-1), float(a), np.ascontiguousarray(extra).reshape(-1), float(b),
             out.reshape(-1))
    return out
