"""Ptychographic windowing with the probe: ``psi_j = omega_j * S_j v`` (SPEC 2 and 8).

``S_j`` cuts the ``(M, M)`` window with top-left corner ``floor(positions[j])`` (row, col)
out of the ``(nz, n)`` projection image of its angle; pixels outside the image read as zero
(non-periodic boundary), so windows may hang over the edge. The adjoint scatters
``conj(omega_j) * psi_j`` back and drops what falls outside.

Sub-pixel positions (SPEC 8) are exact in the probe-shift form: with the fraction
``f_j = positions[j] - floor(positions[j])`` (per axis, in ``[0, 1)``), frame ``j`` uses
the probe ``omega_j = shift(omega, f_j)``, the probe moved by ``f_j`` pixels towards
higher indices by a Fourier phase ramp over its ``(M, M)`` grid (periodic, unitary):

    omega_j = ifft2(fft2(omega) * exp(-2 pi i (k_r f_r + k_c f_c)))

For a probe that is band-limited and vanishes at the window's edges this is the SPEC's
"band-limited image shifted by ``f_j``, cut at the integer corner" up to a translation of
the exit wave by ``f_j``, i.e. a far-field phase ramp, so the intensities agree. The map
``v -> psi`` stays a pointwise product after an integer cut, so the adjoint is exact by
construction and the illumination ``W = sum_j S_j^H |omega_j|^2`` stays pointwise.
Frames with zero fraction use ``omega`` itself, bit for bit. Fractions within
``SNAP_PX`` of a whole pixel count as whole (a float-rounding remnant of a unit
conversion would otherwise turn ``11.99999999`` into a corner of 11 and a probe moved by
almost a whole pixel, which wraps around the probe grid).

Whole pixels and the guard band. For any image, a frame's intensities are continuous where
its position crosses a whole pixel if the probe is *guarded*: zero on its last row and
last column (index ``M - 1``; :func:`guard_probe`). At the
fraction ``f -> 1`` the moved probe is the probe rolled by one pixel,
``omega((x - 1) mod M)``, so the frame at corner ``n`` is ``omega((x - 1) mod M) v(n + x)``
and the frame at corner ``n + 1``, fraction 0, is ``omega(x) v(n + 1 + x)``: the same
values one pixel apart, except the wrapped pixel ``x = 0`` (``omega(M - 1) v(n)`` against
``omega(M - 1) v(n + M)``). With ``omega(M - 1) = 0`` on both axes the two frames are
circular shifts of each other, their far fields differ by a phase ramp, and their
intensities are equal. An unguarded probe makes the frame jump there by its edge values
(for the demo's probe 0.2 % of its energy on that row and column), which traps a shift
refined by ``--align`` before a crossing (:mod:`ptmpi.solvers.align`). The derivative
with respect to the position still jumps there, by the (Fourier) derivative of the probe
on its edge row or column times ``v(n) - v(n + M)``: small for a probe that is small near
its edges, not zero. Only moving positions need the guard; the solvers impose it on no
probe (the drift simulator's probe is guarded, :mod:`ptmpi.sim.simulate`).

Implementation: the image stack is zero-padded by the largest overhang and viewed as all
of its ``(M, M)`` windows (a strided view, no copy). The forward map gathers every
frame's window one window row at a time (M vectorized gathers, no loop over frames). The
adjoint adds frames back group by group, each group
holding frames whose windows do not overlap, so one vectorized ``+=`` per group is exact;
a grid scan of step ``s`` needs about ``(M / s + 1)^2`` groups, independent of the number
of frames.
"""

from __future__ import annotations

import logging

import numpy as np

from ptmpi.backend import complex_dtype, get_xp, real_dtype, to_device, to_host
from ptmpi.operators import kernels
from ptmpi.operators.probe_normal import ProbeNormal, frame_index

logger = logging.getLogger(__name__)


SNAP_PX = 1e-6
"""Fractions of a pixel closer than this to a whole pixel are taken as whole."""


def split_positions(positions: np.ndarray, name: str = "positions"):
    """Integer window corners and sub-pixel fractions of float scan positions.

    Returns ``corners`` ``(N_FRAMES, 2) int64`` (``floor``) and ``fractions``
    ``(N_FRAMES, 2) float64`` in ``[0, 1)``; positions within ``SNAP_PX`` of a whole pixel
    are snapped to it (fraction exactly 0).
    """
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    if not np.all(np.isfinite(positions)):
        j = int(np.flatnonzero(~np.isfinite(positions).all(axis=1))[0])
        raise ValueError(f"{name}: scan position of frame {j} is not finite: {positions[j]}")
    nearest = np.rint(positions)
    snapped = np.where(np.abs(positions - nearest) <= SNAP_PX, nearest, positions)
    corners = np.floor(snapped)
    return corners.astype(np.int64), snapped - corners


