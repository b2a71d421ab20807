"""Simulated detector defects (SPEC 8): a dead stripe of columns and hot pixels.

The mask is centered like the counts (zero frequency at ``[M//2, M//2]``), nonzero =
invalid. The counts at masked pixels are garbage on purpose, so that any use of them
would show: 0 in the dead stripe, :data:`HOT_COUNTS` at a hot pixel.
"""

from __future__ import annotations

import numpy as np

#: Counts of a hot pixel: a saturated 32-bit counter, far above any real frame.
HOT_COUNTS = np.float32(4.0e9)


def stripe_start(m: int) -> int:
    """First column of the dead stripe: right of the central column ``m // 2``, leaving
    ``max(2, m // 16)`` columns beside it, so that the stripe cuts bright low frequencies
    without taking the zero frequency."""
    return m // 2 + max(2, m // 16)


def max_stripe(m: int) -> int:
    """Widest dead stripe a ``m x m`` detector can have (it ends at the last column)."""
    return m - stripe_start(m)


def detector_mask(m: int, stripe: int, hot_pixels: int, rng: np.random.Generator
                  ) -> np.ndarray:
    """A centered ``(m, m)`` uint32 mask (nonzero = invalid): ``stripe`` dead columns from
    :func:`stripe_start` and ``hot_pixels`` distinct random pixels outside the stripe and
    off the central pixel.

    Raises ValueError when the stripe does not fit or there are too many hot pixels.
    """
    if not 0 <= stripe <= max_stripe(m):
        raise ValueError(f"mask stripe must be 0 to {max_stripe(m)} columns for a {m} x {m} "
                         f"detector, got {stripe}")
    mask = np.zeros((m, m), dtype=np.uint32)
    c0 = stripe_start(m)
    mask[:, c0 : c0 + stripe] = 1
    free = np.flatnonzero(mask.reshape(-1) == 0)
    free = free[free != (m // 2) * m + m // 2]
    if not 0 <= hot_pixels <= free.size // 2:
        raise ValueError(f"hot pixels must be 0 to {free.size // 2} (half the unmasked "
                         f"pixels) for a {m} x {m} detector, got {hot_pixels}")
    hot = rng.choice(free, size=hot_pixels, replace=False)
    mask.reshape(-1)[hot] = 2  # 2: hot, 1: dead (both nonzero = invalid)
    return mask


def spoil_masked_counts(counts: np.ndarray, mask: np.ndarray) -> None:
    """In place: counts of centered ``(N, m, m)`` frames set to 0 in the dead stripe and to
    :data:`HOT_COUNTS` at hot pixels (``mask`` from :func:`detector_mask`)."""
    counts[:, mask == 1] = 0
    counts[:, mask == 2] = HOT_COUNTS
