"""Quality metrics of SPEC section 5, written once for numpy and CuPy.

- ``snr_db(u, u_true) = -10 log10( sum|zeta u - u_true|^2 / sum|zeta u|^2 )`` with the
  complex scalar ``zeta`` that minimizes ``sum|zeta u - u_true|^2``.
- ``r_factor = sum || |D| - sqrt(f) ||_1 / sum || sqrt(f) ||_1``.
- ``snr_intensity_db = -10 log10( sum ||f - f_clean||^2 / sum ||f_clean||^2 )``.

Sums are accumulated in float64 (inputs are cast block by block, so a complex64 volume
is never copied whole to complex128). The frame-wise metrics take an optional
communicator: each rank passes its own frames and the two partial sums are combined with
one ``comm.allreduce_sum`` of a float64 buffer of length 2. They also take an optional
detector mask ``valid`` (SPEC 8, :mod:`ptmpi.mask`): sums then run over the valid pixels
only, and the counts at invalid pixels are never read (NaN or garbage there is harmless).

Limits, chosen so that no metric raises on legitimate edge cases:
``snr_db`` and ``snr_intensity_db`` are ``math.inf`` when the residual is exactly zero and
``-math.inf`` when the reference energy (``sum|zeta u|^2``, ``sum f_clean^2``) is zero but
the residual is not; ``r_factor`` is 0 for an exact match and ``math.inf`` when
``sum sqrt(f) = 0`` but the model is not zero.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from ptmpi.backend import get_xp
from ptmpi.mask import valid_only

logger = logging.getLogger(__name__)

# Elements cast to 64-bit at a time: bounds the temporary memory to a few tens of MiB.
_BLOCK = 1 << 21


def _blocks(*arrays):
    """Matching flat slices of ``arrays``, at most ``_BLOCK`` elements each."""
    flat = [a.reshape(-1) for a in arrays]
    size = flat[0].size
    for i in range(0, size, _BLOCK):
        yield tuple(a[i : i + _BLOCK] for a in flat)


def _frame_blocks(valid, *arrays):
    """Matching blocks of ``arrays`` (same shape) and of ``valid`` (broadcastable to it),
    whole frames along the first axis, about ``_BLOCK`` elements each; ``valid`` None
    falls back to :func:`_blocks` and yields None for it."""
    if valid is None:
        for block in _blocks(*arrays):
            yield (*block, None)
        return
    xp = get_xp(*arrays)
    shape = arrays[0].shape
    valid = xp.broadcast_to(xp.asarray(valid, dtype=bool), shape)
    if len(shape) < 2:
        yield (*arrays, valid)
        return
    step = max(1, _BLOCK // max(1, math.prod(shape[1:])))
    for i in range(0, shape[0], step):
        yield (*(a[i : i + step] for a in arrays), valid[i : i + step])


def _wide(xp, a):
    """``a`` cast to complex128 (complex input) or float64 (real input)."""
    return a.astype(xp.complex128 if xp.iscomplexobj(a) else xp.float64, copy=False)


def _compiled(u, u_true) -> bool:
    """True when the compiled float64 sums apply: complex numpy arrays of 2 or more axes."""
    from ptmpi.operators import kernels

    return (u.ndim >= 2 and u.size > 0 and kernels.available(u, u_true)
            and np.iscomplexobj(u) and np.iscomplexobj(u_true))


def _check_shapes(a, b, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names}: shapes differ, {a.shape} and {b.shape}")


def optimal_scale(u, u_true, comm=None) -> complex:
    """The complex scalar ``zeta`` minimizing ``sum|zeta u - u_true|^2``.

    Parameters
    ----------
    u, u_true : (...) complex or real arrays of the same shape (numpy or CuPy)
    comm : communicator, optional
        When ``u`` and ``u_true`` are this rank's part of split volumes (z-slabs), the
        communicator of the parts: the sums run over the whole volume.

    Returns
    -------
    complex
        ``zeta = vdot(u, u_true) / vdot(u, u)``; 0 when ``u`` is all zero.

    Notes
    -----
    ``g(zeta) = sum|zeta u - t|^2 = |zeta|^2 <u,u> - 2 Re(conj(zeta) <u,t>) + <t,t>`` with
    ``<a,b> = sum conj(a) b``. Completing the square,
    ``g(zeta) = <u,u> |zeta - <u,t>/<u,u>|^2 + <t,t> - |<u,t>|^2/<u,u>``, so the unique
    minimizer for ``u != 0`` is ``zeta = <u,t>/<u,u>`` (Wirtinger derivative
    ``dg/d conj(zeta) = zeta <u,u> - <u,t> = 0``).
    """
    xp = get_xp(u, u_true)
    u, u_true = xp.asarray(u), xp.asarray(u_true)
    _check_shapes(u, u_true, "u, u_true")
    cross, norm = 0j, 0.0
    if _compiled(u, u_true):  # float64 sums without complex128 copies
        from ptmpi.operators import kernels

        cross_parts = kernels.slice_vdot(u, u_true).sum(axis=0)
        cross = complex(cross_parts[0], cross_parts[1])
        norm = float(kernels.slice_vdot(u, u)[:, 0].sum())
    else:
        for a, t in _blocks(u, u_true):
            a = _wide(xp, a)
            cross += complex(xp.vdot(a, _wide(xp, t)))
            norm += float(xp.vdot(a, a).real)
    if comm is not None:  # parts of one volume (z-slabs): sum the parts
        parts = comm.allreduce_sum(np.array([cross.real, cross.imag, norm]))
        cross, norm = complex(parts[0], parts[1]), float(parts[2])
    return 0j if norm == 0.0 else cross / norm


def snr_db(u, u_true, comm=None) -> float:
    """SNR in dB of ``u`` against ``u_true`` after the optimal complex scaling.

    Parameters
    ----------
    u : (nz, n, n) complex (any shape), numpy or CuPy
        Reconstruction.
    u_true : same shape
        Ground truth.
    comm : communicator, optional
        As for :func:`optimal_scale`: the parts of split volumes.

    Returns
    -------
    float
        ``-10 log10( sum|zeta u - u_true|^2 / sum|zeta u|^2 )`` with ``zeta`` from
        :func:`optimal_scale`. Invariant to a complex scaling of ``u`` (the global phase
        and amplitude ambiguity of ptychography). ``math.inf`` when the residual is exactly
        zero (``u_true`` is a complex multiple of ``u``, e.g. ``u_true = 2 u``);
        ``-math.inf`` when ``zeta u`` is zero (``u`` zero or orthogonal to ``u_true``).

    Notes
    -----
    The residual is summed directly rather than as ``<t,t> - |<u,t>|^2/<u,u>``, which
    cancels catastrophically at high SNR.
    """
    xp = get_xp(u, u_true)
    u, u_true = xp.asarray(u), xp.asarray(u_true)
    zeta = optimal_scale(u, u_true, comm)
    residual = signal = 0.0
    if _compiled(u, u_true):
        from ptmpi.operators import kernels

        residual, signal = kernels.scaled_residual(u, u_true, zeta)
    else:
        for a, t in _blocks(u, u_true):
            za = zeta * _wide(xp, a)
            residual += float(xp.sum(xp.abs(za - _wide(xp, t)) ** 2))
            signal += float(xp.sum(xp.abs(za) ** 2))
    residual, signal = _reduce(comm, residual, signal)
    return _ratio_db(residual, signal)


def r_factor(d_model, f, comm=None, valid=None) -> float:
    """R-factor of a far-field model against measured counts (SPEC section 5).

    Parameters
    ----------
    d_model : (N_FRAMES_LOCAL, M, M) complex, numpy or CuPy
        Model far field ``D(omega, u)``, zero frequency at ``[0, 0]``.
    f : (N_FRAMES_LOCAL, M, M) real, same layout
        Measured counts (non-negative), zero frequency at ``[0, 0]``.
    comm : communicator, optional
        When given, the numerator and denominator are summed over ranks with one
        ``comm.allreduce_sum`` of a float64 array of length 2.
    valid : bool array broadcastable to ``f.shape``, optional
        Detector mask (True = measured pixel, zero frequency at ``[0, 0]``): both sums run
        over the valid pixels only and ``f`` is not read elsewhere.

    Returns
    -------
    float
        ``sum | |d_model| - sqrt(f) | / sum sqrt(f)``, over all (valid) pixels of all
        frames of all ranks.
    """
    num, den = _reduce(comm, *r_factor_sums(d_model, f, valid=valid))
    return r_factor_value(num, den)


def r_factor_sums(d_model, f=None, *, sqrt_f=None, valid=None) -> tuple[float, float]:
    """This rank's numerator and denominator of :func:`r_factor`, in float64.

    Give the counts ``f``, or their square roots ``sqrt_f`` (as a solver keeps them, so
    that it need not take them every iteration). A solver sums these over ranks with its
    other reductions and calls :func:`r_factor_value`: the R-factor has one definition.
    """
    if (f is None) == (sqrt_f is None):
        raise ValueError("r_factor_sums: give exactly one of f and sqrt_f")
    counts = f if sqrt_f is None else sqrt_f
    xp = get_xp(d_model, counts)
    d_model, counts = xp.asarray(d_model), xp.asarray(counts)
    _check_shapes(d_model, counts, "d_model, f")
    num = den = 0.0
    # From counts (r_factor) the moduli are taken in float64; from roots (a solver, every
    # iteration) in the model's precision, so that no complex128 copy of the frames
    # raises the solver's peak memory. The sums are float64 either way.
    for d, c, v in _frame_blocks(valid, d_model, counts):
        if sqrt_f is None:
            d, amp = _wide(xp, d), xp.sqrt(valid_only(_wide(xp, c), v))
        else:
            amp = valid_only(c, v)
        num += float(xp.sum(valid_only(xp.abs(xp.abs(d) - amp), v), dtype=xp.float64))
        den += float(xp.sum(amp, dtype=xp.float64))
    return num, den


def r_factor_value(num: float, den: float) -> float:
    """``num / den`` of the global sums, with the limits of the module docstring."""
    if num == 0.0:
        return 0.0
    return math.inf if den == 0.0 else num / den


def snr_intensity_db(f, f_clean, comm=None, valid=None) -> float:
    """SNR in dB of noisy counts against their noise-free intensities (SPEC section 5).

    Parameters
    ----------
    f : (N_FRAMES_LOCAL, M, M) real, numpy or CuPy
        Noisy counts.
    f_clean : same shape
        Noise-free intensities (same scale and layout).
    comm : communicator, optional
        As in :func:`r_factor`: one ``allreduce_sum`` of the two partial sums.
    valid : bool array broadcastable to ``f.shape``, optional
        Detector mask, as in :func:`r_factor`: sums over the valid pixels only.

    Returns
    -------
    float
        ``-10 log10( sum (f - f_clean)^2 / sum f_clean^2 )``; ``math.inf`` when the data
        are noise-free.
    """
    xp = get_xp(f, f_clean)
    f, f_clean = xp.asarray(f), xp.asarray(f_clean)
    _check_shapes(f, f_clean, "f, f_clean")
    noise = clean = 0.0
    for a, c, v in _frame_blocks(valid, f, f_clean):
        c = valid_only(_wide(xp, c), v)
        noise += float(xp.sum((valid_only(_wide(xp, a), v) - c) ** 2))
        clean += float(xp.sum(c**2))
    noise, clean = _reduce(comm, noise, clean)
    return _ratio_db(noise, clean)


def _reduce(comm, a: float, b: float) -> tuple[float, float]:
    """Sum two partial sums over ranks with a single reduction (identity without comm)."""
    if comm is None:
        return a, b
    buf = np.array([a, b], dtype=np.float64)
    buf = comm.allreduce_sum(buf)
    return float(buf[0]), float(buf[1])


def _ratio_db(residual: float, reference: float) -> float:
    """``-10 log10(residual / reference)`` with the limits documented in the module."""
    if residual == 0.0:
        return math.inf
    if reference == 0.0:
        return -math.inf
    return -10.0 * math.log10(residual / reference)
