"""Incoherent probe modes (mixed-state ptychography, Thibault & Menzel 2013).

A partially coherent beam is a sum of ``K`` mutually incoherent modes ``omega_k``; frame
``j`` records the sum of their intensities,

    f_j ~ sum_k |F(omega_k * S_j v)|^2,

so the model modulus of a pixel is ``sqrt(sum_k |d_{k,j}|^2)`` with
``d_{k,j} = F(omega_k * S_j v)``.

Array layout: the mode axis leads. Probes are ``(K, M, M)``; the exit waves and far
fields of all modes are ``(K, N_FRAMES, M, M)`` (mode-major, so one mode's frames are one
contiguous block with the layout of a single-mode solver). ``K = 1`` solvers keep their
``(M, M)`` probe and ``(N_FRAMES, M, M)`` fields and do not use this module.

- :class:`ModePtycho`: ``psi_k = omega_k * S v`` for every mode; the adjoint sums the
  modes, ``sum_k S^H conj(omega_k) psi_k``, and the illumination is ``W = sum_k W_k``.
- :func:`orthogonalise`: the modes rotated into their orthogonal (SVD) basis, ordered by
  power. The intensity ``sum_k |F(omega_k S v)|^2`` is invariant under any unitary mixing of
  the modes, so this changes no model; the same ``K x K`` matrix must then be applied to
  every per-mode far-field array of a solver (:func:`mix_modes`).
- :func:`initial_modes`: mode 0 from a single probe, modes ``k > 0`` the probe times
  low-order Hermite patterns carrying a small fraction of the power.
"""

from __future__ import annotations

import copy

import numpy as np

from ptmpi.backend import get_xp, to_device
from ptmpi.operators.ptycho import Ptycho

DEFAULT_MODE_POWER = 0.05
"""Power of the first added mode, as a fraction of the total: added mode ``k`` carries
``DEFAULT_MODE_POWER / k``, mode 0 the rest."""


class ModePtycho:
    """``psi_{k,j} = omega_{k,j} * S_j v`` for ``K`` probe modes sharing one scan.

    Parameters
    ----------
    probes : (K, M, M) complex
        The modes (numpy or CuPy).
    positions, frame_offset, image_shape : as :class:`~ptmpi.operators.ptycho.Ptycho`.

    Notes
    -----
    ``fwd``: ``(N_THETA, nz, n) -> (K, N_FRAMES, M, M)``; ``adj``: the reverse (sum over
    modes). One :class:`Ptycho` per mode shares the geometry (windows, overlap-free
    groups, sub-pixel fractions); each caches its own shifted probes.
    """

    def __init__(self, probes, positions, frame_offset, image_shape):
        if probes.ndim != 3 or probes.shape[0] < 1:
            raise ValueError(f"ModePtycho: probes must be (K, M, M), got {probes.shape}")
        first = Ptycho(probes[0], positions, frame_offset, image_shape)
        self.modes = [first]
        for k in range(1, probes.shape[0]):
            other = copy.copy(first)  # the geometry (and its index cache) is shared
            other._probe = probes[k]
            other._probe_cache = {}
            self.modes.append(other)
        self._probes = probes

    @property
    def n_modes(self) -> int:
        return len(self.modes)

    @property
    def geometry(self) -> Ptycho:
        """The scan geometry (mode 0's operator): windows, fractions, ``unshift_sum``."""
        return self.modes[0]

    # The scan geometry's attributes, shared by the modes (read-only).
    m = property(lambda self: self.modes[0].m)
    positions = property(lambda self: self.modes[0].positions)
    fractions = property(lambda self: self.modes[0].fractions)
    angle = property(lambda self: self.modes[0].angle)
    frame_offset = property(lambda self: self.modes[0].frame_offset)
    image_shape = property(lambda self: self.modes[0].image_shape)

    @property
    def data_shape(self) -> tuple[int, int, int, int]:
        return (self.n_modes, *self.modes[0].data_shape)

    @property
    def probe(self):
        """The modes ``(K, M, M)``."""
        return self._probes

    @probe.setter
    def probe(self, probes) -> None:
        if tuple(probes.shape) != (self.n_modes, self.modes[0].m, self.modes[0].m):
            m = self.modes[0].m
            raise ValueError(f"ModePtycho: probes must be ({self.n_modes}, {m}, {m}), got "
                             f"{probes.shape}")
        self._probes = probes
        for k, op in enumerate(self.modes):
            op.probe = probes[k]

    def moved(self, positions) -> ModePtycho:
        """The same modes and image at other ``positions`` (e.g. aligned ones)."""
        return ModePtycho(self._probes, positions, self.frame_offset, self.image_shape)

    def extract(self, v):
        """Windows ``S v`` without probe, ``(N_FRAMES, M, M)`` (common to all modes)."""
        return self.modes[0].extract(v)

    def fwd(self, v):
        """``psi_k = omega_k * S v`` for every mode: ``(K, N_FRAMES, M, M)``."""
        xp = get_xp(v)
        out = xp.empty((self.n_modes, *self.modes[0].data_shape), dtype=v.dtype)
        for k, op in enumerate(self.modes):
            op.fwd(v, out=out[k])
        return out

    def adj(self, psi):
        """``sum_k sum_j S_j^H (conj(omega_{k,j}) psi_{k,j})``: ``(N_THETA, nz, n)``."""
        total = self.modes[0].adj(psi[0])
        for k in range(1, self.n_modes):
            total += self.modes[k].adj(psi[k])
        return total

    def illumination(self, dtype=None):
        """``W = sum_k sum_j S_j^H |omega_{k,j}|^2``: ``(N_THETA, nz, n)`` real."""
        total = self.modes[0].illumination(dtype)
        for k in range(1, self.n_modes):
            total += self.modes[k].illumination(dtype)
        return total


