"""The joint forward model ``D_{j,t}(omega, u) = F(omega * S_j P_t u)`` for a set of angles.

Composes :class:`~ptmpi.operators.tomo.Projector`, :class:`~ptmpi.operators.ptycho.Ptycho`
and :class:`~ptmpi.operators.fft.FarField`. Because ``F`` is unitary,
``D^H D = sum_t P_t^H (W_t * P_t)`` with ``W_t = sum_j S_j^H |omega|^2``: the normal
operator needs no FFT.
"""

from __future__ import annotations

import numpy as np

from ptmpi.backend import real_dtype, to_device
from ptmpi.operators.fft import FarField
from ptmpi.operators.modes import ModePtycho
from ptmpi.operators.ptycho import Ptycho
from ptmpi.operators.tomo import Projector


class JointModel:
    """``D``: volume ``(nz, n, n)`` -> far fields ``(N_FRAMES, M, M)`` of the given angles.

    Parameters
    ----------
    shape : (nz, n, n)
        Volume shape.
    theta : (N_THETA,) float
        Angles in radians (a rank's local angles).
    probe : (M, M) complex, or (K, M, M) incoherent probe modes
        With modes the far fields are ``(K, N_FRAMES, M, M)`` (one per mode,
        :class:`~ptmpi.operators.modes.ModePtycho`), the adjoint sums the modes and
        ``W = sum_k W_k``.
    positions : (N_FRAMES, 2)
        Window corners, angle-major.
    frame_offset : (N_THETA + 1,) int
    dtype : complex dtype of the volumes.
    """

    def __init__(self, shape, theta, probe, positions, frame_offset, dtype=np.complex64):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.projector = Projector(self.shape, theta, dtype=self.dtype)
        image_shape = (self.shape[0], self.shape[2])
        if probe.ndim == 3:
            self.ptycho = ModePtycho(probe, positions, frame_offset, image_shape)
        else:
            self.ptycho = Ptycho(probe, positions, frame_offset, image_shape)
        self.farfield = FarField()

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.ptycho.data_shape

    def set_probe(self, probe) -> None:
        """Replace the probe (e.g. after a probe update); the windows stay."""
        self.ptycho.probe = probe

    def set_positions(self, positions) -> None:
        """Move the frames to ``positions`` (e.g. aligned ones); the probe stays."""
        self.ptycho = self.ptycho.moved(positions)

    def fwd(self, u):
        """``D u``: ``(nz, n, n) -> (N_FRAMES, M, M)`` (``(K, N_FRAMES, M, M)`` with modes)."""
        return self.farfield.fwd(self.ptycho.fwd(self.projector.fwd(u)))

    def adj(self, d, accumulate=None, out=None):
        """``D^H d = sum_{j,t} P_t^H S_j^H (conj(omega) * F^H d_{j,t})``.

        ``accumulate``: optional wider dtype of the sum over angles; ``out``: optional
        result array (see ``Projector.adj``).
        """
        return self.projector.adj(self.ptycho.adj(self.farfield.adj(d)), accumulate, out)

    def illumination(self, xp=np):
        """``W_t`` for every local angle: ``(N_THETA, nz, n)`` real, on ``xp``'s device."""
        probe = to_device(self.ptycho.probe, xp)
        saved, self.ptycho.probe = self.ptycho.probe, probe
        try:
            return self.ptycho.illumination(real_dtype(self.dtype))
        finally:
            self.ptycho.probe = saved

    def normal(self, u, weight, accumulate=None, out=None):
        """``D^H D u = sum_t P_t^H (W_t * P_t u)``, ``weight = W`` from :meth:`illumination`
        (``out`` as in :meth:`adj`)."""
        return self.projector.normal(u, weight, accumulate, out)
