"""Starting points of APT / APTs other than the paper's ``u = 1``: coarse-to-fine and the
2-step result.

``two-step`` (:func:`two_step_start`) runs the 2-step method on the same data (per-angle
ptychography from the empty-sample projections, each image matched to its empty-sample
projection by one complex factor, then least-squares tomography: the ``--algorithm
two-step`` pipeline) and starts from its volume with ``z = D u``, ``p = grad u`` and both
multipliers 0. On the paper's step 32 / 12 angles at 128^3 the 2-step volume scores 18.4
dB after about 2 s (2 ranks), and APT from it reaches 21 dB after 50 iterations instead
of 78 (docs/solver.md: Starting point).

``coarse`` solves the same problem on a volume of half the size and interpolates the
result as the start at full size. The coarse problem is made from the data themselves,
consistently with the model ``D(omega, u) = F(omega * S_j P_t u)`` (section 2 of SPEC):

- the far-field frames keep their central ``M/2 x M/2`` pixels (the low frequencies): a
  frame of half the size on the same frequency grid has a real-space pixel twice as large,
  so the object pixel doubles; the counts are the measured ones (photon counts stay
  photon counts, with their own Poisson noise);
- the volume ``(nz, n, n)`` becomes ``(nz/2, n/2, n/2)``: coarse voxel ``k`` is the
  average of fine voxels ``2k`` and ``2k + 1`` (SPEC 1 puts both grids' centres at 0);
- scan positions halve (odd positions become half-pixel ones, handled as sub-pixel);
- the probe is resampled by cropping its unitary Fourier transform to the central
  ``M/2 x M/2`` (band-limited resampling at the coarse pixel centres, half a fine pixel
  off the fine ones) and scaled by 4: a coarse projection is half the fine one (half as
  many voxels of the same value along a ray) and the unitary transform of a frame of a
  quarter of the pixels is half that of the full frame at the same frequency, so
  ``|D_coarse(omega_c, u_c)|^2`` matches the central counts (tests check it).

The coarse model is approximate at the edge of the cropped band (a detector pixel at
frequency ``k`` also sees object frequencies ``k - q`` for every ``q`` in the probe's
spectrum, beyond the coarse grid): its likelihood uses only the inner frequencies
(:data:`INNER_FRACTION`), and its misfit is treated as noise (smoothed likelihood, adaptive
``r2``, TV weight :data:`COARSE_TV_WEIGHT`). The coarse solve is ``solve`` itself (same
``DataTerm``, same ranks and frames), run for ``start_iterations`` iterations or until
it converges; a coarse level may itself start from a coarser one (``start_levels``). Its
``u`` is interpolated trilinearly to full size; ``z = D u``, ``p = grad u`` and both
multipliers 0 (the paper's initialisation, at the new ``u``); a refined probe carries its
low frequencies back into the full-size probe.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from ptmpi.backend import get_xp, to_device

logger = logging.getLogger(__name__)

STARTS = ("ones", "coarse", "two-step")
"""``ones``: the paper's ``u = 1``; ``coarse``: coarse-to-fine; ``two-step``: the 2-step
result (this module)."""

INNER_FRACTION = 0.5
"""The coarse likelihood uses only the cropped frequencies within this fraction of the
coarse Nyquist radius: a detector pixel at frequency ``k`` sees object frequencies
``k - q`` for every ``q`` in the probe's spectrum, which the coarse grid represents only
for small ``|k|`` (measured at 64^3: the model error of the binned truth is 0.5% of the
counts at radius 2 of 8 and 13%, 44%, 110% at radius 4, 6, 8)."""

MIN_SIZE = 8
"""A coarse level needs at least this many voxels and probe pixels along each axis."""

COARSE_TV_WEIGHT = 0.1
"""TV weight of the coarse levels (photons per unit of TV)."""


def can_coarsen(volume_shape, probe_size: int) -> bool:
    """True when the problem halves exactly: even volume sides, probe size a multiple of 4,
    and the coarse volume and probe at least :data:`MIN_SIZE`."""
    nz, n, _ = volume_shape
    return (nz % 2 == 0 and n % 2 == 0 and probe_size % 4 == 0
            and min(nz, n) // 2 >= MIN_SIZE and probe_size // 2 >= MIN_SIZE)


def _crop_centre(a, size: int):
    """The central ``size x size`` frequencies of frames with zero frequency at ``[0, 0]``
    (last two axes), returned with zero frequency at ``[0, 0]``."""
    xp = get_xp(a)
    m = a.shape[-1]
    lo = m // 2 - size // 2
    shifted = xp.fft.fftshift(a, axes=(-2, -1))[..., lo:lo + size, lo:lo + size]
    return xp.fft.ifftshift(shifted, axes=(-2, -1))


def _half_pixel_ramp(m: int, sign: float):
    """``exp(sign * i pi k / m)`` on the unshifted frequencies ``k`` of an ``m x m`` grid:
    a shift of the image by ``sign * 1/2`` pixel (Fourier shift theorem)."""
    k = np.fft.fftfreq(m) * m
    ramp = np.exp(sign * 1j * np.pi * k / m)
    return ramp[:, None] * ramp[None, :]


def coarse_probe(probe):
    """``(M, M)`` probe -> ``(M/2, M/2)`` probe of the coarse problem (see module notes)."""
    xp = get_xp(probe)
    m = probe.shape[-1]
    spectrum = xp.fft.fft2(probe, norm="ortho") * to_device(_half_pixel_ramp(m, 1.0), xp)
    # cropping the unitary spectrum samples the probe at every other pixel, times 2
    coarse = xp.fft.ifft2(_crop_centre(spectrum, m // 2), norm="ortho")
    return (2.0 * coarse).astype(probe.dtype)


def fine_probe(coarse, probe):
    """The full-size probe whose central frequencies are those of ``coarse`` (a refined
    coarse probe), the others those of ``probe``: the inverse of :func:`coarse_probe` on
    the frequencies the coarse level sees."""
    xp = get_xp(probe)
    m = probe.shape[-1]
    spectrum = xp.fft.fft2(probe, norm="ortho") * to_device(_half_pixel_ramp(m, 1.0), xp)
    low = xp.fft.fft2(coarse / 2.0, norm="ortho")
    shifted = xp.fft.fftshift(spectrum)
    lo = m // 2 - m // 4
    shifted[lo:lo + m // 2, lo:lo + m // 2] = xp.fft.fftshift(low)
    spectrum = xp.fft.ifftshift(shifted) * to_device(_half_pixel_ramp(m, -1.0), xp)
    return xp.fft.ifft2(spectrum, norm="ortho").astype(probe.dtype)


def bin_volume(u):
    """``(nz, n, n)`` -> ``(nz/2, n/2, n/2)``: the mean of each ``2 x 2 x 2`` block."""
    nz, n, _ = u.shape
    return u.reshape(nz // 2, 2, n // 2, 2, n // 2, 2).mean(axis=(1, 3, 5))


def upsample_volume(u_coarse, shape):
    """Trilinear interpolation of the coarse volume to ``shape`` (twice its size): fine
    voxel ``i`` sits at coarse coordinate ``(i - 1/2) / 2``; values beyond the first and
    last coarse voxels are held constant."""
    xp = get_xp(u_coarse)
    out = u_coarse
    for axis, size in enumerate(shape):
        coarse_size = out.shape[axis]
        x = (np.arange(size) - 0.5) / 2.0
        x = np.clip(x, 0, coarse_size - 1)
        i0 = np.minimum(np.floor(x).astype(np.int64), coarse_size - 1)
        i1 = np.minimum(i0 + 1, coarse_size - 1)
        w = (x - i0).astype(np.float32)
        shape_w = [1] * out.ndim
        shape_w[axis] = size
        w = to_device(w.reshape(shape_w), xp)
        a = xp.take(out, to_device(i0, xp), axis=axis)
        b = xp.take(out, to_device(i1, xp), axis=axis)
        out = a + w * (b - a)
    return out.astype(u_coarse.dtype)


def coarse_problem(problem):
    """The :class:`~ptmpi.solvers.admm.LocalProblem` at half the size (module notes)."""
    m = problem.probe.shape[-1]
    xp = get_xp(problem.f_local)
    valid = None if problem.valid_local is None else _crop_centre(problem.valid_local, m // 2)
    k = np.fft.fftfreq(m // 2) * (m // 2)
    inner = to_device(np.hypot(k[:, None], k[None, :]) < INNER_FRACTION * m / 4, xp)
    valid = inner if valid is None else xp.logical_and(valid, inner)
    truth = problem.truth_volume
    return dataclasses.replace(
        problem,
        volume_shape=tuple(s // 2 for s in problem.volume_shape),
        f_local=_crop_centre(problem.f_local, m // 2),
        positions_local=np.asarray(problem.positions_local, dtype=np.float64) / 2.0,
        probe=coarse_probe(problem.probe),
        truth_volume=None if truth is None else bin_volume(truth),
        valid_local=valid,
    )


def start_state(u, omega, problem, settings, comm, layout=None, terms=None):
    """The paper's initialisation at the volume ``u`` (full size, on the device of the
    run; with ``layout``, the angle x slab grid of more than one slab, this rank's z-slab)
    and probe ``omega``: ``z = D u``, ``p = grad u`` (APT), both multipliers 0. ``terms``:
    the :func:`~ptmpi.parallel.slab_data_term.layout_terms` of ``problem`` and ``omega``
    where the caller has them."""
    from ptmpi.parallel.slab_data_term import layout_terms
    from ptmpi.solvers.admm import ADMMState

    xp = get_xp(u)
    data, _, grad = terms or layout_terms(problem, omega, comm, layout, xp=xp, dtype=u.dtype)
    z = data.fwd(u)
    apt = settings.algorithm == "apt"
    return ADMMState(u=u, z_local=z, lam2_local=xp.zeros_like(z),
                     p=grad.fwd(u) if apt else None,
                     lam1=xp.zeros((3, *u.shape), dtype=u.dtype) if apt else None,
                     omega=omega)


def coarse_start(problem, settings, comm, *, xp=np, dtype=np.complex64, level: int = 1):
    """Solve the coarse problem and return the full-size :class:`ADMMState` to start from,
    and a dict that describes what was done (stored with the run's parameters).

    Returns ``(None, info)`` when the problem does not halve (:func:`can_coarsen`).
    """
    from ptmpi.solvers.admm import solve

    m = problem.probe.shape[-1]
    if not can_coarsen(problem.volume_shape, m) or settings.start_iterations < 1:
        return None, {"start": "ones", "start_reason": (
            f"volume {tuple(problem.volume_shape)} / probe {m} do not halve"
            if settings.start_iterations >= 1 else "start_iterations is 0")}
    t0 = time.perf_counter()
    small = coarse_problem(problem)
    inner = None
    if level < settings.start_levels:
        inner, _ = coarse_start(small, settings, comm, xp=xp, dtype=dtype, level=level + 1)
    # The coarse model is not exact: its misfit acts as noise, so the coarse level is
    # solved as noisy data are (smoothed likelihood, adaptive r2, the noise term of TV).
    coarse_settings = dataclasses.replace(
        settings, iterations=settings.start_iterations, start="ones",
        epsilon=settings.epsilon if settings.epsilon is not None else settings.epsilon_counts,
        adapt_r2=True, tv_weight=settings.tv_weight if settings.tv_weight is not None
        else COARSE_TV_WEIGHT, r1=None)
    logger.info("coarse-to-fine start, level %d: volume %s, probe %d, up to %d iterations "
                "(solved as noisy data: the coarse model is approximate; TV weight %.3g)",
                level, small.volume_shape, m // 2, settings.start_iterations,
                coarse_settings.tv_weight)
    state_c, params_c = solve(small, coarse_settings, comm, xp=xp, dtype=dtype, state=inner)
    u = upsample_volume(state_c.u, tuple(problem.volume_shape))
    probe = to_device(problem.probe, xp).astype(dtype)
    omega = fine_probe(state_c.omega, probe) if settings.refine_probe else probe
    state = start_state(u, omega, problem, settings, comm)
    history = state_c.history
    info = {
        "start": "coarse",
        "start_iterations_done": len(history.get("iteration", [])),
        "start_wall_s": time.perf_counter() - t0,
        "start_shape": list(small.volume_shape),
        "start_tv_weight": params_c["tv_weight"],
    }
    if history.get("snr_db"):
        info["start_snr_db_coarse"] = history["snr_db"][-1]
    if problem.truth_volume is not None:
        from ptmpi.metrics import snr_db

        info["start_snr_db"] = snr_db(u, to_device(problem.truth_volume, xp))
    logger.info("coarse-to-fine start, level %d: %d iterations in %.1f s%s", level,
                info["start_iterations_done"], info["start_wall_s"],
                f"; interpolated start {info['start_snr_db']:.2f} dB"
                if "start_snr_db" in info else "")
    return state, info


def two_step_start(problem, settings, comm, *, xp=np, dtype=np.complex64, layout=None):
    """Run the 2-step method on ``problem`` (``settings.start_iterations`` per-angle
    ptychography iterations with ``settings.likelihood``, the probe as given, then the
    tomography of :func:`~ptmpi.solvers.ptycho2d.tomography_cg`) and return the
    :class:`ADMMState` to start APT / APTs from, with a dict that describes what was done
    (stored with the run's parameters).

    ``layout``: the angle x slab grid (:class:`~ptmpi.parallel.slab_data_term.SlabGrid`).
    With more than one slab the volume is never held whole: each rank's images of its own
    angles are transposed to slab rows (as the slab data term's projections are) and the
    tomography is solved slab by slab (the projection is slice-separable), the state
    returned on this rank's slab."""
    from ptmpi.solvers.ptycho2d import (
        Ptycho2DSettings,
        align_global_factor,
        solve_ptycho2d,
        tomography_cg,
    )

    t0 = time.perf_counter()
    from ptmpi.parallel.slab_data_term import layout_terms, to_slabs

    omega = to_device(problem.probe, xp).astype(dtype)
    terms = layout_terms(problem, omega, comm, layout, xp=xp, dtype=dtype)
    data, volume = terms[:2]
    slabs = volume.split
    # the empty sample's projections of this rank's angles (full height)
    empty = (data.project if slabs else data.model.projector.fwd)(
        xp.ones(volume.local_shape, dtype=dtype))
    ptycho = Ptycho2DSettings(iterations=settings.start_iterations,
                              likelihood=settings.likelihood)
    logger.info("2-step start: per-angle ptychography, %d iterations, then %d CG "
                "iterations of tomography", ptycho.iterations, ptycho.tomo_iterations)
    images = solve_ptycho2d(empty, to_device(problem.f_local, xp), problem.probe,
                            problem.positions_local, problem.frame_offset_local, ptycho,
                            comm, valid_local=problem.valid_local).v_local
    images = align_global_factor(images, empty)
    if slabs:  # this rank's slab rows of every angle of its group; sums over the groups
        rows = to_slabs(images, layout.group, data.counts, volume.bounds)
        u = tomography_cg(data.projector, rows, layout.slab_comm, ptycho.tomo_iterations,
                          space=volume).astype(dtype)
    else:
        u = tomography_cg(data.model.projector, images, comm,
                          ptycho.tomo_iterations).astype(dtype)
    state = start_state(u, omega, problem, settings, comm, layout=layout, terms=terms)
    info = {"start": "two-step", "start_iterations_done": int(ptycho.iterations),
            "start_wall_s": time.perf_counter() - t0}
    if problem.truth_volume is not None:
        from ptmpi.metrics import snr_db

        # the SNR of the whole volume (from the slabs' sums where it is split)
        info["start_snr_db"] = snr_db(u, to_device(volume.local(problem.truth_volume), xp),
                                      comm=volume.group if slabs else None)
    logger.info("2-step start: %.1f s%s", info["start_wall_s"],
                f"; start {info['start_snr_db']:.2f} dB" if "start_snr_db" in info else "")
    return state, info
