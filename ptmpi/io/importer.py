"""``ptmpi import``: per-angle CXI files (SPEC 8) into one input file (SPEC 3), one angle at a time.

:func:`import_cxi` checks that the files agree (frame size, energy, distance, pixel size;
frame counts and scan positions may differ), converts the translations to the window
corners ``positions_px`` of SPEC 2 by the convention of :mod:`ptmpi.io.per_angle` and
writes one SPEC 3 file, reading and writing the frames of one file at a time (only one
angle's frames are ever in memory).

Output additions to SPEC 3
--------------------------
``/entry_1/instrument_1/detector_1/mask``: ``uint32 (m, m)`` when every file has the same
mask (a file without one counts as all valid), ``(A, m, m)`` otherwise, centered like the
counts, nonzero = invalid; absent when no file has a mask. Counts at masked pixels are
stored as 0 (detectors fill them with arbitrary values, negative ones included).
``/entry_1/ptmpi/import/`` (``@NX_class = NXcollection``): ``source_files`` and
``source_sha256`` (one entry per angle, in file order), ``object_pixel_size`` and
``wavelength`` (m), ``y_pixel_size`` (m), and attributes recording the conventions used
(``flip_x``, ``flip_y``, ``axis_offset_px``), where the angles, the volume shape and the
probe came from, the program version, the date and the command.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from ptmpi import __version__
from ptmpi.io.cxi import input_checksum, write_input
from ptmpi.io.per_angle import (
    CXI_ANGLE,
    CXI_DATA,
    CXI_DISTANCE,
    CXI_ENERGY,
    CXI_ILLUMINATION,
    CXI_MASK,
    CXI_TRANSLATIONS,
    CXI_X_PIXEL_SIZE,
    CXI_Y_PIXEL_SIZE,
    ELECTRONVOLT,
    Conventions,
    centre_offsets,
    derive_volume_shape,
    object_pixel_size,
    translation_to_positions,
    wavelength,
)

logger = logging.getLogger(__name__)

#: Output datasets beyond :mod:`ptmpi.io.cxi`'s (SPEC 8 mask; import provenance).
MASK = "/entry_1/instrument_1/detector_1/mask"
IMPORT_GROUP = "/entry_1/ptmpi/import"

#: Datasets a ``--probe FILE`` may hold the probe in, tried in this order.
PROBE_DATASETS = (CXI_ILLUMINATION, "/entry_1/instrument_1/source_1/probe",
                  "/entry_1/image_2/data")

#: Relative tolerance within which the files' energy, distance and pixel sizes must agree.
AGREEMENT_RTOL = 1e-6

_ENERGY_UNITS = {"J": 1.0, "eV": ELECTRONVOLT, "keV": 1e3 * ELECTRONVOLT}
_LENGTH_UNITS = {"m": 1.0, "mm": 1e-3, "um": 1e-6, "\u00b5m": 1e-6, "nm": 1e-9}


class ImportFailure(ValueError):
    """A source file cannot be imported; the message is one line naming file and dataset."""


@dataclasses.dataclass
class AngleHeader:
    """What :func:`read_header` learns from one per-angle file (no counts)."""

    path: str
    n_frames: int
    m: int
    energy: float  # J
    distance: float  # m
    x_pixel_size: float  # m
    y_pixel_size: float  # m
    angle_deg: float | None  # None when not read (angles given by the caller)
    translation: np.ndarray  # (N_FRAMES, 2) float64 metres: x, y
    translation_dataset: str
    is_fft_shifted: int
    mask_digest: str | None  # sha256 of the centered uint32 mask; None without a mask
    has_probe: bool
    checksum: str  # "sha256:<hex>" of the file's bytes


@dataclasses.dataclass
class ImportSummary:
    """What :func:`import_cxi` wrote."""

    output: str
    n_angles: int
    n_frames: int
    m: int
    volume_shape: tuple[int, int, int]
    object_pixel_size: float  # m
    mask_shape: tuple[int, ...] | None
    angles_deg: np.ndarray

# ---------------------------------------------------------------------------- reading


def _fail(path: str, dataset: str, text: str) -> ImportFailure:
    return ImportFailure(f"{path}: {dataset}: {text}")


def _units(ds: h5py.Dataset) -> str | None:
    value = ds.attrs.get("units")
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(np.asarray(value).reshape(-1)[0] if np.ndim(value) else value)


def _scalar(f: h5py.File, path: str, name: str, table: dict[str, float] | None,
            positive: bool = True) -> float:
    """A finite scalar dataset, converted to SI with its ``@units`` when ``table`` is given."""
    ds = f.get(name)
    if not isinstance(ds, h5py.Dataset):
        raise _fail(path, name, "required dataset is missing")
    value = np.asarray(ds[()])
    if value.size != 1 or value.dtype.kind not in "iuf":
        raise _fail(path, name, f"expected one real number, found shape {value.shape} "
                                f"dtype {value.dtype}")
    value = float(value.reshape(-1)[0])
    if table is not None:
        unit = _units(ds)
        if unit is not None:
            if unit not in table:
                raise _fail(path, name, f"expected @units one of {', '.join(table)}, found "
                                        f"{unit!r}")
            value *= table[unit]
    if not math.isfinite(value) or (positive and value <= 0):
        raise _fail(path, name, f"expected a finite {'positive ' if positive else ''}number, "
                                f"found {value}")
    return value


def _read_mask(f: h5py.File, path: str, m: int, fft_shifted: int) -> np.ndarray | None:
    """The file's centered ``(m, m)`` uint32 mask, or None when it has none."""
    ds = f.get(CXI_MASK)
    if ds is None:
        return None
    if not isinstance(ds, h5py.Dataset) or ds.shape != (m, m) or ds.dtype.kind not in "biu":
        raise _fail(path, CXI_MASK, f"expected a ({m}, {m}) integer mask (nonzero = invalid), "
                                    f"found {getattr(ds, 'shape', 'a group')} "
                                    f"{getattr(ds, 'dtype', '')}".rstrip())
    mask = np.asarray(ds[()]).astype(np.uint32)
    return np.fft.fftshift(mask) if fft_shifted else mask


