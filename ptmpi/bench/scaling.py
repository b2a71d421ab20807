"""``ptmpi bench --scaling``: strong and weak scaling of the APT iteration over ranks.

Started as one process, it launches ``mpiexec -n P python -m ptmpi bench --iteration-only
--slabs S`` for each rank count and layout and collects their JSON. Two layouts: the
replicated volume (``S = 1``, angles over the ranks) and one z-slab per rank (``S = P``,
one angle group). Strong scaling keeps the case (``n^3``, A angles) and reports
``E(P) = T(1) / (P T(P))``; weak scaling keeps the angles per rank (``A(P) = P A_1``) and
reports ``E(P) = T(1) / T(P)``; ``T(1)`` is the one-rank time, the same for both layouts.
Ranks beyond the cores oversubscribe them (said in the table's description).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def _launcher() -> str:
    found = os.environ.get("PTMPI_MPIEXEC") or shutil.which("mpiexec") or shutil.which("mpirun")
    if not found:
        raise RuntimeError("bench --scaling needs mpiexec (or PTMPI_MPIEXEC) on PATH")
    return found


def _iteration_time(ranks: int, n: int, angles: int, repeat: int, workdir: Path,
                    slabs: int = 1) -> float:
    out = workdir / f"scaling-{ranks}-{angles}-{slabs}.json"
    cmd = [_launcher(), "-n", str(ranks), sys.executable, "-m", "ptmpi", "bench", "--sizes",
           str(n), "--angles", str(angles), "--repeat", str(repeat), "--iteration-only",
           "--slabs", str(slabs), "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if ranks > (os.cpu_count() or 1):
        # oversubscribed: MPICH's waiting ranks must yield their core. Not otherwise: on 2
        # ranks of 2 cores yielding slowed the slab layout's iteration from 102 to 120 ms
        # (64^3, 48 angles), through every collective's wait.
        env.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                           f"{proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.read_text())["cases"][0]["iteration_s_max_rank"]


def run_scaling(n: int, angles: int, weak_angles: int, ranks: list[int], repeat: int) -> dict:
    """Strong scaling at ``angles``, weak scaling at ``weak_angles`` per rank."""
    cores = os.cpu_count() or 1
    result = {"n": n, "ranks": ranks, "cores": cores, "description": {
        "strong": f"{n}^3, {angles} angles, replicated volume (--slabs 1); E = T1 / (P TP)",
        "weak": f"{n}^3, {weak_angles} angles per rank, replicated volume (--slabs 1); "
                "E = T1 / TP",
        "strong_slabs": f"{n}^3, {angles} angles, one z-slab per rank (--slabs P); "
                        "E = T1 / (P TP)",
        "weak_slabs": f"{n}^3, {weak_angles} angles per rank, one z-slab per rank "
                      "(--slabs P); E = T1 / TP",
    }}
    over = [p for p in ranks if p > cores]
    if over:
        for kind in result["description"]:
            result["description"][kind] += f"; {over} ranks oversubscribe {cores} cores"
    with tempfile.TemporaryDirectory() as tmp:
        strong = [(p, angles, _iteration_time(p, n, angles, repeat, Path(tmp))) for p in ranks]
        weak = [(p, weak_angles * p, _iteration_time(p, n, weak_angles * p, repeat, Path(tmp)))
                for p in ranks]
        # one slab per rank; with one rank that is the replicated layout, timed above
        strong_s = [(p, angles, t if p == 1 else
                     _iteration_time(p, n, angles, repeat, Path(tmp), slabs=p))
                    for p, _, t in strong]
        weak_s = [(p, a, t if p == 1 else
                   _iteration_time(p, n, a, repeat, Path(tmp), slabs=p)) for p, a, t in weak]
    t1 = strong[0][2] * strong[0][0]
    w1 = weak[0][2]
    for suffix, srows, wrows in (("", strong, weak), ("_slabs", strong_s, weak_s)):
        result["strong" + suffix] = [
            {"ranks": p, "angles": a, "slabs": p if suffix else 1, "iteration_s": t,
             "efficiency": t1 / (p * t)} for p, a, t in srows]
        result["weak" + suffix] = [
            {"ranks": p, "angles": a, "slabs": p if suffix else 1, "iteration_s": t,
             "efficiency": w1 / t} for p, a, t in wrows]
    return result
