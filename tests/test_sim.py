"""Tests of the simulation building blocks: phantom, probe, scan grid, noise, presets."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from ptmpi.sim.noise import poisson_counts
from ptmpi.sim.phantom import (
    _MODIFIED_SHEPP_LOGAN_3D,
    DEFAULT_PHASE_SCALE,
    _euler_zxz,
    pure_phase_volume,
    shepp_logan_3d,
)
from ptmpi.sim.presets import PRESETS, SimulationSettings, angles_deg
from ptmpi.sim.probe import _design_field, focused_probe, measure_fwhm
from ptmpi.sim.scan import grid_positions, scan_positions_for_angles

# ---------------------------------------------------------------------------- phantom


def _phantom_reference(shape: tuple[int, int, int]) -> np.ndarray:
    """Slow, obvious evaluation: every ellipsoid over the full grid, no bounding boxes."""
    axes = [(np.arange(s) - (s - 1) / 2) * (2.0 / s) for s in shape]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    out = np.zeros(shape)
    for value, a, b, c, x0, y0, z0, phi, theta, psi in _MODIFIED_SHEPP_LOGAN_3D:
        rot = _euler_zxz(*np.deg2rad([phi, theta, psi]))
        d = np.stack([x - x0, y - y0, z - z0])
        q = np.einsum("ij,j...->i...", rot, d)
        out += value * ((q[0] / a) ** 2 + (q[1] / b) ** 2 + (q[2] / c) ** 2 <= 1.0)
    return out


@pytest.mark.parametrize("shape", [(24, 40, 32), (33, 33, 33), (64, 64, 64)])
def test_phantom_matches_full_grid_reference(shape):
    phi = shepp_logan_3d(shape, dtype=np.float64)
    assert phi.shape == shape
    np.testing.assert_allclose(phi, _phantom_reference(shape), rtol=0, atol=1e-9)


def test_phantom_values_and_dtype():
    phi = shepp_logan_3d((64, 64, 64))
    assert phi.dtype == np.float32
    # Exact tenths: background and ventricles are exactly 0, the skull exactly 1.
    np.testing.assert_array_equal(np.unique(phi), np.array([0.0, 0.2, 0.3, 1.0], np.float32))
    assert phi[0, 0, 0] == 0.0 and phi[32, 32, 32] == np.float32(0.2)
    assert not np.signbit(phi).any()


def test_phantom_orientation():
    n = 128
    phi = shepp_logan_3d((n, n, n))
    # Head semi-axes: 0.92 along y (axis 1), 0.81 along z (axis 0), 0.69 along x (axis 2).
    def extent(line: np.ndarray) -> float:
        inside = np.flatnonzero(line)
        return (inside[-1] - inside[0] + 1) / n

    c = n // 2
    assert abs(extent(phi[:, c, c]) - 0.81) < 0.02
    assert abs(extent(phi[c, :, c]) - 0.92) < 0.02
    assert abs(extent(phi[c, c, :]) - 0.69) < 0.02
    # The three small ellipsoids at table y = -0.605 sit at low axis-1 indices, ellipsoid 8
    # at table x = -0.08 at low axis-2 index (voxel 25 is y = -0.60, 58 is x = -0.086).
    assert phi[64, 25, 64] == np.float32(0.3)
    assert phi[64, 102, 64] == np.float32(0.2)  # the y-mirrored voxel holds only brain
    assert phi[64, 25, 58] == np.float32(0.3)
    assert phi[64, 25, 69] == np.float32(0.2)  # the x-mirrored voxel misses ellipsoid 10


def test_phantom_rejects_bad_shape():
    with pytest.raises(ValueError, match="shape"):
        shepp_logan_3d((8, 8))
    with pytest.raises(ValueError, match="shape"):
        shepp_logan_3d((8, 0, 8))


def test_pure_phase_volume():
    phi = shepp_logan_3d((32, 32, 32))
    u = pure_phase_volume(phi, phase_scale=0.7)
    assert u.dtype == np.complex64 and u.shape == phi.shape
    np.testing.assert_allclose(np.abs(u), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.angle(u), 0.7 * phi, atol=1e-6)
    assert np.all(u[phi == 0] == 1)
    assert pure_phase_volume(phi, dtype=np.complex128).dtype == np.complex128
    with pytest.raises(ValueError, match="complex"):
        pure_phase_volume(phi, dtype=np.float32)


def test_trivial_guess_snr_at_default_phase_scale():
    # Pins the docstring's warning: u = 1 already scores about 14.5 dB (SPEC 5 snr_db).
    u_true = pure_phase_volume(shepp_logan_3d((64, 64, 64)), DEFAULT_PHASE_SCALE)
    u_true = u_true.astype(np.complex128)
    zeta = u_true.mean()  # the best complex scale of u = 1
    snr = -10 * np.log10(np.sum(np.abs(zeta - u_true) ** 2) / (u_true.size * abs(zeta) ** 2))
    assert 14.3 < snr < 14.8


# ---------------------------------------------------------------------------- probe

PROBE_CASES = [(64, 14.0), (32, 7.0), (16, 4.0), (128, 30.0), (33, 7.5)]


@pytest.mark.parametrize(("m", "fwhm"), PROBE_CASES)
def test_probe_fwhm_shape_and_centre(m, fwhm):
    probe = focused_probe(m, fwhm)
    assert probe.shape == (m, m) and probe.dtype == np.complex64
    assert np.isfinite(probe).all()
    amp = np.abs(probe)
    assert abs(amp.max() - 1.0) < 1e-6
    assert abs(measure_fwhm(probe) / fwhm - 1.0) < 0.01
    # Centred at (m-1)/2: mirror-symmetric, maximum among the central pixel(s).
    np.testing.assert_allclose(amp, amp[::-1, ::-1], atol=1e-6)
    r, c = np.unravel_index(np.argmax(amp), amp.shape)
    assert max(abs(r - (m - 1) / 2), abs(c - (m - 1) / 2)) <= 0.5


@pytest.mark.parametrize(("m", "fwhm"), PROBE_CASES)
def test_probe_energy_stays_in_window(m, fwhm):
    field, window = _design_field(m, fwhm, 0.0)
    inside = np.sum(np.abs(field[window]) ** 2) / np.sum(np.abs(field) ** 2)
    assert inside > 0.995  # measured 0.998-0.999; a hard-edged pupil gives about 0.94
    # Little energy near the window edge, where the crop cuts the beam.
    probe = focused_probe(m, fwhm)
    b = m // 8
    energy = np.abs(probe) ** 2
    assert 1 - energy[b:-b, b:-b].sum() / energy.sum() < 0.01


@pytest.mark.parametrize("defocus", [-2.0, 1.5, math.pi])
def test_probe_with_defocus(defocus):
    probe = focused_probe(64, 14.0, defocus=defocus)
    assert abs(measure_fwhm(probe) / 14.0 - 1.0) < 0.01
    # The wavefront is curved: the phase varies across the bright core.
    core = np.abs(probe) > 0.5
    assert np.ptp(np.angle(probe[core])) > 0.3
    assert abs(np.abs(probe).max() - 1.0) < 1e-6


def test_probe_without_defocus_is_real():
    probe = focused_probe(32, 7.0)
    assert np.abs(probe.imag).max() < 1e-6


@pytest.mark.parametrize(
    ("m", "fwhm", "defocus", "match"),
    [
        (64, 1.0, 0.0, r"\(1, m/2\]"),
        (64, 32.5, 0.0, r"\(1, m/2\]"),
        (64, float("nan"), 0.0, r"\(1, m/2\]"),
        (16, 2.2, 0.0, "narrowest"),
        (64, 14.0, 4.0, "defocus"),
        (0, 4.0, 0.0, "positive integer"),
    ],
)
def test_probe_rejects_bad_arguments(m, fwhm, defocus, match):
    with pytest.raises(ValueError, match=match):
        focused_probe(m, fwhm, defocus=defocus)


def test_measure_fwhm_of_a_gaussian():
    sigma = 4.0
    x = np.arange(41) - 20.0
    beam = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))
    expected = 2 * math.sqrt(2 * math.log(2)) * sigma
    assert abs(measure_fwhm(beam) / expected - 1.0) < 0.01
    # Elliptic beam: the mean of the row and column widths.
    wide = np.exp(-(x[:, None] ** 2) / (2 * sigma**2) - x[None, :] ** 2 / (2 * (2 * sigma) ** 2))
    assert abs(measure_fwhm(wide) / (1.5 * expected) - 1.0) < 0.01


def test_measure_fwhm_rejects_unmeasurable():
    with pytest.raises(ValueError, match="half its maximum"):
        measure_fwhm(np.ones((8, 8)))
    with pytest.raises(ValueError, match="all zero"):
        measure_fwhm(np.zeros((8, 8)))


# ---------------------------------------------------------------------------- scan


def _chessboard_coverage(positions: np.ndarray, image_shape, m: int) -> np.ndarray:
    """Chessboard distance from every image pixel to its nearest window centre."""
    nz, n = image_shape
    rows, cols = np.arange(nz, dtype=float), np.arange(n, dtype=float)
    dist = np.full(image_shape, np.inf)
    for r, c in positions + (m - 1) / 2:
        d = np.maximum(np.abs(rows - r)[:, None], np.abs(cols - c)[None, :])
        np.minimum(dist, d, out=dist)
    return dist


def _windows_touch(positions: np.ndarray, image_shape, m: int) -> bool:
    nz, n = image_shape
    r, c = positions[:, 0], positions[:, 1]
    return bool(np.all((r + m > 0) & (r < nz) & (c + m > 0) & (c < n)))


GRID_CASES = [
    # (nz, n, m, step)
    (128, 128, 64, 32),
    (128, 128, 64, 4),
    (96, 160, 32, 24),
    (97, 130, 32, 7),
    (32, 32, 16, 8),
    (40, 40, 16, 16),  # step == m
    (40, 50, 8, 13),  # step > m: edge corners clipped
    (10, 12, 4, 1),
]


@pytest.mark.parametrize(("nz", "n", "m", "step"), GRID_CASES)
def test_grid_covers_image_and_windows_touch(nz, n, m, step):
    pos = grid_positions((nz, n), m, step)
    assert pos.dtype == np.float64 and pos.ndim == 2 and pos.shape[1] == 2
    np.testing.assert_array_equal(pos, np.round(pos))
    assert _windows_touch(pos, (nz, n), m)
    assert _chessboard_coverage(pos, (nz, n), m).max() <= step / 2
    assert len(np.unique(pos, axis=0)) == len(pos)
    # Raster order: rows outer, columns inner.
    k_col = len(np.unique(pos[:, 1]))
    np.testing.assert_array_equal(pos[:k_col, 0], pos[0, 0])


def test_grid_paper_case_counts_and_symmetry():
    pos = grid_positions((128, 128), 64, 32)
    assert len(pos) == 25  # 5 x 5: corners -32, 0, 32, 64, 96 (centres -0.5 .. 127.5)
    np.testing.assert_array_equal(np.unique(pos[:, 0]), [-32, 0, 32, 64, 96])
    # nz - m even: the grid is mirror-symmetric about the image centre.
    centres = np.unique(pos[:, 1]) + 31.5
    np.testing.assert_array_equal(centres + centres[::-1], 127.0)
    assert len(grid_positions((128, 128), 64, 4)) == 33 * 33
    assert len(grid_positions((128, 128), 64, 128)) == 4  # one step spans the image: 2 x 2


def test_grid_non_square():
    pos = grid_positions((96, 160), 32, 24)
    k_row, k_col = len(np.unique(pos[:, 0])), len(np.unique(pos[:, 1]))
    assert (k_row, k_col) == (5, 8)  # ceil(95/24)+1, ceil(159/24)+1
    assert len(pos) == 40


@pytest.mark.parametrize("jitter", [0.3, 0.7, 2.0, 3.4])
def test_grid_jitter_subpixel_and_bounded(jitter, rng):
    shape, m, step = (64, 80), 16, 8
    base = grid_positions(shape, m, step)
    pos = grid_positions(shape, m, step, jitter=jitter, rng=rng)
    offset = pos - base
    # not rounded: fractional parts spread over (0, 1), offsets fill (-jitter, jitter)
    fraction = pos - np.floor(pos)
    assert np.count_nonzero(fraction) == fraction.size
    assert fraction.std() > 0.2
    assert np.abs(offset).max() <= jitter
    assert np.abs(offset).max() > 0.8 * jitter
    assert _windows_touch(pos, shape, m)


def test_grid_jitter_reproducible_and_needs_rng():
    a = grid_positions((64, 64), 16, 8, jitter=2.0, rng=np.random.default_rng(5))
    b = grid_positions((64, 64), 16, 8, jitter=2.0, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="rng"):
        grid_positions((64, 64), 16, 8, jitter=2.0)


def test_grid_jitter_at_edges_keeps_windows_touching(rng):
    # Jitter larger than the overhang margin: clipping keeps every window on the image.
    pos = grid_positions((32, 32), 4, 4, jitter=6.0, rng=rng)
    assert _windows_touch(pos, (32, 32), 4)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (((64, 64), 65, 8), "probe size"),
        (((64, 32), 40, 8), "probe size"),
        (((64, 64), 16, 0), "step"),
        (((64, 64), 16, 8.0), "step"),
        (((64,), 16, 8), "image_shape"),
    ],
)
def test_grid_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        grid_positions(*args)
    with pytest.raises(ValueError, match="jitter"):
        grid_positions((64, 64), 16, 8, jitter=-1.0)


def test_scan_positions_for_angles(rng):
    shape, m, step, n_angles = (32, 48), 16, 8, 3
    pos, off = scan_positions_for_angles(shape, m, step, n_angles)
    per_angle = grid_positions(shape, m, step)
    assert off.dtype == np.int64
    np.testing.assert_array_equal(off, np.arange(n_angles + 1) * len(per_angle))
    np.testing.assert_array_equal(pos, np.tile(per_angle, (n_angles, 1)))
    jittered, off_j = scan_positions_for_angles(shape, m, step, n_angles, jitter=2.0, rng=rng)
    np.testing.assert_array_equal(off_j, off)
    blocks = np.split(jittered, off_j[1:-1])
    assert not np.array_equal(blocks[0], blocks[1])  # independent jitter per angle
    with pytest.raises(ValueError, match="n_angles"):
        scan_positions_for_angles(shape, m, step, 0)


# ---------------------------------------------------------------------------- noise


def test_poisson_counts_statistics(rng):
    eta, level = 2.5, 3.0
    intensity = np.full((200, 32, 32), level, dtype=np.float32)
    counts = poisson_counts(intensity, eta, rng)
    assert counts.dtype == np.float32 and counts.shape == intensity.shape
    np.testing.assert_array_equal(counts, np.round(counts))
    assert abs(counts.mean() / (eta * level) - 1) < 0.02
    assert abs(counts.var() / (eta * level) - 1) < 0.03


def test_poisson_counts_noise_free_is_identity(rng):
    intensity = np.abs(rng.standard_normal((4, 8, 8))).astype(np.float32)
    out = poisson_counts(intensity, None, rng)
    assert out.dtype == np.float32
    assert np.shares_memory(out, intensity)  # no copy for float32 input
    np.testing.assert_array_equal(out, intensity)
    np.testing.assert_array_equal(poisson_counts(intensity.astype(np.float64), None, rng),
                                  intensity)


@pytest.mark.parametrize("eta", [0.0, -1.0, float("nan"), float("inf"), "1"])
def test_poisson_counts_rejects_bad_eta(eta, rng):
    with pytest.raises(ValueError, match="eta"):
        poisson_counts(np.ones((2, 2)), eta, rng)


def test_poisson_counts_rejects_bad_intensity(rng):
    with pytest.raises(ValueError, match="intensity"):
        poisson_counts(np.array([[1.0, -0.5]]), 1.0, rng)
    with pytest.raises(ValueError, match="intensity"):
        poisson_counts(np.array([[1.0, np.nan]]), 1.0, rng)


# ---------------------------------------------------------------------------- presets


def test_presets_content():
    assert set(PRESETS) == {
        "paper-s32-a12", "paper-s32-a48", "paper-s4-a12",
        "paper-s32-a12-eta1", "paper-s32-a12-eta0.1", "demo",
    }  # fmt: skip
    base = PRESETS["paper-s32-a12"]
    assert (base.n, base.nz, base.n_angles, base.step, base.probe_size, base.fwhm) == (
        128, 128, 12, 32, 64, 14.0
    )
    assert base.eta is None and base == SimulationSettings()
    assert PRESETS["paper-s32-a48"] == dataclasses.replace(base, n_angles=48)
    assert PRESETS["paper-s4-a12"] == dataclasses.replace(base, step=4)
    assert PRESETS["paper-s32-a12-eta1"].eta == 1.0
    assert PRESETS["paper-s32-a12-eta0.1"].eta == 0.1
    demo = PRESETS["demo"]
    assert (demo.n, demo.nz, demo.n_angles, demo.probe_size, demo.fwhm, demo.step) == (
        32, 32, 8, 16, 4.0, 8
    )
    for s in PRESETS.values():
        assert s.seed == 0 and s.phase_scale == DEFAULT_PHASE_SCALE and s.jitter == 0.0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_probe_and_scan(name):
    s = PRESETS[name]
    assert SimulationSettings(**s.to_dict()) == s
    probe = focused_probe(s.probe_size, s.fwhm)
    assert abs(measure_fwhm(probe) / s.fwhm - 1) < 0.01
    pos, off = scan_positions_for_angles((s.nz, s.n), s.probe_size, s.step, s.n_angles)
    assert off[-1] == len(pos) and len(off) == s.n_angles + 1


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"probe_size": 33}, "probe_size"),
        ({"nz": 8}, "probe_size"),
        ({"step": 0}, "step"),
        ({"n_angles": 0}, "n_angles"),
        ({"fwhm": 1.0}, "fwhm"),
        ({"fwhm": 8.5}, "fwhm"),
        ({"eta": 0.0}, "eta"),
        ({"eta": -1.0}, "eta"),
        ({"eta": float("nan")}, "eta"),
        ({"jitter": -0.5}, "jitter"),
        ({"seed": -1}, "seed"),
        ({"n": 32.5}, "n must"),
        ({"phase_scale": float("inf")}, "phase_scale"),
    ],
)
def test_settings_reject_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(PRESETS["demo"], **changes)


def test_settings_normalise_numbers():
    s = dataclasses.replace(PRESETS["demo"], fwhm=5, eta=2, n=np.int64(32))
    assert isinstance(s.fwhm, float) and isinstance(s.eta, float) and type(s.n) is int
    assert s.to_dict()["eta"] == 2.0


def test_angles_deg():
    np.testing.assert_array_equal(angles_deg(4), [0.0, 45.0, 90.0, 135.0])
    a = angles_deg(12)
    assert a.dtype == np.float64 and len(a) == 12 and a[-1] < 180.0
    with pytest.raises(ValueError, match="n_angles"):
        angles_deg(0)
