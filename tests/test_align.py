"""Per-angle shifts (``--align``, :mod:`ptmpi.solvers.align`): derivatives, recovery,
the unobservable translations, the joint loops, checkpoints and the command line."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest

from ptmpi.cli import main
from ptmpi.io.checkpoint import read_checkpoint, write_checkpoint
from ptmpi.io.cxi import write_input
from ptmpi.metrics import snr_db
from ptmpi.operators.fft import fft2
from ptmpi.operators.model import JointModel
from ptmpi.parallel import SerialComm
from ptmpi.sim.presets import SimulationSettings
from ptmpi.sim.simulate import simulate
from ptmpi.solvers.admm import LocalProblem, SolverSettings, solve
from ptmpi.solvers.admm_exp import ExpSolverSettings, solve_exp
from ptmpi.solvers.align import (
    amplitude_objective,
    gauss_newton_shifts,
    iteration_cap,
    moved_frames,
    remove_unobservable,
    shift_objective,
    shift_precision,
    translate_volume,
    unobservable_part,
    volume_translation,
)

NZ, N, M, N_ANGLES = 16, 24, 8, 8


def drift_settings(drift: float, model: str = "linear", eta=None) -> SimulationSettings:
    return SimulationSettings(n=N, nz=NZ, n_angles=N_ANGLES, step=4, probe_size=M, fwhm=3.0,
                              eta=eta, seed=3, jitter=0.3, drift=drift, model=model)


def local_problem(data, a0: int = 0, a1: int = N_ANGLES) -> LocalProblem:
    f0, f1 = int(data.frame_offset[a0]), int(data.frame_offset[a1])
    return LocalProblem(
        volume_shape=data.volume.shape, theta_local=np.deg2rad(data.angles_deg[a0:a1]),
        f_local=np.fft.ifftshift(data.counts[f0:f1], axes=(-2, -1)),
        positions_local=data.positions_px[f0:f1],
        frame_offset_local=data.frame_offset[a0:a1 + 1] - f0, probe=data.probe,
        truth_volume=data.volume)


def gauge_free_error(shifts, truth, theta) -> float:
    """RMS error (px) of ``shifts`` after removing the unobservable translations."""
    err = remove_unobservable(shifts, theta) - remove_unobservable(truth, theta)
    return float(np.sqrt(np.mean(err**2)))


@pytest.fixture(scope="module")
def linear_drift():
    return simulate(drift_settings(1.5))


# ----------------------------------------------------------------- derivatives


@pytest.mark.parametrize("which", ["split", "amplitude"])
def test_shift_gradient_matches_finite_differences(linear_drift, which):
    """Gradient of the data term with respect to each angle's shift, against central
    differences (complex128; positions with fractions away from whole pixels)."""
    data = linear_drift
    p = local_problem(data)
    model = JointModel(p.volume_shape, p.theta_local, p.probe.astype(np.complex128),
                       p.positions_local, p.frame_offset_local, dtype=np.complex128)
    rng = np.random.default_rng(1)
    images = model.projector.fwd(data.volume.astype(np.complex128))
    frames = model.ptycho.data_shape
    targets = (rng.standard_normal(frames) + 1j * rng.standard_normal(frames)) * 0.5
    sqrt_f = np.sqrt(np.abs(p.f_local.astype(np.float64)))
    d = rng.uniform(-0.04, 0.04, size=(N_ANGLES, 2))

    def value(dd):
        if which == "split":
            return shift_objective(images, targets, model.ptycho, dd, gradient=False)
        return amplitude_objective(images, model.ptycho, dd, sqrt_f, gradient=False)

    if which == "split":
        phi, grad, hessian = shift_objective(images, targets, model.ptycho, d)
    else:
        phi, grad, hessian = amplitude_objective(images, model.ptycho, d, sqrt_f)
    check_shift_derivatives(value, d, phi, grad, hessian)


def check_shift_derivatives(value, d, phi, grad, hessian):
    """``phi``, ``grad`` of the per-angle objective ``value`` at ``d`` against its value
    and central differences; the Gauss-Newton matrices symmetric positive semi-definite."""
    assert np.allclose(phi, value(d), rtol=1e-12)
    eps = 1e-5
    for k in (0, 1):
        step = np.zeros_like(d)
        step[:, k] = eps
        fd = (value(d + step) - value(d - step)) / (2 * eps)
        assert np.max(np.abs(fd - grad[:, k])) < 1e-5 * np.max(np.abs(grad)), k
    assert np.all(np.linalg.eigvalsh(hessian) > -1e-9 * np.abs(hessian).max())


def test_shift_gradient_with_probe_modes_matches_finite_differences(linear_drift):
    """The amplitude misfit of the modes' model ``sqrt(sum_k |D_k|^2)``: its gradient
    with respect to each angle's shift against central differences (complex128)."""
    from ptmpi.operators.modes import initial_modes

    data = linear_drift
    p = local_problem(data)
    modes = initial_modes(p.probe.astype(np.complex128), 3, power=0.2)
    model = JointModel(p.volume_shape, p.theta_local, modes, p.positions_local,
                       p.frame_offset_local, dtype=np.complex128)
    images = model.projector.fwd(data.volume.astype(np.complex128))
    sqrt_f = np.sqrt(np.abs(p.f_local.astype(np.float64)))
    d = np.random.default_rng(2).uniform(-0.04, 0.04, size=(N_ANGLES, 2))

    def value(dd):
        return amplitude_objective(images, model.ptycho, dd, sqrt_f, gradient=False)

    phi, grad, hessian = amplitude_objective(images, model.ptycho, d, sqrt_f)
    single = amplitude_objective(images, JointModel(
        p.volume_shape, p.theta_local, modes[0], p.positions_local, p.frame_offset_local,
        dtype=np.complex128).ptycho, d, sqrt_f, gradient=False)
    assert not np.allclose(phi, single, rtol=1e-3)  # the other modes take part
    check_shift_derivatives(value, d, phi, grad, hessian)


def test_rephasing_moves_every_mode_alike():
    """Per-mode far fields ``(K, N_FRAMES, M, M)`` are rephased frame by frame, each mode
    as a single-mode array would be."""
    from ptmpi.solvers.align import rephase_far_fields

    rng = np.random.default_rng(5)
    fields = rng.standard_normal((3, 4, 6, 6)) + 1j * rng.standard_normal((3, 4, 6, 6))
    before = fields.copy()
    old = np.array([[1.2, 3.0], [2.5, 0.25], [4.0, 4.0], [0.7, 1.9]])
    new = old + np.array([[0.3, -0.2], [0.0, 0.0], [0.5, 0.5], [-0.4, 0.1]])
    each = [fields[k].copy() for k in range(3)]
    for x in each:
        rephase_far_fields([x], old, new)
    rephase_far_fields([fields], old, new)
    assert np.allclose(fields, np.stack(each), rtol=0, atol=1e-14)
    assert np.array_equal(fields[:, 1], before[:, 1])  # a frame that did not move
    assert not np.allclose(fields[:, 0], before[:, 0])


