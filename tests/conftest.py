"""Shared fixtures: seeded rng, dtype-aware tolerances, array-module parametrization,
a folder shared by the ranks of an MPI test."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from ptmpi.backend import gpu_available


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20191001)


def _xp_params():
    params = [pytest.param(np, id="numpy")]
    try:
        import cupy
    except Exception:  # noqa: BLE001
        return params
    params.append(
        pytest.param(
            cupy,
            id="cupy",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not gpu_available(), reason="no usable GPU"),
            ],
        )
    )
    return params


@pytest.fixture(params=_xp_params())
def xp(request):
    return request.param


@pytest.fixture(params=[np.complex64, np.complex128], ids=["c64", "c128"])
def cdtype(request):
    return np.dtype(request.param)


# The project's shared folder sits beside the checkout (override with PTMPI_SHARED).
SHARED = Path(os.environ.get("PTMPI_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SIEMENS = SHARED / "data/tike-siemens-star/siemens-star-small.h5"


@pytest.fixture
def siemens_path() -> Path:
    """The real tike Siemens-star file; skips (with the reason) when it is not there."""
    if not SIEMENS.exists():
        pytest.skip(f"real data not found at {SIEMENS} (shared/ beside the checkout)")
    return SIEMENS


@pytest.fixture
def shared_tmp(mpi_ranks):
    """A fresh folder that every rank of an MPI test sees, removed after the test.

    Not ``mpi_tmp_path``: pytest-isolate-mpi caches the session's ``tmp_path_factory`` per
    (size, rank) and restores it in later subsessions, but pytest's retention (3 base
    folders) has by then deleted that factory's base folder whenever subsessions of other
    sizes ran in between, so ``tmp_path`` fails in setup (FileNotFoundError).
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    name = comm.bcast(tempfile.mkdtemp(prefix="ptmpi-mpi-") if comm.rank == 0 else None)
    yield Path(name)
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(name, ignore_errors=True)
