"""Validation of an input file (SPEC section 3): a list of one-line problems, never a traceback.

Each problem names the file and the dataset, what was expected and what was found. The
structure (datasets, shapes, offsets, probe, positions, angles) is checked in full; the
counts only for the frames of the caller's block of angles, read a few frames at a time,
so that every MPI rank checks its own hyperslab with bounded memory.

The optional detector mask (SPEC 8) must be integers (or booleans) of shape ``(m, m)`` or
``(A, m, m)``; counts at the pixels it marks invalid are not data, so they are not checked
(a dead pixel's NaN or a hot pixel's huge value is no problem there).

Non-integer positions are not a problem here: the solver rounds them with a warning
(SPEC section 2).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import h5py
import numpy as np

from ptmpi.io.cxi import (
    ANGLES,
    DATA,
    FRAME_OFFSET,
    LAYOUT_VERSION,
    MASK,
    POSITIONS,
    PROBE,
    PTMPI,
    REQUIRED,
    VOLUME_SHAPE,
    squeezed_shape,
)

logger = logging.getLogger(__name__)

# Frames read at once when scanning counts: about 32 MiB of float32 per read.
_SCAN_BYTES = 32 << 20


class ValidationError(Exception):
    """An input file failed validation; ``problems`` holds the one-line messages."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclasses.dataclass
class InputReport:
    """Problems of an input file, plus what the scan of the counts learned on the way.

    Attributes
    ----------
    problems : list of str
        One line each; empty when the file is valid.
    counts_total, counts_max : float or None
        Sum and maximum of the finite counts at the valid pixels of the frames checked
        (None if none was).
    frames_checked : int
        Number of frames whose counts were read.
    mask_shape : tuple or None
        Shape of the detector mask (None: no mask, or an invalid one).
    masked_pixels : int
        Number of invalid pixels in the mask (summed over its angles for a per-angle mask).
    """

    problems: list[str]
    counts_total: float | None = None
    counts_max: float | None = None
    frames_checked: int = 0
    mask_shape: tuple | None = None
    masked_pixels: int = 0


def validate_input(path: str | os.PathLike, angle_start: int = 0,
                   angle_stop: int | None = None) -> list[str]:
    """Problems of the input file ``path``, one line each (empty list: valid).

    Parameters
    ----------
    path : str or PathLike
        Input file (SPEC section 3).
    angle_start, angle_stop : int
        Block of angles whose counts are checked (``None``: up to the last angle). The
        rest of the structure is always checked in full; ``(0, 0)`` checks structure only.

    Returns
    -------
    list of str
        Never raises on a bad file: an unreadable file is itself a problem line.
    """
    return inspect_input(path, angle_start, angle_stop).problems


def check_input(path: str | os.PathLike, angle_start: int = 0,
                angle_stop: int | None = None) -> None:
    """Raise :class:`ValidationError` when :func:`validate_input` finds problems."""
    problems = validate_input(path, angle_start, angle_stop)
    if problems:
        raise ValidationError(problems)


def inspect_input(path: str | os.PathLike, angle_start: int = 0,
                  angle_stop: int | None = None) -> InputReport:
    """Validate like :func:`validate_input` and also return statistics of the counts read."""
    name = str(path)
    if not os.path.exists(name):
        return InputReport([f"{name}: file does not exist"])
    try:
        f = h5py.File(name, "r")
    except Exception as exc:  # noqa: BLE001 - whatever h5py raises, the file is unusable
        return InputReport([f"{name}: not a readable HDF5 file ({one_line(exc)})"])
    report = InputReport([])
    try:
        with f:
            _check_file(f, name, angle_start, angle_stop, report)
    except Exception as exc:  # noqa: BLE001 - a damaged file may fail anywhere in a read
        report.problems.append(f"{name}: cannot be read completely ({one_line(exc)})")
    return report