def _mixed_state(data, model_class, power: float = 0.25):
    """Counts of ``data``'s volume at the true (drifted) positions, measured with two
    incoherent modes: the probe and the probe times a vertical Hermite pattern carrying
    ``power`` of the total."""
    from ptmpi.operators.modes import hermite_patterns, intensity

    theta = np.deg2rad(data.angles_deg)
    angle = np.repeat(np.arange(N_ANGLES), np.diff(data.frame_offset))
    probe = data.probe.astype(np.complex128)
    second = probe * hermite_patterns(probe, 2)[1]
    second *= np.sqrt(power / (1 - power) * np.vdot(probe, probe).real
                      / np.vdot(second, second).real)
    model = model_class(data.volume.shape, theta, np.stack([probe, second]),
                        data.positions_px + data.shifts_px[angle], data.frame_offset,
                        dtype=np.complex128)
    return intensity(model.fwd(data.volume.astype(np.complex128)))


@pytest.mark.parametrize("model", ["linear", "exp"])
def test_align_with_probe_modes_recovers_the_drift_of_mixed_state_data(model):
    """Drifted data measured with two incoherent modes: ``--align`` with refined modes
    recovers the shifts far better than with one probe, and the volume with them."""
    from ptmpi.operators.transmission import ExpModel

    settings = drift_settings(1.5, model=model)
    if model == "exp":  # a thinner sample than the default 3 pi: its modes are found
        settings = dataclasses.replace(settings, max_phase=2.0)
    data = simulate(settings)
    f = _mixed_state(data, ExpModel if model == "exp" else JointModel)
    theta = np.deg2rad(data.angles_deg)
    out = {}
    for k in (1, 3):
        problem = local_problem(data)
        problem.f_local = f
        fields = dict(iterations=60, tol=0, align=True, align_start=2, align_every=3,
                      refine_probe=True, probe_modes=k)
        if model == "exp":
            state, _ = solve_exp(problem, ExpSolverSettings(**fields), SerialComm(),
                                 dtype=np.complex128)
        else:
            state, _ = solve(problem, SolverSettings(**fields), SerialComm(),
                             dtype=np.complex128)
        out[k] = (gauge_free_error(state.shifts_local, data.shifts_px, theta),
                  state.history["snr_db"][-1], state.history["r_factor"][-1])
    # measured (shift error px, SNR dB, R): linear 0.334 / -5.45 / 0.106 with one probe,
    # 0.054 / 5.58 / 0.010 with 3 modes; exp 0.211 / 7.07 / 0.153 and 0.067 / 19.10 / 0.105
    assert out[3][0] < 0.1 and out[1][0] > 2 * out[3][0]
    assert out[3][1] > out[1][1] + 8.0
    assert out[3][2] < out[1][2]


def test_gauss_newton_recovers_shifts_from_the_true_volume(linear_drift):
    """With the true volume, a few updates of the Gauss-Newton step recover the drift."""
    data = linear_drift
    p = local_problem(data)
    angle = np.repeat(np.arange(N_ANGLES), np.diff(p.frame_offset_local))
    shifts = np.zeros((N_ANGLES, 2))
    images = None
    for _ in range(4):
        model = JointModel(p.volume_shape, p.theta_local, p.probe, p.positions_local
                           + shifts[angle], p.frame_offset_local)
        images = model.projector.fwd(data.volume) if images is None else images
        d, _ = gauss_newton_shifts(images, model.ptycho, np.sqrt(p.f_local), None, 3, 1.0)
        shifts += d
    assert np.sqrt(np.mean((shifts - data.shifts_px) ** 2)) < 0.02


@pytest.mark.parametrize("noise", ["poisson", "gaussian"])
def test_shift_precision_is_the_spread_of_shift_estimates(linear_drift, noise):
    """The Cramer-Rao standard errors of the shifts are the spread of the Gauss-Newton
    estimates from the true volume over 100 noise draws of the same data (Poisson counts
    of about 140 photons per median pixel, or Gaussian amplitude noise of 0.5, whose
    variance the bound takes from the residual of the data it is given)."""
    data = linear_drift
    p = local_problem(data, 0, 2)
    angle = np.repeat(np.arange(2), np.diff(p.frame_offset_local))
    model = JointModel(p.volume_shape, p.theta_local, p.probe * 10.0,
                       p.positions_local + data.shifts_px[:2][angle], p.frame_offset_local)
    images = model.projector.fwd(data.volume)
    amplitude = np.abs(fft2(moved_frames(images, model.ptycho, np.zeros((2, 2)))[0]))
    rng = np.random.default_rng(0)

    def draw():
        if noise == "poisson":
            return np.sqrt(rng.poisson(amplitude**2).astype(np.float64))
        return amplitude + 0.5 * rng.standard_normal(amplitude.shape)

    if noise == "poisson":
        bound = shift_precision(images, model.ptycho, amplitude, None, counts=True)
    else:
        bound = shift_precision(images, model.ptycho, draw(), None, counts=False)
    estimates = np.array([gauss_newton_shifts(images, model.ptycho, draw(), None, 4, 1.0)[0]
                          for _ in range(100)])
    ratio = estimates.std(axis=0) / bound
    assert np.all(bound > 0) and np.all(bound < 0.01)
    assert np.all((ratio > 0.8) & (ratio < 1.25)), ratio
    # the bound is the precision of a fit to the model: a perfect fit (noise-free data,
    # zero residual) has none to speak of, and no information gives inf
    assert np.all(shift_precision(images, model.ptycho, amplitude, None, counts=False) < 1e-4)
    assert np.all(np.isinf(shift_precision(images * 0, model.ptycho, amplitude, None)))


def _aligner_near_truth(data, wrong: int, error: float):
    """An :class:`Aligner` after its settled restart at iteration 10, with every shift
    true but angle ``wrong``'s column off by ``error`` px; the reprojections of the true
    volume at those positions and the frames there."""
    import types

    import ptmpi.solvers.align as align

    p = local_problem(data)
    aligner = align.Aligner(align.AlignSettings(outlier_factor=10.0, outlier_after=5,
                                                leave_out_iterations=7, budget=40),
                            p.theta_local, p.positions_local, p.frame_offset_local,
                            (NZ, N), M, SerialComm())
    shifts = np.array(data.shifts_px, dtype=np.float64)
    shifts[wrong, 1] += error
    state = types.SimpleNamespace(
        shifts_local=shifts, iteration=16,
        params={"align_restarted": True, "align_restart_at": 10},
        history={"r_factor": [0.1]}, z_local=np.zeros((p.f_local.shape[0], M, M), complex),
        lam2_local=np.zeros((p.f_local.shape[0], M, M), complex))
    aligner.attach(state, lambda positions: None)
    model = JointModel(p.volume_shape, p.theta_local, p.probe,
                       aligner.positions(shifts), p.frame_offset_local, dtype=np.complex128)
    return aligner, state, model.projector.fwd(data.volume), model.ptycho, np.sqrt(p.f_local)


