"""Simulated ptycho-tomography datasets made through the solver's own operators.

``f_{j,t} = Poisson(eta |F(omega * S_j P_t u_true)|^2)`` (SPEC section 2), or the clean
intensities when ``eta`` is None. With ``model="exp"`` (SPEC 8) the far fields are
``F(omega * S_j exp(i P_t u_true))`` instead, with the volume of :func:`exp_volume`. The
probe is built with peak amplitude 1 (one photon per pixel and unit exposure at the
brightest probe pixel); a file stores it scaled by ``sqrt(eta)``, so the file's probe and
counts are consistent.

With ``drift`` the probe is guarded (:func:`~ptmpi.operators.ptycho.guard_probe`: zero
on its last row and column), as ``reconstruct --align`` models it: frames at drifted
positions are then continuous across whole pixels, as real data are (an unguarded probe,
Fourier-shifted over its periodic grid, makes them jump there). Drift-free data keep the
probe as designed.

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
from ptmpi.operators.ptycho import guard_probe
from ptmpi.operators.tomo import Projector
from ptmpi.operators.transmission import ExpModel
from ptmpi.sim.mask import detector_mask, spoil_masked_counts
from ptmpi.sim.noise import poisson_counts
from ptmpi.sim.phantom import pure_phase_volume, shepp_logan_3d
from ptmpi.sim.presets import DEFAULT_MAX_PHASE, SimulationSettings, angles_deg
from ptmpi.sim.probe import focused_probe
from ptmpi.sim.scan import scan_positions_for_angles

logger = logging.getLogger(__name__)

#: ``Im u / Re u`` of ``--model exp`` data (``beta / delta``): a weak attenuation, as in
#: hard X-rays, where the phase shift dominates.
EXP_ATTENUATION_RATIO = 0.02
#: Gaussian smoothing (voxels) of the phantom of ``--model exp`` data at 3 pi (more above).
EXP_BLUR_VOXELS = 1.5
# Second seed word of the mask's random stream (independent of the noise draws).
_MASK_STREAM = 0x6D61736B
# ... and of the drift's (the other draws stay those of the drift-free dataset).
_DRIFT_STREAM = 0x64726966

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
    shifts_px: np.ndarray | None = None  # (N_ANGLES, 2) true minus recorded positions
    true_probe: np.ndarray | None = None  # (M, M) the probe of the data, when probe != it


def exp_volume(phi: np.ndarray, theta: np.ndarray, max_phase: float) -> np.ndarray:
    """Volume ``u = c (1 + i EXP_ATTENUATION_RATIO) blur(phi)`` of the exp model (SPEC 8).

    ``phi`` is smoothed by a Gaussian of ``EXP_BLUR_VOXELS * max(1, max_phase / 3 pi)``
    voxels, so that neighbouring projection pixels differ by less than pi in phase (the
    Shepp-Logan skull cap, sharp, would make jumps of nearly ``max_phase`` between two
    rows, which no measurement samples); ``c`` then makes the largest projected phase
    ``max Re(P_t u)`` over the angles ``theta`` (radians) equal ``max_phase``; the
    attenuation is proportional to the phase. Returns ``(nz, n, n)`` complex64; voxels far
    from the phantom are 0 (empty space).
    """
    from scipy.ndimage import gaussian_filter

    sigma = EXP_BLUR_VOXELS * max(1.0, max_phase / (3 * math.pi))
    phi = gaussian_filter(np.asarray(phi, dtype=np.float64), sigma, mode="constant")
    phi[np.abs(phi) < 1e-6 * np.abs(phi).max(initial=0)] = 0.0
    peak = float(Projector(phi.shape, theta, dtype=np.complex128).fwd(
        phi.astype(np.complex128)).real.max())
    if peak <= 0:
        raise ValueError("exp_volume: the phantom has no positive projection")
    scale = max_phase / peak
    return (scale * phi * (1 + 1j * EXP_ATTENUATION_RATIO)).astype(np.complex64)


def simulate(settings: SimulationSettings) -> SimulatedData:
    """Simulate the dataset described by ``settings`` (see :mod:`ptmpi.sim.presets`)."""
    s = settings
    rng = np.random.default_rng(s.seed)
    shape = (s.nz, s.n, s.n)
    exp = s.model == "exp"
    probe = focused_probe(s.probe_size, s.fwhm).astype(np.complex64)
    if s.drift > 0:
        probe = guard_probe(probe)
    positions, frame_offset = scan_positions_for_angles(
        (s.nz, s.n), s.probe_size, s.step, s.n_angles, jitter=s.jitter, rng=rng, scan=s.scan
    )
    theta_deg = angles_deg(s.n_angles)
    theta = np.deg2rad(theta_deg)
    shifts = None
    true_positions = positions
    if s.drift > 0:
        drift_rng = np.random.default_rng([s.seed, _DRIFT_STREAM])
        shifts = drift_rng.uniform(-s.drift, s.drift, size=(s.n_angles, 2))
        angle_of_frame = np.repeat(np.arange(s.n_angles), np.diff(frame_offset))
        true_positions = positions + shifts[angle_of_frame]
    if exp:
        max_phase = s.max_phase if s.max_phase is not None else DEFAULT_MAX_PHASE
        u_true = exp_volume(shepp_logan_3d(shape), theta, max_phase)
    else:
        u_true = pure_phase_volume(shepp_logan_3d(shape), s.phase_scale, dtype=np.complex64)
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
        model = (ExpModel if exp else JointModel)(
            shape, theta[a0:a1], probe, true_positions[f0:f1], frame_offset[a0 : a1 + 1] - f0,
            dtype=np.complex64)
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
    scale = 1.0 if s.eta is None else np.sqrt(s.eta)
    true_probe = (scale * probe).astype(np.complex64)
    file_probe = true_probe
    if s.probe_defocus > 0:
        file_probe = defocus(true_probe, s.probe_defocus)
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
        shifts_px=shifts,
        true_probe=true_probe if s.probe_defocus > 0 else None,
    )


def defocus(probe: np.ndarray, radians: float) -> np.ndarray:
    """``probe`` propagated by a quadratic phase in its Fourier domain, ``radians`` at the
    edge of the grid (|k| = 1/2 cycle per pixel along an axis): a defocused probe, same
    power, same dtype."""
    m = probe.shape[-1]
    k = np.fft.fftfreq(m)
    k2 = (k[:, None] ** 2 + k[None, :] ** 2) / 0.25
    spectrum = np.fft.fft2(np.fft.ifftshift(probe)) * np.exp(1j * radians * k2)
    return np.fft.fftshift(np.fft.ifft2(spectrum)).astype(probe.dtype)
