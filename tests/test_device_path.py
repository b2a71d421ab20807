"""The device (CuPy) code path without a GPU: APT ``solve``, ptycho2d and ``reconstruct``
run on the strict array module of ``strict_xp`` (arrays that refuse implicit host
conversion, as CuPy's do) and agree with the numpy runs. On a machine with a GPU the same
tests also run on CuPy."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import strict_xp

import ptmpi.reconstruct as reconstruct_module
from ptmpi.backend import get_xp, gpu_available, is_device_array, synchronize, to_device, to_host
from ptmpi.operators.tomo import Projector
from ptmpi.parallel import SerialComm
from ptmpi.sim.presets import SimulationSettings
from ptmpi.sim.simulate import simulate
from ptmpi.solvers.admm import LocalProblem, SolverSettings, solve
from ptmpi.solvers.ptycho2d import Ptycho2DSettings, solve_ptycho2d


def _device_params():
    params = [pytest.param("strict", id="strict")]
    params.append(pytest.param("cupy", id="cupy", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="no usable GPU")]))
    return params


@pytest.fixture(params=_device_params())
def device_xp(request):
    if request.param == "strict":
        return strict_xp
    from ptmpi.backend import get_array_module

    return get_array_module(True)


def _problem(data) -> LocalProblem:
    return LocalProblem(
        volume_shape=data.volume.shape, theta_local=np.deg2rad(data.angles_deg),
        f_local=np.fft.ifftshift(data.counts, axes=(-2, -1)), positions_local=data.positions_px,
        frame_offset_local=data.frame_offset, probe=data.probe, truth_volume=data.volume)


@pytest.fixture(scope="module")
def case():
    data = simulate(SimulationSettings(n=16, nz=8, n_angles=4, step=4, probe_size=8, fwhm=3.0))
    return data, _problem(data)


def test_device_windows_and_their_adjoint_equal_numpy(device_xp, rng):
    """The device gathers every frame in one index operation (numpy: one per window row)
    and scatters by overlap-free groups: both equal numpy exactly, windows over the image
    edge included."""
    from ptmpi.operators.ptycho import Ptycho

    positions = np.array([[0, 0], [5, 7], [-3, -2], [14, 18], [3, 3], [9, -5]])
    probe = (rng.standard_normal((8, 8)) + 1j * rng.standard_normal((8, 8))).astype(
        np.complex64)
    op = Ptycho(probe, positions, np.array([0, 3, 6]), (20, 24))
    v = (rng.standard_normal(op.image_stack_shape)
         + 1j * rng.standard_normal(op.image_stack_shape)).astype(np.complex64)
    psi = (rng.standard_normal(op.data_shape)
           + 1j * rng.standard_normal(op.data_shape)).astype(np.complex64)
    np.testing.assert_array_equal(to_host(op.extract(to_device(v, device_xp))), op.extract(v))
    np.testing.assert_array_equal(to_host(op.scatter(to_device(psi, device_xp))),
                                  op.scatter(psi))


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def host_reference(device_xp, monkeypatch):
    """Tolerance of the comparison with numpy. Against the strict module the numpy run
    takes the same array-module path (no compiled kernels), so the two agree to rounding
    of the same operations. Against CuPy (other FFTs, other summation order) rounding-level
    differences are amplified where the z-step is discontinuous (``|zt| ~ 0``: the phase
    of rounding noise), so the runs agree only to a looser tolerance."""
    if device_xp is strict_xp:
        from ptmpi.operators import kernels

        monkeypatch.setattr(kernels, "ENABLED", False)
        return 1e-6
    return 5e-2


def test_strict_arrays_refuse_implicit_host_conversion():
    a = strict_xp.ones((3, 2), dtype=np.float32)
    with pytest.raises(TypeError):
        np.asarray(a)
    with pytest.raises(TypeError):
        a + np.ones((3, 2))  # a host array in device arithmetic
    with pytest.raises(TypeError):
        strict_xp.sum(np.ones(3))  # a host array given to a device function
    # explicit transfers work, reductions stay on the device
    total = strict_xp.sum(a)
    assert is_device_array(total) and total.shape == () and float(total) == 6.0
    assert isinstance(to_host(a), np.ndarray) and to_host(a).sum() == 6.0
    assert get_xp(np.ones(2), a) is strict_xp
    assert is_device_array(to_device(np.arange(3), strict_xp))
    before = strict_xp.synchronize_calls[0]
    synchronize(strict_xp)
    assert strict_xp.synchronize_calls[0] == before + 1


def test_apt_solve_on_the_device_path_matches_numpy(case, device_xp, host_reference):
    _, problem = case
    settings = SolverSettings(iterations=6)
    host, _ = solve(problem, settings, SerialComm())
    dev, params = solve(problem, settings, SerialComm(), xp=device_xp)
    assert get_xp(dev.u) is device_xp
    assert _rel(to_host(dev.u), host.u) < host_reference
    np.testing.assert_allclose(dev.history["r_factor"], host.history["r_factor"],
                               rtol=host_reference)
    assert dev.history["r_factor"][-1] < 0.5 * dev.history["r_factor"][0]


def test_ptycho2d_on_the_device_path_matches_numpy(case, device_xp, host_reference):
    data, _ = case
    projector = Projector(data.volume.shape, np.deg2rad(data.angles_deg))
    empty = projector.fwd(np.ones(data.volume.shape, np.complex64))
    f = np.fft.ifftshift(data.counts, axes=(-2, -1))
    args = (f, data.probe, data.positions_px, data.frame_offset, Ptycho2DSettings(iterations=8),
            SerialComm())
    host = solve_ptycho2d(empty, *args)
    dev = solve_ptycho2d(to_device(empty, device_xp), *args)
    assert get_xp(dev.v_local) is device_xp
    assert _rel(to_host(dev.v_local), host.v_local) < host_reference
    np.testing.assert_allclose(dev.history["r_factor"], host.history["r_factor"],
                               rtol=host_reference)
    assert dev.history["r_factor"][-1] < 0.5 * dev.history["r_factor"][0]


@pytest.mark.parametrize("xp", [np, strict_xp], ids=["numpy", "strict"])
def test_ptycho2d_keeps_the_dtype_of_its_images(case, xp):
    data, _ = case
    empty = to_device(np.ones((4, 8, 16), np.complex64), xp)
    state = solve_ptycho2d(empty, np.fft.ifftshift(data.counts, axes=(-2, -1)), data.probe,
                           data.positions_px, data.frame_offset,
                           Ptycho2DSettings(iterations=1), SerialComm())
    assert state.v_local.dtype == np.complex64


@pytest.mark.parametrize("algorithm,model", [("apt", "linear"), ("two-step", "linear"),
                                             ("apt", "exp")])
def test_reconstruct_on_the_device_path_matches_numpy(tmp_path, device_xp, monkeypatch,
                                                      host_reference, algorithm, model):
    from ptmpi.cli import main
    from ptmpi.solvers.admm_exp import ExpSolverSettings

    path = tmp_path / "in.h5"
    assert main(["simulate", "-o", str(path), "--n", "16", "--nz", "8", "--angles", "4",
                 "--step", "4", "--probe-size", "8", "--fwhm", "3", "--model", model]) == 0
    if model == "exp":
        settings = ExpSolverSettings(iterations=3, init_iterations=3, init_gn_iterations=2)
    elif algorithm == "apt":
        settings = SolverSettings(iterations=5)
    else:
        settings = Ptycho2DSettings(iterations=6)
    host_out, dev_out = tmp_path / "host.h5", tmp_path / "dev.h5"
    reconstruct_module.reconstruct(str(path), str(host_out), settings, SerialComm(),
                                   algorithm=algorithm, figures=False)
    if device_xp is strict_xp:
        monkeypatch.setattr(reconstruct_module, "get_array_module",
                            lambda gpu: strict_xp if gpu else np)
        monkeypatch.setattr(reconstruct_module, "select_device", lambda local_rank: 0)
    synced = strict_xp.synchronize_calls[0]
    reconstruct_module.reconstruct(str(path), str(dev_out), settings, SerialComm(),
                                   algorithm=algorithm, figures=False, gpu=True)
    if device_xp is strict_xp:  # the solver ran on strict arrays (it synchronized them)
        assert strict_xp.synchronize_calls[0] > synced
    with h5py.File(host_out, "r") as fh, h5py.File(dev_out, "r") as fd:
        u_host, u_dev = fh["entry_1/image_1/data"][...], fd["entry_1/image_1/data"][...]
        r_host = fh["entry_1/ptmpi/metrics/r_factor"][...]
        r_dev = fd["entry_1/ptmpi/metrics/r_factor"][...]
    assert _rel(u_dev, u_host) < host_reference
    np.testing.assert_allclose(r_dev, r_host, rtol=host_reference)
    assert r_dev[-1] < r_dev[0]


def test_coarse_start_on_the_device_path_matches_numpy(device_xp, host_reference):
    from ptmpi.solvers.start import coarse_start

    data = simulate(SimulationSettings(n=16, nz=16, n_angles=3, step=4, probe_size=16,
                                       fwhm=4.0))
    problem = LocalProblem(
        volume_shape=data.volume.shape, theta_local=np.deg2rad(data.angles_deg),
        f_local=np.fft.ifftshift(data.counts, axes=(-2, -1)), positions_local=data.positions_px,
        frame_offset_local=data.frame_offset, probe=data.probe, truth_volume=data.volume)
    settings = SolverSettings(start="coarse", start_iterations=4, refine_probe=True)
    host, _ = coarse_start(problem, settings, SerialComm())
    dev, info = coarse_start(problem, settings, SerialComm(), xp=device_xp)
    assert get_xp(dev.u) is device_xp and get_xp(dev.z_local) is device_xp
    assert info["start_iterations_done"] == 4
    assert _rel(to_host(dev.u), host.u) < 10 * host_reference
    assert _rel(to_host(dev.omega), host.omega) < 10 * host_reference


@pytest.mark.parametrize("n_modes", [1, 2])
def test_subpixel_probe_update_on_the_device_path_matches_numpy(device_xp, n_modes):
    """The least-squares probe update with sub-pixel frames (the normal operator as one
    convolution, the numerator formed by chunks) runs on device arrays and agrees with
    numpy (a linear computation: no discontinuity amplifies rounding here)."""
    from ptmpi.operators.fft import fft2
    from ptmpi.operators.ptycho import Ptycho
    from ptmpi.parallel.data_term import probe_from_views, probe_modes_from_views

    rng = np.random.default_rng(3)
    m, image = 8, (30, 30)
    positions = rng.uniform(-3, 25, size=(20, 2))
    probe = (rng.standard_normal((m, m)) + 1j * rng.standard_normal((m, m))).astype(
        np.complex64)
    v = (rng.standard_normal((1, *image)) + 1j * rng.standard_normal((1, *image))).astype(
        np.complex64)
    op = Ptycho(probe, positions, [0, 20], image)
    views = op.extract(v)
    exits = np.stack([op.fwd(v) * (1 + 0.1 * k) for k in range(n_modes)])
    dev_op = Ptycho(to_device(probe, device_xp), positions, [0, 20], image)
    dev_views, dev_exits = to_device(views, device_xp), to_device(exits, device_xp)
    if n_modes == 1:
        host = probe_from_views(views, fft2(exits[0]), SerialComm(), ptycho=op)
        dev = probe_from_views(dev_views, fft2(dev_exits[0]), SerialComm(), ptycho=dev_op)
    else:
        host = probe_modes_from_views(views, exits, SerialComm(), ptycho=op)
        dev = probe_modes_from_views(dev_views, dev_exits, SerialComm(), ptycho=dev_op)
    assert get_xp(dev) is device_xp and dev.shape == host.shape
    assert _rel(to_host(dev), host) < 1e-5


def test_exp_cg_tolerance_runs_on_the_device_path(monkeypatch):
    """``cg_tol`` decides on device arrays (explicit host conversions only) and takes the
    numpy run's steps (strict arrays, the numpy path without compiled kernels)."""
    from ptmpi.operators import kernels
    from ptmpi.solvers.admm_exp import ExpSolverSettings, solve_exp

    monkeypatch.setattr(kernels, "ENABLED", False)
    problem = _problem(simulate(SimulationSettings(n=16, nz=8, n_angles=4, step=4,
                                                   probe_size=8, fwhm=3.0, model="exp")))
    settings = ExpSolverSettings(iterations=3, init_iterations=3, init_gn_iterations=2,
                                 cg_iterations=2, cg_tol=0.05)
    host, _ = solve_exp(problem, settings, SerialComm())
    dev, _ = solve_exp(problem, settings, SerialComm(), xp=strict_xp)
    assert get_xp(dev.u) is strict_xp
    assert dev.history["cg_iterations"] == host.history["cg_iterations"]
    assert max(host.history["cg_iterations"]) > 2
    assert _rel(to_host(dev.u), host.u) < 1e-6
