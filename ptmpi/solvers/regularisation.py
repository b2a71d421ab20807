"""The default TV weight of APT, chosen from the data.

Rule::

    tv_weight = tv_factor * L + tv_noise_factor * sigma * sqrt(d)

with ``L = ||D^H D||``, ``d`` the mean over voxels of the diagonal of ``D^H D`` (the
information the data carry about one voxel) and ``sigma`` the noise of the data in
amplitude (``1/2`` for photon counts at any dose, 0 for noise-free data).

Why: near the solution the Poisson likelihood is, in amplitude, a least-squares term
with noise ``sigma = 1/2`` per pixel whatever the dose (unit curvature in ``|z|``). A voxel
``i`` is then known to within about ``sigma / sqrt(diag_i)``: the noise level of ``u``.
TV acts voxel by voxel as a soft threshold of the gradient (the shrink of ``p``), and
the threshold of a shrinkage that removes noise and keeps edges is proportional to the
noise level (Donoho & Johnstone 1994). In the u-step the TV weight meets the data's
curvature ``diag_i``, so the threshold in the scale of ``u`` is ``tv_weight / diag_i``;
setting it proportional to ``sigma / sqrt(diag_i)`` gives ``tv_weight ~ sigma sqrt(d)``.
The weight grows with the square root of the dose: more photons resolve finer detail,
but the likelihood's weight grows linearly, so the balance tips towards the data. The
mean diagonal, not ``L``: ``L`` is the curvature of the smoothest mode, which sums a whole
projection (``L / d`` grows with the path length: 179 at 48 x 48 x 32, 577 at 128^3),
while the threshold acts on single voxels. The noise-free term ``tv_factor * L`` keeps the
balance of data and TV fixed where there is no noise.

``tv_noise_factor`` was calibrated on one 48 x 48 x 32 geometry at three doses
(docs/solver.md: TV weight against the best fixed weight); the rule was then checked at
64^3 and on the paper's 128^3 noisy cases.
"""

from __future__ import annotations

import math


def default_tv_weight(tv_factor: float, tv_noise_factor: float, norm: float,
                      noise_amplitude: float, mean_diagonal: float) -> tuple[float, str]:
    """The default TV weight and a one-line statement of how it was chosen.

    Parameters
    ----------
    tv_factor : weight per unit of ``L`` (noise-free term).
    tv_noise_factor : weight per unit of ``sigma sqrt(d)`` (noise term).
    norm : ``L = ||D^H D||``.
    noise_amplitude : ``sigma``, the noise in amplitude (0.5 for photon counts, 0 without).
    mean_diagonal : ``d``, the mean of the diagonal of ``D^H D`` over the voxels.
    """
    clean = tv_factor * norm
    noise = tv_noise_factor * noise_amplitude * math.sqrt(max(mean_diagonal, 0.0))
    weight = clean + noise
    if noise_amplitude > 0:
        reason = (f"photon counts: tv_weight = {tv_factor:g} L + {tv_noise_factor:g} sigma "
                  f"sqrt(d) = {clean:.4g} + {noise:.4g} (L = ||D^H D|| = {norm:.4g}, d = "
                  f"mean diagonal of D^H D = {mean_diagonal:.4g}, Poisson noise sigma = "
                  f"{noise_amplitude:g} in amplitude): the TV threshold follows the noise "
                  "level of u, sigma / sqrt(d)")
    else:
        reason = (f"noise-free data: tv_weight = {tv_factor:g} L = {clean:.4g} "
                  f"(L = ||D^H D|| = {norm:.4g})")
    return float(weight), reason


def default_r2(r2_factor: float, r2_default_max: float, norm: float, mean_diagonal: float,
               operator: str = "D^H D", ray_factor: float = 0.0,
               width: int = 0) -> tuple[float, str]:
    """The default ``r2 = min(r2_default_max, r2_factor d / L, ray_factor / n)`` and a
    one-line statement of it: ``L = norm`` and ``d = mean_diagonal`` of the data's normal
    operator, named ``operator`` in the statement (``D^H D`` for the linear model,
    ``sum P^H W P`` for the exponential model's tomography), ``n = width`` the volume's
    lateral size (a ray's length; ``ray_factor`` 0: no such bound). On scan grids that line
    up across the angles ``L / d`` grows with the length of a ray, and ``r2_factor d / L``
    is close to ``4.4 / n``; grids that do not (dense, overlapping, offset, jittered or
    spiral scans) lower ``L / d``, and ``ray_factor / n`` bounds the ``r2`` they would
    get (docs/solver.md: the ``r2`` rule)."""
    r2 = min(r2_default_max, r2_factor * mean_diagonal / norm)
    ray = ray_factor > 0 and width > 0
    if ray:
        r2 = min(r2, ray_factor / width)
    bound = f", {ray_factor:g} / n" if ray else ""
    rule = (f"r2 = min({r2_default_max:g}, {r2_factor:g} d / L{bound}) = {r2:.4g} (d = mean "
            f"diagonal of {operator} = {mean_diagonal:.4g}, L = ||{operator}|| = {norm:.4g}, "
            f"L / d = {norm / mean_diagonal:.4g}" + (f", n = {width}" if ray else "") + ")")
    return float(r2), rule
