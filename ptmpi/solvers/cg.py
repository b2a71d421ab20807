"""Conjugate gradients for a Hermitian positive definite operator on replicated vectors."""

from __future__ import annotations

from collections.abc import Callable

from ptmpi.backend import get_xp
from ptmpi.operators import kernels


def conjugate_gradient(apply_a: Callable, b, x0, iterations: int, tol: float = 0.0,
                       inv_diag=None, space=None, min_iterations: int = 0,
                       counts: list | None = None):
    """Approximately solve ``A x = b`` by (preconditioned) CG, warm-started from ``x0``.

    Parameters
    ----------
    apply_a : callable
        ``x -> A x`` for Hermitian positive definite ``A`` (may communicate internally;
        its result must be identical on every rank). Each result is used before the next
        call, so ``apply_a`` may return the same buffer every time.
    b, x0 : arrays of the same shape and dtype, replicated on every rank.
    iterations : int
        Maximum number of CG iterations.
    tol : float
        Stop early when ``||r|| <= tol ||b||`` (0: run all ``iterations``).
    inv_diag : array, optional
        Inverse of a positive preconditioner (Jacobi: ``1 / diag(A)``), same on all ranks.
    space : optional
        The vectors' space when they are split over ranks (z-slabs,
        :class:`~ptmpi.parallel.volume.VolumeSpace`): its ``vdot`` and ``total`` give the
        dot products over the whole vector, summed slice by slice so that they do not
        depend on the split. None: plain ``vdot`` of whole vectors.
    min_iterations : int
        Iterations taken before ``tol`` is tested.
    counts : list, optional
        The number of iterations taken is appended to it.

    Returns
    -------
    x : array
        The iterate after the last step (``x0`` is not modified).
    """
    xp = get_xp(b)
    if space is None:
        def vdot(x, y):
            return xp.vdot(x, y)
    else:
        vdot = space.vdot
    fused = kernels.available(b, x0) and (inv_diag is None or kernels.available(inv_diag))
    x = x0.copy()
    if fused and space is not None:  # the same sums as space.vdot, in one pass
        r, d, partial = kernels.cg_start(b, apply_a(x), inv_diag)
        rs, b_norm_sq = (float(v) for v in space.total(partial))
    else:
        r = b - apply_a(x)
        s = r if inv_diag is None else inv_diag * r
        d = s.copy()
        rs = float(vdot(r, s).real)
        b_norm_sq = float(vdot(b, b).real)
    taken = 0
    for _ in range(iterations):
        if rs == 0.0 or (tol > 0 and taken >= min_iterations and (
                rs if inv_diag is None else float(vdot(r, r).real)) <= tol * tol * b_norm_sq):
            break
        taken += 1
        ad = apply_a(d)
        alpha = rs / float(vdot(d, ad).real)
        if fused:  # the same updates in two passes over memory instead of about eight
            if taken == iterations:  # the last step: only x moves
                kernels.step_and_direction(x, d, r, alpha)
                break
            partial = kernels.residual_update(r, ad, alpha, inv_diag, per_slice=space is not None)
            rs_new = float(space.total(partial) if space is not None else partial[0])
            kernels.step_and_direction(x, d, r, alpha, rs_new / rs, inv_diag)
        else:
            x += alpha * d
            r -= alpha * ad
            s = r if inv_diag is None else inv_diag * r
            rs_new = float(vdot(r, s).real)
            d *= rs_new / rs
            d += s
        rs = rs_new
    if counts is not None:
        counts.append(taken)
    return x
