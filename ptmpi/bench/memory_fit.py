"""Peaks that :mod:`ptmpi.memory`'s coefficients are fitted to.

``python -m ptmpi.bench.memory_fit OUT.jsonl`` simulates exp-model series over a spread of
geometries, measures the ``tracemalloc`` peak of a short exp solve (two joint iterations
after a short initialisation, whose peak does not depend on the iteration counts) for APT,
APTs and the two-step, with the compiled kernels and with the numpy fallback, and appends
one JSON line per run; :func:`fit` refits the coefficients from such a file (the peaks
the coefficients were fitted to: ``docs/results/memory/exp-peaks.jsonl``).
``python -m ptmpi.bench.memory_fit OUT.jsonl linear`` does the same for the linear model's
APT and APTs (two-iteration solves; ``Pb`` is then 0: ``docs/results/memory/
linear-peaks.jsonl``).
"""

from __future__ import annotations

import json
import math
import sys
import tracemalloc

import numpy as np

# (n, nz, angles, step, probe size): 24^3-64^3, 4-24 angles, frame stacks from about a
# tenth of the volume to 75 volumes
GEOMETRIES = [
    (24, 24, 24, 2, 16), (24, 16, 8, 4, 8), (32, 32, 4, 8, 16), (32, 24, 16, 2, 16),
    (32, 32, 12, 4, 8), (40, 40, 8, 4, 16), (48, 32, 6, 8, 8), (48, 48, 16, 6, 24),
    (56, 40, 4, 2, 24), (64, 64, 4, 16, 16), (64, 48, 12, 8, 16), (64, 32, 8, 4, 32),
    (24, 24, 12, 4, 12), (24, 32, 20, 8, 16), (32, 16, 24, 8, 8), (32, 32, 8, 2, 24),
    (40, 24, 20, 8, 16), (40, 40, 12, 3, 12), (48, 48, 4, 4, 16), (48, 24, 24, 12, 16),
    (56, 56, 8, 8, 24), (64, 64, 16, 16, 16), (64, 64, 6, 4, 24), (64, 24, 24, 8, 8),
]


def _problem(n, nz, angles, step, probe, **model):
    """A noise-free simulated series as a one-rank LocalProblem (``model``: extra
    :class:`SimulationSettings` fields)."""
    from ptmpi.sim.presets import SimulationSettings
    from ptmpi.sim.simulate import simulate
    from ptmpi.solvers.admm import LocalProblem

    data = simulate(SimulationSettings(n=n, nz=nz, n_angles=angles, step=step,
                                       probe_size=probe, fwhm=max(probe / 4, 3.0), **model))
    counts = np.fft.ifftshift(data.counts, axes=(-2, -1)).astype(np.float32)
    return LocalProblem(data.volume.shape, np.deg2rad(data.angles_deg), counts,
                        data.positions_px, data.frame_offset, data.probe)


def exp_problem(n, nz, angles, step, probe):
    """A noise-free exp-model series (projected phase 3 pi) as a one-rank LocalProblem."""
    return _problem(n, nz, angles, step, probe, model="exp", max_phase=3 * math.pi)


def measure_exp(problem, algorithm: str) -> int:
    """Peak bytes of arrays allocated by a short exp solve (``tracemalloc``): two
    initialisation ptychography iterations and Gauss-Newton steps, two joint iterations."""
    from ptmpi.parallel import SerialComm
    from ptmpi.solvers.admm_exp import ExpSolverSettings, solve_exp

    settings = ExpSolverSettings(algorithm=algorithm, iterations=2, init_iterations=2,
                                 init_gn_iterations=2)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        solve_exp(problem, settings, SerialComm())
        return int(tracemalloc.get_traced_memory()[1] - base)
    finally:
        tracemalloc.stop()


# linear model (n, nz, angles, step, probe size): 32^3-96^3, 4-48 angles, frame stacks from
# about a tenth of the volume to 14 volumes
LINEAR_GEOMETRIES = [
    (32, 32, 4, 8, 16), (32, 24, 16, 2, 16), (32, 32, 48, 4, 8), (40, 40, 8, 4, 16),
    (48, 32, 6, 8, 8), (48, 48, 16, 6, 24), (56, 40, 4, 2, 24), (64, 64, 4, 16, 16),
    (64, 48, 12, 8, 16), (64, 32, 8, 4, 32), (64, 64, 48, 16, 32), (80, 80, 12, 20, 40),
    (96, 64, 8, 24, 48), (96, 96, 12, 24, 48),
]


