"""The exponential (projection-approximation) model of SPEC 8: ``t_t = exp(i P_t u)``.

``u`` is complex per voxel: its real part is the phase shift per voxel (radians), its
imaginary part the attenuation (``|t| = exp(-P Im u)``); empty space is ``u = 0``, ``t = 1``.
The far field of frame ``j`` at angle ``t`` is ``F(omega * S_j t_t)``.

:func:`transmission` is the nonlinear map; :class:`LinearisedTransmission` is its
derivative at a point, ``du -> i t P du`` (``t = exp(i P u)`` fixed), a linear operator
with an exact adjoint ``q -> P^H(-i conj(t) q)``, used by the Gauss-Newton u-step of
:mod:`ptmpi.solvers.admm_exp`. ``exp(i P u)`` is holomorphic in ``u``, so this complex
linear map is the whole derivative (no conjugate part).
"""

from __future__ import annotations

import numpy as np

from ptmpi.backend import get_xp, real_dtype, to_device
from ptmpi.operators.fft import FarField
from ptmpi.operators.modes import ModePtycho
from ptmpi.operators.ptycho import Ptycho
from ptmpi.operators.tomo import Projector


def transmission(projector: Projector, u):
    """``t = exp(i P u)``: ``(nz, n, n) -> (N_THETA, nz, n)``, same dtype as ``u``."""
    xp = get_xp(u)
    return xp.exp(1j * projector.fwd(u)).astype(u.dtype, copy=False)


class LinearisedTransmission:
    """``J du = i t * P du`` at a fixed transmission ``t`` (``(N_THETA, nz, n)``).

    ``fwd``: ``(nz, n, n) -> (N_THETA, nz, n)``; ``adj``: ``P^H(-i conj(t) q)``, the exact
    adjoint; ``normal``: ``J^H J x = P^H(|t|^2 P x)`` (no complex exponentials needed).
    """

    def __init__(self, projector: Projector, t):
        self.projector = projector
        self.t = t
        xp = get_xp(t)
        self.weight = (t.real**2 + t.imag**2).astype(real_dtype(t.dtype), copy=False)
        self._minus_i_conj_t = (-1j * xp.conj(t)).astype(t.dtype, copy=False)

    def fwd(self, du):
        return (1j * self.t) * self.projector.fwd(du)

    def adj(self, q, accumulate=None, out=None):
        """``P^H(-i conj(t) q)``; ``accumulate``: wider dtype of the sum over angles;
        ``out``: optional result array (``Projector.adj``)."""
        return self.projector.adj(self._minus_i_conj_t * q, accumulate, out)

    def normal(self, x, accumulate=None, out=None):
        """``J^H J x = P^H(|t|^2 P x)``."""
        return self.projector.normal(x, self.weight, accumulate, out)


