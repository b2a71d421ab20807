"""``ptmpi bench``, the memory prediction and ``reconstruct --dry-run``."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from ptmpi.bench import BenchCase, bench_case, run_bench
from ptmpi.bench.floors import iteration_floor
from ptmpi.bench.stages import STAGES, StageTimer, instrumented
from ptmpi.cli import main
from ptmpi.memory import format_bytes, predict_arrays
from ptmpi.operators.tomo import Projector
from ptmpi.parallel import SerialComm


def test_stage_timer_charges_nested_time_to_the_inner_stage(monkeypatch):
    import types

    import ptmpi.bench.stages as stages_module

    clock = [100.0]  # a fake clock: the test decides how long each body takes
    monkeypatch.setattr(stages_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def advance(seconds):
        clock[0] += seconds

    timer = StageTimer(np)
    inner = timer.wrap("fft", lambda: advance(5.0))

    def outer_body():
        advance(2.0)
        inner()
        advance(0.5)

    timer.wrap("cg", outer_body)()
    timer.wrap("cg", lambda: advance(1.0))()
    assert timer.totals["fft"] == 5.0
    assert timer.totals["cg"] == 3.5  # 2 + 0.5 + 1: the inner 5 s are not counted twice
    assert sum(timer.totals.values()) == clock[0] - 100.0


def test_instrumented_restores_what_it_wrapped():
    comm = SerialComm()
    before = (Projector.fwd, Projector.normal, comm.allreduce_sum)
    with instrumented(comm, np):
        assert Projector.fwd is not before[0]
    assert (Projector.fwd, Projector.normal) == before[:2]
    assert "allreduce_sum" not in vars(comm) and comm.allreduce_sum == before[2]


def test_iteration_floor_counts_bytes_as_documented():
    floors = iteration_floor(volume_shape=(2, 4, 4), n_theta_local=3, n_frames_local=5,
                             probe_size=2, nnz=10, cg_iterations=1, n_ranks=2, itemsize=8,
                             bandwidth=1.0, fft_seconds=7.0)
    vol, proj, frames, mats = 256, 192, 160, 10 * 8 * 2 + 10 * 12 * 2
    assert floors["prox"] == 4.5 * frames
    assert floors["projector"] == 2 * (3 * vol + proj / 2 + mats) + (vol + proj) + (proj + 2 * vol)
    assert floors["cg"] == 7 * vol + 3 * vol
    assert floors["tv"] == 2 * vol * 2 + 17 * vol
    assert floors["allreduce"] == 4 * vol * 3
    assert floors["fft"] == 7.0
    assert floors["iteration"] == pytest.approx(sum(floors[k] for k in STAGES))
    assert floors["iteration_bandwidth"] == floors["iteration"]
    # With an arithmetic rate the projector's floor is the larger of memory and arithmetic
    # time: (nnz 2 nz) (1 + 2) (K + 1) multiply-adds.
    slow = iteration_floor(volume_shape=(2, 4, 4), n_theta_local=3, n_frames_local=5,
                           probe_size=2, nnz=10, cg_iterations=1, n_ranks=2, itemsize=8,
                           bandwidth=1.0, fft_seconds=7.0, fma_per_second=1e-3)
    assert slow["projector"] == pytest.approx(10 * 2 * 2 * 3 * 3 / 1e-3)
    assert slow["iteration_bandwidth"] == floors["iteration"]


def test_bench_case_breakdown_adds_up_and_memory_prediction_holds():
    row = bench_case(BenchCase(n=32, angles=6), SerialComm(), 2, np, np.complex64)
    stages = row["stages_s"]
    assert set(stages) == set(STAGES)
    # every instrumented stage is reached by the solver (a renamed or bypassed function
    # would leave its stage at 0), and the exclusive times of the measured stages fit in
    # the iteration ("other" is the remainder, not measured)
    measured = {k: v for k, v in stages.items() if k != "other"}
    assert all(v > 0 for v in measured.values()), measured
    assert sum(measured.values()) <= row["iteration_mean_s"]
    assert row["floors_s"]["iteration"] > 0
    ratio = row["memory_predicted_bytes"] / row["memory_measured_bytes"]
    assert 0.8 < ratio < 1.25, ratio


def test_bench_on_device_arrays_does_not_compare_host_tracing_with_the_plan():
    """tracemalloc sees host allocations only: on device arrays (the strict stand-in for
    CuPy here) the bench says the memory was not measured instead of printing the plan
    against the few host arrays of the run (+947% on an H200)."""
    import strict_xp

    from ptmpi.bench.report import format_result


    result = run_bench([32], 2, None, 1, SerialComm(), xp=strict_xp, astra=False)
    row = result["cases"][0]
    assert "memory_measured_bytes" not in row and "not measured" in row["memory_note"]
    text = format_result(result)
    assert "memory per rank: solver arrays live on the GPU: not measured" in text
    assert "measured peak" not in text


@pytest.mark.parametrize("compiled", [True, False], ids=["kernels", "numpy"])
@pytest.mark.parametrize("algorithm", ["apt", "apts"])
def test_memory_prediction_within_20_percent_off_the_calibration_sizes(algorithm, compiled,
                                                                       monkeypatch):
    """A geometry the coefficients were not fitted on: 36 x 44^2, 9 angles, probe 22, step 6."""
    from ptmpi.operators import kernels
    from ptmpi.sim.presets import SimulationSettings
    from ptmpi.sim.simulate import simulate
    from ptmpi.solvers.admm import LocalProblem, SolverSettings, solve

    if compiled and not kernels.ENABLED:
        pytest.skip("Numba kernels are not enabled here")
    monkeypatch.setattr(kernels, "ENABLED", compiled)
    data = simulate(SimulationSettings(n=44, nz=36, n_angles=9, step=6, probe_size=22,
                                       fwhm=5.0))
    counts = np.fft.ifftshift(data.counts, axes=(-2, -1)).astype(np.float32)
    problem = LocalProblem(data.volume.shape, np.deg2rad(data.angles_deg), counts,
                           data.positions_px, data.frame_offset, data.probe)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        solve(problem, SolverSettings(algorithm=algorithm, iterations=2), SerialComm())
        measured = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    parts = predict_arrays(data.volume.shape, counts.shape[0], 22, 9, algorithm)
    predicted = parts["solver"] + parts["projector"]
    assert abs(predicted / measured - 1) < 0.2, (format_bytes(predicted), format_bytes(measured))


def test_bench_command_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--sizes", "32", "--angles", "4", "--repeat", "1", "--no-astra",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "APT iteration" in text and "projector" in text and "memory per rank" in text
    result = json.loads(out.read_text())
    case = result["cases"][0]
    assert case["n"] == 32 and case["ranks"] == 1 and case["iteration_s"] > 0
    assert result["machine"]["cores"] >= 1
    assert case["zstep_s"] > 0 and case["zstep_counts_s"] > 0 and "z-step" in text


def test_bench_rejects_bad_sizes(capsys):
    assert main(["bench", "--sizes", "20", "--repeat", "1"]) == 1
    assert "multiples of 8" in capsys.readouterr().err


@pytest.mark.mpi(ranks=[2], timeout=120, unit="s")
def test_bench_on_two_ranks_reports_the_slowest_rank(mpi_ranks):
    from ptmpi.parallel import MPIComm

    comm = MPIComm()
    result = run_bench([32], 4, None, 1, comm, astra=False, iteration_only=True)
    if comm.is_root:
        case = result["cases"][0]
        assert case["ranks"] == 2 and case["angles_local"] == 2
        assert case["iteration_s_max_rank"] >= case["iteration_s"] > 0


def _simulate(tmp_path):
    path = tmp_path / "in.h5"
    assert main(["simulate", "--n", "16", "--nz", "12", "--angles", "4", "--step", "4",
                 "--probe-size", "8", "--fwhm", "3", "-o", str(path)]) == 0
    return path


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    path = _simulate(tmp_path)
    out = tmp_path / "rec.h5"
    assert main(["reconstruct", str(path), "-o", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "memory per rank" in text and "it fits" in text
    assert not out.exists()


def test_a_run_that_does_not_fit_is_refused_before_reading(tmp_path, capsys, monkeypatch):
    import ptmpi.memory

    path = _simulate(tmp_path)
    monkeypatch.setattr(ptmpi.memory, "available_bytes", lambda: 1000)
    for extra in (["--dry-run"], []):
        assert main(["reconstruct", str(path), "-o", str(tmp_path / "rec.h5"), *extra]) == 1
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "error" in line]
        assert len(lines) == 1 and "Traceback" not in err
        assert lines[0].startswith("ptmpi reconstruct: error: not enough memory")
        assert "available" in lines[0]
    assert not (tmp_path / "rec.h5").exists()


def test_scaling_runs_each_rank_count_and_reports_efficiencies(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    assert main(["bench", "--scaling", "--ranks", "1,2", "--scaling-size", "32",
                 "--scaling-angles", "4", "--weak-angles", "2", "--repeat", "1",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "strong scaling" in text and "weak scaling" in text
    result = json.loads(out.read_text())
    strong, weak = result["strong"], result["weak"]
    assert [r["ranks"] for r in strong] == [1, 2] and [r["angles"] for r in weak] == [2, 4]
    assert strong[0]["efficiency"] == 1.0 and weak[0]["efficiency"] == 1.0
    for r in strong:
        assert r["efficiency"] == pytest.approx(
            strong[0]["iteration_s"] / (r["ranks"] * r["iteration_s"]))
    assert all(r["iteration_s"] > 0 for r in strong + weak)
    # one z-slab per rank: the same one-rank reference, a run of its own on 2 ranks
    strong_s, weak_s = result["strong_slabs"], result["weak_slabs"]
    assert [(r["ranks"], r["slabs"]) for r in strong_s] == [(1, 1), (2, 2)]
    assert [r["angles"] for r in weak_s] == [2, 4]
    assert strong_s[0] == {**strong[0], "slabs": 1} and weak_s[0]["iteration_s"] == weak[0][
        "iteration_s"]
    for r in strong_s:
        assert r["efficiency"] == pytest.approx(
            strong[0]["iteration_s"] / (r["ranks"] * r["iteration_s"]))
    assert strong_s[1]["iteration_s"] > 0 and weak_s[1]["iteration_s"] > 0
    assert text.count("strong scaling") == 2 and "one z-slab per rank (--slabs P)" in text


def test_bench_slabs_is_for_the_iteration_only(capsys):
    assert main(["bench", "--sizes", "32", "--angles", "2", "--repeat", "1", "--slabs",
                 "2"]) == 1
    assert "--slabs 2: must divide the rank count (1)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def exp_case_off_the_fit():
    """An exp-model series on a geometry the exp coefficients were not fitted on:
    36 x 44^2, 9 angles, probe 22, step 6 (about 2.4 volumes of far field)."""
    from ptmpi.bench.memory_fit import GEOMETRIES, exp_problem

    geometry = (44, 36, 9, 6, 22)
    assert geometry not in GEOMETRIES
    return exp_problem(*geometry)


@pytest.mark.parametrize("compiled", [True, False], ids=["kernels", "numpy"])
@pytest.mark.parametrize("algorithm", ["apt", "apts"])
def test_exp_memory_prediction_within_25_percent_off_the_calibration_sizes(
        exp_case_off_the_fit, algorithm, compiled, monkeypatch):
    from ptmpi.bench.memory_fit import exp_problem, measure_exp
    from ptmpi.operators import kernels

    if compiled and not kernels.ENABLED:
        pytest.skip("Numba kernels are not enabled here")
    monkeypatch.setattr(kernels, "ENABLED", compiled)
    if compiled:  # compile first: Numba's compiler allocates through Python too
        measure_exp(exp_problem(16, 8, 2, 4, 8), algorithm)
    problem = exp_case_off_the_fit
    measured = measure_exp(problem, algorithm)
    parts = predict_arrays(problem.volume_shape, problem.f_local.shape[0], 22, 9, algorithm,
                           compiled=compiled, model="exp")
    predicted = parts["solver"] + parts["projector"]
    assert abs(predicted / measured - 1) < 0.25, (format_bytes(predicted), format_bytes(measured))


@pytest.mark.parametrize("modes", [1, 2])
def test_ptycho2d_memory_prediction_within_25_percent_off_the_calibration_sizes(modes):
    """ptycho2d's own figures (module doc of ptmpi.memory) against the tracemalloc peak of a
    two-iteration solve with the probe refined, on a sub-pixel geometry outside their fit."""
    from ptmpi.sim.presets import SimulationSettings
    from ptmpi.sim.simulate import simulate
    from ptmpi.solvers.ptycho2d import Ptycho2DSettings, solve_ptycho2d

    data = simulate(SimulationSettings(n=40, nz=40, n_angles=9, step=6, probe_size=24,
                                       fwhm=6.0, jitter=0.2))
    counts = np.fft.ifftshift(data.counts, axes=(-2, -1)).astype(np.float32)
    images = np.ones((9, 40, 40), dtype=np.complex64)
    settings = Ptycho2DSettings(iterations=2, refine_probe=True, probe_modes=modes)

    def solve():
        solve_ptycho2d(images, counts, data.probe, data.positions_px, data.frame_offset,
                       settings, SerialComm())

    solve()  # compile first: Numba's compiler allocates through Python too
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        solve()
        measured = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    parts = predict_arrays((40, 40, 40), counts.shape[0], 24, 9, "ptycho2d", subpixel=True,
                           modes=modes)
    assert parts["projector"] == 0
    assert abs(parts["solver"] / measured - 1) < 0.25, (format_bytes(parts["solver"]),
                                                        format_bytes(measured))


def test_exp_and_gpu_dry_run_plans(tmp_path, capsys):
    """--model exp plans with the exp coefficients; --gpu reports the solver's arrays as
    GPU memory per rank (numpy-fallback coefficients) and only the input on the host."""
    path = tmp_path / "in.h5"
    assert main(["simulate", "--n", "16", "--nz", "12", "--angles", "4", "--step", "4",
                 "--probe-size", "8", "--fwhm", "3", "--model", "exp", "--max-phase", "6",
                 "-o", str(path)]) == 0
    out = tmp_path / "rec.h5"
    import h5py

    from ptmpi.io.cxi import DATA

    with h5py.File(path, "r") as f:
        frames = int(f[DATA].shape[0])
    shape = (12, 16, 16)
    assert main(["reconstruct", str(path), "-o", str(out), "--model", "exp", "--dry-run"]) == 0
    text = capsys.readouterr().out
    exp = predict_arrays(shape, frames, 8, 4, "apt", model="exp")
    assert f"solver arrays {format_bytes(exp['solver'])}" in text
    assert exp["solver"] > predict_arrays(shape, frames, 8, 4, "apt")["solver"]
    assert main(["reconstruct", str(path), "-o", str(out), "--model", "exp", "--dry-run",
                 "--gpu"]) == 0
    text = capsys.readouterr().out
    device = predict_arrays(shape, frames, 8, 4, "apt", truth=True, compiled=False,
                            model="exp")
    assert (f"GPU memory per rank up to "
            f"{format_bytes(device['solver'] + device['projector'])}") in text
    assert f"input {format_bytes(device['input'])}, plus the process itself" in text
    assert "22 MiB for the first solve" in text  # no compiled kernels on the GPU
    assert not out.exists()


# ---------------------------------------------------------------- bench --to-snr

TO_SNR = BenchCase(n=32, angles=8)


def _first_at(snr, target):
    """The first iteration (counted from 1) whose SNR reaches ``target``."""
    snr = np.asarray(snr)
    return int(np.argmax(snr >= target)) + 1


def test_to_snr_stops_at_the_first_iteration_that_reaches_the_target():
    """Each start stops at the iteration where the same run without the bench first
    reaches the target; a target out of reach is reported as not reached."""
    import dataclasses

    from ptmpi.bench import _local_problem
    from ptmpi.bench.convergence import time_to_snr
    from ptmpi.solvers.admm import SolverSettings, solve
    from ptmpi.solvers.start import two_step_start

    comm = SerialComm()
    result = time_to_snr(TO_SNR, 18.0, ("ones", "two-step"), 2, comm, max_iterations=60)
    problem, volume = _local_problem(TO_SNR, comm, np.complex64)
    problem = dataclasses.replace(problem, truth_volume=volume)
    rows = {row["start"]: row for row in result["starts"]}
    for start in ("ones", "two-step"):
        settings = SolverSettings(iterations=60, tol=0, start=start)
        state = two_step_start(problem, settings, comm)[0] if start == "two-step" else None
        snr = solve(problem, settings, comm, state=state)[0].history["snr_db"]
        row = rows[start]
        assert row["iterations"] == _first_at(snr, 18.0), start
        assert [r["iterations"] for r in row["runs"]] == [row["iterations"]] * 2
        assert row["snr_db"] == pytest.approx(snr[row["iterations"] - 1], abs=1e-9)
        assert row["total_s"] >= row["wall_s"] > 0
    assert rows["two-step"]["start_s"] > 0 and rows["ones"]["start_s"] == 0
    assert rows["two-step"]["iterations"] < rows["ones"]["iterations"]
    far = time_to_snr(TO_SNR, 60.0, ("ones",), 1, comm, max_iterations=3)["starts"][0]
    assert far["iterations"] is None and far["runs"][0]["snr_db"] < 60


def test_bench_to_snr_command_prints_a_table_and_refuses_bad_starts(tmp_path, capsys):
    out = tmp_path / "to-snr.json"
    assert main(["bench", "--to-snr", "18", "--sizes", "32", "--angles", "8", "--repeat",
                 "1", "--starts", "two-step", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "APT to 18 dB" in text and "two-step" in text
    row = json.loads(out.read_text())["to_snr"][0]["starts"][0]
    assert row["start"] == "two-step" and row["iterations"] >= 1
    assert main(["bench", "--to-snr", "18", "--sizes", "32", "--starts", "coarse"]) == 1
    assert "--starts must list some of ones, two-step" in capsys.readouterr().err


@pytest.mark.mpi(ranks=[2], timeout=180, unit="s")
def test_to_snr_on_two_ranks_and_slabs_stops_where_one_rank_does(mpi_ranks):
    from ptmpi.bench.convergence import time_to_snr
    from ptmpi.parallel import MPIComm

    comm = MPIComm()
    serial = time_to_snr(TO_SNR, 18.0, ("ones", "two-step"), 1, SerialComm(),
                         max_iterations=60)
    for slabs in (1, 2):
        result = time_to_snr(TO_SNR, 18.0, ("ones", "two-step"), 1, comm, slabs=slabs,
                             max_iterations=60)
        assert result["ranks"] == 2 and result["slabs"] == slabs
        for row, ref in zip(result["starts"], serial["starts"], strict=True):
            assert row["iterations"] == ref["iterations"], (slabs, row["start"])
            assert row["snr_db"] == pytest.approx(ref["snr_db"], abs=1e-4)
