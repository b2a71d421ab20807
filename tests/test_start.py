"""Coarse-to-fine start (:mod:`ptmpi.solvers.start`): the coarse problem is consistent
with the data, the resampling is right, and the start it gives is better than ``u = 1``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ptmpi.metrics import snr_db
from ptmpi.operators.model import JointModel
from ptmpi.parallel.comm import SerialComm
from ptmpi.sim.presets import SimulationSettings
from ptmpi.sim.simulate import simulate
from ptmpi.solvers import start
from ptmpi.solvers.admm import LocalProblem, SolverSettings, solve


@pytest.fixture(scope="module")
def case():
    sim = simulate(SimulationSettings(n=32, nz=32, n_angles=6, step=8, probe_size=16,
                                      fwhm=4.0, seed=0))
    return LocalProblem(
        volume_shape=sim.volume.shape, theta_local=np.deg2rad(sim.angles_deg),
        f_local=np.fft.ifftshift(sim.counts, axes=(-2, -1)), positions_local=sim.positions_px,
        frame_offset_local=sim.frame_offset, probe=sim.probe, truth_volume=sim.volume)


def test_coarse_model_reproduces_the_central_counts(case):
    """|D_coarse(omega_c, bin(u_true))|^2 matches the kept central counts: within 1% at
    low frequencies, and the probe's half-pixel alignment matters (without it, worse)."""
    small = start.coarse_problem(case)
    assert small.volume_shape == (16, 16, 16) and small.f_local.shape[-1] == 8
    model = JointModel(small.volume_shape, small.theta_local, small.probe,
                       small.positions_local, small.frame_offset_local, dtype=np.complex64)
    counts = np.abs(model.fwd(small.truth_volume)) ** 2
    valid = small.valid_local
    assert valid.shape == (8, 8) and valid[0, 0] and not valid[4, 4]
    err = np.linalg.norm((counts - small.f_local)[:, valid]) / np.linalg.norm(
        small.f_local[:, valid])
    assert err < 0.02
    assert abs(counts.sum() / small.f_local.sum() - 1) < 0.1
    # the same without the half-pixel shift of the probe is clearly worse
    m = case.probe.shape[-1]
    plain = np.fft.ifft2(start._crop_centre(np.fft.fft2(case.probe, norm="ortho"), m // 2),
                         norm="ortho") * 2
    model.set_probe(plain.astype(np.complex64))
    counts_plain = np.abs(model.fwd(small.truth_volume)) ** 2
    err_plain = np.linalg.norm((counts_plain - small.f_local)[:, valid]) / np.linalg.norm(
        small.f_local[:, valid])
    assert err_plain > 1.5 * err


def test_resampling(rng):
    u = (rng.standard_normal((4, 6, 6)) + 1j * rng.standard_normal((4, 6, 6))).astype(
        np.complex64)
    up = start.upsample_volume(u, (8, 12, 12))
    assert up.shape == (8, 12, 12) and up.dtype == np.complex64
    # a constant and a linear ramp (inside) are reproduced exactly
    np.testing.assert_allclose(start.upsample_volume(np.full((4, 6, 6), 2 + 1j), (8, 12, 12)),
                               2 + 1j, rtol=1e-6)
    ramp = np.arange(6, dtype=np.float32)[None, None, :] * np.ones((4, 6, 6), np.float32)
    fine = start.upsample_volume(ramp, (8, 12, 12))
    np.testing.assert_allclose(fine[0, 0, 1:-1], (np.arange(1, 11) - 0.5) / 2, atol=1e-6)
    # binning the upsampled ramp returns the coarse one
    np.testing.assert_allclose(start.bin_volume(fine)[:, :, 1:-1], ramp[:, :, 1:-1], atol=1e-6)
    # the probe: a refined coarse probe equal to the coarse one gives back the fine probe
    probe = (rng.standard_normal((16, 16)) + 1j * rng.standard_normal((16, 16))).astype(
        np.complex128)
    spectrum = np.fft.fftshift(np.fft.fft2(probe, norm="ortho"))
    spectrum[:4] = spectrum[-4:] = spectrum[:, :4] = spectrum[:, -4:] = 0
    smooth = np.fft.ifft2(np.fft.ifftshift(spectrum), norm="ortho")
    np.testing.assert_allclose(start.fine_probe(start.coarse_probe(smooth), smooth), smooth,
                               atol=1e-12)


def test_can_coarsen():
    assert start.can_coarsen((32, 32, 32), 16)
    assert not start.can_coarsen((31, 32, 32), 16)
    assert not start.can_coarsen((32, 32, 32), 14)
    assert not start.can_coarsen((14, 32, 32), 8)


def test_coarse_start_beats_ones_early(case):
    """The interpolated coarse solution scores above the empty sample, and after 10
    full-size iterations the run from it is ahead of the run from u = 1."""
    settings = SolverSettings(tol=0, iterations=10, start="coarse", start_iterations=40)
    state0, info = start.coarse_start(case, settings, SerialComm())
    assert info["start"] == "coarse" and info["start_iterations_done"] == 40
    assert state0.u.shape == case.volume_shape and state0.p.shape == (3, *case.volume_shape)
    ones = snr_db(np.ones(case.volume_shape, np.complex64), case.truth_volume)
    assert info["start_snr_db"] > ones + 0.2
    from_coarse, _ = solve(case, settings, SerialComm(), state=state0)
    from_ones, _ = solve(case, dataclasses.replace(settings, start="ones"), SerialComm())
    assert from_coarse.history["snr_db"][-1] > from_ones.history["snr_db"][-1] + 0.1


def test_two_step_start_is_the_two_step_volume_and_beats_ones_early(case, tmp_path):
    """The 2-step start is the volume of ``--algorithm two-step`` on the same data (the
    same per-angle ptychography and tomography), above the empty sample, and after 10
    iterations the run from it is ahead of the run from u = 1."""
    import h5py

    from ptmpi.cli import main
    from ptmpi.io.cxi import write_input

    settings = SolverSettings(tol=0, iterations=10, start="two-step", start_iterations=30)
    state0, info = start.two_step_start(case, settings, SerialComm())
    assert info["start"] == "two-step" and info["start_iterations_done"] == 30
    assert state0.p.shape == (3, *case.volume_shape) and not np.any(state0.lam1)
    ones = snr_db(np.ones(case.volume_shape, np.complex64), case.truth_volume)
    assert info["start_snr_db"] > ones + 1.0, (info, ones)
    # the same volume as the two-step algorithm's output
    path, out = tmp_path / "in.h5", tmp_path / "two.h5"
    write_input(path, counts=np.fft.fftshift(case.f_local, axes=(-2, -1)), probe=case.probe,
                positions_px=case.positions_local, frame_offset=case.frame_offset_local,
                angles_deg=np.rad2deg(case.theta_local), volume_shape=case.volume_shape)
    assert main(["reconstruct", str(path), "-o", str(out), "--algorithm", "two-step",
                 "--iterations", "30", "--no-figures"]) == 0
    with h5py.File(out, "r") as f:
        two = f["entry_1/image_1/data"][()]
    assert np.linalg.norm(state0.u - two) < 1e-5 * np.linalg.norm(two)
    from_two, _ = solve(case, settings, SerialComm(), state=state0)
    from_ones, _ = solve(case, dataclasses.replace(settings, start="ones"), SerialComm())
    assert from_two.history["snr_db"][-1] > from_ones.history["snr_db"][-1] + 0.5


def test_coarse_start_declines_what_does_not_halve(case):
    odd = dataclasses.replace(case, probe=case.probe[:14, :14])
    state, info = start.coarse_start(odd, SolverSettings(start="coarse"), SerialComm())
    assert state is None and info["start"] == "ones"


def test_cli_start_coarse_stores_what_it_did(tmp_path):
    import json

    import h5py

    from ptmpi.cli import main

    data = tmp_path / "in.h5"
    assert main(["simulate", "-o", str(data), "--n", "32", "--nz", "16", "--angles", "4",
                 "--step", "8", "--probe-size", "16", "--fwhm", "4", "--eta", "3"]) == 0
    out = tmp_path / "rec.h5"
    assert main(["reconstruct", str(data), "-o", str(out), "--iterations", "3",
                 "--start", "coarse", "--start-iterations", "5", "--no-figures"]) == 0
    with h5py.File(out, "r") as f:
        params = json.loads(f["entry_1/process_1/parameters"][()])
        assert f["entry_1/ptmpi/metrics/iteration"].shape == (3,)
    assert params["start"] == "coarse" and params["start_iterations_done"] == 5
    assert params["start_shape"] == [8, 16, 16] and params["start_wall_s"] > 0
    assert params["tv_weight_rule"].startswith("photon counts")


def test_the_start_settings_do_not_block_a_resume():
    from ptmpi.io.checkpoint import config_differences

    class Header:
        settings = {k: v for k, v in SolverSettings().to_dict().items()
                    if not k.startswith("start")}
        dtype = "complex64"

    now = SolverSettings(start="coarse", start_iterations=7).to_dict()
    assert config_differences(Header, now, np.complex64) == []
    assert config_differences(Header, {**now, "r2": 0.5}, np.complex64) == [
        "r2: None there, 0.5 now"]
