"""Simulated datasets written to files (``ptmpi simulate``, ``ptmpi demo``, ``ptmpi paper``)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from ptmpi.errors import UserError

logger = logging.getLogger(__name__)


def is_demo_file(path: Path) -> bool:
    """True when ``path`` is an HDF5 file an earlier ``ptmpi demo`` wrote."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return bool(f.attrs.get("ptmpi_demo", False))
    except OSError:
        return False


def simulate_to_file(settings, path: Path, force: bool, demo: bool = False,
                     export_cxi: Path | None = None) -> None:
    """Simulate ``settings`` and write the SPEC 3 file ``path`` (with ``truth/``).

    An existing ``path`` is replaced only with ``force``, or when ``demo`` is set and the
    file is one an earlier demo wrote: nothing a user wrote is overwritten silently.
    ``export_cxi`` also writes the data as per-angle CXI files (SPEC 8) into that folder.
    """
    force = force or (demo and path.exists() and is_demo_file(path))
    from ptmpi.io.cxi import write_input
    from ptmpi.sim.simulate import simulate

    if path.exists() and not force:
        raise UserError(f"{path}: output exists; pass --force to overwrite it")
    if export_cxi is not None:
        from ptmpi.io.per_angle import per_angle_names

        if export_cxi.exists() and not export_cxi.is_dir():
            raise UserError(f"{export_cxi}: --export-cxi expects a folder, found a file")
        for name in per_angle_names(settings.n_angles):
            if (export_cxi / name).exists() and not force:
                raise UserError(f"{export_cxi / name}: exists; pass --force to overwrite it")
    t0 = time.perf_counter()
    data = simulate(settings)
    try:
        write_input(
            path,
            counts=data.counts,
            probe=data.probe,
            positions_px=data.positions_px,
            frame_offset=data.frame_offset,
            angles_deg=data.angles_deg,
            volume_shape=data.volume.shape,
            truth_volume=data.volume,
            truth_probe=data.probe if data.true_probe is None else data.true_probe,
            truth_shifts_px=data.shifts_px,
            mask=data.mask,
            overwrite=force,
            attrs={
                "simulation": json.dumps(settings.to_dict()),
                "snr_intensity_db": data.snr_intensity_db,
                "model": settings.model,
            },
            root_attrs={"ptmpi_demo": 1} if demo else None,
        )
    except (FileExistsError, OSError) as exc:
        raise UserError(f"{path}: cannot write ({exc})") from exc
    if export_cxi is not None:
        from ptmpi.io.per_angle import write_per_angle_cxi

        try:
            write_per_angle_cxi(export_cxi, counts=data.counts, probe=data.probe,
                                positions_px=data.positions_px, frame_offset=data.frame_offset,
                                angles_deg=data.angles_deg, volume_shape=data.volume.shape,
                                mask=data.mask, overwrite=force)
        except (FileExistsError, OSError) as exc:
            raise UserError(f"{export_cxi}: cannot write ({exc})") from exc
        logger.info("wrote %d per-angle CXI files to %s", settings.n_angles, export_cxi)
    snr = "noise-free" if math.isinf(data.snr_intensity_db) else (
        f"SNR_intensity {data.snr_intensity_db:.1f} dB")
    logger.info(
        "simulated %s: volume %s, %d angles, %d frames of %dx%d, %s, %.1f s",
        path, data.volume.shape, settings.n_angles, data.counts.shape[0],
        settings.probe_size, settings.probe_size, snr, time.perf_counter() - t0,
    )
