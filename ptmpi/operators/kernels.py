"""Compiled host kernels (Numba) for the hot loops; the only module that imports Numba.

Each kernel is a fused, single-pass version of numpy or scipy code that stays beside it
as the reference (and as the path for CuPy arrays, or when Numba is missing or disabled
with ``PTMPI_NUMBA=0``); tests check that both agree. Kernels are single-threaded: a rank
owns a core, and ranks, not threads, share out the work. Loops index arrays directly (a
slice inside a compiled loop builds a view each time, which costs more than the
arithmetic it feeds).

- :func:`project_fwd`, :func:`project_adj`, :func:`project_normal`: the projector ``P``,
  its transpose (sums in a wider dtype, float64 from float32 data without a converted
  copy) and ``P^T W P``, over slabs of slices straight from and to the volume's layout.
- :func:`window_fwd`, :func:`window_adj`: the probe windows and their scatter-add (one
  probe, or a probe per frame for sub-pixel positions).
- :func:`data_split`: the z-step and the update of lam2 in one pass (detector mask aware);
  :func:`data_split_modes` the same for incoherent probe modes.
- :func:`tv_step`, :func:`neg_div_sum`, :func:`combine`: the TV split step, the
  divergence in the right-hand side and the rounding of the reduced sums.
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
    def _slab_scatter(indptr, indices, data, u, k0, k1, y, buf):
        # y[i, 2 kk + c] = sum_j M[i, j] u[k0 + kk, j, c], with (indptr, ...) = M^T in CSR
        n_pix = u.shape[1]
        width = 2 * (k1 - k0)
        block = buf.shape[0]
        for i in range(y.shape[0]):
            for c in range(width):
                y[i, c] = 0
        for j0 in range(0, n_pix, block):
            jb = min(block, n_pix - j0)
            for kk in range(k1 - k0):
                for jj in range(jb):
                    buf[jj, 2 * kk] = u[k0 + kk, j0 + jj, 0]
                    buf[jj, 2 * kk + 1] = u[k0 + kk, j0 + jj, 1]
            for jj in range(jb):
                for q in range(indptr[j0 + jj], indptr[j0 + jj + 1]):
                    i = indices[q]
                    a = data[q]
                    for c in range(width):
                        y[i, c] += a * buf[jj, c]

    @_jit
    def _slab_gather(indptr, indices, data, y, k0, k1, out, buf):
        # out[k0 + kk, j, c] = sum_i M[i, j] y[i, 2 kk + c], summed in out's dtype
        n_pix = out.shape[1]
        width = 2 * (k1 - k0)
        block = buf.shape[0]
        for j0 in range(0, n_pix, block):
            jb = min(block, n_pix - j0)
            for jj in range(jb):
                for c in range(width):
                    buf[jj, c] = 0
                for q in range(indptr[j0 + jj], indptr[j0 + jj + 1]):
                    i = indices[q]
                    a = data[q]
                    for c in range(width):
                        buf[jj, c] += a * y[i, c]
            for kk in range(k1 - k0):
                for jj in range(jb):
                    out[k0 + kk, j0 + jj, 0] = buf[jj, 2 * kk]
                    out[k0 + kk, j0 + jj, 1] = buf[jj, 2 * kk + 1]

    @_jit
    def _project_normal(indptr, indices, data, data_wide, u, w, n, step, y, buf_in, buf_out,
                        out):
        nz = u.shape[0]
        for k0 in range(0, nz, step):
            k1 = min(nz, k0 + step)
            _slab_scatter(indptr, indices, data, u, k0, k1, y, buf_in)
            for i in range(y.shape[0]):
                a = i // n
                c = i - a * n
                for kk in range(k1 - k0):
                    wv = w[a, k0 + kk, c]
                    y[i, 2 * kk] *= wv
                    y[i, 2 * kk + 1] *= wv
            _slab_gather(indptr, indices, data_wide, y, k0, k1, out, buf_out)

    @_jit
    def _project_fwd(indptr, indices, data, u, n, step, y, buf, proj):
        # proj: (N_THETA, nz, n, 2)
        nz = u.shape[0]
        for k0 in range(0, nz, step):
            k1 = min(nz, k0 + step)
            _slab_scatter(indptr, indices, data, u, k0, k1, y, buf)
            for i in range(y.shape[0]):
                a = i // n
                c = i - a * n
                for kk in range(k1 - k0):
                    proj[a, k0 + kk, c, 0] = y[i, 2 * kk]
                    proj[a, k0 + kk, c, 1] = y[i, 2 * kk + 1]

    @_jit
    def _project_adj(indptr, indices, data, proj, n, step, y, buf, out):
        nz = out.shape[0]
        for k0 in range(0, nz, step):
            k1 = min(nz, k0 + step)
            for i in range(y.shape[0]):
                a = i // n
                c = i - a * n
                for kk in range(k1 - k0):
                    y[i, 2 * kk] = proj[a, k0 + kk, c, 0]
                    y[i, 2 * kk + 1] = proj[a, k0 + kk, c, 1]
            _slab_gather(indptr, indices, data, y, k0, k1, out, buf)

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
    def _tv_step(u, lam1, threshold, p, g, scale, t, stats):
        # g: scratch (3, 2 nx), the gradient of one row; scale: scratch (nx,); t: scratch
        # (3, 2 nx), the new p of the row before it overwrites the old one. stats (float64):
        # += [sum |p - g|^2, sum |p - p_old|^2, sum |g|_iso] (primal and dual residuals of
        # the split, TV of u). u may hold one slice more than lam1 (the next z-slab's
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
                tv = 0.0
                for x in range(nx):
                    scale[x] = 0
                    gx = 0.0
                    for d in range(3):
                        re = g[d, 2 * x]
                        im = g[d, 2 * x + 1]
                        gx += re * re + im * im
                    tv += np.sqrt(gx)
                stats[2] += tv
                for d in range(3):
                    for x in range(nx):
                        re = t[d, 2 * x]
                        im = t[d, 2 * x + 1]
                        scale[x] += re * re + im * im
                for x in range(nx):
                    mag = np.sqrt(scale[x])
                    scale[x] = (mag - threshold) / mag if mag > threshold else 0
                primal = 0.0
                dual = 0.0
                for d in range(3):  # shrink, then lam1 += p - g
                    for j in range(w):
                        q = t[d, j] * scale[j // 2]
                        step = q - p[d, k, i, j]
                        dual += step * step
                        p[d, k, i, j] = q
                        r = q - g[d, j]
                        primal += r * r
                        lam1[d, k, i, j] += r
                stats[0] += primal
                stats[1] += dual

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
    def _prox_modulus(a, fij, r2, ipm, eps_g, one):
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
            if step <= lo or step >= hi:
                step = 0.5 * (lo + hi)
            if abs(step - rho) <= 4e-16 * hi:
                rho = step
                break
            rho = step
        return rho

    @_jit
    def _data_split(d, lam2, f, valid, r2, ipm, z, eps_g, z_old, stats):
        # z = prox_G(d - lam2) (see ptmpi.solvers.prox), then lam2 += z - d; frame by frame.
        # valid: (0, m, m) for no mask, (1, m, m) for one mask, else one per frame; z = zt
        # where it is False, and f is not read there.
        # Plain products and square roots only: abs() and ** go through slow library calls.
        n_frames, m, _ = d.shape
        n_valid = valid.shape[0]
        n_old = z_old.shape[0]
        eps = np.finfo(f.dtype).eps
        one = f.dtype.type(1)
        for fr in range(n_frames):
            vf = fr if n_valid > 1 else 0
            peak2 = f.dtype.type(0)
            for i in range(m):
                for j in range(m):
                    zt = d[fr, i, j] - lam2[fr, i, j]
                    peak2 = max(peak2, zt.real * zt.real + zt.imag * zt.imag)
            tiny = 64 * eps * np.sqrt(peak2)
            for i in range(m):
                for j in range(m):
                    dij = d[fr, i, j]
                    zt = dij - lam2[fr, i, j]
                    if n_valid > 0 and not valid[vf, i, j]:
                        z[fr, i, j] = zt
                        lam2[fr, i, j] += zt - dij
                        r = zt - dij
                        stats[0] += r.real * r.real + r.imag * r.imag
                        if n_old > 0:
                            r = zt - z_old[fr, i, j]
                            stats[1] += r.real * r.real + r.imag * r.imag
                        continue
                    mag = np.sqrt(zt.real * zt.real + zt.imag * zt.imag)
                    fij = f[fr, i, j]
                    rho = f.dtype.type(_prox_modulus(mag, fij, r2, ipm, eps_g, one))
                    if mag > tiny:
                        scale = rho / mag
                        zij = zt * scale
                    else:
                        zij = zt * 0 + rho
                    z[fr, i, j] = zij
                    r = zij - dij
                    lam2[fr, i, j] += r
                    stats[0] += r.real * r.real + r.imag * r.imag
                    if n_old > 0:
                        r = zij - z_old[fr, i, j]
                        stats[1] += r.real * r.real + r.imag * r.imag
                    # likelihood of the model d (the objective at the current u)
                    g2 = dij.real * dij.real + dij.imag * dij.imag + eps_g
                    fe = fij + eps_g
                    if ipm:
                        stats[2] += 0.5 * (g2 - (fe * np.log(max(g2, 1e-300)) if fe > 0
                                                 else 0.0))
                    else:
                        dr = np.sqrt(g2) - np.sqrt(fe)
                        stats[2] += 0.5 * dr * dr

    @_jit
    def _data_split_modes(d, lam2, f, valid, r2, ipm, z, eps_g, z_old, stats):
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
                    rho = f.dtype.type(_prox_modulus(mag, fij, r2, ipm, eps_g, one))
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
    def _cg_update_slices(x, r, d, ad, alpha, inv_diag, s, out):
        # _cg_update with <r, s> summed per block of x.size // out.size elements (a slice)
        m = x.size // out.size
        for k in range(out.size):
            acc = 0.0
            for i in range(k * m, (k + 1) * m):
                x[i] += alpha * d[i]
                ri = r[i] - alpha * ad[i]
                r[i] = ri
                si = inv_diag[i] * ri
                s[i] = si
                acc += ri.real * si.real + ri.imag * si.imag
            out[k] = acc

    @_jit
    def _cg_update_plain_slices(x, r, d, ad, alpha, out):
        m = x.size // out.size
        for k in range(out.size):
            acc = 0.0
            for i in range(k * m, (k + 1) * m):
                x[i] += alpha * d[i]
                ri = r[i] - alpha * ad[i]
                r[i] = ri
                acc += ri.real * ri.real + ri.imag * ri.imag
            out[k] = acc

    @_jit
    def _slice_vdot(x, y, out):
        # out[k] = (Re, Im) of sum conj(x) y over block k, in float64, in index order
        m = x.size // out.shape[0]
        for k in range(out.shape[0]):
            re = 0.0
            im = 0.0
            for i in range(k * m, (k + 1) * m):
                ar = np.float64(x[i].real)
                ai = np.float64(x[i].imag)
                br = np.float64(y[i].real)
                bi = np.float64(y[i].imag)
                re += ar * br + ai * bi
                im += ar * bi - ai * br
            out[k, 0] = re
            out[k, 1] = im

    @_jit
    def _cg_direction(d, s, beta):
        for i in range(d.size):
            d[i] = s[i] + beta * d[i]


def _real_view(x):
    """Real view of a C-contiguous complex array, last axis doubled."""
    x = np.ascontiguousarray(x)
    return x.view(np.finfo(x.dtype).dtype)


def neg_laplacian(u):
    """``-Lap u`` with Neumann boundary, ``u`` of shape ``(nz, ny, nx)`` complex."""
    out = np.empty_like(u)
    _neg_laplacian(_real_view(u), out.view(np.finfo(u.dtype).dtype))
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


def cg_update_slices(x, r, d, ad, alpha, inv_diag=None, s=None):
    """:func:`cg_update` returning ``Re <r, s>`` per slice (axis 0 of ``x``), float64
    ``(nz,)``: sums that do not depend on how the slices are split over ranks."""
    if not all(v.flags.c_contiguous for v in (x, r, d) + (() if s is None else (s,))):
        raise ValueError("cg_update: x, r, d and s must be C-contiguous (updated in place)")
    alpha = x.dtype.type(alpha)
    flat = [v.reshape(-1) for v in (x, r, d, ad)]
    out = np.zeros(x.shape[0], dtype=np.float64)
    if inv_diag is None:
        _cg_update_plain_slices(*flat, alpha, out)
    else:
        _cg_update_slices(*flat, alpha, inv_diag.reshape(-1), s.reshape(-1), out)
    return out


def slice_vdot(x, y):
    """``vdot(x[k], y[k])`` for every slice ``k`` of axis 0, summed in float64 in index
    order: ``(nz, 2)`` float64, real and imaginary parts."""
    out = np.zeros((x.shape[0], 2), dtype=np.float64)
    if x.size:
        _slice_vdot(np.ascontiguousarray(x).reshape(-1), np.ascontiguousarray(y).reshape(-1),
                    out)
    return out


def cg_direction(d, s, beta) -> None:
    """In place: ``d = s + beta d``."""
    if not d.flags.c_contiguous:
        raise ValueError("cg_direction: d must be C-contiguous (updated in place)")
    _cg_direction(d.reshape(-1), s.reshape(-1), d.dtype.type(beta))


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
    out = np.zeros(3, dtype=np.float64)
    _tv_step(_real_view(u), lam1.view(rdtype), rdtype.type(threshold), p.view(rdtype), g, scale,
             t, out)
    if stats is not None:
        stats[:] = out
    return p


def combine(wide, a: float, extra, b: float, dtype):
    """``a * wide + b * extra`` rounded once to ``dtype`` (e.g. the complex128 sum of a
    normal operator and the complex64 TV term)."""
    out = np.empty(wide.shape, dtype=dtype)
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
    if not lam2.flags.c_contiguous:
        raise ValueError("data_split: lam2 must be C-contiguous (updated in place)")
    z = np.empty_like(d)
    rdtype = f.dtype.type
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
    old = (np.zeros((0, m, m), dtype=d.dtype) if z_old is None
           else np.ascontiguousarray(z_old, dtype=d.dtype))
    _data_split(np.ascontiguousarray(d), lam2, np.ascontiguousarray(f), valid, rdtype(r2),
                likelihood == "ipm", z, float(epsilon), old, out)
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
                      rdtype(r2), likelihood == "ipm", z, float(epsilon), old, out)
    if stats is not None:
        stats[:] = out
    return z


PIXEL_BLOCK = 64


def _rview(x, *shape):
    x = np.ascontiguousarray(x)
    return x.view(np.finfo(x.dtype).dtype).reshape(*shape)


def project_fwd(matrix_t, u, n_theta: int, step: int):
    """``P u`` for a complex ``u (nz, n, n)``; ``matrix_t`` is ``P^T`` (CSR, real)."""
    nz, n, _ = u.shape
    rdtype = np.finfo(u.dtype).dtype
    proj = np.empty((n_theta, nz, n), dtype=u.dtype)
    y = np.empty((n_theta * n, 2 * step), dtype=rdtype)
    buf = np.empty((PIXEL_BLOCK, 2 * step), dtype=rdtype)
    _project_fwd(matrix_t.indptr, matrix_t.indices, matrix_t.data, _rview(u, nz, n * n, 2),
                 n, step, y, buf, proj.view(rdtype).reshape(n_theta, nz, n, 2))
    return proj


def project_adj(matrix_t, proj, shape, step: int, out_dtype):
    """``P^T proj`` for complex ``proj (N_THETA, nz, n)``, summed in ``out_dtype``;
    ``matrix_t``'s non-zeros must be of ``out_dtype``'s precision."""
    n_theta, nz, n = proj.shape
    rdtype = np.finfo(proj.dtype).dtype
    wide = np.finfo(out_dtype).dtype
    out = np.empty(shape, dtype=out_dtype)
    y = np.empty((n_theta * n, 2 * step), dtype=rdtype)
    buf = np.empty((PIXEL_BLOCK, 2 * step), dtype=wide)
    _project_adj(matrix_t.indptr, matrix_t.indices, matrix_t.data,
                 _rview(proj, n_theta, nz, n, 2), n, step, y, buf,
                 out.view(wide).reshape(nz, n * n, 2))
    return out


def project_normal(matrix_t, data_wide, u, weight, step: int, out_dtype):
    """``P^T (weight * P u)`` for complex ``u (nz, n, n)`` and real ``weight
    (N_THETA, nz, n)``; the back-projection uses ``data_wide`` (``matrix_t``'s non-zeros
    in ``out_dtype``'s precision) and sums in ``out_dtype``."""
    nz, n, _ = u.shape
    n_theta = weight.shape[0]
    rdtype = np.finfo(u.dtype).dtype
    wide = np.finfo(out_dtype).dtype
    out = np.empty(u.shape, dtype=out_dtype)
    y = np.empty((n_theta * n, 2 * step), dtype=rdtype)
    buf_in = np.empty((PIXEL_BLOCK, 2 * step), dtype=rdtype)
    buf_out = np.empty((PIXEL_BLOCK, 2 * step), dtype=wide)
    _project_normal(matrix_t.indptr, matrix_t.indices, matrix_t.data, data_wide,
                    _rview(u, nz, n * n, 2), np.ascontiguousarray(weight, dtype=rdtype), n,
                    step, y, buf_in, buf_out, out.view(wide).reshape(nz, n * n, 2))
    return out
