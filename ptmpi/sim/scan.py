"""Scan positions of probe windows over the ``(nz, n)`` projection image: raster grids
and Fermat spirals.

Positions follow SPEC sections 2 and 8: ``(row, col)`` of the top-left corner of the
``M x M`` probe window, ``row`` along z (axis 0 of the projection image) and ``col`` along
the detector, in float pixels (sub-pixel parts are modelled exactly by the operators); a
window may hang over the image edge but must keep at least one pixel inside. The boundary
is non-periodic (the paper's "single grid scan with non-periodical boundary").
"""

from __future__ import annotations

import logging
import math

import numpy as np
from numpy.typing import NDArray

logger = logging.getLogger(__name__)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _axis_corners(length: int, m: int, step: int) -> NDArray[np.int64]:
    """Top-left window coordinates along one image axis of ``length`` pixels."""
    # Fewest centres, ``step`` apart, whose span reaches from pixel 0 to pixel length - 1.
    count = math.ceil((length - 1) / step) + 1
    span = (count - 1) * step
    # Centre the span on the image; floor division puts any odd leftover pixel on the
    # low-index side, a uniform half-pixel shift of every centre.
    first = (length - m - span) // 2
    corners = first + step * np.arange(count, dtype=np.int64)
    # Only a step wider than the window can push an edge window fully outside the image.
    return np.clip(corners, -(m - 1), length - 1)


def _validate(image_shape: tuple[int, int], m: int, step: int, jitter: float, rng) -> None:
    if len(image_shape) != 2 or not all(_is_int(s) and s >= 1 for s in image_shape):
        raise ValueError(
            f"scan grid: image_shape must be 2 positive integers (nz, n), got {image_shape!r}"
        )
    nz, n = image_shape
    if not _is_int(m) or not 1 <= m <= min(nz, n):
        raise ValueError(
            f"scan grid: probe size m must be an integer in [1, min(nz, n)] = "
            f"[1, {min(nz, n)}] for image_shape {tuple(image_shape)}, got {m!r}"
        )
    if not _is_int(step) or step < 1:
        raise ValueError(f"scan grid: step must be a positive integer, got {step!r}")
    if not (math.isfinite(jitter) and jitter >= 0):
        raise ValueError(f"scan grid: jitter must be finite and >= 0, got {jitter!r}")
    if jitter > 0 and not isinstance(rng, np.random.Generator):
        raise ValueError(
            f"scan grid: jitter={jitter} needs rng, a numpy.random.Generator; got {rng!r}"
        )