def intensity(d):
    """``sum_k |d_k|^2`` over the leading mode axis (in ``d``'s real precision)."""
    total = d[0].real ** 2 + d[0].imag ** 2
    for k in range(1, d.shape[0]):
        total += d[k].real ** 2 + d[k].imag ** 2
    return total


def modulus(d):
    """The model modulus ``sqrt(sum_k |d_k|^2)`` of mode-major far fields ``d``."""
    xp = get_xp(d)
    return xp.sqrt(intensity(d))


def orthogonalise(probes):
    """``(probes', U)``: the modes in their orthogonal basis, strongest first.

    With the stacked modes ``P = U S V^H`` (``K x M^2``, SVD), ``P' = U^H P = S V^H``:
    orthogonal modes of decreasing power, the same incoherent sum of intensities. ``U``
    (``K x K`` unitary, numpy complex128) is returned so that a solver can mix its
    per-mode fields alike, ``z' = U^H z`` (:func:`mix_modes`). Computed in double
    precision on the host (``K x K`` Gram matrix), the same on every rank.
    """
    k = probes.shape[0]
    flat = to_device(probes, np).reshape(k, -1).astype(np.complex128)
    gram = flat.conj() @ flat.T  # G[a, b] = <p_a, p_b> (conjugate-linear in a)
    # P P^H = conj(G): its eigenvectors are U, eigenvalues the powers S^2
    power, u = np.linalg.eigh(gram.conj())
    order = np.argsort(power)[::-1]
    u = u[:, order]
    # fix each column's phase so that U is close to the identity where the modes already
    # are orthogonal (stable from one call to the next)
    diag = np.diagonal(u).copy()
    phase = np.where(np.abs(diag) > 0, diag / np.maximum(np.abs(diag), 1e-300), 1.0)
    u = u * phase.conj()[None, :]
    mixed = mix_modes(probes, u)
    return mixed, u


def mix_modes(fields, u, in_place: bool = False):
    """``fields'_k = sum_l conj(U[l, k]) fields_l`` (i.e. ``U^H fields`` over the leading
    mode axis), in ``fields``' dtype; ``u`` is the ``K x K`` matrix of :func:`orthogonalise`.
    ``in_place``: overwrite ``fields`` (C-contiguous) block of columns by block and return
    it, instead of allocating a result of its size (the same products).
    """
    xp = get_xp(fields)
    uh = to_device(np.ascontiguousarray(u.conj().T), xp).astype(fields.dtype)
    if not (in_place and fields.flags.c_contiguous):
        flat = xp.ascontiguousarray(fields).reshape(fields.shape[0], -1)
        return xp.matmul(uh, flat).reshape(fields.shape)  # one (K x K) @ (K x rest) product
    flat = fields.reshape(fields.shape[0], -1)
    for k0 in range(0, flat.shape[1], _MIX_BLOCK):
        block = flat[:, k0 : k0 + _MIX_BLOCK]
        block[...] = xp.matmul(uh, block)
    return fields


_MIX_BLOCK = 1 << 16  # columns per block of the in-place mode mixing