def guard_probe(probe):
    """``probe`` with its last row and last column (index ``M - 1``) set to zero: the guard
    band that makes the sub-pixel model continuous across whole pixels (module notes).

    ``probe``: ``(M, M)`` or ``(K, M, M)`` probe modes (numpy or CuPy); returns a copy of
    the same type, dtype and shape. Idempotent; a linear combination of guarded modes
    (their orthogonalisation) stays guarded.
    """
    out = probe.copy()
    out[..., -1, :] = 0
    out[..., :, -1] = 0
    return out


def is_guarded(probe) -> bool:
    """True when ``probe`` (``(M, M)`` or ``(K, M, M)``) is zero on its last row and column."""
    edges = to_host(probe[..., -1, :]), to_host(probe[..., :, -1])
    return not any(np.any(e != 0) for e in edges)


def _ramps(shifts, m: int, xp, dtype):
    """Per-axis phase ramps ``exp(-2 pi i k s)``: ``(K, M)`` rows and ``(K, M)`` columns."""
    freq = np.fft.fftfreq(m)
    s = np.asarray(shifts, dtype=np.float64).reshape(-1, 2)
    ramp_r = np.exp(-2j * np.pi * s[:, 0, None] * freq[None, :]).astype(dtype)
    ramp_c = np.exp(-2j * np.pi * s[:, 1, None] * freq[None, :]).astype(dtype)
    return to_device(ramp_r, xp), to_device(ramp_c, xp)


def fourier_shift(x, shifts):
    """Move each ``(M, M)`` frame of ``x`` by ``shifts`` pixels (Fourier phase ramp).

    ``x``: ``(K, M, M)`` (or ``(M, M)``, moved by every shift); ``shifts``: ``(K, 2)``
    float (row, col), positive towards higher indices. Periodic over the frame and unitary;
    the adjoint is the shift by ``-shifts``. Returns ``(K, M, M)`` complex of ``x``'s
    precision.
    """
    from ptmpi.operators.fft import fft2

    xp = get_xp(x)
    dtype = complex_dtype(x.dtype)
    ramp_r, ramp_c = _ramps(shifts, x.shape[-1], xp, dtype)
    spectrum = fft2(x.astype(dtype, copy=False)) * ramp_r[:, :, None]
    spectrum *= ramp_c[:, None, :]
    return fft2(spectrum, inverse=True)


def check_windows(positions: np.ndarray, image_shape, m: int) -> None:
    """Raise ValueError naming the first frame whose window has no pixel in the image."""
    nz, n = image_shape
    r, c = positions[:, 0], positions[:, 1]
    outside = (r + m <= 0) | (r >= nz) | (c + m <= 0) | (c >= n)
    if outside.any():
        j = int(np.flatnonzero(outside)[0])
        raise ValueError(
            f"scan position of frame {j} (row {r[j]}, col {c[j]}): the {m}x{m} window has "
            f"no pixel inside the {nz}x{n} projection image"
        )


