"""Array-module backend: the only place that imports CuPy.

Every math function starts with ``xp = get_xp(x)`` and is then written once for
numpy and CuPy. Host/device transfers happen only in ``io/``, ``sim/`` and ``cli.py``
through :func:`to_host` and :func:`to_device`.
"""

from __future__ import annotations

import functools
import logging
import types

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_COMPLEX = np.complex64
DEFAULT_REAL = np.float32


@functools.lru_cache(maxsize=1)
def _cupy() -> types.ModuleType | None:
    """CuPy if it imports *and* sees a GPU, else None (checked once, lazily).

    Counting devices creates no CUDA context, so no rank touches GPU 0 before it has
    selected its own device.
    """
    try:
        import cupy
    except Exception:  # noqa: BLE001 - any import failure means "no CuPy"
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:  # noqa: BLE001 - CuPy without a driver or device raises here
        return None
    return cupy


def gpu_available() -> bool:
    """True when CuPy imports and can allocate on a GPU."""
    return _cupy() is not None


def _device_module(x) -> types.ModuleType | None:
    """The array module of a device array, None for a host array.

    Besides CuPy, an array type may name its module in ``__ptmpi_xp__``: the tests' strict
    stand-in for CuPy (``tests/strict_xp.py``) does, so the device code path runs without
    a GPU. Such a module provides ``scipy_fft``, ``scipy_sparse`` and ``ptmpi_synchronize()``.
    """
    if type(x).__module__.startswith("cupy"):
        return _cupy() or np
    return getattr(type(x), "__ptmpi_xp__", None)


def get_xp(*arrays) -> types.ModuleType:
    """Array module (numpy or cupy) of the given arrays; numpy when none is a device array."""
    for a in arrays:
        xp = _device_module(a)
        if xp is not None:
            return xp
    return np


def is_device_array(x) -> bool:
    return _device_module(x) is not None


def to_host(x):
    """numpy copy (or the array itself) of a numpy or CuPy array."""
    if is_device_array(x):
        return x.get()
    return np.asarray(x)


def to_device(x, xp: types.ModuleType):
    """Array ``x`` on the device of array module ``xp``."""
    if xp is np:
        return to_host(x)
    return xp.asarray(x)


def get_array_module(gpu: bool) -> types.ModuleType:
    """numpy, or cupy when ``gpu`` is requested (error if no GPU is usable)."""
    if not gpu:
        return np
    cp = _cupy()
    if cp is None:
        from ptmpi.errors import UserError

        raise UserError("--gpu was requested but CuPy is not installed or no GPU is usable "
                        "(pip install 'ptmpi[gpu]' on a machine with a CUDA GPU)")
    return cp


def select_device(local_rank: int) -> int:
    """Select the GPU for this rank from its node-local rank; return the device id."""
    cp = _cupy()
    if cp is None:
        raise RuntimeError("no usable GPU: cannot select a device")
    n_devices = cp.cuda.runtime.getDeviceCount()
    device_id = local_rank % n_devices
    cp.cuda.Device(device_id).use()
    return device_id


def fft_module(xp: types.ModuleType) -> types.ModuleType:
    """scipy.fft-like module for ``xp`` (scipy.fft on the host, cupyx.scipy.fft on a GPU)."""
    if xp is np:
        import scipy.fft

        return scipy.fft
    if hasattr(xp, "scipy_fft"):
        return xp.scipy_fft
    import cupyx.scipy.fft

    return cupyx.scipy.fft


def sparse_module(xp: types.ModuleType) -> types.ModuleType:
    """scipy.sparse-like module for ``xp``."""
    if xp is np:
        import scipy.sparse

        return scipy.sparse
    if hasattr(xp, "scipy_sparse"):
        return xp.scipy_sparse
    import cupyx.scipy.sparse

    return cupyx.scipy.sparse


def real_dtype(dtype) -> np.dtype:
    """float32 for complex64, float64 for complex128 (and real dtypes unchanged)."""
    return np.finfo(np.dtype(dtype)).dtype


def complex_dtype(dtype) -> np.dtype:
    """complex64 for float32/complex64, complex128 for float64/complex128."""
    return np.result_type(np.dtype(dtype), np.complex64)


def synchronize(xp: types.ModuleType) -> None:
    """Wait for queued device work (before an MPI call or a timer read); no-op on the host."""
    if xp is np:
        return
    if hasattr(xp, "ptmpi_synchronize"):
        xp.ptmpi_synchronize()
    else:
        xp.cuda.get_current_stream().synchronize()
