"""Sub-pixel scan positions (SPEC 8): exact adjoints, an independent forward model, whole
pixels unchanged, compiled against numpy paths, the probe update, spiral scans, and the
R-factor gained over rounding."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from ptmpi.cli import main
from ptmpi.io.cxi import FRAME_OFFSET, POSITIONS
from ptmpi.io.validate import validate_input
from ptmpi.metrics import r_factor
from ptmpi.operators import kernels
from ptmpi.operators.dottest import DOT_TOL, dottest, random_array
from ptmpi.operators.model import JointModel
from ptmpi.operators.ptycho import Ptycho, fourier_shift
from ptmpi.parallel.comm import SerialComm
from ptmpi.sim.presets import SimulationSettings
from ptmpi.sim.probe import focused_probe
from ptmpi.sim.scan import grid_positions, scan_positions_for_angles, spiral_positions
from ptmpi.sim.simulate import simulate
from ptmpi.solvers.admm import probe_from_views


def _subpixel_case(rng, dtype=np.complex64):
    """Two angles of a (14, 17) image, M = 6, windows over every edge, a mix of whole and
    sub-pixel corners (negative ones included)."""
    m, image = 6, (14, 17)
    positions = rng.uniform(-(m - 1), [image[0] - 1, image[1] - 1], size=(13, 2))
    positions[0] = [3.0, 4.0]  # whole pixels
    positions[5] = [-2.0, 7.25]  # whole along one axis only
    positions[9] = [-4.5, -0.5]
    probe = random_array((m, m), dtype, rng)
    return Ptycho(probe, positions, [0, 6, 13], image)


def _loop_reference(probe, positions, frame_offset, images):
    """Slow reference: frame by frame, the probe shifted by numpy's own FFT, times the
    window cut at the floor corner from a zero-padded image."""
    m = probe.shape[0]
    pad = 2 * m
    n_theta = len(frame_offset) - 1
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    k = np.fft.fftfreq(m)
    out = np.empty((len(positions), m, m), dtype=images.dtype)
    for a in range(n_theta):
        for j in range(frame_offset[a], frame_offset[a + 1]):
            corner = np.floor(positions[j]).astype(int)
            fr, fc = positions[j] - corner
            ramp = np.exp(-2j * np.pi * (fr * k[:, None] + fc * k[None, :]))
            omega_j = np.fft.ifft2(np.fft.fft2(probe.astype(np.complex128)) * ramp)
            window = padded[a, pad + corner[0] : pad + corner[0] + m,
                            pad + corner[1] : pad + corner[1] + m]
            out[j] = omega_j.astype(images.dtype) * window
    return out


def test_subpixel_dottest(cdtype, rng, xp):
    op = _subpixel_case(rng, cdtype)
    assert op.subpixel and op.probes(op.probe)[0].shape[0] == 13  # 12 sub-pixel + omega
    assert dottest(op.fwd, op.adj, op.image_stack_shape, op.data_shape, cdtype, rng,
                   xp) < DOT_TOL[cdtype]


def test_subpixel_joint_model_dottest_and_pointwise_normal(rng):
    dtype = np.complex128
    shape = (10, 16, 16)
    positions, offset = scan_positions_for_angles((10, 16), 8, 4, 3, jitter=1.3, rng=rng)
    model = JointModel(shape, [0.0, 0.9, 2.0], focused_probe(8, 3.0), positions, offset,
                       dtype=dtype)
    assert model.ptycho.subpixel
    assert dottest(model.fwd, model.adj, shape, model.data_shape, dtype,
                   rng) < DOT_TOL[np.dtype(dtype)]
    # D^H D = sum_t P_t^H W_t P_t with a pointwise W built from the shifted probes
    u = random_array(shape, dtype, rng)
    normal = model.normal(u, model.illumination())
    direct = model.adj(model.fwd(u))
    assert np.abs(normal - direct).max() <= 1e-12 * np.abs(direct).max()


def test_subpixel_equals_slow_reference(rng):
    op = _subpixel_case(rng, np.complex128)
    v = random_array(op.image_stack_shape, np.complex128, rng)
    ref = _loop_reference(op.probe, op.positions, op.frame_offset, v)
    assert np.abs(op.fwd(v) - ref).max() <= 1e-13 * np.abs(ref).max()


def _gauss(x, y, x0, y0, sigma):
    return np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma**2))


def test_subpixel_matches_an_independent_shifted_image_model(rng):
    """The SPEC form: the band-limited image shifted by the fraction, cut at the integer
    corner, times the *unshifted* probe. Here the image and the probe are sums of Gaussians
    evaluated analytically at the shifted coordinates (no FFT, no shifted probe). The
    operator's exit wave is that one translated by the fraction, so the far fields agree up
    to the phase ramp ``exp(2 pi i k . f)``, as long as the exit wave is band-limited and
    vanishes at the window's edge.

    Tolerance: probe sigma 2 px, blobs sigma 4 px; the exit wave's spectrum (a Gaussian of
    sigma 1 / (2 pi) sqrt(1/4 + 1/16) cycles/px) is 1e-7 of its peak at Nyquist, and the probe
    is 1e-7 of its peak at the window's edge (11 px from its centre); 1e-5 of the largest
    far-field value leaves room for both, while rounding the positions (checked below)
    misses by more than 1e-2.
    """
    m, image = 24, (64, 64)
    rows, cols = np.mgrid[0 : image[0], 0 : image[1]].astype(np.float64)
    blobs = [(rng.uniform(26, 38), rng.uniform(26, 38), rng.uniform(0.5, 1.5),
              rng.uniform(-np.pi, np.pi)) for _ in range(4)]

    def sample(y, x):  # the analytic image: complex Gaussian blobs of sigma 4 px
        return sum(a * np.exp(1j * ph) * _gauss(x, y, x0, y0, 4.0) for y0, x0, a, ph in blobs)

    c0 = (m - 1) / 2
    ii, jj = np.mgrid[0:m, 0:m].astype(np.float64)
    probe = _gauss(jj, ii, c0, c0, 2.0) * np.exp(0.3j * (ii - c0))
    positions = np.array([[20.3, 21.7], [19.0, 28.45], [28.9, 18.05], [25.5, 25.5],
                          [44.6, 47.2], [-5.75, 30.4]])  # the last two hang over the edge
    op = Ptycho(probe, positions, [0, len(positions)], image)
    d_op = np.fft.fft2(op.fwd(sample(rows, cols)[None]), norm="ortho")

    corners = np.floor(positions)
    fractions = positions - corners
    k = np.fft.fftfreq(m)
    d_indep = np.empty_like(d_op)
    for j, ((r, c), (fr, fc)) in enumerate(zip(corners, fractions, strict=True)):
        wave = probe * sample(r + fr + ii, c + fc + jj)
        ramp = np.exp(-2j * np.pi * (fr * k[:, None] + fc * k[None, :]))
        d_indep[j] = np.fft.fft2(wave, norm="ortho") * ramp
    scale = np.abs(d_indep).max()
    assert np.abs(d_op - d_indep).max() <= 1e-5 * scale
    # intensities, the measured quantity, agree without the ramp
    assert np.abs(np.abs(d_op) - np.abs(d_indep)).max() <= 1e-5 * scale
    rounded = Ptycho(probe, np.rint(positions), [0, len(positions)], image)
    d_rounded = np.fft.fft2(rounded.fwd(sample(rows, cols)[None]), norm="ortho")
    assert np.abs(np.abs(d_rounded) - np.abs(d_indep)).max() > 1e-2 * scale


def test_whole_pixels_unchanged_bit_for_bit(rng, monkeypatch):
    m, image = 6, (14, 17)
    positions = rng.integers(-(m - 1), 13, size=(9, 2))
    probe = random_array((m, m), np.complex64, rng)
    v = random_array((2, *image), np.complex64, rng)
    psi = random_array((9, m, m), np.complex64, rng)
    offset = [0, 4, 9]
    op = Ptycho(probe, positions, offset, image)
    assert not op.subpixel
    # a float copy, and one off by float noise far below SNAP_PX, are whole pixels too
    for other in (positions.astype(np.float64), positions + 1e-9 * rng.standard_normal((9, 2))):
        same = Ptycho(probe, other, offset, image)
        assert not same.subpixel
        np.testing.assert_array_equal(same.fwd(v), op.fwd(v))
    probes, index = op.probes(v)
    assert probes.shape == (1, m, m) and np.all(index == 0)
    np.testing.assert_array_equal(probes[0], probe)
    # the whole-pixel frames of a mixed scan keep omega itself, on either path
    mixed_positions = positions.astype(np.float64)
    mixed_positions[[1, 6]] += [0.5, 0.25]
    mixed = Ptycho(probe, mixed_positions, offset, image)
    whole = np.setdiff1d(np.arange(9), [1, 6])
    for compiled in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", compiled and kernels.numba is not None)
        np.testing.assert_array_equal(mixed.fwd(v)[whole], op.fwd(v)[whole])
        assert np.abs(mixed.fwd(v)[[1, 6]] - op.fwd(v)[[1, 6]]).max() > 1e-2
    # the numpy path is the integer-position formula itself
    np.testing.assert_array_equal(op.fwd(v), probe * op.extract(v))
    np.testing.assert_array_equal(op.adj(psi), op.scatter(probe.conj() * psi))


@pytest.mark.skipif(not kernels.ENABLED, reason="Numba is not installed")
def test_subpixel_compiled_equals_numpy_path(cdtype, rng, monkeypatch):
    op = _subpixel_case(rng, cdtype)
    v = random_array(op.image_stack_shape, cdtype, rng)
    psi = random_array(op.data_shape, cdtype, rng)
    compiled = (op.fwd(v), op.adj(psi))
    monkeypatch.setattr(kernels, "ENABLED", False)
    reference = (op.fwd(v), op.adj(psi))
    tol = 1e-6 if cdtype == np.complex64 else 1e-14
    for a, b in zip(compiled, reference, strict=True):
        assert a.dtype == b.dtype == cdtype
        assert np.abs(a - b).max() <= tol * np.abs(b).max()


def test_illumination_of_shifted_probes(rng):
    op = _subpixel_case(rng, np.complex128)
    probes, index = op.probes(op.probe)
    w = op.illumination()
    np.testing.assert_allclose(w, op.scatter(np.abs(probes[index]) ** 2 + 0j).real,
                               rtol=1e-12, atol=1e-12 * w.max())
    # a unitary shift keeps each probe's energy: W sums to (frames) x ||omega||^2 inside
    # the image; with windows off the edge, less
    assert w.sum() < op.n_frames * np.sum(np.abs(op.probe) ** 2)


def test_probe_refresh_after_update(rng):
    op = _subpixel_case(rng, np.complex128)
    v = random_array(op.image_stack_shape, np.complex128, rng)
    before = op.fwd(v)
    op.probe = 2 * op.probe
    np.testing.assert_allclose(op.fwd(v), 2 * before, rtol=1e-12, atol=0)


def test_fourier_shift_is_unitary_and_moves_by_whole_pixels(rng):
    x = random_array((3, 8, 8), np.complex128, rng)
    shifts = np.array([[0.3, -0.7], [1.0, 2.0], [0.0, 0.5]])
    y = fourier_shift(x, shifts)
    np.testing.assert_allclose(np.linalg.norm(y, axis=(1, 2)), np.linalg.norm(x, axis=(1, 2)),
                               rtol=1e-13)
    np.testing.assert_allclose(fourier_shift(y, -shifts), x, atol=1e-13)
    np.testing.assert_allclose(y[1], np.roll(x[1], (1, 2), axis=(0, 1)), atol=1e-13)


def test_unshift_sum_is_the_adjoint_of_the_probe_shifts(cdtype, rng):
    op = _subpixel_case(rng, cdtype)
    m = op.m
    assert dottest(lambda p: fourier_shift(p, op.fractions).astype(cdtype), op.unshift_sum,
                   (m, m), op.data_shape, cdtype, rng) < DOT_TOL[cdtype]
    # real frames give the real part, in float64
    frames = np.abs(random_array(op.data_shape, cdtype, rng))
    total = op.unshift_sum(frames)
    assert total.dtype == np.float64
    np.testing.assert_allclose(total, op.unshift_sum(frames + 0j).real, rtol=1e-12,
                               atol=1e-12 * np.abs(total).max())


def test_probe_update_on_subpixel_data_beats_rounding(rng):
    """Exit waves made with the exact sub-pixel operator and a known probe; the closed-form
    probe update with each frame mapped back by its shift recovers the probe far better
    than the update on rounded positions does."""
    m, image = 16, (48, 48)
    rows, cols = np.mgrid[0 : image[0], 0 : image[1]]
    phase = sum(rng.uniform(0.2, 0.6) * np.cos(2 * np.pi * (kr * rows + kc * cols) / 48 + ph)
                for kr, kc, ph in rng.uniform([-3, -3, 0], [3, 3, 6.28], size=(5, 3)))
    amplitude = 0.85 + 0.1 * np.cos(2 * np.pi * (2 * rows + cols) / 48)
    v = (amplitude * np.exp(1j * phase))[None].astype(np.complex128)
    truth = focused_probe(m, 4.0).astype(np.complex128)
    positions = grid_positions(image, m, 4, jitter=1.5, rng=rng)
    offset = [0, len(positions)]
    exact = Ptycho(truth, positions, offset, image)
    target = np.fft.fft2(exact.fwd(v), norm="ortho")
    comm = SerialComm()
    guess = np.ones((m, m), np.complex128)
    op = Ptycho(guess, positions, offset, image)
    recovered = probe_from_views(op.extract(v), target, comm, ptycho=op)
    op_rounded = Ptycho(guess, np.rint(positions), offset, image)
    recovered_rounded = probe_from_views(op_rounded.extract(v), target, comm)
    norm = np.linalg.norm(truth)
    err = np.linalg.norm(recovered - truth) / norm
    err_rounded = np.linalg.norm(recovered_rounded - truth) / norm
    print(f"probe error: exact {err:.4f}, rounded {err_rounded:.4f}")
    assert err < 0.2 * err_rounded
    assert err < 0.02
    # without sub-pixel positions the update is the plain closed form, unchanged
    whole = Ptycho(guess, np.rint(positions), offset, image)
    np.testing.assert_array_equal(probe_from_views(whole.extract(v), target, comm, whole),
                                  recovered_rounded)


def test_probe_normal_is_the_shifted_weighting_moved_back(cdtype, rng):
    """Ptycho.probe_normal(x, w) = sum_j shift_j^H(w_j shift_j(x)), formed frame by frame."""
    op = _subpixel_case(rng, cdtype)
    x = random_array((op.m, op.m), np.complex128, rng)
    weights = np.abs(random_array(op.data_shape, cdtype, rng)) ** 2
    per_frame = fourier_shift(x, op.fractions) * weights
    expected = op.unshift_sum(per_frame)
    got = op.probe_normal(x, weights)
    tol = 1e-5 if cdtype == np.complex64 else 1e-12
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol * np.abs(expected).max())


@pytest.mark.parametrize("m", [6, 7])
def test_probe_normal_operator_is_the_frame_by_frame_normal(m, cdtype, rng):
    """The convolution form (ProbeNormal, kernel built once) against Ptycho.probe_normal,
    frame by frame: even and odd M, whole and sub-pixel frames, windows over the edges;
    one probe or a stack of modes; its denominator is the moved-back sum of the weights;
    kernels built from parts of the frames add up (the sum over ranks)."""
    image = (15, 17)
    positions = rng.uniform(-(m - 1), [image[0] - 1, image[1] - 1], size=(13, 2))
    positions[0] = [3.0, 4.0]  # whole pixels
    positions[5] = [-2.0, 7.25]  # whole along one axis only
    offset = [0, 6, 13]
    op = Ptycho(random_array((m, m), cdtype, rng), positions, offset, image)
    weights = np.abs(random_array(op.data_shape, cdtype, rng)) ** 2
    x = random_array((3, m, m), np.complex128, rng)
    normal = op.probe_normal_operator(weights)
    got = normal(x)
    assert got.dtype == np.complex128 and got.shape == x.shape
    tol = 1e-5 if cdtype == np.complex64 else 1e-12
    for k in range(3):
        expected = op.probe_normal(x[k], weights)
        np.testing.assert_allclose(got[k], expected, rtol=0, atol=tol * np.abs(expected).max())
    np.testing.assert_allclose(normal(x[1]), got[1], rtol=0, atol=1e-12 * np.abs(got).max())
    den = op.unshift_sum(weights)
    np.testing.assert_allclose(normal.denominator(), den, rtol=0, atol=tol * np.abs(den).max())
    # two ranks' kernels (frames 0-5 and 6-12) summed: the kernel of all frames
    parts = [Ptycho(op.probe, positions[a:b], [0, b - a], image).probe_normal_operator(
        weights[a:b]) for a, b in ((0, 6), (6, 13))]
    # (sums over frames in double)
    np.testing.assert_allclose(parts[0].kernel + parts[1].kernel, normal.kernel, rtol=0,
                               atol=1e-12 * np.abs(normal.kernel).max())
    np.testing.assert_allclose(parts[0].whole + parts[1].whole, normal.whole, rtol=1e-12)


def test_unshift_sum_of_a_product_formed_by_chunks(cdtype, rng):
    """unshift_sum(frames, factor) = unshift_sum(conj(factor) * frames), with and without
    sub-pixel frames."""
    op = _subpixel_case(rng, cdtype)
    frames = random_array(op.data_shape, cdtype, rng)
    factor = random_array(op.data_shape, cdtype, rng)
    tol = 1e-6 if cdtype == np.complex64 else 1e-13
    for ptycho in (op, Ptycho(op.probe, op.corners, op.frame_offset, op.image_shape)):
        expected = ptycho.unshift_sum(np.conj(factor) * frames)
        got = ptycho.unshift_sum(frames, factor=factor)
        assert got.dtype == np.complex128
        np.testing.assert_allclose(got, expected, rtol=0, atol=tol * np.abs(expected).max())


def test_probe_update_with_windows_over_the_edge_solves_the_least_squares_probe(rng):
    """Windows hanging over the image edge read zeros, so |v_j|^2 is far from locally
    constant, where the earlier closed form (numerator and |v_j|^2 each moved back by
    Fourier interpolation) is only approximate; its probe updates were no descent steps
    and --refine-probe on jittered scans diverged. The update now solves the normal
    equations: from exit waves of a known probe it returns that probe."""
    m, image = 16, (40, 40)
    rows, cols = np.mgrid[0 : image[0], 0 : image[1]]
    v = (np.exp(1j * 0.5 * np.cos(2 * np.pi * (3 * rows + 2 * cols) / 40))
         * (0.9 + 0.1 * np.sin(2 * np.pi * rows / 40)))[None].astype(np.complex128)
    truth = focused_probe(m, 4.0).astype(np.complex128)
    positions = rng.uniform(-(m - 3), image[0] - 3, size=(60, 2))  # many over the edge
    offset = [0, len(positions)]
    target = np.fft.fft2(Ptycho(truth, positions, offset, image).fwd(v), norm="ortho")
    op = Ptycho(np.ones((m, m), np.complex128), positions, offset, image)
    views = op.extract(v)
    recovered = probe_from_views(views, target, SerialComm(), ptycho=op)
    err = np.linalg.norm(recovered - truth) / np.linalg.norm(truth)
    # the earlier closed form on the same frames
    back = np.fft.ifft2(target, norm="ortho")
    earlier = op.unshift_sum(np.conj(views) * back) / op.unshift_sum(np.abs(views) ** 2)
    err_earlier = np.linalg.norm(earlier - truth) / np.linalg.norm(truth)
    print(f"probe error: least squares {err:.2e}, earlier closed form {err_earlier:.2e}")
    assert err < 1e-3 and err < 0.1 * err_earlier


# ---------------------------------------------------------------------------- scans


def _floor_windows_inside(positions, image_shape, m) -> bool:
    corners = np.floor(positions)
    return bool(np.all((corners + m > 0) & (corners < np.array(image_shape))))


@pytest.mark.parametrize(("image", "m", "step"), [((64, 80), 16, 8), ((40, 40), 8, 12)])
def test_spiral_density_coverage_and_windows(image, m, step, rng):
    pos = spiral_positions(image, m, step, rng, jitter=0.5)
    assert pos.dtype == np.float64 and _floor_windows_inside(pos, image, m)
    # sub-pixel, not rounded (but for corners clipped to the edge when step > m)
    free = (pos > -(m - 1)) & (pos < np.array(image) - 1)
    assert np.all((pos - np.floor(pos))[free] != 0) and free.mean() > 0.9
    expected = (image[0] + step) * (image[1] + step) / step**2  # one per step^2 of area
    assert 0.85 * expected <= len(pos) <= 1.15 * expected
    # every pixel of the image has a window centre within one step
    centres = pos + (m - 1) / 2
    pix = np.stack(np.mgrid[0 : image[0], 0 : image[1]], axis=-1).reshape(-1, 1, 2)
    nearest = np.sqrt(((pix - centres[None]) ** 2).sum(-1)).min(axis=1)
    assert nearest.max() <= step
    # no two centres closer than a third of the step (no clumping, unlike random points)
    gaps = np.sqrt(((centres[:, None] - centres[None]) ** 2).sum(-1))
    assert gaps[~np.eye(len(centres), dtype=bool)].min() > step / 3 - 2 * 0.5


def test_spiral_differs_per_angle_and_is_reproducible():
    image, m, step = (32, 48), 8, 6
    pos, off = scan_positions_for_angles(image, m, step, 3, rng=np.random.default_rng(4),
                                         scan="spiral")
    again, off2 = scan_positions_for_angles(image, m, step, 3, rng=np.random.default_rng(4),
                                            scan="spiral")
    np.testing.assert_array_equal(pos, again)
    np.testing.assert_array_equal(off, off2)
    assert off[0] == 0 and off[-1] == len(pos) and np.all(np.diff(off) > 0)
    blocks = np.split(pos, off[1:-1])
    for a in range(2):
        assert len(blocks[a]) != len(blocks[a + 1]) or not np.allclose(blocks[a], blocks[a + 1])
    with pytest.raises(ValueError, match="rng"):
        scan_positions_for_angles(image, m, step, 3, scan="spiral")
    with pytest.raises(ValueError, match="scan"):
        scan_positions_for_angles(image, m, step, 3, rng=np.random.default_rng(4), scan="hex")


# ---------------------------------------------------------------------------- the gain


def _true_model_r_factors(settings):
    """R-factor of the true volume through the model with exact and with rounded
    positions (SPEC 5), against the simulated counts."""
    data = simulate(settings)
    s = settings
    shape = (s.nz, s.n, s.n)
    counts = np.fft.ifftshift(data.counts, axes=(-2, -1))
    theta = np.deg2rad(data.angles_deg)
    out = []
    for positions in (data.positions_px, np.rint(data.positions_px)):
        model = JointModel(shape, theta, data.probe, positions, data.frame_offset)
        out.append(r_factor(model.fwd(data.volume), counts))
    return out


@pytest.mark.parametrize("scan", ["grid", "spiral"])
def test_true_volume_r_factor_exact_versus_rounded(scan):
    settings = SimulationSettings(n=32, nz=24, n_angles=3, step=6, probe_size=16, fwhm=4.0,
                                  eta=None, seed=2, jitter=1.0, scan=scan)
    exact, rounded = _true_model_r_factors(settings)
    print(f"R-factor of the true volume ({scan}): exact {exact:.2e}, rounded {rounded:.4f}")
    # noise-free: the exact positions reproduce the data to float32 rounding
    assert exact < 1e-5
    assert rounded > 1e-2
    assert rounded > 1000 * exact


def test_simulate_cli_spiral_with_subpixel_jitter(tmp_path, capsys):
    path = tmp_path / "spiral.h5"
    assert main(["simulate", "-o", str(path), "--n", "24", "--nz", "16", "--angles", "3",
                 "--step", "5", "--probe-size", "8", "--fwhm", "3", "--jitter", "0.4",
                 "--scan", "spiral"]) == 0
    with h5py.File(path, "r") as f:
        pos, offset = f[POSITIONS][...], f[FRAME_OFFSET][...]
    assert len(pos) == offset[-1] and np.count_nonzero(pos - np.rint(pos)) > 0.9 * pos.size
    assert _floor_windows_inside(pos, (16, 24), 8)
    assert main(["info", str(path)]) == 0
    assert "modelled exactly" in capsys.readouterr().out
    # validation judges the window at the floor corner, as the operators cut it
    for row, problems in ((-7.0 + 0.5, 0), (-7.0 - 1e-9, 0), (-7.0 - 0.5, 1)):
        with h5py.File(path, "r+") as f:
            f[POSITIONS][0] = [row, 3.0]
        found = validate_input(path)
        assert len(found) == problems, found
        assert all("entirely outside" in line for line in found)


def test_memory_prediction_counts_one_probe_per_frame():
    """Sub-pixel scans add one far-field stack (the per-frame probes) to the prediction,
    and the measured peak of a short APTs run grows by about that much."""
    import tracemalloc

    from ptmpi.memory import predict_arrays
    from ptmpi.solvers.admm import LocalProblem, SolverSettings, solve

    peaks = []
    for jitter in (0.0, 0.0, 1.0):  # the first run only warms up lazy imports and caches
        data = simulate(SimulationSettings(n=32, nz=24, n_angles=4, step=4, probe_size=16,
                                           fwhm=4.0, jitter=jitter, seed=1))
        counts = np.fft.ifftshift(data.counts, axes=(-2, -1)).astype(np.float32)
        problem = LocalProblem(data.volume.shape, np.deg2rad(data.angles_deg), counts,
                               data.positions_px, data.frame_offset, data.probe)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            solve(problem, SolverSettings(algorithm="apts", iterations=2), SerialComm())
            peaks.append(tracemalloc.get_traced_memory()[1] - base)
        finally:
            tracemalloc.stop()
    stack = counts.shape[0] * 16 * 16 * np.dtype(np.complex64).itemsize
    args = (data.volume.shape, counts.shape[0], 16, 4, "apts")
    extra = (predict_arrays(*args, subpixel=True)["solver"]
             - predict_arrays(*args)["solver"])
    assert extra == stack
    print(f"sub-pixel extra peak: {(peaks[2] - peaks[1]) / stack:.2f} stacks")
    assert 0.6 * stack < peaks[2] - peaks[1] < 1.4 * stack


@pytest.mark.skipif(not kernels.ENABLED, reason="Numba is not installed")
def test_subpixel_illumination_does_not_depend_on_the_angle_split(rng):
    """W of a block of angles is the same, bit for bit, whichever other angles the operator
    holds (as on the ranks of an MPI run), so sub-pixel runs do not depend on the rank count."""
    image, m = (24, 32), 8
    positions, offset = scan_positions_for_angles(image, m, 3, 5, jitter=0.7, rng=rng,
                                                  scan="spiral")
    probe = focused_probe(m, 3.0).astype(np.complex64)
    full = Ptycho(probe, positions, offset, image).illumination(np.float32)
    for a0, a1 in ((0, 2), (2, 5), (1, 4)):
        f0, f1 = offset[a0], offset[a1]
        part = Ptycho(probe, positions[f0:f1], offset[a0 : a1 + 1] - f0, image)
        np.testing.assert_array_equal(part.illumination(np.float32), full[a0:a1])


def test_a_guarded_probe_makes_the_frames_continuous_across_a_whole_pixel():
    """A probe zero on its last row and column (``guard_probe``): the frame at a corner
    with the fraction 1 - 1e-5 and the frame at the next corner with fraction 0 have the
    same far-field intensities up to the 1e-5 step; an unguarded probe jumps by its edge.
    Along rows, columns and both; probe modes ``(K, M, M)`` are guarded mode by mode."""
    from ptmpi.operators.fft import fft2
    from ptmpi.operators.ptycho import guard_probe, is_guarded

    m, rng = 8, np.random.default_rng(4)
    raw = (rng.standard_normal((m, m)) + 1j * rng.standard_normal((m, m))).astype(np.complex128)
    image = rng.standard_normal((1, 20, 20)) + 1j * rng.standard_normal((1, 20, 20))
    guarded = guard_probe(raw)
    assert is_guarded(guarded) and not is_guarded(raw)
    assert np.array_equal(guarded[:-1, :-1], raw[:-1, :-1])
    assert np.array_equal(guard_probe(guarded), guarded)
    modes = guard_probe(np.stack([raw, 2 * raw]))
    assert modes.shape == (2, m, m) and is_guarded(modes) and is_guarded(modes[1])
    # the fraction 1 is the probe rolled by one pixel (the periodic Fourier shift)
    assert np.allclose(fourier_shift(raw, [[1.0, 0.0]])[0], np.roll(raw, 1, axis=0))
    for step in ([1, 0], [0, 1], [1, 1]):
        before = np.array([[5.0, 6.0]]) + np.array(step) * (1 - 1e-5)
        after = np.array([[5.0, 6.0]]) + np.array(step)
        jumps = []
        for probe in (guarded, raw):
            far = [np.abs(fft2(Ptycho(probe, p, [0, 1], (20, 20)).fwd(image)))
                   for p in (before, after)]
            jumps.append(np.linalg.norm(far[1] - far[0]) / np.linalg.norm(far[1]))
        assert jumps[0] < 1e-4 and jumps[1] > 1e-2, (step, jumps)