def _mask_digest(mask: np.ndarray | None) -> str | None:
    if mask is None:
        return None
    return hashlib.sha256(np.ascontiguousarray(mask).tobytes()).hexdigest()


def read_header(path: str | os.PathLike, angle_dataset: str | None = CXI_ANGLE) -> AngleHeader:
    """Check one per-angle file's structure and read everything but its counts.

    Parameters
    ----------
    path : str or PathLike
        A per-angle CXI file (SPEC 8).
    angle_dataset : str or None
        Where the rotation angle (degrees) is read; None skips it (angles given elsewhere).

    Raises
    ------
    ImportFailure
        One line naming the file and the dataset.
    """
    name = str(path)
    if not os.path.isfile(name):
        raise ImportFailure(f"{name}: file does not exist" if not os.path.exists(name)
                            else f"{name}: expected a file, found a folder")
    try:
        f = h5py.File(name, "r")
    except OSError as exc:
        raise ImportFailure(f"{name}: not a readable HDF5 file ({' '.join(str(exc).split())})"
                            ) from exc
    try:
        with f:
            return _read_header(f, name, angle_dataset)
    except OSError as exc:  # a damaged file fails anywhere in a read
        raise ImportFailure(f"{name}: cannot be read completely ({' '.join(str(exc).split())})"
                            ) from exc


