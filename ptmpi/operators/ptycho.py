"""Ptychographic windowing with the probe: ``psi_j = omega * S_j v`` (SPEC section 2).

``S_j`` cuts the ``(M, M)`` window with top-left corner ``positions[j] = (row, col)`` out
of the ``(nz, n)`` projection image of its angle; pixels outside the image read as zero
(non-periodic boundary), so windows may hang over the edge. The adjoint scatters
``conj(omega) * psi_j`` back and drops what falls outside.

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
import warnings

import numpy as np

from ptmpi.backend import get_xp, real_dtype, to_device
from ptmpi.operators import kernels

logger = logging.getLogger(__name__)


def integer_positions(positions: np.ndarray, name: str = "positions") -> np.ndarray:
    """Round scan positions to whole pixels, warning when any was not already whole.

    Sub-pixel shifts are not modelled yet (SPEC 2): rounding is explicit, never a silent
    truncation.
    """
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    rounded = np.rint(positions)
    offset = np.abs(positions - rounded).max(initial=0.0)
    if offset > 1e-6:
        warnings.warn(
            f"{name}: sub-pixel scan positions are not supported yet; rounded to whole "
            f"pixels (largest change {offset:.3f} px)",
            stacklevel=2,
        )
    return rounded.astype(np.int64)


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
        The probe ``omega`` (numpy or CuPy; used on the device of the data).
    positions : (N_FRAMES, 2) float or int
        Window corners ``(row, col)``, angle-major; rounded with a warning if not whole.
    frame_offset : (N_THETA + 1,) int
        Frames of angle ``a`` are ``[frame_offset[a], frame_offset[a + 1])``.
    image_shape : (nz, n)
        Projection image shape.

    Notes
    -----
    ``fwd``: ``(N_THETA, nz, n) -> (N_FRAMES, M, M)``; ``adj``: the reverse.
    """

    def __init__(self, probe, positions, frame_offset, image_shape):
        self.m = int(probe.shape[-1])
        if tuple(probe.shape) != (self.m, self.m):
            raise ValueError(f"Ptycho: probe must be square (M, M), got {probe.shape}")
        self.probe = probe
        self.positions = integer_positions(positions)
        self.frame_offset = np.asarray(frame_offset, dtype=np.int64)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.n_theta = self.frame_offset.size - 1
        self.n_frames = int(self.frame_offset[-1])
        if self.positions.shape[0] != self.n_frames:
            raise ValueError(
                f"Ptycho: {self.positions.shape[0]} positions but frame_offset ends at "
                f"{self.n_frames}"
            )
        check_windows(self.positions, self.image_shape, self.m)
        self.angle = np.repeat(np.arange(self.n_theta), np.diff(self.frame_offset))
        nz, n = self.image_shape
        r, c = self.positions[:, 0], self.positions[:, 1]
        self.pad = int(max(0, -r.min(initial=0), -c.min(initial=0),
                           (r + self.m - nz).max(initial=0), (c + self.m - n).max(initial=0)))
        self.groups = overlap_free_groups(self.positions, self.angle, self.m)
        self._index_cache: dict = {}

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
            r = self.positions[:, 0] + self.pad
            c = self.positions[:, 1] + self.pad
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

    def fwd(self, v):
        """``psi_j = omega * S_j v``."""
        probe = self._probe_as(v)
        if kernels.available(v, probe) and tuple(v.shape) == self.image_stack_shape:
            (a, r, c), _ = self._indices(np)
            return kernels.window_fwd(self._padded(v, np), probe, a, r, c)
        return probe * self.extract(v)

    def adj(self, psi):
        """``sum_j S_j^H (conj(omega) * psi_j)``."""
        probe = self._probe_as(psi)
        if kernels.available(psi, probe) and tuple(psi.shape) == self.data_shape:
            (a, r, c), _ = self._indices(np)
            p = self.pad
            nz, n = self.image_shape
            padded = np.zeros((self.n_theta, nz + 2 * p, n + 2 * p), dtype=psi.dtype)
            kernels.window_adj(psi, probe, a, r, c, padded)
            return padded if p == 0 else np.ascontiguousarray(padded[:, p:-p, p:-p])
        return self.scatter(probe.conj() * psi)

    def illumination(self, dtype=None):
        """``W = sum_j S_j^H |omega|^2`` per angle: ``(N_THETA, nz, n)`` real."""
        xp = get_xp(self.probe)
        rdtype = real_dtype(dtype or self.probe.dtype)
        intensity = (xp.abs(self.probe) ** 2).astype(rdtype)
        return self.scatter(xp.ascontiguousarray(xp.broadcast_to(intensity, self.data_shape)))
