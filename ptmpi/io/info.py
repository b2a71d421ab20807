"""``ptmpi info``: summary and validation of an input (SPEC 3) or output (SPEC 4) file."""

from __future__ import annotations

import json
import logging
import math
import os
import sys

import h5py
import numpy as np

from ptmpi.io.cxi import (
    DATA,
    FRAME_OFFSET,
    POSITIONS,
    REQUIRED,
    TRUTH_PROBE,
    TRUTH_VOLUME,
    read_input,
)
from ptmpi.io.validate import inspect_input, one_line

logger = logging.getLogger(__name__)

OUT_VOLUME = "/entry_1/image_1/data"
OUT_PROBE = "/entry_1/image_2/data"
OUT_PROCESS = "/entry_1/process_1"
OUT_METRICS = "/entry_1/ptmpi/metrics"


def info_lines(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Summary lines and problem lines of an input or output file.

    The kind is detected from the content: an input file has the detector data
    ``/entry_1/instrument_1/detector_1/data`` (or another required dataset of SPEC 3, so
    that a file missing the data is reported as such), an output file the reconstruction
    ``/entry_1/image_1/data``.

    Returns
    -------
    summary : list of str
        Human-readable description (as much as could be read).
    problems : list of str
        One line each; empty when the file is valid.
    """
    name = str(path)
    if not os.path.exists(name):
        return [], [f"{name}: file does not exist"]
    try:
        with h5py.File(name, "r") as f:
            # Any SPEC 3 dataset makes an input file: validation then names what is missing.
            is_input, is_output = any(d in f for d in REQUIRED), OUT_VOLUME in f
            is_checkpoint = "ptmpi_checkpoint" in f.attrs
    except Exception as exc:  # noqa: BLE001 - whatever h5py raises, the file is unusable
        return [], [f"{name}: not a readable HDF5 file ({one_line(exc)})"]
    size = f"file: {name} ({_human_bytes(os.path.getsize(name))})"
    if is_input:
        summary, problems = _input_info(name)
    elif is_output:
        summary, problems = _output_info(name)
    elif is_checkpoint:
        summary, problems = _checkpoint_info(name)
    else:
        return [size], [f"{name}: neither a ptmpi input file (no {DATA}) nor an output file "
                        f"(no {OUT_VOLUME})"]
    return [size, *summary], problems


def main_info(path: str | os.PathLike) -> int:
    """Print the summary to stdout and each problem as ``error: ...`` to stderr.

    Returns
    -------
    int
        0 when the file is valid, 1 otherwise (the exit code of ``ptmpi info``).
    """
    summary, problems = info_lines(path)
    for line in summary:
        print(line)
    sys.stdout.flush()
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    return 1 if problems else 0


# ---------------------------------------------------------------------------- checkpoint


def _checkpoint_info(name: str) -> tuple[list[str], list[str]]:
    from ptmpi.io.checkpoint import read_checkpoint_header

    lines = ["kind: checkpoint (APT/APTs solver state; ptmpi reconstruct --resume)"]
    try:
        head = read_checkpoint_header(name)
    except ValueError as exc:
        return lines, [one_line(exc)]
    settings = head.settings
    penalties = ", ".join(f"{k} {head.params.get(k, math.nan):.4g}" for k in ("tv_weight", "r1",
                                                                          "r2"))
    lines += [
        f"iteration: {head.iteration} (of --iterations {settings.get('iterations')})",
        f"algorithm: {settings.get('algorithm')}, likelihood {settings.get('likelihood')}, "
        f"{head.dtype}, {penalties}",
        f"volume: {head.volume_shape}, probe: {head.probe_shape}, frames: {head.n_frames}",
        f"n_ranks: {head.n_ranks} (a resume may use another count)",
        f"input_checksum: {head.input_checksum}",
    ]
    return lines, []


# ---------------------------------------------------------------------------- input


def _input_info(name: str) -> tuple[list[str], list[str]]:
    report = inspect_input(name)
    if report.problems:
        # A broken structure cannot be summarized reliably; the problems say why.
        return ["kind: input file (SPEC 3)"], report.problems
    margin = 16
    data = read_input(name, 0, 0, margin=margin)
    lines = []
    if data.is_2d:
        angles = "single angle" if data.n_angles == 1 else f"{data.n_angles} angles"
        lines.append(f"kind: input, 2-D ptychography dataset ({angles}, no volume_shape)")
        lines.append(f"image shape: {data.image_shape[0]} x {data.image_shape[1]} (computed from "
                     f"the positions with a {margin} px margin; positions shifted by "
                     f"{_pair(data.position_shift)} px)")
    else:
        lines.append("kind: input, 3-D ptycho-tomography dataset")
        nz, n, _ = data.volume_shape
        lines.append(f"volume shape: (nz, n, n) = ({nz}, {n}, {n}); projection image "
                     f"{nz} x {n}")
    deg = data.angles_deg
    if deg.size:
        lines.append(f"angles: {deg.size}, from {deg.min():g} to {deg.max():g} deg")
    else:
        lines.append("angles: none")
    per_angle = np.diff(data.frame_offset)
    spread = (f", {int(per_angle.min())} to {int(per_angle.max())} per angle"
              if per_angle.size else "")
    lines.append(f"frames: {data.n_frames} in all{spread}, {data.m} x {data.m} pixels each")
    power = float(np.sum(np.abs(data.probe.astype(np.complex128)) ** 2))
    lines.append(f"probe: {data.m} x {data.m} complex64, sum |probe|^2 = {power:.6g}")
    if report.counts_total is not None:
        lines.append(f"counts: total {report.counts_total:.6g}, max {report.counts_max:g}"
                     + (" (valid pixels only)" if report.mask_shape is not None else ""))
    convention = ("1 (zero frequency at [0, 0])" if data.is_fft_shifted
                  else "0 (centered: zero frequency at [m//2, m//2])")
    lines.append(f"detector convention: is_fft_shifted = {convention}")
    lines.append("detector mask: " + _mask_text(report.mask_shape, report.masked_pixels))
    with h5py.File(name, "r") as f:
        off = f[FRAME_OFFSET][()]
        first = np.asarray(f[POSITIONS][int(off[0]) : int(off[1])], dtype=np.float64) \
            if off.size > 1 else np.zeros((0, 2))
        truth = [p.rsplit("/", 1)[-1] for p in (TRUTH_VOLUME, TRUTH_PROBE) if p in f]
        model = f["entry_1/ptmpi"].attrs.get("model", "linear") if "entry_1/ptmpi" in f \
            else "linear"
        positions = np.asarray(f[POSITIONS][()], dtype=np.float64)
    lines.append("scan step: " + _scan_step_text(first))
    subpixel = float(np.abs(positions - np.rint(positions)).max(initial=0.0))
    if subpixel > 1e-6:
        lines.append(f"positions: sub-pixel values (up to {subpixel:.2f} px from whole pixels), "
                     "modelled exactly (SPEC 8)")
    lines.append(f"truth: {', '.join(truth) if truth else 'absent'}")
    lines.append(f"model: {model}" + (" (t = exp(i P u), SPEC 8)" if model == "exp" else ""))
    for label, value, unit in (("energy", data.energy, "J"), ("distance", data.distance, "m"),
                               ("pixel size", data.pixel_size, "m")):
        if value is not None:
            lines.append(f"{label}: {value:g} {unit}")
    return lines, []


def _mask_text(shape: tuple | None, masked: int) -> str:
    """The mask line of ``ptmpi info``: shape, kind and number of masked pixels."""
    if shape is None:
        return "none (every pixel valid)"
    m = shape[-1]
    if len(shape) == 2:
        return (f"{m} x {m}, one for all frames, {masked} masked pixel(s) "
                f"({100 * masked / (m * m):.2f}%)")
    return (f"{shape[0]} x {m} x {m}, one per angle, {masked} masked pixel(s) in all "
            f"({100 * masked / (shape[0] * m * m):.2f}%)")


def _scan_step_text(positions: np.ndarray) -> str:
    """Median nearest-neighbour spacing, and median step between consecutive frames.

    Both are given because they differ on raster and snake scans with unequal fast and
    slow steps (the tike Siemens star: about 66 px along a line, 9 px to the nearest
    neighbour).
    """
    if positions.shape[0] < 2:
        return "n/a (fewer than 2 frames at the first angle)"
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(positions).query(positions, k=2)
    nearest = float(np.median(dist[:, 1]))
    consecutive = float(np.median(np.linalg.norm(np.diff(positions, axis=0), axis=1)))
    return (f"about {nearest:.3g} px (median nearest-neighbour spacing at the first angle; "
            f"median step between consecutive frames {consecutive:.3g} px)")


# ---------------------------------------------------------------------------- output


def _output_info(name: str) -> tuple[list[str], list[str]]:
    lines = ["kind: output file (reconstruction, SPEC 4)"]
    problems = []
    try:
        with h5py.File(name, "r") as f:
            _describe_output(f, name, lines, problems)
    except Exception as exc:  # noqa: BLE001 - a damaged file may fail anywhere in a read
        problems.append(f"{name}: cannot be read completely ({one_line(exc)})")
    return lines, problems


def _describe_output(f: h5py.File, name: str, lines: list[str], problems: list[str]) -> None:
    vol = f[OUT_VOLUME]
    if not isinstance(vol, h5py.Dataset) or vol.ndim != 3:
        problems.append(f"{name}: {OUT_VOLUME}: expected a 3-D complex volume, found "
                        f"{getattr(vol, 'shape', 'a group')}")
    else:
        lines.append(f"volume: {vol.shape} {vol.dtype}")
    probe = f.get(OUT_PROBE)
    if not isinstance(probe, h5py.Dataset):
        problems.append(f"{name}: {OUT_PROBE}: required dataset (final probe) is missing")
    elif probe.ndim not in (2, 3) or probe.shape[-2] != probe.shape[-1]:
        problems.append(f"{name}: {OUT_PROBE}: expected a square (m, m) probe (or "
                        f"(K, m, m) probe modes), found {probe.shape}")
    else:
        lines.append(f"probe: {probe.shape} {probe.dtype}")

    proc = f.get(OUT_PROCESS)
    if proc is None:
        problems.append(f"{name}: {OUT_PROCESS}: required group (provenance) is missing")
    else:
        for key in ("program", "version", "date", "n_ranks", "input_file", "input_checksum",
                    "command"):
            if key in proc:
                lines.append(f"{key}: {_text(proc[key][()])}")
        if "parameters" in proc:
            text = _text(proc["parameters"][()])
            try:
                params = json.loads(text)
                text = ", ".join(f"{k}={v}" for k, v in params.items())
            except (ValueError, AttributeError):
                pass
            lines.append(f"parameters: {text}")

    shifts = f.get("entry_1/ptmpi/shifts_px")
    if isinstance(shifts, h5py.Dataset) and shifts.ndim == 2 and shifts.shape[1] == 2:
        values = np.asarray(shifts[()], dtype=np.float64)
        text = (f"shifts (--align): {values.shape[0]} angles, RMS {_rms(values):.3g} px, "
                f"largest {np.abs(values).max(initial=0):.3g} px")
        std = f.get("entry_1/ptmpi/shift_std_px")
        if isinstance(std, h5py.Dataset) and std.shape == values.shape:
            std = np.asarray(std[()], dtype=np.float64)
            text += (f"; Cramer-Rao standard error median {np.median(std):.3g} px, largest "
                     f"{std.max(initial=0):.3g} px")
        lines.append(text)

    grp = f.get(OUT_METRICS)
    if grp is None:
        problems.append(f"{name}: {OUT_METRICS}: required group (metrics history) is missing")
        return
    columns = {k: np.asarray(v[()]).reshape(-1) for k, v in grp.items()
               if isinstance(v, h5py.Dataset)}
    lengths = {k: v.size for k, v in columns.items()}
    if len(set(lengths.values())) > 1:
        problems.append(f"{name}: {OUT_METRICS}: expected columns of equal length, found "
                        + ", ".join(f"{k}={n}" for k, n in lengths.items()))
        return
    for key in ("iteration", "r_factor", "rel_change", "wall_s"):
        if key not in columns:
            problems.append(f"{name}: {OUT_METRICS}/{key}: required column is missing")
    n_rows = next(iter(lengths.values()), 0)
    lines.append(f"metrics: {n_rows} recorded iterations, columns {', '.join(columns)}")
    if n_rows:
        last = ", ".join(f"{k}={_number(v[-1])}" for k, v in columns.items())
        lines.append(f"last metrics: {last}")


# ---------------------------------------------------------------------------- helpers


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _number(value) -> str:
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _rms(v: np.ndarray) -> float:
    return float(np.sqrt(np.mean(v**2))) if v.size else 0.0


def _pair(v: np.ndarray) -> str:
    return f"({v[0]:+g}, {v[1]:+g})"


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    return f"{size:.1f} {unit}"
