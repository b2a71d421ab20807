"""Shared fixtures: seeded rng, dtype-aware tolerances, array-module parametrization."""

from __future__ import annotations

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
