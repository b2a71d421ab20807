"""Simulated ptycho-tomography datasets made through the solver's own operators.

``f_{j,t} = Poisson(eta |F(omega * S_j P_t u_true)|^2)`` (SPEC section 2), or the clean
intensities when ``eta`` is None. The probe is built with peak amplitude 1 (one photon per
pixel and unit exposure at the brightest probe pixel); a file stores it scaled by
``sqrt(eta)``, so the file's probe and counts are consistent.

With ``mask_stripe`` or ``hot_pixels`` the data get a detector mask (:mod:`ptmpi.sim.mask`)
and garbage counts at its pixels; the mask is drawn from its own random stream, so the
counts at valid pixels are those of the same simulation without a mask, bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from ptmpi.mask import valid_only
from ptmpi.operators.model import JointModel
from ptmpi.sim.mask import detector_mask, spoil_masked_counts
from ptmpi.sim.noise import poisson_counts
from ptmpi.sim.phantom import pure_phase_volume, shepp_logan_3d
from ptmpi.sim.presets import SimulationSettings, angles_deg
from ptmpi.sim.probe import focused_probe
from ptmpi.sim.scan import scan_positions_for_angles

logger = logging.getLogger(__name__)

# Second seed word of the mask's random stream (independent of the noise draws).
_MASK_STREAM = 0x6D61736B

# Angles simulated together: bounds the transient far-field memory of dense scans.
_ANGLE_BLOCK = 4


@dataclasses.dataclass
class SimulatedData:
    """Arrays of a simulated dataset, in the layout of SPEC section 3.

    ``counts`` are centered (zero frequency at ``[M//2, M//2]``), as a detector records them;
    so is ``mask`` (nonzero = invalid; None without detector defects).
    """

    counts: np.ndarray  # (N_FRAMES, M, M) float32
    probe: np.ndarray  # (M, M) complex64, scaled by sqrt(eta)
    positions_px: np.ndarray  # (N_FRAMES, 2) float64
    frame_offset: np.ndarray  # (N_ANGLES + 1,) int64
    angles_deg: np.ndarray  # (N_ANGLES,) float64
    volume: np.ndarray  # (nz, n, n) complex64 ground truth u
    snr_intensity_db: float  # SPEC 5; inf for noise-free data
    settings: SimulationSettings
    mask: np.ndarray | None = None  # (M, M) uint32, centered


def simulate(settings: SimulationSettings) -> SimulatedData:
    """Simulate the dataset described by ``settings`` (see :mod:`ptmpi.sim.presets`)."""
    s = settings
    rng = np.random.default_rng(s.seed)
    shape = (s.nz, s.n, s.n)
    u_true = pure_phase_volume(shepp_logan_3d(shape), s.phase_scale, dtype=np.complex64)
    probe = focused_probe(s.probe_size, s.fwhm).astype(np.complex64)
    positions, frame_offset = scan_positions_for_angles(
        (s.nz, s.n), s.probe_size, s.step, s.n_angles, jitter=s.jitter, rng=rng, scan=s.scan
    )
    theta_deg = angles_deg(s.n_angles)
    theta = np.deg2rad(theta_deg)
    mask = None
    if s.mask_stripe or s.hot_pixels:
        mask_rng = np.random.default_rng([s.seed, _MASK_STREAM])
        mask = detector_mask(s.probe_size, s.mask_stripe, s.hot_pixels, mask_rng)
    valid = None if mask is None else np.fft.ifftshift(mask == 0)
    counts = np.empty((int(frame_offset[-1]), s.probe_size, s.probe_size), dtype=np.float32)
    noise_sq = clean_sq = 0.0
    for a0 in range(0, s.n_angles, _ANGLE_BLOCK):
        a1 = min(a0 + _ANGLE_BLOCK, s.n_angles)
        f0, f1 = int(frame_offset[a0]), int(frame_offset[a1])
        model = JointModel(shape, theta[a0:a1], probe, positions[f0:f1],
                           frame_offset[a0 : a1 + 1] - f0, dtype=np.complex64)
        intensity = np.abs(model.fwd(u_true)) ** 2
        f = poisson_counts(intensity, s.eta, rng)
        if s.eta is not None:
            clean = valid_only(s.eta * intensity, valid)
            noise_sq += float(np.sum((valid_only(f, valid).astype(np.float64) - clean) ** 2))
            clean_sq += float(np.sum(clean.astype(np.float64) ** 2))
        counts[f0:f1] = np.fft.fftshift(f, axes=(-2, -1))
    if mask is not None:
        spoil_masked_counts(counts, mask)
    snr_int = math.inf if s.eta is None else -10 * math.log10(noise_sq / clean_sq)
    file_probe = probe if s.eta is None else (np.sqrt(s.eta) * probe).astype(np.complex64)
    return SimulatedData(
        counts=counts,
        probe=file_probe,
        positions_px=positions.astype(np.float64),
        frame_offset=frame_offset.astype(np.int64),
        angles_deg=theta_deg,
        volume=u_true,
        snr_intensity_db=snr_int,
        settings=settings,
        mask=mask,
    )
