"""Where an APT iteration spends its time: exclusive per-stage timers around the solver.

:func:`instrumented` wraps, for the duration of a ``with`` block, the functions the
ADMM loop calls (operators, proxes, CG, the communicator's reductions) with timers, so the
solver runs unchanged and no timing code lives in it. Times are *exclusive*: a stage
called inside another (the projector inside CG's normal operator, an Allreduce inside
it) is charged to itself only. Stages:

``projector``  ``P``, ``P^H`` and the fused ``P^H W P``
``fft``        the far-field batches ``F`` and ``F^H``
``windowing``  ``omega * S_j`` and its adjoint (gather / scatter-add of the frames)
``cg``         CG's own vector work (axpys, inner products), the Laplacian excluded
``tv``         gradient, divergence, Laplacian (in CG's operator, with its sum with the
               data term's) and the isotropic shrink
``prox``       the closed-form z-step
``allreduce``  every reduction across ranks, including waiting for the slowest rank
``other``      the rest of the iteration (multiplier updates, metrics)
"""

from __future__ import annotations

import contextlib
import functools
import time

from ptmpi.backend import synchronize

STAGES = ("projector", "fft", "windowing", "cg", "tv", "prox", "allreduce", "other")


class StageTimer:
    """Exclusive wall time per stage; nested stages are subtracted from their parent."""

    def __init__(self, xp):
        self.xp = xp
        self.totals = dict.fromkeys(STAGES, 0.0)
        self._stack: list[list] = []

    def reset(self) -> None:
        self.totals = dict.fromkeys(STAGES, 0.0)

    def wrap(self, stage: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            synchronize(self.xp)
            frame = [stage, time.perf_counter(), 0.0]
            self._stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                synchronize(self.xp)
                elapsed = time.perf_counter() - frame[1]
                self._stack.pop()
                self.totals[stage] += elapsed - frame[2]
                if self._stack:
                    self._stack[-1][2] += elapsed
        return timed


@contextlib.contextmanager
def instrumented(comm, xp):
    """Time the solver's stages while the block runs; yields the :class:`StageTimer`."""
    from ptmpi.operators.fft import FarField
    from ptmpi.operators.grad import Gradient
    from ptmpi.operators.ptycho import Ptycho
    from ptmpi.operators.tomo import Projector
    from ptmpi.parallel.shared_sum import SharedSum
    from ptmpi.solvers import admm

    timer = StageTimer(xp)
    targets = [
        (Projector, "fwd", "projector"), (Projector, "adj", "projector"),
        (Projector, "normal", "projector"),
        (FarField, "fwd", "fft"), (FarField, "adj", "fft"),
        (Ptycho, "fwd", "windowing"), (Ptycho, "adj", "windowing"),
        (Ptycho, "extract", "windowing"), (Ptycho, "scatter", "windowing"),
        (Gradient, "fwd", "tv"), (Gradient, "adj", "tv"), (Gradient, "normal", "tv"),
        (Gradient, "normal_plus", "tv"),
        (Gradient, "adj_sum", "tv"), (admm, "update_tv_split", "tv"),
        (admm, "shrink_isotropic", "tv"), (admm, "prox_data", "prox"),
        (admm, "update_data_split", "prox"),
        (admm, "conjugate_gradient", "cg"),
        (comm, "allreduce_sum", "allreduce"), (comm, "allreduce_scalar", "allreduce"),
        (SharedSum, "reduce", "allreduce"),
    ]
    saved = []
    for owner, name, stage in targets:
        original = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name)
        saved.append((owner, name, original, name in vars(owner)))
        setattr(owner, name, timer.wrap(stage, getattr(owner, name)))
    try:
        yield timer
    finally:
        for owner, name, original, own in reversed(saved):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