def grid_positions(
    image_shape: tuple[int, int],
    m: int,
    step: int,
    jitter: float = 0.0,
    rng: np.random.Generator | None = None,
) -> NDArray[np.float64]:
    """Top-left corners of a raster grid of ``M x M`` probe windows.

    Parameters
    ----------
    image_shape : (int, int)
        ``(nz, n)``, the shape of one projection image.
    m : int
        Probe window size ``M`` (``M <= nz`` and ``M <= n``).
    step : int
        Distance in pixels between neighbouring window centres, along both axes.
    jitter : float, optional
        Half-width in pixels of a uniform random offset added to each coordinate of each
        position (default 0: the exact grid). See Notes on rounding.
    rng : numpy.random.Generator, optional
        Source of the jitter; required when ``jitter > 0``.

    Returns
    -------
    positions : (N_FRAMES, 2) float64
        ``(row, col)`` per frame (integer-valued without jitter), raster order: ``row``
        outer (slow), ``col`` inner (fast). ``N_FRAMES = K_row * K_col`` (see Notes).

    Notes
    -----
    Rule, applied to each axis of ``L`` pixels independently. The window centre of corner
    ``r`` is ``r + (M-1)/2`` (the centre of the probe from
    :func:`ptmpi.sim.probe.focused_probe`). Take the fewest centres ``K = ceil((L-1)/step) + 1``
    spaced ``step`` apart whose span ``(K-1) step`` covers the pixel centres ``0 .. L-1``,
    and centre that span on the image: ``r_k = floor((L - M - (K-1) step) / 2) + k step``.
    The first centre then lies in ``(-step/2 - 1/2, 0]`` and the last in
    ``[L - 3/2, L - 1 + step/2)`` (the 1/2 only when ``L - M - (K-1) step`` is odd and the
    grid sits half a pixel towards index 0), so every pixel is within ``step/2`` of a
    centre along each axis (chessboard distance), no centre lies more than ``(step+1)/2``
    pixels outside the image, and for ``step <= M`` every window keeps pixels inside it.
    A step wider than the window could put an edge window fully outside; such corners are
    clipped to ``[-(M-1), L-1]``. Example: ``L = 128, M = 64, step = 32`` gives ``K = 5``
    corners ``-32, 0, 32, 64, 96`` (centres -0.5 .. 127.5), so 25 frames per angle;
    ``step = 4`` gives ``K = 33``, 1089 frames.

    Jitter: each coordinate gets an independent ``U(-jitter, jitter)`` offset, kept as a
    float (sub-pixel positions, SPEC 8; no rounding). Jittered corners are clipped to
    ``[-(M-1), L-1]`` so every window still keeps a pixel inside the image.
    """
    _validate(image_shape, m, step, jitter, rng)
    nz, n = (int(s) for s in image_shape)
    m, step = int(m), int(step)
    rows = _axis_corners(nz, m, step)
    cols = _axis_corners(n, m, step)
    positions = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1).reshape(-1, 2)
    positions = positions.astype(np.float64)
    return _jittered(positions, (nz, n), m, jitter, rng)


def _jittered(positions, image_shape, m: int, jitter: float, rng):
    """``positions`` plus ``U(-jitter, jitter)`` per coordinate, clipped to
    ``[-(M-1), L-1]`` per axis so that every window keeps a pixel inside the image."""
    if jitter > 0:
        positions = positions + rng.uniform(-jitter, jitter, size=positions.shape)
    for axis, length in enumerate(image_shape):
        positions[:, axis] = np.clip(positions[:, axis], -(m - 1), length - 1)
    return positions


GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))
"""Angle between consecutive points of the Fermat spiral (radians, about 137.5 degrees)."""


def spiral_positions(
    image_shape: tuple[int, int],
    m: int,
    step: float,
    rng: np.random.Generator,
    jitter: float = 0.0,
) -> NDArray[np.float64]:
    """Top-left corners of a Fermat spiral of ``M x M`` windows, randomly rotated and offset.

    Parameters
    ----------
    image_shape : (int, int)
        ``(nz, n)``, the shape of one projection image.
    m : int
        Probe window size ``M``.
    step : int
        Mean spacing in pixels: one position per ``step^2`` pixels of area, as for a grid
        of that step.
    rng : numpy.random.Generator
        Draws the rotation and the offset of the spiral (and the jitter).
    jitter : float, optional
        As in :func:`grid_positions` (uniform, sub-pixel, per coordinate).

    Returns
    -------
    positions : (N_FRAMES, 2) float64
        ``(row, col)`` per frame in spiral order (from the centre out); ``N_FRAMES`` depends
        on the draw (about ``(nz + step) (n + step) / step^2``).

    Notes
    -----
    Centre ``k`` of the spiral is ``c0 + sqrt(k) step / sqrt(pi) (cos phi_k, sin phi_k)``
    with ``phi_k = phi_0 + k * GOLDEN_ANGLE`` (Vogel's model of a sunflower head, a scan
    of uniform density ``1 / step^2`` without the periodicity of a grid, whose raster
    pathology it avoids). The centre ``c0`` is the image centre plus ``U(-step/2,
    step/2)`` per axis and ``phi_0`` is ``U(0, 2 pi)``: drawn again for every call, so
    every angle of :func:`scan_positions_for_angles` has its own positions. Centres are
    kept inside the image grown by ``step / 2`` on every side (the span a grid of that
    step covers); window corners are centres minus ``(M - 1) / 2``, then jittered and
    clipped to ``[-(M-1), L-1]`` like the grid's.
    """
    _validate(image_shape, m, step, jitter, rng)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"scan spiral: needs rng, a numpy.random.Generator; got {rng!r}")
    nz, n = (int(s) for s in image_shape)
    half = step / 2.0
    centre = np.array([(nz - 1) / 2.0, (n - 1) / 2.0]) + rng.uniform(-half, half, size=2)
    phi0 = rng.uniform(0.0, 2.0 * math.pi)
    # every centre kept lies within the image grown by step/2: no radius beyond reaching
    # that rectangle's farthest corner from c0 is needed
    reach = math.hypot(max(centre[0], nz - 1 - centre[0]) + half,
                       max(centre[1], n - 1 - centre[1]) + half)
    k = np.arange(int(math.ceil(math.pi * (reach / step) ** 2)) + 1, dtype=np.float64)
    radius = np.sqrt(k) * step / math.sqrt(math.pi)
    phi = phi0 + k * GOLDEN_ANGLE
    centres = centre + np.stack([radius * np.cos(phi), radius * np.sin(phi)], axis=-1)
    inside = ((centres[:, 0] >= -half) & (centres[:, 0] <= nz - 1 + half)
              & (centres[:, 1] >= -half) & (centres[:, 1] <= n - 1 + half))
    positions = centres[inside] - (m - 1) / 2.0
    return _jittered(positions, (nz, n), m, jitter, rng)


