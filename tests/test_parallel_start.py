"""The coarse-to-fine start on 2 ranks against its serial self."""

from __future__ import annotations

import numpy as np
import pytest

from ptmpi.parallel import MPIComm, SerialComm, block_partition
from ptmpi.sim.presets import SimulationSettings
from ptmpi.sim.simulate import simulate
from ptmpi.solvers.admm import LocalProblem, SolverSettings
from ptmpi.solvers.start import coarse_start

N_ANGLES = 5


def _local(data, a0, a1):
    off = data.frame_offset
    f0, f1 = int(off[a0]), int(off[a1])
    return LocalProblem(
        volume_shape=data.volume.shape, theta_local=np.deg2rad(data.angles_deg[a0:a1]),
        f_local=np.fft.ifftshift(data.counts[f0:f1], axes=(-2, -1)),
        positions_local=data.positions_px[f0:f1], frame_offset_local=off[a0:a1 + 1] - f0,
        probe=data.probe)


@pytest.mark.mpi(ranks=[2], timeout=60, unit="s")
def test_coarse_start_on_blocks_matches_the_serial_one(mpi_ranks):
    comm = MPIComm()
    data = simulate(SimulationSettings(n=16, nz=16, n_angles=N_ANGLES, step=4, probe_size=16,
                                       fwhm=4.0, eta=50.0, seed=3)) if comm.is_root else None
    data = comm.bcast(data)
    settings = SolverSettings(start="coarse", start_iterations=8, epsilon=0.0)
    state_ser, info_ser = coarse_start(_local(data, 0, N_ANGLES), settings, SerialComm(),
                                       dtype=np.complex128)
    a0, a1 = block_partition(N_ANGLES, comm.size, comm.rank)
    state_par, info_par = coarse_start(_local(data, a0, a1), settings, comm,
                                       dtype=np.complex128)
    u_all = comm.allgather(state_par.u)
    assert info_par["start_iterations_done"] == info_ser["start_iterations_done"] == 8
    assert np.linalg.norm(state_par.u - state_ser.u) < 1e-8 * np.linalg.norm(state_ser.u)
    assert np.linalg.norm(state_ser.u - 1) > 1e-2 * np.linalg.norm(state_ser.u)
    f0, f1 = int(data.frame_offset[a0]), int(data.frame_offset[a1])
    np.testing.assert_allclose(state_par.z_local, state_ser.z_local[f0:f1], rtol=0,
                               atol=1e-8 * np.abs(state_ser.z_local).max())
    assert all(np.array_equal(u, u_all[0]) for u in u_all)


@pytest.mark.mpi(ranks=[2], timeout=60, unit="s")
def test_two_step_start_on_blocks_matches_the_serial_one(mpi_ranks):
    """The 2-step start: each rank's per-angle ptychography of its own angles, the
    tomography summed over ranks; the serial volume and far fields."""
    from ptmpi.solvers.start import two_step_start

    comm = MPIComm()
    data = simulate(SimulationSettings(n=16, nz=16, n_angles=N_ANGLES, step=4, probe_size=16,
                                       fwhm=4.0, eta=50.0, seed=3)) if comm.is_root else None
    data = comm.bcast(data)
    settings = SolverSettings(start="two-step", start_iterations=8)
    state_ser, _ = two_step_start(_local(data, 0, N_ANGLES), settings, SerialComm(),
                                  dtype=np.complex128)
    a0, a1 = block_partition(N_ANGLES, comm.size, comm.rank)
    state_par, _ = two_step_start(_local(data, a0, a1), settings, comm, dtype=np.complex128)
    assert np.linalg.norm(state_par.u - state_ser.u) < 1e-8 * np.linalg.norm(state_ser.u)
    assert np.linalg.norm(state_ser.u - 1) > 1e-2 * np.linalg.norm(state_ser.u)
    f0, f1 = int(data.frame_offset[a0]), int(data.frame_offset[a1])
    np.testing.assert_allclose(state_par.z_local, state_ser.z_local[f0:f1], rtol=0,
                               atol=1e-8 * np.abs(state_ser.z_local).max())
