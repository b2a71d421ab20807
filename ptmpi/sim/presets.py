"""Simulation settings and the named presets of the paper's experiments.

The paper (Chang, Enfedaque & Marchesini, ICIP 2019, Tables 1 and 2) reconstructs a 128^3
pure-phase Shepp-Logan phantom from a 64 x 64 probe of amplitude FWHM 14 px on a raster
grid at every angle in [0, pi). Each preset pins one of its cases; ``demo`` is a small case
that runs in seconds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ptmpi.sim.mask import max_stripe
from ptmpi.sim.phantom import DEFAULT_PHASE_SCALE

#: Forward models (SPEC 8): the paper's linear model and the projection approximation.
MODELS = ("linear", "exp")
#: Default largest projected phase of ``--model exp`` data (radians): a thick sample.
DEFAULT_MAX_PHASE = 3 * math.pi


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: object) -> bool:
    return _is_int(value) or isinstance(value, (float, np.floating))


@dataclasses.dataclass(frozen=True)
class SimulationSettings:
    """Everything that determines a simulated dataset (with ``seed``, bit for bit).

    Defaults are the paper's base case, the preset ``paper-s32-a12``. Invalid values raise
    ``ValueError`` on construction (also through ``dataclasses.replace``).
    """

    n: int = 128
    """Volume width ``n`` in voxels (axes y and x); projections are ``nz x n`` pixels."""
    nz: int = 128
    """Volume height ``nz`` in voxels along z, the rotation axis."""
    n_angles: int = 12
    """Number of rotation angles, ``k * 180 / n_angles`` degrees for ``k = 0 .. n_angles-1``."""
    step: int = 32
    """Scan step in pixels between neighbouring probe positions (both axes)."""
    probe_size: int = 64
    """Probe window size ``M`` in pixels (``M x M``); at most ``n`` and ``nz``."""
    fwhm: float = 14.0
    """Amplitude FWHM of the probe in pixels, in ``(1, probe_size / 2]``."""
    eta: float | None = None
    """Photon scale of the Poisson noise (counts per unit intensity); None = noise-free."""
    seed: int = 0
    """Seed of the ``numpy.random.Generator`` that draws the jitter and the noise."""
    phase_scale: float = DEFAULT_PHASE_SCALE
    """Radians of phase per unit phantom value: ``u = exp(i phase_scale phi)``."""
    jitter: float = 0.0
    """Half-width in pixels of the uniform scan-position jitter (sub-pixel, not rounded)."""
    scan: str = "grid"
    """Scan pattern: ``grid`` (raster) or ``spiral`` (Fermat spiral, ``step`` = mean
    spacing, rotated and offset at random at every angle); see :mod:`ptmpi.sim.scan`."""
    drift: float = 0.0
    """Sample drift: half-width in pixels of a uniform random shift ``(row, col)`` per angle
    of the true scan positions of all its frames; the file records the positions without
    it and ``ptmpi/truth/shifts_px`` the shifts (true minus recorded, SPEC 8). The probe of
    drift data is guarded (zero on its last row and column, :mod:`ptmpi.sim.simulate`)."""
    probe_defocus: float = 0.0
    """Wrong starting probe: the file's probe is the true one defocused, a quadratic phase of
    this many radians at the edge of its Fourier grid (``ptmpi/truth/probe`` keeps the true
    probe)."""
    mask_stripe: int = 0
    """Dead detector columns (a stripe right of the central column, counts 0), masked."""
    hot_pixels: int = 0
    """Random hot detector pixels (counts 4e9 in every frame), masked."""
    model: str = "linear"
    """Forward model: ``linear`` (the paper's, ``u = exp(i phase_scale phi)`` per voxel) or
    ``exp`` (SPEC 8, ``t = exp(i P u)``, the phantom scaled to ``max_phase``)."""
    max_phase: float | None = None
    """``exp`` model only: the largest projected phase ``max Re(P u)`` over the simulated
    angles, in radians (default ``DEFAULT_MAX_PHASE`` = 3 pi)."""

    def __post_init__(self) -> None:
        def fail(what: str) -> None:
            raise ValueError(f"SimulationSettings: {what}")

        for name in ("n", "nz", "n_angles", "step", "probe_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                fail(f"{name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name in ("mask_stripe", "hot_pixels"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                fail(f"{name} must be a non-negative integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if not _is_int(self.seed) or self.seed < 0:
            fail(f"seed must be a non-negative integer, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))
        for name in ("fwhm", "phase_scale", "jitter"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                fail(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.probe_size > min(self.n, self.nz):
            fail(
                f"probe_size must be <= n and <= nz, got probe_size={self.probe_size} "
                f"with n={self.n}, nz={self.nz}"
            )
        if not 1.0 < self.fwhm <= self.probe_size / 2:
            fail(
                f"fwhm must be in (1, probe_size/2] = (1, {self.probe_size / 2:g}] pixels, "
                f"got {self.fwhm:g}"
            )
        if self.eta is not None:
            if not _is_real(self.eta) or not (math.isfinite(self.eta) and self.eta > 0):
                fail(f"eta must be None (noise-free) or a finite number > 0, got {self.eta!r}")
            object.__setattr__(self, "eta", float(self.eta))
        if self.jitter < 0:
            fail(f"jitter must be >= 0 pixels, got {self.jitter:g}")
        if self.mask_stripe > max_stripe(self.probe_size):
            fail(f"mask_stripe must be at most {max_stripe(self.probe_size)} columns for "
                 f"probe_size {self.probe_size}, got {self.mask_stripe}")
        if self.hot_pixels > self.probe_size**2 // 4:
            fail(f"hot_pixels must be at most {self.probe_size**2 // 4} (a quarter of the "
                 f"detector) for probe_size {self.probe_size}, got {self.hot_pixels}")
        for name in ("drift", "probe_defocus"):
            value = getattr(self, name)
            if not _is_real(value) or not (math.isfinite(value) and value >= 0):
                fail(f"{name} must be a finite number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.scan not in ("grid", "spiral"):
            fail(f"scan must be 'grid' or 'spiral', got {self.scan!r}")
        if self.model not in MODELS:
            fail(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if self.max_phase is not None:
            if self.model != "exp":
                fail("max_phase applies to the exp model only (--model exp)")
            if not _is_real(self.max_phase) or not (math.isfinite(self.max_phase)
                                                    and self.max_phase > 0):
                fail(f"max_phase must be a finite number > 0 radians, got {self.max_phase!r}")
            object.__setattr__(self, "max_phase", float(self.max_phase))

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python field values (JSON-serialisable; ``eta`` may be None)."""
        return dataclasses.asdict(self)


def angles_deg(n_angles: int) -> NDArray[np.float64]:
    """The ``n_angles`` angles ``k * 180 / n_angles`` degrees, ``k = 0 .. n_angles-1``.

    Returns
    -------
    angles : (N_ANGLES,) float64
        Degrees in ``[0, 180)`` (SPEC section 6, ``--angles``).
    """
    if not _is_int(n_angles) or n_angles < 1:
        raise ValueError(f"angles_deg: n_angles must be a positive integer, got {n_angles!r}")
    return np.arange(int(n_angles), dtype=np.float64) * (180.0 / int(n_angles))


_PAPER = SimulationSettings(
    n=128, nz=128, n_angles=12, step=32, probe_size=64, fwhm=14.0, eta=None, seed=0,
    phase_scale=DEFAULT_PHASE_SCALE, jitter=0.0,
)

PRESETS: dict[str, SimulationSettings] = {
    # Table 1 of the paper (noise-free): scan step x number of angles.
    "paper-s32-a12": _PAPER,
    "paper-s32-a48": dataclasses.replace(_PAPER, n_angles=48),
    "paper-s4-a12": dataclasses.replace(_PAPER, step=4),
    # Table 2 of the paper: step 32, 12 angles, Poisson noise.
    "paper-s32-a12-eta1": dataclasses.replace(_PAPER, eta=1.0),
    "paper-s32-a12-eta0.1": dataclasses.replace(_PAPER, eta=0.1),
    # Small and fast: the ``ptmpi demo`` case.
    "demo": SimulationSettings(
        n=32, nz=32, n_angles=8, step=8, probe_size=16, fwhm=4.0, eta=None, seed=0,
        phase_scale=DEFAULT_PHASE_SCALE, jitter=0.0,
    ),
}
"""Named settings for ``ptmpi simulate --preset NAME``."""
