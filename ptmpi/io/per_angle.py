"""The per-angle CXI layout of SPEC 8: dataset paths, the position convention, a writer.

A measurement arrives as one CXI file per rotation angle (the layout ptychodus reads and
writes): counts ``(F, m, m)`` centered, an optional detector mask, the geometry (energy,
detector distance and pixel size), the scan translations in metres and the rotation angle.
:mod:`ptmpi.io.importer` reads such files into one SPEC 3 file;
:func:`write_per_angle_cxi` writes them from SPEC 3 arrays (a simulated dataset), with the
inverse conversion, for tests and for trying the import on known data.

Position convention (SPEC 8)
----------------------------
The object pixel is ``lambda * distance / (m * x_pixel_size)`` with
``lambda = h c / energy``. A translation ``(x, y)`` is the position of the probe's centre
pixel (index ``m // 2``) in metres: ``x`` along detector columns (the volume's x at
``theta = 0``), ``y`` along the rotation axis (the volume's z), ``(0, 0)`` the centre of the
``(nz, n)`` projection image, whose centre lies at ``((nz - 1) / 2, (n - 1) / 2)`` (SPEC 1).
With the optional conventions of real beamlines (``flip_x``, ``flip_y``: the sign of x or
y; ``axis_offset_px``: the rotation axis passes through ``x = axis_offset_px`` object pixels
instead of ``x = 0``) the window corner is::

    dx = (-1 if flip_x else 1) * x / pixel - axis_offset_px
    dy = (-1 if flip_y else 1) * y / pixel
    row = (nz - 1) / 2 + dy - m // 2
    col = (n - 1) / 2 + dx - m // 2

kept as floats (sub-pixel values are never rounded).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path

import h5py
import numpy as np

logger = logging.getLogger(__name__)

PLANCK = 6.62607015e-34  # J s (exact, SI 2019)
SPEED_OF_LIGHT = 299792458.0  # m / s (exact)
ELECTRONVOLT = 1.602176634e-19  # J (exact)

# Per-angle CXI layout (SPEC 8).
CXI_DATA = "/entry_1/instrument_1/detector_1/data"
CXI_MASK = "/entry_1/instrument_1/detector_1/mask"
CXI_DISTANCE = "/entry_1/instrument_1/detector_1/distance"
CXI_X_PIXEL_SIZE = "/entry_1/instrument_1/detector_1/x_pixel_size"
CXI_Y_PIXEL_SIZE = "/entry_1/instrument_1/detector_1/y_pixel_size"
CXI_ENERGY = "/entry_1/instrument_1/source_1/energy"
CXI_ILLUMINATION = "/entry_1/instrument_1/source_1/illumination"
CXI_TRANSLATIONS = ("/entry_1/sample_1/geometry_1/translation", "/entry_1/data_1/translation")
CXI_ANGLE = "/entry_1/ptychodus/tomography_angle_deg"

#: Physical constants of :func:`write_per_angle_cxi` unless given: 10 keV photons, a
#: detector 2 m downstream with 75 um pixels (a common hybrid-pixel detector pitch).
DEFAULT_ENERGY_J = 10e3 * ELECTRONVOLT
DEFAULT_DISTANCE_M = 2.0
DEFAULT_PIXEL_SIZE_M = 75e-6


@dataclasses.dataclass(frozen=True)
class Conventions:
    """How a beamline's translations map onto SPEC 8 (all off: SPEC 8 as written)."""

    flip_x: bool = False
    """Negate x (the detector-column coordinate) before converting."""
    flip_y: bool = False
    """Negate y (the rotation-axis coordinate) before converting."""
    axis_offset_px: float = 0.0
    """The rotation axis passes through ``x = axis_offset_px`` object pixels (after the
    flip), not ``x = 0``; positions move by ``-axis_offset_px`` columns so that the axis
    lands on the centre of the projection image."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.axis_offset_px):
            raise ValueError(f"axis offset: expected a finite number of pixels, found "
                             f"{self.axis_offset_px}")


# ---------------------------------------------------------------------------- geometry


def wavelength(energy: float) -> float:
    """Photon wavelength ``h c / energy`` in metres for ``energy`` in joules."""
    return PLANCK * SPEED_OF_LIGHT / energy


def object_pixel_size(energy: float, distance: float, m: int, pixel_size: float) -> float:
    """Object pixel ``lambda * distance / (m * pixel_size)`` in metres (SPEC 8)."""
    return wavelength(energy) * distance / (m * pixel_size)


def translation_to_positions(translation: np.ndarray, pixel: float, m: int,
                             image_shape: tuple[int, int],
                             conventions: Conventions = Conventions()) -> np.ndarray:
    """Window corners ``(row, col)`` of SPEC 2 from SPEC 8 translations.

    Parameters
    ----------
    translation : (N_FRAMES, 2) float
        ``(x, y)`` of the probe's centre pixel in metres.
    pixel : float
        Object pixel size in metres.
    m : int
        Window size.
    image_shape : (nz, n)
        The projection image.
    conventions : Conventions
        Sign flips and rotation-axis offset.

    Returns
    -------
    (N_FRAMES, 2) float64
        Unrounded corners; see the module docstring for the formula.
    """
    dy, dx = centre_offsets(translation, pixel, conventions)
    nz, n = image_shape
    return np.stack([(nz - 1) / 2 + dy - m // 2, (n - 1) / 2 + dx - m // 2], axis=1)


def centre_offsets(translation: np.ndarray, pixel: float,
                   conventions: Conventions = Conventions()) -> tuple[np.ndarray, np.ndarray]:
    """``(dy, dx)``: each probe centre's offset from the image centre, in object pixels."""
    t = np.asarray(translation, dtype=np.float64).reshape(-1, 2)
    dx = (-1.0 if conventions.flip_x else 1.0) * t[:, 0] / pixel - conventions.axis_offset_px
    dy = (-1.0 if conventions.flip_y else 1.0) * t[:, 1] / pixel
    return dy, dx


