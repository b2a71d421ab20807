"""Input file of SPEC section 3 (CXI-readable HDF5): atomic writing, reading by angle block.

Frames are stored angle-major, so the frames of angles ``[a0, a1)`` are the contiguous
hyperslab ``[frame_offset[a0], frame_offset[a1])``: every MPI rank opens the file and reads
only its own block (:func:`read_input`); nothing large is broadcast.

Detector convention
-------------------
Files store counts *centered* (zero frequency at pixel ``[M//2, M//2]``), as a detector
records them, unless the detector dataset carries ``@is_fft_shifted = 1`` (zero frequency at
``[0, 0]``, tike's convention). :func:`read_input` always returns counts with the zero
frequency at ``[0, 0]``, the layout of ``fft2`` output, so solvers compare model and data
without any shift in the iteration loop.

The optional detector mask ``detector_1/mask`` (SPEC 8; ``(M, M)`` or one per angle
``(N_ANGLES, M, M)``, nonzero = invalid) shares the data's convention and is returned the
same way, as the boolean ``valid_local`` of the block's frames (:mod:`ptmpi.mask`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np

from ptmpi.mask import valid_from_mask, valid_per_frame

logger = logging.getLogger(__name__)

CXI_VERSION = 160
LAYOUT_VERSION = 1

DATA = "/entry_1/instrument_1/detector_1/data"
MASK = "/entry_1/instrument_1/detector_1/mask"
PROBE = "/entry_1/instrument_1/source_1/probe"
ENERGY = "/entry_1/instrument_1/source_1/energy"
DISTANCE = "/entry_1/instrument_1/detector_1/distance"
PIXEL_SIZE = "/entry_1/instrument_1/detector_1/x_pixel_size"
DATA_LINK = "/entry_1/data_1/data"
PTMPI = "/entry_1/ptmpi"
VOLUME_SHAPE = f"{PTMPI}/volume_shape"
ANGLES = f"{PTMPI}/angles_deg"
FRAME_OFFSET = f"{PTMPI}/frame_offset"
POSITIONS = f"{PTMPI}/positions_px"
TRUTH_VOLUME = f"{PTMPI}/truth/volume"
TRUTH_PROBE = f"{PTMPI}/truth/probe"

#: Datasets every input file must hold (``volume_shape`` is absent in a 2-D dataset).
REQUIRED = (DATA, PROBE, ANGLES, FRAME_OFFSET, POSITIONS)

_CHECKSUM_CHUNK = 16 << 20


@dataclasses.dataclass
class InputData:
    """One rank's view of an input file: global metadata plus its block of frames.

    Attributes
    ----------
    path : str
        The file read.
    angles_deg : (N_ANGLES,) float64
        All angles of the file, in degrees.
    frame_offset : (N_ANGLES + 1,) int64
        Global frame offsets: frames of angle ``a`` are ``[frame_offset[a], frame_offset[a+1])``.
    angle_start, angle_stop : int
        The block of angles ``[angle_start, angle_stop)`` whose frames were read.
    counts_local : (N_FRAMES_LOCAL, M, M) float32
        Photon counts of the block, zero frequency at ``[0, 0]`` whatever the file stores;
        0 at the pixels the detector mask marks invalid.
    positions_local : (N_FRAMES_LOCAL, 2) float64
        ``(row, col)`` of each window's top-left corner in the projection image, after
        ``position_shift`` was added.
    frame_offset_local : (N_ANGLES_LOCAL + 1,) int64
        Offsets of the block's angles into ``counts_local`` (starts at 0).
    probe : (M, M) complex64
        The probe (leading singleton axes of the stored dataset removed).
    volume_shape : tuple (nz, n, n) or None
        None for a 2-D ptychography dataset.
    image_shape : tuple (nz, n) or (H, W)
        Shape of the projection image the windows index into.
    position_shift : (2,) float64
        Shift added to the stored positions (zeros for a 3-D dataset).
    is_fft_shifted : int
        The file's detector convention (0 centered, 1 corner); informative only, since
        ``counts_local`` is always corner-zero.
    truth_volume : (nz, n, n) complex64 or None
    truth_probe : (M, M) complex64 or None
        Ground truth, only when requested with ``read_truth`` and present.
    energy, distance, pixel_size : float or None
        Optional geometry in SI units (J, m, m).
    valid_local : bool (M, M) or (N_FRAMES_LOCAL, M, M), or None
        The detector mask as valid pixels (True = measured), zero frequency at ``[0, 0]``
        like ``counts_local``: ``(M, M)`` when the file has one mask for all frames, one
        per local frame when it has one per angle, None when it has no mask.
    """

    path: str
    angles_deg: np.ndarray
    frame_offset: np.ndarray
    angle_start: int
    angle_stop: int
    counts_local: np.ndarray
    positions_local: np.ndarray
    frame_offset_local: np.ndarray
    probe: np.ndarray
    volume_shape: tuple[int, int, int] | None
    image_shape: tuple[int, int]
    position_shift: np.ndarray
    is_fft_shifted: int = 0
    truth_volume: np.ndarray | None = None
    truth_probe: np.ndarray | None = None
    energy: float | None = None
    distance: float | None = None
    pixel_size: float | None = None
    valid_local: np.ndarray | None = None
    shared_image: bool = False
    """True when the ranks split the frames of one angle (set by the reconstruct driver;
    :func:`read_input` reads whole angles)."""
    frame_start: int | None = None
    """With ``shared_image``: the global index of this rank's first frame."""

    @property
    def is_2d(self) -> bool:
        """True for a ptychography dataset without ``volume_shape`` (no tomography)."""
        return self.volume_shape is None

    @property
    def n_angles(self) -> int:
        return int(self.angles_deg.size)

    @property
    def n_frames(self) -> int:
        """Number of frames in the whole file."""
        return int(self.frame_offset[-1])

    @property
    def m(self) -> int:
        """Probe / frame size in pixels."""
        return int(self.probe.shape[-1])

    @property
    def angles_deg_local(self) -> np.ndarray:
        """(N_ANGLES_LOCAL,) float64 angles of this block."""
        return self.angles_deg[self.angle_start : self.angle_stop]

    @property
    def n_frames_local(self) -> int:
        return int(self.counts_local.shape[0])


