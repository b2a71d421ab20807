"""The default TV weight of APT, chosen from the data.

Rule::

    tv_weight = tv_factor * L + tv_noise_factor * sigma * sqrt(L)

with ``L = ||D^H D||`` and ``sigma`` the noise of the data in amplitude (``1/2`` for
photon counts at any dose, 0 for noise-free data).

Why: near the solution the Poisson likelihood is, in amplitude, a least-squares term
``2 || |D u| - sqrt(f) ||^2`` with noise ``sigma = 1/2`` per pixel whatever the dose, and
``D = sqrt(L) D_0`` with ``||D_0^H D_0|| = 1``. Divided by ``L``, the problem is TV
denoising in the scale of ``u`` with noise ``sigma / sqrt(L)`` and weight
``tv_weight * sigma^2 / L``; the weight of TV denoising (a soft threshold of the
gradient) that preserves edges while removing noise is proportional to the noise
level, as the threshold of wavelet shrinkage is (Donoho & Johnstone 1994). Hence
``tv_weight sigma^2 / L ~ sigma / sqrt(L)``, i.e. ``tv_weight ~ sqrt(L) / sigma`` per unit
of the likelihood's curvature (``1 / sigma^2 = 4``), i.e. ``tv_noise_factor * sigma * sqrt(L)``
with the likelihood as written (unit curvature in ``|z|``). The weight grows with the
square root of the dose: more photons resolve finer detail, but the likelihood's weight
grows faster (linearly), so the balance tips towards the data. The noise-free term
``tv_factor * L`` keeps the balance of data and TV fixed where there is no noise.

``tv_noise_factor`` was calibrated on one 48 x 48 x 32 geometry at three doses (README,
Reconstruction); the rule was then checked on the paper's 128^3 noisy cases.
"""

from __future__ import annotations

import math


def default_tv_weight(tv_factor: float, tv_noise_factor: float, norm: float,
                      noise_amplitude: float) -> tuple[float, str]:
    """The default TV weight and a one-line statement of how it was chosen.

    Parameters
    ----------
    tv_factor : weight per unit of ``L`` (noise-free term).
    tv_noise_factor : weight per unit of ``sigma sqrt(L)`` (noise term).
    norm : ``L = ||D^H D||``.
    noise_amplitude : ``sigma``, the noise in amplitude (0.5 for photon counts, 0 without).
    """
    clean = tv_factor * norm
    noise = tv_noise_factor * noise_amplitude * math.sqrt(max(norm, 0.0))
    weight = clean + noise
    if noise_amplitude > 0:
        reason = (f"photon counts: tv_weight = {tv_factor:g} L + {tv_noise_factor:g} sigma "
                  f"sqrt(L) = {clean:.4g} + {noise:.4g} (L = ||D^H D|| = {norm:.4g}, "
                  f"Poisson noise sigma = {noise_amplitude:g} in amplitude): the TV "
                  "threshold follows the noise level of u")
    else:
        reason = (f"noise-free data: tv_weight = {tv_factor:g} L = {clean:.4g} "
                  f"(L = ||D^H D|| = {norm:.4g})")
    return float(weight), reason