def _check_file(f: h5py.File, name: str, angle_start: int, angle_stop: int | None,
                report: InputReport) -> None:
    problems = report.problems

    def problem(dataset: str, text: str) -> None:
        problems.append(f"{name}: {dataset}: {text}")

    missing = [d for d in REQUIRED if not isinstance(f.get(d), h5py.Dataset)]
    for d in missing:
        problem(d, "required dataset is missing")
    if missing:
        return

    version = f[PTMPI].attrs.get("layout_version") if PTMPI in f else None
    if version is not None and int(np.asarray(version).reshape(-1)[0]) > LAYOUT_VERSION:
        problem(PTMPI, f"expected @layout_version <= {LAYOUT_VERSION}, found {version}")

    data = f[DATA]
    if data.ndim != 3 or data.shape[1] != data.shape[2] or data.shape[1] == 0:
        problem(DATA, f"expected shape (F, m, m) with square frames, found {data.shape}")
        return
    if data.dtype.kind not in "iuf":
        problem(DATA, f"expected real photon counts, found dtype {data.dtype}")
        return
    n_frames, m = data.shape[0], data.shape[1]
    shifted = np.asarray(data.attrs.get("is_fft_shifted", 0)).reshape(-1)
    if shifted.size != 1 or shifted[0] not in (0, 1):
        problem(DATA, f"expected @is_fft_shifted 0 (centered) or 1 (corner), "
                      f"found {shifted.tolist() if shifted.size != 1 else shifted[0]}")

    shape_ok = True
    probe_ds = f[PROBE]
    if squeezed_shape(probe_ds.shape) != (m, m):
        problem(PROBE, f"expected shape ({m}, {m}) (the frame size of {DATA}, leading "
                       f"singleton axes allowed), found {probe_ds.shape}")
        shape_ok = False
    elif probe_ds.dtype.kind not in "iufc":
        problem(PROBE, f"expected a complex probe, found dtype {probe_ds.dtype}")
    else:
        probe = np.asarray(probe_ds[()])
        if not np.all(np.isfinite(probe)):
            problem(PROBE, f"expected finite values, found {int(np.sum(~np.isfinite(probe)))} "
                           "non-finite")
        elif not np.any(probe):
            problem(PROBE, "expected a probe with non-zero intensity, found all zeros")

    angles = np.asarray(f[ANGLES][()])
    if angles.ndim != 1:
        problem(ANGLES, f"expected a 1-D array of angles, found shape {angles.shape}")
        return
    n_angles = angles.size
    if angles.dtype.kind not in "iuf" or not np.all(np.isfinite(angles)):
        problem(ANGLES, "expected finite angles in degrees, found "
                        f"{_first_bad(angles, lambda a: ~np.isfinite(a))}")

    offsets_ok = _check_frame_offset(f, n_angles, n_frames, problem)
    mask_ok = _check_mask(f, m, n_angles, problem, report)

    positions = np.asarray(f[POSITIONS][()])
    positions_ok = False
    if positions.shape != (n_frames, 2):
        problem(POSITIONS, f"expected shape ({n_frames}, 2) (one (row, col) per frame), "
                           f"found {positions.shape}")
    elif positions.dtype.kind not in "iuf":
        problem(POSITIONS, f"expected float positions in pixels, found dtype {positions.dtype}")
    elif not np.all(np.isfinite(positions)):
        bad = np.flatnonzero(~np.all(np.isfinite(positions), axis=1))
        problem(POSITIONS, f"expected finite positions, found {bad.size} non-finite "
                           f"(first at frame {int(bad[0])})")
    else:
        positions_ok = True

    volume_shape = _check_volume_shape(f, m, problem)
    if volume_shape is not None and positions_ok:
        _check_windows(positions, volume_shape, m, problem)

    if angle_stop is None:
        angle_stop = n_angles
    if not 0 <= angle_start <= angle_stop <= n_angles:
        problems.append(f"{name}: angle block [{angle_start}, {angle_stop}) is not inside "
                        f"the file's {n_angles} angles")
    elif offsets_ok and shape_ok and mask_ok:
        offsets = np.asarray(f[FRAME_OFFSET][()], dtype=np.int64)
        mask = f[MASK] if report.mask_shape is not None else None
        _scan_counts(data, int(offsets[angle_start]), int(offsets[angle_stop]), problem, report,
                     mask, offsets)


