"""Focused-beam-like probes with a prescribed amplitude FWHM.

A probe (SPEC section 2) is a complex ``(M, M)`` illumination, one pixel per voxel. Here it
is the far-field image of a soft-edged circular pupil, the shape of a beam focused by a lens
or zone plate, cropped to the ``M x M`` window. The pupil radius is searched so that the
amplitude FWHM measured by :func:`measure_fwhm` equals the request (the paper's probe:
``M = 64``, FWHM 14 px).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from numpy.typing import DTypeLike, NDArray

logger = logging.getLogger(__name__)

# Far field computed on a (4M)^2 grid: the periodic wrap-around of the tails then stays far
# from the M x M window that is kept.
_OVERSAMPLE = 4
# Half-width of the raised-cosine pupil edge, as a fraction of the pupil radius. A hard edge
# gives Airy rings whose energy decays only like 1/r (about 6% of it outside a 64 px window
# at FWHM 14 px) and makes the FWHM jump as frequency samples enter the pupil; this edge
# keeps >99.8% of the energy in the window and the FWHM continuous in the radius.
_EDGE = 0.3
# Relative FWHM tolerance of the radius search; a result worse than _ACCEPT is an error.
_RTOL = 1e-3
_ACCEPT = 0.02
_MAX_BISECTIONS = 60
# Beyond about 3.5 rad of pupil phase the focus splits and its maximum leaves the centre;
# keep to the "slightly curved" regime where the FWHM stays meaningful.
_MAX_DEFOCUS = math.pi


def _half_max_width(profile: NDArray[np.floating], k: int, half: float) -> float:
    """Width between the half-maximum crossings around index ``k`` (inf if not crossed).

    Crossings are linearly interpolated between the last sample at or above ``half`` and
    the first one below it, on each side of ``k``.
    """
    right = np.flatnonzero(profile[k:] < half)
    left = np.flatnonzero(profile[k::-1] < half)
    if right.size == 0 or left.size == 0:
        return math.inf
    i = k + int(right[0])  # first sample below half on the right; profile[i - 1] >= half
    x_right = (i - 1) + (profile[i - 1] - half) / (profile[i - 1] - profile[i])
    j = k - int(left[0])  # first sample below half on the left; profile[j + 1] >= half
    x_left = (j + 1) - (profile[j + 1] - half) / (profile[j + 1] - profile[j])
    return float(x_right - x_left)


def _fwhm_or_inf(probe: NDArray) -> float:
    amp = np.abs(probe)
    r, c = np.unravel_index(int(np.argmax(amp)), amp.shape)
    half = 0.5 * float(amp[r, c])
    w_row = _half_max_width(amp[r, :], int(c), half)
    w_col = _half_max_width(amp[:, c], int(r), half)
    return 0.5 * (w_row + w_col)


def measure_fwhm(probe: NDArray) -> float:
    """Amplitude full width at half maximum of a probe, in pixels.

    Parameters
    ----------
    probe : (M, M) ndarray, real or complex
        The probe (or any 2-D beam profile).

    Returns
    -------
    fwhm : float
        Mean of the widths of ``|probe|`` along the row and the column through its maximum,
        each between the two half-maximum crossings nearest the maximum, located by linear
        interpolation between neighbouring pixels.

    Raises
    ------
    ValueError
        If ``probe`` is not 2-D, is all zero, or stays above half its maximum up to an edge
        of the array along that row or column.
    """
    probe = np.asarray(probe)
    if probe.ndim != 2:
        raise ValueError(f"measure_fwhm: probe must be 2-D, got shape {probe.shape}")
    if not np.any(np.abs(probe) > 0):
        raise ValueError("measure_fwhm: probe is all zero")
    width = _fwhm_or_inf(probe)
    if not math.isfinite(width):
        raise ValueError(
            f"measure_fwhm: |probe| stays above half its maximum up to the edge of the "
            f"{probe.shape} array, so its FWHM is not measurable inside it"
        )
    return width


class _PupilGrid:
    """Frequency grid of the oversampled far-field computation for an ``M x M`` window."""

    def __init__(self, m: int) -> None:
        self.m = m
        self.size = _OVERSAMPLE * m
        freq = np.fft.fftfreq(self.size)  # cycles per pixel, zero frequency at [0]
        self.radius = np.hypot(freq[:, None], freq[None, :])
        # fftshift puts the beam centre at pixel m // 2 of the crop; for even m a half-pixel
        # shift (a linear phase in the pupil) moves it to (m - 1) / 2, the window's centre of
        # symmetry, as SPEC section 1 centres voxel grids.
        shift = 0.5 if m % 2 == 0 else 0.0
        ramp = np.exp(2j * np.pi * shift * freq)
        # The unpaired Nyquist frequency -1/2 of an even grid would break the beam's mirror
        # symmetry when a wide pupil reaches it; drop that row and column.
        ramp[self.size // 2] = 0.0
        self.shift_phase = ramp[:, None] * ramp[None, :]
        start = self.size // 2 - m // 2
        self.window = (slice(start, start + m), slice(start, start + m))

    def field(self, rho: float, defocus: float) -> NDArray[np.complex128]:
        """Oversampled ``(4M, 4M)`` field of the pupil of nominal radius ``rho`` (cycles/px).

        The ``M x M`` probe window is ``field[self.window]``.
        """
        r = self.radius / rho
        t = np.clip((r - (1.0 - _EDGE)) / (2.0 * _EDGE), 0.0, 1.0)
        pupil = np.cos(0.5 * np.pi * t) ** 2  # 1 inside, 1/2 at r = rho, 0 beyond
        if defocus != 0.0:
            pupil = pupil * np.exp(1j * defocus * r**2)
        field = np.fft.ifft2(pupil * self.shift_phase, norm="ortho")
        return np.fft.fftshift(field)

    def window_fwhm(self, rho: float, defocus: float) -> float:
        return _fwhm_or_inf(self.field(rho, defocus)[self.window])


def _design_field(m: int, fwhm: float, defocus: float) -> tuple[NDArray, tuple[slice, slice]]:
    """Search the pupil radius; return the oversampled field and the window's slices."""
    grid = _PupilGrid(m)
    # Past this radius the flat part of the pupil covers the whole sampled band: the
    # narrowest beam the pixel grid can carry.
    rho_max = 0.5 * math.sqrt(2.0) / (1.0 - _EDGE)
    rho_guess = 0.69 / fwhm  # from the measured relation rho * FWHM ~ 0.68-0.70 (no defocus)
    hi = min(2.0 * rho_guess, rho_max)
    if grid.window_fwhm(hi, defocus) > fwhm:
        hi = rho_max
        narrowest = grid.window_fwhm(hi, defocus)
        if narrowest > fwhm:
            raise ValueError(
                f"focused_probe: fwhm={fwhm} px is narrower than the narrowest beam this "
                f"{m}x{m} pixel grid can carry with defocus={defocus} "
                f"(about {narrowest:.2f} px)"
            )
    lo = 0.5 * rho_guess
    while grid.window_fwhm(lo, defocus) <= fwhm:  # safety net: the guess is ~2x too wide
        lo *= 0.5
        if lo < 1e-6:
            raise ValueError(f"focused_probe: no pupil radius gives fwhm={fwhm} px for m={m}")
    # Bisection in log(rho): the measured FWHM is continuous and (for moderate defocus)
    # decreasing in rho, so [lo, hi] keeps a crossing of the target.
    best_rho, best_err = hi, math.inf
    for _ in range(_MAX_BISECTIONS):
        mid = math.sqrt(lo * hi)
        width = grid.window_fwhm(mid, defocus)
        err = abs(width / fwhm - 1.0)
        if err < best_err:
            best_rho, best_err = mid, err
        if err < _RTOL:
            break
        if width > fwhm:
            lo = mid
        else:
            hi = mid
    if best_err > _ACCEPT:
        raise ValueError(
            f"focused_probe: could not reach fwhm={fwhm} px within {_ACCEPT:.0%} for m={m}, "
            f"defocus={defocus} (best relative error {best_err:.3f})"
        )
    logger.debug(
        "focused_probe: m=%d fwhm=%.3f defocus=%.3f -> pupil radius %.5f cycles/px "
        "(FWHM error %.2e)", m, fwhm, defocus, best_rho, best_err,
    )
    return grid.field(best_rho, defocus), grid.window


