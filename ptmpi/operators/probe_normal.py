"""The normal operator of the probe's least-squares update with sub-pixel frames, as one
convolution.

Frame ``j`` sees the probe moved by its fraction ``f_j`` (:mod:`ptmpi.operators.ptycho`),
``shift_j(x) = F^H R_j F x`` with the unitary ``(M, M)`` DFT ``F`` and the phase ramp
``R_j(k) = exp(-2 pi i k . f_j / M)`` over the integer frequencies ``k`` in
``[-M/2, M/2)`` (per axis, ``numpy.fft.fftfreq`` times ``M``). The probe's normal
equations need

    N x = sum_j shift_j^H(w_j shift_j(x)),      w_j = |v_j|^2 (real).

A product with ``w_j`` is a circular convolution of spectra, ``F(w y) = (F w) (*) (F y) / M``,
so ``F N F^H`` has the entries

    sum_j R_j(k)^* (F w_j)((k - l) mod M) R_j(l) / M = G(k - l) / M,
    G(d) = sum_j (F w_j)(d mod M) exp(2 pi i d . f_j / M),   d in (-M, M) per axis:

the ramps' product depends on ``k - l`` alone because ``k`` and ``l`` are taken in
``[-M/2, M/2)`` without wrapping. ``N`` is therefore a *linear* convolution of the
centred spectrum of ``x`` with the kernel ``G``, done exactly by FFTs of size ``2M``.
Building ``G`` costs one FFT per frame and, per row of ``G``, one
``(2 x N_FRAMES) @ (N_FRAMES x 2M)`` product; each application then costs a few FFTs of
the probe's size and none per frame (the frame-by-frame form,
:meth:`~ptmpi.operators.ptycho.Ptycho.probe_normal`, the reference it is tested against,
costs two FFTs per frame). ``G`` is linear in the weights, so the ranks' kernels are summed
once (:meth:`ProbeNormal.reduce`) and the applications need no communication. The
centre of ``G`` (``d`` in ``[-M/2, M/2)``) is the spectrum of ``sum_j shift_j^H(w_j)``, the
denominator of the closed form (:meth:`ProbeNormal.denominator`). Frames at whole pixels
add ``w_j x`` pointwise and are kept out of ``G``.
"""

from __future__ import annotations

import numpy as np

from ptmpi.backend import get_xp, to_device
from ptmpi.operators.fft import fft2, rfft2

_CHUNK = 64  # frames per kernel product (bounds the (M, CHUNK, M + 2) temporary)


def frame_index(sel: np.ndarray, xp):
    """Index of the frames ``sel`` (sorted numpy indices): a slice when they are
    consecutive (a view instead of a copy), else the indices on ``xp``'s device."""
    if sel.size and sel[-1] - sel[0] + 1 == sel.size:
        return slice(int(sel[0]), int(sel[-1]) + 1)
    return to_device(sel, xp)


def _centred(x, xp):
    return xp.fft.fftshift(x, axes=(-2, -1))


def _uncentred(x, xp):
    return xp.fft.ifftshift(x, axes=(-2, -1))


