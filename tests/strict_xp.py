"""A strict stand-in for CuPy: numpy underneath, device rules on top.

Arrays of this module behave like CuPy arrays in the ways that break code written for
numpy only:

- implicit conversion to numpy (``np.asarray(a)``, ``np.array(a)``, anything that calls
  ``__array__``) raises TypeError, as CuPy does; ``a.get()`` or
  :func:`ptmpi.backend.to_host` is the explicit way;
- mixing a host ``numpy.ndarray`` into device arithmetic, or passing one to a function of
  this module other than ``asarray``/``array``, raises TypeError (CuPy: "Unsupported
  type");
- reductions return 0-d arrays, not numpy scalars;
- ``float()``, ``int()``, ``complex()`` and ``bool()`` of a one-element array work (an
  explicit, synchronising transfer in CuPy as well);
- the compiled host kernels are not used (their check looks for numpy arrays).

:mod:`ptmpi.backend` recognises these arrays through the ``__ptmpi_xp__`` attribute of
their type (the module) and uses its ``scipy_fft``, ``scipy_sparse`` and
``ptmpi_synchronize``.
A test that runs code through this module exercises the device code path on a machine
without a GPU.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import scipy.fft
import scipy.sparse

_this = sys.modules[__name__]
_HOST_OK = {"asarray", "array", "asanyarray"}
synchronize_calls = [0]


def _refuse_host(value, where: str):
    if isinstance(value, np.ndarray):
        raise TypeError(f"strict_xp: host numpy array passed to {where} (implicit transfer)")


def _unwrap(value, where: str, host_ok: bool = False):
    if isinstance(value, StrictArray):
        return value._a
    if not host_ok:
        _refuse_host(value, where)
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v, where, host_ok) for v in value)
    if isinstance(value, dict):
        return {k: _unwrap(v, where, host_ok) for k, v in value.items()}
    return value


def _wrap(value):
    if isinstance(value, np.ndarray):
        return StrictArray(value)
    if isinstance(value, np.generic) and not isinstance(value, (np.str_, np.bytes_)):
        return StrictArray(np.asarray(value))
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _wrapped(fn, where: str, host_ok: bool = False):
    def call(*args, **kwargs):
        args = _unwrap(args, where, host_ok)
        kwargs = _unwrap(kwargs, where, host_ok)
        return _wrap(fn(*args, **kwargs))

    call.__name__ = getattr(fn, "__name__", where)
    return call


class StrictArray(np.lib.mixins.NDArrayOperatorsMixin):
    """A numpy array that refuses to become a host array implicitly."""

    __slots__ = ("_a",)
    __ptmpi_xp__ = _this

    def __init__(self, a: np.ndarray):
        self._a = a

    # -- what CuPy refuses ------------------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError(
            "strict_xp: implicit conversion to a numpy array is not allowed; "
            "use .get() (ptmpi.backend.to_host) to copy to the host explicitly"
        )

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        where = f"numpy ufunc {ufunc.__name__}"
        inputs = _unwrap(inputs, where)
        if "out" in kwargs:
            kwargs["out"] = _unwrap(kwargs["out"], where)
        return _wrap(getattr(ufunc, method)(*inputs, **kwargs))

    def __array_function__(self, func, types_, args, kwargs):
        where = f"numpy.{func.__name__}"
        return _wrap(func(*_unwrap(args, where), **_unwrap(kwargs, where)))

    # -- explicit transfers -----------------------------------------------------------
    def get(self) -> np.ndarray:
        return self._a.copy()

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __complex__(self):
        return complex(self._a)

    def __bool__(self):
        return bool(self._a)

    def __index__(self):
        return self._a.__index__()

    # -- array behaviour --------------------------------------------------------------
    def __getitem__(self, key):
        return _wrap(self._a[_unwrap(key, "indexing")])

    def __setitem__(self, key, value):
        self._a[_unwrap(key, "indexing")] = _unwrap(value, "item assignment")

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(v) for v in self._a)

    def __repr__(self):
        return f"StrictArray({self._a!r})"

    def __matmul__(self, other):
        if isinstance(other, _SparseMatrix):
            return NotImplemented
        return _wrap(self._a @ _unwrap(other, "@"))

    def __getattr__(self, name):
        if name.startswith("__"):  # no __array_interface__, __array_struct__, ... (as CuPy)
            raise AttributeError(name)
        value = getattr(self._a, name)
        if callable(value):
            return _wrapped(value, f"ndarray.{name}")
        return _wrap(value)

    @property
    def real(self):
        return StrictArray(self._a.real)

    @real.setter
    def real(self, value):
        self._a.real = _unwrap(value, "real assignment")

    @property
    def imag(self):
        return StrictArray(self._a.imag)

    @imag.setter
    def imag(self, value):
        self._a.imag = _unwrap(value, "imag assignment")

    @property
    def T(self):  # noqa: N802 - numpy's name
        return StrictArray(self._a.T)

    @property
    def shape(self):
        return self._a.shape

    @property
    def dtype(self):
        return self._a.dtype


class _Namespace(types.ModuleType):
    """Module-like view of a numpy (or scipy) namespace whose functions wrap and unwrap."""

    def __init__(self, name: str, target, host_ok=frozenset()):
        super().__init__(name)
        self._target = target
        self._host_ok = host_ok

    def __getattr__(self, name):
        value = getattr(self._target, name)
        if isinstance(value, types.ModuleType):
            return _Namespace(f"{self.__name__}.{name}", value)
        if isinstance(value, np.ufunc) or (callable(value) and not isinstance(value, type)):
            return _wrapped(value, f"{self.__name__}.{name}", name in self._host_ok)
        return value


class _SparseMatrix:
    """A scipy sparse matrix that multiplies strict arrays (as cupyx's does CuPy's)."""

    def __init__(self, m):
        self._m = m

    def __matmul__(self, other):
        if not isinstance(other, StrictArray):
            raise TypeError("strict_xp: sparse @ host array")
        return StrictArray(np.asarray(self._m @ other._a))

    def __getattr__(self, name):
        return getattr(self._m, name)


class _Sparse(types.ModuleType):
    def csr_matrix(self, m):
        return _SparseMatrix(scipy.sparse.csr_matrix(m))


_np = _Namespace(__name__, np, frozenset(_HOST_OK))
scipy_fft = _Namespace(__name__ + ".fft", scipy.fft)
scipy_sparse = _Sparse(__name__ + ".sparse")


def ptmpi_synchronize() -> None:
    """Stand-in for a stream synchronisation (counted, so tests can see it was called)."""
    synchronize_calls[0] += 1


def __getattr__(name):  # module-level delegation to the wrapped numpy namespace
    return getattr(_np, name)