def _read_header(f: h5py.File, name: str, angle_dataset: str | None) -> AngleHeader:
    """The body of :func:`read_header` on the open file ``f``."""
    data = f.get(CXI_DATA)
    if not isinstance(data, h5py.Dataset):
        raise _fail(name, CXI_DATA, "required dataset (the counts) is missing")
    if data.ndim != 3:
        raise _fail(name, CXI_DATA, f"expected 3-D counts (F, m, m), found shape {data.shape}")
    n_frames, m = data.shape[0], data.shape[2]
    if data.shape[1] != m or m == 0 or n_frames == 0:
        raise _fail(name, CXI_DATA, f"expected (F, m, m) counts with square frames and "
                                    f"F >= 1, found shape {data.shape}")
    if data.dtype.kind not in "iuf":
        raise _fail(name, CXI_DATA, f"expected real photon counts, found dtype {data.dtype}")
    shifted = np.asarray(data.attrs.get("is_fft_shifted", 0)).reshape(-1)
    if shifted.size != 1 or shifted[0] not in (0, 1):
        raise _fail(name, CXI_DATA, f"expected @is_fft_shifted 0 (centered) or 1 (corner), "
                                    f"found {shifted.tolist()}")
    fft_shifted = int(shifted[0])

    energy = _scalar(f, name, CXI_ENERGY, _ENERGY_UNITS)
    distance = _scalar(f, name, CXI_DISTANCE, _LENGTH_UNITS)
    x_pixel = _scalar(f, name, CXI_X_PIXEL_SIZE, _LENGTH_UNITS)
    y_pixel = (_scalar(f, name, CXI_Y_PIXEL_SIZE, _LENGTH_UNITS)
               if CXI_Y_PIXEL_SIZE in f else x_pixel)
    if not math.isclose(x_pixel, y_pixel, rel_tol=AGREEMENT_RTOL):
        raise _fail(name, CXI_Y_PIXEL_SIZE, f"expected square detector pixels (equal to "
                                            f"x_pixel_size {x_pixel:g} m), found {y_pixel:g} m")

    where = next((t for t in CXI_TRANSLATIONS if t in f), None)
    if where is None:
        raise _fail(name, CXI_TRANSLATIONS[0], f"required dataset (scan translations) is "
                                               f"missing (also not at {CXI_TRANSLATIONS[1]})")
    ds = f[where]
    if not isinstance(ds, h5py.Dataset) or ds.ndim != 2 or ds.shape[1] not in (2, 3) \
            or ds.shape[0] != n_frames or ds.dtype.kind not in "iuf":
        raise _fail(name, where, f"expected ({n_frames}, 3) translations in metres (x, y, z; "
                                 f"one row per frame of {CXI_DATA}), found "
                                 f"{getattr(ds, 'shape', 'a group')}")
    translation = np.asarray(ds[()], dtype=np.float64)[:, :2]
    scale = 1.0
    unit = _units(ds)
    if unit is not None:
        if unit not in _LENGTH_UNITS:
            raise _fail(name, where, f"expected @units one of {', '.join(_LENGTH_UNITS)}, "
                                     f"found {unit!r}")
        scale = _LENGTH_UNITS[unit]
    translation = translation * scale
    if not np.all(np.isfinite(translation)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(translation), axis=1))[0])
        raise _fail(name, where, f"expected finite translations, found a non-finite one at "
                                 f"frame {bad}")

    angle = None
    if angle_dataset is not None:
        angle = _scalar(f, name, angle_dataset, None, positive=False)

    mask = _read_mask(f, name, m, fft_shifted)
    probe = f.get(CXI_ILLUMINATION)
    has_probe = isinstance(probe, h5py.Dataset)
    return AngleHeader(
        path=name, n_frames=int(n_frames), m=int(m), energy=energy, distance=distance,
        x_pixel_size=x_pixel, y_pixel_size=y_pixel, angle_deg=angle, translation=translation,
        translation_dataset=where, is_fft_shifted=fft_shifted, mask_digest=_mask_digest(mask),
        has_probe=has_probe, checksum=input_checksum(name),
    )


def check_agreement(headers: Sequence[AngleHeader]) -> None:
    """Raise ImportFailure when a file's detector size or geometry differs from the first's.

    Frame counts and scan positions may differ between angles; the frame size, energy,
    distance and pixel sizes may not (beyond :data:`AGREEMENT_RTOL`).
    """
    first = headers[0]
    for h in headers[1:]:
        if h.m != first.m:
            raise _fail(h.path, CXI_DATA, f"expected {first.m}x{first.m} frames as in "
                                          f"{first.path}, found {h.m}x{h.m}")
        for dataset, attr, unit in ((CXI_ENERGY, "energy", "J"), (CXI_DISTANCE, "distance", "m"),
                                    (CXI_X_PIXEL_SIZE, "x_pixel_size", "m"),
                                    (CXI_Y_PIXEL_SIZE, "y_pixel_size", "m")):
            a, b = getattr(first, attr), getattr(h, attr)
            if not math.isclose(a, b, rel_tol=AGREEMENT_RTOL):
                raise _fail(h.path, dataset, f"expected {a:.9g} {unit} as in {first.path}, "
                                             f"found {b:.9g} {unit}")


