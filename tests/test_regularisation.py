"""The default TV weight from the data (:mod:`ptmpi.solvers.regularisation`)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from ptmpi.parallel.comm import SerialComm
from ptmpi.sim.presets import SimulationSettings
from ptmpi.sim.simulate import simulate
from ptmpi.solvers.admm import LocalProblem, SolverSettings, resolve, solve
from ptmpi.solvers.regularisation import default_tv_weight


def test_rule_values():
    # noise-free: proportional to L, whatever the diagonal
    weight, reason = default_tv_weight(5e-6, 0.32, 8083.0, 0.0, 45.23)
    assert weight == pytest.approx(5e-6 * 8083) and "noise-free" in reason
    # photon counts: + 0.32 * 0.5 * sqrt(d); the three calibration doses (48x48x32)
    for norm, diag, expected in ((60.62, 0.3392, 0.0935), (606.2, 3.392, 0.2977),
                                 (8083.0, 45.23, 1.116)):
        weight, reason = default_tv_weight(5e-6, 0.32, norm, 0.5, diag)
        assert weight == pytest.approx(expected, rel=2e-3)
        assert "sqrt(d)" in reason and f"{diag:.4g}" in reason
    # a 100x dose (L and d x 100) raises the noise term 10x
    low = default_tv_weight(0.0, 0.32, 50.0, 0.5, 0.1)[0]
    assert default_tv_weight(0.0, 0.32, 5000.0, 0.5, 10.0)[0] == pytest.approx(10 * low)


def test_resolve_stores_the_rule():
    params = resolve(SolverSettings(), 519.3, 0.5, 0.8995)
    assert params["tv_weight"] == pytest.approx(5e-6 * 519.3 + 0.16 * math.sqrt(0.8995))
    assert params["tv_weight_rule"].startswith("photon counts")
    assert params["mean_diagonal_DhD"] == 0.8995
    assert params["r1"] == pytest.approx(params["tv_weight"] / 0.05)
    given = resolve(SolverSettings(tv_weight=0.1), 519.3, 0.5, 0.8995)
    assert given["tv_weight"] == 0.1 and given["tv_weight_rule"] == "set explicitly (--tv-weight)"
    assert resolve(SolverSettings(algorithm="apts"), 519.3, 0.5, 0.9)["tv_weight"] == 0


def test_solve_applies_the_rule_to_its_data():
    """``solve`` measures ``L`` and the mean diagonal of ``D^H D`` from the data and uses
    the rule: on counts 100x brighter both grow 100x and the noise term 10x."""
    params = {}
    for eta in (0.5, 50.0):
        sim = simulate(SimulationSettings(n=16, nz=16, n_angles=3, step=4, probe_size=8,
                                          fwhm=3.0, eta=eta, seed=2))
        problem = LocalProblem(
            volume_shape=sim.volume.shape, theta_local=np.deg2rad(sim.angles_deg),
            f_local=np.fft.ifftshift(sim.counts, axes=(-2, -1)),
            positions_local=sim.positions_px, frame_offset_local=sim.frame_offset,
            probe=sim.probe)
        _, params[eta] = solve(problem, SolverSettings(iterations=1), SerialComm())
    for p in params.values():
        norm, diag = p["norm_DhD"], p["mean_diagonal_DhD"]
        assert 0 < 10 * diag < norm
        assert p["tv_weight"] == pytest.approx(5e-6 * norm + 0.16 * math.sqrt(diag), rel=1e-6)
    low, high = params[0.5], params[50.0]
    assert high["mean_diagonal_DhD"] == pytest.approx(100 * low["mean_diagonal_DhD"], rel=1e-4)
    assert high["norm_DhD"] == pytest.approx(100 * low["norm_DhD"], rel=1e-3)
    noise = [p["tv_weight"] - 5e-6 * p["norm_DhD"] for p in (low, high)]
    assert noise[1] == pytest.approx(10 * noise[0], rel=1e-3)
    # r2 = min(0.1, 20 d / L) follows the shape of D^H D, not the dose
    for p in (low, high):
        assert p["r2"] == pytest.approx(
            min(0.1, 20 * p["mean_diagonal_DhD"] / p["norm_DhD"]), rel=1e-6)
    assert high["r2"] == pytest.approx(low["r2"], rel=1e-3)


def test_resolve_chooses_r2_from_the_operator():
    """``r2 = min(0.1, r2_factor d / L)``: the same at any dose, smaller where ``L / d`` is larger
    (longer rays), an explicit value wins, and the rule is stored."""
    clean = resolve(SolverSettings(), 519.3, 0.0, 0.8995)  # 128^3, step 32, 12 angles
    assert clean["r2"] == pytest.approx(20 * 0.8995 / 519.3) and 0.034 < clean["r2"] < 0.035
    assert clean["r2_rule"].startswith("r2 = min(0.1, 20 d / L)") and "519.3" in clean["r2_rule"]
    bright = resolve(SolverSettings(), 100 * 519.3, 0.5, 100 * 0.8995)
    assert bright["r2"] == pytest.approx(clean["r2"])
    assert resolve(SolverSettings(), 270.0, 0.0, 0.925)["r2"] == pytest.approx(0.0685, abs=1e-4)
    assert resolve(SolverSettings(), 109.2, 0.0, 0.9295)["r2"] == 0.1  # 32^3: the paper's
    assert resolve(SolverSettings(r2_factor=10), 519.3, 0.0, 0.8995)["r2"] == pytest.approx(
        clean["r2"] / 2)
    given = resolve(SolverSettings(r2=0.1), 519.3, 0.0, 0.8995)
    assert given["r2"] == 0.1 and given["r2_rule"] == "set explicitly (--r2)"
    with pytest.raises(ValueError, match="mean diagonal"):
        resolve(SolverSettings(), 519.3, 0.0, None)


def test_the_r2_rule_is_bounded_by_the_ray_length():
    """``r2 <= r2_ray_factor / n`` (``n`` the volume's lateral size): it leaves the paper's
    grids at their ``20 d / L`` (128^3 step 32, and 64^3 step 16: the values the rule gave
    before the bound) and lowers the ``r2`` of scans with a smaller ``L / d`` (the 128^3
    overlapping-probe geometry, FWHM 32: ``L / d`` 243.4); small volumes keep the cap."""
    grid = resolve(SolverSettings(), 519.3, 0.0, 0.8995, width=128)
    assert grid["r2"] == pytest.approx(20 * 0.8995 / 519.3, rel=1e-12)
    assert grid["r2_rule"].startswith("r2 = min(0.1, 20 d / L, 4.8 / n)")
    assert "n = 128" in grid["r2_rule"]
    assert resolve(SolverSettings(), 270.0, 0.0, 0.925, width=64)["r2"] == pytest.approx(
        20 * 0.925 / 270.0, rel=1e-12)
    overlapping = resolve(SolverSettings(), 1095.0, 0.0, 4.499, width=128)
    assert overlapping["r2"] == pytest.approx(4.8 / 128) and 20 * 4.499 / 1095.0 > 0.08
    assert resolve(SolverSettings(), 109.2, 0.0, 0.9295, width=32)["r2"] == 0.1
    free = resolve(SolverSettings(r2_ray_factor=0), 1095.0, 0.0, 4.499, width=128)
    assert free["r2"] == pytest.approx(20 * 4.499 / 1095.0) and "/ n" not in free["r2_rule"]


def test_tv_continuation_is_chosen_for_noise_free_data_with_the_default_weight():
    """Noise-free data with the default TV weight get the continuation, down to
    ``max(0.1 tv_weight, 1e-3 d)``; photon counts, an explicit weight, APTs and ``off`` do
    not; ``on`` forces it."""
    clean = resolve(SolverSettings(), 519.3, 0.0, 0.8995, width=128)  # 128^3, step 32
    assert clean["tv_continuation_start"] == SolverSettings().tv_continuation_start
    assert clean["tv_continuation_rate"] == SolverSettings().tv_continuation_rate
    # down to 1e-3 d (a third of the weight here), not to a tenth of it
    assert clean["tv_continuation_min"] == pytest.approx(1e-3 * 0.8995, rel=1e-12)
    assert clean["tv_continuation_min"] > 0.1 * clean["tv_weight"]
    assert "noise-free" in clean["tv_continuation"]
    assert "= 0.0008995 (" in clean["tv_continuation"]
    # the floor is reached at iteration 100 + ceil(log(0.3464) / log(0.99)) = 206; r2
    # adapts from the later of that and half the budget
    assert clean["r2_adapt_from"] == 500 and "r2 adapted from iteration 500" in clean[
        "tv_continuation"]
    assert resolve(SolverSettings(iterations=200), 519.3, 0.0, 0.8995)["r2_adapt_from"] == 206
    # where the weight is below 1e-3 d already (32^3 demo: L / d 118), it stays
    assert "tv_continuation_start" not in resolve(SolverSettings(), 109.2, 0.0, 0.9295)
    tenth = resolve(SolverSettings(tv_continuation_voxel=0), 519.3, 0.0, 0.8995)
    assert tenth["tv_continuation_min"] == pytest.approx(0.1 * tenth["tv_weight"])
    for settings, noise in ((SolverSettings(), 0.5), (SolverSettings(tv_weight=0.01), 0.0),
                            (SolverSettings(algorithm="apts"), 0.0),
                            (SolverSettings(tv_continuation="off"), 0.0)):
        assert "tv_continuation_start" not in resolve(settings, 519.3, noise, 0.8995)
    forced = resolve(SolverSettings(tv_continuation="on", tv_weight=0.01), 519.3, 0.5, 0.9)
    assert forced["tv_continuation_rate"] == SolverSettings().tv_continuation_rate
    with pytest.raises(ValueError, match="tv_continuation"):
        SolverSettings(tv_continuation="yes")
    with pytest.raises(ValueError, match="rate"):
        SolverSettings(tv_continuation_rate=1.5)


def test_noise_free_apt_without_a_continuation_settles_too():
    """Noise-free APT without the continuation (its floor at or above the weight, as on
    the 32^3 demo, or a weight given) adapts r2 from the later of half the budget and
    where a continuation would reach its floor (100 + ceil(log 0.1 / log 0.99) = 330);
    photon counts (always adaptive) and APTs get no such iteration."""
    demo = resolve(SolverSettings(), 109.2, 0.0, 0.9295, width=32)
    assert "tv_continuation_start" not in demo
    assert demo["r2_adapt_from"] == 500 and "500" in demo["r2_settling"]
    assert resolve(SolverSettings(iterations=200), 109.2, 0.0, 0.9295)["r2_adapt_from"] == 330
    given = resolve(SolverSettings(tv_weight=0.01, iterations=2000), 519.3, 0.0, 0.8995)
    assert given["r2_adapt_from"] == 1000
    assert "r2_adapt_from" not in resolve(SolverSettings(), 109.2, 0.5, 0.9295)
    assert "r2_adapt_from" not in resolve(SolverSettings(algorithm="apts"), 109.2, 0.0, 0.9295)
    with_continuation = resolve(SolverSettings(), 519.3, 0.0, 0.8995, width=128)
    assert "r2_settling" not in with_continuation  # its own rule, in tv_continuation


def test_tv_weight_schedule():
    """``tv_weight * max(floor, rate^(k - start))`` past ``start``, counted from the last
    restart of ``--align``; unchanged without a continuation."""
    from ptmpi.solvers.admm import tv_weight_at

    params = {"tv_weight": 2.0, "tv_continuation_start": 10, "tv_continuation_rate": 0.5,
              "tv_continuation_min": 0.2}
    assert [tv_weight_at(params, k) for k in (0, 10, 11, 12, 13, 14, 100)] == [
        2.0, 2.0, 1.0, 0.5, 0.25, 0.2, 0.2]
    assert tv_weight_at({**params, "align_restart_at": 30}, 42) == 0.5
    assert tv_weight_at({"tv_weight": 2.0}, 1000) == 2.0


def test_settling_phase():
    """r2 adapts from ``r2_adapt_from`` on (after the last ``--align`` restart), never
    without a continuation."""
    from ptmpi.solvers.admm import settling

    params = {"r2_adapt_from": 300}
    assert [settling(params, k) for k in (0, 299, 300, 600)] == [False, False, True, True]
    assert not settling({**params, "align_restart_at": 50}, 349)
    assert settling({**params, "align_restart_at": 50}, 350)
    assert not settling({}, 10**6)


def _noise_free_problem():
    sim = simulate(SimulationSettings(n=16, nz=16, n_angles=4, step=4, probe_size=8,
                                      fwhm=3.0, eta=None, seed=2))
    return LocalProblem(
        volume_shape=sim.volume.shape, theta_local=np.deg2rad(sim.angles_deg),
        f_local=np.fft.ifftshift(sim.counts, axes=(-2, -1)),
        positions_local=sim.positions_px, frame_offset_local=sim.frame_offset,
        probe=sim.probe, truth_volume=sim.volume)


def test_solve_follows_the_tv_schedule_and_resumes_it_exactly():
    """The weight of every iteration is stored in the history and follows the schedule;
    the objective uses it; a run resumed inside the schedule continues the uninterrupted
    one bit for bit; ``off`` keeps the weight."""
    import copy

    problem = _noise_free_problem()
    settings = SolverSettings(iterations=12, tol=0, tv_continuation_start=4,
                              tv_continuation_rate=0.8, tv_continuation_floor=0.3,
                              tv_continuation_voxel=0.0)
    state, params = solve(problem, settings, SerialComm(), dtype=np.complex128)
    weights = state.history["tv_weight"]
    expected = [params["tv_weight"] * max(0.3, 0.8 ** (k - 4)) if k > 4 else
                params["tv_weight"] for k in range(12)]
    assert weights == pytest.approx(expected, rel=1e-12)
    assert weights[-1] == pytest.approx(0.3 * params["tv_weight"])
    half, _ = solve(problem, dataclasses.replace(settings, iterations=6), SerialComm(),
                    dtype=np.complex128)
    resumed, _ = solve(problem, settings, SerialComm(), dtype=np.complex128,
                       state=copy.deepcopy(half))
    assert np.array_equal(resumed.u, state.u)
    assert resumed.history["tv_weight"] == weights
    fixed, fixed_params = solve(problem, dataclasses.replace(settings, tv_continuation="off"),
                                SerialComm(), dtype=np.complex128)
    assert "tv_continuation" not in fixed_params
    assert fixed.history["tv_weight"] == [fixed_params["tv_weight"]] * 12
    assert not np.array_equal(fixed.u, state.u)


def test_noise_free_runs_adapt_r2_once_the_weight_has_settled():
    """From ``r2_adapt_from`` (the later of the floor of the weight and half the budget)
    ``r2`` adapts as on photon counts: on this small noise-free case the steps alternate
    after it and ``r2`` is raised (measured: at iterations 53 and 73); never before it,
    and never with ``--adapt-r2 off``."""
    sim = simulate(SimulationSettings(n=24, nz=24, n_angles=6, step=6, probe_size=12,
                                      fwhm=2.6, eta=None, seed=0))
    problem = LocalProblem(
        volume_shape=sim.volume.shape, theta_local=np.deg2rad(sim.angles_deg),
        f_local=np.fft.ifftshift(sim.counts, axes=(-2, -1)), positions_local=sim.positions_px,
        frame_offset_local=sim.frame_offset, probe=sim.probe)
    settings = SolverSettings(iterations=80, tol=0, tv_continuation_start=4,
                              tv_continuation_rate=0.8, tv_continuation_voxel=0.0)
    state, params = solve(problem, settings, SerialComm(), dtype=np.complex128)
    assert params["r2_adapt_from"] == 40  # the floor (0.1x) at 4 + 11 = 15, half of 80
    r2 = state.history["r2"]
    assert r2[:40] == [params["r2"]] * 40
    assert r2[-1] >= 2 * params["r2"]
    fixed, _ = solve(problem, dataclasses.replace(settings, adapt_r2=False), SerialComm(),
                     dtype=np.complex128)
    assert fixed.history["r2"] == [params["r2"]] * 80
