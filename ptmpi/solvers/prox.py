"""Closed-form proximal steps of APT (Algorithm 1, step 2).

With ``zt = D(u) - lam2`` and penalty ``r2``, the z-step solves per pixel
``min_z G(z) + r2/2 |z - zt|^2`` with ``G(z) = B(|z|^2, f)``; the minimiser keeps the
phase of ``zt`` and only its modulus ``rho`` is found in closed form:

- AGM, ``G = 1/2 (|z| - sqrt f)^2``:  ``rho = (sqrt f + r2 |zt|) / (1 + r2)``
- IPM, ``G = 1/2 (|z|^2 - f log |z|^2)``:  ``(1 + r2) rho^2 - r2 |zt| rho - f = 0``, so
  ``rho = (r2 |zt| + sqrt(r2^2 |zt|^2 + 4 (1 + r2) f)) / (2 (1 + r2))``.

At pixels a detector mask marks invalid (:mod:`ptmpi.mask`) ``G = 0``: the prox is the
identity, ``z = zt``, and the counts there are never read. With ``lam2 += z - d`` the
multiplier there becomes ``lam2 + (d - lam2) - d = 0`` after one step (exactly 0 when it
starts at 0, as Algorithm 1 does), so ``z + lam2`` is the model ``d`` at invalid pixels:
the u-step and the probe update see no data there.

With ``epsilon > 0`` both are the paper's smoothed distances,
``B_eps(g, f) = 1/2 (sqrt(g + eps) - sqrt(f + eps))^2`` (AGM) and
``1/2 (g + eps - (f + eps) log(g + eps))`` (IPM): ``G`` is then differentiable at ``z = 0``
and ``rho`` is the root of ``phi(rho) = rho (1 + r2 - k(rho)) - r2 |zt|`` with
``k = sqrt((f + eps) / (rho^2 + eps))`` (AGM) or ``(f + eps) / (rho^2 + eps)`` (IPM), found
by safeguarded Newton in the bracket ``[0, max(|zt|, sqrt f)]`` (``phi`` is <= 0 at its
left end and >= 0 at its right end). Why it matters: ``G`` is nonconvex along the phase
of ``z`` wherever the model is darker than the data (curvature ``1 - k < 0``), without
bound as ``|z| -> 0`` when ``eps = 0``: there the prox jumps (``rho -> sqrt(f)/(1 + r2)``
with an arbitrary phase) and ADMM cycles with period 2 on noisy data (see
:mod:`ptmpi.solvers.admm`). With ``eps`` the curvature is bounded below by
``1 - sqrt((f + eps) / eps)`` (AGM) or ``1 - (f + eps) / eps`` (IPM).

The p-step is the isotropic shrink of ``pt = grad u - lam1`` by ``tv_weight / r1``.
"""

from __future__ import annotations

import numpy as np

from ptmpi.backend import get_xp
from ptmpi.mask import valid_only
from ptmpi.operators import kernels

LIKELIHOODS = ("agm", "ipm")


def prox_modulus(mag, f, r2: float, likelihood: str, epsilon: float = 0.0):
    """Modulus of ``prox_G`` at ``|zt| = mag`` (elementwise), see the module docstring."""
    xp = get_xp(mag)
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if epsilon <= 0:
        if likelihood == "agm":
            return (xp.sqrt(f) + r2 * mag) / (1 + r2)
        return (r2 * mag + xp.sqrt((r2 * mag) ** 2 + 4 * (1 + r2) * f)) / (2 * (1 + r2))
    a = mag.astype(xp.float64)
    c = f.astype(xp.float64) + epsilon
    lo = xp.zeros_like(a)
    hi = xp.maximum(a, xp.sqrt(f.astype(xp.float64)))
    rho = hi.copy()
    for _ in range(60):
        q2 = rho * rho + epsilon
        if likelihood == "ipm":
            k = c / q2
            dk = -2 * rho * c / (q2 * q2)
        else:
            k = xp.sqrt(c / q2)
            dk = -rho * k / q2
        phi = rho * (1 + r2 - k) - r2 * a
        above = phi > 0
        hi = xp.where(above, rho, hi)
        lo = xp.where(above, lo, rho)
        dphi = 1 + r2 - k - rho * dk
        step = xp.where(dphi > 0, rho - phi / xp.where(dphi > 0, dphi, 1), -1.0)
        # a vanishing Newton step is the root, also on the bracket's end (no bisection)
        outside = ((step <= lo) | (step >= hi)) & (xp.abs(step - rho) > 4e-16 * hi)
        step = xp.where(outside, 0.5 * (lo + hi), step)
        done = xp.abs(step - rho) <= kernels.prox_tol(mag.real.dtype) * hi
        rho = step
        if bool(xp.all(done)):
            break
    return rho.astype(mag.dtype)


