"""APT / APTs for the exponential model (SPEC 8, ``--model exp``): ``t_t = exp(i P_t u)``.

Problem: ``min_u sum_{j,t} G(F(omega * S_j exp(i P_t u))) + tv_weight * TV(u)``, from
empty space ``u = 0`` or the initialisation below. Two split variables per angle separate the
ptychography from the tomography (the design of ptychotomo and of tike's joint ADMM):

``psi`` (``psi_local``)
    the transmission images ``(N_THETA_LOCAL, nz, n)``, split from ``exp(i P_t u)``;
``z`` (``z_local``)
    the far fields ``(N_FRAMES_LOCAL, M, M)``, split from ``Q psi = F(omega * S_j psi)``;
``p``
    the gradient ``(3, nz, n, n)`` (APT only), split from ``grad u``;

with scaled multipliers ``mu`` (``mu_local``), ``lam2`` and ``lam1`` and penalties ``rho``,
``r2``, ``r1``. Augmented Lagrangian::

    sum G(z) + tv_weight ||p||_1 + r2/2 ||z - Q psi + lam2||^2
        + rho/2 ||psi - exp(i P u) + mu||^2 + r1/2 ||p - grad u + lam1||^2

Initialisation (``init_iterations > 0``, :func:`initial_volume`): per-angle
ptychography from ``psi = 1`` (:func:`ptmpi.solvers.ptycho2d.solve_ptycho2d`), then a
tomography of the projected phase *gradient* of those images from ``u = 0``
(:func:`gauss_newton` with ``fit="gradient"``): it fits, for each pair of neighbouring
detector pixels, the wrapped difference of their phase increments, so it unwraps
whenever neighbours differ by less than pi, and it does not see each image's global
phase (which ptychography cannot recover). Without it the joint iteration started from
``u = 0`` falls into the wrapped solution as soon as the projected phase passes pi
(measured: SNR below 0 dB at 3 pi), as any local fit of ``exp(i P u)`` does.
``algorithm="two-step"`` stops after the initialisation. The fit has no regulariser, so
its Gauss-Newton steps (8 CG each) are its regularisation: :func:`init_gn_steps` takes
20 per 32 voxels of the volume's width. Its lowest spatial frequencies converge slowest,
the more so the wider the volume: with 20 steps at 128^3 the joint iterations stalled
with the error in those frequencies (default exp geometry, noise-free: 10.5 dB; 80
steps: 18.3 dB; 128^3 at eta 100: -4.7 against 12.0 dB), while at 32^3 60 steps cost the
low-dose cases 0.6-1.1 dB (docs/exp-model.md).

One joint iteration:

1. psi-step, closed form per pixel, since ``Q^H Q = W = sum_j S_j^H |omega|^2`` is
   diagonal: ``psi = (r2 Q^H(z + lam2) + rho (t - mu)) / (r2 W + rho)``, ``t = exp(i P u)``;
   then the gauge: each angle's ``psi``, ``z``, ``lam2`` are rotated together by the
   unit factor aligning ``psi`` with ``t - mu`` (far-field data are blind to it, so this
   minimises the augmented Lagrangian exactly over it); with ``refine_probe`` and
   ``probe_joint`` the probe is then updated by the paper's closed form
   ``omega = sum_j conj(S_j psi) F^H(z + lam2) / sum_j |S_j psi|^2`` (each frame's term
   moved back by its sub-pixel shift); with ``refine_probe`` alone the probe is refined
   in the initialisation only (its per-angle ptychography shares one probe);
2. z-step, the closed-form prox of the linear model (:mod:`ptmpi.solvers.prox`) on
   ``Q psi - lam2``, and ``lam2 += z - Q psi``;
3. u-step: ``gn_iterations`` Gauss-Newton steps on
   ``rho/2 sum_t ||exp(i P_t u) - (psi_t + mu_t)||^2 + r1/2 ||p + lam1 - grad u||^2``,
   each linearised at the current ``u`` (``exp(i P (u + du)) ~ t (1 + i P du)``,
   :class:`~ptmpi.operators.transmission.LinearisedTransmission` ``J``) and solved by
   ``cg_iterations`` CG steps from ``du = 0`` (with ``cg_tol``: continued until the
   residual is ``cg_tol`` of the right-hand side) on
   ``(rho J^H J + r1 grad^H grad) du = rho J^H (psi + mu - t) + r1 grad^H(p + lam1 - grad u)``,
   then ``Re u, Im u >= 0`` (X-ray phase shift and attenuation are non-negative; without
   it ``u`` takes up a per-angle phase offset the data cannot see) as a projected Newton
   step: the parts of ``u`` at the bound whose descent direction points outwards are held
   there in the CG solve, the rest solved for, then clipped (:func:`gauss_newton`);
4. ``mu += psi - exp(i P u)``; TV split ``p = shrink(grad u - lam1, tv_weight / r1)`` and
   ``lam1 += p - grad u`` (APT).

Distribution and precision as in :mod:`ptmpi.solvers.admm`: angles are split over ranks,
``u``, ``p``, ``lam1`` are replicated; the sums over angles (``J^H`` and ``J^H J``) are
formed in complex128 and Allreduced once per application, so results depend on the rank
count only through float rounding.

Default penalties (:func:`resolve_exp`), from the data: ``r2`` by the linear model's rule,
``min(0.1, 20 d / L, 4.8 / n)`` with ``L = ||sum_t P_t^H W_t P_t||``, ``d`` the mean of its
diagonal and ``n`` the volume's width (``L / d`` grows with the length of a ray through
the volume: 117 on the 32^3 demo, which keeps the paper's 0.1, 292 at 64^3 and 577 at
128^3 in the paper geometry, 0.069 and 0.035; measured: +0.5 / +1.0 dB at 64^3 eta 100 /
noise-free, 18.29 -> 20.67 dB on the 128^3 default geometry, every 32^3-48^3 case
unchanged; the bound ``4.8 / n`` for scans lit unlike the paper's grids, e.g. the
overlapping 128^3 scans, 0.082 -> 0.0375; docs/exp-model.md);
``rho = rho_factor * r2 * max W`` (2: the psi-step weighs the tomography twice the
brightest-lit data; 0.5 and 5 converged more slowly or unevenly on
the 3 pi case); ``L = rho ||sum_t P_t^H P_t||`` is the curvature of the u-subproblem at
``u = 0``; ``r1 = r1_factor * L`` and ``tv_weight = tv_threshold * r1`` (the shrink
threshold ``tv_weight / r1`` is in radians per voxel). On photon counts (every valid count
a whole number) the defaults follow the linear solver's rule
(:mod:`ptmpi.solvers.regularisation`): ``tv_weight = tv_threshold_counts * r1 +
tv_noise_factor * sigma * sqrt(d)`` (0.03 and 0.32, the linear model's factor; ``sigma =
1/2``, the Poisson noise in amplitude; ``d`` the median over voxels of the diagonal of
``sum_t P_t^H W_t P_t``, the data curvature ``J^H J`` of the u-step at ``|t| = 1``): a
voxel of ``u`` is known to about ``sigma / sqrt(d)``, and the TV threshold follows that
noise level, so the noise term grows as the square root of the dose (``J ~ i Q P`` near
``u = 0``, the linear model's ``D``). The median is the typical voxel's curvature; the
mean (until this release) is pulled up by the few brightly lit voxels of a scan whose
probe barely overlaps (FWHM 4 at step 8: median 0.56 of the mean), and the weight it gave
was too heavy there (demo, eta 100: 8.35 dB with the mean, 9.56 with the median; 64^3,
FWHM 7 at step 16, eta 100: 1.62 and 2.99 dB; demo, eta 1000: 19.32 and 19.68 dB), while
on overlapping scans the two agree (FWHM 8 at step 8: 22.58 and 22.57 dB; 3 pi spiral at
step 4, eta 100: 16.61 and 16.60 dB). Lower weights still gained on the sparse scans
(demo, eta 100: 12.3 dB at a weight of 0.2 against 1.3) and lost on the overlapping
ones (3 pi spiral: 16.11 dB at half the noise term).
The texture cap (``tv_texture_factor``) explains both: a soft threshold removes every
gradient below it, so a threshold at the noise level also erases the sample's texture
where a voxel's noise, ``sigma / sqrt(d)``, exceeds its typical gradient (the demo at
eta 100: noise 0.07 rad per voxel, mean ``|grad u|`` of the truth 0.03). The best fixed
weights of six cases put the threshold ``tv_weight / d`` at 0.19-0.47 of the truth's mean
``|grad u|`` wherever the noise rule was too heavy, and the weight used is therefore at
most ``tv_texture_factor * d * g``, ``g`` the mean ``|grad u|`` of the previous iterate,
on any data (on noise-free data the cap only acted on the sparse 64^3 scan, +0.4 dB).
That is a fixed point of the iteration, not a tuned constant per case: a weight that
flattens ``u`` lowers ``g`` and with it the cap, and the cap never exceeds the noise rule.
Measured (docs/exp-model.md, Texture cap): +2.4 to +2.7 dB on the demo's six seeds, +3.4 dB on
64^3 at FWHM 7 / step 16, +0.4 dB at FWHM 6 and on the thick 48^3 spiral, -0.2 dB on
the 32^3 3 pi spiral at eta 100, unchanged where the noise is below the texture. Until
this rule the term was ``tv_noise_factor * sigma^2`` with 4, then 12: one weight for
every dose, too heavy at low dose (demo geometry, 32^3, 8 angles, eta 100, 13 dB: 3.15
against 1.69 with the mean, SNR 4.5 against 8.4 dB with the projected u-step) and too
light at high dose (32^3 3 pi eta 1000: 6.5 against 15.2 now, 29.1 against 29.4 dB).
The likelihood is smoothed by ``epsilon = epsilon_counts`` photons (10; 0 on noise-free
data, lowered as the penalties rise, below), which keeps the z-step continuous at pixels
with few counts.
Measured on a 48^3 volume, 12 angles, 3 pi, spiral scans, masked detector: at eta 100
(R-factor of the truth 0.280) the R-factor was 0.415 before (no noise term, no
smoothing), 0.393 with the noise term 0.3 alone, 0.313 with smoothing and 0.3, 0.297
with the default of then (1.52); at eta 1000 (truth 0.117) 0.134 with 0.3 + 1.73, 0.126
with the default of then (6.2), 0.124 with 12, 0.156 with 0.5 (all at r2 = 0.1 fixed;
the square-root rule gives 11.7 there).

Field of view (``support="fov"``, the default; :func:`field_of_view`): every Gauss-Newton
step, of the initialisation and of the joint u-step, ends with ``u = 0`` on the voxels
that some measured angle misses entirely (no part of their footprint on the detector):
empty space. Without it (``support="none"``) the volume took up, in those voxels and in a
ring around the sample, a phase that far-field data cannot contradict (a constant added
to one angle's image is invisible): 0.04 rad per voxel on the 32^3 demo at eta 100, a fifth
of the sample's, and an error in the lowest spatial frequencies 5x that of the same run
started from the truth (18.25 dB there, 12.18 dB from the initialisation, at a lower
R-factor). With the support: 16.14 dB. The step is solved on all voxels and the outside
then set to 0; holding those voxels at 0 inside the CG solve (as the bound of ``Re u,
Im u >= 0`` is held) ended lower (demo 13.52 dB, 3 pi spiral at eta 100 19.23 against
23.34 dB): the other voxels then take up the per-angle phase. Cost: a sample reaching
past the field of view is cut there (the 32^3 3 pi phantom's smoothed edge, 2.4e-4 of its
energy: 37.65 against 39.55 dB after 30 noise-free iterations); ``support="none"`` is for
such samples. docs/exp-model.md has the table.

Penalty continuation (``adapt_penalties``, on by default): when successive steps of
``u`` point back and forth (mean cosine below ``-0.3`` over 10 iterations) and the
relative change no longer shrinks (:func:`ptmpi.solvers.penalty.cycling`), ``r2``,
``rho`` and ``r1`` are doubled together and the scaled multipliers ``lam2``, ``mu``,
``lam1`` halved: the unscaled multipliers, the balance of the psi-step (``r2 W : rho``)
and of the u-step (``rho : r1``) and the problem (``tv_weight``) stay the same, so the
fixed points do too. The likelihood smoothing falls with the penalties,
``epsilon / scale**2``: a smoothed likelihood is a different problem, whose minimiser
fits the data worse (measured on the 32^3, 3 pi case at eta 1000: with ``epsilon`` kept
at 10 photons the converged R-factor rose 15% above its minimum). The small start
(``r2 = 0.1``, smoothed) makes the first iterations fast; the larger penalties end the
period-2 cycle of the z-step at low-count pixels. Doubling ``r2`` alone diverged (the
psi-step weighs it against ``rho``); raising ``r2`` and ``rho`` without ``r1`` left the
TV split loose. Measured on that case, 200 iterations: eta 1000, SNR 26.4 -> 28.3 dB,
R 0.1311 -> 0.1237, final relative change 3.4e-3 -> 1.1e-4; eta 100 (masked stripe and
hot pixels): SNR 17.1 -> 15.9 dB, R 0.3336 -> 0.3234, change 7.1e-3 -> 6.4e-4 (the
unconverged r2 = 0.1 run had the higher SNR, its R-factor the higher too).

The continuation keeps the fixed points only if the u-step is a descent step of its
subproblem under ``Re u, Im u >= 0``. With the unconstrained Gauss-Newton step clipped
afterwards it was not: CG moved the free voxels to make up for negative values at the
bound that the clip then removed. At low dose (demo geometry, eta 100) the attenuation
``Im u`` of a growing share of the voxels sat at 0 (8% at iteration 30, 31% at 190),
their steps alternated (cosine -0.6 to -0.8, half the step norm), the cycle detector
raised the penalties every 20 iterations to 128 times, which cannot end that cycle, and
the R-factor climbed from its minimum 0.42 to 0.57 (TV weight 1.15) or 0.45 to 0.53
(3.15), worse than with fixed penalties (0.41). With the projected step the same runs
end at their minimum R-factor, below the fixed-penalty run's (0.381 against 0.430, 8.4
against 6.8 dB, defaults). The initialisation's phase-gradient tomography (from ``u = 0``,
where every voxel is at the bound) keeps the plain clip: with the projected step there
the 32^3 3 pi eta 100 case lost 2 dB (14.4 against 16.3 dB). With both changes, 200
iterations: that case at eta 1000 R 0.1216, 29.4 dB, change 1.2e-4; at eta 100 R
0.3218, 16.6 dB, change 1.1e-3 (the penalties rise later, the cycle being weaker; at
300 iterations 2.9e-4, as before the change); the demo geometry at eta 1000 R 0.124
(0.440 before), 19.3 dB (10.1).

Incoherent probe modes (``probe_modes = K > 1``, :mod:`ptmpi.operators.modes`): ``Q`` is
the mode operator (``(K, N_FRAMES_LOCAL, M, M)`` far fields), so ``z`` and ``lam2`` are
per mode, the psi-step sums the modes (``Q^H Q = sum_k W_k``, still diagonal), the z-step
is the radial prox of the model modulus ``sqrt(sum_k |z_k|^2)`` and the R-factor is taken
there. The initialisation's per-angle ptychography runs with the same modes (expanded
from one probe by :func:`~ptmpi.operators.modes.initial_modes`) and refines them with
``refine_probe``; with ``probe_joint`` each joint iteration updates every mode by the
closed form from its own far fields, then rotates the modes into their orthogonal basis
and mixes ``lam2`` by the same unitary (the model is unchanged by it). A second
mode of zero power reproduces the one-probe run (tests); on mixed-state data 3 modes gave
22.8 dB where one gave 3.6 (README, Incoherent probe modes). ``--align`` works with modes
(:mod:`ptmpi.solvers.align`, Probe modes).

Metrics per iteration as the linear solver (SPEC 5): R-factor of ``D(omega, u)``,
relative change of ``u``, and ``snr_db(u, u_true)`` when the truth is known (the truth
of exp data is ``u`` itself: phase and attenuation per voxel).
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
from ptmpi.operators.fft import fft2
from ptmpi.operators.grad import Gradient
from ptmpi.operators.modes import mix_modes, modulus, orthogonalise, solver_modes
from ptmpi.operators.ptycho import guard_probe, is_guarded
from ptmpi.operators.transmission import (
    ExpModel,
    LinearisedTransmission,
    ProjectedGradient,
    log_ratio_gradient,
)
from ptmpi.parallel.comm import SerialComm
from ptmpi.parallel.data_term import probe_from_views, probe_modes_from_views, reduced_sum
from ptmpi.progress import REPLICATED
from ptmpi.solvers.admm import ADMMState, LocalProblem, end_of_iteration
from ptmpi.solvers.align import AlignOptions, iteration_cap, make_aligner
from ptmpi.solvers.cg import conjugate_gradient
from ptmpi.solvers.penalty import cycling, step_cosine
from ptmpi.solvers.prox import (
    LIKELIHOODS,
    total_variation,
    update_data_split,
    update_tv_split,
)
from ptmpi.solvers.regularisation import default_r2

logger = logging.getLogger(__name__)

ALGORITHMS = ("apt", "apts", "two-step")
SUPPORTS = ("fov", "none")
#: Phase-gradient Gauss-Newton steps of the initialisation per 32 voxels of the volume's
#: width (:func:`init_gn_steps`).
INIT_GN_PER_32 = 20
#: A voxel is in the field of view when at least this fraction of its footprint falls on
#: the detector at every angle (any positive fraction; the margin absorbs rounding).
FOV_MIN_FRACTION = 1e-6


@dataclasses.dataclass(frozen=True)
class ExpSolverSettings(AlignOptions):
    """Settings of exp-model APT / APTs. ``None``: chosen from the data (:func:`resolve_exp`)."""

    algorithm: str = "apt"
    """``apt`` (with TV), ``apts`` (``tv_weight = r1 = 0``) or ``two-step`` (only the
    initialisation: per-angle ptychography, then the phase-gradient tomography)."""
    iterations: int = 200
    """Maximum number of outer ADMM iterations."""
    tol: float = 1e-4
    """Stop when the relative change ``||u_k - u_{k+1}|| / ||u_{k+1}||`` has stayed below
    it for ``tol_window`` iterations (0: run all ``iterations``), as the linear solver."""
    tol_window: int = 5
    """See ``tol``."""
    likelihood: str = "ipm"
    """Data fidelity ``G``: ``agm`` (amplitude Gaussian) or ``ipm`` (Poisson)."""
    tv_weight: float | None = None
    """TV weight; default ``tv_threshold * r1``."""
    r1: float | None = None
    """Penalty of ``p = grad u``; default ``r1_factor * L``."""
    r2: float | None = None
    """Penalty of ``z = Q psi`` (dimensionless); default the linear model's rule
    ``min(r2_default_max, r2_factor d / L, r2_ray_factor / n)``, ``d`` the mean diagonal and
    ``L`` the norm of ``sum_t P_t^H W_t P_t``, ``n`` the volume's width (module notes)."""
    r2_factor: float = 20.0
    """See ``r2`` (the linear solver's factor)."""
    r2_default_max: float = 0.1
    """See ``r2``: the paper's value, which volumes up to about 48^3 keep."""
    r2_ray_factor: float = 4.8
    """See ``r2`` (the linear solver's bound ``r2_ray_factor / n``)."""
    rho: float | None = None
    """Penalty of ``psi = exp(i P u)``; default ``rho_factor * r2 * max W``."""
    cg_iterations: int = 8
    """CG iterations per Gauss-Newton step (with ``cg_tol``: at least this many)."""
    cg_tol: float = 0.0
    """With ``cg_tol > 0``, CG continues after ``cg_iterations`` until its residual is at
    most ``cg_tol`` times the right-hand side's norm, up to ``cg_max_iterations``, in the
    initialisation's phase-gradient tomography and in the joint u-step (0: exactly
    ``cg_iterations``). Not the default: 8 steps leave 0.15-0.2 of the residual on the
    32^3 demo and 0.3-0.65 at 128^3, but solving closer changed results both ways
    (docs/exp-model.md, "Low dose at 128^3"): 0.2 rescues a low-dose 128^3 case whose
    joint iterations stall from the looser start (-5.6 to 11.5 dB) and costs 4 dB on the
    same geometry at higher doses."""
    cg_max_iterations: int = 64
    """Upper bound on the CG iterations of one Gauss-Newton step with ``cg_tol``."""
    gn_iterations: int = 1
    """Gauss-Newton steps per u-step."""
    refine_probe: bool = False
    """Refine the probe: in the initialisation's per-angle ptychography (a probe shared
    by all angles) and, with ``probe_joint``, every joint iteration by the closed form."""
    probe_start: int = 0
    """First iteration of probe updates."""
    probe_joint: bool = False
    """With ``refine_probe``, also update the probe in the joint iterations (by default
    it is refined in the initialisation's per-angle ptychography only: on a probe guess
    defocused by 6 rad the joint updates took its error from 0.021 after the
    initialisation to 0.104 and the SNR from 25 to 17.5 dB, or, with its norm kept,
    left the R-factor 45% above its minimum)."""
    rho_factor: float = 2.0
    """Default ``rho / (r2 max W)``."""
    r1_factor: float = 1e-3
    """Default ``r1 / L``."""
    tv_threshold: float = 0.01
    """Default ``tv_weight / r1`` (radians per voxel)."""
    tv_threshold_counts: float = 0.03
    """``tv_threshold`` on photon-counting (integer) data."""
    tv_noise_factor: float = 0.32
    """Default extra TV weight per ``sigma sqrt(d)`` on photon-counting data, ``d`` the median
    diagonal of ``sum_t P_t^H W_t P_t`` (the linear model's noise term and factor,
    :mod:`ptmpi.solvers.regularisation`)."""
    tv_texture_factor: float = 0.25
    """With the default weight (any data), the weight used in an iteration is at most
    ``tv_texture_factor * d * g``, ``g`` the mean isotropic gradient magnitude of the
    previous iterate (``TV(u) / voxels``): the shrink threshold in the scale of ``u``,
    ``tv_weight / d``, stays below a quarter of the sample's typical gradient (module
    notes). 0 keeps the noise rule alone."""
    epsilon: float | None = None
    """Smoothing of the likelihood (photons, :mod:`ptmpi.solvers.prox`); default
    ``epsilon_counts`` for photon-counting data, 0 for noise-free data."""
    epsilon_counts: float = 10.0
    """Default ``epsilon`` for photon-counting data, in photons per pixel."""
    power_iterations: int = 10
    """Power iterations used to estimate ``||sum_t P_t^H P_t||``."""
    gauge: bool = True
    """Fix the global phase of each angle's ``psi`` (with its ``z``, ``lam2``) to the
    tomography every iteration (:func:`gauge_phases`)."""
    init_iterations: int = 50
    """Per-angle ptychography iterations of the initialisation (0: start from ``u = 0``)."""
    init_gn_iterations: int | None = None
    """Phase-gradient Gauss-Newton steps of the initial tomography (:func:`gauss_newton`);
    None: :func:`init_gn_steps` of the volume's width (20 per 32 voxels, at least 20)."""
    u_fit: str = "exp"
    """u-step objective of the joint iterations (:func:`gauss_newton`): ``exp`` or
    ``gradient`` (the phase-gradient fit of the initialisation; in the joint iterations it
    diverged on the 3 pi case, where early ``psi`` are far from a transmission)."""
    adapt_penalties: bool = True
    """Scale all penalties up when the iteration cycles (see ``penalty_window``):
    ``r2``, ``rho`` and ``r1`` are doubled together and the scaled multipliers ``lam2``,
    ``mu``, ``lam1`` halved, which keeps the fixed points of the iteration."""
    penalty_window: int = 10
    """Iterations over which a period-2 cycle is detected (mean cosine between successive
    steps of ``u`` below ``-oscillation_threshold``, :func:`ptmpi.solvers.penalty.cycling`)."""
    oscillation_threshold: float = 0.3
    """See ``penalty_window``."""
    stagnation: float = 0.9
    """... and the summed relative change over the window above this fraction of that
    over the window before (a cycle that no longer shrinks). 0.9: the penalties rise
    later than with the linear solver's 0.8, which kept more of the fast start (32^3,
    eta 100, 200 iterations: 15.9 dB against 15.3 dB, both converged; 0.95 needed 300
    iterations to converge, at 16.9 dB)."""
    epsilon_power: float = 2.0
    """With the penalties at ``scale`` times their start, the likelihood is smoothed by
    ``epsilon / scale**epsilon_power`` (0: ``epsilon`` throughout)."""
    penalty_start: int = 0
    """First iteration at which the penalties may be raised."""
    penalty_max_factor: float = 256.0
    """The penalties are raised at most to this multiple of their starting values."""
    nonnegative: bool = True
    """Keep ``Re u >= 0`` and ``Im u >= 0`` after each Gauss-Newton step (X-ray phase
    shift and attenuation are non-negative); this also removes the near-symmetry of a
    per-angle phase offset, which the far-field intensities cannot see. In the joint
    iterations as a projected Newton step (:func:`gauss_newton` with ``active_set``), in
    the initialisation by clipping."""
    support: str = "fov"
    """``fov``: ``u = 0`` (empty space) outside the field of view, the voxels that some
    measured angle misses entirely (:func:`field_of_view`); ``none``: every voxel free."""
    probe_modes: int = 1
    """Incoherent probe modes ``K`` (mixed-state, :mod:`ptmpi.operators.modes`): ``z`` and
    ``lam2`` are ``(K, N_FRAMES_LOCAL, M, M)``, the psi-step sums the modes (``Q^H Q =
    sum_k W_k``), the z-step is the radial prox of the model modulus; the modes are refined
    with ``refine_probe`` (the initialisation's per-angle ptychography, and with
    ``probe_joint`` the joint iterations) and kept orthogonal (module notes)."""

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.support not in SUPPORTS:
            raise ValueError(f"support must be one of {SUPPORTS}, got {self.support!r}")
        if self.u_fit not in ("gradient", "exp"):
            raise ValueError(f"u_fit must be gradient or exp, got {self.u_fit!r}")
        if self.init_iterations < 0 or (self.init_gn_iterations is not None
                                        and self.init_gn_iterations < 1):
            raise ValueError("init_iterations must be >= 0 and init_gn_iterations >= 1")
        if self.probe_modes < 1:
            raise ValueError(f"probe_modes must be >= 1, got {self.probe_modes}")
        if self.iterations < 0 or self.cg_iterations < 1 or self.gn_iterations < 1:
            raise ValueError("iterations must be >= 0, cg_iterations and gn_iterations >= 1")
        if not 0 <= self.cg_tol < 1:
            raise ValueError(f"cg_tol must be in [0, 1), got {self.cg_tol}")
        if self.penalty_window < 0 or self.epsilon_power < 0 or self.penalty_max_factor < 1:
            raise ValueError("penalty_window and epsilon_power must be >= 0, "
                             "penalty_max_factor >= 1")
        for name in ("tv_weight", "r1", "tv_texture_factor"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name in ("r2", "rho"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")

    def to_dict(self) -> dict:
        out = {"model": "exp", **dataclasses.asdict(self)}
        if self.probe_modes == 1:  # single-mode settings (and checkpoints) as before modes
            del out["probe_modes"]
        return out


@dataclasses.dataclass
class ExpADMMState(ADMMState):
    """:class:`~ptmpi.solvers.admm.ADMMState` plus the transmission split: ``psi_local``
    and its multiplier ``mu_local``, ``(N_THETA_LOCAL, nz, n)`` each (this rank's angles)."""

    psi_local: object = None
    mu_local: object = None


def projector_norm(model: ExpModel, comm: SerialComm, iterations: int, xp, dtype,
                   weight=None) -> float:
    """``||sum_t P_t^H P_t||`` over all ranks' angles, by power iteration; with ``weight``
    (``W``, ``(N_THETA_LOCAL, nz, n)``) ``||sum_t P_t^H W_t P_t||``."""
    nz, n, _ = model.shape
    rng = np.random.default_rng(0)  # same start vector on every rank
    x = to_device(rng.standard_normal((nz, n, n)).astype(dtype), xp)
    x /= xp.linalg.norm(x)
    if weight is None:
        weight = xp.ones(model.projector.data_shape, dtype=real_dtype(dtype))
    value = 0.0
    for _ in range(max(1, iterations)):
        y = comm.allreduce_sum(model.projector.normal(x, weight, np.complex128)).astype(dtype)
        value = float(xp.linalg.norm(y))
        if value == 0.0:
            break
        x = y / value
    return value


def resolve_exp(settings: ExpSolverSettings, weight_max: float, norm_php: float,
                noise_amplitude: float = 0.0, typical_diagonal: float = 0.0,
                norm_phwp: float = 0.0, mean_diagonal: float = 0.0, width: int = 0) -> dict:
    """The penalties actually used: explicit settings, else the data-scaled defaults
    (module docstring). ``noise_amplitude`` is the amplitude noise of the data (1/2 for
    photon counts, 0 for noise-free data): on counts the default TV weight is
    ``tv_threshold_counts * r1 + tv_noise_factor * sigma * sqrt(d)``, ``d`` =
    ``typical_diagonal`` the median over voxels of the diagonal of ``sum_t P_t^H W_t P_t``
    (the linear model's rule, :mod:`ptmpi.solvers.regularisation`; ``r1`` stays that of
    noise-free data, so the shrink threshold grows with the noise), and the default
    likelihood smoothing ``epsilon`` is ``epsilon_counts``. With the default weight
    ``tv_texture_cap = tv_texture_factor * d`` (any data): the solver uses at most that
    times the mean ``|grad u|`` of the previous iterate. ``norm_phwp`` and
    ``mean_diagonal``: ``L = ||sum_t P_t^H W_t P_t||`` and the mean of its diagonal, for the
    default ``r2 = min(r2_default_max, r2_factor d / L, r2_ray_factor / width)``
    (``r2_default_max`` where ``L`` or ``d`` is not known; ``width`` the volume's lateral
    size, 0: no ray bound)."""
    if settings.r2 is not None:
        r2, r2_rule = settings.r2, "set explicitly (--r2)"
    elif norm_phwp > 0 and mean_diagonal > 0:
        r2, r2_rule = default_r2(settings.r2_factor, settings.r2_default_max, norm_phwp,
                                 mean_diagonal, "sum P^H W P", settings.r2_ray_factor, width)
    else:
        r2, r2_rule = settings.r2_default_max, f"{settings.r2_default_max:g} (no data)"
    rho = settings.rho if settings.rho is not None else settings.rho_factor * r2 * weight_max
    curvature = rho * norm_php
    tv_weight = r1 = texture_cap = 0.0
    if settings.algorithm != "apts":
        r1 = settings.r1 if settings.r1 is not None else settings.r1_factor * curvature
        threshold = settings.tv_threshold_counts if noise_amplitude > 0 else (
            settings.tv_threshold)
        tv_weight = (settings.tv_weight if settings.tv_weight is not None
                     else threshold * r1 + settings.tv_noise_factor * noise_amplitude
                     * math.sqrt(max(typical_diagonal, 0.0)))
        if tv_weight > 0 and r1 == 0:
            raise ValueError("APT with tv_weight > 0 needs r1 > 0")
        if settings.tv_weight is None:
            texture_cap = settings.tv_texture_factor * max(typical_diagonal, 0.0)
    epsilon = settings.epsilon
    if epsilon is None:
        epsilon = settings.epsilon_counts if noise_amplitude > 0 else 0.0
    return {"tv_weight": float(tv_weight), "r1": float(r1), "r2": float(r2),
            "r2_rule": r2_rule, "norm_PhWP": float(norm_phwp),
            "mean_diagonal_PhWP": float(mean_diagonal),
            "rho": float(rho), "max_W": float(weight_max), "norm_PhP": float(norm_php),
            "curvature": float(curvature), "noise_amplitude": float(noise_amplitude),
            "median_diagonal_PhWP": float(typical_diagonal),
            "tv_texture_cap": float(texture_cap), "epsilon": float(epsilon)}


def mean_gradient(grad: Gradient, u) -> float:
    """``TV(u) / voxels``: the mean over voxels of the isotropic ``|grad u|``."""
    return total_variation(grad.fwd(u)) / u.size


def gauge_phases(psi_local, reference_local):
    """Per angle, the unit factor ``g_t`` minimising ``||g_t psi_t - reference_t||``:
    ``g_t = vdot(psi_t, reference_t) / |.|`` (1 where that inner product is 0);
    ``(N_THETA_LOCAL,)`` complex of ``psi``'s dtype."""
    xp = get_xp(psi_local)
    inner = xp.sum(xp.conj(psi_local) * reference_local, axis=(-2, -1), dtype=np.complex128)
    mag = xp.abs(inner)
    return xp.where(mag > 0, inner / xp.where(mag > 0, mag, 1), 1).astype(psi_local.dtype)


def init_gn_steps(settings: ExpSolverSettings, n: int) -> int:
    """The initialisation's phase-gradient Gauss-Newton steps for a volume ``n`` wide:
    ``settings.init_gn_iterations`` when set, else :data:`INIT_GN_PER_32` per 32 voxels
    of ``n``, at least :data:`INIT_GN_PER_32` (module notes: the fit's lowest spatial
    frequencies converge slowest, and more so the wider the volume)."""
    if settings.init_gn_iterations is not None:
        return settings.init_gn_iterations
    return max(INIT_GN_PER_32, round(INIT_GN_PER_32 * n / 32))


def field_of_view(model: ExpModel, settings: ExpSolverSettings, comm: SerialComm, xp,
                  rdtype):
    """The support of ``u``: ``(n, n)`` 0/1 of ``rdtype`` (the same for every slice), 1 where
    a voxel is seen at every angle of every rank (part of its footprint on the detector,
    :func:`~ptmpi.operators.tomo.footprint_on_detector`); None with ``support="none"``.

    A voxel that some angle misses is constrained by the other angles alone, and the data
    do not see a constant phase added to one angle's image: without the support the
    reconstruction filled the corners of the slices and a ring around the sample with a
    phase that no angle contradicts (module notes)."""
    if settings.support == "none":
        return None
    from ptmpi.operators.tomo import footprint_on_detector

    n = model.projector.shape[-1]
    missed = (footprint_on_detector(n, model.projector.theta) <= FOV_MIN_FRACTION)
    missed = comm.allreduce_sum(missed.astype(np.float64))  # angles are split over ranks
    return to_device((missed == 0).astype(rdtype), xp)


def nonnegative_part(u):
    """``max(Re u, 0) + i max(Im u, 0)``: X-ray phase shift and attenuation are >= 0."""
    xp = get_xp(u)
    return (xp.maximum(u.real, 0) + 1j * xp.maximum(u.imag, 0)).astype(u.dtype, copy=False)


def bound_free(u, descent):
    """The free set of a Gauss-Newton step under ``Re u, Im u >= 0``: ``(re, im)`` masks
    (0 or 1, real dtype of ``u``) that are 0 where that part of ``u`` is at its bound and the
    descent direction ``descent`` (the right-hand side of the normal equations) points
    out of the feasible set, 1 elsewhere."""
    xp = get_xp(u)
    rdtype = real_dtype(u.dtype)
    # An epsilon-active set (Bertsekas 1982): "at the bound" and "outward" both beyond
    # sqrt(eps) of the largest value, far above the rounding of the sums over angles,
    # which differs with the rank count: a part of rounding size (a voxel clipped on one
    # rank count and 1e-17 on another, an unlit voxel's descent) is decided alike, so the
    # free set, and with it the step, does not depend on the number of ranks.
    if not u.size:
        return xp.ones(u.shape, rdtype), xp.ones(u.shape, rdtype)
    eps = math.sqrt(float(np.finfo(rdtype).eps))
    at = eps * max(float(xp.abs(u.real).max()), float(xp.abs(u.imag).max()))
    out = -eps * float(xp.abs(descent).max())
    re = xp.logical_not((u.real <= at) & (descent.real < out)).astype(rdtype)
    im = xp.logical_not((u.imag <= at) & (descent.imag < out)).astype(rdtype)
    return re, im


def restrict(x, free):
    """``x`` with its real and imaginary parts zeroed outside the free sets ``free``."""
    re, im = free
    return (x.real * re + 1j * (x.imag * im)).astype(x.dtype, copy=False)


def cg_rule(settings: ExpSolverSettings) -> str:
    """The CG effort per Gauss-Newton step, in words (for the log)."""
    if settings.cg_tol <= 0:
        return str(settings.cg_iterations)
    return (f"{settings.cg_iterations} to {max(settings.cg_iterations, settings.cg_max_iterations)}"
            f" (until the residual is {settings.cg_tol:g} of the right-hand side)")


def gauss_newton(model: ExpModel, u, target_local, rho: float, grad: Gradient, tv_rhs,
                 r1: float, comm: SerialComm, gn_iterations: int, cg_iterations: int, *,
                 fit: str = "exp", nonnegative: bool = False, active_set: bool = False,
                 cg_tol: float = 0.0, cg_max_iterations: int = 0, counts: list | None = None,
                 support=None):
    """Gauss-Newton steps of the u-step; returns the new ``u`` and ``exp(i P u)``.

    Each step solves, by ``cg_iterations`` CG steps from ``du = 0`` (with ``cg_tol > 0``
    continued until the residual is at most ``cg_tol`` times the right-hand side, up to
    ``cg_max_iterations``; ``counts`` collects the CG iterations of each step),
    ``min rho/2 ||A du - r||^2 + r1/2 ||g - grad(u + du)||^2`` with, for ``fit``:

    - ``exp``: ``A = J = i t P`` (:class:`LinearisedTransmission`) and
      ``r = target - exp(i P u)``, the linearisation of ``||exp(i P u) - target||^2``;
    - ``gradient``: ``A = grad_2d P`` (:class:`ProjectedGradient`) and
      ``r = log_ratio_gradient(target, exp(i P u))``, the projected phase *gradient*
      (unwraps; blind to each image's global phase).

    ``target_local`` ``(N_THETA_LOCAL, nz, n)`` is ``psi + mu``; ``tv_rhs`` is
    ``grad^H g = grad^H(p + lam1)`` (None without TV). With ``nonnegative`` each step
    ends with :func:`nonnegative_part`; with ``active_set`` as well, the step is first
    solved on the free set only (:func:`bound_free`: the parts of ``u`` at their bound
    whose descent direction points out of ``Re u, Im u >= 0`` are held there), a projected
    Newton step (Bertsekas 1982). Clipping the unconstrained step instead lets CG move
    the free voxels to make up for values the clip then removes: that step is no descent
    step of the constrained subproblem, and the iteration cycles on the clipped voxels.
    ``support`` (:func:`field_of_view`, 0/1 per ``(y, x)``): each step ends with ``u = 0``
    outside it, after a step solved on all voxels (holding those voxels at 0 in the CG
    solve instead, as for the bound above, ended lower: module notes).
    """
    dtype = u.dtype
    wide = np.complex128
    t = model.transmission(u)
    for _ in range(gn_iterations):
        if fit == "exp":
            op = LinearisedTransmission(model.projector, t)
            residual = target_local - t
        else:
            op = ProjectedGradient(model.projector)
            residual = log_ratio_gradient(target_local, t)
        rhs = reduced_sum(comm, u.shape, lambda out, op=op, residual=residual:
                          op.adj(residual, wide, out), residual) * rho
        if tv_rhs is not None:
            rhs += r1 * (tv_rhs - grad.normal(u))
        rhs = rhs.astype(dtype)
        free = bound_free(u, rhs) if nonnegative and active_set else None
        if free is not None:
            rhs = restrict(rhs, free)

        def normal_op(x, op=op, free=free):
            if free is not None:
                x = restrict(x, free)
            out = reduced_sum(comm, x.shape, lambda buf: op.normal(x, wide, buf), x) * rho
            if r1 > 0:
                out += r1 * grad.normal(x)
            out = out.astype(dtype)
            return out if free is None else restrict(out, free)

        du = conjugate_gradient(normal_op, rhs, get_xp(u).zeros_like(u),
                                max(cg_iterations, cg_max_iterations) if cg_tol > 0
                                else cg_iterations, tol=cg_tol, min_iterations=cg_iterations,
                                counts=counts)
        u = u + du
        if nonnegative:
            u = nonnegative_part(u)
        if support is not None:
            u *= support  # u is this step's own array (u + du, or its clipped copy)
        t = model.transmission(u)
    return u, t


def initial_volume(model: ExpModel, problem: LocalProblem, settings: ExpSolverSettings,
                   comm: SerialComm, xp, dtype):
    """Per-angle ptychography from the empty sample (``psi = 1``), then the tomography of
    the projected phase *gradient* of its images from ``u = 0``: returns ``(u, omega,
    R-factor of the per-angle ptychography)``.

    The phase-gradient fit sees only differences of neighbouring pixels, so it unwraps
    projected phases far beyond 2 pi, and it is blind to the global phase of each image,
    which ptychography cannot recover anyway.
    """
    from ptmpi.solvers.ptycho2d import Ptycho2DSettings, solve_ptycho2d

    ptycho_settings = Ptycho2DSettings(iterations=settings.init_iterations,
                                       likelihood=settings.likelihood,
                                       refine_probe=settings.refine_probe,
                                       probe_guard=settings.align
                                       and is_guarded(problem.probe),
                                       probe_modes=settings.probe_modes)
    images = solve_ptycho2d(xp.ones(model.projector.data_shape, dtype=dtype), problem.f_local,
                            problem.probe, problem.positions_local,
                            problem.frame_offset_local, ptycho_settings, comm,
                            valid_local=problem.valid_local)
    u = xp.zeros(problem.volume_shape, dtype=dtype)
    gn_steps = init_gn_steps(settings, problem.volume_shape[-1])
    u, _ = gauss_newton(model, u, images.v_local, 1.0, Gradient(problem.volume_shape), None,
                        0.0, comm, gn_steps, settings.cg_iterations,
                        fit="gradient", nonnegative=settings.nonnegative,
                        cg_tol=settings.cg_tol, cg_max_iterations=settings.cg_max_iterations,
                        support=field_of_view(model, settings, comm, xp, real_dtype(dtype)))
    r_factor = images.history["r_factor"][-1] if images.history["r_factor"] else math.nan
    logger.info("exp model initialisation: %d per-angle ptychography iterations (R-factor "
                "%.4g), phase-gradient tomography by %d Gauss-Newton steps",
                settings.init_iterations, r_factor, gn_steps)
    return u, to_device(images.omega, xp).astype(dtype), r_factor


def penalties_from_data(model: ExpModel, weight, f_local, settings: ExpSolverSettings,
                        comm: SerialComm, xp, dtype, norm_php: float | None = None) -> dict:
    """:func:`resolve_exp` on the data and the model with its illumination ``weight``
    (``||P^H P||``, unless given as ``norm_php``: it does not depend on the positions; the
    diagonal and norm of ``sum_t P_t^H W_t P_t``)."""
    apt = settings.algorithm == "apt"
    w_max = comm.allreduce_scalar(float(weight.max()) if weight.size else 0.0, "max")
    norm = (norm_php if norm_php is not None
            else projector_norm(model, comm, settings.power_iterations, xp, dtype))
    # Photon-counting data (all valid counts whole numbers): Poisson noise of
    # amplitude about 1/2, as in the linear solver.
    counting = float(xp.all(f_local == xp.rint(f_local))) if f_local.size else 1.0
    counting = comm.allreduce_scalar(counting, "min") > 0
    # The noise level of a typical voxel of u: sigma / sqrt(d), d the median diagonal
    # of the u-step's data curvature J^H J = sum_t P_t^H |t|^2 W_t P_t at |t| = 1
    # (module notes: the mean is dominated by the brightly lit voxels of sparse scans).
    # It also scales the texture cap of the default APT weight, on any data.
    # Formed and summed over ranks in double precision, then rounded back to the weights'
    # precision: the sum of the ranks' parts then rounds alike however the angles are
    # split (the exp iteration amplifies any difference, docs/alignment.md: rank
    # independence). Not cached: no matrix beyond the solver's (128^3: 0.35 s, 40 MB).
    needed = counting or (apt and settings.tv_weight is None) or settings.r2 is None
    diagonal = comm.allreduce_sum(model.projector.adj_squared_weights(
        weight.astype(np.float64), keep=False)).astype(weight.dtype) if needed else None
    typical_diagonal = float(get_xp(diagonal).median(diagonal)) if needed else 0.0
    # The r2 rule of the linear model: L / d of sum_t P_t^H W_t P_t (module notes).
    mean_diagonal = float(diagonal.mean()) if settings.r2 is None else 0.0
    norm_w = projector_norm(model, comm, settings.power_iterations, xp, dtype,
                            weight) if settings.r2 is None else 0.0
    return resolve_exp(settings, w_max, norm, 0.5 if counting else 0.0,
                       typical_diagonal, norm_w, mean_diagonal, model.shape[-1])


#: The penalties a restart of ``--align`` takes from the positions it restarts from.
RESTART_KEYS = ("tv_weight", "r1", "rho", "curvature", "max_W", "median_diagonal_PhWP",
                "tv_texture_cap")


def restart_penalties(model: ExpModel, weight, f_local, settings: ExpSolverSettings,
                      params: dict, comm: SerialComm, xp, dtype) -> dict:
    """The penalties of a restart at new (aligned) positions: those of a run started there
    (:func:`penalties_from_data` with the illumination ``weight`` of those positions), but
    with the ``r2`` of ``params`` (the recorded positions'; module notes of
    :mod:`ptmpi.solvers.align`). Returns the :data:`RESTART_KEYS` entries."""
    kept = dataclasses.replace(settings, r2=params["r2"])
    new = penalties_from_data(model, weight, f_local, kept, comm, xp, dtype,
                              norm_php=params["norm_PhP"])
    return {key: new[key] for key in RESTART_KEYS}


def solve_exp(problem: LocalProblem, settings: ExpSolverSettings, comm: SerialComm,
              *, xp=np, dtype=np.complex64, state: ExpADMMState | None = None,
              callback: Callable[[ExpADMMState, dict], None] | None = None
              ) -> tuple[ExpADMMState, dict]:
    """Run exp-model APT / APTs on this rank's frames; returns the final state and the
    parameters in use. Arguments as :func:`ptmpi.solvers.admm.solve`."""
    rdtype = real_dtype(dtype)
    apt = settings.algorithm == "apt"
    probe = to_device(problem.probe, xp).astype(dtype)
    n_modes = settings.probe_modes
    if n_modes > 1:
        probe = solver_modes(probe, n_modes)
        problem = dataclasses.replace(problem, probe=probe)  # the initialisation's start
    # --align with a guarded probe: every probe update keeps the guard (align.py notes)
    guard = settings.align and is_guarded(problem.probe)
    model = ExpModel(problem.volume_shape, problem.theta_local, probe,
                     problem.positions_local, problem.frame_offset_local, dtype=dtype)
    valid = None if problem.valid_local is None else to_device(problem.valid_local, xp)
    f_local = valid_only(to_device(problem.f_local, xp).astype(rdtype), valid)
    sqrt_f = xp.sqrt(f_local)
    truth = None if problem.truth_volume is None else to_device(problem.truth_volume, xp)
    grad = Gradient(problem.volume_shape)
    weight = model.illumination(xp)

    if state is not None and state.params:
        params = dict(state.params)
    else:
        params = penalties_from_data(model, weight, f_local, settings, comm, xp, dtype)
    tv_weight, r1, r2, rho = params["tv_weight"], params["r1"], params["r2"], params["rho"]
    epsilon = params.get("epsilon", 0.0)
    # The TV weight used is min(tv_weight, texture_cap * TV(u) / voxels), TV(u) of the
    # previous iterate (resolve_exp; 0: tv_weight throughout).
    texture_cap = params.get("tv_texture_cap", 0.0) if apt else 0.0
    logger.info(
        "exp model, %s, %s likelihood: max W = %.4g, ||P^H P|| = %.4g; rho = %.4g, "
        "r2 = %.4g, tv_weight = %.4g, r1 = %.4g, epsilon = %.4g, %d GN x %s CG per u-step, "
        "up to %d iterations", settings.algorithm.upper(), settings.likelihood.upper(),
        params["max_W"], params["norm_PhP"], rho, r2, tv_weight, r1, epsilon,
        settings.gn_iterations, cg_rule(settings), settings.iterations)
    if "r2_rule" in params:
        logger.info("r2: %s", params["r2_rule"])
    if texture_cap > 0:
        logger.info("TV weight per iteration: min(%.4g, %.4g x TV(u) / voxels), the shrink "
                    "threshold below %g of the mean |grad u|", tv_weight, texture_cap,
                    settings.tv_texture_factor)
    params["init_gn_steps"] = init_gn_steps(settings, problem.volume_shape[-1])
    support = field_of_view(model, settings, comm, xp, real_dtype(dtype))
    if support is not None:
        inside = int(round(float(support.sum())))
        params["fov_voxels_per_slice"] = inside
        logger.info("field of view: %d of %d voxels per slice are seen at every angle; u = 0 "
                    "outside (--support none frees them)", inside, support.size)

    t_init = time.perf_counter()
    if state is None:
        # u from the initialisation (or the empty sample u = 0), psi = exp(i P u),
        # z = Q psi, multipliers 0.
        u = xp.zeros(problem.volume_shape, dtype=dtype)
        if settings.init_iterations > 0:
            u, probe, params["init_r_factor"] = initial_volume(model, problem, settings, comm,
                                                               xp, dtype)
            params["init_at"] = 0
            model.set_probe(probe)
            weight = model.illumination(xp)
        psi = model.transmission(u)
        z = model.views(psi)
        state = ExpADMMState(
            u=u, z_local=z, lam2_local=xp.zeros_like(z),
            p=xp.zeros((3, *u.shape), dtype=dtype) if apt else None,
            lam1=xp.zeros((3, *u.shape), dtype=dtype) if apt else None,
            omega=probe, psi_local=psi, mu_local=xp.zeros_like(psi),
        )
    else:
        if guard:
            state.omega = guard_probe(state.omega)
        model.set_probe(state.omega)
        weight = model.illumination(xp)
    state.params = params
    for key in ("iteration", "r_factor", "rel_change", "wall_s") + (
            ("snr_db",) if truth is not None else ()):
        state.history.setdefault(key, [])

    # The final pass of --align where the shifts moved by more than 0.03 px RMS after the
    # settled restart (align.py notes: 128^3, 0.06 px off cost 1.7 dB against 0.04 px).
    aligner = make_aligner(settings, problem, comm, early_restarts=3, final_px=0.03)
    if aligner is not None:
        aligner.attach(state, model.set_positions)
        weight = model.illumination(xp)
    t = model.transmission(state.u)
    sqrt_f_sum = comm.allreduce_scalar(float(xp.sum(sqrt_f, dtype=xp.float64)))

    def metrics(u, u_old, t_now, t_start) -> dict:
        d = model.views(t_now)
        if n_modes > 1:
            d = modulus(d)
        num = comm.allreduce_scalar(r_factor_sums(d, sqrt_f=sqrt_f, valid=valid)[0])
        du = float(xp.linalg.norm(u - u_old))
        un = float(xp.linalg.norm(u))
        synchronize(xp)
        row = {
            "iteration": state.iteration,
            "r_factor": r_factor_value(num, sqrt_f_sum),
            "rel_change": du / un if un > 0 else math.inf,
            "wall_s": time.perf_counter() - t_start,
        }
        if truth is not None:
            from ptmpi.metrics import snr_db

            row["snr_db"] = snr_db(u, truth)
        for key, value in row.items():
            state.history[key].append(value)
        return row

    if settings.algorithm == "two-step":
        state.iteration = 1
        row = metrics(state.u, xp.zeros_like(state.u), t, t_init)
        if callback is not None:
            callback(state, row)
        return state, params
    frame_angle = to_device(model.geometry.angle, xp)
    t_start = t_init - (state.history["wall_s"][-1] if state.history["wall_s"] else 0)
    # Penalty continuation: the cosines between successive steps of u since the last
    # change of the penalties, and their scale, are part of the state (exact resume).
    scale = params.get("penalty_scale", 1.0)
    r2, rho, r1 = scale * r2, scale * rho, scale * r1
    turns = list(params.get("turns", []))
    tv_stats = np.zeros(3) if texture_cap > 0 else None
    if tv_stats is not None and "mean_gradient" not in state.params:
        state.params["mean_gradient"] = mean_gradient(grad, state.u)
    prev_step = state.step
    prev_du = float(xp.linalg.norm(prev_step)) if prev_step is not None else 0.0
    final = False  # the final pass of --align is due (align.py)
    while True:
        if state.iteration >= iteration_cap(settings.iterations, state.params):
            if not (aligner is not None and aligner.final_pass(state, state.iteration)):
                break
            final = True
        restart = final
        moved = aligner is not None and not final and aligner.due(state.iteration, state)
        if moved:
            model.set_positions(aligner.update(state, t, model.ptycho, sqrt_f, valid,
                                               state.iteration))
            restart = aligner.restart
        if restart:  # the volume of misaligned data is dropped (align.py)
            final = False
            positions = aligner.positions(state.shifts_local)
            state.u = xp.zeros(problem.volume_shape, dtype=dtype)
            if settings.init_iterations > 0:
                # from the input probe: one refined against misaligned positions holds
                # their error as the volume does (spiral scan, drift 2, defocus 6 rad,
                # --refine-probe: 11.6 dB continuing the refined probe, 25.5 from the
                # input; docs/alignment.md)
                aligned = dataclasses.replace(problem, positions_local=positions)
                state.u, state.omega, state.params["init_r_factor"] = initial_volume(
                    model, aligned, settings, comm, xp, dtype)
                state.params["init_at"] = state.iteration
                model.set_probe(state.omega)
            t = model.transmission(state.u)
            state.psi_local, state.z_local = t.copy(), model.views(t)
            for name in ("lam2_local", "mu_local", "p", "lam1"):
                if getattr(state, name) is not None:
                    getattr(state, name)[...] = 0
            if tv_stats is not None:
                state.params["mean_gradient"] = mean_gradient(grad, state.u)
            # the penalties back to their start, like everything else (rho, r1 and the TV
            # weight: those of these positions, below)
            r2, scale = r2 / scale, 1.0
            turns.clear()
            state.step, prev_step, prev_du = None, None, 0.0
            state.params["turns"], state.params["penalty_scale"] = [], scale
        if moved or restart:  # new positions, or the initialisation's probe
            weight = model.illumination(xp)
        if restart:  # and the penalties of the positions restarted from (align.py notes)
            state.params.update(restart_penalties(model, weight, f_local, settings,
                                                  state.params, comm, xp, dtype))
            tv_weight, r1, rho = (state.params[k] for k in ("tv_weight", "r1", "rho"))
            texture_cap = state.params["tv_texture_cap"] if apt else 0.0
            logger.info("iteration %d: penalties at these positions: rho = %.4g, tv_weight = "
                        "%.4g, r1 = %.4g, TV weight at most %.4g x TV(u) / voxels (r2 = %.4g "
                        "kept)", state.iteration, rho, tv_weight, r1, texture_cap, r2)
        u_old = state.u
        cg_counts = []
        target = state.z_local + state.lam2_local
        # Step 1: psi, pointwise (Q^H Q = W is diagonal); then the probe.
        psi = (r2 * model.views_adj(target) + rho * (t - state.mu_local)) / (r2 * weight + rho)
        psi = psi.astype(dtype, copy=False)
        if settings.gauge:
            # Far-field intensities do not see a global phase per angle: rotate psi, z and
            # lam2 of each angle together by the factor that best aligns psi with the
            # tomography (an exact minimisation of the augmented Lagrangian over it).
            g = gauge_phases(psi, t - state.mu_local)
            psi *= g[:, None, None]
            g_frames = g[frame_angle][:, None, None]
            state.z_local *= g_frames
            state.lam2_local *= g_frames
            target = state.z_local + state.lam2_local
        if (settings.refine_probe and settings.probe_joint
                and state.iteration >= settings.probe_start):
            # ptycho= maps each frame's term back by its sub-pixel shift (spiral scans);
            # without it the update mixes misregistered frames and diverges (measured).
            views = model.ptycho.extract(psi)
            if n_modes > 1:
                # each mode by the closed form from its own far fields, then the modes
                # rotated into their orthogonal basis and lam2 with them (z is replaced
                # by the z-step below)
                omega = probe_modes_from_views(views, fft2(target, inverse=True), comm,
                                               ptycho=model.geometry)
                state.omega, mixing = orthogonalise(omega.astype(dtype))
                state.lam2_local = mix_modes(state.lam2_local, mixing)
            else:
                state.omega = probe_from_views(views, target, comm,
                                               ptycho=model.ptycho).astype(dtype)
            if guard:
                state.omega = guard_probe(state.omega)
            model.set_probe(state.omega)
            weight = model.illumination(xp)
        # Step 2: z and lam2.
        z = update_data_split(model.views(psi), state.lam2_local, f_local, r2,
                              settings.likelihood, valid,
                              epsilon / scale**settings.epsilon_power)
        # Step 3: u by Gauss-Newton.
        tv_rhs = grad.adj_sum(state.p, state.lam1) if apt and r1 > 0 else None
        u, t = gauss_newton(model, u_old, psi + state.mu_local, rho, grad, tv_rhs, r1, comm,
                            settings.gn_iterations, settings.cg_iterations,
                            fit=settings.u_fit, nonnegative=settings.nonnegative,
                            active_set=settings.nonnegative, cg_tol=settings.cg_tol,
                            cg_max_iterations=settings.cg_max_iterations, counts=cg_counts,
                            support=support)
        # Step 4: multipliers (and the TV split).
        state.mu_local += psi - t
        if apt and r1 > 0:
            used = tv_weight if tv_stats is None else min(
                tv_weight, texture_cap * state.params["mean_gradient"])
            state.p = update_tv_split(grad, u, state.lam1, used / r1, state.p, tv_stats)
            if tv_stats is not None:
                state.params["mean_gradient"] = float(tv_stats[2]) / u.size
                state.params["tv_weight_used"] = used
        state.psi_local, state.z_local, state.u = psi, z, u
        state.iteration += 1

        step = u - u_old
        du = float(xp.linalg.norm(step))
        turn = (None if prev_step is None
                else step_cosine(float(xp.vdot(prev_step, step).real), du, prev_du))
        if turn is not None:
            turns.append(turn)
        prev_step, prev_du, state.step = step, du, step
        state.params["turns"] = turns[-2 * max(settings.penalty_window, 1):]
        state.params["penalty_scale"] = scale
        row = metrics(u, u_old, t, t_start)  # of the iterate u_{k+1}
        state.history.setdefault("r2", []).append(r2)
        state.history.setdefault("cg_iterations", []).append(sum(cg_counts))
        if tv_stats is not None:
            state.history.setdefault("tv_weight", []).append(state.params["tv_weight_used"])
        # Decided before the callback, so that a checkpoint written there holds the raised
        # penalties and resumes exactly (a raise at a checkpoint's iteration was lost).
        if (settings.adapt_penalties and scale < settings.penalty_max_factor
                and state.iteration >= settings.penalty_start
                and math.isfinite(row["rel_change"])
                and cycling(turns, state.history["rel_change"], settings.penalty_window,
                            settings.oscillation_threshold, settings.stagnation)):
            # Successive steps of u point back and forth and no longer shrink. Doubling r2
            # alone upsets the psi-step's balance r2 W : rho (measured: it diverged), and
            # r2 with rho alone that of the u-step against TV: all penalties are doubled
            # and the scaled multipliers halved, so the unscaled ones, and with them the
            # fixed points of the iteration, stay the same (Boyd et al. 2011, 3.4.1).
            scale *= 2
            r2, rho, r1 = 2 * r2, 2 * rho, 2 * r1
            state.lam2_local *= 0.5
            state.mu_local *= 0.5
            if apt:
                state.lam1 *= 0.5
            turns.clear()
            state.params["turns"], state.params["penalty_scale"] = [], scale
            logger.info("iteration %d: successive steps alternate; penalties raised to "
                        "%g times their start (r2 = %.4g)", state.iteration, scale, r2)
        warn_if_stalled(state, settings)
        if end_of_iteration(state, row, callback, settings.tol, settings.tol_window):
            if not (aligner is not None and aligner.final_pass(state, state.iteration)):
                break
            final = True
    start = state.params.get("init_r_factor")
    if start and math.isfinite(start) and state.history["r_factor"]:
        state.params["r_factor_over_init"] = state.history["r_factor"][-1] / start
    if aligner is not None:
        aligner.precision(state, model.transmission(state.u), model.ptycho, sqrt_f, valid,
                          state.params.get("noise_amplitude", 0.0) > 0)
    return state, params


#: The joint iterations are stalled above the data when their R-factor is above
#: ``STALL_RATIO`` times the initialisation's per-angle ptychography and fell by less than
#: ``STALL_DROP`` of itself over the last ``STALL_WINDOW`` iterations. Measured: runs that
#: work end at 0.09-1.09 times it (eleven cases from 32^3 to 128^3, noise-free to eta 100;
#: replayed on their histories, the rule never fires), and the three 128^3 ones fall by
#: 12-108% over iterations 30-50; the low-dose 128^3 case that fails sits at 1.84 times it
#: and fell by 0.05% over those (docs/exp-model.md, "Low dose at 128^3").
STALL_RATIO = 1.25
STALL_DROP = 0.02
STALL_WINDOW = 20


def warn_if_stalled(state: ExpADMMState, settings: ExpSolverSettings) -> None:
    """Once per run: say so when the joint iterations are stalled far above the
    initialisation's R-factor (:data:`STALL_RATIO`); ``params["stalled_at"]`` records the
    iteration. ``params["init_at"]``: the iteration of the last (re)initialisation."""
    start = state.params.get("init_r_factor")
    history = state.history.get("r_factor", [])
    if ("stalled_at" in state.params or start is None or not math.isfinite(start)
            or start <= 0 or len(history) <= STALL_WINDOW
            or state.iteration - state.params.get("init_at", 0) <= STALL_WINDOW):
        return  # (the window may not reach back past an alignment restart's new start)
    now, then = history[-1], history[-1 - STALL_WINDOW]
    if now <= STALL_RATIO * start or then - now >= STALL_DROP * now:
        return
    state.params["stalled_at"] = state.iteration
    hint = "; a closer u-step may help: --cg-tol 0.2" if settings.cg_tol == 0 else ""
    logger.warning(
        "iteration %d: the joint R-factor, %.4g, is %.2g times the %.4g of the "
        "initialisation's per-angle ptychography and fell by %.2g%% over the last %d "
        "iterations: the joint iterations are not descending on the data%s (docs/exp-model.md: "
        "low dose at 128^3)", state.iteration, now, now / start, start,
        100 * (then - now) / now, STALL_WINDOW, hint, extra=REPLICATED)
