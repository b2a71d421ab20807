"""3-D modified Shepp-Logan phantom and the pure-phase sample made from it.

The paper's sample (Chang, Enfedaque & Marchesini, ICIP 2019, Fig. 1) is a 128^3 3-D
Shepp-Logan phantom used as a pure-phase object: ``u = exp(i c phi)`` per voxel. This module
builds ``phi`` (:func:`shepp_logan_3d`) and ``u`` (:func:`pure_phase_volume`).
"""

from __future__ import annotations

import logging

import numpy as np
from numpy.typing import DTypeLike, NDArray

logger = logging.getLogger(__name__)

DEFAULT_PHASE_SCALE = 1.0
"""Radians of phase per unit phantom value: the skull (value 1) delays the wave by 1 rad."""

# The ten ellipsoids of the 3-D *modified* Shepp-Logan head phantom. The geometry goes back to
# Shepp & Logan (1974) and its 3-D extension in Kak & Slaney, "Principles of Computerized
# Tomographic Imaging" (1988); the intensities are the higher-contrast "modified" ones of
# Toft, "The Radon transform" (1996, pp. 199-200), as tabulated in the widely used 3-D
# modified table. Columns:
#   value, semi-axes (a, b, c) along the ellipsoid's own (x, y, z), centre (x0, y0, z0),
#   Euler angles (phi, theta, psi) in degrees, z-x-z convention (see _euler_zxz).
# Each ellipsoid rotates about its own centre, which therefore sits exactly at (x0, y0, z0).
# (Some popular implementations rotate about the origin instead, which moves the two rotated
# ventricles by about 0.03.) With theta = 0, phi and psi add up: the ventricles lean by -8
# and +28 degrees, and the larger one just reaches the midline x = 0.
# All lengths are in units of the half-width of the volume (coordinates in [-1, 1]).
_MODIFIED_SHEPP_LOGAN_3D: tuple[tuple[float, ...], ...] = (
    # value   a       b      c      x0     y0      z0    phi  theta  psi
    (1.0,   0.6900, 0.920, 0.810,  0.00,  0.0000,  0.00,   0.0, 0.0,  0.0),
    (-0.8,  0.6624, 0.874, 0.780,  0.00, -0.0184,  0.00,   0.0, 0.0,  0.0),
    (-0.2,  0.1100, 0.310, 0.220,  0.22,  0.0000,  0.00, -18.0, 0.0, 10.0),
    (-0.2,  0.1600, 0.410, 0.280, -0.22,  0.0000,  0.00,  18.0, 0.0, 10.0),
    (0.1,   0.2100, 0.250, 0.410,  0.00,  0.3500, -0.15,   0.0, 0.0,  0.0),
    (0.1,   0.0460, 0.046, 0.050,  0.00,  0.1000,  0.25,   0.0, 0.0,  0.0),
    (0.1,   0.0460, 0.046, 0.050,  0.00, -0.1000,  0.25,   0.0, 0.0,  0.0),
    (0.1,   0.0460, 0.023, 0.050, -0.08, -0.6050,  0.00,   0.0, 0.0,  0.0),
    (0.1,   0.0230, 0.023, 0.020,  0.00, -0.6060,  0.00,   0.0, 0.0,  0.0),
    (0.1,   0.0230, 0.046, 0.020,  0.06, -0.6050,  0.00,   0.0, 0.0,  0.0),
)  # fmt: skip


def _euler_zxz(phi: float, theta: float, psi: float) -> NDArray[np.float64]:
    """Rotation taking volume coordinates (x, y, z) into an ellipsoid's own frame.

    ``A = Rz(psi) @ Rx(theta) @ Rz(phi)`` with the passive (frame) rotations
    ``Rz(a) = [[cos a, sin a, 0], [-sin a, cos a, 0], [0, 0, 1]]`` and likewise ``Rx``;
    angles in radians. Returns a (3, 3) float64 orthogonal matrix.
    """

    def rz(a: float) -> NDArray[np.float64]:
        c, s = np.cos(a), np.sin(a)
        return np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])

    def rx(a: float) -> NDArray[np.float64]:
        c, s = np.cos(a), np.sin(a)
        return np.array([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]])

    return rz(psi) @ rx(theta) @ rz(phi)


def _centres(n: int) -> NDArray[np.float64]:
    """Normalised coordinates of the ``n`` voxel centres of one axis, in (-1, 1)."""
    return (np.arange(n) - (n - 1) / 2) * (2.0 / n)