def _check_frame_offset(f: h5py.File, n_angles: int, n_frames: int, problem) -> bool:
    offsets = np.asarray(f[FRAME_OFFSET][()])
    if offsets.shape != (n_angles + 1,):
        problem(FRAME_OFFSET, f"expected shape ({n_angles + 1},) for {n_angles} angles, "
                              f"found {offsets.shape}")
        return False
    if offsets.dtype.kind not in "iu":
        problem(FRAME_OFFSET, f"expected integers, found dtype {offsets.dtype}")
        return False
    ok = True
    if offsets[0] != 0:
        problem(FRAME_OFFSET, f"expected to start at 0, found {int(offsets[0])}")
        ok = False
    steps = np.diff(offsets)
    if np.any(steps < 0):
        a = int(np.flatnonzero(steps < 0)[0])
        problem(FRAME_OFFSET, f"expected non-decreasing offsets, found a decrease at angle {a} "
                              f"({int(offsets[a])} -> {int(offsets[a + 1])})")
        ok = False
    if offsets[-1] != n_frames:
        problem(FRAME_OFFSET, f"expected to end at the number of frames F = {n_frames}, "
                              f"found {int(offsets[-1])}")
        ok = False
    return ok


def _check_mask(f: h5py.File, m: int, n_angles: int, problem, report: InputReport) -> bool:
    """Check the optional detector mask; fill the report's mask fields. False: unusable."""
    if MASK not in f:
        return True
    ds = f[MASK]
    if not isinstance(ds, h5py.Dataset):
        problem(MASK, "expected a dataset (m, m) or (A, m, m), found a group")
        return False
    if ds.shape not in ((m, m), (n_angles, m, m)):
        problem(MASK, f"expected shape ({m}, {m}) (one mask for all frames) or "
                      f"({n_angles}, {m}, {m}) (one per angle), found {ds.shape}")
        return False
    if ds.dtype.kind not in "biu":
        problem(MASK, f"expected integers (uint32, nonzero = invalid pixel), found dtype "
                      f"{ds.dtype}")
        return False
    if ds.ndim == 2:
        masked = int(np.count_nonzero(ds[()]))
    else:
        step = max(1, _SCAN_BYTES // (4 * m * m))
        masked = sum(int(np.count_nonzero(ds[a : a + step])) for a in range(0, n_angles, step))
    report.mask_shape, report.masked_pixels = tuple(ds.shape), masked
    if masked == ds.size:
        problem(MASK, "expected some valid (zero) pixels, found every pixel masked")
        return False
    return True


def _check_volume_shape(f: h5py.File, m: int, problem) -> tuple[int, int, int] | None:
    """``(nz, n, n)`` when present and consistent, else None (a 2-D dataset or a problem)."""
    if VOLUME_SHAPE not in f:
        return None
    shape = np.asarray(f[VOLUME_SHAPE][()])
    if shape.shape != (3,) or shape.dtype.kind not in "iu":
        problem(VOLUME_SHAPE, f"expected 3 integers (nz, n, n), found {shape.tolist()} "
                              f"(dtype {shape.dtype})")
        return None
    nz, ny, nx = (int(s) for s in shape)
    if ny != nx or min(nz, ny, nx) < 1:
        problem(VOLUME_SHAPE, f"expected positive (nz, n, n) with square slices, "
                              f"found ({nz}, {ny}, {nx})")
        return None
    if m > ny or m > nz:
        problem(VOLUME_SHAPE, f"expected the probe size m = {m} to be at most n and nz, "
                              f"found ({nz}, {ny}, {nx})")
        return None
    return nz, ny, nx


def _check_windows(positions: np.ndarray, volume_shape, m: int, problem) -> None:
    """One problem when some window has no pixel inside the (nz, n) projection image."""
    nz, n = volume_shape[0], volume_shape[2]
    # The solver rounds positions to whole pixels; judge the windows it will use.
    r, c = np.rint(positions[:, 0]), np.rint(positions[:, 1])
    outside = (r + m <= 0) | (r >= nz) | (c + m <= 0) | (c >= n)
    if outside.any():
        bad = np.flatnonzero(outside)
        j = int(bad[0])
        more = f" ({bad.size} frames in all)" if bad.size > 1 else ""
        problem(POSITIONS, f"expected every {m}x{m} window to touch the {nz}x{n} projection "
                           f"image, found frame {j} at (row {positions[j, 0]:g}, col "
                           f"{positions[j, 1]:g}) entirely outside{more}")


def _scan_counts(data: h5py.Dataset, f0: int, f1: int, problem, report: InputReport,
                 mask: h5py.Dataset | None = None, offsets: np.ndarray | None = None) -> None:
    """Check counts of frames ``[f0, f1)`` a few frames at a time; fill the report's stats.

    Pixels that ``mask`` marks invalid are skipped (a per-angle mask is matched to each
    frame's angle through ``offsets``).
    """
    m = data.shape[1]
    invalid = mask[()] != 0 if mask is not None and mask.ndim == 2 else None
    step = max(1, _SCAN_BYTES // (4 * m * m))
    n_nonfinite = n_negative = 0
    first_nonfinite = first_negative = None
    lowest = np.inf
    total, highest = 0.0, -np.inf
    for a in range(f0, f1, step):
        b = min(a + step, f1)
        block = np.asarray(data[a:b], dtype=np.float32)
        if mask is not None:
            if mask.ndim == 3:
                angle = np.searchsorted(offsets, np.arange(a, b), side="right") - 1
                first = int(angle[0])
                invalid = (mask[first : int(angle[-1]) + 1] != 0)[angle - first]
            block = np.where(invalid, np.float32(0), block)
        finite = np.isfinite(block)
        if not finite.all():
            per_frame = np.flatnonzero(~finite.all(axis=(1, 2)))
            first_nonfinite = a + int(per_frame[0]) if first_nonfinite is None else first_nonfinite
            n_nonfinite += int(np.sum(~finite))
            block = np.where(finite, block, 0.0)
        negative = block < 0
        if negative.any():
            per_frame = np.flatnonzero(negative.any(axis=(1, 2)))
            first_negative = a + int(per_frame[0]) if first_negative is None else first_negative
            n_negative += int(np.sum(negative))
            lowest = min(lowest, float(block.min()))
        total += float(np.sum(block, dtype=np.float64))
        highest = max(highest, float(block.max()))
    if f1 > f0:
        report.counts_total, report.counts_max = total, highest
    report.frames_checked += f1 - f0
    if n_nonfinite:
        problem(DATA, f"expected finite counts, found {n_nonfinite} NaN or infinite value(s) "
                      f"(first in frame {first_nonfinite})")
    if n_negative:
        problem(DATA, f"expected non-negative counts, found {n_negative} negative value(s) "
                      f"(first in frame {first_negative}, lowest {lowest:g})")


def _first_bad(values: np.ndarray, is_bad) -> str:
    """Short description of the non-conforming entries of a small array."""
    try:
        bad = np.flatnonzero(is_bad(values))
    except TypeError:
        return f"dtype {values.dtype}"
    return f"{bad.size} bad value(s) (first at index {int(bad[0])}: {values[bad[0]]})"


def one_line(exc: BaseException) -> str:
    """An exception's message on one line of at most 200 characters (h5py's span several)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
