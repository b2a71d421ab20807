"""Reconstruction output file (SPEC section 4), written by rank 0 only, atomically."""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from ptmpi import __version__

logger = logging.getLogger(__name__)


def check_output_path(path: str | os.PathLike, force: bool,
                      input_path: str | os.PathLike | None = None,
                      figures: Sequence[str | os.PathLike] = ()) -> None:
    """Raise ValueError (one line) when ``path`` cannot or must not be written.

    Refused: the input file itself (even with ``force``), a folder, an existing file (or
    one of the ``figures`` to be written beside it) without ``force``, a missing parent
    folder or one that is not a folder, and a folder where no file can be created. The
    last is tried for real (a hidden empty file, created and removed at once): permission
    bits do not stop root, and read-only or virtual file systems pass ``os.access``, yet
    the write at the end of the run would fail.
    """
    path = Path(path)
    if input_path is not None and same_file(path, Path(input_path)):
        raise ValueError(f"{path}: output is the input file {input_path}; expected another "
                         "name (the input is never overwritten, even with --force)")
    if path.is_dir():
        raise ValueError(f"{path}: output is a folder; expected a file name")
    if path.exists() and not force:
        raise ValueError(f"{path}: output exists; pass --force to overwrite it")
    for figure in figures:
        if Path(figure).exists() and not force:
            raise ValueError(f"{figure}: exists (a figure of output {path}); pass --force to "
                             "overwrite it or --no-figures")
    folder = path.parent
    if not folder.exists():
        raise ValueError(f"{path}: output folder {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"{path}: {folder} is not a folder (a file of that name exists)")
    try:
        fd, trial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".trial", dir=folder)
    except OSError as exc:
        raise ValueError(f"{path}: cannot create a file in output folder {folder} "
                         f"({exc.strerror or exc})") from exc
    os.close(fd)
    os.unlink(trial)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name one existing file (links and spellings alike)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def write_output(path, *, volume, probe, metrics: dict, parameters: dict, n_ranks: int,
                 input_file: str, input_checksum: str, command: str | None = None,
                 overwrite: bool = False, image_axes: str = "z:y:x",
                 root_attrs: dict | None = None, positions_px=None,
                 frame_offset=None, shifts_px=None, angles_deg=None,
                 shift_std_px=None) -> None:
    """Write the SPEC 4 file: volume, probe, provenance and the metrics history.

    ``probe``: ``(M, M)``, or ``(K, M, M)`` incoherent probe modes (stored with a leading
    mode axis, ``@axes = "mode:y:x"``).

    ``positions_px`` ``(N_FRAMES, 2)`` float64 and ``frame_offset`` ``(N_ANGLES + 1,)``:
    the scan positions the model used, in the frame of the stored image or of the
    projections of the stored volume (SPEC 2), stored as ``/entry_1/image_1/positions_px``
    and ``/entry_1/image_1/frame_offset``; with the image (or volume) and the probe they
    give back the stored R-factor through the model.

    ``shifts_px`` ``(N_ANGLES, 2)`` float64 (``--align``, SPEC 8): per angle the (row, col)
    shift of the true positions of its frames relative to the recorded ones, stored as
    ``/entry_1/ptmpi/shifts_px``; with ``angles_deg`` its attribute
    ``unobservable_row_a_b`` holds the part of them that a translation of the volume
    makes (:func:`ptmpi.solvers.align.unobservable_part`). ``shift_std_px`` ``(N_ANGLES,
    2)``: their Cramer-Rao standard errors at the final volume
    (:func:`ptmpi.solvers.align.shift_precision`), ``/entry_1/ptmpi/shift_std_px``.

    Written to a temporary name in the same folder and renamed, so an interrupted write
    never leaves a half file under ``path`` and never damages an existing one.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: output exists; pass --force to overwrite it")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            f["cxi_version"] = np.int64(160)
            for key, value in (root_attrs or {}).items():
                f.attrs[key] = value
            entry = f.create_group("entry_1")
            entry.attrs["NX_class"] = "NXentry"
            img = entry.create_group("image_1")
            img.attrs["NX_class"] = "NXdata"
            ds = img.create_dataset("data", data=np.asarray(volume, dtype=np.complex64))
            ds.attrs["axes"] = image_axes
            img2 = entry.create_group("image_2")
            img2.attrs["NX_class"] = "NXdata"
            probe_ds = img2.create_dataset("data", data=np.asarray(probe, dtype=np.complex64))
            if probe_ds.ndim == 3:  # K incoherent probe modes, strongest first
                probe_ds.attrs["axes"] = "mode:y:x"
            proc = entry.create_group("process_1")
            proc.attrs["NX_class"] = "NXprocess"
            proc["program"] = "ptmpi"
            proc["version"] = __version__
            proc["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
            proc["command"] = command if command is not None else " ".join(sys.argv)
            proc["parameters"] = json.dumps(parameters, sort_keys=True, default=str)
            proc["n_ranks"] = np.int64(n_ranks)
            proc["input_file"] = str(input_file)
            proc["input_checksum"] = input_checksum
            # Beside the image, not under /entry_1/ptmpi: there they would make the file
            # look like an input (SPEC 3 required datasets) to `ptmpi info`.
            if positions_px is not None:
                pos = img.create_dataset("positions_px",
                                         data=np.asarray(positions_px, dtype=np.float64))
                pos.attrs["units"] = "pixel"
                pos.attrs["axes"] = "translation:coordinate"
            if frame_offset is not None:
                img["frame_offset"] = np.asarray(frame_offset, dtype=np.int64)
            grp = entry.create_group("ptmpi/metrics")
            grp.attrs["NX_class"] = "NXcollection"
            for key, values in metrics.items():
                dtype = np.int64 if key == "iteration" else np.float64
                grp.create_dataset(key, data=np.asarray(values, dtype=dtype))
            for key, unit in (("wall_s", "s"), ("snr_db", "dB")):
                if key in grp:
                    grp[key].attrs["units"] = unit
            if shifts_px is not None:
                shifts = entry["ptmpi"].create_dataset(
                    "shifts_px", data=np.asarray(shifts_px, dtype=np.float64).reshape(-1, 2))
                shifts.attrs["units"] = "pixel"
                shifts.attrs["axes"] = "angle:row_col"
                if angles_deg is not None:
                    # the part no data can see: mean row, and a, b of col ~ a cos + b sin
                    from ptmpi.solvers.align import unobservable_part

                    shifts.attrs["unobservable_row_a_b"] = unobservable_part(
                        shifts[()], np.deg2rad(np.asarray(angles_deg, dtype=np.float64)))
            if shift_std_px is not None:
                std = entry["ptmpi"].create_dataset(
                    "shift_std_px",
                    data=np.asarray(shift_std_px, dtype=np.float64).reshape(-1, 2))
                std.attrs["units"] = "pixel"
                std.attrs["axes"] = "angle:row_col"
                std.attrs["meaning"] = ("Cramer-Rao standard error of each shift at the final "
                                        "volume and probe (a lower bound)")
            f.flush()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