SCANS = ("grid", "spiral")
"""Scan patterns of :func:`scan_positions_for_angles`."""


def scan_positions_for_angles(
    image_shape: tuple[int, int],
    m: int,
    step: int,
    n_angles: int,
    jitter: float = 0.0,
    rng: np.random.Generator | None = None,
    scan: str = "grid",
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """The scan of :func:`grid_positions` or :func:`spiral_positions` at every angle,
    frames angle-major.

    Parameters
    ----------
    image_shape : (int, int)
        ``(nz, n)``, the shape of one projection image.
    m : int
        Probe window size ``M``.
    step : int
        Distance in pixels between neighbouring window centres.
    n_angles : int
        Number of rotation angles ``N_ANGLES >= 1``.
    jitter : float, optional
        As in :func:`grid_positions`; drawn independently for every angle.
    rng : numpy.random.Generator, optional
        Required when ``jitter > 0`` or for a spiral.
    scan : {"grid", "spiral"}
        Raster grid (the same at every angle up to the jitter) or Fermat spiral (rotated
        and offset at random at every angle; ``step`` is the mean spacing).

    Returns
    -------
    positions : (N_FRAMES, 2) float64
        ``(row, col)`` of every frame; the frames of angle ``a`` are
        ``positions[frame_offset[a]:frame_offset[a + 1]]``.
    frame_offset : (N_ANGLES + 1,) int64
        Start of every angle's frames and the total (SPEC section 3 ``frame_offset``);
        ``a * F_PER_ANGLE`` for a grid, spirals may differ in count from angle to angle.
    """
    if not _is_int(n_angles) or n_angles < 1:
        raise ValueError(f"scan grid: n_angles must be a positive integer, got {n_angles!r}")
    if scan == "grid":
        per_angle = [grid_positions(image_shape, m, step, jitter=jitter, rng=rng)
                     for _ in range(n_angles)]
    elif scan == "spiral":
        per_angle = [spiral_positions(image_shape, m, step, rng, jitter=jitter)
                     for _ in range(n_angles)]
    else:
        raise ValueError(f"scan: expected one of {', '.join(SCANS)}, got {scan!r}")
    positions = np.concatenate(per_angle, axis=0)
    counts = [p.shape[0] for p in per_angle]
    frame_offset = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return positions, frame_offset