def linear_problem(n, nz, angles, step, probe):
    """A noise-free linear-model series as a one-rank LocalProblem."""
    return _problem(n, nz, angles, step, probe)


def measure_linear(problem, algorithm: str) -> int:
    """Peak bytes of arrays allocated by a two-iteration linear solve (``tracemalloc``)."""
    from ptmpi.parallel import SerialComm
    from ptmpi.solvers.admm import SolverSettings, solve

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        solve(problem, SolverSettings(algorithm=algorithm, iterations=2), SerialComm())
        return int(tracemalloc.get_traced_memory()[1] - base)
    finally:
        tracemalloc.stop()


def units(problem, itemsize: int = 8) -> dict:
    """V, Fb, Pb (bytes) and projector non-zeros of one problem."""
    from ptmpi.memory import NNZ_PER_VOXEL_ANGLE

    nz, ny, nx = problem.volume_shape
    angles = len(problem.theta_local)
    m = problem.probe.shape[-1]
    return {"V": nz * ny * nx * itemsize, "Fb": problem.f_local.shape[0] * m * m * itemsize,
            "Pb": angles * nz * nx * itemsize, "nnz": NNZ_PER_VOXEL_ANGLE * angles * ny * nx}


def predict(coef, row) -> float:
    """``per_nnz nnz + max(volume phase, frame phase)`` for ``coef`` from :func:`fit`."""
    (v1, f1, p1), (v2, f2, p2), per_nnz = coef
    return per_nnz * row["nnz"] + max(v1 * row["V"] + f1 * row["Fb"] + p1 * row["Pb"],
                                      v2 * row["V"] + f2 * row["Fb"] + p2 * row["Pb"])


def fit(rows, algorithm: str, compiled: bool, rounds: int = 20):
    """Coefficients of the two phases (V, Fb, Pb each) and bytes per projector non-zero,
    fitted to the peaks by non-negative least squares on the relative misfit, alternating
    with the choice of which phase each run peaks in (started from ``Fb`` vs ``4 V``).

    Returns ``(coef, misfits)`` with ``coef = ((V, Fb, Pb), (V, Fb, Pb), per_nnz)``.
    """
    from scipy.optimize import nnls

    rows = [r for r in rows if r["algorithm"] == algorithm and r["compiled"] == compiled]
    y = np.array([r["peak"] for r in rows], dtype=float)
    frame = np.array([r["Fb"] > 4 * r["V"] for r in rows])
    for _ in range(rounds):
        a = np.zeros((len(rows), 7))
        for i, r in enumerate(rows):
            x = np.array([r["V"], r["Fb"], r["Pb"]], dtype=float)
            a[i, 6] = r["nnz"]
            if frame[i]:
                a[i, 3:6] = x
            else:
                a[i, 0:3] = x
        c = nnls(a / y[:, None], np.ones_like(y))[0]
        coef = (tuple(c[0:3]), tuple(c[3:6]), c[6])
        new = np.array([c[3:6] @ [r["V"], r["Fb"], r["Pb"]] > c[0:3] @ [r["V"], r["Fb"], r["Pb"]]
                        for r in rows])
        if (new == frame).all():
            break
        frame = new
    return coef, np.array([predict(coef, r) for r in rows]) / y - 1


def main(path: str, model: str = "exp") -> None:
    from ptmpi.operators import kernels

    if model not in ("exp", "linear"):
        raise SystemExit(f"memory_fit: model must be exp or linear, not {model!r}")
    make, measure, geometries, algorithms = (
        (exp_problem, measure_exp, GEOMETRIES, ("apt", "apts", "two-step")) if model == "exp"
        else (linear_problem, measure_linear, LINEAR_GEOMETRIES, ("apt", "apts")))
    compiled_modes = [True, False] if kernels.ENABLED else [False]
    # compile the kernels first: Numba's compiler allocates through Python too
    measure(make(16, 8, 2, 4, 8), "apt")
    with open(path, "a") as out:
        for geometry in geometries:
            problem = make(*geometry)
            for compiled in compiled_modes:
                kernels.ENABLED = compiled
                for algorithm in algorithms:
                    row = {"geometry": geometry, "algorithm": algorithm,
                           "compiled": compiled, **units(problem),
                           "peak": measure(problem, algorithm)}
                    if model == "linear":
                        row["Pb"] = 0
                    out.write(json.dumps(row) + "\n")
                    out.flush()
            kernels.ENABLED = compiled_modes[0]


if __name__ == "__main__":
    main(*sys.argv[1:3])
