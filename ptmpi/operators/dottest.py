"""Adjoint (dot) test shared by all operators' tests."""

from __future__ import annotations

import numpy as np

# Adjoint tolerances of SPEC section 1, by dtype.
DOT_TOL = {np.dtype(np.complex64): 1e-5, np.dtype(np.complex128): 1e-12}


def random_array(shape, dtype, rng: np.random.Generator) -> np.ndarray:
    """Standard normal array of ``dtype`` (complex: independent real and imaginary parts)."""
    dtype = np.dtype(dtype)
    x = rng.standard_normal(shape)
    if dtype.kind == "c":
        x = x + 1j * rng.standard_normal(shape)
    return x.astype(dtype)


def dottest(fwd, adj, x_shape, y_shape, dtype, rng: np.random.Generator, xp=np) -> float:
    """Relative adjoint mismatch ``|<A x, y> - <x, A^H y>| / (||A x|| ||y||)``.

    Below about 1e-5 in complex64 and 1e-12 in complex128 for an exact adjoint (SPEC 1).
    """
    x = xp.asarray(random_array(x_shape, dtype, rng))
    y = xp.asarray(random_array(y_shape, dtype, rng))
    ax = fwd(x)
    if ax.shape != tuple(y_shape):
        raise AssertionError(f"forward output shape {ax.shape} != {tuple(y_shape)}")
    lhs = complex(xp.vdot(ax.astype(np.complex128), y.astype(np.complex128)))
    rhs = complex(xp.vdot(x.astype(np.complex128), adj(y).astype(np.complex128)))
    scale = float(xp.linalg.norm(ax.astype(np.complex128))) * float(
        xp.linalg.norm(y.astype(np.complex128))
    )
    return abs(lhs - rhs) / scale
