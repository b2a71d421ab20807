"""Photon-counting noise for simulated diffraction intensities (SPEC section 2)."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray


def poisson_counts(
    intensity: ArrayLike, eta: float | None, rng: np.random.Generator
) -> NDArray[np.float32]:
    """Detector counts ``f ~ Poisson(eta * intensity)``, or the clean intensity.

    Parameters
    ----------
    intensity : (..., M, M) real array_like
        Noise-free model intensities ``|D(omega, u_true)|^2`` for a probe of unit scale;
        finite and non-negative.
    eta : float or None
        Photon scale: expected counts per unit of ``intensity``. ``None`` means noise-free.
    rng : numpy.random.Generator
        Source of the Poisson draws (unused when ``eta`` is None).

    Returns
    -------
    counts : (..., M, M) float32
        ``intensity`` as float32 (no copy if it already is) when ``eta`` is None, else
        integer-valued Poisson counts with mean ``eta * intensity``.

    Notes
    -----
    The counts match the probe ``sqrt(eta) * omega``; a simulated file stores that scaled
    probe so that its probe and counts are consistent (SPEC section 2). The intensity SNR of
    the paper (SPEC section 5) compares ``counts`` with ``eta * intensity``.
    """
    if eta is None:
        return np.asarray(intensity, dtype=np.float32)
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.integer, np.floating)):
        raise ValueError(f"poisson_counts: eta must be a number or None, got {eta!r}")
    if not (math.isfinite(eta) and eta > 0):
        raise ValueError(f"poisson_counts: eta must be finite and > 0 (or None), got {eta!r}")
    intensity = np.asarray(intensity)
    if intensity.dtype.kind not in "biuf":
        raise ValueError(f"poisson_counts: intensity must be real, got dtype {intensity.dtype}")
    # min() alone would let NaN through; check finiteness explicitly for a clear message.
    if intensity.size and not (np.isfinite(intensity).all() and intensity.min() >= 0):
        raise ValueError("poisson_counts: intensity must be finite and non-negative")
    return rng.poisson(eta * intensity).astype(np.float32)
