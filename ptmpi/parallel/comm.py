"""Communicators: the ``Comm`` protocol, ``MPIComm`` over mpi4py and ``SerialComm``.

Solvers receive a :class:`Comm` and never import mpi4py themselves. ``SerialComm`` (one
rank, no MPI) and ``MPIComm`` implement the protocol independently: neither derives from
the other. Reductions of
arrays go through :meth:`allreduce_sum` (in place, one call per quantity), except the data
term's repeated volume sums on host arrays, which use the node-shared buffers of
:meth:`MPIComm.shared_sum` (:mod:`ptmpi.parallel.shared_sum`). Device (CuPy)
arrays given to any buffer method (:meth:`MPIComm.allreduce_sum`, ``alltoallv``,
``sendrecv``, ``gatherv``) are synchronized and staged through host memory (no CUDA-aware
MPI is assumed); the result lands on the input's device.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Protocol, runtime_checkable

import numpy as np

from ptmpi.backend import get_xp, is_device_array, synchronize, to_device, to_host

logger = logging.getLogger(__name__)

# Seconds between the last error line and MPI_Abort (see MPIComm.abort).
_ABORT_GRACE_S = 0.5


@runtime_checkable
class Comm(Protocol):
    """What solvers and drivers need of a communicator (:class:`SerialComm`, :class:`MPIComm`).

    ``rank``/``size`` are in the world; ``local_rank``/``local_size`` among the ranks that
    share this node's memory.
    """

    rank: int
    size: int
    local_rank: int
    local_size: int

    @property
    def is_root(self) -> bool: ...

    def allreduce_sum(self, x):
        """Sum over ranks, in place for arrays (numpy or device); returns ``x``."""

    def allreduce_scalar(self, value: float, op: str = "sum") -> float: ...

    def shared_sum(self, shape, dtype):
        """A :class:`~ptmpi.parallel.shared_sum.SharedSum` for repeated sums of host
        arrays of this shape and dtype over the ranks, or None where there is nothing to
        share (one rank; see :meth:`MPIComm.shared_sum`)."""

    def bcast(self, obj, root: int = 0): ...

    def gather(self, obj, root: int = 0): ...

    def allgather(self, obj): ...

    def barrier(self) -> None: ...

    def reached_by_all(self, timeout: float) -> bool:
        """True when every rank calls this within ``timeout`` seconds (error paths)."""

    def abort(self, code: int = 1) -> None: ...


class SerialComm:
    """A one-rank :class:`Comm` (no MPI needed)."""

    rank = 0
    size = 1
    local_rank = 0
    local_size = 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def allreduce_sum(self, x):
        """Sum over ranks, in place for arrays; returns ``x``."""
        return x

    def allreduce_scalar(self, value: float, op: str = "sum") -> float:
        return value

    def shared_sum(self, shape, dtype):
        return None

    def bcast(self, obj, root: int = 0):
        return obj

    def gather(self, obj, root: int = 0):
        return [obj]

    def allgather(self, obj):
        return [obj]

    def barrier(self) -> None:
        return None

    def alltoallv(self, send, send_counts, recv, recv_counts) -> None:
        """Exchange blocks of flat arrays (one rank: a copy of the only block)."""
        recv[...] = send

    def sendrecv(self, send, dest, source):
        """Send ``send`` to ``dest``, receive from ``source`` (one rank: nothing moves)."""
        return None

    def split(self, colour: int, key: int):
        """The sub-communicator of the ranks with the same ``colour`` (one rank: itself)."""
        return self

    def gatherv(self, send, recv, counts, root: int = 0) -> None:
        """Gather flat blocks into ``recv`` on ``root`` (one rank: a copy)."""
        recv[...] = send

    def reached_by_all(self, timeout: float) -> bool:
        """True when every rank calls this within ``timeout`` seconds (see :class:`MPIComm`)."""
        return True

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class MPIComm:
    """A :class:`Comm` over an ``mpi4py.MPI.Comm`` (default: ``COMM_WORLD``)."""

    def __init__(self, mpi_comm=None):
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = node.Get_rank()
        self.local_size = node.Get_size()  # ranks sharing this node's memory
        node.Free()
        # Only for reached_by_all: its barrier can never match a collective of the solver.
        self._guard = self.comm.Dup()
        # the staging is logged once, by world rank 0: sub-communicators share the flag
        self._staging_logged = [False]
        self._logs_staging = self.rank == 0
        self._shared_sums = {}  # (shape, dtype) -> SharedSum (shared_sum)
        self._shares_nodes = None  # (shared_sum)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def _stage(self, x):
        """Host copy of the device array ``x`` after its queued work (logged once)."""
        synchronize(get_xp(x))
        if not self._staging_logged[0]:
            self._staging_logged[0] = True
            if self._logs_staging:
                logger.info("MPI buffers of device arrays are staged through host memory "
                            "(CUDA-aware MPI is not assumed)")
        return np.ascontiguousarray(to_host(x))

    def allreduce_sum(self, x):
        """Sum over ranks in place (numpy or CuPy array); returns ``x``.

        Non-contiguous or scalar inputs are reduced through a contiguous host buffer.
        """
        if self.size == 1:
            return x
        xp = get_xp(x)
        if is_device_array(x):
            host = self._stage(x)
            self.comm.Allreduce(self._mpi.IN_PLACE, host, op=self._mpi.SUM)
            x[...] = xp.asarray(host)
            return x
        if isinstance(x, np.ndarray) and x.flags.c_contiguous:
            self.comm.Allreduce(self._mpi.IN_PLACE, x, op=self._mpi.SUM)
            return x
        buf = np.ascontiguousarray(x)
        self.comm.Allreduce(self._mpi.IN_PLACE, buf, op=self._mpi.SUM)
        x[...] = buf
        return x

    def allreduce_scalar(self, value: float, op: str = "sum") -> float:
        ops = {"sum": self._mpi.SUM, "max": self._mpi.MAX, "min": self._mpi.MIN}
        return self.comm.allreduce(value, op=ops[op])

    def shared_sum(self, shape, dtype):
        """A :class:`~ptmpi.parallel.shared_sum.SharedSum` over this communicator for
        ``shape`` x ``dtype`` host arrays, made on first use and kept (one buffer per rank
        in node-shared memory). None on one rank, with one rank per node, or when the
        environment sets ``PTMPI_SHARED_SUM=0`` (then sums go through ``MPI_Allreduce``).
        Collective on first use for a shape and dtype."""
        if self.size == 1 or os.environ.get("PTMPI_SHARED_SUM", "1") == "0":
            return None
        if self._shares_nodes is None:  # some node holds two ranks of this communicator
            self._shares_nodes = self.allreduce_scalar(float(self.local_size), "max") > 1
        if not self._shares_nodes:
            return None  # one rank per node: nothing to share, MPI_Allreduce
        from ptmpi.parallel.shared_sum import SharedSum

        key = (tuple(int(s) for s in shape), np.dtype(dtype).str)
        if key not in self._shared_sums:
            self._shared_sums[key] = SharedSum(self.comm, shape, dtype)
        return self._shared_sums[key]

    def bcast(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root)

    def gather(self, obj, root: int = 0):
        return self.comm.gather(obj, root=root)

    def allgather(self, obj):
        return self.comm.allgather(obj)

    def barrier(self) -> None:
        self.comm.Barrier()

    def alltoallv(self, send, send_counts, recv, recv_counts) -> None:
        """Alltoallv of flat contiguous host arrays: ``send_counts[j]`` elements of
        ``send`` (in rank order) go to rank ``j``, ``recv_counts[j]`` of ``recv`` come from
        it. Complex arrays travel as their real view. Device arrays are staged through
        host memory (``recv`` is filled on its device)."""
        if is_device_array(send) or is_device_array(recv):
            host_recv = np.empty(recv.shape, dtype=recv.dtype)
            self.alltoallv(self._stage(send) if is_device_array(send) else send, send_counts,
                           host_recv, recv_counts)
            recv[...] = to_device(host_recv, get_xp(recv))
            return

        def typed(a, counts):
            if np.iscomplexobj(a):
                a, counts = a.view(a.real.dtype), [2 * c for c in counts]
            displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
            return [a, ([int(c) for c in counts], displs)]

        self.comm.Alltoallv(typed(send, send_counts), typed(recv, recv_counts))

    def sendrecv(self, send, dest, source):
        """Send the contiguous host array ``send`` to ``dest`` (None: nobody) and receive
        an array of the same shape and dtype from ``source`` (None: nobody; returns None).
        A device array is staged through host memory; the received array is on its device."""
        if is_device_array(send):
            recv = self.sendrecv(self._stage(send), dest, source)
            return None if recv is None else to_device(recv, get_xp(send))
        mpi = self._mpi
        recv = None if source is None else np.empty_like(send)
        self.comm.Sendrecv(send if dest is not None else None,
                           dest=mpi.PROC_NULL if dest is None else dest,
                           recvbuf=recv, source=mpi.PROC_NULL if source is None else source)
        return recv

    def gatherv(self, send, recv, counts, root: int = 0) -> None:
        """Gatherv of flat contiguous host arrays: ``counts[j]`` elements from rank ``j``
        land in rank order in ``recv`` on ``root`` (None elsewhere), without a list of
        blocks beside it. Complex arrays travel as their real view. Device arrays are staged
        through host memory."""
        if is_device_array(send) or is_device_array(recv):
            host_recv = None if recv is None else np.empty(recv.shape, dtype=recv.dtype)
            self.gatherv(self._stage(send) if is_device_array(send) else send, host_recv,
                         counts, root)
            if recv is not None and self.rank == root:
                recv[...] = to_device(host_recv, get_xp(recv))
            return
        if np.iscomplexobj(send):
            send = send.view(send.real.dtype)
            recv = None if recv is None else recv.view(recv.real.dtype)
            counts = [2 * c for c in counts]
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        target = [recv, ([int(c) for c in counts], displs)] if self.rank == root else None
        self.comm.Gatherv(send, target, root=root)

    def split(self, colour: int, key: int) -> MPIComm:
        """The :class:`MPIComm` of the ranks with the same ``colour``, ordered by ``key``."""
        sub = MPIComm(self.comm.Split(colour, key))
        sub._staging_logged, sub._logs_staging = self._staging_logged, self._logs_staging
        return sub

    def reached_by_all(self, timeout: float) -> bool:
        """A barrier that gives up: True when every rank calls this within ``timeout`` s.

        For error paths. An error that every rank is expected to raise alike passes at once;
        when it returns False, some rank did not raise it and is waiting in a collective
        elsewhere, so the caller must end the job (:meth:`abort`).
        """
        import time

        request = self._guard.Ibarrier()
        deadline = time.monotonic() + timeout
        while not request.Test():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def abort(self, code: int = 1) -> None:
        import time

        sys.stdout.flush()
        sys.stderr.flush()
        # The launcher forwards output asynchronously and stops forwarding when the abort
        # reaches it: give the error line just written time to get out (under load it was
        # lost now and then without this).
        time.sleep(_ABORT_GRACE_S)
        self.comm.Abort(code)


def _launched_by_mpi() -> bool:
    """True when an MPI or SLURM launcher started this process with more than one task."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        if os.environ.get(var, "1") not in ("", "1"):
            return True
    return any(v in os.environ for v in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK"))


def _launcher_size() -> int | None:
    """World size announced by a PMI/PMIx/Open MPI launcher, None when none announces one."""
    for var in ("PMI_SIZE", "PMIX_SIZE", "OMPI_COMM_WORLD_SIZE"):
        try:
            return int(os.environ[var])
        except (KeyError, ValueError):
            continue
    return None


def check_slurm_step(size: int) -> None:
    """Refuse a one-process MPI world in a task of a multi-task ``srun`` step.

    ``srun -n N`` without the PMI plugin the MPI library speaks (``--mpi=none``, or a plugin
    of another MPI) starts N singletons: each would run the whole job alone and write the
    same output. ``SLURM_STEP_NUM_TASKS`` is set only inside an ``srun`` step (not in the
    batch script itself), so a serial ``ptmpi`` call in a job script is not affected; nor is
    a launcher inside the step that announces a world of one (``mpiexec -n 1``).

    Raises
    ------
    RuntimeError
        When the step has more than one task but MPI sees ``size == 1``.
    """
    try:
        step_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
    except ValueError:
        return
    if size != 1 or step_tasks <= 1 or _launcher_size() == 1:
        return
    raise RuntimeError(
        f"srun started {step_tasks} tasks (SLURM_STEP_NUM_TASKS={step_tasks}) but MPI sees "
        "a single process in each, so every task would run the whole job alone: launch with "
        "the PMI plugin of your MPI (e.g. srun --mpi=pmi2 for MPICH; see srun --mpi=list) "
        "or with mpiexec inside the allocation"
    )


def check_launcher(size: int) -> None:
    """Refuse a one-process MPI world under a launcher that started several processes.

    ``mpiexec -n N`` from one MPI with mpi4py built against another (or loading another
    ``libmpi`` at run time) gives N singletons: each would run the whole job alone on the
    whole data and race the others to the same output file.

    Raises
    ------
    RuntimeError
        When the launcher announces more than one process but MPI sees ``size == 1``.
    """
    announced = _launcher_size()
    if size == 1 and announced is not None and announced > 1:
        raise RuntimeError(
            f"the launcher started {announced} processes but MPI sees a single process in "
            "each, so every process would run the whole job alone: mpi4py uses another MPI "
            "library than this mpiexec (check `python -c \"from mpi4py import MPI; "
            "print(MPI.Get_library_version())\"` under it, and the library path)"
        )


def get_comm(force_serial: bool = False) -> Comm:
    """The world communicator: ``MPIComm`` under a launcher, otherwise ``SerialComm``.

    A plain ``ptmpi ...`` with one process needs no MPI at all; under ``mpiexec`` or
    ``srun`` mpi4py is required. A multi-task ``srun`` step whose tasks MPI does not join
    into one world is an error (:func:`check_slurm_step`), unless ``force_serial``.
    """
    if force_serial:
        return SerialComm()
    if not _launched_by_mpi():
        check_slurm_step(1)
        return SerialComm()
    try:
        comm = MPIComm()
    except ImportError as exc:
        raise RuntimeError(
            "started under an MPI launcher but mpi4py cannot be imported: "
            f"{exc}; install mpi4py built against your MPI"
        ) from exc
    check_slurm_step(comm.size)
    check_launcher(comm.size)
    return comm


def angle_sums(comm: Comm, per_angle) -> np.ndarray:
    """Sums over every rank's angles of per-angle values ``(N_THETA_LOCAL, K)`` (float64,
    each angle's computed on its own rank alike whatever the split): gathered and summed
    with ``math.fsum``, exactly rounded, so the sums do not depend on how the angles are
    split over ranks (an ``allreduce`` of per-rank partial sums rounds by the split).
    Returns ``(K,)`` float64, the same on every rank."""
    import math

    local = np.asarray(to_host(per_angle), dtype=np.float64)
    local = local.reshape(local.shape[0], -1)
    every = np.concatenate(comm.allgather(local)) if comm.size > 1 else local
    return np.array([math.fsum(every[:, k]) for k in range(every.shape[1])])


def dot(x, y, comm: Comm | None = None) -> complex:
    """``vdot(x, y)`` of rank-local arrays, summed over ranks when ``comm`` is given."""
    xp = get_xp(x, y)
    value = complex(xp.vdot(x, y))
    if comm is None or comm.size == 1:
        return value
    buf = np.array([value.real, value.imag])
    comm.allreduce_sum(buf)
    return complex(buf[0], buf[1])