def test_an_outlying_angle_is_left_out_and_refitted(linear_drift):
    """Leave-one-out re-fit (align.py): an angle whose misfit per count is far above the
    median angle's is flagged once, ``outlier_after`` iterations after the settled
    restart, for a volume built without its frames; the re-fit then moves its shift
    alone, to the one of the volume given, and sets the restart, the budget and the
    hold."""
    data = linear_drift
    aligner, state, images, ptycho, sqrt_f = _aligner_near_truth(data, wrong=3, error=0.4)
    misfit = amplitude_objective(images, ptycho, np.zeros((N_ANGLES, 2)), sqrt_f,
                                 gradient=False)
    # too early (less than outlier_after = 5 iterations after the restart at 10): nothing
    aligner._check_outliers(state, misfit, sqrt_f, None, ptycho, 14)
    assert "align_leave_out" not in state.params and aligner.leave_out is None
    aligner._check_outliers(state, misfit, sqrt_f, None, ptycho, 16)
    params = state.params
    assert params["align_leave_out"] == [3] and aligner.leave_out == [3]
    assert not aligner.restart  # the run's own state stays until the re-fit
    per_count = np.array(params["align_outlier_misfit"])
    assert per_count[3] > 10 * np.median(per_count)
    assert params["align_leave_out_at"] == 16 and params["align_restart_at"] == 10
    assert params["align_leave_out_r"] == 0.1
    assert np.array_equal(aligner.left_out_frames(params), aligner.angle == 3)
    before = np.array(state.shifts_local)
    aligner.refit(state, images, ptycho, sqrt_f, None, 16)
    after = np.asarray(state.shifts_local)
    assert np.array_equal(np.delete(after, 3, axis=0), np.delete(before, 3, axis=0))
    assert np.max(np.abs(after[3] - data.shifts_px[3])) < 0.01, after[3] - data.shifts_px[3]
    assert params["align_refit_moved"] == pytest.approx(0.4, abs=0.01)
    assert aligner.restart and aligner.leave_out is None
    assert params["align_refit_at"] == params["align_restart_at"] == 16
    assert params["align_hold_r"] == 0.1 and params["align_hold_until"] == 16 + 20
    assert iteration_cap(40, params) == 56
    # checked once: a later update flags nothing more
    aligner.restart = False
    aligner._check_outliers(state, misfit, sqrt_f, None, ptycho, 40)
    assert params["align_leave_out"] == [3] and aligner.leave_out is None


def test_a_refit_that_moves_no_shift_confirms_them(linear_drift):
    """A false alarm: the angle flagged is 0.05 px off, within ``confirm_px`` (0.1) of
    where the volume without it puts it, so the shifts, the restart iteration and the
    budget stay as they were and no restart is asked for."""
    data = linear_drift
    aligner, state, images, ptycho, sqrt_f = _aligner_near_truth(data, wrong=3, error=0.05)
    misfit = amplitude_objective(images, ptycho, np.zeros((N_ANGLES, 2)), sqrt_f,
                                 gradient=False)
    aligner._check_outliers(state, misfit, sqrt_f, None, ptycho, 16)
    assert aligner.leave_out == [3]
    before = np.array(state.shifts_local)
    positions = aligner.refit(state, images, ptycho, sqrt_f, None, 16)
    params = state.params
    assert np.array_equal(state.shifts_local, before)
    assert np.array_equal(positions, aligner.positions(before))
    assert params["align_refit_moved"] == pytest.approx(0.05, abs=0.01)
    assert not aligner.restart and params["align_refit_at"] == 16
    assert params["align_restart_at"] == 10 and iteration_cap(40, params) == 50
    assert "align_hold_r" not in params


def test_no_angle_is_left_out_when_the_misfits_are_alike(linear_drift):
    """Every angle 0.05 px off, the median misfit per count is like each angle's: the
    check records that it ran and leaves nothing out; a factor 0 never checks."""
    import ptmpi.solvers.align as align

    data = linear_drift
    aligner, state, images, ptycho, sqrt_f = _aligner_near_truth(data, wrong=3, error=0.0)
    d = np.full((N_ANGLES, 2), 0.05)
    misfit = amplitude_objective(images, ptycho, d, sqrt_f, gradient=False)
    aligner._check_outliers(state, misfit, sqrt_f, None, ptycho, 16)
    assert state.params["align_leave_out"] == [] and aligner.leave_out is None
    off = align.Aligner(dataclasses.replace(aligner.settings, outlier_factor=0.0),
                        aligner.theta_global, aligner.recorded, aligner.frame_offset,
                        (NZ, N), M, SerialComm())
    state.params = {"align_restarted": True, "align_restart_at": 10}
    off.attach(state, lambda positions: None)
    off._check_outliers(state, misfit * 0 + np.eye(N_ANGLES)[3], sqrt_f, None, ptycho, 16)
    assert "align_leave_out" not in state.params
    # nor where the volume without the angle would take longer than the whole run
    short = align.Aligner(dataclasses.replace(aligner.settings, budget=7),
                          aligner.theta_global, aligner.recorded, aligner.frame_offset,
                          (NZ, N), M, SerialComm())
    short.attach(state, lambda positions: None)
    short._check_outliers(state, misfit * 0 + np.eye(N_ANGLES)[3], sqrt_f, None, ptycho, 16)
    assert "align_leave_out" not in state.params
    aligner._check_outliers(state, misfit * 0 + np.eye(N_ANGLES)[3], sqrt_f, None, ptycho, 16)
    assert state.params["align_leave_out"] == [3]  # the same check with the budget of 40


LEAVE_OUT = dict(align_outlier_factor=1.0, align_outlier_after=6,
                 align_leave_out_iterations=5)
"""Small thresholds so that the leave-out happens on this case: every angle above the
median is "outlying"."""


def test_the_leave_out_in_the_solver(linear_drift):
    """In the solver: the check comes once, ``align_outlier_after`` iterations past the
    settled restart; the volume without the angles is built aside (no iteration of the
    run's own); with ``align_confirm_px`` 0 the re-fit restarts the run from ``u = 1``,
    which gets the whole budget."""
    state, _ = run_linear(linear_drift, True, iterations=40, align_confirm_px=0.0,
                          **LEAVE_OUT)
    params = state.params
    at = params["align_leave_out_at"]
    assert params["align_leave_out"], params.get("align_outlier_misfit")
    assert params["align_refit_at"] == params["align_restart_at"] == at
    assert params["align_refit_moved"] > 0
    assert state.iteration == 40 + at
    assert state.history["iteration"] == list(range(1, 41 + at))
    r = state.history["r_factor"]
    assert r[at] > 2 * r[at - 1]  # the restart from u = 1
    snr = snr_db(state.u, linear_drift.volume)
    plain, _ = run_linear(linear_drift, True, iterations=40, align_outlier_factor=0.0)
    assert "align_leave_out" not in plain.params
    assert snr > snr_db(plain.u, linear_drift.volume) - 1.0