def focused_probe(
    m: int,
    fwhm: float,
    defocus: float = 0.0,
    dtype: DTypeLike = np.complex64,
) -> NDArray[np.complexfloating]:
    """A focused-beam-like probe whose amplitude FWHM is ``fwhm`` pixels.

    Parameters
    ----------
    m : int
        Window size ``M``; the probe is ``M x M``.
    fwhm : float
        Requested amplitude FWHM of ``|probe|`` in pixels, as :func:`measure_fwhm` measures
        it; must lie in ``(1, M/2]``.
    defocus : float, optional
        Quadratic pupil phase in radians at the nominal pupil radius (default 0: a flat
        wavefront at focus, real-valued probe); at most pi in magnitude. A few radians curve
        the wavefront and widen the focus; the radius search compensates so the FWHM still
        matches.
    dtype : complex dtype, optional
        Output dtype (default complex64).

    Returns
    -------
    probe : (M, M) ndarray of ``dtype``
        Normalised to ``max |probe| = 1``; the simulation scales it to the wanted fluence.
        Centred at pixel ``((M-1)/2, (M-1)/2)``: mirror-symmetric in the window, so for even
        ``M`` the maximum is shared by the four central pixels.

    Raises
    ------
    ValueError
        If ``fwhm`` is outside ``(1, M/2]``, or narrower than the pixel grid can carry (for
        even ``M`` the beam centre falls between pixels and the narrowest measurable FWHM
        is about 2.5 px; odd ``M`` reaches down to about 1 px), if ``|defocus| > pi``, or if
        ``dtype`` is not complex.

    Notes
    -----
    The probe is the unitary inverse 2-D DFT of a circular pupil
    ``P(f) = T(|f| / rho) exp(i defocus |f|^2 / rho^2)`` on a ``(4M)^2`` grid (``f`` in
    cycles per pixel), fftshifted and cropped to the central ``M x M`` window. ``T`` is 1 up
    to ``0.7 rho``, falls as a raised cosine to 1/2 at ``rho`` and to 0 at ``1.3 rho``: the
    soft edge damps the Airy rings so that over 99.8% of the beam's energy lies in the
    window for ``M / fwhm >= 4``. ``rho`` (about ``0.68 / fwhm``) is found by bisection until
    the measured FWHM is within 0.1% of the request (an error above 2% raises).
    """
    if isinstance(m, bool) or int(m) != m or m < 1:
        raise ValueError(f"focused_probe: m must be a positive integer, got {m!r}")
    m = int(m)
    if not (math.isfinite(fwhm) and 1.0 < fwhm <= m / 2):
        raise ValueError(
            f"focused_probe: fwhm must be in (1, m/2] = (1, {m / 2:g}] pixels for m={m}, "
            f"got {fwhm!r}"
        )
    if not (math.isfinite(defocus) and abs(defocus) <= _MAX_DEFOCUS):
        raise ValueError(
            f"focused_probe: defocus must be in [-pi, pi] rad (a slightly curved wavefront), "
            f"got {defocus!r}"
        )
    dtype = np.dtype(dtype)
    if dtype.kind != "c":
        raise ValueError(f"focused_probe: dtype must be complex, got {dtype}")
    field, window = _design_field(m, float(fwhm), float(defocus))
    probe = field[window]
    probe = probe / np.abs(probe).max()
    return probe.astype(dtype)