def read_probe(path: str | os.PathLike, m: int) -> np.ndarray:
    """The ``(m, m)`` complex64 probe of ``path``: a ``.npy`` file or an HDF5 file with one of
    :data:`PROBE_DATASETS` (a per-angle CXI file, a ptmpi input or output file).

    Leading singleton axes are dropped; of several probe modes the first is taken (with a
    warning: the model has one coherent mode).
    """
    name = str(path)
    if not os.path.isfile(name):
        raise ImportFailure(f"{name}: probe file does not exist")
    where = "the array"
    try:
        if name.endswith(".npy"):
            probe = np.load(name, allow_pickle=False)
        else:
            with h5py.File(name, "r") as f:
                where = next((d for d in PROBE_DATASETS if isinstance(f.get(d), h5py.Dataset)),
                             None)
                if where is None:
                    raise ImportFailure(f"{name}: no probe found (expected one of "
                                        f"{', '.join(PROBE_DATASETS)})")
                probe = np.asarray(f[where][()])
    except (OSError, ValueError) as exc:
        if isinstance(exc, ImportFailure):
            raise
        raise ImportFailure(f"{name}: cannot read a probe ({' '.join(str(exc).split())})"
                            ) from exc
    return _as_probe(probe, name, where, m)


def _as_probe(probe: np.ndarray, path: str, where: str, m: int) -> np.ndarray:
    shape = probe.shape
    while probe.ndim > 2 and probe.shape[0] == 1:
        probe = probe[0]
    if probe.ndim == 3 and probe.shape[1:] == (m, m):
        logger.warning("%s: %s holds %d probe modes; using the first (ptmpi models one "
                       "coherent mode)", path, where, probe.shape[0])
        probe = probe[0]
    if probe.shape != (m, m) or probe.dtype.kind not in "iufc":
        raise _fail(path, where, f"expected a ({m}, {m}) complex probe (the frame size), "
                                 f"found shape {shape} dtype {probe.dtype}")
    if not np.all(np.isfinite(probe)) or not np.any(probe):
        raise _fail(path, where, "expected a finite probe with non-zero intensity")
    return probe.astype(np.complex64)


class _FrameStream:
    """The counts of all files as one ``(F, m, m)`` float32 array-like for :func:`write_input`.

    Slicing ``[frame_offset[a]:frame_offset[a+1]]`` reads file ``a`` only (write_input asks
    one angle at a time), checks its counts, moves the zero frequency to ``m // 2`` when the
    file stores it at the corner and zeroes masked pixels.
    """

    ndim = 3
    dtype = np.dtype(np.float32)

    def __init__(self, headers: Sequence[AngleHeader], frame_offset: np.ndarray):
        self.headers = list(headers)
        self.frame_offset = frame_offset
        m = headers[0].m
        self.shape = (int(frame_offset[-1]), m, m)

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("frames are read one angle (one file) at a time")
        hits = np.flatnonzero((self.frame_offset[:-1] == key.start)
                              & (self.frame_offset[1:] == key.stop))
        if hits.size == 0:
            raise IndexError(f"frames [{key.start}, {key.stop}) are not one angle's")
        return read_counts(self.headers[int(hits[-1])])


def read_counts(header: AngleHeader) -> np.ndarray:
    """(N_FRAMES, m, m) float32 centered counts of one file, masked pixels set to 0.

    Raises ImportFailure on a non-finite or negative count at a valid pixel.
    """
    try:
        with h5py.File(header.path, "r") as f:
            counts = np.asarray(f[CXI_DATA][()], dtype=np.float32)
            mask = _read_mask(f, header.path, header.m, header.is_fft_shifted)
    except OSError as exc:  # a damaged file fails in the read
        raise _fail(header.path, CXI_DATA, f"cannot be read ({' '.join(str(exc).split())})"
                    ) from exc
    if header.is_fft_shifted:
        counts = np.fft.fftshift(counts, axes=(-2, -1))
    if mask is not None:
        counts[:, mask != 0] = 0.0
    bad = ~np.isfinite(counts) | (counts < 0)
    if bad.any():
        frame = int(np.flatnonzero(bad.any(axis=(1, 2)))[0])
        raise _fail(header.path, CXI_DATA, f"expected finite non-negative counts at valid "
                                           f"pixels, found {int(bad.sum())} bad value(s) (first "
                                           f"in frame {frame}); mark such pixels in {CXI_MASK}")
    return counts


# ---------------------------------------------------------------------------- import


