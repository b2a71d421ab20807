"""Helpers for tests that launch whole ptmpi jobs as subprocesses (under ``mpiexec``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest


def mpiexec() -> str:
    """The ``mpiexec`` of this environment (the one beside the interpreter), or skip."""
    exe = Path(sys.executable).parent / "mpiexec"
    if not exe.exists():
        pytest.skip(f"no mpiexec next to {sys.executable}")
    return str(exe)


def job_env() -> dict:
    """This process's environment without traces of an MPI launcher or of the MPI plugin."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "OMPI_", "HYDRA_", "MPI_LOCAL"))
           and k not in ("PYTEST_ISOLATE_MPI_IS_FORKED", "PYTEST_MPI_REPORTS_PATH")}
    env["MPIR_CVAR_ENABLE_HEAVY_YIELD"] = "1"  # 2 cores: do not busy-wait in collectives
    env["OMP_NUM_THREADS"] = "1"
    env["MPLBACKEND"] = "Agg"
    return env