def positions_to_translation(positions_px: np.ndarray, pixel: float, m: int,
                             image_shape: tuple[int, int]) -> np.ndarray:
    """(N_FRAMES, 3) float64 translations ``(x, y, 0)`` in metres: the inverse of
    :func:`translation_to_positions` with no flips and no axis offset."""
    p = np.asarray(positions_px, dtype=np.float64).reshape(-1, 2)
    nz, n = image_shape
    x = (p[:, 1] + m // 2 - (n - 1) / 2) * pixel
    y = (p[:, 0] + m // 2 - (nz - 1) / 2) * pixel
    return np.stack([x, y, np.zeros_like(x)], axis=1)


def derive_volume_shape(dy: np.ndarray, dx: np.ndarray, m: int,
                        margin: int = 0) -> tuple[int, int, int]:
    """The smallest ``(nz, n, n)`` whose projection image holds every window whole.

    With the image centre at ``(L - 1) / 2``, a window whose centre pixel is ``d`` pixels
    from it lies inside ``[0, L)`` when ``L >= 2 (m//2 - d) + 1`` and
    ``L >= 2 (d + m - m//2) - 1``; ``L`` is the smallest integer meeting both for every
    frame (and at least ``m``, SPEC 2), plus ``2 margin``. The rotation axis stays at the
    centre, so the image grows on both sides alike.
    """

    def length(d: np.ndarray) -> int:
        need = max(2 * (m // 2 - float(d.min())) + 1, 2 * (float(d.max()) + m - m // 2) - 1)
        # Ignore float noise of a few ulps (translations in metres divided by the pixel).
        return max(m, math.ceil(need - 1e-6)) + 2 * margin

    if dx.size == 0:
        raise ValueError("no frames: the volume shape cannot be derived from the positions")
    nz, n = length(dy), length(dx)
    return nz, n, n


# ---------------------------------------------------------------------------- writing


def per_angle_names(n_angles: int) -> list[str]:
    """File names ``angle-000.cxi, ...`` (zero-padded so that sorting keeps angle order)."""
    width = max(3, len(str(max(n_angles - 1, 0))))
    return [f"angle-{a:0{width}d}.cxi" for a in range(n_angles)]


def write_per_angle_cxi(
    directory: str | os.PathLike,
    *,
    counts: np.ndarray,
    probe: np.ndarray,
    positions_px: np.ndarray,
    frame_offset: np.ndarray,
    angles_deg: np.ndarray,
    volume_shape: tuple[int, int, int],
    energy: float = DEFAULT_ENERGY_J,
    distance: float = DEFAULT_DISTANCE_M,
    pixel_size: float = DEFAULT_PIXEL_SIZE_M,
    mask: np.ndarray | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write one SPEC 8 CXI file per angle (``DIR/angle-000.cxi``, ...) from SPEC 3 arrays.

    Parameters
    ----------
    directory : str or PathLike
        Created if missing.
    counts : (N_FRAMES, m, m) real
        Centered counts (zero frequency at ``m // 2``), stored as float32.
    probe : (m, m) complex
        Written as each file's ``illumination``.
    positions_px : (N_FRAMES, 2) float
        SPEC 2 window corners; written as translations in metres by
        :func:`positions_to_translation` (the inverse of the import's conversion).
    frame_offset : (N_ANGLES + 1,) int
    angles_deg : (N_ANGLES,) float
    volume_shape : (nz, n, n)
        The image the positions refer to.
    energy, distance, pixel_size : float
        Photon energy (J), detector distance (m), detector pixel size (m, square pixels).
    mask : (m, m) or (N_ANGLES, m, m) integer, optional
        Centered detector mask, nonzero = invalid, stored as uint32.
    overwrite : bool
        Replace existing files; without it an existing one raises FileExistsError before
        anything is written.

    Returns
    -------
    list of Path
        The files written, in angle order.
    """
    directory = Path(directory)
    frame_offset = np.asarray(frame_offset, dtype=np.int64)
    angles_deg = np.asarray(angles_deg, dtype=np.float64).reshape(-1)
    n_angles = angles_deg.size
    m = counts.shape[-1]
    if frame_offset.shape != (n_angles + 1,) or frame_offset[-1] != counts.shape[0]:
        raise ValueError(f"frame_offset: expected {n_angles + 1} offsets ending at "
                         f"{counts.shape[0]}, found {frame_offset.tolist()}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape not in ((m, m), (n_angles, m, m)):
            raise ValueError(f"mask: expected shape ({m}, {m}) or ({n_angles}, {m}, {m}), "
                             f"found {mask.shape}")
    targets = [directory / name for name in per_angle_names(n_angles)]
    if not overwrite:
        for t in targets:
            if t.exists():
                raise FileExistsError(f"{t}: file exists; pass --force to overwrite it")
    directory.mkdir(parents=True, exist_ok=True)
    pixel = object_pixel_size(energy, distance, m, pixel_size)
    translation = positions_to_translation(positions_px, pixel, m,
                                           (volume_shape[0], volume_shape[2]))
    for a, target in enumerate(targets):
        f0, f1 = int(frame_offset[a]), int(frame_offset[a + 1])
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with h5py.File(tmp, "w") as f:
                f["cxi_version"] = np.int64(160)
                f.create_group("entry_1").attrs["NX_class"] = "NXentry"
                data = f.create_dataset(CXI_DATA, data=np.asarray(counts[f0:f1], np.float32),
                                        chunks=(1, m, m) if f1 > f0 else None)
                data.attrs["units"] = "counts"
                for name, value, unit in ((CXI_DISTANCE, distance, "m"),
                                          (CXI_X_PIXEL_SIZE, pixel_size, "m"),
                                          (CXI_Y_PIXEL_SIZE, pixel_size, "m"),
                                          (CXI_ENERGY, energy, "J")):
                    f[name] = np.float64(value)
                    f[name].attrs["units"] = unit
                f[CXI_ILLUMINATION] = np.asarray(probe, dtype=np.complex64)
                if mask is not None:
                    f[CXI_MASK] = (mask if mask.ndim == 2 else mask[a]).astype(np.uint32)
                f[CXI_TRANSLATIONS[0]] = translation[f0:f1]
                f[CXI_TRANSLATIONS[0]].attrs["units"] = "m"
                f[CXI_ANGLE] = np.float64(angles_deg[a])
                f[CXI_ANGLE].attrs["units"] = "deg"
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
    logger.debug("wrote %d per-angle CXI files to %s (object pixel %.4g m)", n_angles,
                 directory, pixel)
    return targets