def import_cxi(
    paths: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    volume_shape: tuple[int, int, int] | None = None,
    probe: np.ndarray | str | os.PathLike | None = None,
    angles_deg: Sequence[float] | None = None,
    angle_dataset: str = CXI_ANGLE,
    conventions: Conventions | None = None,
    margin: int = 0,
    overwrite: bool = False,
    command: str | None = None,
) -> ImportSummary:
    """Convert per-angle CXI files (SPEC 8) into one SPEC 3 input file.

    Parameters
    ----------
    paths : sequence of str or PathLike
        One file per angle, in the order the angles are stored (one file is fine).
    output : str or PathLike
        The SPEC 3 file to write (atomically: a temporary name, then renamed).
    volume_shape : (nz, n, n), optional
        Default: the smallest that holds every window whole (:func:`derive_volume_shape`).
    probe : (m, m) array, or a file name for :func:`read_probe`, optional
        Default: the illumination of the first file that has one; an error when none has.
    angles_deg : sequence of float, optional
        One angle per file, overriding the files' angles (which are then not read).
    angle_dataset : str
        Where each file holds its angle in degrees (SPEC 8: ``tomography_angle_deg``).
    conventions : Conventions, optional
        Sign flips and rotation-axis offset of the translations (default: none).
    margin : int
        Extra pixels on every side of a derived volume shape.
    overwrite : bool
        Replace an existing ``output``.
    command : str, optional
        The command line, recorded as provenance.

    Raises
    ------
    ImportFailure
        One line naming the file and the dataset at fault, or the output.
    """
    from ptmpi.io.output import check_output_path, same_file

    conventions = conventions or Conventions()
    paths = [str(p) for p in paths]
    if not paths:
        raise ImportFailure("no input files given")
    output = Path(output)
    for p in paths:
        if same_file(p, output):
            raise ImportFailure(f"{output}: output is the input file {p}; expected another name")
    try:
        check_output_path(output, overwrite)
    except ValueError as exc:
        raise ImportFailure(str(exc)) from exc
    if angles_deg is not None:
        angles_deg = np.asarray(angles_deg, dtype=np.float64).reshape(-1)
        if angles_deg.size != len(paths) or not np.all(np.isfinite(angles_deg)):
            raise ImportFailure(f"angles: expected {len(paths)} finite angles (one per file), "
                                f"found {angles_deg.tolist()}")

    headers = [read_header(p, None if angles_deg is not None else angle_dataset) for p in paths]
    check_agreement(headers)
    first = headers[0]
    m = first.m
    if angles_deg is None:
        angles_deg = np.array([h.angle_deg for h in headers], dtype=np.float64)
        angle_source = f"files: {angle_dataset}"
    else:
        angle_source = "given (--angles-deg)"
    pixel = object_pixel_size(first.energy, first.distance, m, first.x_pixel_size)

    frame_offset = np.concatenate([[0], np.cumsum([h.n_frames for h in headers])]).astype(np.int64)
    translation = np.concatenate([h.translation for h in headers])
    if volume_shape is None:
        dy, dx = centre_offsets(translation, pixel, conventions)
        volume_shape = derive_volume_shape(dy, dx, m, margin)
        shape_source = f"derived: every window inside, margin {margin}"
    else:
        volume_shape = tuple(int(v) for v in volume_shape)
        if len(volume_shape) != 3 or volume_shape[1] != volume_shape[2] \
                or min(volume_shape) < m:
            raise ImportFailure(f"volume shape: expected (nz, n, n) with nz, n >= the frame "
                                f"size {m}, found {volume_shape}")
        shape_source = "given (--volume-shape)"
    nz, n = volume_shape[0], volume_shape[2]
    positions = translation_to_positions(translation, pixel, m, (nz, n), conventions)
    _check_windows(headers, frame_offset, positions, (nz, n), m)

    probe_array, probe_source = _choose_probe(probe, headers, m)
    digests = [h.mask_digest for h in headers]
    if all(d is None for d in digests):
        mask_shape = None
    elif len(set(digests)) == 1:
        mask_shape = (m, m)
    else:
        mask_shape = (len(headers), m, m)

    tmp = output.with_name(f".{output.name}.import-{os.getpid()}")
    try:
        write_input(
            tmp, counts=_FrameStream(headers, frame_offset), probe=probe_array,
            positions_px=positions, frame_offset=frame_offset, angles_deg=angles_deg,
            volume_shape=volume_shape, energy=first.energy, distance=first.distance,
            pixel_size=first.x_pixel_size, overwrite=True,
        )
        with h5py.File(tmp, "r+") as f:
            _write_mask(f, headers, mask_shape)
            _write_provenance(f, headers, pixel, conventions, angle_source, shape_source,
                              probe_source, command)
        os.replace(tmp, output)
    except OSError as exc:
        raise ImportFailure(f"{output}: cannot write ({' '.join(str(exc).split())})") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    logger.debug("imported %d files into %s", len(headers), output)
    return ImportSummary(output=str(output), n_angles=len(headers),
                         n_frames=int(frame_offset[-1]), m=m, volume_shape=volume_shape,
                         object_pixel_size=pixel, mask_shape=mask_shape, angles_deg=angles_deg)