def test_a_false_alarm_leaves_the_run_as_it_was(linear_drift):
    """Where the re-fit moves no shift by more than ``align_confirm_px`` (here 10 px, so
    always), the run is the one without the check, bit for bit."""
    confirmed, _ = run_linear(linear_drift, True, iterations=40, align_confirm_px=10.0,
                              **LEAVE_OUT)
    plain, _ = run_linear(linear_drift, True, iterations=40, align_outlier_factor=0.0)
    assert confirmed.params["align_leave_out"]
    assert confirmed.params["align_refit_at"] == confirmed.params["align_leave_out_at"]
    assert confirmed.params["align_restart_at"] == plain.params["align_restart_at"]
    assert np.array_equal(confirmed.u, plain.u)
    assert np.array_equal(confirmed.shifts_local, plain.shifts_local)
    assert confirmed.history["r_factor"] == plain.history["r_factor"]


def test_a_resume_around_the_leave_out_continues_the_run(linear_drift, tmp_path):
    """Checkpoints written just before the check and just after the re-fit resume to the
    uninterrupted run, bit for bit (the volume without the angles is built again from
    the same state); a checkpoint of the previous release inside its leave-out phase
    (angles flagged, no re-fit yet) is re-fitted at once."""
    extra = dict(align_confirm_px=0.0, **LEAVE_OUT)
    full, _ = run_linear(linear_drift, True, iterations=40, **extra)
    at = full.params["align_leave_out_at"]
    kept = {}

    def keep(state, row):
        if state.iteration in (at - 1, at + 2):
            kept[state.iteration] = dataclasses.replace(
                state, u=state.u.copy(), z_local=state.z_local.copy(),
                lam2_local=state.lam2_local.copy(), p=state.p.copy(),
                lam1=state.lam1.copy(), step=state.step.copy(),
                shifts_local=np.array(state.shifts_local), params=dict(state.params),
                history={k: list(v) for k, v in state.history.items()})

    settings = SolverSettings(iterations=40, tol=0, align=True, align_start=2,
                              align_every=3, **extra)
    solve(local_problem(linear_drift), settings, SerialComm(), dtype=np.complex128,
          callback=keep)
    n_frames = int(linear_drift.frame_offset[-1])
    for stop in (at - 1, at + 2):
        path = tmp_path / f"ck{stop}.h5"
        write_checkpoint(path, kept[stop], SerialComm(), settings=settings.to_dict(),
                         dtype=np.complex128, input_checksum="x", frame_start=0,
                         n_frames=n_frames, angle_start=0, n_angles=N_ANGLES)
        back = read_checkpoint(path, 0, n_frames, angle_start=0, angle_stop=N_ANGLES)
        resumed, _ = solve(local_problem(linear_drift), settings, SerialComm(),
                           dtype=np.complex128, state=back)
        assert resumed.params["align_refit_at"] == at, stop
        assert np.array_equal(resumed.shifts_local, full.shifts_local), stop
        assert np.array_equal(resumed.u, full.u), stop
        assert resumed.history["r_factor"] == full.history["r_factor"], stop
    old = kept[at - 1]
    old.params.update(align_leave_out=[0], align_leave_out_at=at - 3,
                      align_leave_out_until=at + 2, align_leave_out_r=1.0)
    resumed, _ = solve(local_problem(linear_drift), settings, SerialComm(),
                       dtype=np.complex128, state=old)
    assert resumed.params["align_refit_at"] == at - 1


def test_rephased_far_fields_follow_the_moved_frames():
    """Frames moved by d (the image left in place) equal, in the far field, the frames at
    the old positions of the image moved by -d, times the ramp of the change of their
    sub-pixel fractions (the probe-shift convention of the sub-pixel model)."""
    from ptmpi.operators.fft import fft2
    from ptmpi.operators.ptycho import Ptycho
    from ptmpi.solvers.align import rephase_far_fields

    m, nz, n = 16, 40, 40
    y, x = np.mgrid[:m, :m]
    probe = np.exp(-((y - 7.5) ** 2 + (x - 7.5) ** 2) / 8.0).astype(np.complex128)

    def image(shift):  # a smooth blob with a phase ramp, seen from (row, col) + shift
        rows, cols = np.mgrid[:nz, :n].astype(float)
        rows, cols = rows + shift[0], cols + shift[1]
        blob = np.exp(-((rows - 20) ** 2 + (cols - 18) ** 2) / 18.0 + 0.3j * cols)
        return blob[None].astype(np.complex128)

    p = np.array([[10.3, 9.6], [12.8, 14.1]])
    d = np.array([0.45, 0.7])
    moved = fft2(Ptycho(probe, p + d, [0, 2], (nz, n)).fwd(image([0, 0])))
    old = fft2(Ptycho(probe, p, [0, 2], (nz, n)).fwd(image(d)))
    assert np.linalg.norm(old - moved) > 0.1 * np.linalg.norm(moved)
    rephase_far_fields([old], p, p + d)
    assert np.linalg.norm(old - moved) < 1e-3 * np.linalg.norm(moved)  # measured 1.3e-4


# ---------------------------------------------------------- unobservable translations


def test_unobservable_translations_are_those_of_a_volume_translation():
    """A volume moved by t projects to images moved by (tz, tx cos + ty sin): such shifts
    are removed entirely, and volume_translation gives back -t."""
    theta = np.deg2rad(np.arange(9) * 20.0)
    t = np.array([0.7, -1.2, 0.4])  # (tz, ty, tx)
    shifts = np.stack([np.full(theta.size, t[0]), t[2] * np.cos(theta)
                       + t[1] * np.sin(theta)], axis=1)
    assert np.allclose(remove_unobservable(shifts, theta), 0, atol=1e-12)
    assert np.allclose(volume_translation(shifts, theta), -t)
    assert np.allclose(unobservable_part(shifts, theta), [t[0], t[2], t[1]])
    other = np.random.default_rng(0).standard_normal((theta.size, 2))
    free = remove_unobservable(other, theta)
    assert np.allclose(unobservable_part(free, theta), 0, atol=1e-12)
    assert np.allclose(remove_unobservable(free + shifts, theta), free)
    # translate_volume is an exact (periodic) Fourier translation
    u = np.random.default_rng(1).standard_normal((6, 8, 8)).astype(np.complex128)
    assert np.allclose(translate_volume(translate_volume(u, t), -t), u)
    assert np.allclose(translate_volume(u, (1, 0, -2)), np.roll(u, (1, -2), axis=(0, 2)))


# ------------------------------------------------------------------- joint loops