def overlap_free_groups(positions: np.ndarray, angle: np.ndarray, m: int) -> list[np.ndarray]:
    """Split frames into groups whose windows never overlap within an angle.

    Frames are binned into square cells of side ``cell``; with ``k = ceil(m / cell)``, two
    frames whose cell indices differ by a multiple of ``k + 1`` (and at least ``k + 1``) in
    some axis are at least ``m + 1`` pixels apart there, so cells with the same indices
    modulo ``k + 1`` never overlap; frames sharing a cell are told apart by their rank in
    the cell. The cell size giving the fewest groups is used.
    """
    n_frames = positions.shape[0]
    if n_frames == 0:
        return []
    best = None
    for cell in sorted({max(1, m >> k) for k in range(12)}):
        period = -(-m // cell) + 1
        cr = np.floor_divide(positions[:, 0], cell)
        cc = np.floor_divide(positions[:, 1], cell)
        _, cell_id = np.unique(np.stack([angle, cr, cc]), axis=1, return_inverse=True)
        cell_id = cell_id.ravel()
        order = np.argsort(cell_id, kind="stable")
        sorted_ids = cell_id[order]
        first = np.searchsorted(sorted_ids, sorted_ids, side="left")
        rank = np.empty(n_frames, dtype=np.int64)
        rank[order] = np.arange(n_frames) - first
        colour = ((cr % period) * period + (cc % period)) * (rank.max() + 1) + rank
        _, group = np.unique(colour, return_inverse=True)
        n_groups = int(group.max()) + 1
        if best is None or n_groups < best[0]:
            best = (n_groups, group.ravel())
    n_groups, group = best
    order = np.argsort(group, kind="stable")
    bounds = np.searchsorted(group[order], np.arange(n_groups + 1))
    return [order[bounds[g] : bounds[g + 1]] for g in range(n_groups)]


def _windows_view(padded, m: int, xp):
    """Writeable strided view ``(A, H - M + 1, W - M + 1, M, M)`` of all windows."""
    a, h, w = padded.shape
    s0, s1, s2 = padded.strides
    return xp.lib.stride_tricks.as_strided(
        padded, shape=(a, h - m + 1, w - m + 1, m, m), strides=(s0, s1, s2, s1, s2)
    )


class Ptycho:
    """``psi = omega * S v`` for all frames of a set of angles.

    Parameters
    ----------
    probe : (M, M) complex
        The probe ``omega`` (numpy or CuPy; used on the device of the data). Assigning
        ``op.probe`` later (a probe update) refreshes the per-frame shifted probes.
    positions : (N_FRAMES, 2) float or int
        Window corners ``(row, col)``, angle-major, in pixels; sub-pixel parts are modelled
        exactly (see the module notes).
    frame_offset : (N_THETA + 1,) int
        Frames of angle ``a`` are ``[frame_offset[a], frame_offset[a + 1])``.
    image_shape : (nz, n)
        Projection image shape.

    Notes
    -----
    ``fwd``: ``(N_THETA, nz, n) -> (N_FRAMES, M, M)``; ``adj``: the reverse.
    ``positions`` keeps the float positions, ``corners`` the integer window corners
    (``floor``) that the window checks, the padding and the overlap-free groups use,
    ``fractions`` the sub-pixel parts. The shifted probes are cached per array module and
    dtype: one ``(M, M)`` per distinct non-zero fraction (at most one per frame).
    """

    def __init__(self, probe, positions, frame_offset, image_shape):
        self.m = int(probe.shape[-1])
        if tuple(probe.shape) != (self.m, self.m):
            raise ValueError(f"Ptycho: probe must be square (M, M), got {probe.shape}")
        self._probe = probe
        self.positions = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
        self.corners, self.fractions = split_positions(self.positions)
        self.frame_offset = np.asarray(frame_offset, dtype=np.int64)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.n_theta = self.frame_offset.size - 1
        self.n_frames = int(self.frame_offset[-1])
        if self.positions.shape[0] != self.n_frames:
            raise ValueError(
                f"Ptycho: {self.positions.shape[0]} positions but frame_offset ends at "
                f"{self.n_frames}"
            )
        check_windows(self.corners, self.image_shape, self.m)
        self.angle = np.repeat(np.arange(self.n_theta), np.diff(self.frame_offset))
        nz, n = self.image_shape
        r, c = self.corners[:, 0], self.corners[:, 1]
        self.pad = int(max(0, -r.min(initial=0), -c.min(initial=0),
                           (r + self.m - nz).max(initial=0), (c + self.m - n).max(initial=0)))
        self.groups = overlap_free_groups(self.corners, self.angle, self.m)
        self._index_cache: dict = {}
        # Probe 0 is omega itself; probe 1 + k is omega moved by the k-th distinct fraction.
        shifted = np.any(self.fractions != 0, axis=1)
        self.shifts, inverse = np.unique(self.fractions[shifted], axis=0, return_inverse=True)
        self.probe_index = np.zeros(self.n_frames, dtype=np.int64)
        self.probe_index[shifted] = 1 + inverse.ravel()
        self._probe_cache: dict = {}

    @property
    def probe(self):
        """The probe ``omega`` ``(M, M)``; frame ``j`` uses ``shift(omega, fractions[j])``."""
        return self._probe

    @probe.setter
    def probe(self, probe) -> None:
        if tuple(probe.shape) != (self.m, self.m):
            raise ValueError(f"Ptycho: probe must be ({self.m}, {self.m}), got {probe.shape}")
        if probe is not self._probe:
            self._probe = probe
            self._probe_cache.clear()

    @property
    def subpixel(self) -> bool:
        """True when some frame has a sub-pixel fraction (and so its own shifted probe)."""
        return self.shifts.shape[0] > 0

    @property
    def data_shape(self) -> tuple[int, int, int]:
        return (self.n_frames, self.m, self.m)

    @property
    def image_stack_shape(self) -> tuple[int, int, int]:
        return (self.n_theta, *self.image_shape)

    def _indices(self, xp):
        """(angle, row, col) window indices into the padded stack, and per-group ones."""
        key = xp.__name__
        if key not in self._index_cache:
            a = self.angle
            r = self.corners[:, 0] + self.pad
            c = self.corners[:, 1] + self.pad
            dev = [to_device(v, xp) for v in (a, r, c)]
            groups = [tuple(to_device(v[g], xp) for v in (a, r, c)) + (to_device(g, xp),)
                      for g in self.groups]
            self._index_cache[key] = (tuple(dev), groups)
        return self._index_cache[key]

    def _padded(self, v, xp):
        if self.pad == 0:
            return xp.ascontiguousarray(v)
        p = self.pad
        padded = xp.zeros((v.shape[0], v.shape[1] + 2 * p, v.shape[2] + 2 * p), dtype=v.dtype)
        padded[:, p:-p, p:-p] = v
        return padded

    def extract(self, v):
        """Windows ``S v`` without the probe: ``(N_THETA, nz, n) -> (N_FRAMES, M, M)``."""
        xp = get_xp(v)
        if tuple(v.shape) != self.image_stack_shape:
            raise ValueError(f"Ptycho: expected images {self.image_stack_shape}, got {v.shape}")
        (a, r, c), _ = self._indices(xp)
        padded = self._padded(v, xp)
        if xp is not np:
            # On a device one gather of every frame pixel (a kernel launch per window row,
            # as below, cost 29% of a 128^3 APT iteration on a GPU)
            ii = xp.arange(self.m)
            return padded[a[:, None, None], (r[:, None] + ii)[:, :, None],
                          (c[:, None] + ii)[:, None, :]]
        n_a, h, w = padded.shape
        s0, s1, s2 = padded.strides
        # all row segments of length M: (A, H, W - M + 1, M), a strided view
        segments = xp.lib.stride_tricks.as_strided(
            padded, shape=(n_a, h, w - self.m + 1, self.m), strides=(s0, s1, s2, s2)
        )
        frames = xp.empty(self.data_shape, dtype=v.dtype)
        # one gather of all frames per window row: faster than a 5-D fancy index
        for row in range(self.m):
            frames[:, row, :] = segments[a, r + row, c]
        return frames

    def scatter(self, psi):
        """Adjoint of :meth:`extract`: ``(N_FRAMES, M, M) -> (N_THETA, nz, n)``."""
        xp = get_xp(psi)
        if tuple(psi.shape) != self.data_shape:
            raise ValueError(f"Ptycho: expected frames {self.data_shape}, got {psi.shape}")
        p = self.pad
        nz, n = self.image_shape
        padded = xp.zeros((self.n_theta, nz + 2 * p, n + 2 * p), dtype=psi.dtype)
        view = _windows_view(padded, self.m, xp)
        _, groups = self._indices(xp)
        for a, r, c, g in groups:
            view[a, r, c] += psi[g]
        if p == 0:
            return padded
        return xp.ascontiguousarray(padded[:, p:-p, p:-p])

    def _probe_as(self, x):
        xp = get_xp(x)
        return to_device(self.probe, xp).astype(x.dtype, copy=False)

    def probes(self, x):
        """``(P, M, M)`` probes on ``x``'s device in ``x``'s dtype (frame ``j`` uses
        ``probes[probe_index[j]]``) and ``probe_index`` there; ``P = 1`` without sub-pixel
        positions. Cached until the probe changes."""
        xp = get_xp(x)
        key = (xp.__name__, np.dtype(x.dtype).str)
        if key not in self._probe_cache:
            base = self._probe_as(x)
            stack = xp.empty((1 + self.shifts.shape[0], self.m, self.m), dtype=x.dtype)
            stack[0] = base
            wide = to_device(self.probe, xp).astype(np.result_type(self.probe.dtype, x.dtype))
            for k0 in range(0, self.shifts.shape[0], _SHIFT_CHUNK):
                k1 = min(self.shifts.shape[0], k0 + _SHIFT_CHUNK)
                stack[1 + k0 : 1 + k1] = fourier_shift(wide, self.shifts[k0:k1])
            self._probe_cache[key] = (stack, to_device(self.probe_index, xp))
        return self._probe_cache[key]

    def fwd(self, v, out=None):
        """``psi_j = omega_j * S_j v``; ``out``: optional C-contiguous ``(N_FRAMES, M, M)``
        array of ``v``'s dtype that receives it (returned)."""
        probes, index = self.probes(v)
        if (kernels.available(v, probes) and tuple(v.shape) == self.image_stack_shape
                and (out is None or kernels.available(out))):
            (a, r, c), _ = self._indices(np)
            return kernels.window_fwd(self._padded(v, np), probes, a, r, c, index, out=out)
        xp = get_xp(v)
        own = probes[0] if probes.shape[0] == 1 else probes[index]
        if out is None:
            return own * self.extract(v)
        return xp.multiply(own, self.extract(v), out=out)

    def adj(self, psi):
        """``sum_j S_j^H (conj(omega_j) * psi_j)``."""
        probes, index = self.probes(psi)
        if kernels.available(psi, probes) and tuple(psi.shape) == self.data_shape:
            (a, r, c), _ = self._indices(np)
            p = self.pad
            nz, n = self.image_shape
            padded = np.zeros((self.n_theta, nz + 2 * p, n + 2 * p), dtype=psi.dtype)
            kernels.window_adj(psi, probes, a, r, c, padded, index)
            return padded if p == 0 else np.ascontiguousarray(padded[:, p:-p, p:-p])
        if probes.shape[0] == 1:
            return self.scatter(probes[0].conj() * psi)
        return self.scatter(probes[index].conj() * psi)

    def illumination(self, dtype=None):
        """``W = sum_j S_j^H |omega_j|^2`` per angle: ``(N_THETA, nz, n)`` real."""
        xp = get_xp(self.probe)
        rdtype = real_dtype(dtype or self.probe.dtype)
        if not self.subpixel:
            intensity = (xp.abs(self.probe) ** 2).astype(rdtype)
            return self.scatter(xp.ascontiguousarray(xp.broadcast_to(intensity,
                                                                     self.data_shape)))
        probes, index = self.probes(self.probe.astype(np.result_type(rdtype, np.complex64)))
        intensity = xp.abs(probes).astype(rdtype, copy=False)
        intensity = (intensity * intensity)[index]
        if kernels.available(intensity):
            # Frame by frame, in frame order: an angle's sum does not depend on which other
            # angles this rank holds (the overlap-free groups do), so W does not depend on
            # the rank count.
            (a, r, c), _ = self._indices(np)
            p = self.pad
            nz, n = self.image_shape
            padded = np.zeros((self.n_theta, nz + 2 * p, n + 2 * p), dtype=rdtype)
            kernels.window_adj(intensity, np.ones((self.m, self.m), dtype=rdtype), a, r, c,
                               padded)
            return padded if p == 0 else np.ascontiguousarray(padded[:, p:-p, p:-p])
        return self.scatter(intensity)

    def unshift_sum(self, frames, factor=None):
        """``sum_j shift_j^H(frames_j)``: every frame moved back by its fraction, summed.

        ``frames``: ``(N_FRAMES, M, M)``; returns ``(M, M)`` complex128 (float64, the real
        part, for real frames). ``shift_j^H`` is the adjoint of ``omega -> omega_j``, so
        this maps per-frame terms of a probe update back onto the unshifted probe's grid.
        Without sub-pixel positions it is the plain sum. One forward FFT per moved frame:
        the back-shift is linear, so the spectra are summed and inverted once.
        ``factor``: optional ``(N_FRAMES, M, M)`` complex; the frames are then
        ``conj(factor_j) * frames_j`` (the probe update's numerator), formed chunk by
        chunk instead of as one frame-sized array.
        """
        from ptmpi.operators.fft import fft2

        xp = get_xp(frames)
        if tuple(frames.shape) != self.data_shape:
            raise ValueError(f"Ptycho: expected frames {self.data_shape}, got {frames.shape}")
        if factor is not None and tuple(factor.shape) != self.data_shape:
            raise ValueError(f"Ptycho: expected factors {self.data_shape}, got {factor.shape}")

        def terms(index):
            if factor is None:
                return frames[index]
            return xp.conj(factor[index]) * frames[index]

        real = not xp.iscomplexobj(frames) and (factor is None or not xp.iscomplexobj(factor))
        wide = np.float64 if real else np.complex128
        if not self.subpixel:
            if factor is None:
                return xp.sum(frames, axis=0, dtype=wide)
            total = xp.zeros((self.m, self.m), dtype=wide)
            for k0 in range(0, self.n_frames, _SHIFT_CHUNK):
                total += xp.sum(terms(slice(k0, k0 + _SHIFT_CHUNK)), axis=0, dtype=wide)
            return total
        whole = to_device(np.flatnonzero(self.probe_index == 0), xp)
        total = xp.sum(terms(whole), axis=0, dtype=np.complex128)
        moved = np.flatnonzero(self.probe_index > 0)
        spectrum = xp.zeros((self.m, self.m), dtype=np.complex128)
        dtype = complex_dtype(np.result_type(frames.dtype, real_dtype(
            frames.dtype if factor is None else factor.dtype)))
        for k0 in range(0, moved.size, _SHIFT_CHUNK):
            sel = moved[k0 : k0 + _SHIFT_CHUNK]
            ramp_r, ramp_c = _ramps(-self.fractions[sel], self.m, xp, dtype)
            part = fft2(terms(frame_index(sel, xp)).astype(dtype, copy=False))
            part *= ramp_r[:, :, None]
            part *= ramp_c[:, None, :]
            spectrum += xp.sum(part, axis=0, dtype=np.complex128)
        total += fft2(spectrum, inverse=True)
        return total.real.copy() if real else total

    def probe_normal(self, x, weights, whole_sum=None):
        """``sum_j shift_j^H(weights_j * shift_j(x))`` for one ``(M, M)`` probe ``x``.

        ``weights``: ``(N_FRAMES, M, M)`` real (``|v_j|^2``); ``whole_sum``: their sum over
        the frames at whole pixels, if already formed. The normal operator of the probe's
        least-squares update with sub-pixel frames; per moved frame one inverse and one
        forward FFT, in chunks (no frame-sized temporaries). Returns ``(M, M)`` complex128.
        The reference of :meth:`probe_normal_operator`, which the probe update uses.
        """
        from ptmpi.operators.fft import fft2

        xp = get_xp(x)
        dtype = complex_dtype(weights.dtype)
        if whole_sum is None:
            whole = to_device(np.flatnonzero(self.probe_index == 0), xp)
            whole_sum = xp.sum(weights[whole], axis=0, dtype=np.float64)
        total = x.astype(np.complex128) * whole_sum
        moved = np.flatnonzero(self.probe_index > 0)
        if moved.size == 0:
            return total
        spectrum_x = fft2(x.astype(dtype))
        spectrum = xp.zeros((self.m, self.m), dtype=np.complex128)
        for k0 in range(0, moved.size, _SHIFT_CHUNK):
            sel = moved[k0 : k0 + _SHIFT_CHUNK]
            ramp_r, ramp_c = _ramps(self.fractions[sel], self.m, xp, dtype)
            part = spectrum_x[None] * ramp_r[:, :, None]
            part *= ramp_c[:, None, :]
            part = fft2(part, inverse=True)
            part *= weights[to_device(sel, xp)]
            part = fft2(part)
            part *= xp.conj(ramp_r)[:, :, None]
            part *= xp.conj(ramp_c)[:, None, :]
            spectrum += xp.sum(part, axis=0, dtype=np.complex128)
        total += fft2(spectrum, inverse=True)
        return total

    def probe_normal_operator(self, weights) -> ProbeNormal:
        """:meth:`probe_normal` for fixed ``weights`` ``(N_FRAMES, M, M)`` real, as one
        convolution (:class:`~ptmpi.operators.probe_normal.ProbeNormal`): built from this
        Ptycho's frames; sum it over ranks with its ``reduce``, then apply it to
        ``(M, M)`` or ``(K, M, M)`` probes at the cost of a few FFTs of the probe's size."""
        if tuple(weights.shape) != self.data_shape:
            raise ValueError(f"Ptycho: expected weights {self.data_shape}, got {weights.shape}")
        return ProbeNormal.from_weights(weights, self.fractions,
                                        np.flatnonzero(self.probe_index > 0),
                                        np.flatnonzero(self.probe_index == 0))

    def moved(self, positions) -> Ptycho:
        """The same frames, probe and image at other ``positions`` (e.g. aligned ones)."""
        return Ptycho(self.probe, positions, self.frame_offset, self.image_shape)


_SHIFT_CHUNK = 256  # frames shifted per FFT batch (bounds the complex128 temporaries)