# ---------------------------------------------------------------------------- writing


def write_input(
    path: str | os.PathLike,
    *,
    counts: np.ndarray,
    probe: np.ndarray,
    positions_px: np.ndarray,
    frame_offset: np.ndarray,
    angles_deg: np.ndarray,
    volume_shape: tuple[int, int, int] | None,
    truth_volume: np.ndarray | None = None,
    truth_probe: np.ndarray | None = None,
    truth_shifts_px: np.ndarray | None = None,
    is_fft_shifted: int = 0,
    energy: float | None = None,
    distance: float | None = None,
    pixel_size: float | None = None,
    mask: np.ndarray | None = None,
    overwrite: bool = False,
    compression: str | None = None,
    attrs: Mapping | None = None,
    root_attrs: Mapping | None = None,
) -> None:
    """Write an input file in the layout of SPEC section 3, atomically.

    Parameters
    ----------
    path : str or PathLike
        Destination. Written to a temporary name in the same folder, then renamed, so
        an interrupted write never leaves a partial file under ``path``.
    counts : (N_FRAMES, M, M) real
        Photon counts, stored as float32. Centered (zero frequency at ``[M//2, M//2]``)
        unless ``is_fft_shifted=1``; stored as given, the convention is recorded. Any
        object with ``shape``, ``ndim`` and slicing along axis 0 works (an h5py dataset, a
        lazy reader): it is read one angle's frames at a time.
    probe : (M, M) complex
        Probe, stored as complex64.
    positions_px : (N_FRAMES, 2) float
        ``(row, col)`` top-left corner of each window, in pixels.
    frame_offset : (N_ANGLES + 1,) int
        Frames of angle ``a`` are ``[frame_offset[a], frame_offset[a+1])``.
    angles_deg : (N_ANGLES,) float
        Rotation angles in degrees.
    volume_shape : (nz, n, n) or None
        None writes a 2-D ptychography dataset (no ``volume_shape`` dataset).
    truth_volume : (nz, n, n) complex, optional
    truth_probe : (M, M) complex, optional
    truth_shifts_px : (N_ANGLES, 2) float, optional
        Simulated sample drift per angle (true minus recorded positions, SPEC 8).
        Ground truth of simulated data, stored under ``ptmpi/truth``.
    is_fft_shifted : {0, 1}
        0: ``counts`` are centered; 1: zero frequency at ``[0, 0]``.
    energy, distance, pixel_size : float, optional
        Photon energy (J), detector distance (m), detector pixel size (m).
    mask : (M, M) or (N_ANGLES, M, M) integer or bool, optional
        Detector mask (SPEC 8), nonzero = invalid pixel, in the same convention as
        ``counts`` (centered unless ``is_fft_shifted=1``); stored as uint32.
    overwrite : bool
        Replace an existing ``path``; without it an existing file raises FileExistsError.
    compression : str, optional
        h5py filter for the counts (e.g. ``"gzip"``); none by default, for read speed.
    attrs : mapping, optional
        Extra attributes of the ``/entry_1/ptmpi`` group (e.g. simulation settings).
    root_attrs : mapping, optional
        Extra attributes of the file's root group.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is False.
    ValueError
        The arrays do not describe a consistent dataset.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: file exists; refusing to overwrite it without "
                              "overwrite=True (--force on the command line)")
    if not hasattr(counts, "shape"):  # arrays and lazy readers are sliced by angle below
        counts = np.asarray(counts)
    probe = _squeeze_leading(np.asarray(probe))
    positions_px = np.asarray(positions_px, dtype=np.float64)
    frame_offset = np.asarray(frame_offset, dtype=np.int64)
    angles_deg = np.asarray(angles_deg, dtype=np.float64).reshape(-1)
    _check_write_shapes(counts, probe, positions_px, frame_offset, angles_deg, volume_shape,
                        is_fft_shifted)
    if mask is not None:
        mask = _check_write_mask(np.asarray(mask), counts.shape[-1], angles_deg.size)
    n_frames, m = counts.shape[0], counts.shape[-1]

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            for key, value in (root_attrs or {}).items():
                f.attrs[key] = value
            f["cxi_version"] = np.int64(CXI_VERSION)
            entry = f.create_group("entry_1")
            entry.attrs["NX_class"] = "NXentry"
            entry.create_group("instrument_1").attrs["NX_class"] = "NXinstrument"
            detector = entry.create_group("instrument_1/detector_1")
            detector.attrs["NX_class"] = "NXdetector"
            source = entry.create_group("instrument_1/source_1")
            source.attrs["NX_class"] = "NXsource"

            data = detector.create_dataset(
                "data", shape=(n_frames, m, m), dtype=np.float32,
                chunks=(1, m, m) if n_frames else None, compression=compression,
            )
            # One angle block at a time bounds the float32 copy of float64 inputs.
            for a in range(angles_deg.size):
                f0, f1 = int(frame_offset[a]), int(frame_offset[a + 1])
                if f1 > f0:
                    data[f0:f1] = counts[f0:f1].astype(np.float32, copy=False)
            data.attrs["is_fft_shifted"] = np.int32(is_fft_shifted)
            data.attrs["units"] = "counts"
            data.attrs["axes"] = "translation:y:x"
            if mask is not None:
                detector.create_dataset("mask", data=mask)
            source.create_dataset("probe", data=probe.astype(np.complex64))
            for dset, value, unit in ((ENERGY, energy, "J"), (DISTANCE, distance, "m"),
                                      (PIXEL_SIZE, pixel_size, "m")):
                if value is not None:
                    f[dset] = np.float64(value)
                    f[dset].attrs["units"] = unit

            data_1 = entry.create_group("data_1")
            data_1.attrs["NX_class"] = "NXdata"
            data_1.attrs["signal"] = "data"
            data_1["data"] = h5py.SoftLink(DATA)

            grp = entry.create_group("ptmpi")
            grp.attrs["NX_class"] = "NXcollection"
            grp.attrs["layout_version"] = np.int64(LAYOUT_VERSION)
            for key, value in (attrs or {}).items():
                grp.attrs[key] = value
            if volume_shape is not None:
                grp["volume_shape"] = np.asarray(volume_shape, dtype=np.int64)
            grp["angles_deg"] = angles_deg
            grp["angles_deg"].attrs["units"] = "deg"
            grp["frame_offset"] = frame_offset
            grp["positions_px"] = positions_px
            grp["positions_px"].attrs["units"] = "pixel"
            grp["positions_px"].attrs["axes"] = "translation:coordinate"
            if truth_volume is not None:
                grp["truth/volume"] = np.asarray(truth_volume, dtype=np.complex64)
            if truth_probe is not None:
                grp["truth/probe"] = _squeeze_leading(np.asarray(truth_probe)).astype(
                    np.complex64)
            if truth_shifts_px is not None:
                grp["truth/shifts_px"] = np.asarray(truth_shifts_px, dtype=np.float64)
                grp["truth/shifts_px"].attrs["units"] = "pixel"
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    logger.debug("wrote %s: %d angles, %d frames of %dx%d", path, angles_deg.size, n_frames,
                 m, m)


def _check_write_shapes(counts, probe, positions_px, frame_offset, angles_deg, volume_shape,
                        is_fft_shifted) -> None:
    """Raise ValueError (one sentence) when the arrays would make an invalid file."""
    if counts.ndim != 3 or counts.shape[1] != counts.shape[2]:
        raise ValueError(f"counts: expected shape (N_FRAMES, M, M), found {counts.shape}")
    n_frames, m = counts.shape[0], counts.shape[-1]
    if probe.shape != (m, m):
        raise ValueError(f"probe: expected shape {(m, m)} (the frame size), found {probe.shape}")
    if positions_px.shape != (n_frames, 2):
        raise ValueError(f"positions_px: expected shape {(n_frames, 2)}, "
                         f"found {positions_px.shape}")
    n_angles = angles_deg.size
    if frame_offset.shape != (n_angles + 1,):
        raise ValueError(f"frame_offset: expected shape {(n_angles + 1,)} for {n_angles} angles, "
                         f"found {frame_offset.shape}")
    if (frame_offset[0] != 0 or frame_offset[-1] != n_frames
            or np.any(np.diff(frame_offset) < 0)):
        raise ValueError(f"frame_offset: expected non-decreasing from 0 to {n_frames}, "
                         f"found {frame_offset.tolist()}")
    if volume_shape is not None and len(volume_shape) != 3:
        raise ValueError(f"volume_shape: expected (nz, n, n), found {tuple(volume_shape)}")
    if is_fft_shifted not in (0, 1):
        raise ValueError(f"is_fft_shifted: expected 0 or 1, found {is_fft_shifted!r}")


def _check_write_mask(mask: np.ndarray, m: int, n_angles: int) -> np.ndarray:
    """The mask as uint32, values kept (nonzero = invalid; a simulation writes 1 for dead,
    2 for hot pixels); ValueError when its shape, type or values are wrong."""
    if mask.shape not in ((m, m), (n_angles, m, m)):
        raise ValueError(f"mask: expected shape {(m, m)} or {(n_angles, m, m)} (one per "
                         f"angle), found {mask.shape}")
    if mask.dtype.kind not in "biu":
        raise ValueError(f"mask: expected integers or booleans (nonzero = invalid), found "
                         f"dtype {mask.dtype}")
    if mask.size and (mask.min() < 0 or mask.max() > np.iinfo(np.uint32).max):
        raise ValueError(f"mask: expected values in [0, 2^32) (uint32), found "
                         f"{mask.min()} to {mask.max()}")
    return mask.astype(np.uint32)


# ---------------------------------------------------------------------------- reading


def read_input(
    path: str | os.PathLike,
    angle_start: int = 0,
    angle_stop: int | None = None,
    *,
    margin: int = 16,
    read_truth: bool = False,
    truth_slices: tuple[int, int] | None = None,
) -> InputData:
    """Read the metadata and the frames of angles ``[angle_start, angle_stop)``.

    Only the hyperslab ``[frame_offset[angle_start], frame_offset[angle_stop])`` of the
    counts is read, so each MPI rank reads just its block. Validate first
    (:func:`ptmpi.io.validate.validate_input`): this reader checks only what it needs to
    index the file, and raises ValueError or OSError otherwise.

    Parameters
    ----------
    path : str or PathLike
        Input file (SPEC section 3, or the close variant of the tike Siemens-star set).
    angle_start, angle_stop : int
        Block of angles; ``angle_stop=None`` means up to the last angle. An empty block
        (``angle_start == angle_stop``) reads metadata only.
    margin : int
        2-D datasets only: empty pixels kept around the scanned area when the image
        shape is derived from the positions.
    read_truth : bool
        Also read ``ptmpi/truth/volume`` and ``ptmpi/truth/probe`` when present.
    truth_slices : (z0, z1), optional
        Read only these slices of the truth volume (a z-slab; ``--slabs``).

    Returns
    -------
    InputData
        ``counts_local`` is float32 with the zero frequency at ``[0, 0]``: centered files
        (``is_fft_shifted`` 0 or absent) are ``ifftshift``-ed, corner files are read as is.
        ``valid_local`` (None without a mask) likewise; a per-angle mask is read for the
        block's angles only and repeated for each of their frames.

    Notes
    -----
    A 2-D dataset (no ``volume_shape``) has scan positions in an arbitrary frame (the tike
    Siemens star's run from about -164 to 168). They are shifted by a whole number of pixels
    per axis, ``shift = margin - floor(min(pos))``, which puts the minimum corner at
    ``margin`` pixels (up to its sub-pixel part, kept unchanged: the operators model
    sub-pixel positions exactly, SPEC 8). The image is ``ceil(max(pos + shift) + M + margin)``
    pixels per axis. Both use all frames of the file, so every rank gets the same image.
    """
    path = str(path)
    with h5py.File(path, "r") as f:
        for name in REQUIRED:
            if name not in f:
                raise ValueError(f"{path}: required dataset {name} is missing")
        angles_deg = np.asarray(f[ANGLES][()], dtype=np.float64).reshape(-1)
        frame_offset = np.asarray(f[FRAME_OFFSET][()], dtype=np.int64).reshape(-1)
        n_angles = angles_deg.size
        if frame_offset.size != n_angles + 1:
            raise ValueError(f"{path}: {FRAME_OFFSET}: expected {n_angles + 1} entries for "
                             f"{n_angles} angles, found {frame_offset.size}")
        if angle_stop is None:
            angle_stop = n_angles
        if not 0 <= angle_start <= angle_stop <= n_angles:
            raise ValueError(f"{path}: angle block [{angle_start}, {angle_stop}) is not inside "
                             f"[0, {n_angles})")
        f0, f1 = int(frame_offset[angle_start]), int(frame_offset[angle_stop])

        probe = _squeeze_leading(np.asarray(f[PROBE][()])).astype(np.complex64)
        if probe.ndim != 2 or probe.shape[0] != probe.shape[1]:
            raise ValueError(f"{path}: {PROBE}: expected one square (M, M) probe after removing "
                             f"leading singleton axes, found shape {f[PROBE].shape}")
        m = probe.shape[0]

        volume_shape = None
        if VOLUME_SHAPE in f:
            volume_shape = tuple(int(v) for v in f[VOLUME_SHAPE][()])

        ds = f[DATA]
        is_fft_shifted = stored_fft_shift(ds)
        counts_local = np.asarray(ds[f0:f1], dtype=np.float32)
        if not is_fft_shifted:
            counts_local = np.fft.ifftshift(counts_local, axes=(-2, -1))
        valid_local = _read_valid(f, path, m, n_angles, angle_start, angle_stop,
                                  frame_offset, is_fft_shifted)
        if valid_local is not None:
            # Not data (SPEC 8): no garbage of a dead or hot pixel is handed on.
            np.copyto(counts_local, np.float32(0), where=~valid_local)

        if volume_shape is None:
            positions = np.asarray(f[POSITIONS][()], dtype=np.float64)
            shift, image_shape = image_frame_2d(positions, m, margin)
            positions_local = positions[f0:f1] + shift
        else:
            positions_local = np.asarray(f[POSITIONS][f0:f1], dtype=np.float64)
            shift = np.zeros(2)
            image_shape = (volume_shape[0], volume_shape[2])

        truth_volume = truth_probe = None
        if read_truth:
            if TRUTH_VOLUME in f:
                slices = () if truth_slices is None else slice(*truth_slices)
                truth_volume = np.asarray(f[TRUTH_VOLUME][slices], dtype=np.complex64)
            if TRUTH_PROBE in f:
                truth_probe = _squeeze_leading(np.asarray(f[TRUTH_PROBE][()])).astype(
                    np.complex64)
        energy, distance, pixel_size = (
            float(f[name][()]) if name in f else None for name in (ENERGY, DISTANCE, PIXEL_SIZE)
        )

    logger.debug("%s: read angles [%d, %d), frames [%d, %d)", path, angle_start, angle_stop,
                 f0, f1)
    return InputData(
        path=path,
        angles_deg=angles_deg,
        frame_offset=frame_offset,
        angle_start=int(angle_start),
        angle_stop=int(angle_stop),
        counts_local=counts_local,
        positions_local=positions_local,
        frame_offset_local=frame_offset[angle_start : angle_stop + 1] - f0,
        probe=probe,
        volume_shape=volume_shape,
        image_shape=tuple(int(s) for s in image_shape),
        position_shift=np.asarray(shift, dtype=np.float64),
        is_fft_shifted=is_fft_shifted,
        truth_volume=truth_volume,
        truth_probe=truth_probe,
        energy=energy,
        distance=distance,
        pixel_size=pixel_size,
        valid_local=valid_local,
    )


def _read_valid(f: h5py.File, path: str, m: int, n_angles: int, angle_start: int,
                angle_stop: int, frame_offset: np.ndarray, is_fft_shifted: int):
    """``valid_local`` of :class:`InputData` from the file's mask (None when absent)."""
    if MASK not in f:
        return None
    ds = f[MASK]
    if not isinstance(ds, h5py.Dataset) or ds.shape not in ((m, m), (n_angles, m, m)) \
            or ds.dtype.kind not in "biu":
        raise ValueError(f"{path}: {MASK}: expected integers of shape {(m, m)} or "
                         f"{(n_angles, m, m)}, found {getattr(ds, 'shape', 'a group')} "
                         f"{getattr(ds, 'dtype', '')}".rstrip())
    if ds.ndim == 2:
        return valid_from_mask(ds[()], is_fft_shifted)
    per_angle = valid_from_mask(ds[angle_start:angle_stop], is_fft_shifted)
    offsets = frame_offset[angle_start : angle_stop + 1]
    return valid_per_frame(per_angle, offsets - offsets[0])


def image_frame_2d(positions: np.ndarray, m: int, margin: int) -> tuple[np.ndarray, tuple]:
    """Shift and image shape of a 2-D dataset (see :func:`read_input`, Notes).

    Parameters
    ----------
    positions : (N_FRAMES, 2) float64
        Stored ``(row, col)`` positions of all frames; must be finite.
    m : int
        Window size.
    margin : int
        Empty pixels on every side.

    Returns
    -------
    shift : (2,) float64
        Whole-pixel shift to add to the positions.
    image_shape : tuple (H, W)
    """
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    if positions.shape[0] == 0:
        raise ValueError("a 2-D dataset without frames has no image shape")
    shift = margin - np.floor(positions.min(axis=0))
    top = positions.max(axis=0) + shift
    image_shape = tuple(int(math.ceil(t + m + margin)) for t in top)
    return shift, image_shape


def stored_fft_shift(ds: h5py.Dataset) -> int:
    """``@is_fft_shifted`` of the detector dataset as an int (0 when absent)."""
    value = ds.attrs.get("is_fft_shifted", 0)
    return int(np.asarray(value).reshape(-1)[0])


def _squeeze_leading(a: np.ndarray) -> np.ndarray:
    """Drop leading length-1 axes (the tike file stores the probe as (1, 1, M, M))."""
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    return a


def squeezed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` without leading length-1 axes beyond the last two."""
    shape = tuple(shape)
    while len(shape) > 2 and shape[0] == 1:
        shape = shape[1:]
    return shape


def input_checksum(path: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` of the file's bytes, read in 16 MiB chunks (for provenance)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHECKSUM_CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"