class ProbeNormal:
    """``x -> sum_j shift_j^H(w_j shift_j(x))`` for ``(M, M)`` probes, from the kernel ``G``.

    Build with :meth:`from_weights` (this rank's frames), sum over ranks with
    :meth:`reduce`, then apply (``(M, M)`` or ``(K, M, M)``, complex128 out).
    """

    def __init__(self, kernel, whole, m: int):
        self.m = m
        self.kernel = kernel  # (2M, 2M) complex128: G(d) at index d + M
        self.whole = whole  # (M, M) float64: sum of w_j over frames at whole pixels
        self._spectrum = None

    @classmethod
    def from_weights(cls, weights, fractions, moved, whole):
        """This rank's part: ``weights`` ``(N_FRAMES, M, M)`` real (``|v_j|^2``),
        ``fractions`` ``(N_FRAMES, 2)`` float64, ``moved`` / ``whole``: numpy indices of the
        frames with and without a sub-pixel fraction."""
        xp = get_xp(weights)
        m = int(weights.shape[-1])
        whole_sum = xp.sum(weights[to_device(whole, xp)], axis=0, dtype=np.float64)
        half = m // 2 + 1
        # G is Hermitian (w_j real: G(-d) = conj G(d)): the columns d_c = -M .. -M + half - 1
        # and 0 .. half - 1 are formed (from the real-input FFT's columns 0 .. half - 1),
        # the others are their conjugates
        kernel = xp.zeros((m, 2, 2, half), dtype=np.complex128)  # [r, h, g, n]
        d = np.arange(-m, m, dtype=np.float64) / m
        d_cols = np.concatenate([d[:half], d[m : m + half]])
        for k0 in range(0, moved.size, _CHUNK):
            sel = moved[k0 : k0 + _CHUNK]
            f = fractions[sel]
            # exp(2 pi i d f / M) per frame, over the rows d = -M .. M - 1 and the columns
            ramp_r = np.exp(2j * np.pi * f[:, 0, None] * d[None, :])
            ramp_c = np.exp(2j * np.pi * f[:, 1, None] * d_cols[None, :])
            # per-frame spectra in the weights' precision, products and sums over frames in
            # double (a sum in single precision would depend on which frames a rank holds)
            spectra = rfft2(weights[frame_index(sel, xp)])  # (C, M, half)
            # (F w_j)(d mod M) over d = -M .. M - 1 is the spectrum tiled twice per axis,
            # so rows r and r + M of G read the same spectrum row r:
            # cols[r, j, (g, n)] = (F w_j)(r, n) ramp_c[j, (g, n)]
            cols = spectra.transpose(1, 0, 2)[:, :, None, :] * to_device(
                ramp_c.reshape(1, sel.size, 2, half), xp)
            rows = to_device(np.ascontiguousarray(
                ramp_r.reshape(sel.size, 2, m).transpose(2, 1, 0)), xp)  # [r, h, j]
            # G[h M + r, (g, n)] += sum_j ramp_r[j, h M + r] cols[r, j, (g, n)]: one
            # (2 x C) @ (C x 2 half) product per r
            kernel += xp.matmul(rows, cols.reshape(m, sel.size, 2 * half)).reshape(
                m, 2, 2, half)
        # [r, h, g, n] -> G[h M + r, g M + n]
        full = xp.zeros((2 * m, 2 * m), dtype=np.complex128)
        view = full.reshape(2, m, 2, m)
        view[:, :, :, :half] = kernel.transpose(1, 0, 2, 3)
        kernel = full
        flip = (-np.arange(2 * m)) % (2 * m)  # index of -d (d = -M, never used, to itself)
        rest = np.concatenate([np.arange(half, m), np.arange(m + half, 2 * m)])
        kernel[:, to_device(rest, xp)] = kernel[to_device(flip, xp)][
            :, to_device(flip[rest], xp)].conj()
        return cls(kernel, whole_sum, m)

    def reduce(self, comm) -> None:
        """Sum the kernel and the whole-pixel weights over ``comm`` (in place)."""
        comm.allreduce_sum(self.kernel)
        comm.allreduce_sum(self.whole)
        self._spectrum = None

    def _kernel_spectrum(self):
        if self._spectrum is None:
            xp = get_xp(self.kernel)
            # circular kernel of size 2M (d = 0 at index 0), 1/M of F(w y) folded in
            self._spectrum = xp.fft.fft2(_uncentred(self.kernel, xp)) / self.m
        return self._spectrum

    def __call__(self, x):
        """``N x``: ``x`` ``(M, M)`` or ``(K, M, M)``; complex128 of the same shape."""
        xp = get_xp(x)
        m = self.m
        x = x.astype(np.complex128, copy=False)
        padded = xp.zeros((*x.shape[:-2], 2 * m, 2 * m), dtype=np.complex128)
        padded[..., :m, :m] = _centred(fft2(x), xp)
        conv = xp.fft.ifft2(xp.fft.fft2(padded) * self._kernel_spectrum())[..., :m, :m]
        return fft2(_uncentred(conv, xp), inverse=True) + x * self.whole

    def denominator(self):
        """``sum_j shift_j^H(w_j)`` (float64 ``(M, M)``): the closed form's denominator,
        the centre of ``G`` brought back to real space, plus the whole-pixel weights."""
        xp = get_xp(self.kernel)
        m = self.m
        lo = m - m // 2  # index of d = -(M // 2)
        centre = self.kernel[lo : lo + m, lo : lo + m]
        return fft2(_uncentred(centre, xp), inverse=True).real + self.whole
