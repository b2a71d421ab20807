"""Metrics of SPEC section 5 against known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ptmpi import metrics
from ptmpi.metrics import optimal_scale, r_factor, snr_db, snr_intensity_db


class RecordingComm:
    """Stands in for ptmpi's Comm: adds the other ranks' buffers, records each call."""

    def __init__(self, others=()):
        self.others = [np.asarray(b, dtype=np.float64) for b in others]
        self.calls = []

    def allreduce_sum(self, x):
        self.calls.append(x.copy())
        for other in self.others:
            x += other
        return x


def crandn(rng, shape, dtype=np.complex128):
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)


def residual(zeta, u, t) -> float:
    return float(np.sum(np.abs(zeta * u.astype(np.complex128) - t) ** 2))


# ---------------------------------------------------------------------------- snr_db


def test_snr_of_a_scaled_copy(rng, xp):
    u = crandn(rng, (3, 5, 5))
    # Real scaling by 2 is exact in floating point: on the host the residual is exactly
    # zero. CuPy's vdot contracts products into fused multiply-adds, so Im <u, u> is the
    # rounding error of a product rather than 0 and zeta = 2 + O(1e-16) i (370 dB, seen on
    # an H200): still far above the general complex scaling's bound below.
    value = snr_db(xp.asarray(u), xp.asarray(2 * u))
    if xp is np:
        assert value == math.inf
    else:
        assert value > 300
    # A general complex scaling leaves only rounding: far above any reconstruction's SNR.
    assert snr_db(xp.asarray(u), xp.asarray((0.3 - 1.2j) * u)) > 250
    u64 = u.astype(np.complex64)
    assert snr_db(xp.asarray(u64), xp.asarray(((0.3 - 1.2j) * u64).astype(np.complex64))) > 120


def test_snr_closed_form_with_orthogonal_noise(rng, xp):
    """With <t, e> = 0: zeta = T/(T+E) and the SNR is exactly 10 log10(T/E)."""
    t = crandn(rng, (4, 6, 6))
    e = crandn(rng, t.shape)
    e -= np.vdot(t, e) / np.vdot(t, t) * t  # Gram-Schmidt: make e orthogonal to t
    energy_t = np.vdot(t, t).real
    e *= np.sqrt(0.01 * energy_t / np.vdot(e, e).real)  # E / T = 1/100
    assert snr_db(xp.asarray(t + e), xp.asarray(t)) == pytest.approx(20.0, abs=1e-9)
    zeta = optimal_scale(xp.asarray(t + e), xp.asarray(t))
    assert zeta == pytest.approx(1 / 1.01, abs=1e-12)


def test_snr_is_invariant_to_complex_scaling(rng):
    t = crandn(rng, (2, 7, 7))
    u = t + 0.3 * crandn(rng, t.shape)
    for c in (2.0, -0.5j, 3 - 4j, 1e-3 * np.exp(1j)):
        assert snr_db(c * u, t) == pytest.approx(snr_db(u, t), abs=1e-9)


def test_zeta_minimises_the_residual(rng):
    """g(zeta + d) - g(zeta) = |d|^2 sum|u|^2 > 0 for every complex perturbation d."""
    t = crandn(rng, (3, 4, 4))
    u = 0.7j * t + 0.5 * crandn(rng, t.shape)
    zeta = optimal_scale(u, t)
    assert zeta == pytest.approx(np.vdot(u, t) / np.vdot(u, u), rel=1e-12)
    best = residual(zeta, u, t)
    norm_u = np.vdot(u, u).real
    for d in (1e-3, -1e-3, 1e-3j, -1e-3j, 1e-2 * (1 + 1j), 0.5 - 0.2j):
        worse = residual(zeta + d, u, t)
        assert worse > best
        assert worse - best == pytest.approx(abs(d) ** 2 * norm_u, rel=1e-6)


def test_snr_degenerate_cases():
    t = np.ones((2, 2), np.complex64)
    assert snr_db(np.zeros_like(t), t) == -math.inf  # nothing reconstructed
    u = np.array([[1, -1], [0, 0]], np.complex64)  # orthogonal to t: zeta = 0
    assert optimal_scale(u, t) == 0 and snr_db(u, t) == -math.inf
    with pytest.raises(ValueError, match="shapes differ"):
        snr_db(t, np.ones((3, 2)))


def test_blocked_sums_match_one_block(rng, monkeypatch):
    t = crandn(rng, (5, 9, 9), np.complex64)
    u = t + 0.1 * crandn(rng, t.shape, np.complex64)
    f = np.abs(t) ** 2
    whole = (snr_db(u, t), r_factor(u, f), snr_intensity_db(np.abs(u) ** 2, f))
    monkeypatch.setattr(metrics, "_BLOCK", 17)  # many ragged blocks
    blocked = (snr_db(u, t), r_factor(u, f), snr_intensity_db(np.abs(u) ** 2, f))
    np.testing.assert_allclose(blocked, whole, rtol=1e-12)


# ---------------------------------------------------------------------------- r_factor


def test_r_factor_exact_data_is_zero(rng, xp):
    d = crandn(rng, (4, 8, 8), np.complex64)
    f = np.abs(d.astype(np.complex128)) ** 2
    assert r_factor(xp.asarray(d), xp.asarray(f)) == pytest.approx(0.0, abs=1e-7)
    assert r_factor(xp.asarray(np.zeros((1, 2, 2))), xp.asarray(np.zeros((1, 2, 2)))) == 0.0


def test_r_factor_by_hand(xp):
    d = np.array([[[3, 4j], [0, 1]]], np.complex64)
    f = np.array([[[4, 16], [1, 0]]], np.float32)
    # | |d| - sqrt(f) | = |3-2| + |4-4| + |0-1| + |1-0| = 3;  sum sqrt(f) = 2+4+1+0 = 7
    assert r_factor(xp.asarray(d), xp.asarray(f)) == pytest.approx(3 / 7, rel=1e-12)


def test_r_factor_one_reduction_over_ranks(rng):
    d = crandn(rng, (6, 4, 4))
    f = rng.poisson(3.0, d.shape).astype(np.float32)
    expected = r_factor(d, f)
    # Rank 1's partial sums, as its allreduce_sum call would contribute them.
    rank1 = RecordingComm()
    r_factor(d[4:], f[4:], comm=rank1)
    comm = RecordingComm(others=rank1.calls)
    assert r_factor(d[:4], f[:4], comm=comm) == pytest.approx(expected, rel=1e-12)
    assert len(comm.calls) == 1
    assert comm.calls[0].dtype == np.float64 and comm.calls[0].shape == (2,)


def test_r_factor_shapes_must_agree():
    with pytest.raises(ValueError, match="d_model, f"):
        r_factor(np.ones((2, 4, 4), np.complex64), np.ones((2, 4, 5)))


# ---------------------------------------------------------------------------- snr_intensity


def test_snr_intensity_known_perturbation(xp):
    f_clean = np.full((2, 4, 4), 10.0, np.float32)  # sum f_clean^2 = 32 * 100 = 3200
    f = f_clean.copy()
    f[0, 1, 1] += 2.0
    f[1, 3, 0] -= 4.0  # sum (f - f_clean)^2 = 4 + 16 = 20
    expected = -10 * math.log10(20 / 3200)
    assert snr_intensity_db(xp.asarray(f), xp.asarray(f_clean)) == pytest.approx(expected,
                                                                                  rel=1e-12)
    assert snr_intensity_db(xp.asarray(f_clean), xp.asarray(f_clean)) == math.inf


def test_snr_intensity_one_reduction_over_ranks(rng):
    f_clean = rng.uniform(0, 50, (5, 6, 6))
    f = rng.poisson(f_clean).astype(np.float32)
    expected = snr_intensity_db(f, f_clean)
    rank1 = RecordingComm()
    snr_intensity_db(f[2:], f_clean[2:], comm=rank1)
    comm = RecordingComm(others=rank1.calls)
    assert snr_intensity_db(f[:2], f_clean[:2], comm=comm) == pytest.approx(expected, rel=1e-12)
    assert len(comm.calls) == 1


def test_metrics_return_python_floats(rng, xp):
    u = xp.asarray(crandn(rng, (2, 3, 3), np.complex64))
    f = xp.abs(u) ** 2
    for value in (snr_db(u, 1.5 * u + 0.1), r_factor(u, f), snr_intensity_db(f + 1, f)):
        assert type(value) is float


def test_r_factor_sums_from_counts_or_their_roots(rng):
    from ptmpi.metrics import r_factor_sums, r_factor_value

    f = rng.poisson(20.0, (3, 4, 4)).astype(np.float32)
    d = crandn(rng, (3, 4, 4), np.complex64)
    valid = rng.random((4, 4)) > 0.3
    by_counts = r_factor_sums(d, f, valid=valid)
    by_roots = r_factor_sums(d, sqrt_f=np.sqrt(f), valid=valid)
    np.testing.assert_allclose(by_roots, by_counts, rtol=1e-6)
    amp = np.sqrt(f.astype(np.float64))
    expected = np.abs(np.abs(d.astype(np.complex128)) - amp)[:, valid].sum() / amp[:, valid].sum()
    assert r_factor_value(*by_counts) == pytest.approx(expected, rel=1e-12)
    assert r_factor_value(0.0, 0.0) == 0.0 and r_factor_value(1.0, 0.0) == math.inf
    with pytest.raises(ValueError):
        r_factor_sums(d, f, sqrt_f=np.sqrt(f))


def test_the_solver_history_uses_the_same_r_factor():
    """APT's per-iteration R-factor is metrics.r_factor of the iterate it reports."""
    from ptmpi.operators.model import JointModel
    from ptmpi.parallel import SerialComm
    from ptmpi.sim.presets import SimulationSettings
    from ptmpi.sim.simulate import simulate
    from ptmpi.solvers.admm import LocalProblem, SolverSettings, solve

    data = simulate(SimulationSettings(n=16, nz=8, n_angles=4, step=4, probe_size=8, fwhm=3.0,
                                       eta=5.0))
    f = np.fft.ifftshift(data.counts, axes=(-2, -1))
    theta = np.deg2rad(data.angles_deg)
    problem = LocalProblem(data.volume.shape, theta, f, data.positions_px, data.frame_offset,
                           data.probe)
    state, _ = solve(problem, SolverSettings(iterations=4, early_stop=False), SerialComm())
    model = JointModel(data.volume.shape, theta, state.omega, data.positions_px,
                       data.frame_offset, dtype=np.complex64)
    expected = r_factor(model.fwd(state.u), f)
    assert state.history["r_factor"][-1] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_compiled_snr_sums_equal_numpy(dtype, monkeypatch):
    """The compiled float64 sums of optimal_scale and snr_db (complex volumes) agree with
    the numpy blocks, also on a non-contiguous view and a truth of another precision."""
    from ptmpi.operators import kernels

    if not kernels.ENABLED:
        pytest.skip("Numba kernels disabled")
    rng = np.random.default_rng(4)
    truth = np.exp(1j * rng.standard_normal((6, 9, 10)))
    u = (0.7 - 0.2j) * truth + 0.05 * (rng.standard_normal(truth.shape)
                                       + 1j * rng.standard_normal(truth.shape))
    u = u.astype(dtype)
    cases = [(u, truth), (u[:, ::2], truth[:, ::2]), (u, truth.astype(np.complex64))]
    compiled = [(optimal_scale(a, t), snr_db(a, t)) for a, t in cases]
    monkeypatch.setattr(kernels, "ENABLED", False)
    for (zeta, snr), (a, t) in zip(compiled, cases, strict=True):
        assert abs(zeta - optimal_scale(a, t)) <= 1e-12 * abs(zeta)
        assert abs(snr - snr_db(a, t)) <= 1e-9
    assert 20 < compiled[0][1] < 30  # (a 5% error: about 23 dB)
