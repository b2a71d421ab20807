"""This machine's floors, measured in the same run, and the floor of an APT iteration.

Rates are measured on the rank's own core(s), all ranks at once (so ranks sharing a node
share its bandwidth, as in a run), each as the best of its repeats (a floor is what the
machine can do, not what it usually does):

- memory bandwidth ``B``: a copy of a 256 MiB array (far beyond any cache), counting the
  bytes read and written;
- the FFT: the same library, in place on a preallocated batch of the run's actual shape
  ``(N_FRAMES_LOCAL, M, M)``, forward then inverse;
- multiply-adds: an in-cache BLAS ``sgemm`` (:func:`fma_rate`).

The floor of a stage is the time to move the bytes it cannot avoid moving at ``B`` (each
operand read once and each result written once per use, fused; caches assumed perfect
within a stage), or, for the FFT, the measured FFT time. The projector is bound by
arithmetic rather than memory, so its floor is the larger of that memory time and its
multiply-adds (``2 nnz nz`` per ``P``, twice that per float64 ``P^H``) at the rate of an
in-cache ``sgemm``. The floor of an iteration is the sum over stages;
``iteration_bandwidth`` is the same sum with the projector's memory time only (the memory
and FFT floors alone).

The byte counts per iteration, with ``V`` one complex volume, ``Pr`` the local
projections, ``Fr`` the local frames, ``K = cg_iterations + 1`` normal-operator
applications and ``Mx`` the projector's sparse matrices (float32 pair for ``P``, float64
pair for the wide sums):

===========  ==========================================================================
projector    ``K (V + 2V + Pr/2 + Mx) + (V + Pr) + (Pr + 2V)``: each ``P^H W P`` reads u,
             writes its complex128 sum, reads W; plus one ``P`` and one wide ``P^H``
fft          two batches at the measured FFT time
windowing    ``2 (Pr + Fr)``: images read and frames written, and back
cg           ``7V`` per CG iteration (read x, r, d, Ad; write x, r, d) + ``3V``
tv           ``2V K + 17V``: the Laplacian in each normal operator, ``div(p + lam1)``
             (7V) and the gradient, shrink and multiplier update (10V)
prox         ``4.5 Fr``: read D u, lam2, counts; write z, lam2
allreduce    ``4V (K + 1)`` on more than one rank (each complex128 sum read and written)
other        ``4.5 Fr + 2V``: z + lam2, the R-factor and the relative change
===========  ==========================================================================
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from ptmpi.backend import synchronize


def _times(fn, repeat: int, xp, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeat)):
        synchronize(xp)
        t0 = time.perf_counter()
        fn()
        synchronize(xp)
        times.append(time.perf_counter() - t0)
    return times


def median_time(fn, repeat: int, xp=np, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeat`` calls after ``warmup`` calls (seconds)."""
    return statistics.median(_times(fn, repeat, xp, warmup))


def best_time(fn, repeat: int, xp=np, warmup: int = 1) -> float:
    """Shortest wall time of ``fn()`` over ``repeat`` calls: what a floor is measured by
    (the machine's best, not its typical, rate)."""
    return min(_times(fn, repeat, xp, warmup))


def memory_bandwidth(repeat: int = 5, nbytes: int = 256 * 2**20, xp=np) -> float:
    """Copy bandwidth in bytes per second (read + write counted)."""
    src = xp.ones(nbytes // 8, dtype=xp.float64)
    dst = xp.empty_like(src)
    seconds = best_time(lambda: xp.copyto(dst, src), repeat, xp)
    return 2 * src.nbytes / seconds


def fft_floor(shape, dtype, repeat: int = 5, xp=np) -> float:
    """Seconds for one forward and one inverse in-place FFT of a batch ``shape``."""
    from ptmpi.backend import fft_module
    from ptmpi.operators.fft import workers

    fft = fft_module(xp)
    batch = xp.ones(shape, dtype=dtype)
    kwargs = {"workers": workers(), "overwrite_x": True} if xp is np else {"overwrite_x": True}

    def both():
        fft.ifft2(fft.fft2(batch, norm="ortho", **kwargs), norm="ortho", **kwargs)

    return best_time(both, repeat, xp)


def fma_rate(repeat: int = 5, xp=np) -> float:
    """Real single-precision fused multiply-adds per second of an in-cache matrix product
    (the BLAS ``sgemm`` of 256 x 256 blocks, with the run's BLAS threads)."""
    a = xp.ones((256, 256), dtype=xp.float32)
    b = xp.ones((256, 256), dtype=xp.float32)
    c = xp.empty((256, 256), dtype=xp.float32)
    return 256**3 / best_time(lambda: xp.matmul(a, b, out=c), max(repeat, 20), xp)


def iteration_floor(*, volume_shape, n_theta_local, n_frames_local, probe_size, nnz,
                    cg_iterations, n_ranks, itemsize, bandwidth, fft_seconds,
                    fma_per_second=None) -> dict:
    """Floor of each stage of one APT iteration (seconds; see the module docstring).

    With ``fma_per_second`` the projector's floor is the larger of its memory time and
    its arithmetic time (``projector_fma`` below); ``iteration_bandwidth`` is always the
    memory-and-FFT floor alone.
    """
    nz, n, _ = volume_shape
    vol = nz * n * n * itemsize
    proj = n_theta_local * nz * n * itemsize
    frames = n_frames_local * probe_size**2 * itemsize
    matrices = nnz * (4 + 4) * 2 + nnz * (8 + 4) * 2
    k = cg_iterations + 1
    stage_bytes = {
        "projector": k * (3 * vol + proj / 2 + matrices) + (vol + proj) + (proj + 2 * vol),
        "windowing": 2 * (proj + frames),
        "cg": 7 * vol * cg_iterations + 3 * vol,
        "tv": 2 * vol * k + 17 * vol,
        "prox": 4.5 * frames,
        "allreduce": 4 * vol * (k + 1) if n_ranks > 1 else 0.0,
        "other": 4.5 * frames + 2 * vol,
    }
    floors = {stage: b / bandwidth for stage, b in stage_bytes.items()}
    floors["fft"] = fft_seconds
    bandwidth_only = sum(floors.values())
    if fma_per_second:
        # Each non-zero multiplies every real column of every slice, in P (float32) and in
        # the float64 P^H (half the vector lanes: counted twice): K + 1 of each.
        fmas = (nnz * 2 * nz) * (1 + 2) * (k + 1)
        floors["projector"] = max(floors["projector"], fmas / fma_per_second)
    floors["iteration"] = sum(floors.values())
    floors["iteration_bandwidth"] = bandwidth_only
    return floors
