"""Detector masks (SPEC 8): garbage counts at masked pixels change nothing.

Every check puts NaN or huge values at the invalid pixels and compares, bit for bit, with
the same computation where those counts are 0; and checks that the mask is not a no-op
(masking changes results where it should).
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from ptmpi.io.cxi import DATA, MASK, read_input, write_input
from ptmpi.io.info import info_lines
from ptmpi.io.validate import inspect_input, validate_input
from ptmpi.mask import valid_from_mask, valid_per_frame
from ptmpi.metrics import r_factor, snr_db, snr_intensity_db
from ptmpi.operators import kernels
from ptmpi.operators.dottest import random_array
from ptmpi.parallel import SerialComm
from ptmpi.reconstruct import reconstruct
from ptmpi.sim.mask import HOT_COUNTS, stripe_start
from ptmpi.sim.presets import SimulationSettings
from ptmpi.sim.simulate import simulate
from ptmpi.solvers.admm import LocalProblem, SolverSettings, solve
from ptmpi.solvers.prox import data_objective, prox_data, update_data_split
from ptmpi.solvers.ptycho2d import Ptycho2DSettings, solve_ptycho2d

NZ, N, M = 12, 16, 8
SHAPE = (NZ, N, N)


def tiny_settings(**kwargs) -> SimulationSettings:
    """5 angles of 4 x 4 jittered windows on a 12 x 16 x 16 volume, Poisson counts."""
    base = {"n": N, "nz": NZ, "n_angles": 5, "step": 4, "probe_size": M, "fwhm": 3.0,
            "eta": 50.0, "seed": 7, "jitter": 1.5}
    return SimulationSettings(**{**base, **kwargs})


@pytest.fixture(scope="module")
def tiny():
    return simulate(tiny_settings())


@pytest.fixture(params=[True, False], ids=["compiled", "numpy"])
def compiled(request, monkeypatch):
    """Run with the compiled kernels (when Numba is there) or on the numpy reference."""
    if request.param and not kernels.ENABLED:
        pytest.skip("Numba is not installed")
    monkeypatch.setattr(kernels, "ENABLED", request.param)
    return request.param


def random_valid(rng, shape, fraction=0.3):
    valid = rng.uniform(size=shape) > fraction
    assert valid.any() and not valid.all()
    return valid


def spoiled(f, valid, rng):
    """``f`` with NaN, inf and huge values at the invalid pixels; and with zeros there."""
    full = np.broadcast_to(valid, f.shape)
    garbage = f.copy()
    bad = np.flatnonzero(~full)
    choices = np.array([np.nan, np.inf, -1e30, 4e9], dtype=f.dtype)
    garbage.reshape(-1)[bad] = choices[rng.integers(0, choices.size, bad.size)]
    zeros = np.where(full, f, 0).astype(f.dtype)
    return garbage, zeros


# ---------------------------------------------------------------------------- z-step


@pytest.mark.parametrize("likelihood", ["ipm", "agm"])
@pytest.mark.parametrize("per_frame", [False, True], ids=["one-mask", "per-frame"])
def test_data_split_ignores_counts_at_masked_pixels(likelihood, per_frame, compiled, rng,
                                                    cdtype):
    d = random_array((4, M, M), cdtype, rng)
    lam2 = 0.2 * random_array((4, M, M), cdtype, rng)
    f = rng.poisson(3.0, size=(4, M, M)).astype(np.finfo(cdtype).dtype)
    valid = random_valid(rng, (4, M, M) if per_frame else (M, M))
    full = np.broadcast_to(valid, d.shape)
    garbage, zeros = spoiled(f, valid, rng)

    results = []
    for counts in (garbage, zeros, f):
        lam2_now = lam2.copy()
        z = update_data_split(d, lam2_now, counts, 0.1, likelihood, valid)
        results.append((z, lam2_now))
    (z_g, lam2_g), (z_0, lam2_0), (z_f, _) = results
    assert np.all(np.isfinite(z_g)) and np.all(np.isfinite(lam2_g))
    assert np.array_equal(z_g, z_0) and np.array_equal(lam2_g, lam2_0)
    # the counts at invalid pixels are not read at all: the true ones give the same too
    assert np.array_equal(z_f, z_0)
    # prox = identity at invalid pixels; the multiplier there is rounding of |d| only
    assert np.array_equal(z_g[~full], (d - lam2)[~full])
    eps = np.finfo(f.dtype).eps
    assert np.abs(lam2_g[~full]).max() <= 4 * eps * np.abs(d).max()
    # valid pixels are what the unmasked step gives
    lam2_plain = lam2.copy()
    z_plain = update_data_split(d, lam2_plain, f, 0.1, likelihood)
    assert np.array_equal(z_g[full], z_plain[full])
    assert np.array_equal(lam2_g[full], lam2_plain[full])
    assert np.abs(z_plain[~full] - z_g[~full]).max() > 1e-2  # the mask did something

    # Starting from lam2 = 0 there (Algorithm 1), lam2 stays exactly 0 at invalid pixels.
    lam2_start = np.where(full, lam2, 0).astype(cdtype)
    for _ in range(3):
        update_data_split(d, lam2_start, garbage, 0.1, likelihood, valid)
        assert np.all(lam2_start[~full] == 0)


@pytest.mark.parametrize("likelihood", ["ipm", "agm"])
def test_compiled_masked_split_equals_numpy_reference(likelihood, rng, monkeypatch):
    if not kernels.ENABLED:
        pytest.skip("Numba is not installed")
    d = random_array((3, M, M), np.complex128, rng)
    lam2 = 0.2 * random_array((3, M, M), np.complex128, rng)
    f = rng.poisson(3.0, size=(3, M, M)).astype(np.float64)
    valid = random_valid(rng, (3, M, M))
    garbage, _ = spoiled(f, valid, rng)
    lam2_c = lam2.copy()
    z_c = update_data_split(d, lam2_c, garbage, 0.1, likelihood, valid)
    monkeypatch.setattr(kernels, "ENABLED", False)
    lam2_r = lam2.copy()
    z_r = update_data_split(d, lam2_r, garbage, 0.1, likelihood, valid)
    assert np.abs(z_c - z_r).max() <= 1e-12 * np.abs(z_r).max()
    assert np.abs(lam2_c - lam2_r).max() <= 1e-12 * np.abs(z_r).max()


@pytest.mark.parametrize("likelihood", ["ipm", "agm"])
def test_prox_and_objective_ignore_masked_counts(likelihood, rng):
    zt = random_array((3, M, M), np.complex128, rng)
    f = rng.poisson(3.0, size=(3, M, M)).astype(np.float64)
    valid = random_valid(rng, (M, M))
    full = np.broadcast_to(valid, f.shape)
    garbage, zeros = spoiled(f, valid, rng)
    z = prox_data(zt, garbage, 0.1, likelihood, valid)
    assert np.array_equal(z, prox_data(zt, zeros, 0.1, likelihood, valid))
    assert np.array_equal(z[~full], zt[~full])
    assert np.array_equal(z[full], prox_data(zt, f, 0.1, likelihood)[full])

    obj = data_objective(zt, garbage, likelihood, valid)
    assert np.isfinite(obj) and obj == data_objective(zt, zeros, likelihood, valid)
    # the sum over the valid pixels only
    assert obj == pytest.approx(data_objective(zt[full], f[full], likelihood), rel=1e-12)
    assert abs(obj - data_objective(zt, f, likelihood)) > 1e-3 * abs(obj)


# ---------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("per_frame", [False, True], ids=["one-mask", "per-frame"])
def test_metrics_sum_over_valid_pixels_only(per_frame, rng, monkeypatch):
    d = random_array((6, M, M), np.complex64, rng)
    f = rng.poisson(2.0, size=(6, M, M)).astype(np.float32)
    clean = rng.uniform(1, 3, size=(6, M, M)).astype(np.float32)
    valid = random_valid(rng, (6, M, M) if per_frame else (M, M))
    full = np.broadcast_to(valid, f.shape)
    garbage, zeros = spoiled(f, valid, rng)
    clean_garbage, _ = spoiled(clean, valid, rng)

    r = r_factor(d, garbage, valid=valid)
    amp = np.sqrt(f[full].astype(np.float64))
    by_hand = np.sum(np.abs(np.abs(d[full].astype(np.complex128)) - amp)) / np.sum(amp)
    assert r == pytest.approx(by_hand, rel=1e-12)
    assert r == r_factor(d, zeros, valid=valid)
    assert abs(r - r_factor(d, f)) > 1e-3 * r

    s = snr_intensity_db(garbage, clean_garbage, valid=valid)
    by_hand = -10 * np.log10(np.sum((f[full] - clean[full].astype(np.float64)) ** 2)
                             / np.sum(clean[full].astype(np.float64) ** 2))
    assert s == pytest.approx(by_hand, rel=1e-12)
    assert abs(s - snr_intensity_db(f, clean)) > 1e-3

    # blocks of whole frames give the same sums as one block
    monkeypatch.setattr("ptmpi.metrics._BLOCK", 2 * M * M)
    assert r_factor(d, garbage, valid=valid) == pytest.approx(r, rel=1e-12)
    assert snr_intensity_db(garbage, clean_garbage, valid=valid) == pytest.approx(s, rel=1e-12)


# ---------------------------------------------------------------------------- solvers


def local_problem(data, counts, valid):
    return LocalProblem(
        volume_shape=SHAPE, theta_local=np.deg2rad(data.angles_deg), f_local=counts,
        positions_local=data.positions_px, frame_offset_local=data.frame_offset,
        probe=data.probe, valid_local=valid)


def test_per_frame_mask_of_one_mask_gives_the_same_run(tiny, rng):
    counts = np.fft.ifftshift(tiny.counts, axes=(-2, -1))
    valid = random_valid(rng, (M, M))
    settings = SolverSettings(iterations=3)
    one, _ = solve(local_problem(tiny, counts, valid), settings, SerialComm())
    each, _ = solve(local_problem(tiny, counts, np.broadcast_to(valid, counts.shape).copy()),
                    settings, SerialComm())
    assert np.array_equal(one.u, each.u)
    assert one.history["r_factor"] == each.history["r_factor"]


@pytest.mark.parametrize("algorithm", ["apt", "apts"])
@pytest.mark.parametrize("per_frame", [False, True], ids=["one-mask", "per-frame"])
def test_apt_ignores_garbage_at_masked_pixels(tiny, algorithm, per_frame, compiled, rng):
    counts = np.fft.ifftshift(tiny.counts, axes=(-2, -1))
    valid = random_valid(rng, counts.shape if per_frame else (M, M), fraction=0.15)
    garbage, zeros = spoiled(counts, valid, rng)
    settings = SolverSettings(algorithm=algorithm, iterations=4, refine_probe=True)
    runs = [solve(local_problem(tiny, c, valid), settings, SerialComm()) for c in
            (garbage, zeros)]
    (s_g, p_g), (s_0, p_0) = runs
    assert np.all(np.isfinite(s_g.u))
    assert np.array_equal(s_g.u, s_0.u) and np.array_equal(s_g.omega, s_0.omega)
    assert np.array_equal(s_g.z_local, s_0.z_local)
    assert s_g.history["r_factor"] == s_0.history["r_factor"]
    assert p_g == p_0  # the defaults (photon counting) saw only the valid counts
    assert p_g["noise_amplitude"] == 0.5
    full = np.broadcast_to(valid, counts.shape)
    assert np.all(s_g.lam2_local[~full] == 0)
    plain, _ = solve(local_problem(tiny, counts, None), settings, SerialComm())
    assert np.linalg.norm(plain.u - s_g.u) > 1e-4 * np.linalg.norm(plain.u)


@pytest.mark.parametrize("per_frame", [False, True], ids=["one-mask", "per-frame"])
def test_ptycho2d_ignores_garbage_at_masked_pixels(tiny, per_frame, rng):
    counts = np.fft.ifftshift(tiny.counts, axes=(-2, -1))
    valid = random_valid(rng, counts.shape if per_frame else (M, M), fraction=0.15)
    garbage, zeros = spoiled(counts, valid, rng)
    v0 = np.ones((tiny.angles_deg.size, NZ, N), dtype=np.complex64)
    settings = Ptycho2DSettings(iterations=5, refine_probe=True)
    s_g, s_0, plain = (
        solve_ptycho2d(v0, c, tiny.probe, tiny.positions_px, tiny.frame_offset, settings,
                       SerialComm(), valid_local=v)
        for c, v in ((garbage, valid), (zeros, valid), (counts, None)))
    assert np.all(np.isfinite(s_g.v_local))
    assert np.array_equal(s_g.v_local, s_0.v_local) and np.array_equal(s_g.omega, s_0.omega)
    assert s_g.history["r_factor"] == s_0.history["r_factor"]
    assert np.linalg.norm(plain.v_local - s_g.v_local) > 1e-4 * np.linalg.norm(plain.v_local)


# ---------------------------------------------------------------------------- files


def write_tiny(path, data, mask=None, counts=None, is_fft_shifted=0):
    write_input(path, counts=data.counts if counts is None else counts, probe=data.probe,
                positions_px=data.positions_px, frame_offset=data.frame_offset,
                angles_deg=data.angles_deg, volume_shape=SHAPE, truth_volume=data.volume,
                mask=mask, is_fft_shifted=is_fft_shifted)


@pytest.mark.parametrize("is_fft_shifted", [0, 1])
def test_mask_round_trips_and_is_read_like_the_counts(tiny, tmp_path, rng, is_fft_shifted):
    a = tiny.angles_deg.size
    one = (rng.uniform(size=(M, M)) < 0.2).astype(np.uint32) * 3
    per_angle = (rng.uniform(size=(a, M, M)) < 0.2)
    off = tiny.frame_offset
    for mask in (one, per_angle):
        path = tmp_path / f"mask{mask.ndim}.h5"
        write_tiny(path, tiny, mask, is_fft_shifted=is_fft_shifted)
        with h5py.File(path, "r") as f:
            assert f[MASK].dtype == np.uint32
            assert np.array_equal(f[MASK][()], mask.astype(np.uint32))
        assert validate_input(path) == []
        whole = read_input(path)
        shift = (lambda x: x) if is_fft_shifted else (
            lambda x: np.fft.ifftshift(x, axes=(-2, -1)))
        if mask.ndim == 2:
            assert whole.valid_local.shape == (M, M) and whole.valid_local.dtype == bool
            assert np.array_equal(whole.valid_local, shift(mask == 0))
        else:
            assert whole.valid_local.shape == whole.counts_local.shape
            for j in (0, int(off[2]) + 1, int(off[-1]) - 1):
                angle = int(np.searchsorted(off, j, side="right") - 1)
                assert np.array_equal(whole.valid_local[j], shift(mask[angle] == 0))
        # counts at invalid pixels are not handed on; the others are the file's
        full = np.broadcast_to(whole.valid_local, whole.counts_local.shape)
        assert np.all(whole.counts_local[~full] == 0)
        stored = tiny.counts if is_fft_shifted else np.fft.ifftshift(tiny.counts, axes=(-2, -1))
        assert np.array_equal(whole.counts_local[full], stored[full])
        assert np.any(stored[~full] != 0)
        # a block of angles gets the valid pixels of its own frames
        block = read_input(path, 2, 4)
        expected = whole.valid_local if mask.ndim == 2 else whole.valid_local[off[2]:off[4]]
        assert np.array_equal(block.valid_local, expected)
    assert read_input(tmp_path / "mask2.h5").valid_local is not None
    write_tiny(tmp_path / "none.h5", tiny)
    assert read_input(tmp_path / "none.h5").valid_local is None


def test_write_input_refuses_a_bad_mask(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"mask: expected shape \(8, 8\) or \(5, 8, 8\)"):
        write_tiny(tmp_path / "a.h5", tiny, np.zeros((4, M, M), np.uint32))
    with pytest.raises(ValueError, match="mask: expected integers or booleans"):
        write_tiny(tmp_path / "b.h5", tiny, np.zeros((M, M), np.float32))
    assert not list(tmp_path.iterdir())


def test_validation_skips_masked_counts_and_rejects_a_bad_mask(tiny, tmp_path):
    mask = np.zeros((M, M), np.uint32)
    mask[2, 5] = 1
    counts = tiny.counts.copy()
    counts[:, 2, 5] = np.nan
    counts[3, 2, 5] = -7
    path = tmp_path / "nan-masked.h5"
    write_tiny(path, tiny, mask, counts)
    report = inspect_input(path)
    assert report.problems == []
    assert report.mask_shape == (M, M) and report.masked_pixels == 1
    assert report.counts_total == pytest.approx(
        float(np.sum(np.delete(tiny.counts.reshape(-1, M * M), 2 * M + 5, axis=1),
                     dtype=np.float64)), rel=1e-9)
    # NaN at a valid pixel is still a problem
    counts[1, 0, 0] = np.nan
    write_tiny(tmp_path / "nan-valid.h5", tiny, mask, counts)
    problems = validate_input(tmp_path / "nan-valid.h5")
    assert len(problems) == 1 and DATA in problems[0] and "1 NaN" in problems[0]

    for k, (bad, text) in enumerate((
            (np.zeros((3, M, M), np.uint32), "expected shape (8, 8)"),
            (np.zeros((M, M), np.float32), "expected integers (uint32"),
            (np.ones((M, M), np.uint32), "every pixel masked"))):
        path = tmp_path / f"bad{k}.h5"
        write_tiny(path, tiny)
        with h5py.File(path, "r+") as f:
            f[MASK] = bad
        problems = validate_input(path)
        assert len(problems) == 1, problems
        assert problems[0].startswith(f"{path}: {MASK}: ") and text in problems[0]


def test_info_shows_the_masked_pixels(tiny, tmp_path):
    a = tiny.angles_deg.size
    mask = np.zeros((a, M, M), np.uint32)
    mask[1, :, 3] = 1
    mask[4, 0, 0] = 1
    write_tiny(tmp_path / "m.h5", tiny, mask)
    summary, problems = info_lines(tmp_path / "m.h5")
    assert problems == []
    line = next(s for s in summary if s.startswith("detector mask:"))
    assert "one per angle, 9 masked pixel(s) in all" in line
    write_tiny(tmp_path / "n.h5", tiny)
    summary, _ = info_lines(tmp_path / "n.h5")
    assert "detector mask: none (every pixel valid)" in summary


# ---------------------------------------------------------------------------- simulation


def test_simulated_mask_spoils_only_the_masked_counts():
    plain = simulate(tiny_settings())
    masked = simulate(tiny_settings(mask_stripe=2, hot_pixels=3))
    assert plain.mask is None
    mask = masked.mask
    assert mask.shape == (M, M) and mask.dtype == np.uint32
    c0 = stripe_start(M)
    assert c0 > M // 2 and np.all(mask[:, c0 : c0 + 2] == 1)
    assert np.count_nonzero(mask == 2) == 3 and np.count_nonzero(mask) == 2 * M + 3
    assert mask[M // 2, M // 2] == 0 and not np.any(mask[:, M // 2])
    # valid counts bit for bit those of the unmasked simulation; garbage elsewhere
    valid = mask == 0
    assert np.array_equal(masked.counts[:, valid], plain.counts[:, valid])
    assert np.all(masked.counts[:, mask == 1] == 0)
    assert np.all(masked.counts[:, mask == 2] == HOT_COUNTS)
    assert np.any(plain.counts[:, mask == 1] > 0)
    # the intensity SNR is over the valid pixels: close to, not equal to, the unmasked one
    assert np.isfinite(masked.snr_intensity_db)
    assert masked.snr_intensity_db != plain.snr_intensity_db
    assert abs(masked.snr_intensity_db - plain.snr_intensity_db) < 1.0
    with pytest.raises(ValueError, match="mask_stripe must be at most 2"):
        tiny_settings(mask_stripe=3)
    with pytest.raises(ValueError, match="hot_pixels must be at most 16"):
        tiny_settings(hot_pixels=17)


def test_masked_reconstruction_is_close_to_the_unmasked_one(tmp_path):
    """A dead stripe and 3 hot pixels (11 of 64 pixels masked): APT with the mask comes
    within 0.75 dB of the unmasked SNR (measured with the TV weight of the data's noise
    level: 20.68 and 20.07 dB; with the earlier fixed noise term 19.67 and 19.88 dB);
    without the mask the garbage counts ruin the reconstruction."""
    settings = tiny_settings(n_angles=8, eta=200.0)
    masked_settings = tiny_settings(n_angles=8, eta=200.0, mask_stripe=1, hot_pixels=3)
    plain, masked = simulate(settings), simulate(masked_settings)
    write_tiny(tmp_path / "plain.h5", plain)
    write_tiny(tmp_path / "masked.h5", masked, masked.mask)
    write_tiny(tmp_path / "ignored.h5", masked)  # same garbage counts, no mask
    solver = SolverSettings(iterations=40)
    summaries = {name: reconstruct(str(tmp_path / f"{name}.h5"), str(tmp_path / f"r-{name}.h5"),
                                   solver, SerialComm(), figures=False)
                 for name in ("plain", "masked", "ignored")}
    snr = {k: v["snr_db"] for k, v in summaries.items()}
    with h5py.File(tmp_path / "r-plain.h5") as fp, h5py.File(tmp_path / "r-masked.h5") as fm:
        u_plain, u_masked = fp["entry_1/image_1/data"][()], fm["entry_1/image_1/data"][()]
    assert snr["plain"] > 15
    assert abs(snr["masked"] - snr["plain"]) < 0.75, snr
    assert snr_db(u_masked, u_plain) > 25
    assert summaries["masked"]["r_factor"] < 1.1 * summaries["plain"]["r_factor"]
    assert snr["ignored"] < snr["plain"] - 10, snr


def test_simulate_cli_writes_the_mask(tmp_path, capsys):
    from ptmpi.cli import main

    path = tmp_path / "cli.h5"
    assert main(["simulate", "-o", str(path), "--preset", "demo", "--mask-stripe", "3",
                 "--hot-pixels", "5"]) == 0
    data = read_input(path)
    assert data.valid_local.shape == (16, 16)
    assert np.count_nonzero(~data.valid_local) == 3 * 16 + 5
    assert np.array_equal(data.valid_local, valid_from_mask(simulate(
        SimulationSettings(**{**simulate_settings_demo(), "mask_stripe": 3,
                              "hot_pixels": 5})).mask))
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "16 x 16, one for all frames, 53 masked pixel(s)" in out
    assert main(["simulate", "-o", str(tmp_path / "x.h5"), "--preset", "demo",
                 "--mask-stripe", "7"]) == 1
    assert "mask_stripe must be at most 6" in capsys.readouterr().err


def simulate_settings_demo() -> dict:
    from ptmpi.sim.presets import PRESETS

    return PRESETS["demo"].to_dict()


def test_valid_per_frame_repeats_each_angle():
    per_angle = np.arange(3 * 2 * 2).reshape(3, 2, 2) % 2 == 0
    out = valid_per_frame(per_angle, np.array([0, 2, 2, 5]))
    assert out.shape == (5, 2, 2)
    assert np.array_equal(out, per_angle[[0, 0, 2, 2, 2]])
    with pytest.raises(ValueError):
        valid_per_frame(per_angle, np.array([0, 5]))
