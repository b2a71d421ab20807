"""Sums of volume-sized host arrays over the ranks of a node through shared memory.

The data term sums one complex128 volume over its ranks per CG step (``D^H D x``) and per
iteration (``D^H (z + lam2)``). ``MPI_Allreduce`` moves that volume through the library's
own buffers: at 128^3 (33.5 MB) MPICH's shared-memory Allreduce took 13-16 ms on two
ranks of this project's 2-core machine, the shared sum below 6-6.5 ms (README,
Distribution). A :class:`SharedSum` lets each rank write its part of the sum straight into a
buffer in memory that every rank of the node can address (an MPI-3 shared window), then:

1. barrier: every part is written;
2. rank ``r`` of the node sums, in node-rank order, its chunk ``r`` of the buffers
   (``N / P`` elements of each of the ``P`` buffers; cache-line aligned chunks) and writes
   the sum back into chunk ``r`` of every buffer. The chunks are disjoint, so no rank
   writes where another reads;
3. with ranks on more than one node, the first rank of each node sums its buffer over the
   nodes (one ``Allreduce`` among those ranks) and the others copy it;
4. barrier: every buffer holds the sum.

Each rank reads and writes about one volume, where the library's Allreduce copies it
through its buffers. The result is the rank's own buffer: valid until its next :meth:`reduce`. The
order of the sum over ranks is fixed by the layout (node-rank order inside a node), so a
run is reproducible on the same ranks; across rank counts it differs from the serial sum
by the rounding of the double-precision sums, as with ``MPI_Allreduce``.
"""

from __future__ import annotations

import numpy as np

_LINE = 64  # bytes: chunk boundaries on cache lines, so no two ranks write one line


class SharedSum:
    """Sum over the ranks of ``comm`` (an ``mpi4py`` communicator) of one ``shape`` x
    ``dtype`` host array per rank, through node-shared memory.

    Collective: every rank of ``comm`` constructs it, fills :attr:`buffer` and calls
    :meth:`reduce` together. ``node_colour`` groups the ranks into nodes (default: the
    ranks that share memory, ``COMM_TYPE_SHARED``; tests pass a colour to act as several
    nodes on one machine).
    """

    def __init__(self, comm, shape, dtype, node_colour: int | None = None):
        from mpi4py import MPI

        self._mpi = MPI
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        rank = comm.Get_rank()
        if node_colour is None:
            self._node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        else:
            self._node = comm.Split(node_colour, key=rank)
        node_rank, node_size = self._node.Get_rank(), self._node.Get_size()
        self._leader = node_rank == 0
        self._multinode = comm.allreduce(1 if self._leader else 0) > 1
        self._nodes = None  # the first ranks of the nodes (on them only)
        if self._multinode:
            nodes = comm.Split(0 if self._leader else MPI.UNDEFINED, key=rank)
            self._nodes = nodes if self._leader else None
        count = int(np.prod(self.shape))
        itemsize = self.dtype.itemsize
        self._window = MPI.Win.Allocate_shared(count * itemsize, itemsize, comm=self._node)
        self._buffers = []
        for k in range(node_size):
            memory, _ = self._window.Shared_query(k)
            self._buffers.append(np.frombuffer(memory, dtype=self.dtype, count=count))
        self._own = self._buffers[node_rank]
        self.buffer = self._own.reshape(self.shape)
        per_line = max(1, _LINE // itemsize)
        bounds = [min(count, -(-count * k // node_size // per_line) * per_line)
                  for k in range(node_size + 1)]
        bounds[-1] = count
        self._chunk = slice(bounds[node_rank], bounds[node_rank + 1])
        self._scratch = np.empty(self._chunk.stop - self._chunk.start, dtype=self.dtype)

    def reduce(self, local):
        """The sum over ranks of :attr:`buffer` (``local`` must be it, as filled by this
        rank); returns :attr:`buffer`, holding the sum until the next call."""
        if local is not self.buffer:
            raise ValueError("SharedSum.reduce: the local sum must be written into .buffer")
        self._node.Barrier()
        chunk, total = self._chunk, self._scratch
        if len(self._buffers) == 1:
            total[...] = self._own[chunk]
        else:
            np.add(self._buffers[0][chunk], self._buffers[1][chunk], out=total)
            for other in self._buffers[2:]:
                total += other[chunk]
        if not self._multinode:
            for other in self._buffers:
                other[chunk] = total
        else:
            self._buffers[0][chunk] = total
            self._node.Barrier()
            if self._leader:
                self._nodes.Allreduce(self._mpi.IN_PLACE, self._own, op=self._mpi.SUM)
            self._node.Barrier()
            if not self._leader:
                self._own[...] = self._buffers[0]
        self._node.Barrier()
        return self.buffer

    def free(self) -> None:
        """Release the shared window (collective)."""
        self._buffers, self._own, self.buffer = [], None, None
        self._window.Free()
        self._node.Free()
        if self._nodes is not None:
            self._nodes.Free()