def hermite_patterns(probe, count: int):
    """``count`` real patterns ``H_a(x) H_b(y)`` (``(a, b) != (0, 0)``, lowest order
    first: (1,0), (0,1), (1,1), (2,0), (0,2), ...) on the probe grid, with ``x``, ``y``
    centred on the probe's intensity centroid and scaled by its RMS width per axis."""
    amp2 = np.abs(to_device(probe, np).astype(np.complex128)) ** 2
    m = amp2.shape[-1]
    grid = np.arange(m, dtype=np.float64)
    total = max(float(amp2.sum()), 1e-300)
    row_w, col_w = amp2.sum(axis=1) / total, amp2.sum(axis=0) / total
    cr, cc = float(grid @ row_w), float(grid @ col_w)
    sr = max(np.sqrt(float(((grid - cr) ** 2) @ row_w)), 1.0)
    sc = max(np.sqrt(float(((grid - cc) ** 2) @ col_w)), 1.0)
    y = ((grid - cr) / sr)[:, None]
    x = ((grid - cc) / sc)[None, :]
    orders = sorted(((a, b) for a in range(count + 1) for b in range(count + 1)
                     if (a, b) != (0, 0)), key=lambda ab: (ab[0] + ab[1], ab[1] > ab[0], ab))
    patterns = []
    for a, b in orders[:count]:
        hx = np.polynomial.hermite_e.hermeval(x, [0] * a + [1])
        hy = np.polynomial.hermite_e.hermeval(y, [0] * b + [1])
        patterns.append(hx * hy)
    return patterns


def initial_modes(probe, n_modes: int, power: float = DEFAULT_MODE_POWER):
    """``(K, M, M)`` starting modes from one probe, with the probe's total power.

    Mode 0 is ``probe``; mode ``k > 0`` is ``probe`` times the ``k``-th low-order Hermite
    pattern (:func:`hermite_patterns`), Gram-Schmidt orthogonalised against the modes
    before it. Added mode ``k`` carries ``power / k`` of the total power and mode 0 the
    rest, so that ``sum_k |omega_k|^2`` sums to ``sum |probe|^2`` and the intensity scale
    of the data is kept. The powers are distinct on purpose: the orthogonalisation
    (:func:`orthogonalise`) of modes of equal power is ill-conditioned (any rotation
    among them is an eigenbasis), and rounding would then pick the basis, which could
    differ with the rank count. ``K = 1`` returns ``probe[None]`` unchanged.
    """
    if n_modes < 1:
        raise ValueError(f"probe modes must be >= 1, got {n_modes}")
    shares = [power / k for k in range(1, n_modes)]
    if n_modes > 1 and not (power > 0 and sum(shares) < 1):
        raise ValueError(f"power {power} of the first added mode: not in (0, 1) over the "
                         f"{n_modes - 1} added modes")
    xp = get_xp(probe)
    if n_modes == 1:
        return probe[None].copy()
    base = to_device(probe, np).astype(np.complex128)
    total = float(np.vdot(base, base).real)
    modes = [base]
    for pattern in hermite_patterns(base, n_modes - 1):
        mode = base * pattern
        for other in modes:
            mode = mode - other * (np.vdot(other, mode) / np.vdot(other, other).real)
        modes.append(mode)
    out = np.empty((n_modes, *base.shape), dtype=np.complex128)
    out[0] = base * np.sqrt(1 - sum(shares))
    for k in range(1, n_modes):
        norm = float(np.vdot(modes[k], modes[k]).real)
        out[k] = modes[k] * np.sqrt(shares[k - 1] * total / norm) if norm > 0 else 0
    return to_device(out.astype(probe.dtype), xp)


def solver_modes(probe, n_modes: int):
    """The probe a solver with ``n_modes`` modes starts from: ``probe`` itself for one
    mode, an ``(M, M)`` probe expanded by :func:`initial_modes`, a ``(K, M, M)`` one as
    given (``K`` must be ``n_modes``; ValueError otherwise)."""
    if n_modes <= 1:
        return probe
    if probe.ndim == 2:
        probe = initial_modes(probe, n_modes)
    if probe.shape[0] != n_modes:
        raise ValueError(f"{probe.shape[0]} probe modes given, settings ask for {n_modes}")
    return probe


def power_fractions(probes) -> np.ndarray:
    """Each mode's share of the total power ``sum |omega_k|^2`` (numpy float64)."""
    host = to_device(probes, np).astype(np.complex128).reshape(probes.shape[0], -1)
    power = np.sum(np.abs(host) ** 2, axis=1)
    return power / max(float(power.sum()), 1e-300)

