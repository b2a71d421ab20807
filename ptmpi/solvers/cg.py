"""Conjugate gradients for a Hermitian positive definite operator on replicated vectors."""

from __future__ import annotations

from collections.abc import Callable

from ptmpi.backend import get_xp


def conjugate_gradient(apply_a: Callable, b, x0, iterations: int, tol: float = 0.0):
    """Approximately solve ``A x = b`` by CG, warm-started from ``x0``.

    Parameters
    ----------
    apply_a : callable
        ``x -> A x`` for Hermitian positive definite ``A`` (may communicate internally;
        its result must be identical on every rank).
    b, x0 : arrays of the same shape and dtype, replicated on every rank.
    iterations : int
        Maximum number of CG iterations.
    tol : float
        Stop early when ``||r|| <= tol ||b||``.

    Returns
    -------
    x : array
        The iterate after the last step (``x0`` is not modified).
    """
    xp = get_xp(b)
    x = x0.copy()
    r = b - apply_a(x)
    d = r.copy()
    rr = float(xp.vdot(r, r).real)
    b_norm_sq = float(xp.vdot(b, b).real)
    for _ in range(iterations):
        if rr <= (tol * tol) * b_norm_sq or rr == 0.0:
            break
        ad = apply_a(d)
        alpha = rr / float(xp.vdot(d, ad).real)
        x += alpha * d
        r -= alpha * ad
        rr_new = float(xp.vdot(r, r).real)
        d *= rr_new / rr
        d += r
        rr = rr_new
    return x
