"""``--align`` on 2 ranks against the serial run (same process): each rank refines the
shifts of its own angles, and together they give the serial shifts and volume."""

from __future__ import annotations

import numpy as np
import pytest
from test_align import N_ANGLES, drift_settings, local_problem

from ptmpi.parallel import MPIComm, SerialComm, block_partition
from ptmpi.sim.simulate import simulate
from ptmpi.solvers.admm import SolverSettings, solve
from ptmpi.solvers.admm_exp import ExpSolverSettings, solve_exp


@pytest.mark.mpi(ranks=[2], timeout=300, unit="s")
@pytest.mark.parametrize("model, modes", [("linear", 1), ("exp", 1), ("linear", 2),
                                          ("exp", 2)])
def test_align_on_two_ranks_matches_the_serial_run(mpi_ranks, model, modes):
    comm = MPIComm()
    data = comm.bcast(simulate(drift_settings(1.5, model=model)) if comm.is_root else None)
    # with probe modes, refined: the modes' probe update is a sum over ranks as well
    extra = {"probe_modes": modes, "refine_probe": True} if modes > 1 else {}
    if model == "linear":
        settings = SolverSettings(iterations=14, tol=0, align=True, align_start=2,
                                  align_every=3, **extra)
        run = solve
    else:
        settings = ExpSolverSettings(iterations=10, init_iterations=10, init_gn_iterations=4,
                                     align=True, align_start=2, align_every=3, **extra)
        run = solve_exp
    serial, _ = run(local_problem(data), settings, SerialComm(), dtype=np.complex128)
    a0, a1 = block_partition(N_ANGLES, comm.size, comm.rank)
    state, _ = run(local_problem(data, a0, a1), settings, comm, dtype=np.complex128)
    shifts = np.concatenate(comm.allgather(state.shifts_local))

    assert np.max(np.abs(serial.shifts_local)) > 0.3  # the shifts moved
    assert np.max(np.abs(shifts - serial.shifts_local)) < 1e-8
    assert np.array_equal(state.shifts_local, shifts[a0:a1])
    assert np.linalg.norm(state.u - serial.u) < 1e-8 * np.linalg.norm(serial.u)
    if modes > 1:
        assert state.omega.shape == (modes, *data.probe.shape)
        assert np.allclose(state.omega, serial.omega, rtol=0,
                           atol=1e-8 * np.abs(serial.omega).max())
