"""APT and APTs: ADMM for joint ptychography-tomography (Chang et al., ICIP 2019, Alg. 1).

Problem: ``min_u sum_{j,t} G(D_{j,t}(omega, u)) + tv_weight * TV(u)``.

Symbols (as in the paper):

``u``
    complex volume ``(nz, n, n)``, replicated on every rank.
``z`` (``z_local``)
    far-field split variable, one ``(M, M)`` frame per scan position and angle; each rank
    holds only the frames of its angles.
``p``
    gradient split variable ``(3, nz, n, n)``, replicated.
``lam1``, ``lam2`` (``lam2_local``)
    the multipliers Lambda_1 (of ``p = grad u``) and Lambda_2 (of ``z = D u``), scaled form.
``r1``, ``r2``
    ADMM penalties; ``tv_weight`` is the paper's lambda.
``omega``
    the probe ``(M, M)``.

Augmented Lagrangian (scaled form)::

    sum G(z) + tv_weight ||p||_1 + r1/2 ||p - grad u + lam1||^2 + r2/2 ||z - D u + lam2||^2

Step 1 (u): minimise ``r1/2 ||p + lam1 - grad u||^2 + r2/2 ||z + lam2 - D u||^2``, whose
normal equations, with ``grad^H = -div`` and ``D^H D = sum_t P_t^H W_t P_t``, are::

    (-r1 Lap + r2 sum_t P_t^H W_t P_t) u = -r1 div(p + lam1) + r2 D^H (z + lam2)

solved by a few CG iterations warm-started from the previous ``u``.
Step 2: ``z = prox_G(D u - lam2)``, ``p = shrink(grad u - lam1, tv_weight / r1)``.
Step 3: ``lam1 += p - grad u``, ``lam2 += z - D u``.
APTs is ``tv_weight = r1 = 0`` (no ``p``, no ``lam1``).

Distribution: each rank applies ``D`` for its own angles; the only collectives are one
Allreduce per normal-operator application, one for the right-hand side, and the scalars
of the metrics. Everything replicated is computed identically on every rank.

With the angle x slab grid (``layout``, ``--slabs S > 1``) the volume-space arrays (``u``,
``p``, ``lam1``, the CG vectors and the preconditioner) hold this rank's z-slab only: the
data term is :class:`~ptmpi.parallel.slab_data_term.SlabDataTerm`, the gradient
:class:`~ptmpi.parallel.volume.SlabGradient`, and every sum over the volume goes through
the :class:`~ptmpi.parallel.volume.VolumeSpace` (``volume``); the loop below is the same.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable

import numpy as np

from ptmpi.backend import real_dtype, synchronize, to_device, to_host
from ptmpi.mask import valid_only
from ptmpi.metrics import r_factor_sums, r_factor_value
from ptmpi.operators import kernels
from ptmpi.operators.modes import mix_modes, modulus, solver_modes
from ptmpi.operators.ptycho import guard_probe, is_guarded
from ptmpi.parallel.comm import Comm
from ptmpi.parallel.data_term import DataTerm, probe_from_views  # noqa: F401
from ptmpi.parallel.slab_data_term import layout_terms
from ptmpi.parallel.volume import VolumeSpace
from ptmpi.progress import REPLICATED
from ptmpi.solvers.align import (
    AlignOptions,
    iteration_cap,
    make_aligner,
    refit_pending,
)
from ptmpi.solvers.cg import conjugate_gradient
from ptmpi.solvers.penalty import cycling, step_cosine
from ptmpi.solvers.prox import (
    LIKELIHOODS,
    data_objective,
    prox_data,
    prox_data_modes,
    shrink_isotropic,
    total_variation,
    update_data_split,
    update_tv_split,
)
from ptmpi.solvers.regularisation import default_r2, default_tv_weight

logger = logging.getLogger(__name__)

ALGORITHMS = ("apt", "apts")


@dataclasses.dataclass(frozen=True)
class SolverSettings(AlignOptions):
    """Settings of APT / APTs. ``None`` means "choose from the data" (see :func:`resolve`)."""

    algorithm: str = "apt"
    """``apt`` (with TV) or ``apts`` (``tv_weight = r1 = 0``)."""
    iterations: int = 1000
    """Maximum number of outer ADMM iterations (the run stops earlier on convergence,
    ``tol``). 1000 since the TV continuation: noise-free data keep improving long after
    200, and settle in the second half (docs/solver.md)."""
    tol: float = 1e-4
    """Stop when the relative change ``||u_k - u_{k+1}|| / ||u_{k+1}||`` has stayed below it
    for ``tol_window`` iterations (0: run all ``iterations``)."""
    tol_window: int = 5
    """See ``tol``."""
    likelihood: str = "ipm"
    """Data fidelity ``G``: ``agm`` (amplitude Gaussian) or ``ipm`` (Poisson)."""
    tv_weight: float | None = None
    """TV weight lambda; default from ``L = ||D^H D||`` and the noise (:func:`resolve`)."""
    r1: float | None = None
    """Penalty of ``p = grad u``; default ``tv_weight / shrink_threshold``."""
    r2: float | None = None
    """Penalty of ``z = D u`` (dimensionless); default
    ``min(r2_default_max, r2_factor d / L, r2_ray_factor / n)`` (:func:`resolve`)."""
    epsilon: float | None = None
    """Smoothing ``eps`` of the likelihood (the paper's ``B_eps``); default from the data:
    ``epsilon_counts`` for photon-counting data, 0 for noise-free data."""
    epsilon_counts: float = 10.0
    """Default ``epsilon`` for photon-counting data, in photons per pixel."""
    cg_iterations: int = 8
    """CG iterations per u-step (warm-started)."""
    relaxation: float = 1.0
    """ADMM over-relaxation alpha in (0, 2); 1 is the paper's Algorithm 1."""
    precondition: bool | None = None
    """Jacobi-precondition the u-step CG with the diagonal of its operator. Default (None):
    only when ``r1 > 0``, whose Laplacian term keeps that diagonal away from 0; without it
    (APTs) unlit voxels have a vanishing diagonal and Jacobi amplifies the noise there."""
    precondition_floor: float = 1e-6
    """Floor of that diagonal, relative to its maximum (bounds the step in unlit voxels)."""
    refine_probe: bool = False
    """Update the probe each iteration with the paper's closed form."""
    probe_start: int = 0
    """First iteration of probe updates (0: from the start, as in the paper)."""
    tv_factor: float = 5e-6
    """Default ``tv_weight / L`` for noise-free data."""
    tv_noise_factor: float = 0.32
    """Default extra TV weight per ``sigma sqrt(d)`` for Poisson (integer) counts, ``d`` the
    mean diagonal of ``D^H D`` (:mod:`ptmpi.solvers.regularisation`)."""
    shrink_threshold: float = 0.05
    """Default ``tv_weight / r1``."""
    tv_continuation: str = "auto"
    """Lower the TV weight as the iteration proceeds (``auto``: on noise-free data when
    the weight is the default one; ``on``; ``off``). At iteration ``k`` past
    ``tv_continuation_start`` the weight is ``tv_weight * tv_continuation_rate ** (k -
    tv_continuation_start)``, but not below ``max(tv_continuation_floor * tv_weight,
    tv_continuation_voxel * d)`` (``d`` the mean diagonal of ``D^H D``); ``r1`` stays, so
    the shrink threshold falls with it. Why: on exact data TV only has to fill what the
    data do not measure; the noise-free weight ``tv_factor * L``, which fills it quickly,
    grows with the length of a ray relative to what one voxel is measured with (``L / d``)
    and later holds the iterate away from the data (docs/solver.md: TV
    continuation)."""
    tv_continuation_start: int = 100
    """See ``tv_continuation``."""
    tv_continuation_rate: float = 0.99
    """See ``tv_continuation``."""
    tv_continuation_floor: float = 0.1
    """See ``tv_continuation``."""
    tv_continuation_voxel: float = 1e-3
    """See ``tv_continuation``: the TV threshold of a voxel, ``tv_weight / d``, stays at
    least this fraction of the unit background; a weight already below it stays."""
    adapt_r2: bool | None = None
    """Raise ``r2`` when the iteration cycles (see ``penalty_window``). Default: for
    photon-counting data, and on noise-free APT from ``params["r2_adapt_from"]``: the later
    of half of ``iterations`` and the iteration where the TV continuation reaches its
    floor (or would reach it, where there is none: 330 with the default schedule); before
    it, raising ``r2`` on noise-free data stops their slow approach (1.3-1.7 dB at 200
    iterations at 128^3, docs/solver.md)."""
    early_stop: bool | None = None
    """APTs on photon-counting data: stop once the R-factor has stayed more than 1% above its
    minimum for ``penalty_window`` iterations and return the iterate of the minimum (APTs
    has no regulariser and fits the noise). Default: on for APTs, off for APT."""
    penalty_window: int = 10
    """Iterations over which a period-2 cycle is detected (mean cosine between successive
    steps of ``u`` below ``-oscillation_threshold``); 0 keeps ``r2`` fixed."""
    oscillation_threshold: float = 0.3
    """See ``penalty_window``."""
    stagnation: float = 0.8
    """... and the mean relative change of ``u`` over the window above this fraction of
    that over the window before (a cycle that no longer shrinks)."""
    r2_max_factor: float = 64.0
    """``r2`` is raised at most to this multiple of its starting value."""
    r1_factor: float = 1e-4
    """Default ``r1 / L`` when ``tv_weight`` is 0."""
    r2_factor: float = 20.0
    """Default ``r2 = min(r2_default_max, r2_factor d / L)``, ``d`` the mean diagonal of
    ``D^H D`` and ``L`` its norm: 0.1 at 32^3, 0.09 at 48^3, 0.07 at 64^3, 0.035 at 128^3
    on the paper's geometry (docs/solver.md)."""
    r2_default_max: float = 0.1
    """See ``r2_factor``: the paper's value, which volumes up to about 48^3 keep."""
    r2_ray_factor: float = 4.8
    """The default ``r2`` is at most ``r2_ray_factor / n``, ``n`` the volume's lateral size
    (0: no such bound): scans that light the angles unlike the paper's grids (dense,
    overlapping, offset) lower ``L / d`` and would get a larger ``r2`` (docs/solver.md)."""
    power_iterations: int = 10
    """Power iterations used to estimate ``L``."""
    start: str = "ones"
    """Starting point: ``ones`` (the paper's ``u = 1``), ``coarse`` (coarse-to-fine) or
    ``two-step`` (the 2-step result), :mod:`ptmpi.solvers.start`."""
    start_iterations: int = 100
    """``start = coarse``: iterations (at most) of each coarse level; ``two-step``: the
    per-angle ptychography iterations of the 2-step method."""
    start_levels: int = 1
    """``start = coarse``: number of coarse levels (each halves the volume)."""
    align_outlier_factor: float = 2.0
    """``--align``: at the first shift update ``align_outlier_after`` iterations after
    the settled restart, an angle whose amplitude misfit per count is above this multiple
    of the median angle's is re-fitted against a volume built without it over
    ``align_leave_out_iterations`` iterations, aside from the run's state; where that
    moves its shift (``align_confirm_px``) the reconstruction restarts with every angle
    (:mod:`ptmpi.solvers.align`, leave-one-out re-fit; 0: never)."""
    align_outlier_after: int = 100
    """See ``align_outlier_factor``."""
    align_leave_out_iterations: int = 100
    """See ``align_outlier_factor``."""
    align_confirm_px: float = 0.1
    """``--align``: the re-fit of the left-out angles restarts the reconstruction only
    where it moves a shift by more than this (pixels); otherwise the run goes on
    unchanged (a false alarm of ``align_outlier_factor``)."""
    probe_modes: int = 1
    """Incoherent probe modes ``K`` (mixed-state, :mod:`ptmpi.operators.modes`): ``z`` and
    ``lam2`` then hold one far field per mode, ``(K, N_FRAMES_LOCAL, M, M)``."""

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.iterations < 0 or self.cg_iterations < 1:
            raise ValueError("iterations must be >= 0 and cg_iterations >= 1")
        for name in ("tv_weight", "r1"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.r2 is not None and self.r2 <= 0:
            raise ValueError(f"r2 must be > 0, got {self.r2}")
        if self.start not in ("ones", "coarse", "two-step"):
            raise ValueError(f"start must be 'ones', 'coarse' or 'two-step', got "
                             f"{self.start!r}")
        if self.start_iterations < 0 or self.start_levels < 1:
            raise ValueError("start_iterations must be >= 0 and start_levels >= 1")
        if self.probe_modes < 1:
            raise ValueError(f"probe_modes must be >= 1, got {self.probe_modes}")
        if self.tv_continuation not in ("auto", "on", "off"):
            raise ValueError("tv_continuation must be 'auto', 'on' or 'off', got "
                             f"{self.tv_continuation!r}")
        if not (0 < self.tv_continuation_rate <= 1 and 0 <= self.tv_continuation_floor <= 1
                and self.tv_continuation_start >= 0 and self.tv_continuation_voxel >= 0):
            raise ValueError("tv_continuation needs 0 < rate <= 1, 0 <= floor <= 1, "
                             "voxel >= 0 and start >= 0")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if self.probe_modes == 1:  # single-mode settings (and checkpoints) as before modes
            del out["probe_modes"]
        return out


@dataclasses.dataclass
class LocalProblem:
    """What a rank needs: the global geometry and its own frames.

    ``f_local`` holds counts with zero frequency at ``[0, 0]``; ``valid_local`` the
    detector mask in the same layout (:mod:`ptmpi.mask`): its invalid pixels take no part
    in the likelihood or the R-factor, and their counts are never read.
    """

    volume_shape: tuple[int, int, int]
    theta_local: np.ndarray  # (N_THETA_LOCAL,) radians
    f_local: object  # (N_FRAMES_LOCAL, M, M) real, numpy or CuPy
    positions_local: np.ndarray  # (N_FRAMES_LOCAL, 2)
    frame_offset_local: np.ndarray  # (N_THETA_LOCAL + 1,)
    probe: object  # (M, M) complex initial probe
    truth_volume: object | None = None  # (nz, n, n) or this rank's z-slab, for SNR only
    valid_local: object | None = None  # bool (M, M) or (N_FRAMES_LOCAL, M, M); None: all valid


@dataclasses.dataclass
class ADMMState:
    """Full solver state (what a checkpoint holds, :mod:`ptmpi.io.checkpoint`).

    ``u`` ``(nz, n, n)``, ``p`` and ``lam1`` ``(3, nz, n, n)`` (None for APTs) and ``omega``
    ``(M, M)`` are replicated (on the slab grid ``u``, ``p``, ``lam1`` and ``step`` hold
    this rank's z-slab, ``nz_slab`` slices); ``z_local`` and ``lam2_local``
    ``(N_FRAMES_LOCAL, M, M)`` hold this rank's frames (with ``K`` probe modes: ``omega``
    ``(K, M, M)``, ``z_local`` and ``lam2_local`` ``(K, N_FRAMES_LOCAL, M, M)``).
    ``iteration`` counts completed
    iterations, ``history`` the metrics per iteration (lists), ``params`` the penalties in
    use (:func:`resolve`).
    """

    u: object
    z_local: object
    lam2_local: object
    p: object | None
    lam1: object | None
    omega: object
    step: object | None = None
    """``u_k - u_{k-1}`` of the last iteration (detects period-2 cycles across a resume)."""
    shifts_local: object | None = None
    """``(N_THETA_LOCAL, 2)`` float64 shifts of this rank's angles (``--align``; None
    without alignment), :mod:`ptmpi.solvers.align`."""
    shift_std_local: object | None = None
    """``(N_THETA_LOCAL, 2)`` float64 Cramer-Rao standard errors of those shifts at the
    final volume (set at the end of an ``--align`` run; not checkpointed),
    :func:`ptmpi.solvers.align.shift_precision`."""
    iteration: int = 0
    history: dict = dataclasses.field(default_factory=dict)
    params: dict = dataclasses.field(default_factory=dict)


def resolve(settings: SolverSettings, norm: float, noise_amplitude: float = 0.0,
            mean_diagonal: float | None = None, width: int = 0) -> dict:
    """The penalties actually used: explicit settings, else the data-scaled defaults.

    Rule (README, Reconstruction; measured in docs/solver.md):

    - ``L = ||D^H D||`` scales with photon count, scan density, angles and size, so a TV
      weight ``tv_factor * L`` keeps the balance of data and regularisation independent
      of them (noise-free data);
    - photon-counting data (integer counts) carry Poisson noise of standard deviation
      about ``sigma = 1/2`` in amplitude whatever the dose; the default adds
      ``tv_noise_factor * sigma * sqrt(d)``, ``d`` the mean diagonal of ``D^H D``: the TV
      threshold follows the noise level of a voxel of ``u``, ``sigma / sqrt(d)``
      (:mod:`ptmpi.solvers.regularisation`, calibrated at three doses from 24 to 45 dB
      intensity SNR);
    - ``r1 = tv_weight / shrink_threshold`` (the shrink threshold ``tv_weight / r1`` is a
      fixed fraction of the unit background of ``u``), or ``r1_factor * L`` without TV;
    - ``r2`` is dimensionless (both ``G`` have unit curvature in ``|z|``), so it does not
      follow the dose; it follows the shape of ``D^H D``:
      ``r2 = min(r2_default_max, r2_factor d / L, r2_ray_factor / n)``. ``L / d`` (the
      curvature of the smoothest mode over that of one voxel) grows with the length of a
      ray through the volume, and the best fixed ``r2`` fell with it on noise-free data
      (about 0.1 at 48^3, 0.05 at 96^3, 0.03-0.05 at 128^3; 12 angles, 200 iterations);
      volumes up to about 48^3 keep the paper's 0.1. Scans that light the angles unlike
      the paper's lined-up grids (dense, overlapping, offset) have a smaller ``L / d`` at
      the same ray length, and the bound ``r2_ray_factor / n`` (``n = width``, the
      volume's lateral size) keeps them from a larger ``r2`` (docs/solver.md).
    """
    apts = settings.algorithm == "apts"
    tv_weight = r1 = 0.0
    reason = ""
    if not apts:
        tv_weight = settings.tv_weight
        reason = "set explicitly (--tv-weight)"
        if tv_weight is None:
            tv_weight, reason = default_tv_weight(
                settings.tv_factor, settings.tv_noise_factor, norm, noise_amplitude,
                mean_diagonal if mean_diagonal is not None else 0.0)
        r1 = settings.r1
        if r1 is None:
            r1 = tv_weight / settings.shrink_threshold if tv_weight > 0 else (
                settings.r1_factor * norm)
    if settings.r2 is not None:
        r2, r2_rule = settings.r2, "set explicitly (--r2)"
    else:
        if not mean_diagonal or mean_diagonal <= 0 or norm <= 0:
            raise ValueError("the default r2 needs the norm and the mean diagonal of D^H D")
        r2, r2_rule = default_r2(settings.r2_factor, settings.r2_default_max, norm,
                                 mean_diagonal, ray_factor=settings.r2_ray_factor,
                                 width=width)
    epsilon = settings.epsilon
    if epsilon is None:
        epsilon = settings.epsilon_counts if noise_amplitude > 0 else 0.0
    if not apts and tv_weight > 0 and r1 == 0:
        raise ValueError("APT with tv_weight > 0 needs r1 > 0")
    params = {"tv_weight": float(tv_weight), "tv_weight_rule": reason if not apts else "apts",
              "r1": float(r1), "r2": float(r2), "r2_rule": r2_rule,
              "norm_DhD": norm, "mean_diagonal_DhD": mean_diagonal,
              "noise_amplitude": noise_amplitude,
              "epsilon": float(epsilon)}
    continuation = settings.tv_continuation == "on" or (
        settings.tv_continuation == "auto" and settings.tv_weight is None
        and noise_amplitude == 0)
    if not apts and tv_weight > 0 and continuation:
        start, rate = settings.tv_continuation_start, settings.tv_continuation_rate
        floor = max(settings.tv_continuation_floor * tv_weight,
                    settings.tv_continuation_voxel * (mean_diagonal or 0.0))
        if floor < tv_weight:
            why = ("noise-free data" if settings.tv_continuation == "auto"
                   else "--tv-continuation on")
            # from the later of the iteration where the weight reaches its floor and half
            # the budget, r2 is raised where the iterates cycle (the adaptive r2 of photon
            # counts), so that the run settles at the final weight
            settle = max(floor_reached(settings, floor / tv_weight),
                         settings.iterations // 2)
            params.update(tv_continuation=(
                f"tv_weight * {rate:g}^(k - {start}) from iteration {start}, down to "
                f"max({settings.tv_continuation_floor:g} tv_weight, "
                f"{settings.tv_continuation_voxel:g} d) = {floor:.4g} ({why}); r2 "
                f"adapted from iteration {settle}"),
                tv_continuation_start=int(start), tv_continuation_rate=float(rate),
                tv_continuation_min=float(floor), r2_adapt_from=int(settle))
    if not apts and noise_amplitude == 0 and "r2_adapt_from" not in params:
        # Noise-free APT without the continuation (its floor at or above the weight, as
        # at 32^3, or a weight given) swings too and settles at the same point: the later
        # of half the budget and where a continuation would have reached its floor.
        settle = max(floor_reached(settings, settings.tv_continuation_floor),
                     settings.iterations // 2)
        params.update(r2_adapt_from=int(settle), r2_settling=(
            f"r2 adapted from iteration {settle} (noise-free data, no TV continuation)"))
    return params


def floor_reached(settings: SolverSettings, ratio: float) -> int:
    """The iteration where the TV continuation's schedule has lowered the weight by
    ``ratio`` (its floor over the weight)."""
    rate = settings.tv_continuation_rate
    return settings.tv_continuation_start + (
        math.ceil(math.log(ratio) / math.log(rate)) if 0 < rate < 1 and 0 < ratio < 1 else 0)


def settling(params: dict, iteration: int) -> bool:
    """Whether iteration ``iteration`` of a noise-free run with the TV continuation is in
    its final phase, where ``r2`` adapts as for photon counts (``params["r2_adapt_from"]``,
    counted from the last restart of ``--align``; :func:`resolve`)."""
    start = params.get("r2_adapt_from")
    return start is not None and iteration >= start + int(params.get("align_restart_at", 0))


def tv_weight_at(params: dict, iteration: int) -> float:
    """The TV weight of iteration ``iteration`` (counted from 0, or from the last restart
    of ``--align``): ``params["tv_weight"]``, lowered by the TV continuation when the
    parameters hold one (:class:`SolverSettings`, ``tv_continuation``)."""
    weight = params["tv_weight"]
    start = params.get("tv_continuation_start")
    if start is None:
        return weight
    k = iteration - int(params.get("align_restart_at", 0)) - start
    if k <= 0:
        return weight
    rate, floor = params["tv_continuation_rate"], params["tv_continuation_min"]
    return max(floor, weight * rate ** k)


def _scaled_sum(wide_sum, r2: float, tv_term, r1: float, dtype):
    """``r2 * wide_sum + r1 * tv_term`` rounded once to ``dtype`` (``tv_term`` may be
    None): the u-system's right-hand side (and operator without TV) from the reduced data
    term."""
    if tv_term is not None and kernels.available(wide_sum, tv_term):
        return kernels.combine(wide_sum, r2, tv_term, r1, dtype)
    total = wide_sum.astype(dtype)
    total *= r2
    if tv_term is not None:
        total += r1 * tv_term
    return total


def _snr(u, truth, volume: VolumeSpace) -> float:
    from ptmpi.metrics import snr_db

    return snr_db(u, truth, comm=volume.group if volume.split else None)


def end_of_iteration(state: ADMMState, row: dict, callback, tol: float,
                     tol_window: int) -> bool:
    """After an iteration's bookkeeping (penalties included, so that a checkpoint written
    by ``callback`` resumes exactly): the callback, then the stops. Raises
    FloatingPointError on a non-finite volume; True when the relative change has stayed
    below ``tol`` for ``tol_window`` iterations (converged)."""
    if callback is not None:
        callback(state, row)
    if not math.isfinite(row["rel_change"]):
        raise FloatingPointError(
            f"the volume u is no longer finite: diverged at iteration {state.iteration}")
    recent = state.history["rel_change"][-max(tol_window, 1):]
    if tol > 0 and len(recent) >= tol_window and max(recent) < tol:
        logger.info("converged: relative change below %.3g for %d iterations", tol,
                    len(recent))
        return True
    return False


def volume_without(problem: LocalProblem, settings: SolverSettings, comm: Comm,
                   state: ADMMState, positions_local, left_out, xp, dtype):
    """The volume of ``settings.align_leave_out_iterations`` iterations from the initial
    state (``u = 1``) with this rank's frames ``left_out`` ((N_FRAMES_LOCAL,) bool) out
    of the likelihood, at ``positions_local`` and with the probe of ``state``, the
    penalties of ``state.params`` (collective): the leave-one-out volume of ``--align``
    (:meth:`ptmpi.solvers.align.Aligner.refit`). ``state`` is not changed; the iteration
    runs without alignment, stopping rule or probe update, and its own log is quiet."""
    t0 = time.perf_counter()
    m = problem.f_local.shape[-1]
    keep = np.broadcast_to(~np.asarray(left_out, dtype=bool)[:, None, None],
                           (left_out.size, m, m))
    if problem.valid_local is not None:
        keep = keep & np.asarray(to_host(problem.valid_local), dtype=bool)
    sub = dataclasses.replace(problem, positions_local=positions_local,
                              probe=to_host(state.omega), valid_local=np.array(keep),
                              truth_volume=None)
    sub_settings = dataclasses.replace(
        settings, iterations=int(settings.align_leave_out_iterations), tol=0.0, align=False,
        refine_probe=False, early_stop=False, start="ones")
    from ptmpi.solvers.start import start_state

    fresh = start_state(xp.ones(state.u.shape, dtype=dtype), state.omega, sub, settings, comm)
    fresh.params = {key: value for key, value in state.params.items()
                    if not key.startswith("align_") and key not in ("turns", "r2_now")}
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        built, _ = solve(sub, sub_settings, comm, xp=xp, dtype=dtype, state=fresh)
    finally:
        logger.setLevel(level)
    logger.info("volume without angle(s) %s: %d iterations, R-factor %.4g (%.1f s)",
                ", ".join(str(t) for t in state.params.get("align_leave_out", [])),
                built.iteration, built.history["r_factor"][-1], time.perf_counter() - t0)
    return built.u


def solve(problem: LocalProblem, settings: SolverSettings, comm: Comm,
          *, xp=np, dtype=np.complex64, state: ADMMState | None = None,
          callback: Callable[[ADMMState, dict], None] | None = None,
          layout=None) -> tuple[ADMMState, dict]:
    """Run APT / APTs on this rank's frames; returns the final state and the parameters.

    Parameters
    ----------
    problem : LocalProblem
        This rank's data (see :class:`LocalProblem`).
    settings : SolverSettings
    comm : a :class:`~ptmpi.parallel.Comm` (``SerialComm`` for one process).
    xp : array module (numpy, or cupy for a GPU run).
    dtype : complex dtype of the iterates.
    state : ADMMState, optional
        Resume from this state instead of the paper's initialisation. When it carries
        ``params`` (a checkpoint's), those penalties are used as they are: ``L`` is not
        estimated again, so a resumed run continues the interrupted one exactly.
    callback : called after every iteration with the state and that iteration's metrics.
    layout : :class:`~ptmpi.parallel.slab_data_term.SlabGrid`, optional
        The angle x slab grid; with more than one slab the volume arrays of ``state``
        (given and returned) are this rank's z-slab. None (or one slab): replicated.
    """
    rdtype = real_dtype(dtype)
    apt = settings.algorithm == "apt"
    probe = to_device(problem.probe, xp).astype(dtype)
    n_modes = settings.probe_modes
    probe = solver_modes(probe, n_modes)
    # --align with a guarded probe: every probe update keeps the guard (align.py notes)
    guard = settings.align and is_guarded(problem.probe)
    data, volume, grad = layout_terms(problem, probe, comm, layout, xp=xp, dtype=dtype)
    valid_all = None if problem.valid_local is None else to_device(problem.valid_local, xp)
    f_all = valid_only(to_device(problem.f_local, xp).astype(rdtype), valid_all)
    sqrt_f_all = xp.sqrt(f_all)

    valid, f_local, sqrt_f = valid_all, f_all, sqrt_f_all
    sqrt_f_sum = data.reduce(float(xp.sum(sqrt_f, dtype=xp.float64)))
    truth = (None if problem.truth_volume is None
             else to_device(volume.local(problem.truth_volume), xp))

    if state is not None and state.params:
        params = dict(state.params)
        norm, counting = params["norm_DhD"], params["noise_amplitude"] > 0
    else:
        norm = data.norm(settings.power_iterations)
        # Photon-counting data (all counts whole numbers): Poisson noise of amplitude ~1/2.
        counting = data.all(bool(xp.all(f_local == xp.rint(f_local))) if f_local.size else True)
        # the mean diagonal of D^H D sets r2 (and on counts the TV weight); APT keeps the
        # squared projector for its Jacobi preconditioner, for APTs it is a one-off
        params = resolve(settings, norm, 0.5 if counting else 0.0,
                         volume.mean(data.diagonal(keep=apt)), problem.volume_shape[-1])
    logger.info(
        "%s, %s likelihood: ||D^H D|| = %.4g, %s data; tv_weight = %.4g, r1 = %.4g, "
        "r2 = %.4g, %d CG iterations, up to %d iterations", settings.algorithm.upper(),
        settings.likelihood.upper(), norm, "photon-counting" if counting else "noise-free",
        params["tv_weight"], params["r1"], params["r2"], settings.cg_iterations,
        settings.iterations)
    if params.get("tv_weight_rule"):
        logger.info("TV weight: %s", params["tv_weight_rule"])
    if params.get("r2_rule"):
        logger.info("r2: %s", params["r2_rule"])
    if params.get("tv_continuation"):
        logger.info("TV continuation: %s", params["tv_continuation"])
    if params.get("r2_settling"):
        logger.info("r2: %s", params["r2_settling"])
    tv_weight, r1, r2 = params["tv_weight"], params["r1"], params["r2"]
    epsilon = params.get("epsilon", 0.0)

    if state is None:
        # Step 0: u = 1, z = D u, p = 0, multipliers 0.
        u = xp.ones(volume.local_shape, dtype=dtype)
        z = data.fwd(u)
        state = ADMMState(
            u=u, z_local=z, lam2_local=xp.zeros_like(z),
            p=xp.zeros((3, *u.shape), dtype=dtype) if apt else None,
            lam1=xp.zeros((3, *u.shape), dtype=dtype) if apt else None,
            omega=probe,
        )
    else:
        if guard:
            state.omega = guard_probe(state.omega)
        data.set_probe(state.omega)
    state.params = params
    for key in ("iteration", "r_factor", "rel_change", "wall_s") + (
            ("snr_db",) if truth is not None else ()):
        state.history.setdefault(key, [])

    aligner = make_aligner(settings, problem, comm,
                           outlier_factor=settings.align_outlier_factor,
                           outlier_after=settings.align_outlier_after,
                           leave_out_iterations=settings.align_leave_out_iterations,
                           confirm_px=settings.align_confirm_px)
    if aligner is not None:
        aligner.attach(state, data.set_positions)

    # Sums over angles are formed in double precision and rounded once, after the
    # reduction inside DataTerm: the result then does not depend on how angles are split
    # over ranks, which matters because the nonconvex iteration amplifies rounding.
    inv_diag = None

    def update_preconditioner():
        nonlocal inv_diag
        use = settings.precondition if settings.precondition is not None else r1 > 0
        if not use:
            return
        diag = data.diagonal().astype(rdtype) * r2
        if r1 > 0:
            diag += r1 * grad.normal_diagonal(xp, rdtype)
        floor = settings.precondition_floor * volume.max(float(diag.max()))
        inv_diag = (1.0 / xp.maximum(diag, floor)).astype(rdtype)

    update_preconditioner()

    # normal_op writes its result into a volume kept between calls (CG uses each result
    # before its next call): the CG loop then makes no new volume, each of which would be
    # mapped and faulted in afresh.
    kept = {}

    def normal_op(x):
        if r1 <= 0:
            return _scaled_sum(data.normal(x), r2, None, r1, dtype)
        kept["out"] = grad.normal_plus(x, data.normal(x), r2, r1, kept.get("out"))
        return kept["out"]

    t_start = time.perf_counter() - (state.history["wall_s"][-1] if state.history["wall_s"] else 0)
    stats_z = np.zeros(3)  # local [||z - D u||^2, ||z - z_old||^2, sum G(D u)]
    stats_p = np.zeros(3)  # [||p - grad u||^2, ||p - p_old||^2, TV(u)] (replicated)
    # u_k - u_{k-1}: successive steps pointing backwards = a period-2 cycle; the cosines
    # between successive steps since the last change of r2, and r2 itself, are part of
    # the state so that a resumed run continues exactly.
    early_stop = (not apt and counting) if settings.early_stop is None else settings.early_stop
    best = None  # (R-factor, iteration, u) of the best iterate so far, for early_stop
    first = state.iteration + 1 - len(state.history.get("iteration", []))
    prev_step = state.step
    prev_du = volume.norm(prev_step) if prev_step is not None else 0.0
    turns = list(params.get("turns", []))
    r2 = params.get("r2_now", r2)
    if r2 != params["r2"]:
        update_preconditioner()
    while state.iteration < iteration_cap(settings.iterations, state.params):
        # (a previous release's checkpoint inside its leave-out phase: the volume is one
        # built without the outlying angles, which are re-fitted against it at once)
        refit = aligner is not None and refit_pending(state.params)
        if refit or (aligner is not None and aligner.due(state.iteration, state)):
            images = data.model.projector.fwd(state.u)
            if refit:
                positions = aligner.refit(state, images, data.model.ptycho, sqrt_f, valid,
                                          state.iteration)
            else:
                positions = aligner.update(state, images, data.model.ptycho, sqrt_f, valid,
                                           state.iteration)
                if aligner.leave_out:  # the outlying angles against a volume without them
                    data.set_positions(positions)
                    without = volume_without(problem, settings, comm, state, positions,
                                             aligner.left_out_frames(state.params), xp, dtype)
                    positions = aligner.refit(state, data.model.projector.fwd(without),
                                              data.model.ptycho, sqrt_f, valid,
                                              state.iteration)
            data.set_positions(positions)
            if aligner.restart:  # the volume of misaligned data is dropped (align.py)
                state.u = xp.ones(volume.local_shape, dtype=dtype)
                state.z_local, state.step, prev_step = data.fwd(state.u), None, None
                for name in ("lam2_local", "p", "lam1"):
                    if getattr(state, name) is not None:
                        getattr(state, name)[...] = 0
                r2, best = params["r2"], None  # (APTs: the best iterate so far is gone)
                turns.clear()
            update_preconditioner()
        u_old = state.u
        z_old = state.z_local
        target = state.z_local + state.lam2_local
        # Step 1: u by CG on the SPD normal equations.
        rhs = _scaled_sum(data.adj(target), r2,
                          grad.adj_sum(state.p, state.lam1) if apt and r1 > 0 else None, r1,
                          dtype)
        u = conjugate_gradient(normal_op, rhs, u_old, settings.cg_iterations, inv_diag=inv_diag,
                               space=volume)
        if settings.refine_probe and state.iteration >= settings.probe_start:
            state.omega = data.update_probe(u, target, guard=guard)
            if n_modes > 1:  # the modes were rotated: their fields follow
                state.lam2_local = mix_modes(state.lam2_local, data.mode_mixing)
                z_old = mix_modes(z_old, data.mode_mixing)
            update_preconditioner()
        # Step 2: z and p; step 3: their multipliers.
        tv_weight = tv_weight_at(params, state.iteration)
        d = data.fwd(u)
        # Over-relaxation (alpha = 1 is the paper's ADMM): mix in the previous split value.
        alpha = settings.relaxation
        if alpha == 1:  # z-step and its multiplier update (step 3) together
            z = update_data_split(d, state.lam2_local, f_local, r2, settings.likelihood,
                                  valid, epsilon, z_old, stats_z)
        else:
            d_hat = alpha * d + (1 - alpha) * z_old
            prox = prox_data_modes if n_modes > 1 else prox_data
            z = prox(d_hat - state.lam2_local, f_local, r2, settings.likelihood, valid, epsilon)
            state.lam2_local += z - d_hat
            stats_z[:] = (float(xp.linalg.norm(z - d)) ** 2,
                          float(xp.linalg.norm(z - z_old)) ** 2,
                          data_objective(modulus(d) if n_modes > 1 else d, f_local,
                                         settings.likelihood, valid, epsilon))
        if apt and alpha == 1 and r1 > 0:
            # p-step and its multiplier update (step 3) together, one pass over u.
            state.p = update_tv_split(grad, u, state.lam1, tv_weight / r1, state.p, stats_p)
        elif apt:
            g = grad.fwd(u)
            g_hat = g if alpha == 1 else alpha * g + (1 - alpha) * state.p
            p = shrink_isotropic(g_hat - state.lam1, tv_weight / r1) if r1 > 0 else g_hat
            state.lam1 += p - g_hat
            stats_p[:] = (float(xp.linalg.norm(p - g)) ** 2,
                          float(xp.linalg.norm(p - state.p)) ** 2,
                          total_variation(g))
            state.p = p
        if apt and volume.split:  # the TV statistics of the slabs
            stats_p[:] = volume.sum(stats_p)
        state.z_local, state.u = z, u
        state.iteration += 1

        # Metrics of the iterate u_{k+1}: one reduction of the local sums of the data term.
        num = r_factor_sums(modulus(d) if n_modes > 1 else d, sqrt_f=sqrt_f, valid=valid)[0]
        num, primal_z2, dual_z2, likelihood = data.reduce([num, *stats_z])
        # the step is written over the previous one (its cosine with it taken first)
        step, du, un, back = volume.step(u, u_old, prev_step)
        turn = None if prev_step is None else step_cosine(back, du, prev_du)
        if turn is not None:
            turns.append(turn)
        prev_step, prev_du = step, du
        state.step = step
        synchronize(xp)
        row = {
            "iteration": state.iteration,
            "r_factor": r_factor_value(num, sqrt_f_sum),
            "rel_change": du / un if un > 0 else math.inf,
            "wall_s": time.perf_counter() - t_start,
            # ADMM residuals (Boyd et al. 2011, sec. 3.3): primal ||z - D u||, ||p - grad u||;
            # dual r2 ||z_k - z_{k-1}||, r1 ||p_k - p_{k-1}|| (the dual residuals
            # r2 ||D^H (z_k - z_{k-1})|| and r1 ||grad^H (p_k - p_{k-1})|| are at most
            # sqrt(||D^H D||) and sqrt(12) times these).
            "primal_z": math.sqrt(primal_z2),
            "primal_p": math.sqrt(stats_p[0]) if apt else 0.0,
            "dual_z": r2 * math.sqrt(dual_z2),
            "dual_p": r1 * math.sqrt(stats_p[1]) if apt else 0.0,
            # Objective of problem (3) at u: sum G(D u) + tv_weight TV(u).
            "objective": likelihood + tv_weight * float(stats_p[2]),
            "r2": r2,
            "tv_weight": tv_weight,
        }
        if truth is not None:
            row["snr_db"] = _snr(u, truth, volume)
        for key, value in row.items():
            state.history.setdefault(key, []).append(value)
        window = settings.penalty_window
        rel = state.history["rel_change"]
        adapt = settings.adapt_r2 if settings.adapt_r2 is not None else (
            counting or settling(params, state.iteration))
        # Decided before the callback, so that a checkpoint written there holds the
        # raised penalty and resumes exactly (it did not: a raise at a checkpoint's
        # iteration was lost on resume).
        if (adapt and math.isfinite(row["rel_change"])
                and cycling(turns, rel, window, settings.oscillation_threshold,
                            settings.stagnation)
                and r2 < settings.r2_max_factor * params["r2"]):
            # Successive steps of u point back and forth: the data split cycles (the
            # likelihood's negative curvature along the phase exceeds r2 somewhere). Double
            # r2; the scaled multiplier lam2 = y / r2 is halved so that y, and with it the
            # fixed points of the iteration, stay the same (Boyd et al. 2011, sec. 3.4.1).
            r2 *= 2
            state.lam2_local *= 0.5
            update_preconditioner()
            turns.clear()
            logger.info("iteration %d: successive steps alternate; r2 raised to %.4g",
                        state.iteration, r2)
        state.params["turns"] = turns[-2 * max(settings.penalty_window, 1):]
        state.params["r2_now"] = r2
        if end_of_iteration(state, row, callback, settings.tol, settings.tol_window):
            break
        if early_stop:
            r_now = row["r_factor"]
            if best is None or r_now < best[0]:
                best = (r_now, state.iteration, u.copy())
            elif (r_now > 1.01 * best[0]
                  and all(r > 1.01 * best[0]
                          for r in state.history["r_factor"][-settings.penalty_window:])):
                logger.warning(
                    "APTs fits the noise of these photon counts (no regulariser): R-factor "
                    "%.4g at iteration %d, up from %.4g at iteration %d; stopped and kept "
                    "iteration %d (APT, with TV, is the method for noisy data)", r_now,
                    state.iteration, best[0], best[1], best[1], extra=REPLICATED)
                state.u = best[2]
                params["early_stopped_at"] = best[1]
                params["noise_fit_detected_at"] = state.iteration
                # the metrics describe the returned volume: those of its iteration last
                state.history = {key: values[:best[1] - first + 1] if len(values) > 1 else values
                                 for key, values in state.history.items()}
                break
    if aligner is not None:
        aligner.precision(state, data.model.projector.fwd(state.u), data.model.ptycho, sqrt_f,
                          valid, counting)
    explain_r_factor(state.history, apt and counting)
    return state, params


def explain_r_factor(history: dict, counts: bool) -> None:
    """Log why the R-factor of an APT run on photon counts ends more than 1% above its
    minimum (docs/solver.md: the R-factor on sparse, low-dose data): it is an L1
    norm of amplitudes, smallest for a model dark where a pixel expects under about 0.7
    photons, while the solver minimises the likelihood (+ TV), which puts the expected
    count there; the objective's own trend is said beside it."""
    r = history.get("r_factor") or []
    if not (counts and r and r[-1] > 1.01 * min(r)):
        return
    k = int(np.argmin(r))
    objective = history.get("objective") or []
    trend = ("the objective (likelihood + TV) ends at its minimum" if objective
             and objective[-1] <= min(objective) else "the objective (likelihood + TV) "
             "does not end at its minimum either")
    logger.info("the R-factor ends %.1f%% above its minimum (%.4g at iteration %d); %s. On "
                "photon counts the R-factor, an L1 norm of amplitudes, favours models "
                "darker than the expected counts where pixels see under one photon "
                "(docs/solver.md: the R-factor on sparse, low-dose data)",
                100 * (r[-1] / min(r) - 1),
                min(r), history["iteration"][k], trend, extra=REPLICATED)
