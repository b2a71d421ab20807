"""Compiled host kernels (Numba) for the hot loops; the only module that imports Numba.

Each kernel is a fused, single-pass version of numpy or scipy code that stays beside it
as the reference (and as the path for CuPy arrays, or when Numba is missing or disabled
with ``PTMPI_NUMBA=0``); tests check that both agree. Kernels are single-threaded: a rank
owns a core, and ranks, not threads, share out the work. Loops index arrays directly (a
slice inside a compiled loop builds a view each time, which costs more than the
arithmetic it feeds).

- :func:`project_fwd`, :func:`project_adj`, :func:`project_normal`: the projector ``P``,
  its transpose (sums in a wider dtype) and ``P^T W P``, over blocks of slices straight
  from and to the volume's layout, each output row summed in registers from the rows its
  weights (:func:`chunk_rows`) pick.
- :func:`window_fwd`, :func:`window_adj`: the probe windows and their scatter-add (one
  probe, or a probe per frame for sub-pixel positions).
- :func:`data_split`: the z-step and the update of lam2 in one pass (detector mask aware);
  :func:`data_split_modes` the same for incoherent probe modes.
- :func:`tv_step`, :func:`neg_div_sum`, :func:`combine`: the TV split step, the
  divergence in the right-hand side and the rounding of the reduced sums.
- :func:`neg_laplacian`: ``grad^H grad u = -Lap u`` (Neumann) in one pass;
  :func:`combine_neg_laplacian` the u-system's ``a * wide + b * (-Lap u)`` in one pass.
- :func:`cg_start`: CG's first ``r = b - Ax``, ``d = M r`` and their sums in one pass;
  :func:`residual_update`: CG's ``r -= a Ad`` and ``<r, M r>`` in one pass;
  :func:`step_and_direction` its ``x += a d`` and ``d = M r + b d`` in another.
- :func:`step_sums`: an iteration's step ``u - u_old`` and the sums of its metrics.
"""

from __future__ import annotations

import os

import numpy as np

try:  # pragma: no cover - exercised where Numba is installed
    import numba
    import numba.core.cgutils
    import numba.extending
except ImportError:  # pragma: no cover
    numba = None

ENABLED = numba is not None and os.environ.get("PTMPI_NUMBA", "1") != "0"

# The smoothed likelihood's z-step stops its Newton solve per pixel when a step is below
# prox_tol(dtype) of the root's bracket: 1e-9 for float32 frames (the result is rounded to
# float32, eps 6e-8, and near the root Newton's error after such a step is about its
# square), 4e-16 for float64. (4e-16 for both before: one more iteration per pixel, 5.2
# instead of 4.0 on average, for the same float32 result on 1e6 test pixels with counts
# 0.01-2000.)
PROX_TOL = {4: 1e-9, 8: 4e-16}  # by the frames' real itemsize


def prox_tol(dtype) -> float:
    """Newton tolerance of the smoothed z-step for frames of real ``dtype``."""
    return PROX_TOL[np.dtype(dtype).itemsize]

# Projector kernels: real columns per block (two per complex slice) and non-zeros per chunk;
# the transposes between the volume's layout and a block's rows move TILE slices at a time
# (at 128^3, 8 cut the normal operator from 26 to 20 ms against one slice at a time: few
# enough streams for the caches, a cache line or more of a row per pixel).
LANES = 64
CHUNK = 8
# Partial sums of a volume's per-slice sums (see _lane_total below).
SUM_LANES = 32
TILE = 8
# The forward projection sums a block of slices over tiles of pixel rows whose transposed
# block takes about TILE_BYTES, so that it stays in the core's own cache while all its
# weights are applied (at 128^3, a block's P from 2.5 to 1.7 ms against the whole block
# transposed at once and read through the shared cache once per angle).
TILE_BYTES = 384 * 2**10
MIN_TILE_ROWS = 8
# log 2 in two parts, the first with trailing zero bits (e * LN2_HI is exact)
LN2_HI = 6.93147180369123816490e-01
LN2_LO = 1.90821492927058770002e-10


def available(*arrays) -> bool:
    """True when the compiled kernels can run on these arrays (numpy, Numba present)."""
    return ENABLED and all(type(a).__module__ == "numpy" for a in arrays)


