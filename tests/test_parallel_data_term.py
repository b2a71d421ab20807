"""The data term as one distributed operator: its reduced maps against the serial ones."""

from __future__ import annotations

import numpy as np
import pytest
from test_parallel_solver import N_ANGLES, SHAPE, local_problem, rel, simulate_on_root

from ptmpi.parallel import MPIComm, SerialComm, block_partition
from ptmpi.parallel.data_term import DataTerm


def _term(problem, comm, dtype=np.complex128):
    return DataTerm(problem.volume_shape, problem.theta_local, problem.probe,
                    problem.positions_local, problem.frame_offset_local, comm, dtype=dtype)


@pytest.mark.mpi(ranks=[2, 3], timeout=60, unit="s")
def test_data_term_on_blocks_equals_the_serial_operator(mpi_ranks):
    comm = MPIComm()
    data = simulate_on_root(comm)
    serial = _term(local_problem(data, 0, N_ANGLES), SerialComm())
    a0, a1 = block_partition(N_ANGLES, comm.size, comm.rank)
    part = _term(local_problem(data, a0, a1), comm)

    rng = np.random.default_rng(3)  # same vectors on every rank
    u = rng.standard_normal(SHAPE) + 1j * rng.standard_normal(SHAPE)
    z_all = serial.fwd(u)
    f0, f1 = int(data.frame_offset[a0]), int(data.frame_offset[a1])
    # fwd is local: this rank's frames of the serial far fields
    np.testing.assert_allclose(part.fwd(u), z_all[f0:f1], rtol=1e-12, atol=1e-12)
    # adj, normal and diagonal are reduced: the serial results on every rank
    assert rel(part.adj(z_all[f0:f1]), serial.adj(z_all)) < 1e-12
    assert rel(part.normal(u), serial.normal(u)) < 1e-12
    assert rel(part.diagonal(), serial.diagonal()) < 1e-12
    assert abs(part.norm(5) - serial.norm(5)) <= 1e-10 * serial.norm(5)
    # adjoint test across ranks: <D u, z> summed over ranks = <u, D^H z>
    z = rng.standard_normal(z_all.shape) + 1j * rng.standard_normal(z_all.shape)
    lhs = part.reduce(np.array([np.vdot(part.fwd(u), z[f0:f1]).real,
                                np.vdot(part.fwd(u), z[f0:f1]).imag]))
    rhs = np.vdot(u, part.adj(z[f0:f1]))
    assert abs(complex(*lhs) - rhs) <= 1e-12 * abs(rhs)
    # reductions
    assert part.reduce(float(f1 - f0)) == float(data.frame_offset[-1])
    assert part.all(True) and not part.all(comm.rank != 0)


@pytest.mark.mpi(ranks=[2, 3], timeout=60, unit="s")
def test_shared_sums_equal_allreduce(mpi_ranks, monkeypatch):
    """The node-shared sums of the adjoint and the normal operator (the default on host
    arrays) give what MPI_Allreduce gives; an operand that is the shared buffer itself (the
    previous result) is not overwritten while it is read."""
    comm = MPIComm()
    data = simulate_on_root(comm)
    a0, a1 = block_partition(N_ANGLES, comm.size, comm.rank)
    part = _term(local_problem(data, a0, a1), comm)
    assert comm.shared_sum(SHAPE, np.complex128) is not None
    rng = np.random.default_rng(5)
    u = rng.standard_normal(SHAPE) + 1j * rng.standard_normal(SHAPE)
    z = part.fwd(u)
    shared_adj = part.adj(z).copy()
    shared_normal = part.normal(u)
    twice = part.normal(shared_normal).copy()  # the operand is the shared buffer
    shared_normal = part.normal(u).copy()
    monkeypatch.setenv("PTMPI_SHARED_SUM", "0")
    plain_normal = part.normal(u)
    assert rel(shared_adj, part.adj(z)) < 1e-14
    assert rel(shared_normal, plain_normal) < 1e-14
    assert rel(twice, part.normal(plain_normal)) < 1e-14


def test_one_rank_sums_reuse_one_buffer_and_read_it_safely():
    """On one rank the sums over angles go into one kept buffer (no new complex128 volume
    per call), with the same numbers as a fresh array; an operand that is that buffer (the
    previous result) is read intact."""
    from ptmpi.parallel import data_term as module

    data = simulate_on_root(SerialComm())
    term = _term(local_problem(data, 0, N_ANGLES), SerialComm())
    rng = np.random.default_rng(7)
    u = rng.standard_normal(SHAPE) + 1j * rng.standard_normal(SHAPE)
    first = term.normal(u)
    assert term.adj(term.fwd(u)) is first and term.normal(u) is first
    kept = first.copy()
    twice = term.normal(first)  # the operand is the buffer: a fresh array is summed
    assert twice is not first and np.array_equal(first, kept)
    assert np.array_equal(module.reduced_sum(  # no spare buffer: a new array
        SerialComm(), SHAPE, lambda out: term.model.normal(u, term.weight, np.complex128, out),
        u), kept)
    assert np.array_equal(twice, term.model.normal(kept, term.weight, np.complex128))
