"""Detector masks (SPEC 8): which detector pixels are data.

Files store ``mask`` centered like the counts, nonzero = invalid pixel (the CXI
convention), either ``(M, M)`` for every frame or ``(N_ANGLES, M, M)`` one per angle.
Solvers and metrics use the inverse, a boolean ``valid`` (True = measured pixel) with the
zero frequency at ``[0, 0]`` like the counts they hold, broadcastable to
``(N_FRAMES_LOCAL, M, M)``: ``(M, M)`` when one mask serves every frame,
``(N_FRAMES_LOCAL, M, M)`` otherwise. ``valid = None`` means every pixel is valid.

Invalid pixels take no part in the likelihood, the R-factor or any metric, and their
counts are never used as numbers: every function here selects with ``where`` (never
multiplies by the mask), so NaN or huge garbage there cannot leak into a result.
"""

from __future__ import annotations

import numpy as np

from ptmpi.backend import get_xp


def valid_only(x, valid, fill=0):
    """``x`` where ``valid``, ``fill`` elsewhere (``x`` itself when ``valid`` is None).

    Parameters
    ----------
    x : (N_FRAMES_LOCAL, M, M) array, numpy or CuPy
    valid : bool array broadcastable to ``x.shape``, or None
    fill : scalar put at invalid pixels.
    """
    if valid is None:
        return x
    xp = get_xp(x)
    return xp.where(valid, x, xp.asarray(fill, dtype=x.dtype))


def valid_from_mask(mask, is_fft_shifted: int = 0) -> np.ndarray:
    """The boolean ``valid`` of a stored mask, zero frequency moved to ``[0, 0]``.

    Parameters
    ----------
    mask : (M, M) or (N, M, M) integer or bool
        Nonzero = invalid; centered (``is_fft_shifted = 0``) or corner-zero (1).
    is_fft_shifted : {0, 1}
        The convention of the detector data, which the mask shares.
    """
    valid = np.asarray(mask) == 0
    return valid if is_fft_shifted else np.fft.ifftshift(valid, axes=(-2, -1))


def valid_per_frame(valid_per_angle: np.ndarray, frame_offset_local: np.ndarray) -> np.ndarray:
    """``(N_FRAMES_LOCAL, M, M)`` bool from one ``(M, M)`` mask per local angle.

    ``frame_offset_local``: ``(N_ANGLES_LOCAL + 1,)``, frames of local angle ``a`` are
    ``[off[a], off[a+1])``.
    """
    counts = np.diff(np.asarray(frame_offset_local, dtype=np.int64))
    if valid_per_angle.shape[0] != counts.size:
        raise ValueError(f"valid_per_frame: {valid_per_angle.shape[0]} masks for "
                         f"{counts.size} angles")
    return np.repeat(valid_per_angle, counts, axis=0)