if numba is not None:
    _jit = numba.njit(cache=True, fastmath=False, boundscheck=False, nogil=True)

    # The projector kernels work on blocks of LANES real columns (LANES // 2 complex
    # slices, zero-padded past the last slice): a block of the volume is transposed to
    # one row of LANES values per pixel, a block of projections to one row per detector
    # bin, and both products are row-by-row sums over the sparse weights stored in chunks
    # of CHUNK (see :func:`chunk_rows`): an output row is summed in a scratch row that the
    # compiler keeps in registers, one chunk of CHUNK weights and operand rows at a time,
    # and the loop over the LANES contiguous columns vectorizes. Every column is summed by
    # the same expression whatever the block, so results do not depend on the blocking.

    @numba.extending.intrinsic
    def _lanes_on_stack(typingctx, dtype):
        # A LANES-long scratch row on the stack: the compiler then knows that it aliases no
        # array, so the sums below need no overlap checks (which cost more than a chunk's
        # arithmetic) and can stay in vector registers.
        def codegen(context, builder, signature, args):
            return numba.core.cgutils.alloca_once(
                builder, context.get_value_type(dtype.dtype), size=LANES)
        return numba.types.CPointer(dtype.dtype)(dtype), codegen

    @_jit
    def _chunk_products(ptr, data, offs, src, s0, s1, carry, dst):
        # dst[d, :] = sum_q data[q] src[offs[q], :] over the chunks of segment s0 + d (below
        # s1); with carry, the sums go on from dst[d, :] (an empty segment leaves it)
        acc = numba.carray(_lanes_on_stack(data.dtype), LANES)
        d = 0
        for seg in range(s0, s1):
            if carry:
                if ptr[seg] == ptr[seg + 1]:
                    d += 1
                    continue
                for c in range(LANES):
                    acc[c] = dst[d, c]
            else:
                for c in range(LANES):
                    acc[c] = 0
            for ch in range(ptr[seg], ptr[seg + 1]):
                a0 = data[ch, 0]
                a1 = data[ch, 1]
                a2 = data[ch, 2]
                a3 = data[ch, 3]
                a4 = data[ch, 4]
                a5 = data[ch, 5]
                a6 = data[ch, 6]
                a7 = data[ch, 7]
                o0 = offs[ch, 0]
                o1 = offs[ch, 1]
                o2 = offs[ch, 2]
                o3 = offs[ch, 3]
                o4 = offs[ch, 4]
                o5 = offs[ch, 5]
                o6 = offs[ch, 6]
                o7 = offs[ch, 7]
                # in index order and without fused multiply-adds: each sum is rounded as
                # in a CSR product (scipy's, or a scatter over the transpose)
                for c in range(LANES):
                    t = acc[c] + a0 * src[o0, c]
                    t = t + a1 * src[o1, c]
                    t = t + a2 * src[o2, c]
                    t = t + a3 * src[o3, c]
                    t = t + a4 * src[o4, c]
                    t = t + a5 * src[o5, c]
                    t = t + a6 * src[o6, c]
                    acc[c] = t + a7 * src[o7, c]
            for c in range(LANES):
                dst[d, c] = acc[c]
            d += 1

    @_jit
    def _volume_block(u, n, k0, kb, i0, i1, ut):
        # ut[(i - i0) (n + 1) + x, kk] = u[k0 + kk, i n + x] for the pixel rows i0 <= i < i1
        # (one complex value, as a 64-bit word for complex64), zero for kk >= kb; pixel
        # rows are padded by one pixel so that a column of pixels does not map to one
        # cache set
        for i in range(i0, i1):
            base = (i - i0) * (n + 1)
            for kq in range(0, kb, TILE):  # TILE slices at a time: TILE input streams
                for x in range(n):
                    for kk in range(kq, min(kq + TILE, kb)):
                        ut[base + x, kk] = u[k0 + kk, i * n + x]
            for x in range(n):
                for c in range(kb, LANES // 2):
                    ut[base + x, c] = 0

    @_jit
    def _block_projections(fptr, fdata, foffs, u, n, k0, kb, tile, ut, ut_real, acc):
        # acc: (N_THETA n, LANES), the projections of a block of slices, summed over tiles
        # of `tile` pixel rows: a tile is transposed into ut (small enough for the core's
        # own cache) and its pixels added to every bin they meet (the chunks of P cut by
        # tiles, chunk_rows(tiled_rows(P))), so that the volume block is read once and
        # each bin's sum goes on in index order
        n_bins = acc.shape[0]
        for b in range(n_bins):
            for c in range(LANES):
                acc[b, c] = 0
        for t in range(-(-n // tile)):
            _volume_block(u, n, k0, kb, t * tile, min(n, (t + 1) * tile), ut)
            _chunk_products(fptr, fdata, foffs, ut_real, t * n_bins, (t + 1) * n_bins, True,
                            acc)

    @_jit
    def _project_fwd(fptr, fdata, foffs, u, n, step, tile, ut, ut_real, acc, proj):
        # proj: (N_THETA, nz, n, 2)
        nz = u.shape[0]
        n_theta = proj.shape[0]
        for k0 in range(0, nz, step):
            kb = min(step, nz - k0)
            _block_projections(fptr, fdata, foffs, u, n, k0, kb, tile, ut, ut_real, acc)
            for a in range(n_theta):
                for kk in range(kb):
                    for c in range(n):
                        proj[a, k0 + kk, c, 0] = acc[a * n + c, 2 * kk]
                        proj[a, k0 + kk, c, 1] = acc[a * n + c, 2 * kk + 1]

    @_jit
    def _pixel_rows_out(aptr, adata, aoffs, y, n, k0, kb, acc, out):
        # out[k0 + kk, j, p] = sum_q adata[q] y[aoffs[q], 2 kk + p], one pixel row at a time
        for i in range(n):
            _chunk_products(aptr, adata, aoffs, y, i * n, (i + 1) * n, False, acc)
            for kq in range(0, kb, TILE):  # TILE slices at a time: TILE output streams
                for x in range(n):
                    for kk in range(kq, min(kq + TILE, kb)):
                        out[k0 + kk, i * n + x, 0] = acc[x, 2 * kk]
                        out[k0 + kk, i * n + x, 1] = acc[x, 2 * kk + 1]

    @_jit
    def _project_adj(aptr, adata, aoffs, proj, n, step, y, acc, out):
        # y: ((n + 1) N_THETA, LANES) in out's dtype, bin c of angle a at row a (n + 1) + c
        nz = out.shape[0]
        n_theta = proj.shape[0]
        for k0 in range(0, nz, step):
            kb = min(step, nz - k0)
            for a in range(n_theta):
                base = a * (n + 1)
                for kk in range(kb):
                    for c in range(n):
                        y[base + c, 2 * kk] = proj[a, k0 + kk, c, 0]
                        y[base + c, 2 * kk + 1] = proj[a, k0 + kk, c, 1]
                for c in range(n + 1):
                    for lane in range(2 * kb, LANES):
                        y[base + c, lane] = 0
            _pixel_rows_out(aptr, adata, aoffs, y, n, k0, kb, acc, out)

    @_jit
    def _project_normal(fptr, fdata, foffs, aptr, adata, aoffs, u, w, n, step, tile, ut,
                        ut_real, acc_fwd, y, acc, out):
        nz = u.shape[0]
        n_theta = w.shape[0]
        for k0 in range(0, nz, step):
            kb = min(step, nz - k0)
            _block_projections(fptr, fdata, foffs, u, n, k0, kb, tile, ut, ut_real, acc_fwd)
            for a in range(n_theta):
                base = a * (n + 1)
                for kk in range(kb):
                    for c in range(n):
                        wv = w[a, k0 + kk, c]
                        y[base + c, 2 * kk] = acc_fwd[a * n + c, 2 * kk] * wv
                        y[base + c, 2 * kk + 1] = acc_fwd[a * n + c, 2 * kk + 1] * wv
                for c in range(n + 1):
                    for lane in range(2 * kb, LANES):
                        y[base + c, lane] = 0
            _pixel_rows_out(aptr, adata, aoffs, y, n, k0, kb, acc, out)

    # The stencil kernels work on real views: a complex (nz, ny, nx) array is a real
    # (nz, ny, 2 nx) one whose x-neighbours are 2 apart. Every loop runs along one row, with
    # the boundary tests hoisted out of it, so that it vectorizes.

    @_jit
    def _neg_laplacian(u, out):
        nz, ny, w = u.shape
        for k in range(nz):
            for i in range(ny):
                for j in range(w):
                    out[k, i, j] = 0
                if k > 0:
                    for j in range(w):
                        out[k, i, j] += u[k, i, j] - u[k - 1, i, j]
                if k < nz - 1:
                    for j in range(w):
                        out[k, i, j] += u[k, i, j] - u[k + 1, i, j]
                if i > 0:
                    for j in range(w):
                        out[k, i, j] += u[k, i, j] - u[k, i - 1, j]
                if i < ny - 1:
                    for j in range(w):
                        out[k, i, j] += u[k, i, j] - u[k, i + 1, j]
                for j in range(2, w):
                    out[k, i, j] += u[k, i, j] - u[k, i, j - 2]
                for j in range(w - 2):
                    out[k, i, j] += u[k, i, j] - u[k, i, j + 2]

    @_jit
    def _laplacian_at(u, p, okm, okp, oim, oip, ojm, ojp):
        # -Lap u at flat index p of a real view, _neg_laplacian's terms in its order; an
        # offset of 0 (no neighbour there) adds an exact zero
        x = u[np.uint64(p)]
        t = u.dtype.type(0)
        t += x - u[np.uint64(p - okm)]
        t += x - u[np.uint64(p + okp)]
        t += x - u[np.uint64(p - oim)]
        t += x - u[np.uint64(p + oip)]
        t += x - u[np.uint64(p - ojm)]
        t += x - u[np.uint64(p + ojp)]
        return t

    @_jit
    def _combine_neg_laplacian(wide, a, u, b, out, nz, ny, w):
        # out = a wide + b (-Lap u) in one pass (flat real views of (nz, ny, w) arrays, u's
        # x-neighbours 2 apart): _combine of _neg_laplacian's result, value for value. The
        # offsets of a row's neighbours are fixed along the row, so that the loop over
        # its interior vectorizes.
        plane = ny * w
        for k in range(nz):
            okm = plane if k > 0 else 0
            okp = plane if k < nz - 1 else 0
            for i in range(ny):
                oim = w if i > 0 else 0
                oip = w if i < ny - 1 else 0
                row = k * plane + i * w
                for j in range(min(2, w)):
                    p = row + j
                    t = _laplacian_at(u, p, okm, okp, oim, oip, 0, 2 if j < w - 2 else 0)
                    out[np.uint64(p)] = a * wide[np.uint64(p)] + b * t
                for j in range(2, w - 2):
                    p = row + j
                    t = _laplacian_at(u, p, okm, okp, oim, oip, 2, 2)
                    out[np.uint64(p)] = a * wide[np.uint64(p)] + b * t
                for j in range(max(2, w - 2), w):
                    p = row + j
                    t = _laplacian_at(u, p, okm, okp, oim, oip, 2, 0)
                    out[np.uint64(p)] = a * wide[np.uint64(p)] + b * t

    @_jit
    def _neg_div_sum(a, b, out):
        # -div(q), q = a + b: out[v] = sum over axes of q[v - e] (if inside) - q[v] (if the
        # forward difference at v exists).
        _, nz, ny, w = a.shape
        for k in range(nz):
            for i in range(ny):
                for j in range(w):
                    out[k, i, j] = 0
                if k < nz - 1:
                    for j in range(w):
                        out[k, i, j] -= a[0, k, i, j] + b[0, k, i, j]
                if k > 0:
                    for j in range(w):
                        out[k, i, j] += a[0, k - 1, i, j] + b[0, k - 1, i, j]
                if i < ny - 1:
                    for j in range(w):
                        out[k, i, j] -= a[1, k, i, j] + b[1, k, i, j]
                if i > 0:
                    for j in range(w):
                        out[k, i, j] += a[1, k, i - 1, j] + b[1, k, i - 1, j]
                for j in range(w - 2):
                    out[k, i, j] -= a[2, k, i, j] + b[2, k, i, j]
                for j in range(2, w):
                    out[k, i, j] += a[2, k, i, j - 2] + b[2, k, i, j - 2]

    @_jit
    def _lane_sum(v, n):
        # sum of v[:n] in float64 over eight interleaved partial sums: the loop carries
        # eight independent additions, not one chain (a statistic's sum, not an iterate's)
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
        j = 0
        while j + 8 <= n:
            a0 += v[j]
            a1 += v[j + 1]
            a2 += v[j + 2]
            a3 += v[j + 3]
            a4 += v[j + 4]
            a5 += v[j + 5]
            a6 += v[j + 6]
            a7 += v[j + 7]
            j += 8
        while j < n:
            a0 += v[j]
            j += 1
        return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))

    @_jit
    def _tv_step(u, lam1, threshold, p, g, scale, scale2, t, sq, stats):
        # g: scratch (3, 2 nx), the gradient of one row; scale, scale2: scratch (nx,) and
        # (2 nx,), the shrink factor per value and per real column; t: scratch
        # (3, 2 nx), the new p of the row before it overwrites the old one; sq: scratch
        # (3, 6 nx) of the terms of the row's statistics. stats (float64): += [sum
        # |p - g|^2, sum |p - p_old|^2, sum |g|_iso] (primal and dual residuals of the
        # split, TV of u), summed per row by _lane_sum so that the row's loops have no
        # chained sum and vectorize. u may hold one slice more than lam1 (the next z-slab's
        # first slice): the z-difference of lam1's last slice then reads it.
        nz = lam1.shape[1]
        nz_u, ny, w = u.shape
        nx = w // 2
        for k in range(nz):
            for i in range(ny):
                if k < nz_u - 1:
                    for j in range(w):
                        g[0, j] = u[k + 1, i, j] - u[k, i, j]
                else:
                    for j in range(w):
                        g[0, j] = 0
                if i < ny - 1:
                    for j in range(w):
                        g[1, j] = u[k, i + 1, j] - u[k, i, j]
                else:
                    for j in range(w):
                        g[1, j] = 0
                for j in range(w - 2):
                    g[2, j] = u[k, i, j + 2] - u[k, i, j]
                g[2, w - 2] = 0
                g[2, w - 1] = 0
                for d in range(3):  # p = g - lam1, then |p| over the 3 components
                    for j in range(w):
                        t[d, j] = g[d, j] - lam1[d, k, i, j]
                for x in range(nx):  # |g|: the TV of the row
                    gx = 0.0
                    for d in range(3):
                        re = g[d, 2 * x]
                        im = g[d, 2 * x + 1]
                        gx += re * re + im * im
                    sq[0, x] = np.sqrt(gx)
                stats[2] += _lane_sum(sq[0], nx)
                for x in range(nx):  # |p| over the 3 components
                    scale[x] = 0
                for d in range(3):
                    for x in range(nx):
                        re = t[d, 2 * x]
                        im = t[d, 2 * x + 1]
                        scale[x] += re * re + im * im
                for x in range(nx):
                    mag = np.sqrt(scale[x])
                    f = (mag - threshold) / mag if mag > threshold else 0
                    scale2[2 * x] = f
                    scale2[2 * x + 1] = f
                # shrink, then lam1 += p - g; loops over few arrays each, so that they
                # vectorize (each pair of arrays a loop writes and reads needs a run-time
                # overlap check)
                for d in range(3):
                    for j in range(w):
                        t[d, j] *= scale2[j]
                    for j in range(w):
                        step = t[d, j] - p[d, k, i, j]
                        sq[1, d * w + j] = step * step
                    for j in range(w):
                        p[d, k, i, j] = t[d, j]
                    for j in range(w):
                        r = t[d, j] - g[d, j]
                        sq[2, d * w + j] = r * r
                        g[d, j] = r
                    for j in range(w):
                        lam1[d, k, i, j] += g[d, j]
                stats[0] += _lane_sum(sq[2], 3 * w)
                stats[1] += _lane_sum(sq[1], 3 * w)

    @_jit
    def _window_fwd(images, probes, pf, a, r, c, out):
        m = probes.shape[1]
        for f in range(out.shape[0]):
            af, rf, cf, q = a[f], r[f], c[f], pf[f]
            for i in range(m):
                for j in range(m):
                    out[f, i, j] = probes[q, i, j] * images[af, rf + i, cf + j]

    @_jit
    def _window_adj(psi, probes, pf, a, r, c, images):
        m = probes.shape[1]
        for f in range(psi.shape[0]):
            af, rf, cf, q = a[f], r[f], c[f], pf[f]
            for i in range(m):
                for j in range(m):
                    images[af, rf + i, cf + j] += np.conj(probes[q, i, j]) * psi[f, i, j]

    @_jit
    def _prox_modulus(a, fij, r2, ipm, eps_g, one, tol):
        # Modulus rho of prox_G at |zt| = a (see ptmpi.solvers.prox.prox_modulus).
        rm = r2 * a
        if eps_g <= 0:
            if ipm:
                return (rm + np.sqrt(rm * rm + 4 * (one + r2) * fij)) / (2 * (one + r2))
            return (np.sqrt(fij) + rm) / (one + r2)
        # Smoothed likelihood: the root of phi(rho) = rho (1 + r2 - k(rho)) - r2 a, with
        # k = sqrt(f + eps) / sqrt(rho^2 + eps) (AGM) or (f + eps) / (rho^2 + eps) (IPM),
        # bracketed in [0, max(a, sqrt f)] (phi <= 0 at 0, >= 0 there), safeguarded Newton.
        c = fij + eps_g
        lo = 0.0
        hi = max(a, np.sqrt(fij))
        rho = hi
        for _ in range(60):
            q2 = rho * rho + eps_g
            if ipm:
                k = c / q2
                dk = -2.0 * rho * c / (q2 * q2)
            else:
                q = np.sqrt(q2)
                k = np.sqrt(c) / q
                dk = -rho * k / q2
            phi = rho * (1.0 + r2 - k) - rm
            if phi > 0:
                hi = rho
            else:
                lo = rho
            dphi = 1.0 + r2 - k - rho * dk
            step = rho - phi / dphi if dphi > 0 else -1.0
            # A vanishing Newton step is the root (checked before the bracket: the root
            # may sit on the bracket's end, and bisecting from there cost ~40 steps).
            if abs(step - rho) > 4e-16 * hi and (step <= lo or step >= hi):
                step = 0.5 * (lo + hi)
            if abs(step - rho) <= tol * hi:
                rho = step
                break
            rho = step
        return rho

    # IEEE division (inf or nan, no Python exception and so no test before each one), for
    # kernels whose loops must vectorize across a division.
    _jit_ieee = numba.njit(cache=True, fastmath=False, boundscheck=False, nogil=True,
                           error_model="numpy")

    @_jit_ieee
    def _prox_modulus_row(a2, f, use, r2, ipm, eps_g, one, tol, rho):
        # _prox_modulus for every pixel of a row (a2: |zt|^2, f: counts; use: False where
        # the pixel is masked, rho left as it is there), LANES pixels at a time: the same
        # Newton steps per pixel, each pixel's iteration frozen once it has converged, in
        # loops over the pixels that vectorize (the state sits in scratch rows on the
        # stack, which alias nothing); a group stops when every pixel in it has.
        x = numba.carray(_lanes_on_stack(np.float64), LANES)
        lo = numba.carray(_lanes_on_stack(np.float64), LANES)
        hi = numba.carray(_lanes_on_stack(np.float64), LANES)
        c = numba.carray(_lanes_on_stack(np.float64), LANES)
        rm = numba.carray(_lanes_on_stack(np.float64), LANES)
        done = numba.carray(_lanes_on_stack(np.float64), LANES)
        for j0 in range(0, rho.size, LANES):
            width = min(LANES, rho.size - j0)
            for j in range(width):
                a = np.sqrt(a2[j0 + j])
                rm[j] = r2 * a
                c[j] = f[j0 + j] + eps_g
                lo[j] = 0.0
                hi[j] = max(a, np.sqrt(f[j0 + j]))
                x[j] = hi[j]
                done[j] = 0.0 if use[j0 + j] else 1.0
            for _ in range(60):
                active = 0
                for j in range(width):
                    r = x[j]
                    q2 = r * r + eps_g
                    if ipm:
                        k = c[j] / q2
                        dk = -2.0 * r * c[j] / (q2 * q2)
                    else:
                        q = np.sqrt(q2)
                        k = np.sqrt(c[j]) / q
                        dk = -r * k / q2
                    phi = r * (1.0 + r2 - k) - rm[j]
                    h = r if phi > 0 else hi[j]
                    low = lo[j] if phi > 0 else r
                    dphi = 1.0 + r2 - k - r * dk
                    step = r - phi / dphi if dphi > 0 else -1.0
                    if abs(step - r) > 4e-16 * h and (step <= low or step >= h):
                        step = 0.5 * (low + h)
                    live = done[j] == 0.0
                    x[j] = step if live else r
                    hi[j] = h if live else hi[j]
                    lo[j] = low if live else lo[j]
                    stop = abs(step - r) <= tol * h
                    done[j] = 1.0 if (stop or not live) else 0.0
                    active += 0 if (stop or not live) else 1
                if active == 0:
                    break
            for j in range(width):
                if use[j0 + j]:
                    rho[j0 + j] = x[j]

    @_jit_ieee
    def _log_row(x, n, bits, out):
        # out[j] = log(x[j]) (float64, j < n) in loops that vectorize, where the library's
        # log is one call per value: x = 2^e m with m in [sqrt(1/2), sqrt(2)), log m =
        # 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, by its series to s^23 (error
        # below 3e-16 of log x). x positive and normal; inf and nan are passed through.
        xb = x.view(np.int64)
        for j in range(n):
            b = xb[j]
            out[j] = np.float64((b >> 52) - 1023)
            bits[j] = (b & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000
        mv = bits.view(np.float64)
        for j in range(n):
            m = mv[j]
            e = out[j]
            big = m > 1.4142135623730951
            m = 0.5 * m if big else m
            e = e + 1.0 if big else e
            s = (m - 1.0) / (m + 1.0)
            s2 = s * s
            p = 1.0 / 23.0
            p = p * s2 + 1.0 / 21.0
            p = p * s2 + 1.0 / 19.0
            p = p * s2 + 1.0 / 17.0
            p = p * s2 + 1.0 / 15.0
            p = p * s2 + 1.0 / 13.0
            p = p * s2 + 1.0 / 11.0
            p = p * s2 + 1.0 / 9.0
            p = p * s2 + 1.0 / 7.0
            p = p * s2 + 1.0 / 5.0
            p = p * s2 + 1.0 / 3.0
            v = (e * LN2_HI + (2.0 * s + 2.0 * s * s2 * p)) + e * LN2_LO
            xj = x[j]
            out[j] = v if xj < np.inf else xj

    @_jit_ieee
    def _data_split(d, lam2, f, valid, r2, ipm, z, eps_g, z_old, stats, tol, a2, rho, t, g2,
                    bits, mask):
        # z = prox_G(d - lam2) (see ptmpi.solvers.prox), then lam2 += z - d; frame by frame,
        # each pixel row in loops that vectorize (the smoothed likelihood's Newton roots
        # too, _prox_modulus_row). d, lam2, z, z_old: real views (n_frames, m, 2 m); valid:
        # (0, m, m) for no mask, (1, m, m) for one mask, else one per frame; z = zt where
        # it is False (its root is not sought there). Scratch: a2 (m, m) real, |zt|^2 of the
        # frame; rho (m,) real; t (m,), g2 (m,) float64, bits (m,) int64; mask (m,) bool.
        # The arithmetic is that of the scalar form before (which unified zt * scale and
        # zt * 0 + rho to complex128): the products in the frames' precision, z - d and the
        # update of lam2 in float64, at masked pixels in the frames' precision.
        # Statistics: float64 sums per row over interleaved partial sums (_lane_sum).
        n_frames, m, _ = f.shape
        n_valid = valid.shape[0]
        n_old = z_old.shape[0]
        eps = np.finfo(f.dtype).eps
        one = f.dtype.type(1)
        zero = f.dtype.type(0)
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        for fr in range(n_frames):
            vf = fr if n_valid > 1 else 0
            peak2 = zero
            for i in range(m):
                for j in range(m):
                    zr = d[fr, i, 2 * j] - lam2[fr, i, 2 * j]
                    zi = d[fr, i, 2 * j + 1] - lam2[fr, i, 2 * j + 1]
                    a2[i, j] = zr * zr + zi * zi
                for j in range(m):
                    peak2 = max(peak2, a2[i, j])
            tiny = 64 * eps * np.sqrt(peak2)
            for i in range(m):
                if eps_g > 0:
                    for j in range(m):
                        mask[j] = n_valid == 0 or valid[vf, i, j]
                    _prox_modulus_row(a2[i], f[fr, i], mask, r2, ipm, eps_g, one, tol, rho)
                elif ipm:  # the closed forms of _prox_modulus, in its types
                    for j in range(m):
                        rm = r2 * np.sqrt(a2[i, j])
                        rho[j] = ((rm + np.sqrt(rm * rm + 4 * (one + r2) * f[fr, i, j]))
                                  / (2 * (one + r2)))
                else:
                    for j in range(m):
                        rho[j] = (np.sqrt(f[fr, i, j]) + r2 * np.sqrt(a2[i, j])) / (one + r2)
                for j in range(m):
                    dr = d[fr, i, 2 * j]
                    di = d[fr, i, 2 * j + 1]
                    zr = dr - lam2[fr, i, 2 * j]
                    zi = di - lam2[fr, i, 2 * j + 1]
                    mag = np.sqrt(a2[i, j])
                    use = n_valid == 0 or valid[vf, i, j]
                    scale = rho[j] / mag
                    wr = np.float64(zr * scale - zi * zero)
                    wi = np.float64(zr * zero + zi * scale)
                    if not mag > tiny:
                        wr = np.float64(rho[j])
                        wi = 0.0
                    rr = wr - dr
                    ri = wi - di
                    if not use:
                        wr = np.float64(zr)
                        wi = np.float64(zi)
                        rr = np.float64(zr - dr)
                        ri = np.float64(zi - di)
                    z[fr, i, 2 * j] = wr
                    z[fr, i, 2 * j + 1] = wi
                    lam2[fr, i, 2 * j] += rr
                    lam2[fr, i, 2 * j + 1] += ri
                    t[j] = rr * rr + ri * ri
                    g2[j] = max(dr * dr + di * di + eps_g, 1e-300)
                s0 += _lane_sum(t, m)
                if n_old > 0:
                    for j in range(m):
                        rr = np.float64(z[fr, i, 2 * j]) - z_old[fr, i, 2 * j]
                        ri = np.float64(z[fr, i, 2 * j + 1]) - z_old[fr, i, 2 * j + 1]
                        t[j] = rr * rr + ri * ri
                    s1 += _lane_sum(t, m)
                # likelihood of the model d over the valid pixels (the objective at u)
                if ipm:
                    _log_row(g2, m, bits, t)
                    for j in range(m):
                        fe = f[fr, i, j] + eps_g
                        v = 0.5 * (g2[j] - (fe * t[j] if fe > 0 else 0.0))
                        t[j] = v if n_valid == 0 or valid[vf, i, j] else 0.0
                else:
                    for j in range(m):
                        dd = np.sqrt(g2[j]) - np.sqrt(f[fr, i, j] + eps_g)
                        t[j] = 0.5 * dd * dd if n_valid == 0 or valid[vf, i, j] else 0.0
                s2 += _lane_sum(t, m)
        stats[0] += s0
        stats[1] += s1
        stats[2] += s2

    @_jit
    def _data_split_modes(d, lam2, f, valid, r2, ipm, z, eps_g, z_old, stats, tol):
        # _data_split for K incoherent probe modes, d (K, n_frames, m, m): the prox is
        # radial in the vector of the modes (ptmpi.solvers.prox.prox_data_modes), so each
        # pixel's modes are scaled alike by rho / sqrt(sum_k |zt_k|^2).
        n_modes, n_frames, m, _ = d.shape
        n_valid = valid.shape[0]
        n_old = z_old.shape[0]
        eps = np.finfo(f.dtype).eps
        one = f.dtype.type(1)
        for fr in range(n_frames):
            vf = fr if n_valid > 1 else 0
            peak2 = f.dtype.type(0)
            for i in range(m):
                for j in range(m):
                    a2 = f.dtype.type(0)
                    for k in range(n_modes):
                        zt = d[k, fr, i, j] - lam2[k, fr, i, j]
                        a2 += zt.real * zt.real + zt.imag * zt.imag
                    peak2 = max(peak2, a2)
            tiny = 64 * eps * np.sqrt(peak2)
            for i in range(m):
                for j in range(m):
                    if n_valid > 0 and not valid[vf, i, j]:
                        for k in range(n_modes):
                            dij = d[k, fr, i, j]
                            zt = dij - lam2[k, fr, i, j]
                            z[k, fr, i, j] = zt
                            r = zt - dij
                            lam2[k, fr, i, j] += r
                            stats[0] += r.real * r.real + r.imag * r.imag
                            if n_old > 0:
                                r = zt - z_old[k, fr, i, j]
                                stats[1] += r.real * r.real + r.imag * r.imag
                        continue
                    a2 = f.dtype.type(0)
                    g2 = 0.0
                    for k in range(n_modes):
                        dij = d[k, fr, i, j]
                        zt = dij - lam2[k, fr, i, j]
                        a2 += zt.real * zt.real + zt.imag * zt.imag
                        g2 += dij.real * dij.real + dij.imag * dij.imag
                    mag = np.sqrt(a2)
                    fij = f[fr, i, j]
                    rho = f.dtype.type(_prox_modulus(mag, fij, r2, ipm, eps_g, one, tol))
                    scale = rho / mag if mag > tiny else f.dtype.type(0)
                    for k in range(n_modes):
                        dij = d[k, fr, i, j]
                        zt = dij - lam2[k, fr, i, j]
                        if mag > tiny:
                            zij = zt * scale
                        elif k == 0:
                            zij = zt * 0 + rho
                        else:
                            zij = zt * 0
                        z[k, fr, i, j] = zij
                        r = zij - dij
                        lam2[k, fr, i, j] += r
                        stats[0] += r.real * r.real + r.imag * r.imag
                        if n_old > 0:
                            r = zij - z_old[k, fr, i, j]
                            stats[1] += r.real * r.real + r.imag * r.imag
                    # likelihood of the model modulus sqrt(sum_k |d_k|^2)
                    g2 += eps_g
                    fe = fij + eps_g
                    if ipm:
                        stats[2] += 0.5 * (g2 - (fe * np.log(max(g2, 1e-300)) if fe > 0
                                                 else 0.0))
                    else:
                        dr = np.sqrt(g2) - np.sqrt(fe)
                        stats[2] += 0.5 * dr * dr

    @_jit
    def _combine(wide, a, extra, b, out):
        for i in range(out.size):
            out[i] = a * wide[i] + b * extra[i]

    # Sums over a volume are formed per slice (block), each over SUM_LANES interleaved
    # float64 partial sums: element i of a block goes to partial i % SUM_LANES, each
    # partial in index order, and the partials are added in order. A block's sum then
    # depends on the block alone (not on how slices are split over ranks), and the loops
    # vectorize (one running sum cannot: each addition waits for the one before).
    # Indices are unsigned, so that Numba adds no wraparound test that would stop them.

    @_jit
    def _lane_total(acc):
        s = 0.0
        for lane in range(SUM_LANES):
            s += acc[lane]
        return s

    @_jit
    def _zero(acc):
        for lane in range(acc.size):
            acc[lane] = 0.0

    @_jit
    def _re_dot(a, b):
        # Re(conj(a) b) in float64
        return (np.float64(a.real) * np.float64(b.real)
                + np.float64(a.imag) * np.float64(b.imag))

    @_jit
    def _cg_start(b, ax, inv_diag, precondition, r, d, out):
        # r = b - ax, d = M r; out[k] = (Re <r, M r>, <b, b>) over block k (a slice), with
        # _slice_vdot's arithmetic
        m = b.size // out.shape[0]
        acc = numba.carray(_lanes_on_stack(out.dtype), LANES)
        for k in range(out.shape[0]):
            _zero(acc)
            for i0 in range(k * m, (k + 1) * m, SUM_LANES):
                for lane in range(min(SUM_LANES, (k + 1) * m - i0)):
                    i = np.uint64(i0 + lane)
                    bi = b[i]
                    ri = bi - ax[i]
                    r[i] = ri
                    si = inv_diag[i] * ri if precondition else ri
                    d[i] = si
                    acc[lane] += _re_dot(ri, si)
                    acc[SUM_LANES + lane] += _re_dot(bi, bi)
            out[k, 0] = _lane_total(acc[:SUM_LANES])
            out[k, 1] = _lane_total(acc[SUM_LANES:])

    @_jit
    def _residual_update(r, ad, alpha, inv_diag, precondition, out):
        # r -= alpha ad; out[k] = Re <r, M r> over block k of r.size // out.size elements
        # (a slice, or the whole vector), M = diag(inv_diag) or 1
        m = r.size // out.size
        acc = numba.carray(_lanes_on_stack(out.dtype), LANES)
        for k in range(out.size):
            _zero(acc)
            for i0 in range(k * m, (k + 1) * m, SUM_LANES):
                for lane in range(min(SUM_LANES, (k + 1) * m - i0)):
                    i = np.uint64(i0 + lane)
                    ri = r[i] - alpha * ad[i]
                    r[i] = ri
                    si = inv_diag[i] * ri if precondition else ri
                    acc[lane] += _re_dot(ri, si)
            out[k] = _lane_total(acc)

    @_jit
    def _step_and_direction(x, d, r, inv_diag, precondition, alpha, beta, direction):
        # x += alpha d, then (with direction) d = M r + beta d
        if not direction:
            for i in range(x.size):
                x[i] += alpha * d[i]
        elif precondition:
            for i in range(x.size):
                di = d[i]
                x[i] += alpha * di
                d[i] = inv_diag[i] * r[i] + beta * di
        else:
            for i in range(x.size):
                di = d[i]
                x[i] += alpha * di
                d[i] = r[i] + beta * di

    @_jit
    def _slice_vdot(x, y, out):
        # out[k] = (Re, Im) of sum conj(x) y over block k, in float64 (SUM_LANES partials)
        m = x.size // out.shape[0]
        acc = numba.carray(_lanes_on_stack(out.dtype), LANES)
        for k in range(out.shape[0]):
            _zero(acc)
            for i0 in range(k * m, (k + 1) * m, SUM_LANES):
                for lane in range(min(SUM_LANES, (k + 1) * m - i0)):
                    i = np.uint64(i0 + lane)
                    a = x[i]
                    c = y[i]
                    acc[lane] += _re_dot(a, c)
                    acc[SUM_LANES + lane] += (np.float64(a.real) * np.float64(c.imag)
                                              - np.float64(a.imag) * np.float64(c.real))
            out[k, 0] = _lane_total(acc[:SUM_LANES])
            out[k, 1] = _lane_total(acc[SUM_LANES:])

    @_jit
    def _step_sums(u, u_old, step, has_prev, out):
        # step = u - u_old, written over the previous step (has_prev: each element read
        # first); out[k] = (||step||^2, ||u||^2, Re <previous step, step>) over block k, with
        # _slice_vdot's arithmetic
        m = u.size // out.shape[0]
        acc = numba.carray(_lanes_on_stack(out.dtype), LANES)
        ps = numba.carray(_lanes_on_stack(out.dtype), LANES)
        for k in range(out.shape[0]):
            _zero(acc)
            _zero(ps)
            for i0 in range(k * m, (k + 1) * m, SUM_LANES):
                width = min(SUM_LANES, (k + 1) * m - i0)
                if has_prev:
                    for lane in range(width):
                        i = np.uint64(i0 + lane)
                        si = u[i] - u_old[i]
                        ps[lane] += _re_dot(step[i], si)
                        step[i] = si
                else:
                    for lane in range(width):
                        i = np.uint64(i0 + lane)
                        step[i] = u[i] - u_old[i]
                for lane in range(width):
                    i = np.uint64(i0 + lane)
                    acc[lane] += _re_dot(step[i], step[i])
                    acc[SUM_LANES + lane] += _re_dot(u[i], u[i])
            out[k, 0] = _lane_total(acc[:SUM_LANES])
            out[k, 1] = _lane_total(acc[SUM_LANES:])
            out[k, 2] = _lane_total(ps[:SUM_LANES])

    @_jit
    def _scaled_residual(u, t, zr, zi):
        # (sum |zeta u - t|^2, sum |zeta u|^2) in float64, in index order
        residual = 0.0
        signal = 0.0
        for i in range(u.size):
            ar = np.float64(u[i].real)
            ai = np.float64(u[i].imag)
            sr = zr * ar - zi * ai
            si = zr * ai + zi * ar
            dr = sr - np.float64(t[i].real)
            di = si - np.float64(t[i].imag)
            residual += dr * dr + di * di
            signal += sr * sr + si * si
        return residual, signal


def _real_view(x):
    """Real view of a C-contiguous complex array, last axis doubled."""
    x = np.ascontiguousarray(x)
    return x.view(np.finfo(x.dtype).dtype)


def neg_laplacian(u, out=None):
    """``-Lap u`` with Neumann boundary, ``u`` of shape ``(nz, ny, nx)`` complex; ``out``:
    optional C-contiguous result array (overwritten)."""
    out = result_array(out, u.shape, u.dtype)
    _neg_laplacian(_real_view(u), out.view(np.finfo(u.dtype).dtype))
    return out


def combine_neg_laplacian(wide, a: float, u, b: float, out=None):
    """``a * wide + b * (-Lap u)`` rounded once to ``u``'s dtype, in one pass: the same
    values as :func:`combine` of :func:`neg_laplacian`'s result (``wide``: e.g. the
    complex128 sum of a normal operator; ``out``: optional C-contiguous result array, not
    ``u``)."""
    out = result_array(out, u.shape, u.dtype)
    if out is u:
        raise ValueError("combine_neg_laplacian: out must not be u")
    real = np.finfo(u.dtype).dtype
    wide = np.ascontiguousarray(wide, dtype=np.result_type(wide.dtype, u.dtype))
    nz, ny, nx = u.shape
    _combine_neg_laplacian(wide.reshape(-1).view(np.finfo(wide.dtype).dtype), float(a),
                           _real_view(u).reshape(-1), float(b), out.reshape(-1).view(real),
                           nz, ny, 2 * nx)
    return out


def _flat_in_place(name, *arrays):
    if not all(v.flags.c_contiguous for v in arrays):
        raise ValueError(f"{name}: the vectors it updates must be C-contiguous (in place)")
    return [v.reshape(-1) for v in arrays]


def cg_start(b, ax, inv_diag=None):
    """CG's first residual and direction in one pass: returns ``r = b - ax``, ``d = M r``
    (``M = diag(inv_diag)``, or 1) and, per slice (axis 0), ``Re <r, M r>`` and
    ``<b, b>`` as ``(nz, 2)`` float64 (the sums of :func:`slice_vdot`)."""
    r = np.empty_like(b)
    d = np.empty_like(b)
    out = np.zeros((b.shape[0], 2), dtype=np.float64)
    diag = inv_diag.reshape(-1) if inv_diag is not None else np.ones(1, dtype=np.float32)
    _cg_start(np.ascontiguousarray(b).reshape(-1), np.ascontiguousarray(ax).reshape(-1), diag,
              inv_diag is not None, r.reshape(-1), d.reshape(-1), out)
    return r, d, out


def residual_update(r, ad, alpha, inv_diag=None, per_slice: bool = True):
    """CG's ``r -= alpha Ad`` in place, returning ``Re <r, M r>`` (``M = diag(inv_diag)``,
    or 1) in float64: per slice (axis 0; ``(nz,)``, sums that do not depend on how the
    slices are split over ranks) or, with ``per_slice=False``, of the whole vector
    (``(1,)``)."""
    (flat_r,) = _flat_in_place("residual_update", r)
    out = np.zeros(r.shape[0] if per_slice else 1, dtype=np.float64)
    diag = inv_diag.reshape(-1) if inv_diag is not None else np.ones(1, dtype=np.float32)
    _residual_update(flat_r, np.ascontiguousarray(ad).reshape(-1), r.dtype.type(alpha), diag,
                     inv_diag is not None, out)
    return out


def step_and_direction(x, d, r, alpha, beta=None, inv_diag=None) -> None:
    """CG's ``x += alpha d`` and then, unless ``beta`` is None, ``d = M r + beta d``, in
    place and in one pass (``M = diag(inv_diag)``, or 1)."""
    flat_x, flat_d = _flat_in_place("step_and_direction", x, d)
    diag = inv_diag.reshape(-1) if inv_diag is not None else np.ones(1, dtype=np.float32)
    _step_and_direction(flat_x, flat_d, np.ascontiguousarray(r).reshape(-1), diag,
                        inv_diag is not None, x.dtype.type(alpha),
                        x.dtype.type(0 if beta is None else beta), beta is not None)


def slice_vdot(x, y):
    """``vdot(x[k], y[k])`` for every slice ``k`` of axis 0, summed in float64 over
    ``SUM_LANES`` interleaved partial sums (see ``_lane_total``): ``(nz, 2)`` float64, real
    and imaginary parts."""
    out = np.zeros((x.shape[0], 2), dtype=np.float64)
    if x.size:
        _slice_vdot(np.ascontiguousarray(x).reshape(-1), np.ascontiguousarray(y).reshape(-1),
                    out)
    return out


def step_sums(u, u_old, prev=None):
    """The step ``u - u_old`` and, per slice (axis 0), ``||step||^2``, ``||u||^2`` and
    ``Re <prev, step>`` as ``(nz, 3)`` float64 (the sums of :func:`slice_vdot`; the third 0
    without ``prev``), in one pass. The step is written over ``prev`` when it is given
    (C-contiguous, of ``u``'s dtype and shape), else into a new array."""
    reuse = (prev is not None and prev.flags.c_contiguous and prev.dtype == u.dtype
             and prev.shape == u.shape)
    if reuse:
        step = prev
    else:
        step = np.empty(u.shape, dtype=u.dtype)
        if prev is not None:
            step[...] = prev
    out = np.zeros((u.shape[0], 3), dtype=np.float64)
    if u.size:
        _step_sums(np.ascontiguousarray(u).reshape(-1),
                   np.ascontiguousarray(u_old, dtype=u.dtype).reshape(-1), step.reshape(-1),
                   prev is not None, out)
    return step, out


def scaled_residual(u, t, zeta: complex) -> tuple[float, float]:
    """``(sum |zeta u - t|^2, sum |zeta u|^2)`` of complex arrays, in float64 (the sums of
    :func:`ptmpi.metrics.snr_db` in one pass, without complex128 copies)."""
    return _scaled_residual(np.ascontiguousarray(u).reshape(-1),
                            np.ascontiguousarray(t).reshape(-1), float(zeta.real),
                            float(zeta.imag))


def neg_div_sum(a, b):
    """``grad^H (a + b) = -div(a + b)`` for two ``(3, nz, ny, nx)`` complex fields."""
    dtype = np.result_type(a, b)
    out = np.empty(a.shape[1:], dtype=dtype)
    _neg_div_sum(_real_view(a.astype(dtype, copy=False)), _real_view(b.astype(dtype, copy=False)),
                 out.view(np.finfo(dtype).dtype))
    return out


def tv_step(u, lam1, threshold: float, p=None, stats=None):
    """TV split and multiplier in one pass: ``g = grad u``,
    ``p = shrink(g - lam1, threshold)``, ``lam1 += p - g`` (in place); returns ``p``.

    ``p`` is overwritten when it is a usable buffer (the previous ``p``). ``stats``: optional
    float64 array of 3 that receives ``[||p - g||^2, ||p - p_old||^2, TV(u)]``. ``u`` may
    carry one slice more than ``lam1`` (a z-slab with the next slab's first slice).
    """
    if not lam1.flags.c_contiguous or lam1.dtype != u.dtype:
        raise ValueError("tv_step: lam1 must be C-contiguous, of u's dtype (updated in place)")
    if u.shape[0] not in (lam1.shape[1], lam1.shape[1] + 1):
        raise ValueError(f"tv_step: u has {u.shape[0]} slices, lam1 {lam1.shape[1]}")
    if p is None or p is lam1 or not p.flags.c_contiguous or p.dtype != u.dtype:
        p = np.zeros_like(lam1)
    rdtype = np.finfo(u.dtype).dtype
    g = np.empty((3, 2 * u.shape[-1]), dtype=rdtype)
    t = np.empty((3, 2 * u.shape[-1]), dtype=rdtype)
    scale = np.empty(u.shape[-1], dtype=rdtype)
    scale2 = np.empty(2 * u.shape[-1], dtype=rdtype)
    sq = np.empty((3, 6 * u.shape[-1]), dtype=np.float64)
    out = np.zeros(3, dtype=np.float64)
    _tv_step(_real_view(u), lam1.view(rdtype), rdtype.type(threshold), p.view(rdtype), g, scale,
             scale2, t, sq, out)
    if stats is not None:
        stats[:] = out
    return p


def combine(wide, a: float, extra, b: float, dtype, out=None):
    """``a * wide + b * extra`` rounded once to ``dtype`` (e.g. the complex128 sum of a
    normal operator and the complex64 TV term); ``out``: optional C-contiguous result
    array (overwritten; it may be ``extra``)."""
    out = result_array(out, wide.shape, dtype)
    _combine(wide.reshape(-1), float(a), np.ascontiguousarray(extra).reshape(-1), float(b),
             out.reshape(-1))
    return out


def _probe_stack(probe, a, probe_index):
    """``(P, M, M)`` probes and the probe of every frame (all 0 for one ``(M, M)`` probe)."""
    if probe.ndim == 2:
        return probe[None], np.zeros(a.size, dtype=np.int64)
    if probe_index is None:
        raise ValueError("window kernels: a (P, M, M) probe stack needs probe_index")
    return probe, np.ascontiguousarray(probe_index, dtype=np.int64)


def window_fwd(images, probe, a, r, c, probe_index=None, out=None):
    """``probe_j * S_j images`` for every frame ``j`` (windows at ``(a, r, c)`` of the
    padded image stack), in one pass. ``probe`` is one ``(M, M)`` probe, or a ``(P, M, M)``
    stack of which frame ``j`` uses ``probe[probe_index[j]]``. ``out``: optional
    C-contiguous ``(N_FRAMES, M, M)`` array of ``images``' dtype to write into."""
    probes, index = _probe_stack(probe, a, probe_index)
    shape = (a.size, *probes.shape[1:])
    if out is None:
        out = np.empty(shape, dtype=images.dtype)
    elif out.shape != shape or out.dtype != images.dtype or not out.flags.c_contiguous:
        raise ValueError(f"window_fwd: out must be C-contiguous {shape} {images.dtype}")
    _window_fwd(images, probes, index, a, r, c, out)
    return out


def window_adj(psi, probe, a, r, c, images, probe_index=None):
    """``images += sum_j S_j^H (conj(probe_j) * psi_j)`` in place, frame by frame (probes
    as in :func:`window_fwd`)."""
    probes, index = _probe_stack(probe, a, probe_index)
    _window_adj(np.ascontiguousarray(psi), probes, index, a, r, c, images)


def data_split(d, lam2, f, r2: float, likelihood: str, valid=None, epsilon: float = 0.0,
               z_old=None, stats=None):
    """``z = prox_G(d - lam2)`` and ``lam2 += z - d`` (in place) in one pass; returns z.

    ``epsilon`` > 0: the smoothed likelihood ``B_eps`` (see :mod:`ptmpi.solvers.prox`).
    ``stats``: optional float64 array of 3 that receives ``[||z - d||^2, ||z - z_old||^2,
    sum G(d)]`` (primal and dual residuals of the split; the likelihood of the model ``d``
    over the valid pixels), the second one 0 without ``z_old``.

    ``valid``: optional detector mask, bool ``(M, M)`` or ``(N_FRAMES, M, M)`` (True =
    measured); at invalid pixels ``z = d - lam2`` and ``f`` is not read.
    """
    if not lam2.flags.c_contiguous or lam2.dtype != d.dtype:
        raise ValueError("data_split: lam2 must be C-contiguous (updated in place) and of "
                         "d's dtype")
    d = np.ascontiguousarray(d)
    z = np.empty(d.shape, dtype=d.dtype)
    rdtype = f.dtype.type
    wide = np.finfo(d.dtype).dtype  # the real type of d's parts (of f's, as a rule)
    m = d.shape[-1]
    if valid is None:
        valid = np.ones((0, m, m), dtype=np.bool_)
    else:
        valid = np.ascontiguousarray(valid, dtype=np.bool_)
        valid = valid.reshape(-1, m, m)
        if valid.shape[0] not in (1, d.shape[0]):
            raise ValueError(f"data_split: valid of shape {valid.shape} for {d.shape[0]} "
                             "frames")
    out = np.zeros(3, dtype=np.float64)
    old = (np.zeros((0, m, 2 * m), dtype=wide) if z_old is None
           else _real_view(np.ascontiguousarray(z_old, dtype=d.dtype)))
    _data_split(d.view(wide), lam2.view(wide), np.ascontiguousarray(f), valid, rdtype(r2),
                likelihood == "ipm", z.view(wide), float(epsilon), old, out, prox_tol(f.dtype),
                np.empty((m, m), dtype=rdtype), np.zeros(m, dtype=rdtype), np.empty(m),
                np.empty(m), np.empty(m, dtype=np.int64), np.empty(m, dtype=np.bool_))
    if stats is not None:
        stats[:] = out
    return z


def data_split_modes(d, lam2, f, r2: float, likelihood: str, valid=None,
                     epsilon: float = 0.0, z_old=None, stats=None):
    """:func:`data_split` for ``K`` incoherent probe modes: ``d``, ``lam2`` (updated in
    place), ``z_old`` and the result ``(K, N_FRAMES, M, M)``; every mode of a pixel is
    scaled by the same ``rho / sqrt(sum_k |zt_k|^2)`` (see
    :func:`ptmpi.solvers.prox.prox_data_modes`); ``stats`` as there, the likelihood taken
    at the model modulus ``sqrt(sum_k |d_k|^2)``."""
    if not lam2.flags.c_contiguous:
        raise ValueError("data_split_modes: lam2 must be C-contiguous (updated in place)")
    z = np.empty_like(d)
    rdtype = f.dtype.type
    m = d.shape[-1]
    if valid is None:
        valid = np.ones((0, m, m), dtype=np.bool_)
    else:
        valid = np.ascontiguousarray(valid, dtype=np.bool_).reshape(-1, m, m)
        if valid.shape[0] not in (1, d.shape[1]):
            raise ValueError(f"data_split_modes: valid of shape {valid.shape} for "
                             f"{d.shape[1]} frames")
    out = np.zeros(3, dtype=np.float64)
    old = (np.zeros((0, 0, m, m), dtype=d.dtype) if z_old is None
           else np.ascontiguousarray(z_old, dtype=d.dtype))
    _data_split_modes(np.ascontiguousarray(d), lam2, np.ascontiguousarray(f), valid,
                      rdtype(r2), likelihood == "ipm", z, float(epsilon), old, out,
                      prox_tol(f.dtype))
    if stats is not None:
        stats[:] = out
    return z


def chunk_rows(matrix, column_row, dtype):
    """A CSR matrix's rows in chunks of ``CHUNK`` non-zeros for the projector kernels.

    Returns ``(ptr, data, offs)``: the chunks of row ``r`` are ``ptr[r]:ptr[r + 1]``;
    ``data (N_CHUNKS, CHUNK)`` holds the non-zeros in ``dtype`` and ``offs`` (uint32, same
    shape) the row of the dense operand each multiplies, ``column_row[column]``. A row's
    last chunk is padded with zero weights on a row the row already reads, so padding adds
    exact zeros.
    """
    indptr = matrix.indptr.astype(np.int64)
    counts = np.diff(indptr)
    n_chunks = -(-counts // CHUNK)
    ptr = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(n_chunks, out=ptr[1:])
    rows = column_row[matrix.indices]
    used = counts > 0
    first = np.zeros(counts.size, dtype=np.uint32)
    first[used] = rows[indptr[:-1][used]]
    offs = np.repeat(first, n_chunks * CHUNK).astype(np.uint32)
    data = np.zeros(offs.size, dtype=dtype)
    pos = np.repeat(ptr[:-1] * CHUNK - indptr[:-1], counts) + np.arange(indptr[-1])
    data[pos] = matrix.data
    offs[pos] = rows
    return ptr, data.reshape(-1, CHUNK), offs.reshape(-1, CHUNK)


def _rview(x, *shape):
    x = np.ascontiguousarray(x)
    return x.view(np.finfo(x.dtype).dtype).reshape(*shape)


def _words(x):
    """A complex array as one machine word per value where one exists (complex64 as
    uint64), for the transposes."""
    return x.view(np.uint64) if x.dtype == np.complex64 else x


def tile_rows(n: int, itemsize: int) -> int:
    """Pixel rows per tile of the forward projection for ``(n, n)`` slices of complex
    ``itemsize``: a tile's block of ``LANES // 2`` slices takes about ``TILE_BYTES``, at
    least ``MIN_TILE_ROWS`` rows (each tile reads and writes every bin's sum)."""
    row = (n + 1) * (LANES // 2) * itemsize
    return max(1, min(n, max(MIN_TILE_ROWS, TILE_BYTES // row)))


def tiled_rows(matrix, n: int, tile: int):
    """``P`` (bins x pixels, CSR) cut by tiles of ``tile`` pixel rows: row ``t n_bins + b``
    holds bin ``b``'s weights on the pixels of tile ``t``, in index order; returned with
    the row of each pixel in its tile's transposed block (:func:`chunk_rows`'s
    ``column_row``, each pixel row padded by one)."""
    import scipy.sparse

    n_bins = matrix.shape[0]
    coo = matrix.tocoo()
    rows = (coo.col // n) // tile * n_bins + coo.row
    tiled = scipy.sparse.csr_matrix((coo.data, (rows, coo.col)),
                                    shape=(-(-n // tile) * n_bins, matrix.shape[1]))
    tiled.sort_indices()
    pixel = np.arange(matrix.shape[1], dtype=np.int64)
    return tiled, (pixel // n) % tile * (n + 1) + pixel % n


def _forward_buffers(n, n_theta, rdtype, cdtype, tile):
    ut = np.empty((tile * (n + 1), LANES // 2), dtype=cdtype)
    return _words(ut), ut.view(rdtype), np.empty((n_theta * n, LANES), dtype=rdtype)


def project_fwd(fwd_chunks, u, n_theta: int, step: int, tile: int):
    """``P u`` for a complex ``u (nz, n, n)``; ``fwd_chunks``: :func:`chunk_rows` of
    :func:`tiled_rows` of ``P`` (tiles of ``tile`` pixel rows) in ``u``'s precision;
    ``step``: slices per block (at most ``LANES // 2``)."""
    nz, n, _ = u.shape
    rdtype = np.finfo(u.dtype).dtype
    step = max(1, min(step, LANES // 2, nz))
    proj = np.empty((n_theta, nz, n), dtype=u.dtype)
    ut, ut_real, acc = _forward_buffers(n, n_theta, rdtype, u.dtype, tile)
    _project_fwd(*fwd_chunks, _words(np.ascontiguousarray(u).reshape(nz, n * n)), n, step,
                 tile, ut, ut_real, acc, proj.view(rdtype).reshape(n_theta, nz, n, 2))
    return proj


def result_array(out, shape, dtype, xp=np, contiguous: bool = True):
    """``out`` checked as a ``shape``/``dtype`` result array (C-contiguous when
    ``contiguous``: the kernels write through flat views), or a new one of ``xp``."""
    if out is None:
        return xp.empty(shape, dtype=dtype)
    if out.shape != tuple(shape) or out.dtype != dtype or (
            contiguous and not out.flags.c_contiguous):
        raise ValueError(f"out: expected a {'C-contiguous ' if contiguous else ''}"
                         f"{tuple(shape)} {np.dtype(dtype)} array, got {out.shape} {out.dtype}")
    return out


def project_adj(adj_chunks, proj, shape, step: int, out_dtype, out=None):
    """``P^T proj`` for complex ``proj (N_THETA, nz, n)``, summed in ``out_dtype``;
    ``adj_chunks``: :func:`chunk_rows` of ``P^T`` (rows: pixels, operand rows: bins of
    padded angles), in ``out_dtype``'s precision. ``out``: optional C-contiguous result
    array of ``shape`` and ``out_dtype`` (overwritten)."""
    n_theta, nz, n = proj.shape
    wide = np.finfo(out_dtype).dtype
    step = max(1, min(step, LANES // 2, nz))
    out = result_array(out, shape, out_dtype)
    y = np.empty((n_theta * (n + 1), LANES), dtype=wide)
    acc = np.empty((n, LANES), dtype=wide)
    _project_adj(*adj_chunks, _rview(proj, n_theta, nz, n, 2), n, step, y, acc,
                 out.view(wide).reshape(nz, n * n, 2))
    return out


def project_normal(fwd_chunks, adj_chunks, u, weight, step: int, tile: int, out_dtype,
                   out=None):
    """``P^T (weight * P u)`` for complex ``u (nz, n, n)`` and real ``weight
    (N_THETA, nz, n)``: ``P`` in ``u``'s precision (``fwd_chunks`` and ``tile``, as in
    :func:`project_fwd`), the weighted projections rounded to it, then ``P^T``
    (``adj_chunks``) summed in ``out_dtype``; ``out`` as in :func:`project_adj`."""
    nz, n, _ = u.shape
    n_theta = weight.shape[0]
    rdtype = np.finfo(u.dtype).dtype
    wide = np.finfo(out_dtype).dtype
    step = max(1, min(step, LANES // 2, nz))
    out = result_array(out, u.shape, out_dtype)
    ut, ut_real, acc_fwd = _forward_buffers(n, n_theta, rdtype, u.dtype, tile)
    y = np.empty((n_theta * (n + 1), LANES), dtype=wide)
    acc = np.empty((n, LANES), dtype=wide)
    _project_normal(*fwd_chunks, *adj_chunks,
                    _words(np.ascontiguousarray(u).reshape(nz, n * n)),
                    np.ascontiguousarray(weight, dtype=rdtype), n, step, tile, ut, ut_real,
                    acc_fwd, y, acc, out.view(wide).reshape(nz, n * n, 2))
    return out
