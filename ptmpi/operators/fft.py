"""Unitary 2-D far-field propagator ``F`` over the last two axes (SPEC section 2).

Zero frequency sits at ``[0, 0]`` in memory (no shift); ``F`` is unitary, so ``F^H = F^-1``.
"""

from __future__ import annotations

import os

import numpy as np

from ptmpi.backend import fft_module, get_xp

_CORES = max(1, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else 1


def _threads(ranks_per_node: int) -> int:
    threads = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, int(threads) if threads.isdigit() else _CORES // max(1, ranks_per_node))


_WORKERS = _threads(1)


def set_workers(ranks_per_node: int) -> int:
    """Threads of the host FFT: ``OMP_NUM_THREADS`` when set, else this process's cores
    shared among the ranks of its node (so ranks do not oversubscribe them)."""
    global _WORKERS
    _WORKERS = _threads(ranks_per_node)
    return _WORKERS


def workers() -> int:
    """Threads the host FFT uses."""
    return _WORKERS


def fft2(x, inverse: bool = False, overwrite: bool = False):
    """Unitary forward (or inverse) 2-D DFT over the last two axes, dtype preserved.

    ``overwrite``: ``x`` may be destroyed (its memory then usually holds the result:
    no new array of its size, for a caller that no longer needs ``x``)."""
    xp = get_xp(x)
    fft = fft_module(xp)
    kwargs = {"workers": _WORKERS} if xp is np else {}
    if overwrite:
        kwargs["overwrite_x"] = True
    if inverse:
        return fft.ifft2(x, norm="ortho", **kwargs)
    return fft.fft2(x, norm="ortho", **kwargs)


def rfft2(x):
    """Unitary 2-D DFT of real ``x`` over the last two axes, the non-negative frequencies
    of the last axis only (``M // 2 + 1``; the rest are conjugates), complex of ``x``'s
    precision."""
    xp = get_xp(x)
    fft = fft_module(xp)
    kwargs = {"workers": _WORKERS} if xp is np else {}
    return fft.rfft2(x, norm="ortho", **kwargs)


class FarField:
    """``F``: unitary 2-D DFT of each frame, ``(..., M, M) -> (..., M, M)``."""

    def fwd(self, psi, overwrite: bool = False):
        """``F psi``; ``overwrite``: ``psi`` may be destroyed (see :func:`fft2`)."""
        return fft2(psi, overwrite=overwrite)

    def adj(self, d, overwrite: bool = False):
        """``F^H d``; ``overwrite``: ``d`` may be destroyed (see :func:`fft2`)."""
        return fft2(d, inverse=True, overwrite=overwrite)