def prox_data(zt, f, r2: float, likelihood: str, valid=None, epsilon: float = 0.0):
    """z-step for all local frames.

    Parameters
    ----------
    zt : (N_FRAMES_LOCAL, M, M) complex
        ``D(u) - lam2``.
    f : (N_FRAMES_LOCAL, M, M) real
        Measured counts, zero frequency at ``[0, 0]``.
    r2 : float
        ADMM penalty of the far-field split.
    likelihood : ``"agm"`` or ``"ipm"``.
    valid : bool, broadcastable to ``(N_FRAMES_LOCAL, M, M)``, optional
        Detector mask (True = measured); ``z = zt`` at invalid pixels, whose counts are
        not read.
    epsilon : float
        Smoothing of the likelihood (0: the unsmoothed distances).
    """
    xp = get_xp(zt)
    f = valid_only(f, valid)
    mag = xp.abs(zt)
    rho = prox_modulus(mag, f, r2, likelihood, epsilon)
    # Where zt = 0 its phase is undefined and any phase is optimal: keep the real axis.
    # Values at rounding level relative to their frame count as 0, or their phase would be
    # that of the rounding noise, which depends on summation order (and so on the ranks).
    tiny = 64 * np.finfo(mag.dtype).eps * mag.max(axis=(-2, -1), keepdims=True)
    significant = mag > tiny
    phase = xp.where(significant, zt / xp.where(significant, mag, 1), 1)
    z = (rho * phase).astype(zt.dtype, copy=False)
    return z if valid is None else xp.where(valid, z, zt)


def prox_data_modes(zt, f, r2: float, likelihood: str, valid=None, epsilon: float = 0.0):
    """z-step of ``K`` incoherent probe modes (:mod:`ptmpi.operators.modes`).

    ``zt``: ``(K, N_FRAMES_LOCAL, M, M)``, one far field per mode; ``f``, ``valid`` as in
    :func:`prox_data`. The likelihood sees a pixel only through the modulus
    ``a = sqrt(sum_k |z_k|^2)``, so ``min_z G(|z|) + r2/2 sum_k |z_k - zt_k|^2`` is radial:
    for a given ``|z| = rho`` the nearest ``z`` is ``rho zt / |zt|`` (all modes scaled
    alike), and ``rho`` solves the scalar problem of :func:`prox_modulus` at ``|zt|``.
    (Thibault and Menzel's mixed-state modulus projection is the limit ``r2 -> 0``.)
    Where ``zt = 0`` (to rounding, as in :func:`prox_data`) every direction is optimal:
    mode 0 takes ``rho`` on the real axis, the other modes 0.
    """
    from ptmpi.operators.modes import modulus

    xp = get_xp(zt)
    f = valid_only(f, valid)
    mag = modulus(zt)
    rho = prox_modulus(mag, f, r2, likelihood, epsilon)
    tiny = 64 * np.finfo(mag.dtype).eps * mag.max(axis=(-2, -1), keepdims=True)
    significant = mag > tiny
    scale = xp.where(significant, rho / xp.where(significant, mag, 1), 0).astype(mag.dtype)
    z = zt * scale[None]
    z[0] = xp.where(significant, z[0], rho)
    return z if valid is None else xp.where(valid, z, zt)


def shrink_isotropic(pt, threshold: float):
    """``max(0, |pt| - threshold) * pt / |pt|`` with ``|pt|`` the 3-component magnitude.

    ``pt``: ``(3, nz, n, n)`` complex; magnitudes use ``|.|^2`` of complex components.
    """
    xp = get_xp(pt)
    mag = xp.sqrt(xp.sum(pt.real**2 + pt.imag**2, axis=0))
    scale = xp.maximum(mag - threshold, 0) / xp.where(mag > 0, mag, 1)
    return pt * scale[None].astype(pt.real.dtype, copy=False)