def run_linear(data, align: bool, iterations: int = 60, **extra):
    settings = SolverSettings(iterations=iterations, tol=0, align=align, align_start=2,
                              align_every=3, **extra)
    return solve(local_problem(data), settings, SerialComm(), dtype=np.complex128)


@pytest.fixture(scope="module")
def linear_runs(linear_drift):
    return {"align": run_linear(linear_drift, True)[0],
            "plain": run_linear(linear_drift, False)[0]}


def test_linear_apt_recovers_the_drift(linear_drift, linear_runs):
    data, state = linear_drift, linear_runs["align"]
    theta = np.deg2rad(data.angles_deg)
    assert state.shifts_local.shape == (N_ANGLES, 2)
    before = gauge_free_error(np.zeros((N_ANGLES, 2)), data.shifts_px, theta)
    after = gauge_free_error(state.shifts_local, data.shifts_px, theta)
    assert before > 0.8 and after < 0.1, (before, after)
    snr_align = snr_db(state.u, data.volume)
    snr_plain = snr_db(linear_runs["plain"].u, data.volume)
    assert snr_align > snr_plain + 3, (snr_align, snr_plain)
    assert linear_runs["plain"].shifts_local is None


def test_the_restart_after_the_shifts_settle_gets_the_whole_budget(linear_runs):
    """After the settled shifts' restart the solve runs ``iterations`` more iterations
    (tol = 0 here), its metrics following on; without ``--align`` the budget is as set."""
    state = linear_runs["align"]
    restart_at = state.params["align_restart_at"]
    assert 2 <= restart_at < 60
    assert state.iteration == 60 + restart_at
    assert state.history["iteration"] == list(range(1, 61 + restart_at))
    assert linear_runs["plain"].iteration == 60
    assert iteration_cap(60, {}) == 60 and iteration_cap(60, {"align_restart_at": 9}) == 69


def test_the_shifts_wait_after_the_restart_until_the_r_factor_is_back(linear_runs):
    """After the settled restart no update runs until the R-factor is back at or below
    its value at the restart (the shifts were settled against that volume), at most for
    half the budget; :func:`held` decides from the state alone."""
    from ptmpi.solvers.align import held

    state = linear_runs["align"]
    params, history = state.params, state.history
    restart_at = params["align_restart_at"]
    iterations = list(history["iteration"])
    r = list(history["r_factor"])
    assert params["align_hold_r"] == r[iterations.index(restart_at)]
    assert params["align_hold_until"] == restart_at + 30  # half of the 60 iterations
    back = next(i for i, value in zip(iterations, r, strict=True)
                if i > restart_at and value <= params["align_hold_r"])
    assert back > restart_at + 1  # the restarted volume starts worse
    for it in range(restart_at + 1, restart_at + 40):  # the history as it stood then
        then = {k: history[k][:iterations.index(it) + 1] for k in ("iteration", "r_factor")}
        assert held(it, params, then) == (it < back and it < restart_at + 30), it
    assert not held(restart_at + 1, {}, history)  # no restart, no hold
    # synthetic: released only by an R at or below the restart's, or by the limit
    hist = {"iteration": [1, 2, 3, 4], "r_factor": [0.5, 0.9, 0.6, 0.5]}
    pars = {"align_restart_at": 1, "align_hold_r": 0.5, "align_hold_until": 10}
    assert held(4, pars, {k: v[:3] for k, v in hist.items()})
    assert not held(5, pars, hist)
    assert not held(10, pars, {k: v[:3] for k, v in hist.items()})


def scripted_restarts(monkeypatch, steps, iterations: int, **settings):
    """Run an :class:`Aligner` of 4 angles whose shift step returns ``steps`` in turn (one
    update per iteration); returns the iterations that restarted and the state."""
    import types

    import ptmpi.solvers.align as align

    aligner = align.Aligner(align.AlignSettings(every=1, start=0, budget=30, **settings),
                            np.linspace(0, np.pi, 4, endpoint=False), np.full((4, 2), 4.0),
                            np.arange(5), (16, 16), 8, SerialComm())
    state = types.SimpleNamespace(shifts_local=None, params={},
                                  z_local=np.zeros((4, 8, 8), complex),
                                  lam2_local=np.zeros((4, 8, 8), complex))
    aligner.attach(state, lambda positions: None)
    steps = iter([np.full((4, 2), step) for step in steps])
    monkeypatch.setattr(align, "gauss_newton_shifts", lambda *a, **k: (next(steps), None))
    monkeypatch.setattr(align, "guarded", lambda ptycho: ptycho)
    restarts = []
    for iteration in range(iterations):
        aligner.update(state, None, None, None, iteration=iteration)
        if aligner.restart:
            restarts.append(iteration)
    return restarts, state


def test_shifts_that_never_settle_restart_after_two_thirds_of_the_budget(monkeypatch):
    """Shifts that moved (0.6 px) and then jitter by 0.1 px per update never settle: the
    restart comes at two thirds of the budget (30 iterations, an update each), not before,
    and only once."""
    restarts, state = scripted_restarts(
        monkeypatch, [0.6] + [(-1) ** k * 0.1 for k in range(40)], 30)
    assert restarts == [20]
    assert state.params["align_restart_at"] == 20
    assert iteration_cap(30, state.params) == 50


def test_a_settled_restart_follows_an_early_one_even_back_near_zero(monkeypatch):
    """Shifts that jump (an early restart), come back near where they started and settle:
    the volume was rebuilt while they moved, so the settled restart still comes, once."""
    restarts, state = scripted_restarts(monkeypatch, [0.6, -0.3, -0.25] + [0.01] * 10, 12,
                                        early_restarts=1)
    assert restarts == [0, 3]  # early (0.6 px), then settled at 0.08 px from the start
    assert state.params["align_early_restarts"] == 1
    assert state.params["align_restart_at"] == 3
    assert np.sqrt(np.mean(np.asarray(state.shifts_local) ** 2)) < 0.5


def test_alignment_does_not_wander_on_drift_free_data():
    data = simulate(drift_settings(0.0))
    state, _ = run_linear(data, True)
    plain, _ = run_linear(data, False)
    assert np.max(np.abs(state.shifts_local)) < 0.2
    assert snr_db(state.u, data.volume) > snr_db(plain.u, data.volume) - 0.2


