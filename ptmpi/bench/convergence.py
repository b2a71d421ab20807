"""``ptmpi bench --to-snr DB``: iterations and wall time for APT to reach an SNR.

The case is the bench geometry (:class:`~ptmpi.bench.BenchCase`: the paper's step 32 /
12 angles at 128^3 scaled to ``n``, noise-free, its truth known), run with the defaults
of ``ptmpi reconstruct`` from each start (``ones``, the paper's ``u = 1``; ``two-step``,
the 2-step volume, :func:`~ptmpi.solvers.start.two_step_start`) until the SNR against
the truth reaches the target (``--tol 0``; at most ``max_iterations``). Reported per
start, medians of ``repeat`` runs: the iterations to the target (the same in every run:
the solver is deterministic), the wall time of those iterations as the output's metrics
record it (``wall_s``, from the start of the loop) with the start's own time added, and
the total from before the start to the target (the start, the solver's set-up: the norm
of ``D^H D``, the penalties; and the iterations), after an untimed warm-up (the start and
2 iterations: compiled kernels, FFT plans). Every rank stops at the same iteration: the
SNR is a sum over the whole volume, the same on every rank.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time

import numpy as np

logger = logging.getLogger(__name__)

STARTS = ("ones", "two-step")


class _Stop(Exception):
    """Raised by the callback where the SNR reaches the target (``hit``) or the iterations
    reach ``max_iterations``: ends ``solve``."""

    def __init__(self, hit: bool):
        super().__init__()
        self.hit = hit


def time_to_snr(case, target_db: float, starts, repeat: int, comm, *, xp=np,
                dtype=np.complex64, slabs: int = 1, max_iterations: int = 1000) -> dict:
    """One row per start: ``iterations`` (None where the target is not reached within
    ``max_iterations``), ``wall_s`` and ``total_s`` (medians), ``start_s`` (median),
    ``snr_db`` at the stop and every run's figures (``runs``)."""
    from ptmpi.bench import _local_problem
    from ptmpi.solvers.admm import SolverSettings, solve
    from ptmpi.solvers.start import two_step_start

    problem, volume = _local_problem(case, comm, dtype)
    problem = dataclasses.replace(problem, truth_volume=volume)
    layout = None
    if slabs > 1:
        from ptmpi.parallel.slab_data_term import SlabGrid

        layout = SlabGrid(comm, slabs)
    grid = {"layout": layout} if layout else {}
    rows = []
    for start in starts:
        if start not in STARTS:
            raise ValueError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
        # reconstruct's defaults (its iteration budget too, which sets where r2 starts to
        # settle), --tol 0; the bench stops the run itself
        settings = SolverSettings(algorithm=case.algorithm, tol=0, start=start)

        def begin(settings_, start=start):
            """The start's state (None: ``u = 1``, which ``solve`` builds)."""
            return (two_step_start(problem, settings_, comm, xp=xp, dtype=dtype,
                                   layout=layout)[0] if start == "two-step" else None)

        # warm-up (compiled kernels, FFT plans), untimed: the start and 2 iterations
        warm = dataclasses.replace(settings, iterations=2)
        solve(problem, warm, comm, xp=xp, dtype=dtype, state=begin(warm), **grid)
        runs = []
        for _ in range(repeat):
            reached = {}

            def stop_at_target(_state, row, reached=reached):
                reached.update(iteration=row["iteration"], wall_s=row["wall_s"],
                               snr_db=row["snr_db"])
                if row["snr_db"] >= target_db or row["iteration"] >= max_iterations:
                    raise _Stop(row["snr_db"] >= target_db)

            comm.barrier()
            t0 = time.perf_counter()
            state = begin(settings)
            start_s = time.perf_counter() - t0 if state is not None else 0.0
            hit = False
            try:
                solve(problem, settings, comm, xp=xp, dtype=dtype, state=state,
                      callback=stop_at_target, **grid)
            except _Stop as stop:
                hit = stop.hit
            total = time.perf_counter() - t0
            runs.append({"iterations": reached["iteration"] if hit else None,
                         "wall_s": reached["wall_s"] + start_s, "total_s": total,
                         "start_s": start_s, "snr_db": reached["snr_db"]})
            logger.info("bench --to-snr %g, start %s: %s, %.2f s (total %.2f s)", target_db,
                        start, f"{runs[-1]['iterations']} iterations" if hit else
                        f"not reached in {max_iterations} iterations", runs[-1]["wall_s"],
                        total)
        rows.append({"start": start, "iterations": runs[0]["iterations"],
                     "wall_s": statistics.median(r["wall_s"] for r in runs),
                     "total_s": statistics.median(r["total_s"] for r in runs),
                     "start_s": statistics.median(r["start_s"] for r in runs),
                     "snr_db": runs[0]["snr_db"], "runs": runs})
    return {"n": case.n, "angles": case.angles, "step": case.simulation().step,
            "algorithm": case.algorithm, "ranks": comm.size, "slabs": slabs,
            "target_db": target_db, "max_iterations": max_iterations, "repeat": repeat,
            "dtype": np.dtype(dtype).name, "starts": rows}


def format_to_snr(result: dict) -> str:
    """The plain-text table of :func:`time_to_snr` (printed by rank 0)."""
    r = result
    lines = [f"== {r['n']}^3, {r['angles']} angles, step {r['step']}, "
             f"{r['algorithm'].upper()} to {r['target_db']:g} dB: {r['ranks']} rank(s), "
             f"{r['slabs']} slab(s), {r['dtype']}, medians of {r['repeat']} run(s) ==",
             f"{'start':<10} {'iterations':>10} {'wall s':>8} {'total s':>8} {'start s':>8} "
             f"{'SNR dB':>7}"]
    for row in r["starts"]:
        its = (str(row["iterations"]) if row["iterations"] is not None
               else f">{r['max_iterations']}")
        lines.append(f"{row['start']:<10} {its:>10} {row['wall_s']:>8.2f} "
                     f"{row['total_s']:>8.2f} {row['start_s']:>8.2f} {row['snr_db']:>7.2f}")
    lines.append("(wall: the start and the iterations, as the output's metrics record them; "
                 "total: from before the start to the target, the solver's set-up included)")
    return "\n".join(lines)