def shepp_logan_3d(
    shape: tuple[int, int, int], dtype: DTypeLike = np.float32
) -> NDArray[np.floating]:
    """Sample the 3-D modified Shepp-Logan phantom on a voxel grid.

    Parameters
    ----------
    shape : tuple of 3 int
        ``(nz, ny, nx)``; axis 0 is z (the rotation axis), axis 1 is y, axis 2 is x.
    dtype : real dtype, optional
        Output dtype (default float32).

    Returns
    -------
    phi : (NZ, NY, NX) ndarray of ``dtype``
        Phantom values: 0 outside the head, 1 in the skull, 0.2 in the brain, 0 in the two
        ventricles, 0.3 in the small features. The maximum is 1.0 whenever the grid resolves
        the skull (it does from 16 voxels per axis up).

    Notes
    -----
    Voxel ``k`` of an axis of length ``N`` sits at ``t = (k - (N-1)/2) * 2/N`` (the SPEC
    section 1 centre ``k - (N-1)/2`` scaled by ``2/N``), so the voxel *faces* span exactly
    ``[-1, 1]`` and the centres lie in ``(-1, 1)``. Each axis is normalised separately, so a
    non-cubic grid stretches the head. Table coordinates map to axes as ``x -> 2``,
    ``y -> 1``, ``z -> 0``; a voxel belongs to an ellipsoid when its centre lies inside
    (point sampling, no partial-volume averaging). Slice ``phi[nz // 2]`` is the familiar
    2-D phantom, upright when shown with ``imshow(..., origin="lower")`` (table ``y`` grows
    with the row index).

    The table is typed from the 3-D modified Shepp-Logan phantom (Shepp & Logan 1974;
    Kak & Slaney 1988, 3-D extension; Toft 1996 contrast). Ellipsoids are evaluated only
    inside their bounding boxes, so a 128^3 grid takes a fraction of a second.
    """
    if len(shape) != 3 or any(int(s) != s or s < 1 for s in shape):
        raise ValueError(f"shepp_logan_3d: shape must be 3 positive integers, got {shape!r}")
    nz, ny, nx = (int(s) for s in shape)
    z, y, x = _centres(nz), _centres(ny), _centres(nx)
    # Accumulate in float64: the tenths of the table then add up to exact-looking values
    # (see the rounding below) before the cast to the requested dtype.
    acc = np.zeros((nz, ny, nx), dtype=np.float64)
    for value, a, b, c, x0, y0, z0, phi, theta, psi in _MODIFIED_SHEPP_LOGAN_3D:
        rot = _euler_zxz(*np.deg2rad([phi, theta, psi]))
        semi = np.array([a, b, c])
        # Half-extent of the rotated ellipsoid along volume axis i: ||diag(semi) @ rot[:, i]||.
        half = np.sqrt(((semi[:, None] * rot) ** 2).sum(axis=0))
        box = []
        for coords, centre, h in ((x, x0, half[0]), (y, y0, half[1]), (z, z0, half[2])):
            lo = np.searchsorted(coords, centre - h, side="left")
            hi = np.searchsorted(coords, centre + h, side="right")
            box.append(slice(int(lo), int(hi)))
        sx, sy, sz = box
        if sx.start >= sx.stop or sy.start >= sy.stop or sz.start >= sz.stop:
            continue  # the ellipsoid falls between voxel centres on this grid
        # Open grids relative to the centre, broadcast to the (z, y, x) box.
        dx = (x[sx] - x0)[None, None, :]
        dy = (y[sy] - y0)[None, :, None]
        dz = (z[sz] - z0)[:, None, None]
        q2 = np.zeros((sz.stop - sz.start, sy.stop - sy.start, sx.stop - sx.start))
        for j in range(3):
            q2 += ((rot[j, 0] * dx + rot[j, 1] * dy + rot[j, 2] * dz) / semi[j]) ** 2
        acc[sz, sy, sx] += np.where(q2 <= 1.0, value, 0.0)
    # 1 - 0.8 - 0.2 is -5.6e-17 in binary floating point; rounding makes the ventricles and
    # background exactly 0 and the skull exactly 1 (+0.0 turns -0.0 into 0.0).
    return (np.round(acc, 10) + 0.0).astype(dtype, copy=False)


def pure_phase_volume(
    phi: NDArray[np.floating],
    phase_scale: float = DEFAULT_PHASE_SCALE,
    dtype: DTypeLike = np.complex64,
) -> NDArray[np.complexfloating]:
    """Pure-phase sample ``u = exp(1j * phase_scale * phi)``.

    Parameters
    ----------
    phi : (NZ, NY, NX) real ndarray
        Phantom values, e.g. from :func:`shepp_logan_3d`.
    phase_scale : float, optional
        Radians per unit phantom value (default :data:`DEFAULT_PHASE_SCALE` = 1.0).
    dtype : complex dtype, optional
        Output dtype (default complex64).

    Returns
    -------
    u : (NZ, NY, NX) ndarray of ``dtype``
        ``|u| = 1`` everywhere; the background (``phi = 0``) is exactly ``u = 1``.

    Notes
    -----
    With the default scale the peak phase is 1 rad (the skull) and the brain 0.2 rad. The
    paper leaves the scale open; it matters for the reported SNR: the trivial guess
    ``u = 1`` already scores about 14.5 dB at 1 rad peak phase (about 20 dB at 0.5 rad),
    so always report that baseline beside reconstruction scores.
    """
    if not np.isfinite(phase_scale):
        raise ValueError(f"pure_phase_volume: phase_scale must be finite, got {phase_scale!r}")
    dtype = np.dtype(dtype)
    if dtype.kind != "c":
        raise ValueError(f"pure_phase_volume: dtype must be complex, got {dtype}")
    real = np.finfo(dtype).dtype  # float32 for complex64: no float64 volume temporaries
    phase = np.asarray(phi, dtype=real) * real.type(phase_scale)
    u = np.empty(phase.shape, dtype=dtype)
    u.real = np.cos(phase)
    u.imag = np.sin(phase)
    return u