def test_a_guarded_probe_stays_guarded_through_probe_updates(linear_drift, monkeypatch):
    """``--align`` with a guarded probe (the drift data's) keeps it guarded through every
    probe update: linear model, exp model (its initialisation's per-angle ptychography and
    the joint updates). An unguarded probe is left as it is (its edge is data), and the
    shift step searches on the guarded frames (``align.guarded``) at every update."""
    from ptmpi.operators.ptycho import is_guarded
    from ptmpi.sim.probe import focused_probe
    from ptmpi.solvers import align

    searched = []
    real_gauss_newton = align.gauss_newton_shifts

    def spy(images, ptycho, *args, **kwargs):
        searched.append(is_guarded(ptycho.probe))
        return real_gauss_newton(images, ptycho, *args, **kwargs)

    monkeypatch.setattr(align, "gauss_newton_shifts", spy)
    data = linear_drift
    s = data.settings
    guarded_problem = local_problem(data)
    unguarded = (np.sqrt(s.eta) if s.eta else 1.0) * focused_probe(M, s.fwhm)
    assert is_guarded(guarded_problem.probe) and not is_guarded(unguarded)
    for probe in (guarded_problem.probe, unguarded):
        problem = dataclasses.replace(guarded_problem, probe=probe)
        settings = SolverSettings(iterations=6, tol=0, align=True, align_start=2,
                                  align_every=2, refine_probe=True)
        searched.clear()
        state, _ = solve(problem, settings, SerialComm(), dtype=np.complex128)
        assert is_guarded(state.omega) == is_guarded(probe)
        assert np.linalg.norm(state.omega - probe) > 1e-3 * np.linalg.norm(probe)  # updated
        assert len(searched) == 2 and all(searched)
    exp = simulate(drift_settings(1.5, model="exp"))
    problem = local_problem(exp)
    assert is_guarded(problem.probe)
    settings = ExpSolverSettings(iterations=4, init_iterations=4, init_gn_iterations=2,
                                 align=True, align_start=2, align_every=2,
                                 refine_probe=True, probe_joint=True)
    state, _ = solve_exp(problem, settings, SerialComm(), dtype=np.complex128)
    assert is_guarded(state.omega)
    assert np.linalg.norm(state.omega - problem.probe) > 1e-3 * np.linalg.norm(problem.probe)
    # the per-angle ptychography's guard, with one probe and with probe modes
    from ptmpi.solvers.ptycho2d import Ptycho2DSettings, solve_ptycho2d

    p = local_problem(data)
    images = np.ones((N_ANGLES, NZ, N), dtype=np.complex128)
    for modes in (1, 2):
        settings = Ptycho2DSettings(iterations=3, refine_probe=True, probe_guard=True,
                                    probe_modes=modes)
        out = solve_ptycho2d(images, p.f_local, unguarded, p.positions_local,
                             p.frame_offset_local, settings, SerialComm())
        assert out.omega.shape[-2:] == (M, M) and is_guarded(out.omega)
        assert np.all(np.abs(out.omega[..., :-1, :-1]) > 0)  # the rest is updated


def test_gauge_zero_removes_the_unobservable_translations(linear_drift):
    state, _ = run_linear(linear_drift, True, iterations=12, align_gauge="zero")
    theta = np.deg2rad(linear_drift.angles_deg)
    assert np.max(np.abs(state.shifts_local)) > 0.3
    assert np.max(np.abs(unobservable_part(state.shifts_local, theta))) < 1e-10


def test_a_shift_past_the_limit_stops_with_a_warning(linear_drift, caplog):
    state, _ = run_linear(linear_drift, True, iterations=12, align_max=0.5)
    assert np.max(np.abs(state.shifts_local)) <= 0.5 + 1e-12
    assert "reached its limit" in caplog.text


def test_exp_apt_recovers_the_drift():
    data = simulate(drift_settings(1.5, model="exp"))
    theta = np.deg2rad(data.angles_deg)
    settings = ExpSolverSettings(iterations=40, init_iterations=20, init_gn_iterations=8,
                                 align=True, align_start=2, align_every=3)
    state, _ = solve_exp(local_problem(data), settings, SerialComm(), dtype=np.complex128)
    before = gauge_free_error(np.zeros((N_ANGLES, 2)), data.shifts_px, theta)
    after = gauge_free_error(state.shifts_local, data.shifts_px, theta)
    assert after < 0.3 * before, (before, after)


def test_exp_restarts_refine_the_input_probe_again(monkeypatch):
    """With --refine-probe every exp restart reruns the initialisation from the input
    probe: one refined against the misaligned positions holds their error (spiral scan,
    drift 2, defocus 6 rad: 11.6 dB kept, 25.5 dB from the input, docs/alignment.md)."""
    import ptmpi.solvers.admm_exp as admm_exp

    data = simulate(drift_settings(1.5, model="exp"))
    problem = local_problem(data)
    started_from = []
    original = admm_exp.initial_volume

    def recording(model, problem_now, *args, **kwargs):
        started_from.append(np.array(problem_now.probe, copy=True))
        return original(model, problem_now, *args, **kwargs)

    monkeypatch.setattr(admm_exp, "initial_volume", recording)
    settings = ExpSolverSettings(iterations=40, init_iterations=20, init_gn_iterations=8,
                                 align=True, align_start=2, align_every=3, refine_probe=True)
    state, _ = solve_exp(problem, settings, SerialComm(), dtype=np.complex128)
    assert len(started_from) >= 2  # the first initialisation and at least one restart
    assert not np.allclose(state.omega, problem.probe)  # the probe was refined
    for probe in started_from:
        assert np.array_equal(probe, problem.probe)


def test_the_exp_final_pass_is_a_fresh_run_at_the_shifts_reached():
    """Shifts that moved after the settled restart (by more than ``final_px``) get a final
    pass: the reconstruction restarts from its initial state with them held fixed and the
    whole budget, and that pass is the run without --align from those positions with the
    aligned run's ``r2`` (no iterate, multiplier or penalty raise of the earlier passes
    survives it; its other penalties are those of the positions reached); a resume at its
    start or inside it is the uninterrupted run, bit for bit."""
    import copy

    data = simulate(drift_settings(1.5, model="exp"))
    settings = ExpSolverSettings(iterations=40, init_iterations=20, init_gn_iterations=8,
                                 align=True, align_start=2, align_every=3)
    saved, first = {}, {}

    def keep(state, row):  # what a checkpoint at the end of these iterations holds
        first.setdefault("params", dict(state.params))
        if state.iteration in (66, 80):
            saved[state.iteration] = copy.deepcopy(state)

    aligned, _ = solve_exp(local_problem(data), settings, SerialComm(), dtype=np.complex128,
                           callback=keep)
    final_at = aligned.params["align_final_at"]
    assert final_at == 66  # (the resumes below: at the pass's start and inside it)
    assert aligned.iteration == final_at + 40
    for at, state in saved.items():
        resumed, _ = solve_exp(local_problem(data), settings, SerialComm(),
                               dtype=np.complex128, state=state)
        assert np.array_equal(resumed.u, aligned.u), at
        assert np.array_equal(resumed.shifts_local, aligned.shifts_local), at
    problem = local_problem(data)
    angle = np.repeat(np.arange(N_ANGLES), np.diff(data.frame_offset))
    fixed = dataclasses.replace(
        problem, positions_local=problem.positions_local + aligned.shifts_local[angle])
    fresh, _ = solve_exp(fixed, dataclasses.replace(settings, align=False,
                                                    r2=first["params"]["r2"]),
                         SerialComm(), dtype=np.complex128)
    # the penalties follow the positions (the sub-pixel fractions change the illumination),
    # r2 stays
    assert aligned.params["r2"] == first["params"]["r2"] == fresh.params["r2"]
    assert aligned.params["rho"] != first["params"]["rho"]
    for key in ("rho", "r1", "tv_weight", "tv_texture_cap"):
        assert aligned.params[key] == fresh.params[key], key
    for key in ("r_factor", "snr_db"):
        np.testing.assert_allclose(aligned.history[key][final_at:], fresh.history[key],
                                   rtol=1e-9, err_msg=key)
    np.testing.assert_allclose(aligned.u, fresh.u, rtol=0, atol=1e-9 * np.abs(fresh.u).max())