class ExpModel:
    """``D_{j,t}(omega, u) = F(omega * S_j exp(i P_t u))`` for a set of angles (SPEC 8).

    Same parameters as :class:`ptmpi.operators.model.JointModel`. ``ptycho`` and
    ``farfield`` are the linear part ``Q psi = F(omega * S_j psi)`` acting on transmission
    images ``psi`` ``(N_THETA, nz, n)``; with ``K`` incoherent probe modes (a ``(K, M, M)``
    probe) ``ptycho`` is a :class:`~ptmpi.operators.modes.ModePtycho` and the far fields
    are ``(K, N_FRAMES, M, M)``.
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
    def geometry(self) -> Ptycho:
        """The scan geometry: windows, fractions, frame angles (with probe modes, that of
        mode 0's operator)."""
        return self.ptycho.geometry if isinstance(self.ptycho, ModePtycho) else self.ptycho

    def set_probe(self, probe) -> None:
        self.ptycho.probe = probe

    def set_positions(self, positions) -> None:
        """Move the frames to ``positions`` (e.g. aligned ones); the probe stays."""
        self.ptycho = self.ptycho.moved(positions)

    def illumination(self, xp=np):
        """``W_t = sum_j S_j^H |omega|^2`` per local angle (summed over the modes):
        ``(N_THETA, nz, n)`` real; ``Q^H Q = W`` (``F`` unitary), a diagonal operator on
        transmission images."""
        probe = to_device(self.ptycho.probe, xp)
        saved, self.ptycho.probe = self.ptycho.probe, probe
        try:
            return self.ptycho.illumination(real_dtype(self.dtype))
        finally:
            self.ptycho.probe = saved

    def transmission(self, u):
        """``exp(i P_t u)`` of every local angle: ``(N_THETA, nz, n)``."""
        return transmission(self.projector, u)

    def views(self, psi):
        """``Q psi = F(omega * S_j psi)``: ``(N_THETA, nz, n) -> (N_FRAMES, M, M)``
        (``(K, N_FRAMES, M, M)`` with ``K`` probe modes)."""
        return self.farfield.fwd(self.ptycho.fwd(psi))

    def views_adj(self, d):
        """``Q^H d = sum_j S_j^H(conj(omega) F^H d_j)`` (summed over the modes): the exact
        adjoint of :meth:`views`."""
        return self.ptycho.adj(self.farfield.adj(d))

    def fwd(self, u):
        """``D(u)``: ``(nz, n, n) -> (N_FRAMES, M, M)`` (nonlinear in ``u``)."""
        return self.views(self.transmission(u))


def image_gradient(v):
    """Forward differences of projection images along rows and columns:
    ``(N_THETA, nz, n) -> (2, N_THETA, nz, n)``, zero at the last row / column."""
    xp = get_xp(v)
    g = xp.zeros((2, *v.shape), dtype=v.dtype)
    g[0, :, :-1, :] = v[:, 1:, :] - v[:, :-1, :]
    g[1, :, :, :-1] = v[:, :, 1:] - v[:, :, :-1]
    return g


def image_gradient_adj(g):
    """Exact adjoint of :func:`image_gradient`: ``(2, N_THETA, nz, n) -> (N_THETA, nz, n)``."""
    xp = get_xp(g)
    out = xp.zeros(g.shape[1:], dtype=g.dtype)
    out[:, :-1, :] -= g[0, :, :-1, :]
    out[:, 1:, :] += g[0, :, :-1, :]
    out[:, :, :-1] -= g[1, :, :, :-1]
    out[:, :, 1:] += g[1, :, :, :-1]
    return out


def log_ratio_gradient(target, t):
    """Residual of the projected-phase gradient, ``(2, N_THETA, nz, n)`` complex.

    Per pair of neighbouring pixels ``a, b`` (``b`` after ``a`` along rows, resp. columns):
    ``-i log((target_b conj(target_a)) / (t_b conj(t_a)))`` with the principal logarithm,
    i.e. the wrapped difference of the phase increments (real part) and of the
    attenuation increments (imaginary part) between ``target`` and ``t = exp(i P u)``.
    It is ``grad_2d P du`` whenever ``target = exp(i P (u + du))`` and the increments
    differ by less than pi; only ratios of neighbouring pixels enter, never the phase of
    one pixel, so the projected phase is never wrapped. Pairs where either target pixel
    is 0 give 0.
    """
    xp = get_xp(target)
    a = target / t
    mag = xp.abs(a)
    nonzero = mag > 0
    log_mag = xp.log(xp.where(nonzero, mag, 1))
    out = xp.zeros((2, *target.shape), dtype=target.dtype)
    for axis, (head, tail) in enumerate(((np.s_[:, :-1, :], np.s_[:, 1:, :]),
                                         (np.s_[:, :, :-1], np.s_[:, :, 1:]))):
        valid = nonzero[head] & nonzero[tail]
        phase = xp.angle(a[tail] * xp.conj(a[head]))
        value = phase - 1j * (log_mag[tail] - log_mag[head])
        out[axis][head] = xp.where(valid, value, 0)
    return out


class ProjectedGradient:
    """``G du = grad_2d(P du)``: ``(nz, n, n) -> (2, N_THETA, nz, n)``, the phase-gradient
    linearisation of ``exp(i P u)``; ``adj`` is its exact adjoint."""

    def __init__(self, projector: Projector):
        self.projector = projector

    def fwd(self, du):
        return image_gradient(self.projector.fwd(du))

    def adj(self, g, accumulate=None, out=None):
        return self.projector.adj(image_gradient_adj(g), accumulate, out)

    def normal(self, x, accumulate=None, out=None):
        return self.adj(self.fwd(x), accumulate, out)
