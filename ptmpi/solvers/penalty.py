"""Detecting the period-2 cycle of ADMM on a nonconvex likelihood (APT and 2-D ptychography).

The far-field likelihood ``G`` is nonconvex along the phase of ``z`` wherever the model is
darker than the data; where that negative curvature exceeds the penalty ``r2`` the z-step
jumps back and forth and the iterates alternate: successive steps ``x_k - x_{k-1}`` point
backwards (cosine near -1) and the relative change stops shrinking. The remedy is to
double ``r2`` and halve the scaled multiplier ``lam2 = y / r2``, which keeps the unscaled
multiplier ``y`` and so the fixed points of the iteration (Boyd et al. 2011, sec. 3.4.1).
"""

from __future__ import annotations

from collections.abc import Sequence


def step_cosine(dot: float, norm_step: float, norm_prev: float) -> float | None:
    """Cosine between successive steps from ``<prev, step>`` and the norms (None if 0)."""
    if norm_step <= 0 or norm_prev <= 0:
        return None
    return dot / (norm_step * norm_prev)


def cycling(turns: Sequence[float], rel_change: Sequence[float], window: int,
            threshold: float, stagnation: float) -> bool:
    """True when the iteration cycles without converging.

    ``turns``: cosines between successive steps since the last change of ``r2``;
    ``rel_change``: relative change per iteration. Cycling: over the last ``window``
    iterations the mean cosine is below ``-threshold`` and the summed relative change is
    more than ``stagnation`` times that of the ``window`` iterations before (a cycle that
    no longer shrinks). ``window = 0`` never reports a cycle.
    """
    if window <= 0 or len(turns) < 2 * window or len(rel_change) < 2 * window:
        return False
    return (sum(turns[-window:]) / window < -threshold
            and sum(rel_change[-window:]) > stagnation * sum(rel_change[-2 * window:-window]))
