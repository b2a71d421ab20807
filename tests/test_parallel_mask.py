"""A per-angle detector mask on 2 ranks: each rank reads the valid pixels of its own
frames, and APT and the driver give the serial results (garbage at masked pixels in the
file; the reader hands on 0 there, and the solvers do not use those pixels at all)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from ptmpi.io.cxi import read_input, write_input
from ptmpi.parallel import MPIComm, SerialComm, block_partition
from ptmpi.reconstruct import reconstruct
from ptmpi.sim.presets import SimulationSettings
from ptmpi.sim.simulate import simulate
from ptmpi.solvers.admm import LocalProblem, SolverSettings, solve

NZ, N, M = 12, 16, 8
N_ANGLES = 5


def write_masked_case(path) -> None:
    """The tiny case with a different mask per angle and NaN / huge counts under it."""
    data = simulate(SimulationSettings(n=N, nz=NZ, n_angles=N_ANGLES, step=4, probe_size=M,
                                       fwhm=3.0, eta=50.0, seed=7, jitter=1.5))
    rng = np.random.default_rng(3)
    mask = (rng.uniform(size=(N_ANGLES, M, M)) < 0.15).astype(np.uint32)
    mask[:, :, M // 2 + 2] = 1  # a dead column on every angle
    counts = data.counts.copy()
    for a in range(N_ANGLES):
        frames = counts[data.frame_offset[a] : data.frame_offset[a + 1]]
        frames[:, mask[a] != 0] = np.nan if a % 2 else 4e9
    write_input(path, counts=counts, probe=data.probe, positions_px=data.positions_px,
                frame_offset=data.frame_offset, angles_deg=data.angles_deg,
                volume_shape=(NZ, N, N), truth_volume=data.volume, mask=mask)


def problem_of(data) -> LocalProblem:
    return LocalProblem(
        volume_shape=data.volume_shape, theta_local=np.deg2rad(data.angles_deg_local),
        f_local=data.counts_local, positions_local=data.positions_local,
        frame_offset_local=data.frame_offset_local, probe=data.probe,
        valid_local=data.valid_local)


@pytest.mark.mpi(ranks=[2], timeout=60, unit="s")
def test_per_angle_mask_on_two_ranks_matches_serial(mpi_ranks, shared_tmp):
    comm = MPIComm()
    path = shared_tmp / "masked.h5"
    if comm.is_root:
        write_masked_case(path)
    comm.barrier()

    whole = read_input(path)
    start, stop = block_partition(N_ANGLES, comm.size, comm.rank)
    mine = read_input(path, start, stop)
    valid_all = comm.allgather(mine.valid_local)
    settings = SolverSettings(iterations=6, refine_probe=True)
    state_ser, _ = solve(problem_of(whole), settings, SerialComm())
    # the same counts (0 under the mask, as read) taken as data: another result
    unmasked = problem_of(whole)
    unmasked.valid_local = None
    state_unmasked, _ = solve(unmasked, settings, SerialComm())
    state_par, _ = solve(problem_of(mine), settings, comm)
    u_all = comm.allgather(state_par.u)  # the last collective: asserts come after it

    # the ranks' valid pixels tile the serial read's, frame by frame
    assert mine.valid_local.shape == mine.counts_local.shape
    assert np.array_equal(np.concatenate(valid_all), whole.valid_local)
    assert not whole.valid_local.all()
    u_ser, u_par = state_ser.u, state_par.u
    assert np.all(np.isfinite(u_par))
    assert np.linalg.norm(u_ser - 1) > 1e-2 * np.linalg.norm(np.ones_like(u_ser))
    assert np.linalg.norm(u_par - u_ser) < 1e-4 * np.linalg.norm(u_ser)
    assert np.linalg.norm(state_unmasked.u - u_ser) > 1e-2 * np.linalg.norm(u_ser)
    r_ser = np.asarray(state_ser.history["r_factor"])
    r_par = np.asarray(state_par.history["r_factor"])
    assert np.all(np.isfinite(r_par)) and r_ser[-1] < 0.8 * r_ser[0]
    assert np.max(np.abs(r_par - r_ser) / r_ser) < 1e-4
    f0, f1 = int(whole.frame_offset[start]), int(whole.frame_offset[stop])
    assert np.linalg.norm(state_par.z_local - state_ser.z_local[f0:f1]) < 1e-4 * np.linalg.norm(
        state_ser.z_local[f0:f1])
    assert all(np.array_equal(u, u_all[0]) for u in u_all)


@pytest.mark.mpi(ranks=[2], timeout=60, unit="s")
@pytest.mark.parametrize("algorithm", ["apt", "two-step"])
def test_masked_driver_on_two_ranks_matches_serial(mpi_ranks, shared_tmp, algorithm):
    comm = MPIComm()
    path = shared_tmp / "masked.h5"
    if comm.is_root:
        write_masked_case(path)
    comm.barrier()
    if algorithm == "apt":
        settings = SolverSettings(iterations=6)
    else:
        from ptmpi.solvers.ptycho2d import Ptycho2DSettings

        settings = Ptycho2DSettings(iterations=6)
    out_par = shared_tmp / f"par-{algorithm}.h5"
    summary = reconstruct(str(path), str(out_par), settings, comm, algorithm=algorithm,
                          figures=False)
    r_all = comm.allgather(summary["r_factor"])  # the last collective
    assert r_all[0] == r_all[1] and np.isfinite(summary["r_factor"])
    if not comm.is_root:
        return
    out_ser = shared_tmp / f"ser-{algorithm}.h5"
    serial = reconstruct(str(path), str(out_ser), settings, SerialComm(), algorithm=algorithm,
                         figures=False)
    with h5py.File(out_par, "r") as fp, h5py.File(out_ser, "r") as fs:
        u_par, u_ser = fp["entry_1/image_1/data"][()], fs["entry_1/image_1/data"][()]
    assert np.all(np.isfinite(u_par))
    assert np.linalg.norm(u_par - u_ser) < 1e-4 * np.linalg.norm(u_ser)
    assert summary["r_factor"] == pytest.approx(serial["r_factor"], rel=1e-4)
    assert summary["r_factor"] < 1.0