def _check_windows(headers, frame_offset, positions, image_shape, m) -> None:
    """Refuse a window with no pixel inside the image, judged as ``ptmpi.io.validate`` does."""
    nz, n = image_shape
    r, c = np.rint(positions[:, 0]), np.rint(positions[:, 1])
    outside = (r + m <= 0) | (r >= nz) | (c + m <= 0) | (c >= n)
    if outside.any():
        j = int(np.flatnonzero(outside)[0])
        a = int(np.searchsorted(frame_offset, j, side="right") - 1)
        h = headers[a]
        raise _fail(h.path, h.translation_dataset,
                    f"expected every {m}x{m} window to touch the {nz}x{n} projection image, "
                    f"found frame {j - int(frame_offset[a])} at (row {positions[j, 0]:.6g}, col "
                    f"{positions[j, 1]:.6g}) entirely outside ({int(outside.sum())} frames in "
                    "all; check --volume-shape, --axis-offset and the flips)")


def _choose_probe(probe, headers, m) -> tuple[np.ndarray, str]:
    if probe is not None and not isinstance(probe, np.ndarray):
        return read_probe(probe, m), f"file: {Path(probe).name}"
    if probe is not None:
        return _as_probe(np.asarray(probe), "probe", "the array", m), "given"
    for h in headers:
        if h.has_probe:
            with h5py.File(h.path, "r") as f:
                array = np.asarray(f[CXI_ILLUMINATION][()])
            return (_as_probe(array, h.path, CXI_ILLUMINATION, m),
                    f"file: {Path(h.path).name} {CXI_ILLUMINATION}")
    raise _fail(headers[0].path, CXI_ILLUMINATION,
                "no input file has a probe guess; give one with --probe FILE")


def _write_mask(f: h5py.File, headers, mask_shape) -> None:
    if mask_shape is None:
        return
    m = headers[0].m
    if len(mask_shape) == 2:
        h = headers[0]
        with h5py.File(h.path, "r") as src:
            mask = _read_mask(src, h.path, m, h.is_fft_shifted)
        ds = f.create_dataset(MASK, data=mask)
    else:
        ds = f.create_dataset(MASK, shape=mask_shape, dtype=np.uint32, chunks=(1, m, m))
        for a, h in enumerate(headers):
            with h5py.File(h.path, "r") as src:
                mask = _read_mask(src, h.path, m, h.is_fft_shifted)
            ds[a] = 0 if mask is None else mask
    ds.attrs["description"] = "nonzero = invalid pixel; centered like the counts"


def _write_provenance(f: h5py.File, headers, pixel, conventions, angle_source, shape_source,
                      probe_source, command) -> None:
    grp = f.require_group(IMPORT_GROUP)
    grp.attrs["NX_class"] = "NXcollection"
    text = h5py.string_dtype()
    grp.create_dataset("source_files", data=[Path(h.path).name for h in headers], dtype=text)
    grp.create_dataset("source_sha256", data=[h.checksum for h in headers], dtype=text)
    for key, value in (("object_pixel_size", pixel), ("wavelength", wavelength(headers[0].energy)),
                       ("y_pixel_size", headers[0].y_pixel_size)):
        grp[key] = np.float64(value)
        grp[key].attrs["units"] = "m"
    grp.attrs["flip_x"] = int(conventions.flip_x)
    grp.attrs["flip_y"] = int(conventions.flip_y)
    grp.attrs["axis_offset_px"] = float(conventions.axis_offset_px)
    grp.attrs["angle_source"] = angle_source
    grp.attrs["volume_shape_source"] = shape_source
    grp.attrs["probe_source"] = probe_source
    grp.attrs["program"] = "ptmpi"
    grp.attrs["version"] = __version__
    grp.attrs["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if command:
        grp.attrs["command"] = command
