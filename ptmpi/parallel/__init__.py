"""MPI kept out of the math: communicators and the angle partition."""

from ptmpi.parallel.comm import Comm, MPIComm, SerialComm, dot, get_comm
from ptmpi.parallel.partition import block_partition, block_sizes

__all__ = ["Comm", "MPIComm", "SerialComm", "block_partition", "block_sizes", "dot", "get_comm"]