def test_exp_apt_recovers_a_drift_of_4_px_on_an_overlapping_scan():
    """The acceptance case of the exp model at the demo's size, with a probe that overlaps
    its neighbours (FWHM 8 at step 8; the demo's FWHM 4 barely does, module notes of
    align.py): shifts to 0.1 px on every one of four noise draws, and the SNR within
    1.5 dB of the drift-free data's as the median of the four. (The gap of one draw is
    chaotic: rounding-level changes in CG's sums moved it from 1.44 to 1.55 dB on seed 0
    and from 2.56 to -0.26 dB on seed 2.)"""
    from ptmpi.sim.presets import PRESETS

    gaps = []
    for seed in range(4):
        base = dataclasses.replace(PRESETS["demo"], fwhm=8.0, eta=100.0, model="exp",
                                   seed=seed)
        drifted = simulate(dataclasses.replace(base, drift=4.0))
        clean = simulate(base)
        theta = np.deg2rad(drifted.angles_deg)
        aligned, _ = solve_exp(local_problem(drifted),
                               ExpSolverSettings(iterations=30, align=True), SerialComm())
        reference, _ = solve_exp(local_problem(clean), ExpSolverSettings(iterations=30),
                                 SerialComm())
        before = gauge_free_error(np.zeros((8, 2)), drifted.shifts_px, theta)
        after = gauge_free_error(aligned.shifts_local, drifted.shifts_px, theta)
        assert before > 1.5 and after < 0.1, (seed, before, after)
        gaps.append(reference.history["snr_db"][-1] - aligned.history["snr_db"][-1])
    assert np.median(gaps) < 1.5, gaps


# ------------------------------------------------------------- checkpoint, output


def test_checkpoint_and_resume_keep_the_shifts(linear_drift, tmp_path):
    """6 iterations, a checkpoint, 6 more from it: the uninterrupted run, bit for bit."""
    data = linear_drift
    full, _ = run_linear(data, True, iterations=12)
    half, _ = run_linear(data, True, iterations=6)
    settings = SolverSettings(iterations=12, tol=0, align=True, align_start=2, align_every=3)
    path = tmp_path / "ck.h5"
    write_checkpoint(path, half, SerialComm(), settings=settings.to_dict(),
                     dtype=np.complex128, input_checksum="x", frame_start=0,
                     n_frames=int(data.frame_offset[-1]), angle_start=0, n_angles=N_ANGLES)
    back = read_checkpoint(path, 0, int(data.frame_offset[-1]), angle_start=0,
                           angle_stop=N_ANGLES)
    assert np.array_equal(back.shifts_local, half.shifts_local)
    assert np.any(back.shifts_local != 0)
    resumed, _ = solve(local_problem(data), settings, SerialComm(), dtype=np.complex128,
                       state=back)
    assert np.array_equal(resumed.shifts_local, full.shifts_local)
    assert np.array_equal(resumed.u, full.u)


def test_a_checkpoint_from_the_exp_final_pass_resumes(tmp_path):
    """The final pass takes an exp run past twice its iterations (here 112 of 40): its
    checkpoint resumes, to the same result (the bound of a resumable checkpoint used to be
    twice the iterations)."""
    data, ck = tmp_path / "d.h5", tmp_path / "ck.h5"
    assert main(["simulate", "-o", str(data), "--model", "exp", "--n", "24", "--nz", "16",
                 "--angles", "8", "--step", "4", "--probe-size", "8", "--fwhm", "3",
                 "--seed", "3", "--jitter", "0.3", "--drift", "1.5"]) == 0
    common = [str(data), "--no-figures", "--align", "--iterations", "40", "--checkpoint",
              str(ck)]
    full, again = tmp_path / "full.h5", tmp_path / "again.h5"
    assert main(["reconstruct", *common, "-o", str(full)]) == 0
    with h5py.File(ck, "r") as f:
        assert int(f.attrs["iteration"]) > 80
    assert main(["reconstruct", *common, "-o", str(again), "--resume"]) == 0
    with h5py.File(full, "r") as fa, h5py.File(again, "r") as fb:
        for name in ("entry_1/image_1/data", "entry_1/ptmpi/shifts_px"):
            assert np.array_equal(fa[name][...], fb[name][...]), name