def update_data_split(d, lam2, f, r2: float, likelihood: str, valid=None,
                      epsilon: float = 0.0, z_old=None, stats=None):
    """Steps 2-3 for the far-field split (no over-relaxation): ``z = prox_G(d - lam2)``
    and ``lam2 += z - d`` in place; returns ``z``. One compiled pass on the host when
    available (:func:`ptmpi.operators.kernels.data_split`), else these numpy steps.
    ``valid``: the detector mask, as in :func:`prox_data`. ``stats``: optional float64
    array of 3 that receives the local ``[||z - d||^2, ||z - z_old||^2, sum G(d)]`` (the
    second 0 without ``z_old``).

    With ``K`` incoherent probe modes ``d``, ``lam2`` and ``z`` are
    ``(K, N_FRAMES_LOCAL, M, M)``: the prox is :func:`prox_data_modes` (compiled:
    :func:`ptmpi.operators.kernels.data_split_modes`) and ``sum G`` is taken at the
    model modulus ``sqrt(sum_k |d_k|^2)``.
    """
    from ptmpi.operators.modes import modulus

    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    modes = d.ndim == 4
    if kernels.available(d, lam2, f) and (valid is None or kernels.available(valid)):
        split = kernels.data_split_modes if modes else kernels.data_split
        return split(d, lam2, f, r2, likelihood, valid, epsilon, z_old, stats)
    xp = get_xp(d)
    z = (prox_data_modes if modes else prox_data)(d - lam2, f, r2, likelihood, valid, epsilon)
    step = z - d
    lam2 += step
    if stats is not None:
        stats[0] = float(xp.vdot(step, step).real)
        stats[1] = 0.0 if z_old is None else float(xp.linalg.norm(z - z_old)) ** 2
        stats[2] = data_objective(modulus(d) if modes else d, f, likelihood, valid, epsilon)
    return z


def total_variation(g) -> float:
    """Isotropic TV of the field whose gradient is ``g`` ``(3, ...)``: the sum over voxels
    of ``|g|``, accumulated in float64."""
    xp = get_xp(g)
    return float(xp.sum(xp.sqrt(xp.sum(g.real**2 + g.imag**2, axis=0)), dtype=xp.float64))


def update_tv_split(grad, u, lam1, threshold: float, p=None, stats=None):
    """Steps 2-3 for the TV split (no over-relaxation): ``g = grad u``,
    ``p = shrink(g - lam1, threshold)``, ``lam1 += p - g`` in place; returns ``p``.

    ``p`` (the previous one) may be passed as the buffer of the result. ``stats``: optional
    float64 array of 3 that receives ``[||p - g||^2, ||p - p_old||^2, TV(u)]`` (the second
    needs ``p``). One compiled pass on the host when
    available (:func:`ptmpi.operators.kernels.tv_step`), else these numpy steps.
    """
    if kernels.available(u, lam1):
        # a z-slab reads the next slab's first slice (grad.with_next; the volume itself)
        return kernels.tv_step(grad.with_next(u), lam1, threshold, p, stats)
    xp = get_xp(u)
    g = grad.fwd(u)
    p_new = shrink_isotropic(g - lam1, threshold)
    step = p_new - g
    lam1 += step
    if stats is not None:
        stats[0] = float(xp.vdot(step, step).real)
        stats[1] = 0.0 if p is None else float(xp.linalg.norm(p_new - p)) ** 2
        stats[2] = total_variation(g)
    return p_new


def data_objective(d, f, likelihood: str, valid=None, epsilon: float = 0.0) -> float:
    """Local ``sum G(d)`` over the valid pixels (for the objective and diagnostics),
    accumulated in float64; ``valid`` as in :func:`prox_data` (None: every pixel). The
    Poisson one is ``1/2 sum (g - f log g)``, the negative log-likelihood up to a constant."""
    xp = get_xp(d)
    g = xp.abs(d).astype(xp.float64) ** 2 + epsilon
    f64 = valid_only(f, valid).astype(xp.float64) + epsilon
    if likelihood == "agm":
        return float(0.5 * xp.sum(valid_only((xp.sqrt(g) - xp.sqrt(f64)) ** 2, valid)))
    safe = xp.where(f64 > 0, f64 * xp.log(xp.maximum(g, 1e-300)), 0)
    return float(0.5 * xp.sum(valid_only(g - safe, valid)))
