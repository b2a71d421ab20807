"""Per-angle 2-D ptychography (ADMM with the same z-step as APT) and the 2-step pipeline.

2-D ptychography, for each angle ``t`` independently: unknown image ``v_t`` ``(nz, n)``,
``min sum_j G(F(omega * S_j v_t))`` split as ``z_j = F(omega * S_j v_t)``. Each iteration:

1. ``v = (sum_j S_j^H conj(omega) F^H(z_j + lam2_j) + delta v) / (W + delta)``, the exact
   minimiser of ``r2/2 ||z + lam2 - A v||^2 + delta r2/2 ||v - v_prev||^2`` (the damping
   ``delta`` keeps unilluminated pixels at their previous value instead of dividing by
   ``W ~ 0``, which makes undamped per-angle ptychography collapse on sparse scans);
2. optional probe update with the paper's formula (one probe shared by all angles);
3. ``z = prox_G(A v - lam2)``, ``lam2 += z - A v`` (the z-step of APT, with its smoothed
   likelihood ``B_eps`` when ``epsilon > 0``).

As in APT (:mod:`ptmpi.solvers.penalty`), ``r2`` is doubled (and the scaled ``lam2``
halved) when successive steps of the images point backwards and the relative change
stops shrinking: the period-2 cycle of ADMM on the nonconvex likelihood. The test uses
sums over all angles, so ``r2`` and the iterates do not depend on the rank count.

Incoherent probe modes (``probe_modes = K > 1``, mixed-state ptychography,
:mod:`ptmpi.operators.modes`): the model intensity is ``sum_k |F(omega_k S_j v)|^2``, and
the split keeps one far field per mode, ``z`` and ``lam2`` of shape
``(K, N_FRAMES_LOCAL, M, M)``. Step 1 sums the modes,
``v = (sum_k S^H conj(omega_k) F^H(z_k + lam2_k) + delta v) / (sum_k W_k + delta)``; step 2
updates each mode by the closed form and then rotates the modes into their orthogonal
basis (SVD, strongest first), mixing ``lam2`` by the same unitary matrix (no model
changes); step 3 is the radial prox of :func:`ptmpi.solvers.prox.prox_data_modes`, which
scales every mode of a pixel alike. ``K = 1`` is the single-probe code path.

The 2-step baseline then removes each recovered projection's arbitrary global complex
factor (aligned to the projection of the empty sample ``u = 1``) and solves the
tomography ``min_u sum_t ||P_t u - v_t||^2`` by CG from ``u = 0``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable

import numpy as np

from ptmpi.backend import get_xp, real_dtype, synchronize, to_device
from ptmpi.mask import valid_only
from ptmpi.metrics import r_factor_sums, r_factor_value
from ptmpi.operators.fft import FarField
from ptmpi.operators.modes import ModePtycho, mix_modes, modulus, orthogonalise, solver_modes
from ptmpi.operators.ptycho import Ptycho, guard_probe
from ptmpi.operators.tomo import Projector
from ptmpi.parallel.comm import SerialComm, angle_sums
from ptmpi.parallel.data_term import probe_modes_from_views
from ptmpi.parallel.volume import VolumeSpace
from ptmpi.solvers.cg import conjugate_gradient
from ptmpi.solvers.penalty import cycling, step_cosine
from ptmpi.solvers.prox import LIKELIHOODS, update_data_split

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Ptycho2DSettings:
    """Settings of the per-angle ptychography and of the 2-step tomography."""

    iterations: int = 100
    """ADMM iterations of the per-angle ptychography (the paper's 2-step used 100)."""
    likelihood: str = "ipm"
    """``agm`` or ``ipm``."""
    r2: float = 0.1
    """ADMM penalty of ``z = A v`` (dimensionless)."""
    damping: float = 0.1
    """``delta`` as a fraction of the mean illumination of the illuminated pixels."""
    refine_probe: bool = False
    """Update the (shared) probe every iteration."""
    probe_start: int = 0
    """First iteration (0-based) of the probe updates."""
    epsilon: float = 0.0
    """Smoothing ``eps`` of the likelihood (``B_eps``, :mod:`ptmpi.solvers.prox`), photons."""
    adapt_r2: bool = True
    """Double ``r2`` when the iteration cycles (see ``penalty_window``)."""
    penalty_window: int = 10
    """Iterations over which a cycle is detected (:func:`ptmpi.solvers.penalty.cycling`)."""
    oscillation_threshold: float = 0.3
    """Mean cosine between successive image steps below minus this: steps alternate."""
    stagnation: float = 0.8
    """... and the relative change summed over the window above this fraction of the
    window before."""
    r2_max_factor: float = 64.0
    """``r2`` is raised at most to this multiple of its starting value."""
    tomo_iterations: int = 10
    """CG iterations of the tomography step of the 2-step method (as in the paper)."""
    probe_modes: int = 1
    """Incoherent probe modes ``K`` (mixed-state ptychography, :mod:`ptmpi.operators.modes`);
    1: the single coherent probe."""
    probe_guard: bool = False
    """Keep the probe's last row and column at zero, from the start and after every probe
    update (:func:`~ptmpi.operators.ptycho.guard_probe`): the exp model's initialisation
    under ``--align`` when its probe is guarded (:mod:`ptmpi.solvers.align`, notes)."""

    def __post_init__(self):
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.iterations < 0 or self.tomo_iterations < 0:
            raise ValueError("iterations must be >= 0")
        if self.r2 <= 0 or self.damping <= 0:
            raise ValueError("r2 and damping must be > 0")
        if self.epsilon < 0 or self.probe_start < 0 or self.penalty_window < 0:
            raise ValueError("epsilon, probe_start and penalty_window must be >= 0")
        if self.probe_modes < 1:
            raise ValueError(f"probe_modes must be >= 1, got {self.probe_modes}")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if self.probe_modes == 1:  # single-mode parameters are written as before modes
            del out["probe_modes"]
        if not self.probe_guard:  # (likewise without the guard)
            del out["probe_guard"]
        return out


@dataclasses.dataclass
class Ptycho2DState:
    v_local: object  # (N_THETA_LOCAL, H, W) complex images
    z_local: object  # (N_FRAMES_LOCAL, M, M); with K > 1 modes (K, N_FRAMES_LOCAL, M, M)
    lam2_local: object  # as z_local
    omega: object  # (M, M) probe; with K > 1 modes (K, M, M)
    iteration: int = 0
    history: dict = dataclasses.field(default_factory=dict)


def solve_ptycho2d(v0_local, f_local, probe, positions_local, frame_offset_local,
                   settings: Ptycho2DSettings, comm: SerialComm, *,
                   callback: Callable[[Ptycho2DState, dict], None] | None = None,
                   valid_local=None, shared_image: bool = False) -> Ptycho2DState:
    """Per-angle ptychography of this rank's angles, started from images ``v0_local``.

    Parameters
    ----------
    v0_local : (N_THETA_LOCAL, H, W) complex
        Starting images (e.g. projections of the empty sample); sets device and dtype.
    f_local : (N_FRAMES_LOCAL, M, M) real
        Counts with zero frequency at ``[0, 0]``.
    probe : (M, M) complex, or (K, M, M) probe modes
        With ``settings.probe_modes = K > 1`` an ``(M, M)`` probe is expanded into ``K``
        modes (:func:`~ptmpi.operators.modes.initial_modes`); a ``(K, M, M)`` one is used
        as given. The far fields and multipliers are then ``(K, N_FRAMES_LOCAL, M, M)``,
        the image update sums the modes, the probe update (the closed form, mode by mode)
        is followed by an orthogonalisation of the modes (:func:`orthogonalise`, with the
        multipliers mixed alike so the iteration is unchanged), and the R-factor uses the
        modulus ``sqrt(sum_k |d_k|^2)``.
    positions_local, frame_offset_local : this rank's scan (see :class:`Ptycho`).
    valid_local : bool (M, M) or (N_FRAMES_LOCAL, M, M), optional
        Detector mask (:mod:`ptmpi.mask`): invalid pixels take no part in the likelihood
        or the R-factor, and their counts are never read.
    shared_image : bool
        The ranks hold frames of the same image(s) (a 2-D dataset split by frames): the
        image update's sums over frames (``S^H conj(omega) F^H (z + lam2)`` and ``W``) are
        reduced over ``comm`` in double precision, and the images are replicated.
    """
    xp = get_xp(v0_local)
    dtype = v0_local.dtype
    rdtype = real_dtype(dtype)
    omega = to_device(probe, xp).astype(dtype)
    n_modes = settings.probe_modes
    omega = solver_modes(omega, n_modes)
    if settings.probe_guard:
        omega = guard_probe(omega)
    if n_modes > 1:
        ptycho = ModePtycho(omega, positions_local, frame_offset_local, v0_local.shape[1:])
    else:
        ptycho = Ptycho(omega, positions_local, frame_offset_local, v0_local.shape[1:])
    farfield = FarField()
    valid = None if valid_local is None else to_device(valid_local, xp)
    f_local = valid_only(to_device(f_local, xp).astype(rdtype), valid)
    sqrt_f = xp.sqrt(f_local)
    r2 = settings.r2

    def illumination():
        w = ptycho.illumination(rdtype)
        if shared_image:
            w = comm.allreduce_sum(w.astype(np.float64)).astype(rdtype)
            lit = np.array([float(w.sum()), float((w > 0).sum())])
        else:  # per angle, so that the damping does not depend on the split over ranks
            lit = angle_sums(comm, xp.stack([xp.sum(w, axis=(-2, -1), dtype=xp.float64),
                                             xp.sum(w > 0, axis=(-2, -1), dtype=xp.float64)],
                                            axis=1))
        # a Python float: a numpy float64 scalar would promote complex64 images (NEP 50)
        return w, float(settings.damping * lit[0] / max(lit[1], 1.0))

    weight, delta = illumination()
    v = v0_local.copy()
    d = farfield.fwd(ptycho.fwd(v))
    state = Ptycho2DState(v_local=v, z_local=d, lam2_local=xp.zeros_like(d), omega=omega)
    for key in ("iteration", "r_factor", "rel_change", "wall_s", "r2"):
        state.history[key] = []
    sqrt_f_sum = comm.allreduce_scalar(float(xp.sum(sqrt_f, dtype=xp.float64)))
    stats = np.zeros(3)  # local [||z - d||^2, ||z - z_old||^2, sum G(d)]
    prev_step, prev_norm, turns = None, 0.0, []
    t_start = time.perf_counter()
    for _ in range(settings.iterations):
        # z + lam2 in z's memory (z is replaced by this iteration's z-step), propagated
        # back in place: no new frame-sized arrays
        target = state.z_local
        target += state.lam2_local
        state.z_local = None
        v_old = state.v_local
        refine = settings.refine_probe and state.iteration >= settings.probe_start
        # the back-propagated targets, kept for the probe update when there is one
        exit_waves = farfield.adj(target, overwrite=True)
        target = None
        back = ptycho.adj(exit_waves)
        if not refine:
            exit_waves = None
        if shared_image:
            back = comm.allreduce_sum(back.astype(np.complex128)).astype(dtype)
        v = (back + delta * v_old) / (weight + delta)
        if refine:
            if n_modes > 1:
                omega = probe_modes_from_views(ptycho.extract(v), exit_waves, comm,
                                               ptycho=ptycho.geometry)
                state.omega, mixing = orthogonalise(omega)
                state.lam2_local = mix_modes(state.lam2_local, mixing, in_place=True)
            else:  # (probe_from_views from the targets already propagated back)
                state.omega = probe_modes_from_views(ptycho.extract(v), exit_waves[None],
                                                     comm, ptycho=ptycho)[0]
            if settings.probe_guard:  # (orthogonalised modes of guarded modes are guarded)
                state.omega = guard_probe(state.omega)
            ptycho.probe = state.omega
            weight, delta = illumination()
        exit_waves = None
        d = farfield.fwd(ptycho.fwd(v), overwrite=True)
        # (with modes the split statistics are not used: skipped)
        z = update_data_split(d, state.lam2_local, f_local, r2, settings.likelihood, valid,
                              settings.epsilon, None, stats if n_modes == 1 else None)
        state.z_local, state.v_local = z, v
        state.iteration += 1
        step = v - v_old
        model = modulus(d) if n_modes > 1 else d  # the modulus sqrt(sum_k |d_k|^2)
        num = comm.allreduce_scalar(r_factor_sums(model, sqrt_f=sqrt_f, valid=valid)[0])
        if shared_image:  # only the R-factor's sum is over frames; the images are replicated
            step2, norm2 = float(xp.linalg.norm(step)) ** 2, float(xp.linalg.norm(v)) ** 2
            dot = 0.0 if prev_step is None else float(xp.vdot(prev_step, step).real)
        else:  # per angle: the r2 rule's decisions do not depend on the split over ranks
            per_angle = [xp.sum(xp.abs(step) ** 2, axis=(-2, -1), dtype=xp.float64),
                         xp.sum(xp.abs(v) ** 2, axis=(-2, -1), dtype=xp.float64),
                         xp.zeros(v.shape[0], dtype=xp.float64) if prev_step is None else
                         xp.sum((xp.conj(prev_step) * step).real, axis=(-2, -1),
                                dtype=xp.float64)]
            step2, norm2, dot = angle_sums(comm, xp.stack(per_angle, axis=1))
        synchronize(xp)
        row = {
            "iteration": state.iteration,
            "r_factor": r_factor_value(num, sqrt_f_sum),
            "rel_change": math.sqrt(step2 / norm2) if norm2 > 0 else math.inf,
            "wall_s": time.perf_counter() - t_start,
            "r2": r2,
        }
        for key, value in row.items():
            state.history[key].append(value)
        if callback is not None:
            callback(state, row)
        if not math.isfinite(row["rel_change"]):
            raise FloatingPointError(f"iteration {state.iteration}: the images are no longer "
                                     "finite (diverged)")
        turn = step_cosine(dot, math.sqrt(step2), prev_norm) if prev_step is not None else None
        if turn is not None:
            turns.append(turn)
        prev_step, prev_norm = step, math.sqrt(step2)
        if (settings.adapt_r2 and r2 < settings.r2_max_factor * settings.r2
                and cycling(turns, state.history["rel_change"], settings.penalty_window,
                            settings.oscillation_threshold, settings.stagnation)):
            r2 *= 2
            state.lam2_local *= 0.5
            turns.clear()
            logger.info("iteration %d: successive steps alternate; r2 raised to %.4g",
                        state.iteration, r2)
    return state


def align_global_factor(v_local, reference_local):
    """Multiply each image by the complex scalar that best matches it to its reference.

    Ptychography recovers each projection only up to a global complex factor (phase,
    and scale when the probe is refined); the reference is the empty-sample projection.
    """
    xp = get_xp(v_local)
    out = xp.empty_like(v_local)
    for t in range(v_local.shape[0]):
        v, ref = v_local[t], reference_local[t]
        norm = float(xp.vdot(v, v).real)
        zeta = complex(xp.vdot(v, ref)) / norm if norm > 0 else 1.0
        out[t] = zeta * v
    return out


def normalise_pair(v_local, omega, reference_local, comm: SerialComm,
                   shared_image: bool = False):
    """Images and probe with ptychography's arbitrary global factor removed, the model kept.

    The far fields ``F(omega * S_j v_t)`` keep their modulus under ``v_t -> c e^{i phi_t} v_t``,
    ``omega -> omega / c`` (``c > 0`` common to all angles, since the probe is shared; a
    phase ``phi_t`` per angle, which the measured intensities do not see). ``phi_t`` and
    ``c`` are the least-squares best match of the images to their references (the
    empty-sample projections): ``phi_t = arg <v_t, ref_t>``,
    ``c = sum_t |<v_t, ref_t>| / sum_t ||v_t||^2`` over all angles of all ranks. With one
    angle ``c e^{i phi}`` is the factor of :func:`align_global_factor`.

    Returns ``(images_local, omega)``: the stored pair that reproduces the R-factor.
    """
    xp = get_xp(v_local)
    dots = [complex(xp.vdot(v_local[t], reference_local[t])) for t in range(v_local.shape[0])]
    sums = np.array([sum(abs(c) for c in dots), float(xp.vdot(v_local, v_local).real)])
    if not shared_image:
        sums = comm.allreduce_sum(sums)
    scale = sums[0] / sums[1] if sums[1] > 0 and sums[0] > 0 else 1.0
    out = xp.empty_like(v_local)
    for t, dot in enumerate(dots):
        phase = dot / abs(dot) if abs(dot) > 0 else 1.0
        out[t] = v_local[t] * (scale * phase)
    return out, (omega / scale).astype(omega.dtype)


def tomography_cg(projector: Projector, v_local, comm: SerialComm, iterations: int,
                  space=None):
    """``min_u sum_t ||P_t u - v_t||^2`` by CG on the normal equations, from ``u = 0``.

    ``comm`` sums the ranks' parts of ``P^H v`` (their angles); ``space``: the volume's
    :class:`~ptmpi.parallel.volume.VolumeSpace`, split in z-slabs where ``projector`` is
    a slab's (default: the whole volume, unsplit). The dot products are its per-slice sums
    in either case, so that a split volume gives the same iterates as a whole one."""
    xp = get_xp(v_local)
    dtype = v_local.dtype
    space = VolumeSpace(projector.shape) if space is None else space
    rhs = comm.allreduce_sum(projector.adj(v_local, np.complex128)).astype(dtype)

    def normal(x):
        return comm.allreduce_sum(projector.adj(projector.fwd(x), np.complex128)).astype(dtype)

    return conjugate_gradient(normal, rhs, xp.zeros(projector.shape, dtype=dtype), iterations,
                              space=space)
