"""Root pytest configuration: make the MPI launcher of this Python environment the one used.

pytest-isolate-mpi starts multi-rank tests with ``mpiexec`` found on PATH; putting the
interpreter's own ``bin`` first makes it the ``mpiexec`` that matches the installed mpi4py
(e.g. the one of the ``mpich`` wheel in a virtualenv), not some other MPI on the machine.
"""

import os
import sys

_BIN = os.path.dirname(os.path.abspath(sys.executable))
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")
# Tests oversubscribe the cores (4 ranks on 2 cores): yield instead of busy-polling.
os.environ.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")
# Keep BLAS/FFT threads from fighting over the cores in multi-rank tests.
os.environ.setdefault("OMP_NUM_THREADS", "1")
