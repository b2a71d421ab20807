"""Incoherent probe modes: the mode operator, the radial prox, ptycho2d with K modes."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from ptmpi.cli import main
from ptmpi.operators.dottest import DOT_TOL, dottest, random_array
from ptmpi.operators.fft import FarField
from ptmpi.operators.modes import (
    ModePtycho,
    hermite_patterns,
    initial_modes,
    intensity,
    mix_modes,
    modulus,
    orthogonalise,
    power_fractions,
)
from ptmpi.operators.ptycho import Ptycho
from ptmpi.operators.tomo import Projector
from ptmpi.parallel import SerialComm
from ptmpi.sim.presets import SimulationSettings
from ptmpi.sim.simulate import simulate
from ptmpi.solvers.prox import prox_data, prox_data_modes, prox_modulus
from ptmpi.solvers.ptycho2d import Ptycho2DSettings, solve_ptycho2d


def _scan(rng, n_frames=7, m=6, shape=(14, 15), subpixel=True):
    positions = rng.uniform(-2, [shape[0] - m + 2, shape[1] - m + 2], size=(n_frames, 2))
    if not subpixel:
        positions = np.round(positions)
    return positions, np.array([0, 3, n_frames]), m, shape


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
@pytest.mark.parametrize("subpixel", [False, True])
def test_mode_operator_dot_test(rng, dtype, subpixel):
    positions, offset, m, shape = _scan(rng, subpixel=subpixel)
    probes = random_array((3, m, m), dtype, rng)
    op = ModePtycho(probes, positions, offset, shape)
    x_shape, y_shape = (2, *shape), (3, positions.shape[0], m, m)
    assert dottest(op.fwd, op.adj, x_shape, y_shape, dtype, rng) < DOT_TOL[np.dtype(dtype)]
    far = FarField()
    err = dottest(lambda v: far.fwd(op.fwd(v)), lambda d: op.adj(far.adj(d)), x_shape,
                  y_shape, dtype, rng)
    assert err < DOT_TOL[np.dtype(dtype)]
    # each mode is the single-probe operator; W sums the modes' illuminations
    v = random_array(x_shape, dtype, rng)
    psi = op.fwd(v)
    for k in range(3):
        single = Ptycho(probes[k], positions, offset, shape)
        assert np.array_equal(psi[k], single.fwd(v))
    w = sum(Ptycho(probes[k], positions, offset, shape).illumination() for k in range(3))
    assert np.allclose(op.illumination(), w, rtol=1e-5)
    # a probe update reaches every mode (and its shifted-probe cache)
    op.probe = 2 * probes
    assert np.allclose(op.fwd(v), 2 * psi, rtol=1e-5, atol=1e-6)


def test_orthogonalise_keeps_the_intensity_and_mixes_fields_alike(rng, monkeypatch):
    positions, offset, m, shape = _scan(rng)
    probes = random_array((3, m, m), np.complex128, rng)
    v = random_array((2, *shape), np.complex128, rng)
    far = FarField()
    d = far.fwd(ModePtycho(probes, positions, offset, shape).fwd(v))
    ortho, u = orthogonalise(probes)
    assert np.allclose(u.conj().T @ u, np.eye(3), atol=1e-12)
    gram = np.einsum("aij,bij->ab", ortho.conj(), ortho)
    assert np.allclose(gram, np.diag(np.diag(gram)), atol=1e-10 * abs(gram).max())
    power = np.diag(gram).real
    assert np.all(np.diff(power) <= 0)  # strongest first
    d_new = far.fwd(ModePtycho(ortho, positions, offset, shape).fwd(v))
    assert np.allclose(intensity(d_new), intensity(d), rtol=1e-10)
    # the per-mode fields follow the same unitary mixing (F and the windows are linear)
    assert np.allclose(mix_modes(d, u), d_new, atol=1e-10 * abs(d).max())
    # in place, a block of columns at a time (blocks of 5: a remainder block too)
    monkeypatch.setattr("ptmpi.operators.modes._MIX_BLOCK", 5)
    mixed = d.copy()
    assert mix_modes(mixed, u, in_place=True) is mixed
    np.testing.assert_allclose(mixed, mix_modes(d, u), rtol=0, atol=1e-13 * abs(d).max())
    # orthogonal modes in order stay as they are
    again, u2 = orthogonalise(ortho)
    assert np.allclose(u2, np.eye(3), atol=1e-9) and np.allclose(again, ortho, atol=1e-9)


def test_initial_modes_keep_the_power_and_are_orthogonal():
    data = simulate(SimulationSettings(n=24, nz=16, n_angles=1, step=4, probe_size=12,
                                       fwhm=3.0))
    probe = data.probe
    modes = initial_modes(probe, 4, power=0.05)
    assert modes.shape == (4, 12, 12) and modes.dtype == probe.dtype
    assert np.allclose(power_fractions(modes), [1 - 0.05 * (1 + 1 / 2 + 1 / 3), 0.05,
                                                0.05 / 2, 0.05 / 3], atol=1e-6)
    total = np.sum(np.abs(probe.astype(np.complex128)) ** 2)
    assert np.sum(np.abs(modes.astype(np.complex128)) ** 2) == pytest.approx(total, rel=1e-5)
    gram = np.einsum("aij,bij->ab", modes.conj(), modes.astype(np.complex128))
    assert np.allclose(gram, np.diag(np.diag(gram)), atol=1e-5 * abs(gram).max())
    assert np.allclose(modes[0], probe * np.sqrt(1 - 0.05 * 11 / 6), rtol=1e-5, atol=1e-7)
    assert np.array_equal(initial_modes(probe, 1), probe[None])
    assert len(hermite_patterns(probe, 5)) == 5


@pytest.mark.parametrize("likelihood", ["agm", "ipm"])
@pytest.mark.parametrize("epsilon", [0.0, 0.5])
def test_radial_prox_is_the_minimiser(rng, likelihood, epsilon):
    from scipy.optimize import minimize

    k, r2 = 3, 0.4
    zt = random_array((k, 4, 1, 1), np.complex128, rng)
    f = rng.uniform(0, 4, size=(4, 1, 1))
    f[0] = 0.0
    z = prox_data_modes(zt, f, r2, likelihood, epsilon=epsilon)

    def objective(x, j):
        zz = x[:k] + 1j * x[k:]
        g = np.sum(np.abs(zz) ** 2) + epsilon
        if likelihood == "agm":
            data = 0.5 * (np.sqrt(g) - np.sqrt(f[j, 0, 0] + epsilon)) ** 2
        else:
            data = 0.5 * (g - (f[j, 0, 0] + epsilon) * np.log(g))
        return data + r2 / 2 * np.sum(np.abs(zz - zt[:, j, 0, 0]) ** 2)

    for j in range(4):
        best = None
        for _ in range(12):  # brute force: many random starts
            x0 = rng.standard_normal(2 * k) * 2
            res = minimize(objective, x0, args=(j,), method="Nelder-Mead",
                           options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 20000,
                                    "maxfev": 40000})
            if best is None or res.fun < best.fun:
                best = res
        ours = np.concatenate([z[:, j, 0, 0].real, z[:, j, 0, 0].imag])
        assert objective(ours, j) <= best.fun + 1e-9
        assert np.allclose(ours, best.x, atol=1e-4)


def test_radial_prox_with_one_mode_is_the_scalar_prox(rng):
    zt = random_array((1, 3, 5, 5), np.complex128, rng)
    f = rng.uniform(0, 3, size=(3, 5, 5))
    valid = rng.uniform(size=(5, 5)) > 0.2
    for likelihood in ("agm", "ipm"):
        ours = prox_data_modes(zt, f, 0.3, likelihood, valid)
        assert np.allclose(ours[0], prox_data(zt[0], f, 0.3, likelihood, valid), rtol=1e-12)
    # and all modes share the scale rho / |zt|
    zt = random_array((2, 3, 5, 5), np.complex128, rng)
    z = prox_data_modes(zt, f, 0.3, "agm")
    rho = prox_modulus(modulus(zt), f, 0.3, "agm")
    assert np.allclose(modulus(z), rho, rtol=1e-12)
    assert np.allclose(z[1] / zt[1], z[0] / zt[0], rtol=1e-12)


@pytest.mark.parametrize("likelihood", ["agm", "ipm"])
@pytest.mark.parametrize("epsilon", [0.0, 0.5])
@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_compiled_modes_split_equals_the_numpy_one(rng, monkeypatch, likelihood, epsilon,
                                                   dtype):
    from ptmpi.operators import kernels
    from ptmpi.solvers.prox import update_data_split

    if not kernels.ENABLED:
        pytest.skip("Numba is not available")
    d = random_array((3, 5, 8, 8), dtype, rng)
    d[:, 0] = 0  # a frame whose z-step input is zero: mode 0 takes rho on the real axis
    lam2 = 0.2 * random_array((3, 5, 8, 8), dtype, rng)
    lam2[:, 0] = 0
    z_old = random_array((3, 5, 8, 8), dtype, rng)
    f = rng.poisson(3.0, size=(5, 8, 8)).astype(np.finfo(dtype).dtype)
    valid = rng.uniform(size=(8, 8)) > 0.2
    runs = []
    for compiled in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", compiled)
        lam = lam2.copy()
        stats = np.zeros(3)
        z = update_data_split(d, lam, f, 0.3, likelihood, valid, epsilon, z_old, stats)
        runs.append((z, lam, stats))
    (z_c, lam_c, st_c), (z_r, lam_r, st_r) = runs
    tol = 1e-5 if dtype == np.complex64 else 1e-12
    assert np.abs(z_c - z_r).max() <= tol * np.abs(z_r).max()
    assert np.abs(lam_c - lam_r).max() <= tol * np.abs(z_r).max()
    assert np.allclose(st_c, st_r, rtol=10 * tol)
    assert np.all(z_c[0, 0].imag == 0) and np.all(z_c[1:, 0] == 0)


@pytest.fixture(scope="module")
def mixed():
    """One angle measured with two incoherent modes: the probe (75% of the power) and
    the probe times a vertical Hermite pattern (25%), noise-free. The solver's second
    starting mode is the horizontal pattern, so it has to find the vertical one."""
    data = simulate(SimulationSettings(n=32, nz=32, n_angles=1, step=3, probe_size=16,
                                       fwhm=4.0))
    projector = Projector(data.volume.shape, np.deg2rad(data.angles_deg), np.complex128)
    truth = projector.fwd(data.volume.astype(np.complex128))
    empty = projector.fwd(np.ones(data.volume.shape, np.complex128))
    probe = data.probe.astype(np.complex128)
    second = probe * hermite_patterns(probe, 2)[1]
    second *= np.sqrt(np.vdot(probe, probe).real / 3 / np.vdot(second, second).real)
    modes = np.stack([probe, second])
    op = ModePtycho(modes, data.positions_px, data.frame_offset, truth.shape[1:])
    f = intensity(FarField().fwd(op.fwd(truth)))
    return data, empty, f


def test_two_modes_fit_mixed_state_data_better_than_one(mixed):
    data, empty, f = mixed
    r = {}
    for k in (1, 2):
        settings = Ptycho2DSettings(iterations=60, likelihood="agm", refine_probe=True,
                                    probe_modes=k)
        state = solve_ptycho2d(empty, f, data.probe, data.positions_px, data.frame_offset,
                               settings, SerialComm())
        r[k] = state.history["r_factor"][-1]
        assert state.omega.shape == ((16, 16) if k == 1 else (2, 16, 16))
    assert r[1] > 0.06  # one coherent probe cannot explain the data ...
    assert r[2] < 0.6 * r[1]  # ... two modes clearly can
    fractions = power_fractions(state.omega)
    assert fractions[0] > fractions[1] > 0.05  # the second mode took up real power


def test_one_mode_is_the_single_probe_solver(mixed):
    data, empty, f = mixed
    args = (empty, f, data.probe, data.positions_px, data.frame_offset)
    base = solve_ptycho2d(*args, Ptycho2DSettings(iterations=12, refine_probe=True),
                          SerialComm())
    one = solve_ptycho2d(*args, Ptycho2DSettings(iterations=12, refine_probe=True,
                                                 probe_modes=1), SerialComm())
    assert np.array_equal(one.v_local, base.v_local)
    assert np.array_equal(one.omega, base.omega) and one.omega.shape == (16, 16)
    assert one.history["r_factor"] == base.history["r_factor"]
    assert "probe_modes" not in Ptycho2DSettings(probe_modes=1).to_dict()
    # a second mode of zero power is the single-probe model by another route
    zero = np.stack([data.probe, np.zeros_like(data.probe)])
    two = solve_ptycho2d(empty, f, zero, *args[3:], Ptycho2DSettings(iterations=12,
                                                                     probe_modes=2),
                         SerialComm())
    ref = solve_ptycho2d(*args, Ptycho2DSettings(iterations=12), SerialComm())
    assert np.allclose(two.v_local, ref.v_local, rtol=0, atol=1e-9 * abs(ref.v_local).max())
    assert np.allclose(two.history["r_factor"], ref.history["r_factor"], rtol=1e-9)


def _r_factor_of_modes_output(output, data_path):
    from ptmpi.io.cxi import read_input
    from ptmpi.metrics import r_factor

    with h5py.File(output, "r") as f:
        images = f["entry_1/image_1/data"][...]
        probes = f["entry_1/image_2/data"][...]
        positions = f["entry_1/image_1/positions_px"][...]
        offsets = f["entry_1/image_1/frame_offset"][...]
        stored = float(f["entry_1/ptmpi/metrics/r_factor"][-1])
    data = read_input(data_path, 0, len(offsets) - 1)
    op = ModePtycho(probes, positions, offsets, images.shape[1:])
    model = modulus(FarField().fwd(op.fwd(images)))
    return r_factor(model, data.counts_local, valid=data.valid_local), stored


def test_cli_probe_modes_output_reproduces_its_r_factor(tmp_path, capsys):
    data = tmp_path / "d.h5"
    assert main(["simulate", "-o", str(data), "--n", "20", "--nz", "16", "--angles", "2",
                 "--step", "3", "--probe-size", "10", "--fwhm", "3", "--jitter", "0.4",
                 "--eta", "20"]) == 0
    out = tmp_path / "p.h5"
    assert main(["reconstruct", str(data), "-o", str(out), "--algorithm", "ptycho2d",
                 "--refine-probe", "--iterations", "15", "--probe-modes", "3",
                 "--likelihood", "agm"]) == 0
    with h5py.File(out, "r") as f:
        probes = f["entry_1/image_2/data"]
        assert probes.shape == (3, 10, 10) and probes.attrs["axes"] == "mode:y:x"
        fractions = power_fractions(probes[...])
        params = json.loads(f["entry_1/process_1/parameters"][()])
    assert params["probe_modes"] == 3
    assert np.all(np.diff(fractions) <= 0) and fractions[-1] > 0
    recomputed, stored = _r_factor_of_modes_output(out, data)
    assert stored < 0.5
    assert recomputed == pytest.approx(stored, rel=1e-3)
    assert (tmp_path / "p-probe-modes.png").exists() and (tmp_path / "p-images.png").exists()
    assert main(["info", str(out)]) == 0
    # one mode: the probe stays (M, M) and no modes figure is drawn
    one = tmp_path / "one.h5"
    assert main(["reconstruct", str(data), "-o", str(one), "--algorithm", "ptycho2d",
                 "--iterations", "2", "--probe-modes", "1"]) == 0
    with h5py.File(one, "r") as f:
        assert f["entry_1/image_2/data"].shape == (10, 10)
        assert "probe_modes" not in json.loads(f["entry_1/process_1/parameters"][()])
    assert not (tmp_path / "one-probe-modes.png").exists()


@pytest.mark.parametrize("flags, words", [
    (["--start", "coarse"], "--start coarse with"),  # a combination not built yet
])
def test_cli_refuses_probe_modes_where_unsupported(tmp_path, capsys, flags, words):
    """One error line, exit status 1, no output file."""
    data = tmp_path / "d.h5"
    assert main(["simulate", "-o", str(data), "--n", "16", "--nz", "8", "--angles", "2",
                 "--step", "4", "--probe-size", "8", "--fwhm", "3"]) == 0
    capsys.readouterr()
    assert main(["reconstruct", str(data), "-o", str(tmp_path / "r.h5"), *flags,
                 "--probe-modes", "2"]) == 1
    err = capsys.readouterr().err
    assert words in err and "--probe-modes" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.h5").exists()


@pytest.mark.mpi(ranks=[2], timeout=180, unit="s")
def test_probe_modes_do_not_depend_on_the_ranks(mpi_ranks):
    from ptmpi.parallel import MPIComm, block_partition

    comm = MPIComm()
    settings = Ptycho2DSettings(iterations=15, likelihood="agm", refine_probe=True,
                                probe_modes=3)
    # angles split over the ranks
    data = simulate(SimulationSettings(n=24, nz=16, n_angles=4, step=3, probe_size=12,
                                       fwhm=3.0, eta=20.0))
    projector = Projector(data.volume.shape, np.deg2rad(data.angles_deg), np.complex128)
    empty = projector.fwd(np.ones(data.volume.shape, np.complex128))
    f = np.fft.ifftshift(data.counts, axes=(-2, -1)).astype(np.float64)
    off = data.frame_offset

    def run(start, stop, comm_):
        return solve_ptycho2d(empty[start:stop], f[off[start]:off[stop]], data.probe,
                              data.positions_px[off[start]:off[stop]],
                              off[start:stop + 1] - off[start], settings, comm_)

    start, stop = block_partition(4, comm.size, comm.rank)
    par, ser = run(start, stop, comm), run(0, 4, SerialComm())
    assert np.allclose(par.history["r_factor"], ser.history["r_factor"], rtol=1e-7)
    assert np.allclose(par.omega, ser.omega, rtol=1e-6, atol=1e-9 * abs(ser.omega).max())
    assert np.allclose(par.v_local, ser.v_local[start:stop], rtol=1e-6,
                       atol=1e-9 * abs(ser.v_local).max())
    # one angle, its frames split over the ranks (shared image)
    one = empty[:1]
    n = int(off[1])
    f0, f1 = block_partition(n, comm.size, comm.rank)
    par = solve_ptycho2d(one, f[f0:f1], data.probe, data.positions_px[f0:f1],
                         np.array([0, f1 - f0]), settings, comm, shared_image=True)
    ser = solve_ptycho2d(one, f[:n], data.probe, data.positions_px[:n], np.array([0, n]),
                         settings, SerialComm())
    assert np.allclose(par.history["r_factor"], ser.history["r_factor"], rtol=1e-7)
    assert np.allclose(par.v_local, ser.v_local, rtol=1e-6, atol=1e-9 * abs(ser.v_local).max())
    assert ser.history["r_factor"][-1] < 0.5 * ser.history["r_factor"][0]


def test_two_step_with_probe_modes(tmp_path):
    data = tmp_path / "d.h5"
    assert main(["simulate", "-o", str(data), "--n", "20", "--nz", "16", "--angles", "4",
                 "--step", "3", "--probe-size", "10", "--fwhm", "3"]) == 0
    out = tmp_path / "two.h5"
    assert main(["reconstruct", str(data), "-o", str(out), "--algorithm", "two-step",
                 "--iterations", "20", "--refine-probe", "--probe-modes", "2",
                 "--no-figures"]) == 0
    with h5py.File(out, "r") as f:
        assert f["entry_1/image_1/data"].shape == (16, 20, 20)
        assert f["entry_1/image_2/data"].shape == (2, 10, 10)
        r = f["entry_1/ptmpi/metrics/r_factor"][...]
    # the last row is the tomography's R through the modes' model
    assert np.isfinite(r[-1]) and r[-1] < 0.5 * r[0]


# ------------------------------------------------------------------ joint solver (APT)


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_data_term_with_modes_dot_test_and_normal(rng, dtype):
    from ptmpi.parallel.data_term import DataTerm

    data = simulate(SimulationSettings(n=16, nz=8, n_angles=3, step=4, probe_size=8,
                                       fwhm=3.0, jitter=0.7))
    theta = np.deg2rad(data.angles_deg)
    probes = initial_modes(data.probe.astype(dtype), 3, power=0.2)
    term = DataTerm(data.volume.shape, theta, probes, data.positions_px, data.frame_offset,
                    SerialComm(), dtype=dtype)
    assert term.n_modes == 3
    y_shape = (3, data.positions_px.shape[0], 8, 8)
    err = dottest(term.fwd, term.adj, data.volume.shape, y_shape, dtype, rng)
    assert err < DOT_TOL[np.dtype(dtype)]
    # D^H D = sum_t P_t^H (sum_k W_k) P_t: the normal operator sees every mode
    x = random_array(data.volume.shape, dtype, rng)
    direct = term.adj(term.fwd(x)).copy()  # the next sum reuses the buffer
    assert np.linalg.norm(term.normal(x) - direct) < 100 * DOT_TOL[np.dtype(dtype)] * (
        np.linalg.norm(direct))
    singles = [DataTerm(data.volume.shape, theta, probes[k], data.positions_px,
                        data.frame_offset, SerialComm(), dtype=dtype) for k in range(3)]
    assert np.allclose(term.weight, sum(t.weight for t in singles), rtol=1e-5)


@pytest.fixture(scope="module")
def mixed_tomo():
    """A small tomography series measured with two incoherent modes (as ``mixed``)."""
    from ptmpi.operators.model import JointModel

    return two_mode_series(SimulationSettings(n=24, nz=16, n_angles=6, step=3,
                                              probe_size=12, fwhm=3.0), JointModel)


def two_mode_series(settings, model_class):
    """``(data, theta, f)``: the simulation of ``settings`` and its counts measured with two
    incoherent modes, the probe (75% of the power) and the probe times a vertical Hermite
    pattern (25%), noise-free, through ``model_class`` (linear or exp model)."""
    data = simulate(settings)
    theta = np.deg2rad(data.angles_deg)
    probe = data.probe.astype(np.complex128)
    second = probe * hermite_patterns(probe, 2)[1]
    second *= np.sqrt(np.vdot(probe, probe).real / 3 / np.vdot(second, second).real)
    model = model_class(data.volume.shape, theta, np.stack([probe, second]),
                        data.positions_px, data.frame_offset, dtype=np.complex128)
    return data, theta, intensity(model.fwd(data.volume.astype(np.complex128)))


def test_apt_with_two_modes_fits_mixed_state_data_better(mixed_tomo):
    from ptmpi.solvers.admm import LocalProblem, SolverSettings, solve

    data, theta, f = mixed_tomo
    problem = LocalProblem(data.volume.shape, theta, f, data.positions_px, data.frame_offset,
                           data.probe, truth_volume=data.volume)
    out = {}
    for k in (1, 2):
        settings = SolverSettings(iterations=30, likelihood="agm", refine_probe=True,
                                  probe_modes=k, tol=0)
        state, _ = solve(problem, settings, SerialComm())
        out[k] = state.history["r_factor"][-1], state.history["snr_db"][-1]
        assert state.z_local.shape == ((k,) if k > 1 else ()) + f.shape
    assert out[2][0] < 0.85 * out[1][0]
    assert out[2][1] > out[1][1] + 2.0  # dB: the volume is better too
    assert "probe_modes" not in SolverSettings().to_dict()


def test_apt_probe_modes_checkpoint_resume(tmp_path, capsys):
    data = tmp_path / "d.h5"
    assert main(["simulate", "-o", str(data), "--n", "16", "--nz", "12", "--angles", "5",
                 "--step", "4", "--probe-size", "8", "--fwhm", "3", "--eta", "50"]) == 0
    common = [str(data), "--no-figures", "--refine-probe", "--probe-modes", "2",
              "--checkpoint", str(tmp_path / "ck.h5"), "--tol", "0"]
    assert main(["reconstruct", *common[:5], "-o", str(tmp_path / "full.h5"),
                 "--iterations", "6", "--tol", "0"]) == 0
    assert main(["reconstruct", *common, "-o", str(tmp_path / "part.h5"), "--iterations",
                 "3"]) == 0
    from ptmpi.io.checkpoint import read_checkpoint

    state = read_checkpoint(tmp_path / "ck.h5", 0, 10)
    assert state.iteration == 3
    assert state.omega.shape == (2, 8, 8) and state.z_local.shape[0] == 2
    assert main(["reconstruct", *common, "-o", str(tmp_path / "resumed.h5"), "--iterations",
                 "6", "--resume"]) == 0
    with h5py.File(tmp_path / "full.h5", "r") as fa, h5py.File(tmp_path / "resumed.h5") as fb:
        for name in ("entry_1/image_1/data", "entry_1/image_2/data",
                     "entry_1/ptmpi/metrics/r_factor"):
            assert np.array_equal(fa[name][...], fb[name][...]), name
        assert fa["entry_1/image_2/data"].shape == (2, 8, 8)
    # a resume with another mode count is refused
    capsys.readouterr()
    common[4] = "3"
    assert main(["reconstruct", *common, "-o", str(tmp_path / "other.h5"), "--iterations",
                 "8", "--resume", "--force"]) == 1
    assert "probe_modes" in capsys.readouterr().err


@pytest.mark.mpi(ranks=[2], timeout=180, unit="s")
def test_apt_probe_modes_do_not_depend_on_the_ranks(mpi_ranks):
    from ptmpi.solvers.admm import SolverSettings, solve

    settings = SolverSettings(iterations=10, likelihood="agm", refine_probe=True,
                              probe_modes=2, tol=0)
    par, ser = _ranks_against_serial(solve, settings, eta=50.0)
    assert ser.history["r_factor"][-1] < 0.5 * ser.history["r_factor"][0]


def _ranks_against_serial(solver, settings, **simulation):
    """``solver`` on this communicator's ranks (4 angles split) and on one rank, on a
    small simulated series; asserts they agree and returns both final states."""
    from ptmpi.parallel import MPIComm, block_partition
    from ptmpi.solvers.admm import LocalProblem

    comm = MPIComm()
    data = simulate(SimulationSettings(n=16, nz=12, n_angles=4, step=3, probe_size=8,
                                       fwhm=3.0, **simulation))
    theta = np.deg2rad(data.angles_deg)
    f = np.fft.ifftshift(data.counts, axes=(-2, -1)).astype(np.float64)
    off = data.frame_offset

    def run(a0, a1, comm_):
        problem = LocalProblem(data.volume.shape, theta[a0:a1], f[off[a0]:off[a1]],
                               data.positions_px[off[a0]:off[a1]],
                               off[a0:a1 + 1] - off[a0], data.probe)
        return solver(problem, settings, comm_, dtype=np.complex128)[0]

    a0, a1 = block_partition(4, comm.size, comm.rank)
    par, ser = run(a0, a1, comm), run(0, 4, SerialComm())
    assert np.allclose(par.history["r_factor"], ser.history["r_factor"], rtol=1e-7)
    assert np.linalg.norm(par.u - ser.u) < 1e-7 * np.linalg.norm(ser.u)
    assert np.allclose(par.omega, ser.omega, rtol=1e-6, atol=1e-9 * abs(ser.omega).max())
    return par, ser


# ------------------------------------------------------------- device (CuPy) code path


def _device_params():
    from ptmpi.backend import gpu_available

    return [pytest.param("strict", id="strict"),
            pytest.param("cupy", id="cupy", marks=[
                pytest.mark.gpu, pytest.mark.skipif(not gpu_available(),
                                                    reason="no usable GPU")])]


@pytest.mark.parametrize("device", _device_params())
def test_probe_modes_on_the_device_path_match_numpy(mixed_tomo, device, monkeypatch):
    """ptycho2d and APT with 2 modes and probe refinement on the strict array module
    (arrays that refuse implicit host conversion, as CuPy's) or CuPy, against numpy."""
    import strict_xp

    from ptmpi.backend import get_array_module, get_xp, to_device, to_host
    from ptmpi.solvers.admm import LocalProblem, SolverSettings, solve

    if device == "strict":
        from ptmpi.operators import kernels

        monkeypatch.setattr(kernels, "ENABLED", False)
        xp, tol = strict_xp, 1e-6
    else:
        xp, tol = get_array_module(True), 5e-2
    data, theta, f = mixed_tomo
    f = f.astype(np.float32)
    projector = Projector(data.volume.shape, theta)
    empty = projector.fwd(np.ones(data.volume.shape, np.complex64))
    settings = Ptycho2DSettings(iterations=6, likelihood="agm", refine_probe=True,
                                probe_modes=2)
    args = (f, data.probe, data.positions_px, data.frame_offset, settings, SerialComm())
    host = solve_ptycho2d(empty, *args)
    dev = solve_ptycho2d(to_device(empty, xp), *args)
    assert get_xp(dev.v_local) is xp and get_xp(dev.omega) is xp
    assert np.linalg.norm(to_host(dev.v_local) - host.v_local) < tol * np.linalg.norm(
        host.v_local)
    np.testing.assert_allclose(dev.history["r_factor"], host.history["r_factor"], rtol=tol)
    problem = LocalProblem(data.volume.shape, theta, f, data.positions_px, data.frame_offset,
                           data.probe)
    apt = SolverSettings(iterations=4, likelihood="agm", refine_probe=True, probe_modes=2,
                         tol=0)
    host, _ = solve(problem, apt, SerialComm())
    dev, _ = solve(problem, apt, SerialComm(), xp=xp)
    assert get_xp(dev.u) is xp
    assert np.linalg.norm(to_host(dev.u) - host.u) < tol * np.linalg.norm(host.u)
    np.testing.assert_allclose(dev.history["r_factor"], host.history["r_factor"], rtol=tol)


# ------------------------------------------------------------- exponential model (exp)


def _exp_problem(data, theta, f, probe):
    from ptmpi.solvers.admm import LocalProblem

    return LocalProblem(data.volume.shape, theta, f, data.positions_px, data.frame_offset,
                        probe, truth_volume=data.volume)


@pytest.fixture(scope="module")
def mixed_exp():
    """A thick sample (projected phase up to 2 rad, exp model) measured with two incoherent
    modes, as ``mixed``: the probe (75% of the power) and the probe times a vertical
    Hermite pattern (25%), noise-free."""
    from ptmpi.operators.transmission import ExpModel

    return two_mode_series(SimulationSettings(n=24, nz=16, n_angles=8, step=3,
                                              probe_size=12, fwhm=3.0, model="exp",
                                              max_phase=2.0), ExpModel)


def test_exp_apt_with_modes_fits_mixed_state_data_better(mixed_exp):
    """The modes refined in the initialisation's per-angle ptychography carry the partial
    coherence into the joint iterations: a lower R-factor and a far better volume."""
    from ptmpi.solvers.admm_exp import ExpSolverSettings, solve_exp

    data, theta, f = mixed_exp
    out = {}
    for k in (1, 3):
        state, params = solve_exp(_exp_problem(data, theta, f, data.probe),
                                  ExpSolverSettings(iterations=40, refine_probe=True,
                                                    probe_modes=k, tol=0), SerialComm())
        out[k] = state.history["r_factor"][-1], state.history["snr_db"][-1]
        assert state.z_local.shape == ((k,) if k > 1 else ()) + f.shape
        assert state.omega.shape == ((k,) if k > 1 else ()) + data.probe.shape
    # measured: R 0.136 / 0.069, SNR 3.4 / 23.8 dB (1 / 3 modes); the third mode ends with
    # 0.5% of the power, the second with 25% (the truth's)
    assert out[3][0] < 0.6 * out[1][0]
    assert out[3][1] > out[1][1] + 10.0
    fractions = power_fractions(state.omega)
    assert 0.15 < fractions[1] < 0.35 and fractions[2] < 0.05
    assert "probe_modes" not in ExpSolverSettings().to_dict()


@pytest.mark.parametrize("flags", [{}, {"refine_probe": True},
                                   {"refine_probe": True, "probe_joint": True}])
def test_exp_second_mode_of_zero_power_is_the_single_probe_solver(mixed_exp, flags):
    """Through the mode operators, the radial prox, the modes' probe update and their
    orthogonalisation: a second mode of zero power reproduces the one-probe run."""
    from ptmpi.solvers.admm_exp import ExpSolverSettings, solve_exp

    data, theta, _ = mixed_exp
    f = np.fft.ifftshift(simulate(SimulationSettings(
        n=24, nz=16, n_angles=8, step=3, probe_size=12, fwhm=3.0, model="exp",
        max_phase=2.0)).counts, axes=(-2, -1))
    runs = []
    for k, probe in ((1, data.probe), (2, np.stack([data.probe, 0 * data.probe]))):
        state, _ = solve_exp(_exp_problem(data, theta, f, probe),
                             ExpSolverSettings(iterations=12, probe_modes=k, tol=0, **flags),
                             SerialComm(), dtype=np.complex128)
        runs.append(state)
    one, two = runs
    assert np.allclose(two.u, one.u, rtol=0, atol=1e-9 * np.abs(one.u).max())
    assert np.allclose(two.history["r_factor"], one.history["r_factor"], rtol=1e-9)
    assert np.allclose(two.omega[0], one.omega, rtol=0, atol=1e-9 * np.abs(one.omega).max())
    assert not np.any(two.omega[1])


def test_exp_probe_modes_cli_checkpoint_resume_and_r_factor(tmp_path, capsys):
    """``--model exp --probe-modes 2``: the modes are stored, the stored R-factor is that
    of the stored volume through the modes' model, and a resumed run is bit for bit the
    uninterrupted one; another mode count cannot resume."""
    from ptmpi.io.cxi import read_input
    from ptmpi.metrics import r_factor
    from ptmpi.operators.transmission import ExpModel

    data = tmp_path / "d.h5"
    assert main(["simulate", "-o", str(data), "--model", "exp", "--n", "16", "--nz", "12",
                 "--angles", "4", "--step", "3", "--probe-size", "8", "--fwhm", "3",
                 "--eta", "200"]) == 0
    common = [str(data), "--no-figures", "--refine-probe", "--probe-modes", "2",
              "--checkpoint", str(tmp_path / "ck.h5"), "--tol", "0"]
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    assert main(["reconstruct", *common[:5], "-o", str(full), "--iterations", "6",
                 "--tol", "0"]) == 0
    assert main(["reconstruct", *common, "-o", str(part), "--iterations", "3"]) == 0
    assert main(["reconstruct", *common, "-o", str(part), "--iterations", "6", "--resume",
                 "--force"]) == 0
    with h5py.File(full, "r") as fa, h5py.File(part, "r") as fb:
        for name in ("entry_1/image_1/data", "entry_1/image_2/data",
                     "entry_1/ptmpi/metrics/r_factor"):
            assert np.array_equal(fa[name][...], fb[name][...]), name
        u = fa["entry_1/image_1/data"][...]
        probes = fa["entry_1/image_2/data"][...]
        stored = float(fa["entry_1/ptmpi/metrics/r_factor"][-1])
        params = json.loads(fa["entry_1/process_1/parameters"][()])
    assert probes.shape == (2, 8, 8) and params["probe_modes"] == 2
    assert params["model"] == "exp"
    d = read_input(data, 0, 4)
    model = ExpModel(u.shape, np.deg2rad(d.angles_deg_local), probes, d.positions_local,
                     d.frame_offset_local)
    recomputed = r_factor(modulus(model.fwd(u)), d.counts_local, valid=d.valid_local)
    assert recomputed == pytest.approx(stored, rel=1e-3)
    capsys.readouterr()
    common[4] = "3"
    assert main(["reconstruct", *common, "-o", str(tmp_path / "o.h5"), "--iterations", "8",
                 "--resume", "--force"]) == 1
    assert "probe_modes" in capsys.readouterr().err


@pytest.mark.mpi(ranks=[2], timeout=180, unit="s")
def test_exp_probe_modes_do_not_depend_on_the_ranks(mpi_ranks):
    from ptmpi.solvers.admm_exp import ExpSolverSettings, solve_exp

    settings = ExpSolverSettings(iterations=8, refine_probe=True, probe_joint=True,
                                 probe_modes=2, tol=0)
    par, _ = _ranks_against_serial(solve_exp, settings, eta=200.0, model="exp",
                                   max_phase=2.0)
    assert par.omega.shape == (2, 8, 8)


def test_exp_probe_modes_on_the_device_path_match_numpy(mixed_exp, monkeypatch):
    """exp APT with 2 modes and joint probe updates on the strict array module (arrays
    that refuse implicit host conversion, as CuPy's) against numpy."""
    import strict_xp

    from ptmpi.backend import get_xp, to_host
    from ptmpi.operators import kernels
    from ptmpi.solvers.admm_exp import ExpSolverSettings, solve_exp

    monkeypatch.setattr(kernels, "ENABLED", False)
    data, theta, f = mixed_exp
    problem = _exp_problem(data, theta, f.astype(np.float32), data.probe)
    settings = ExpSolverSettings(iterations=4, refine_probe=True, probe_joint=True,
                                 probe_modes=2, tol=0, init_iterations=5)
    host, _ = solve_exp(problem, settings, SerialComm())
    dev, _ = solve_exp(problem, settings, SerialComm(), xp=strict_xp)
    assert get_xp(dev.u) is strict_xp and get_xp(dev.omega) is strict_xp
    assert np.linalg.norm(to_host(dev.u) - host.u) < 1e-5 * np.linalg.norm(host.u)
    np.testing.assert_allclose(dev.history["r_factor"], host.history["r_factor"], rtol=1e-5)


@pytest.mark.parametrize("model", ["linear", "exp"])
def test_cli_align_with_probe_modes_checkpoint_resume(tmp_path, model):
    """``--align --probe-modes 2 --refine-probe``: the shifts and the modes are written,
    and a run resumed from its checkpoint is bit for bit the uninterrupted one."""
    data = tmp_path / "d.h5"
    assert main(["simulate", "-o", str(data), "--model", model, "--n", "16", "--nz", "12",
                 "--angles", "4", "--step", "3", "--probe-size", "8", "--fwhm", "3",
                 "--drift", "1", "--eta", "200"]) == 0
    common = [str(data), "--no-figures", "--align", "--align-start", "2", "--align-every",
              "2", "--refine-probe", "--probe-modes", "2", "--tol", "0"]
    full, part, ck = tmp_path / "full.h5", tmp_path / "part.h5", tmp_path / "ck.h5"
    assert main(["reconstruct", *common, "-o", str(full), "--iterations", "7"]) == 0
    assert main(["reconstruct", *common, "-o", str(part), "--iterations", "4",
                 "--checkpoint", str(ck)]) == 0
    assert main(["reconstruct", *common, "-o", str(part), "--iterations", "7",
                 "--checkpoint", str(ck), "--resume", "--force"]) == 0
    with h5py.File(full, "r") as fa, h5py.File(part, "r") as fb:
        for name in ("entry_1/image_1/data", "entry_1/image_2/data",
                     "entry_1/ptmpi/shifts_px", "entry_1/ptmpi/metrics/r_factor"):
            assert np.array_equal(fa[name][...], fb[name][...]), name
        assert fa["entry_1/image_2/data"].shape == (2, 8, 8)
        assert np.any(fa["entry_1/ptmpi/shifts_px"][...] != 0)
