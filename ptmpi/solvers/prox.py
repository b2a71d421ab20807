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

The p-step is the isotropic shrink of ``pt = grad u - lam1`` by ``tv_weight / r1``.
"""

from __future__ import annotations

import numpy as np

from ptmpi.backend import get_xp
from ptmpi.mask import valid_only
from ptmpi.operators import kernels

LIKELIHOODS = ("agm", "ipm")


def prox_data(zt, f, r2: float, likelihood: str, valid=None):
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
    """
    xp = get_xp(zt)
    f = valid_only(f, valid)
    mag = xp.abs(zt)
    if likelihood == "agm":
        rho = (xp.sqrt(f) + r2 * mag) / (1 + r2)
    elif likelihood == "ipm":
        rho = (r2 * mag + xp.sqrt((r2 * mag) ** 2 + 4 * (1 + r2) * f)) / (2 * (1 + r2))
    else:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    # Where zt = 0 its phase is undefined and any phase is optimal: keep the real axis.
    # Values at rounding level relative to their frame count as 0, or their phase would be
    # that of the rounding noise, which depends on summation order (and so on the ranks).
    tiny = 64 * np.finfo(mag.dtype).eps * mag.max(axis=(-2, -1), keepdims=True)
    significant = mag > tiny
    phase = xp.where(significant, zt / xp.where(significant, mag, 1), 1)
    z = (rho * phase).astype(zt.dtype, copy=False)
    return z if valid is None else xp.where(valid, z, zt)


def shrink_isotropic(pt, threshold: float):
    """``max(0, |pt| - threshold) * pt / |pt|`` with ``|pt|`` the 3-component magnitude.

    ``pt``: ``(3, nz, n, n)`` complex; magnitudes use ``|.|^2`` of complex components.
    """
    xp = get_xp(pt)
    mag = xp.sqrt(xp.sum(pt.real**2 + pt.imag**2, axis=0))
    scale = xp.maximum(mag - threshold, 0) / xp.where(mag > 0, mag, 1)
    return pt * scale[None].astype(pt.real.dtype, copy=False)


def update_data_split(d, lam2, f, r2: float, likelihood: str, valid=None):
    """Steps 2-3 for the far-field split (no over-relaxation): ``z = prox_G(d - lam2)``
    and ``lam2 += z - d`` in place; returns ``z``. One compiled pass on the host when
    available (:func:`ptmpi.operators.kernels.data_split`), else these numpy steps.
    ``valid``: the detector mask, as in :func:`prox_data`.
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if kernels.available(d, lam2, f) and (valid is None or kernels.available(valid)):
        return kernels.data_split(d, lam2, f, r2, likelihood, valid)
    z = prox_data(d - lam2, f, r2, likelihood, valid)
    lam2 += z - d
    return z


def update_tv_split(grad, u, lam1, threshold: float, p=None):
    """Steps 2-3 for the TV split (no over-relaxation): ``g = grad u``,
    ``p = shrink(g - lam1, threshold)``, ``lam1 += p - g`` in place; returns ``p``.

    ``p`` may be passed as the buffer of the result. One compiled pass on the host when
    available (:func:`ptmpi.operators.kernels.tv_step`), else these numpy steps.
    """
    if kernels.available(u, lam1):
        return kernels.tv_step(u, lam1, threshold, p)
    g = grad.fwd(u)
    p = shrink_isotropic(g - lam1, threshold)
    lam1 += p - g
    return p


def data_objective(d, f, likelihood: str, valid=None) -> float:
    """Local ``sum G(d)`` over the valid pixels (for tests and diagnostics), accumulated
    in float64; ``valid`` as in :func:`prox_data` (None: every pixel)."""
    xp = get_xp(d)
    g = xp.abs(d).astype(xp.float64) ** 2
    f64 = valid_only(f, valid).astype(xp.float64)
    if likelihood == "agm":
        return float(0.5 * xp.sum(valid_only((xp.sqrt(g) - xp.sqrt(f64)) ** 2, valid)))
    safe = xp.where(f64 > 0, f64 * xp.log(xp.maximum(g, 1e-300)), 0)
    return float(0.5 * xp.sum(valid_only(g - safe, valid)))
