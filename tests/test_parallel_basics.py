"""Communicators and the angle partition, serial and on 2 and 4 ranks."""

from __future__ import annotations

import numpy as np
import pytest

from ptmpi.parallel import MPIComm, SerialComm, block_partition, block_sizes, dot


@pytest.mark.parametrize("n_items,n_parts", [(12, 1), (12, 5), (7, 7), (3, 4), (48, 3)])
def test_block_partition_covers_in_order(n_items, n_parts):
    blocks = [block_partition(n_items, n_parts, p) for p in range(n_parts)]
    assert blocks[0][0] == 0 and blocks[-1][1] == n_items
    assert all(blocks[p][1] == blocks[p + 1][0] for p in range(n_parts - 1))
    sizes = block_sizes(n_items, n_parts)
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)


def test_block_partition_rejects_bad_parts():
    with pytest.raises(ValueError):
        block_partition(4, 0, 0)
    with pytest.raises(ValueError):
        block_partition(4, 2, 2)


def test_serial_comm_is_identity():
    comm = SerialComm()
    x = np.arange(3.0)
    assert comm.allreduce_sum(x) is x and comm.size == 1 and comm.is_root
    assert comm.bcast("a") == "a" and comm.gather(1) == [1]
    assert dot(x, x, comm) == 5.0


@pytest.mark.mpi(ranks=[2, 4], timeout=60, unit="s")
def test_comm_allreduce_and_partition(mpi_ranks):
    comm = MPIComm()
    assert comm.size == mpi_ranks
    assert 0 <= comm.local_rank < comm.size
    # in-place complex sum of rank-dependent data equals the serial sum
    x = np.full((3, 2), comm.rank + 1j * comm.rank, dtype=np.complex64)
    comm.allreduce_sum(x)
    total = sum(range(comm.size))
    assert np.all(x == total + 1j * total)
    # non-contiguous view is reduced too
    y = np.ones((4, 4))[:, ::2]
    comm.allreduce_sum(y)
    assert np.all(y == comm.size)
    # the blocks of all ranks tile the angles in order
    start, stop = block_partition(10, comm.size, comm.rank)
    blocks = comm.allgather((start, stop))
    assert [b for blk in blocks for b in range(*blk)] == list(range(10))
    # distributed inner product of blocks equals the serial one
    rng = np.random.default_rng(0)
    a = rng.standard_normal(10) + 1j * rng.standard_normal(10)
    b = rng.standard_normal(10) + 1j * rng.standard_normal(10)
    assert abs(dot(a[start:stop], b[start:stop], comm) - np.vdot(a, b)) < 1e-12
    assert comm.allreduce_scalar(comm.rank, "max") == comm.size - 1
    assert comm.bcast(comm.rank) == 0


@pytest.mark.mpi(ranks=[2], timeout=60, unit="s")
def test_device_arrays_are_staged_through_the_host_and_logged_once(mpi_ranks, caplog):
    import logging

    import strict_xp

    from ptmpi.backend import to_host

    caplog.set_level(logging.INFO, logger="ptmpi.parallel.comm")
    comm = MPIComm()
    x = strict_xp.full((3, 2), comm.rank + 1.0, dtype=np.float32)
    before = strict_xp.synchronize_calls[0]
    comm.allreduce_sum(x)
    comm.allreduce_sum(x)
    assert strict_xp.synchronize_calls[0] == before + 2  # synchronized before each call
    assert np.all(to_host(x) == 2 * (1.0 + 2.0))  # (1 + 2), then twice that
    staged = [r for r in caplog.records if "staged through host memory" in r.getMessage()]
    assert len(staged) == (1 if comm.rank == 0 else 0)


def test_comm_is_a_protocol_both_communicators_implement():
    from ptmpi.parallel import Comm, MPIComm

    assert isinstance(SerialComm(), Comm)
    assert not issubclass(MPIComm, SerialComm) and not issubclass(SerialComm, MPIComm)
    members = [n for n in vars(Comm) if not n.startswith("_")]
    assert {"allreduce_sum", "bcast", "reached_by_all", "is_root", "abort"} <= set(members)
    for cls in (SerialComm, MPIComm):
        missing = [n for n in members if not hasattr(cls, n) and n not in Comm.__annotations__]
        assert missing == [], cls


@pytest.mark.mpi(ranks=[2], timeout=60, unit="s")
def test_mpi_comm_satisfies_the_protocol(mpi_ranks):
    from ptmpi.parallel import Comm, MPIComm

    comm = MPIComm()
    assert isinstance(comm, Comm) and comm.is_root == (comm.rank == 0)


@pytest.mark.mpi(ranks=[2, 3, 4], timeout=60, unit="s")
@pytest.mark.parametrize("nodes", ["shared", "one rank each", "pairs"])
def test_shared_sum_equals_allreduce(mpi_ranks, nodes):
    from mpi4py import MPI

    from ptmpi.parallel.shared_sum import SharedSum

    world = MPI.COMM_WORLD
    # ranks grouped as nodes: the machine's (all here), one per rank, or pairs of ranks
    colour = {"shared": None, "one rank each": world.rank, "pairs": world.rank // 2}[nodes]
    for shape, dtype in [((5, 7, 3), np.complex128), ((1,), np.complex128),
                         ((3,), np.float64), ((16, 9, 9), np.complex64)]:
        acc = SharedSum(world, shape, dtype, node_colour=colour)
        for it in range(3):
            rng = np.random.default_rng(100 * world.rank + it)
            x = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype) \
                if np.dtype(dtype).kind == "c" else rng.standard_normal(shape).astype(dtype)
            expected = world.allreduce(x, op=MPI.SUM)
            acc.buffer[...] = x
            out = acc.reduce(acc.buffer)
            assert out is acc.buffer and out.shape == shape
            tol = 1e-5 if dtype == np.complex64 else 1e-12
            np.testing.assert_allclose(out, expected, rtol=tol, atol=tol)
            # every rank holds the same sum
            assert all(np.array_equal(out, other) for other in world.allgather(out.copy()))
        with pytest.raises(ValueError, match="buffer"):
            acc.reduce(np.zeros(shape, dtype))  # (raised on every rank before any barrier)
        acc.free()


@pytest.mark.mpi(ranks=[2], timeout=60, unit="s")
def test_shared_sum_is_cached_and_can_be_switched_off(mpi_ranks, monkeypatch):
    comm = MPIComm()
    first = comm.shared_sum((4, 4), np.complex128)
    assert first is not None and comm.shared_sum((4, 4), np.complex128) is first
    assert comm.shared_sum((4, 5), np.complex128) is not first
    assert SerialComm().shared_sum((4, 4), np.complex128) is None
    monkeypatch.setenv("PTMPI_SHARED_SUM", "0")
    assert comm.shared_sum((4, 4), np.complex128) is None


@pytest.mark.mpi(ranks=[2], timeout=60, unit="s")
def test_no_shared_sum_with_one_rank_per_node(mpi_ranks):
    comm = MPIComm()
    alone = comm.split(comm.rank, 0)  # each rank alone in its communicator
    assert alone.shared_sum((4, 4), np.complex128) is None
    # the same ranks split into one communicator share this machine's memory
    assert comm.split(0, comm.rank).shared_sum((4, 4), np.complex128) is not None
