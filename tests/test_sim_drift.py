"""Simulated experimental imperfections: sample drift per angle, a defocused probe guess."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest

from ptmpi.cli import main
from ptmpi.metrics import r_factor
from ptmpi.operators.model import JointModel
from ptmpi.operators.ptycho import is_guarded
from ptmpi.sim.presets import PRESETS
from ptmpi.sim.simulate import simulate

BASE = dataclasses.replace(PRESETS["demo"], n_angles=4, eta=None)


def _r_factor(data, positions, probe):
    model = JointModel(data.volume.shape, np.deg2rad(data.angles_deg), probe, positions,
                       data.frame_offset)
    f = np.fft.ifftshift(data.counts, axes=(-2, -1))
    return r_factor(model.fwd(data.volume), f)


def test_drift_moves_the_data_not_the_recorded_positions():
    clean = simulate(BASE)
    drifted = simulate(dataclasses.replace(BASE, drift=2.5))
    np.testing.assert_array_equal(drifted.positions_px, clean.positions_px)
    shifts = drifted.shifts_px
    assert shifts.shape == (4, 2) and np.abs(shifts).max() <= 2.5
    assert np.abs(shifts).max() > 1.0 and np.any(shifts != np.round(shifts))  # sub-pixel
    assert clean.shifts_px is None
    # the drift data's probe is guarded (zero on its last row and column), as --align
    # models it; elsewhere it is the drift-free data's probe
    assert is_guarded(drifted.probe) and not is_guarded(clean.probe)
    np.testing.assert_array_equal(drifted.probe[:-1, :-1], clean.probe[:-1, :-1])
    angle = np.repeat(np.arange(4), np.diff(drifted.frame_offset))
    true = drifted.positions_px + shifts[angle]
    # the data are those of the shifted positions (noise-free: R ~ 0 there) ...
    assert _r_factor(drifted, true, drifted.probe) < 1e-5
    # ... and the recorded positions no longer explain them
    assert _r_factor(drifted, drifted.positions_px, drifted.probe) > 0.05


def test_defocused_probe_guess_keeps_the_power_and_the_truth():
    clean = simulate(BASE)
    wrong = simulate(dataclasses.replace(BASE, probe_defocus=6.0))
    np.testing.assert_array_equal(wrong.counts, clean.counts)
    np.testing.assert_array_equal(wrong.true_probe, clean.probe)
    power = np.sum(np.abs(clean.probe) ** 2)
    assert np.sum(np.abs(wrong.probe) ** 2) == pytest.approx(power, rel=1e-5)
    assert np.linalg.norm(wrong.probe - clean.probe) > 0.3 * np.sqrt(power)
    assert _r_factor(wrong, wrong.positions_px, wrong.probe) > 0.05


def test_simulate_writes_the_truth_of_the_imperfections(tmp_path):
    path = tmp_path / "d.h5"
    assert main(["simulate", "--preset", "demo", "--angles", "4", "--drift", "2",
                 "--probe-defocus", "4", "-o", str(path)]) == 0
    data = simulate(dataclasses.replace(PRESETS["demo"], n_angles=4, drift=2.0,
                                        probe_defocus=4.0))
    with h5py.File(path, "r") as f:
        truth = f["entry_1/ptmpi/truth"]
        np.testing.assert_array_equal(truth["shifts_px"][...], data.shifts_px)
        np.testing.assert_array_equal(truth["probe"][...], data.true_probe)
    assert main(["simulate", "--preset", "demo", "--drift", "-1", "-o",
                 str(tmp_path / "bad.h5")]) == 1