def test_reconstruct_writes_the_shifts(tmp_path, capsys):
    data = simulate(dataclasses.replace(drift_settings(1.5), eta=200.0))
    path = tmp_path / "in.h5"
    write_input(path, counts=data.counts, probe=data.probe, positions_px=data.positions_px,
                frame_offset=data.frame_offset, angles_deg=data.angles_deg,
                volume_shape=data.volume.shape, truth_volume=data.volume,
                truth_shifts_px=data.shifts_px)
    out = tmp_path / "rec.h5"
    assert main(["reconstruct", str(path), "-o", str(out), "--iterations", "8", "--align",
                 "--align-start", "2", "--align-every", "2"]) == 0
    with h5py.File(out, "r") as f:
        shifts = f["entry_1/ptmpi/shifts_px"][()]
        std = f["entry_1/ptmpi/shift_std_px"][()]
        positions = f["entry_1/image_1/positions_px"][()]
    assert shifts.shape == (N_ANGLES, 2) and shifts.dtype == np.float64
    # photon counts of about 200 per unit intensity: Cramer-Rao errors of a few 0.001 px
    assert std.shape == (N_ANGLES, 2) and np.all((std > 1e-4) & (std < 0.05))
    assert np.any(shifts != 0)
    angle = np.repeat(np.arange(N_ANGLES), np.diff(data.frame_offset))
    assert np.allclose(positions, data.positions_px + shifts[angle])
    assert (tmp_path / "rec-shifts.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("shifts"))
    assert f"{N_ANGLES} angles" in line and f"median {np.median(std):.3g} px" in line
    # --align is for the joint solvers
    assert main(["reconstruct", str(path), "-o", str(tmp_path / "x.h5"), "--align",
                 "--algorithm", "two-step"]) != 0


@pytest.mark.parametrize("probe", ["guarded", "unguarded", "modes"])
def test_align_on_the_device_path_matches_numpy(linear_drift, monkeypatch, probe):
    """The shift step on the strict stand-in for CuPy (``tests/strict_xp.py``: arrays that
    refuse implicit host conversion) gives the numpy run's shifts, with the drift data's
    guarded probe, with an unguarded one (the search on guarded frames, the check on
    the model's own) and with two refined probe modes."""
    import strict_xp

    from ptmpi.backend import get_xp, to_host
    from ptmpi.operators import kernels
    from ptmpi.sim.probe import focused_probe

    monkeypatch.setattr(kernels, "ENABLED", False)  # the same array-module path on both
    settings = SolverSettings(iterations=9, tol=0, align=True, align_start=2, align_every=3,
                              **({"probe_modes": 2, "refine_probe": True}
                                 if probe == "modes" else {}))
    problem = local_problem(linear_drift)
    if probe == "unguarded":
        s = linear_drift.settings
        problem = dataclasses.replace(problem, probe=np.sqrt(s.eta or 1.0) * focused_probe(
            M, s.fwhm))
    host, _ = solve(problem, settings, SerialComm(), dtype=np.complex128)
    dev, _ = solve(problem, settings, SerialComm(), xp=strict_xp, dtype=np.complex128)
    assert get_xp(dev.u) is strict_xp and get_xp(dev.z_local) is strict_xp
    assert np.max(np.abs(host.shifts_local)) > 0.3
    assert np.max(np.abs(dev.shifts_local - host.shifts_local)) < 1e-8
    assert np.linalg.norm(to_host(dev.u) - host.u) < 1e-8 * np.linalg.norm(host.u)


def test_the_leave_out_on_the_device_path_matches_numpy(linear_drift, monkeypatch):
    """The volume without the flagged angles (a nested solve with their frames masked) on
    the strict stand-in for CuPy: the same angles, re-fit and restart as with numpy."""
    import strict_xp

    from ptmpi.backend import get_xp, to_host
    from ptmpi.operators import kernels

    monkeypatch.setattr(kernels, "ENABLED", False)  # the same array-module path on both
    settings = SolverSettings(iterations=40, tol=0, align=True, align_start=2, align_every=3,
                              align_confirm_px=0.0, **LEAVE_OUT)
    problem = local_problem(linear_drift)
    host, _ = solve(problem, settings, SerialComm(), dtype=np.complex128)
    dev, _ = solve(problem, settings, SerialComm(), xp=strict_xp, dtype=np.complex128)
    assert get_xp(dev.u) is strict_xp and host.params["align_leave_out"]
    for key in ("align_leave_out", "align_leave_out_at", "align_refit_at", "align_restart_at"):
        assert dev.params[key] == host.params[key], key
    assert np.max(np.abs(dev.shifts_local - host.shifts_local)) < 1e-8
    assert np.linalg.norm(to_host(dev.u) - host.u) < 1e-8 * np.linalg.norm(host.u)


def whole_pixel_misfits(data, probe):
    """Per-angle misfit changes of all frames moved across a whole pixel (1e-4 px) and
    within one (1e-2 px), along each axis, with the model's probe ``probe``."""
    p = local_problem(data)
    positions = np.round(p.positions_local)  # whole pixels: all frames cross together
    model = JointModel(p.volume_shape, p.theta_local, probe, positions, p.frame_offset_local)
    images = model.projector.fwd(data.volume.astype(np.complex128))
    sqrt_f = np.sqrt(p.f_local)

    def misfit(shift, axis):
        d = np.zeros((N_ANGLES, 2))
        d[:, axis] = shift
        return amplitude_objective(images, model.ptycho, d, sqrt_f, gradient=False)

    across = [np.abs(misfit(1.0, k) - misfit(1.0 - 1e-4, k)) for k in (0, 1)]
    within = [np.abs(misfit(0.6, k) - misfit(0.6 - 1e-2, k)) for k in (0, 1)]
    return np.array(across), np.array(within)


def test_misfit_is_continuous_across_a_whole_pixel(linear_drift):
    """Moving an angle's frames across a whole pixel changes its misfit no more than a
    small step elsewhere does, along rows and columns: the drift data's probe, which the
    model uses, is guarded (zero on its last row and column), and then the frames at
    either side of a whole pixel are circular shifts of each other
    (:mod:`ptmpi.operators.ptycho`, notes). Measured: ``across / within`` at most 0.13
    (0.01 typical, the 1e-4 px step itself), against 4-100 unguarded."""
    from ptmpi.operators.ptycho import is_guarded

    data = linear_drift
    assert is_guarded(data.probe)
    across, within = whole_pixel_misfits(data, data.probe)
    assert np.all(across < within)


def test_an_unguarded_probe_jumps_at_a_whole_pixel(linear_drift):
    """The counterpart: the same frames with the designed probe (its edge row and column
    restored) jump where they cross a whole pixel; the jump that trapped ``--align``."""
    from ptmpi.sim.probe import focused_probe

    data = linear_drift
    s = data.settings
    probe = (np.sqrt(s.eta) if s.eta else 1.0) * focused_probe(M, s.fwhm)
    across, within = whole_pixel_misfits(data, probe)
    assert np.all(across > within)


def test_exp_align_on_the_device_path_matches_numpy(monkeypatch):
    """exp APT with ``--align`` on the strict stand-in for CuPy (arrays that refuse
    implicit host conversion): its shift steps, restart (the initialisation rerun and the
    penalties of the restarted positions) and result are the numpy run's."""
    import strict_xp

    from ptmpi.backend import get_xp, to_host
    from ptmpi.operators import kernels

    monkeypatch.setattr(kernels, "ENABLED", False)  # the same array-module path on both
    data = simulate(drift_settings(1.5, model="exp"))
    # 14 iterations: over longer runs the exp iteration amplifies the rounding in which
    # the two array modules differ (docs/alignment.md, rank independence of the shifts)
    settings = ExpSolverSettings(iterations=14, init_iterations=20, init_gn_iterations=8,
                                 align=True, align_start=2, align_every=3)
    host, _ = solve_exp(local_problem(data), settings, SerialComm(), dtype=np.complex128)
    first = {}
    dev, _ = solve_exp(local_problem(data), settings, SerialComm(), xp=strict_xp,
                       dtype=np.complex128,
                       callback=lambda state, row: first.setdefault("rho", state.params["rho"]))
    assert get_xp(dev.u) is strict_xp and get_xp(dev.z_local) is strict_xp
    # a restart at the same iteration (the initialisation rerun there), and its penalties
    assert host.params["init_at"] == dev.params["init_at"] > 0
    assert dev.params["rho"] != first["rho"]  # (those of the restarted positions)
    for key in ("rho", "r1", "tv_weight", "tv_texture_cap", "max_W"):
        assert dev.params[key] == pytest.approx(host.params[key], rel=1e-12), key
    assert np.max(np.abs(host.shifts_local)) > 0.3
    assert np.max(np.abs(dev.shifts_local - host.shifts_local)) < 1e-8
    assert np.linalg.norm(to_host(dev.u) - host.u) < 1e-8 * np.linalg.norm(host.u)
