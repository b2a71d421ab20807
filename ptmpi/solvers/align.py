"""Per-angle projection shifts refined inside the joint iterations (``--align``).

A sample that drifts between angles puts all frames of angle ``t`` at the recorded
positions plus one shift ``s_t = (row, col)`` in pixels (SPEC 8: true minus recorded
position; row along the rotation axis, column across it). The model then uses the
positions ``p_j + s_t`` for the frames ``j`` of angle ``t``; sub-pixel positions are exact
(:mod:`ptmpi.operators.ptycho`), so a shift is nothing but a change of positions.

**Shift step.** From iteration ``start``, every ``every`` iterations, each rank refines the
shifts of its own angles from the current volume: with the reprojection ``v_t`` (``P_t u``
in the linear model, ``exp(i P_t u)`` in the exp model) it minimises, per angle, over an
increment ``d_t`` of the shift, the amplitude misfit

    A_t(d_t) = sum_{j in t} || |F(omega_j * S_j v_t)| - sqrt(f_j) ||^2     (valid pixels)

with the frames at ``p_j + s_t + d_t`` formed as the model forms them (integer window,
probe moved by the fraction; :func:`moved_frames`) with the guarded probe (**Whole
pixels** below). The derivative of a frame with
respect to its shift is the Fourier derivative of the moved probe times the window, so a
Gauss-Newton step is one 2 x 2 system per angle (:func:`amplitude_objective`). Each step
is capped at ``step_px`` pixels per axis and taken only where it lowers ``A_t`` (halved up
to 4 times otherwise); a drift of several pixels is walked down over the first updates.
The measured amplitudes, not the split targets ``z + lam2``, are fitted: the targets
follow the model and barely see its positions (tried first: the shifts hardly moved).
Only the small ``(A, 2)`` shift arrays are communicated (``allgather``).

**Restart.** The volume formed in the first iterations from misaligned data is poor and
ADMM does not forget it (demo, drift 4: the shifts were right to 0.1 px but the SNR
stayed near 6 dB). So once, at the first update after which no shift changed by more than
``settle_px`` while the shifts have moved by more than ``restart_px`` RMS, the solver
restarts from its initial state with the shifts kept: the linear one from ``u = 1``,
``z = D u``, multipliers 0, ``r2`` back to its start; the exp one reruns its initialisation
(per-angle ptychography and phase-gradient tomography) at the aligned positions, from the
input probe (with ``--refine-probe`` a probe refined against the misaligned positions
holds their error as the volume does). The restarted run gets the whole iteration budget
again (:func:`iteration_cap`; 64^3 paper geometry, exp, drift 4: 19.2 dB when the 135
iterations left after the restart at 65 were all it had, 21.5 dB with 200, 22.35
drift-free). Shifts that never settle (they keep moving by noise) restart once two thirds
of the budget are spent, after at least 10 updates. The exp solver also restarts at its
first ``early_restarts`` (3) updates that moved the shifts by more than ``restart_px``
RMS: each gives the next update a fresh reference (demo exp, eta 100, drift 2: 6.6 dB
without, 7.4 dB with; drift 4: 1.7 and 5.7 dB); after an early restart the settled
restart comes whatever the net movement, since the volume was rebuilt while the shifts
moved (128^3 data with nothing to align: 14.5 dB without that, 17.2 with it, 19.5 without
``--align``). Drift-free data with a good first volume never restart. After the settled
restart no update runs until the R-factor is back at or below its value at the restart,
at most for half the budget (:func:`held`): the restarted volume is worse than the one
the shifts were settled against until then, and updates against it only jitter them
(128^3: 0.1 px RMS per update; demo drift 4, six seeds: mean +0.1 dB, 128^3 shifts 0.012
against 0.036 px).

**Final pass (exp model).** The shifts settle against the volume of their time, and that
volume holds part of their error: at 128^3 (default exp geometry, drift 4) they settled
0.11 px from the truth, reached 0.06 px some 60 iterations after the restart and 0.01-0.04
px by the end of its budget, and a volume built from positions that far off does not
recover as they improve: 17.6 dB, where runs without ``--align`` from those positions
give 18.0 dB (0.06 px) and 19.7 dB (0.04 px). So where the shifts have moved by more than
``final_px`` (0.03 px) RMS between the settled restart and the end of its budget, the
solver restarts once more from its initial state at the shifts reached, holds them fixed
and gets the whole budget again (:meth:`Aligner.final_pass`): the run without ``--align``
from those positions with the aligned run's ``r2`` (tested).

**Leave-one-out re-fit (linear model).** A restarted volume holds the shifts it was built
with, including a wrong one: on the noise-free 64^3 paper geometry with drift 4 (seed 0)
angle 0's column shift stopped 0.18 px from the truth, where its misfit against the
restarted volume had its minimum (against the true volume the minimum is at the truth),
and the SNR was 13.6 dB against 24.5 drift-free. Such an angle fits the data worse than
the others (there 152 times the median misfit per count). So, once, at the first update
``outlier_after`` iterations after the settled restart, the angles above
``outlier_factor`` times the median misfit per count are left out
(:meth:`Aligner._check_outliers`): the solver builds a second volume from its initial
state with their frames out of the likelihood (:meth:`Aligner.left_out_frames`) over
``leave_out_iterations``, aside from its own state, and re-fits their shifts against it
(:meth:`Aligner.refit`; there -3.169 px against the true -3.176). Where a shift moves by
more than ``confirm_px``, the solver restarts with every angle at the new shifts, which
gets the whole budget again (24.8 dB); where none does, the check was a false alarm and
the run goes on from its own state, as if it had not happened. docs/alignment.md: the
cases measured and how the factor was chosen.

**Penalties at a restart (exp model).** Every restart sets the penalty raises back (a raise
before it used to survive it) and takes the penalties of the positions it restarts from,
as a run started there would (:func:`ptmpi.solvers.admm_exp.restart_penalties`), except
``r2``. They follow the geometry: ``rho`` and ``r1`` the largest illumination, the TV
weight's noise term and its texture cap the median diagonal ``d`` of
``sum_t P_t^H W_t P_t``, which grows where the scan grids of the angles stop lining up
(sparse low-dose 64^3 case: the TV weight 1.23 at the recorded whole-pixel positions,
1.70 at the aligned ones). Restarts used to keep those of the recorded positions: the
64^3 low-dose seeds 0-2 then ended 0.56 px / 10.01 dB, 0.26 / 9.32 and 0.46 / 7.86, now
0.16 / 10.96, 0.23 / 10.78 and 0.26 / 9.08 (drift-free 10.40 / 11.40 / 10.60). ``r2``
stays that of the recorded positions: its rule's ``L`` (:mod:`ptmpi.solvers.regularisation`)
drops where the grids are offset per angle (2.7e4 -> 1.8e4 there), and the lower value was
the better one wherever measured (recomputed too: 10.39 / 9.31 / 8.51 dB; noise-free 64^3
24.08 against 24.60).

**Unobservable translations.** A translation of the volume by ``(tz, ty, tx)`` moves the
projection at angle ``theta`` by ``(tz, tx cos theta + ty sin theta)``. With an empty
border and every window inside the image the data cannot tell it from shifts of that form.
Convention (``gauge``): ``volume`` (default), each angle is aligned to the current
volume, which holds these translations where the first iterations, on the recorded
positions, put them; where the data do see them (windows hanging over the image edge read
zeros, and a linear-model volume fills its grid with its ``u = 1`` background) they are
recovered absolutely. ``zero``: after every update the mean row shift and the
least-squares fit ``a cos(theta) + b sin(theta)`` of the column shifts are removed
(:func:`remove_unobservable`), and the volume takes them up; a volume that cannot move
within its grid (the linear model's) then fits worse. The output stores the shifts with
their unobservable part ``(mean row, a, b)`` as an attribute; compare shifts with
:func:`remove_unobservable` applied to both, and volumes after undoing
:func:`volume_translation`.

**Far-field convention.** A window at a fractional corner is modelled with the probe moved
by the fraction ``f_j``, which moves the exit wave by ``f_j`` as well: the model's far
field is that of the ideal window times the phase ramp of ``f_j``. When positions change,
``z`` and ``lam2`` are multiplied by the ramp of the change of fraction
(:func:`rephase_far_fields`) so that they stay consistent with the model.

**Whole pixels: the guard band.** The model's frame at a fractional position (window at
the integer corner, probe moved by the fraction over its periodic ``M x M`` grid) has
intensities continuous across a whole pixel, whatever the image, when the probe is zero on
its last row and last column (*guarded*, :func:`~ptmpi.operators.ptycho.guard_probe`; the
derivation is in :mod:`ptmpi.operators.ptycho`); otherwise the frame jumps there by the probe's edge
values (for the demo's probe 0.2 % of its energy), and a shift creeping towards a truth
just beyond a whole pixel stopped at the jump while the volume adapted to the wrong side
(before the guard: demo, eta 100, ``--drift 4 --seed 11``: 12.3 dB against 18.0 dB
drift-free, 0.22 px). Hence:

- the shift step searches (:func:`gauss_newton_shifts`) on the guarded frames
  (:func:`guarded`), whose misfit is continuous across whole pixels;
- a guarded probe (the ``--drift`` simulator's, or any probe guarded before the run) is
  kept guarded by every probe update (linear model, exp joint updates, the exp
  initialisation's per-angle ptychography), so the model is continuous and the search is
  the model itself;
- an unguarded probe is used as given for the volume, its edge being data: guarding it in
  the model cost 1.0 dB on the drift-free demo with ``--align`` (R 0.019 -> 0.057) and
  3.1 dB on the drift-free spiral case. Its shift step keeps an angle's step only where
  the model's own misfit drops. Without that check, shifts of +-0.01 px hopped over the
  jump at whole-pixel positions (drift-free demo with ``--align``: -0.38 dB; with it
  0.00 dB). Keeping a step where the sum of the model's and the guarded frames' misfits
  drops crossed more (unguarded drift data below: seed 11 17.20 dB, drift 4 17.43 dB) but
  cost 0.21 dB on the drift-free test case, whose probe has 12 % of its peak amplitude on
  its edge (``tests/test_align.py``).

Measured (demo, eta 100, defaults; shift error after :func:`remove_unobservable`): drift 4
18.69 dB, 0.003 px (drift-free 18.15 dB; before the guard 16.97 dB, 0.09 px); seed 7
18.68 dB (18.18); seed 11 18.86 dB, 0.003 px (18.01); spiral with jitter and a mask,
drift 3, 18.48 dB (18.17). The drift data carry the guarded probe; on the same drifts
simulated with the unguarded probe (the data then jump as the old model did): 17.23 dB,
0.07 px (drift 4), 14.77 dB, 0.18 px (seed 11; the shift error is small but one angle
stays 0.5 px off), 18.35 dB (seed 7), 18.04 dB (spiral); drift-free with ``--align``:
18.15 dB, shifts 0 (18.15 without), spiral 18.16 dB (18.17). Tried before the guard, not
kept: a misfit smooth in the shift by moving the image (Fourier interpolation; rings or is
biased at the border: 0.4 px), windows kept within an update with the probe moved by
``fraction + d`` (the re-split still jumps: 0.12 px), a heavy ball on the shift steps
(crosses one barrier, overshoots others, costs drift-free data 2 dB), projection matching
of the exp initialisation's images (with 8 angles its tomogram reproduces every image at
its own misaligned position).

Exp model (demo, eta 100, TV weight of the median rule): drift 2 0.12 px, 7.89 dB (9.56
drift-free); drift 4 with a probe that overlaps its neighbours (FWHM 8 at step 8) 0.023
px, 22.51 dB (22.57 drift-free); with the demo's FWHM 4 at step 8 (next to no overlap)
0.19-0.63 px and 0.4-1.5 dB below drift-free over six seeds (mean 0.41 px, 1.16 dB).
There the shifts leave even a start at the true positions (0.6-0.85 px on three seeds,
mean rule): the rows between the spots are barely constrained by the data, and a row
shift trades against them. Fewer or smaller Gauss-Newton steps, more early restarts,
updates every iteration or only once the volume changes slowly, the ``zero`` gauge: no
gain (docs/alignment.md).

**Probe modes.** With ``K`` incoherent modes (:mod:`ptmpi.operators.modes`) the misfit is
that of the model modulus ``sqrt(sum_k |D_k|^2)``, whose derivative along a shift is
``Re(sum_k conj(D_k) dD_k) / |D|``, each mode's ``dD_k`` the Fourier derivative of that
moved mode (:func:`moved_frames`, :func:`amplitude_objective`); ``z`` and ``lam2`` are
rephased mode by mode (:func:`rephase_far_fields`), and the guard band applies to every
mode.

**Limit.** A shift is never larger than ``max_px`` (default half the probe width) per axis
and never moves a window off the image; a shift that would grow past either is stopped
there with a warning (once per angle), not an error.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from ptmpi.backend import get_xp, to_device, to_host
from ptmpi.operators.fft import fft2
from ptmpi.operators.modes import modulus
from ptmpi.operators.ptycho import _ramps, guard_probe, is_guarded, split_positions
from ptmpi.progress import REPLICATED

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AlignOptions:
    """The ``--align`` fields shared by the solvers' settings (linear and exp model);
    :func:`make_aligner` turns them into :class:`AlignSettings`."""

    align: bool = False
    """Refine a shift per angle inside the loop (:mod:`ptmpi.solvers.align`)."""
    align_every: int = 3
    """Iterations between shift updates."""
    align_start: int = 2
    """First iteration of a shift update."""
    align_max: float | None = None
    """Largest shift per axis in pixels (None: half the probe width)."""
    align_gauge: str = "volume"
    """Unobservable translations of the shifts: ``volume`` (held by the current volume)
    or ``zero`` (removed after every update), :mod:`ptmpi.solvers.align`."""


@dataclasses.dataclass(frozen=True)
class AlignSettings:
    """When and how the shifts are refined (see the module notes)."""

    every: int = 3
    """Iterations between shift updates."""
    start: int = 2
    """First iteration of an update."""
    max_px: float | None = None
    """Largest shift per axis, in pixels; None: half the probe width."""
    gn_iterations: int = 8
    """Gauss-Newton steps per update."""
    step_px: float = 1.0
    """Largest Gauss-Newton step per axis, in pixels."""
    restart_px: float = 0.5
    """Restart the reconstruction once, from the solver's initial state, at the first
    update that changes no shift by more than ``settle_px`` after the shifts have moved
    by more than this (RMS over the angles, pixels): the volume formed from misaligned
    data is dropped, the shifts are kept. 0: never restart."""
    settle_px: float = 0.05
    """See ``restart_px``."""
    early_restarts: int = 0
    """Before that restart, also restart at up to this many updates that moved the shifts
    by more than ``restart_px`` RMS since the last restart, settled or not (the exp
    solver: its restart reruns the initialisation at the aligned positions, a fresh
    reference for the next update)."""
    search_px: float = 0.0
    """After the restart, each update also tries the 8 neighbours of its Gauss-Newton
    point at this distance (pixels), against an angle caught in a local minimum (0:
    never; before the guard band, 0.5 changed nothing on the drift-4 demo, where one angle
    stayed 0.4 px off)."""
    budget: int = 0
    """The iterations of the solve (its ``iterations``; 0: unknown). Shifts that have not
    settled by two thirds of it restart anyway (module notes), and after the restart the
    solve runs up to this many iterations more (:func:`iteration_cap`, logged)."""
    remove_translations: bool = False
    """Remove the unobservable part from the shifts after every update
    (:func:`remove_unobservable`); off: the current volume holds it (module notes)."""
    hold: bool = True
    """After the settled restart, no update until the R-factor is back below its value at
    the restart (or half the budget has passed): the shifts were settled against that
    volume, and the restarted one is worse until then (module notes)."""
    final_px: float = 0.0
    """Final pass: where the shifts have moved by more than this (RMS, pixels) between the
    settled restart and the end of its budget, the reconstruction restarts once more from
    its initial state at the shifts reached, holds them fixed and gets the whole budget
    again (module notes; 0: never)."""
    outlier_factor: float = 0.0
    """Leave-one-out re-fit: at the first update ``outlier_after`` iterations after the
    settled restart, an angle whose amplitude misfit per count is above this multiple of
    the median over all angles is re-fitted against a volume built without it (module
    notes; 0: never)."""
    outlier_after: int = 100
    """See ``outlier_factor``."""
    leave_out_iterations: int = 100
    """Iterations of the volume built without the outlying angles (``outlier_factor``)."""
    confirm_px: float = 0.1
    """The re-fit of the left-out angles restarts the reconstruction only where it moves a
    shift by more than this (pixels, per axis); otherwise their shifts are confirmed and
    the run goes on unchanged."""

    def __post_init__(self):
        if self.every < 1 or self.start < 0 or self.gn_iterations < 1:
            raise ValueError("align: every and gn_iterations must be >= 1, start >= 0")
        if (self.outlier_factor < 0 or self.outlier_after < 0 or self.leave_out_iterations < 1
                or self.confirm_px < 0):
            raise ValueError("align: outlier_factor, outlier_after and confirm_px must be "
                             ">= 0, leave_out_iterations >= 1")
        if self.max_px is not None and not self.max_px > 0:
            raise ValueError(f"align: max_px must be > 0, got {self.max_px}")
        if not self.step_px > 0:
            raise ValueError(f"align: step_px must be > 0, got {self.step_px}")


def _per_angle(values, ptycho, n_theta: int) -> np.ndarray:
    """Sums of per-frame host values over the frames of each angle: ``(n_theta,)``."""
    return np.bincount(ptycho.angle, weights=values, minlength=n_theta)


def moved_frames(images_local, ptycho, d_local, derivatives: bool = False):
    """Exit waves of the model with every frame of angle ``t`` moved by ``d_local[t]``.

    ``images_local``: ``(N_THETA_LOCAL, nz, n)`` images ``v_t``; ``ptycho``: the frames at
    their current positions ``p_j``. Returns ``psi`` ``(N_FRAMES_LOCAL, M, M)``, the exit
    waves ``omega_j * S_j v`` at the positions ``p_j + d_t`` exactly as the model forms
    them (integer window, probe moved by the fraction), and the :class:`Ptycho` there;
    with ``derivatives`` also ``[dpsi/dd_row, dpsi/dd_col]``: the window stays, the probe
    moves, so ``dpsi/dd_k = (d omega_g / d g_k) * S_j v`` (a Fourier derivative).
    """
    xp = get_xp(images_local)
    d_local = np.asarray(d_local, dtype=np.float64).reshape(-1, 2)
    moved = ptycho.moved(ptycho.positions + d_local[ptycho.angle]) if np.any(d_local) else (
        ptycho)
    psi = moved.fwd(images_local)
    if not derivatives:
        return psi, moved
    windows = moved.extract(images_local)
    m = moved.m
    dtype = windows.dtype
    # (M, M), or (K, 1, M, M) for K probe modes: the derivatives are then per mode
    spectrum = fft2(to_device(moved.probe, xp).astype(dtype))
    spectrum = spectrum[None] if spectrum.ndim == 2 else spectrum[:, None]
    ramp_r, ramp_c = _ramps(moved.fractions, m, xp, dtype)
    k = to_device((-2j * np.pi * np.fft.fftfreq(m)).astype(dtype), xp)
    dpsi = []
    for axis in (0, 1):
        rr = ramp_r * k[None, :] if axis == 0 else ramp_r
        rc = ramp_c * k[None, :] if axis == 1 else ramp_c
        dprobe = fft2(spectrum * rr[:, :, None] * rc[:, None, :], inverse=True)
        dpsi.append(dprobe * windows)
    return psi, moved, dpsi


def shift_objective(images_local, exit_targets_local, ptycho, d_local, gradient: bool = True):
    """``phi_t(d_t) = sum_{j in t} || omega_j * S_j v_t - y_j ||^2`` at the positions
    ``p_j + d_t`` (the model's exit waves, :func:`moved_frames`), per local angle.

    ``exit_targets_local``: ``(N_FRAMES_LOCAL, M, M)`` exit-wave targets ``y_j`` (e.g.
    ``F^H`` of far-field targets: ``phi`` is the same in the far field, ``F`` being
    unitary). Returns ``phi`` ``(N_THETA_LOCAL,)`` float64 and, with ``gradient``,
    ``grad`` ``(N_THETA_LOCAL, 2)`` and the Gauss-Newton matrix ``hessian``
    ``(N_THETA_LOCAL, 2, 2)`` (``2 Re <J_k, J_l>``), all on the host.
    """
    xp = get_xp(images_local)
    n_theta = images_local.shape[0]
    out = moved_frames(images_local, ptycho, d_local, derivatives=gradient)
    residual = out[0] - exit_targets_local
    phi = _per_angle(to_host(xp.sum(xp.abs(residual) ** 2, axis=(1, 2), dtype=xp.float64)),
                     ptycho, n_theta)
    if not gradient:
        return phi
    jac = out[2]

    def inner(a, b):
        return _per_angle(to_host(xp.sum((xp.conj(a) * b).real, axis=(1, 2),
                                         dtype=xp.float64)), ptycho, n_theta)

    grad = np.stack([2 * inner(jac[k], residual) for k in (0, 1)], axis=1)
    hessian = np.empty((n_theta, 2, 2))
    for k in (0, 1):
        for m in (k, 1):
            hessian[:, k, m] = hessian[:, m, k] = 2 * inner(jac[k], jac[m])
    return phi, grad, hessian


def amplitude_objective(images_local, ptycho, d_local, sqrt_f_local, valid_local=None,
                        gradient: bool = True):
    """The amplitude misfit ``A_t(d_t) = sum_{j in t} || |D_j| - sqrt(f_j) ||^2`` over valid
    pixels, ``D_j = F(psi_j)`` the model with the frames moved by ``d`` (:func:`moved_frames`),
    per local angle; with ``gradient`` also its gradient ``(N_THETA_LOCAL, 2)`` and
    Gauss-Newton matrix ``(N_THETA_LOCAL, 2, 2)``, from ``d|D|/dd_k = Re(conj(D) dD_k)/|D|``.
    All on the host. ``sqrt_f_local``: ``(N_FRAMES_LOCAL, M, M)``, zero frequency at
    ``[0, 0]``; ``valid_local``: the detector mask (None: all valid).
    """
    xp = get_xp(images_local)
    n_theta = images_local.shape[0]
    out = moved_frames(images_local, ptycho, d_local, derivatives=gradient)
    far = fft2(out[0])
    modes = far.ndim == 4  # K probe modes: the model modulus sqrt(sum_k |D_k|^2)
    amplitude = modulus(far) if modes else xp.abs(far)
    residual = amplitude - sqrt_f_local
    if valid_local is not None:
        residual = xp.where(valid_local, residual, 0)

    def per_angle(x):
        return _per_angle(to_host(xp.sum(x, axis=(1, 2), dtype=xp.float64)), ptycho, n_theta)

    misfit = per_angle(residual**2)
    if not gradient:
        return misfit
    nonzero = amplitude > 0
    if modes:  # d|D|/dd = Re(sum_k conj(D_k) dD_k) / |D|
        inverse = xp.where(nonzero, 1 / xp.where(nonzero, amplitude, 1), 0)
        jac = [(xp.conj(far) * fft2(dpsi)).real.sum(axis=0) * inverse for dpsi in out[2]]
    else:
        unit = xp.where(nonzero, far / xp.where(nonzero, amplitude, 1), 0)
        jac = [(xp.conj(unit) * fft2(dpsi)).real for dpsi in out[2]]
    if valid_local is not None:
        jac = [xp.where(valid_local, j, 0) for j in jac]
    grad = np.stack([2 * per_angle(jac[k] * residual) for k in (0, 1)], axis=1)
    hessian = np.empty((n_theta, 2, 2))
    for k in (0, 1):
        for m in (k, 1):
            hessian[:, k, m] = hessian[:, m, k] = 2 * per_angle(jac[k] * jac[m])
    return misfit, grad, hessian


def shift_precision(images_local, ptycho, sqrt_f_local, valid_local=None,
                    counts: bool = True) -> np.ndarray:
    """Cramer-Rao standard errors ``(N_THETA_LOCAL, 2)`` of each angle's shift (row, col),
    in pixels, at the reprojection ``images_local`` with the volume and probe taken as
    known: were they exact, no unbiased estimate of a shift from these data could be more
    precise; a joint estimate, whose shifts share the errors of the volume, is less so
    (docs/alignment.md: on sparse, noisy exp scans the shifts wander 4-22 times this).

    With ``J = d|D|/ds`` the derivative of the model modulus (:func:`amplitude_objective`,
    whose Gauss-Newton matrix is ``H = 2 J^T J``): on photon counts (Poisson, mean
    ``|D|^2``) the Fisher information of the shift is ``sum (d|D|^2/ds)^2 / |D|^2 =
    4 J^T J = 2 H``, whatever the dose; on other data the amplitudes are taken to carry
    Gaussian noise of the variance of the angle's residual per valid pixel, ``H / (2
    sigma^2)``. An angle whose information is singular gets ``inf``. Host float64.
    """
    xp = get_xp(images_local)
    n_theta = images_local.shape[0]
    misfit, _, hessian = amplitude_objective(images_local, ptycho, np.zeros((n_theta, 2)),
                                             sqrt_f_local, valid_local)
    if counts:
        scale = np.full(n_theta, 0.5)  # the inverse of 2 H
    else:
        n_frames, m = sqrt_f_local.shape[-3], sqrt_f_local.shape[-1]
        if valid_local is None:
            per_frame = np.full(n_frames, float(m * m))
        else:
            valid = to_host(xp.sum(valid_local, axis=(-2, -1), dtype=xp.float64))
            per_frame = np.broadcast_to(valid, (n_frames,)).astype(np.float64)
        scale = 2 * misfit / np.maximum(_per_angle(per_frame, ptycho, n_theta), 1.0)
    std = np.full((n_theta, 2), np.inf)
    for a in range(n_theta):
        h = hessian[a]
        det = h[0, 0] * h[1, 1] - h[0, 1] ** 2
        if det > 1e-12 * max(h[0, 0] * h[1, 1], np.finfo(np.float64).tiny):
            std[a] = np.sqrt(scale[a] * np.array([h[1, 1], h[0, 0]]) / det)
    return std


#: A shift step is kept only where it lowers the misfit by more than this fraction of it.
#: A smaller change is rounding, which differs with the rank count (the volume's sums over
#: angles): with an exact ``<`` such near-ties near convergence decided differently on 1
#: and 2 ranks, and the shifts differed by 3e-8 px where the volumes agreed to 2e-9.
MISFIT_RTOL = 1e-12


#: The leave-one-out check (:meth:`Aligner._check_outliers`) flags no angle whose
#: amplitude misfit per count is below this (amplitudes within about 3e-5 of the data).
MISFIT_FLOOR = 1e-9


def lower(new, old):
    """Where ``new`` is below ``old`` by more than :data:`MISFIT_RTOL` of ``|old|``."""
    return new < old - MISFIT_RTOL * np.abs(old)


def gauss_newton_shifts(images_local, ptycho, sqrt_f_local, valid_local=None,
                        iterations: int = 3, step_px: float = 1.0, damping: float = 1e-3,
                        search_px: float = 0.0, bounds=None):
    """Increments ``d`` ``(N_THETA_LOCAL, 2)`` that lower each angle's amplitude misfit
    (:func:`amplitude_objective`).

    Each step solves the 2 x 2 Gauss-Newton system (Levenberg-Marquardt ``damping``
    relative to its diagonal), caps the step at ``step_px`` per axis and keeps it only
    where the misfit decreases, halving it up to 4 times otherwise. Half-way, the 8
    neighbours of ``d`` at ``+-search_px`` are tried (0: never). ``bounds``: ``(lo, hi)``
    arrays ``(N_THETA_LOCAL, 2)`` that every trial ``d`` is clipped to (windows must keep
    a pixel in the image). Returns ``d`` and the final misfit per angle.
    """
    n_theta = images_local.shape[0]
    d = np.zeros((n_theta, 2))

    def clip(trial):
        return trial if bounds is None else np.clip(trial, bounds[0], bounds[1])

    misfit = None
    for it in range(iterations):
        if search_px > 0 and it == iterations // 2:
            # With an unguarded probe the misfit jumps at whole pixels (module notes): a
            # Gauss-Newton step can stall just before one. Try the 8 neighbours at
            # +-search_px and keep the best before going on.
            best = amplitude_objective(images_local, ptycho, d, sqrt_f_local, valid_local,
                                       gradient=False)
            start = d.copy()
            for dr in (-search_px, 0.0, search_px):
                for dc in (-search_px, 0.0, search_px):
                    if dr == dc == 0:
                        continue
                    trial = clip(start + np.array([dr, dc]))
                    value = amplitude_objective(images_local, ptycho, trial, sqrt_f_local,
                                                valid_local, gradient=False)
                    better = lower(value, best)
                    d[better] = trial[better]
                    best = np.where(better, value, best)
        misfit, grad, hessian = amplitude_objective(images_local, ptycho, d, sqrt_f_local,
                                                    valid_local)
        h = hessian + damping * np.einsum("aii->a", hessian)[:, None, None] / 2 * np.eye(2)
        step = np.zeros_like(d)
        ok = np.abs(np.linalg.det(h)) > 1e-30 * np.maximum(np.einsum("aii->a", h) ** 2, 1e-300)
        step[ok] = -np.linalg.solve(h[ok], grad[ok][:, :, None])[:, :, 0]
        scale = np.max(np.abs(step), axis=1, initial=0) / step_px
        step /= np.maximum(scale, 1.0)[:, None]
        pending = np.any(step != 0, axis=1)
        for _halving in range(5):
            if not pending.any():
                break
            trial = clip(d + np.where(pending[:, None], step, 0))
            trial_misfit = amplitude_objective(images_local, ptycho, trial, sqrt_f_local,
                                               valid_local, gradient=False)
            better = pending & lower(trial_misfit, misfit)
            d[better] = trial[better]
            misfit = np.where(better, trial_misfit, misfit)
            pending &= ~better
            step *= 0.5
    return d, misfit


def guarded(ptycho):
    """``ptycho`` itself when its probe is guarded (zero on its last row and column,
    :func:`~ptmpi.operators.ptycho.guard_probe`), else the same frames with the guarded
    probe: the frames the shift step searches on, continuous across whole pixels."""
    if is_guarded(ptycho.probe):
        return ptycho
    out = ptycho.moved(ptycho.positions)
    out.probe = guard_probe(ptycho.probe)
    return out


def unobservable_basis(theta) -> np.ndarray:
    """``(2 A, 3)``: the shifts ``(row, col)`` of all angles (row-major ``(A, 2)``
    flattened) made by a volume translation ``(tz, tx, ty)``: row ``tz``, column
    ``tx cos(theta) + ty sin(theta)``."""
    theta = np.asarray(theta, dtype=np.float64)
    basis = np.zeros((theta.size, 2, 3))
    basis[:, 0, 0] = 1.0
    basis[:, 1, 1] = np.cos(theta)
    basis[:, 1, 2] = np.sin(theta)
    return basis.reshape(-1, 3)


def unobservable_part(shifts, theta) -> np.ndarray:
    """Least-squares coefficients ``(mean row, a, b)`` of ``shifts`` ``(A, 2)`` on
    :func:`unobservable_basis` (``a``, ``b`` of ``col ~ a cos + b sin``)."""
    basis = unobservable_basis(theta)
    coef, *_ = np.linalg.lstsq(basis, np.asarray(shifts, dtype=np.float64).ravel(),
                               rcond=1e-10)
    return coef


def remove_unobservable(shifts, theta) -> np.ndarray:
    """``shifts`` ``(A, 2)`` less their unobservable part (the convention of the notes)."""
    shifts = np.asarray(shifts, dtype=np.float64)
    basis = unobservable_basis(theta)
    return shifts - (basis @ unobservable_part(shifts, theta)).reshape(shifts.shape)


def volume_translation(shifts, theta) -> np.ndarray:
    """``(tz, ty, tx)``: the translation of the volume that a reconstruction under the
    convention has relative to a volume whose data drifted by ``shifts`` (true minus
    recorded): ``(-mean row, -b, -a)``."""
    row, a, b = unobservable_part(shifts, theta)
    return -np.array([row, b, a])


def translate_volume(u, t):
    """``u`` moved by ``t = (tz, ty, tx)`` voxels towards higher indices (Fourier, periodic);
    e.g. to compare a reconstruction with the truth after undoing
    :func:`volume_translation`."""
    xp = get_xp(u)
    out = xp.fft.fftn(u)
    for axis, shift in enumerate(t):
        k = np.fft.fftfreq(u.shape[axis])
        shape = [1, 1, 1]
        shape[axis] = -1
        out *= to_device(np.exp(-2j * np.pi * shift * k).reshape(shape).astype(u.dtype), xp)
    return xp.fft.ifftn(out).astype(u.dtype, copy=False)


def rephase_far_fields(arrays, old_positions, new_positions) -> None:
    """Multiply each ``(N_FRAMES, M, M)`` far-field array in ``arrays`` in place by the
    phase ramp of the change of its frames' sub-pixel fractions (module notes)."""
    _, old = split_positions(old_positions)
    _, new = split_positions(new_positions)
    change = new - old
    moved = np.flatnonzero(np.any(change != 0, axis=1))
    if moved.size == 0:
        return
    for x in arrays:  # (N_FRAMES, M, M), or (K, N_FRAMES, M, M) with K probe modes
        xp = get_xp(x)
        ramp_r, ramp_c = _ramps(change[moved], x.shape[-1], xp, x.dtype)
        index = to_device(moved, xp)
        x[..., index, :, :] = x[..., index, :, :] * ramp_r[:, :, None] * ramp_c[:, None, :]


class Aligner:
    """The shifts of this rank's angles and their updates (module notes).

    Parameters
    ----------
    settings : AlignSettings
    theta_local : (N_THETA_LOCAL,) radians
    positions_local : (N_FRAMES_LOCAL, 2)
        Recorded positions (the file's).
    frame_offset_local : (N_THETA_LOCAL + 1,)
    image_shape : (nz, n)
    m : probe width
    comm : communicator of the angle group (``allgather`` of the small shift arrays)
    """

    def __init__(self, settings: AlignSettings, theta_local, positions_local,
                 frame_offset_local, image_shape, m: int, comm):
        self.settings = settings
        self.comm = comm
        self.recorded = np.asarray(positions_local, dtype=np.float64).reshape(-1, 2)
        self.frame_offset = np.asarray(frame_offset_local, dtype=np.int64)
        self.angle = np.repeat(np.arange(self.frame_offset.size - 1),
                               np.diff(self.frame_offset))
        self.theta_global = np.concatenate(comm.allgather(
            np.asarray(theta_local, dtype=np.float64)))
        self.n_theta_local = self.frame_offset.size - 1
        self.max_px = settings.max_px if settings.max_px is not None else m / 2
        # The shifts that keep every window of an angle touching the image (SPEC 2).
        nz, n = image_shape
        lo = np.full((self.n_theta_local, 2), -np.inf)
        hi = np.full((self.n_theta_local, 2), np.inf)
        for t in range(self.n_theta_local):
            p = self.recorded[self.frame_offset[t]:self.frame_offset[t + 1]]
            if p.size:
                lo[t] = -(m - 1) - p.min(axis=0) + 1e-3
                hi[t] = np.array([nz, n]) - 1e-3 - p.max(axis=0)
        self.lo = np.maximum(lo, -self.max_px)
        self.hi = np.minimum(hi, self.max_px)
        self.warned: set[int] = set()
        self.restarted = False
        self.restart = False
        self.leave_out: list[int] | None = None
        """Angles to re-fit against a volume built without them (set by :meth:`update`
        at the leave-one-out check, cleared by :meth:`refit`)."""

    def _first(self) -> int:
        """Global index of this rank's first angle (collective)."""
        counts = self.comm.allgather(self.n_theta_local)
        return int(sum(counts[:self.comm.rank]))

    def zeros(self) -> np.ndarray:
        return np.zeros((self.n_theta_local, 2))

    def positions(self, shifts_local) -> np.ndarray:
        """Model positions ``recorded + shift`` of this rank's frames."""
        shifts_local = np.asarray(shifts_local, dtype=np.float64).reshape(-1, 2)
        return self.recorded + shifts_local[self.angle]

    def precision(self, state, images_local, ptycho, sqrt_f_local, valid_local=None,
                  counts: bool = True) -> None:
        """At the end of a run (collective): the Cramer-Rao standard errors of this rank's
        shifts at the final reprojection ``images_local`` (:func:`shift_precision`) into
        ``state.shift_std_local``, and one log line on all of them."""
        std = shift_precision(images_local, ptycho, sqrt_f_local, valid_local, counts)
        state.shift_std_local = std
        every = self.gather(std)
        worst = int(np.argmax(np.max(every, axis=1)))
        logger.info("shift precision (Cramer-Rao bound of %s, were the final volume and "
                    "probe exact): median %.3g px, largest %.3g px (angle %d); a lower "
                    "bound, since the shifts share the errors of the volume they are fitted "
                    "with (/entry_1/ptmpi/shift_std_px)", "Poisson counts" if counts else
                    "the residual as Gaussian amplitude noise", float(np.median(every)),
                    float(every[worst].max()), worst, extra=REPLICATED)

    def due(self, iteration: int, state=None) -> bool:
        """Whether an update is due at ``iteration``; ``state``: the solver's state, whose
        parameters and R-factor history decide the hold after the settled restart
        (:func:`held`)."""
        s = self.settings
        if not (iteration >= s.start and (iteration - s.start) % s.every == 0):
            return False
        return state is None or not (held(iteration, state.params, state.history)
                                     or "align_final_at" in state.params)

    def gather(self, shifts_local) -> np.ndarray:
        """All ranks' shifts ``(A, 2)``, in angle order, on every rank."""
        return np.concatenate([np.asarray(s, dtype=np.float64).reshape(-1, 2)
                               for s in self.comm.allgather(np.asarray(shifts_local))])

    def update(self, state, images_local, ptycho, sqrt_f_local, valid_local=None,
               iteration: int = 0) -> np.ndarray:
        """Refine ``state.shifts_local`` from the reprojections ``images_local`` and the
        measured amplitudes ``sqrt_f_local`` (frames of ``ptycho``, at the current
        positions; ``valid_local`` the detector mask); rephase ``z`` and ``lam2``. The
        search runs on the guarded frames; with an unguarded probe an angle's step is kept
        only where the model's own misfit drops (module notes, whole pixels).
        Returns the new model positions."""
        s = self.settings
        self.leave_out = None
        old_shifts = np.asarray(state.shifts_local, dtype=np.float64).reshape(-1, 2)
        d, misfit = self._step(images_local, ptycho, sqrt_f_local, valid_local, old_shifts,
                               s.search_px if self.restarted else 0.0)
        # Gauge (all angles, identically on every rank), then the limits.
        total = self.gather(old_shifts + d)
        if s.remove_translations:
            total = remove_unobservable(total, self.theta_global)
        first = self._first()
        new = total[first:first + self.n_theta_local]
        clipped = np.clip(new, self.lo, self.hi)
        at_limit = (new <= self.lo + 1e-9) | (new >= self.hi - 1e-9)
        for t in np.flatnonzero(np.any(at_limit, axis=1)):
            if int(t) not in self.warned:
                self.warned.add(int(t))
                logger.warning(
                    "rank %d: the shift of angle %d (%.1f deg) reached its limit at "
                    "iteration %d and is stopped at (%.2f, %.2f) px (--align-max %.3g px, "
                    "or a window leaving the image)", self.comm.rank, first + t,
                    math.degrees(self.theta_global[first + t]), iteration, *clipped[t],
                    self.max_px)
        step = np.abs(clipped - old_shifts)
        rms = math.sqrt(float(np.mean(self.gather(clipped - old_shifts) ** 2)))
        logger.info("iteration %d: shifts updated, RMS change %.3g px, largest %.3g px",
                    iteration, rms, float(self.comm.allreduce_scalar(
                        float(step.max(initial=0)), "max")))
        logger.debug("iteration %d: shifts (row, col) of rank %d: %s", iteration,
                     self.comm.rank, np.array2string(clipped, precision=3))
        moved = math.sqrt(float(np.mean(self.gather(clipped) ** 2)))
        largest = float(self.comm.allreduce_scalar(float(step.max(initial=0)), "max"))
        since = math.sqrt(float(np.mean(self.gather(clipped - self.last_restart) ** 2)))
        early = state.params.get("align_early_restarts", 0)
        # Shifts that keep moving by noise never settle: after two thirds of the budget
        # the restart is taken anyway (exp demo, eta 100, drift 4, seed 1: 0.06-0.1 px
        # RMS per update to the end, 4.94 dB against 8.85 drift-free without it; at half
        # the budget it cut short settling shifts on seeds 0 and 2, docs/alignment.md).
        # (and at least 10 updates: a few cannot tell noise from settling).
        late = (bool(s.budget) and 3 * iteration >= 2 * s.budget
                and (iteration - s.start) // s.every >= 10)
        # After an early restart the volume was rebuilt while the shifts still moved: the
        # settled restart is then due even where they end near where they started
        # (drift-free 128^3 data with --align: 14.5 dB without it, docs/alignment.md).
        self.restart = bool(s.restart_px > 0 and not self.restarted and (
            ((moved > s.restart_px or early > 0) and (largest < s.settle_px or late))
            or (early < s.early_restarts and since > s.restart_px)))
        if self.restart:
            if largest < s.settle_px or late or early >= s.early_restarts:
                self.restarted = True
                state.params["align_restarted"] = True
                # The reconstruction from the aligned positions gets the whole iteration
                # budget (iteration_cap): the iterations before it only served the shifts.
                state.params["align_restart_at"] = int(iteration)
                r_then = getattr(state, "history", {}).get("r_factor") or []
                if s.hold and r_then:
                    state.params["align_hold_r"] = float(r_then[-1])
                    state.params["align_hold_until"] = int(iteration) + (
                        s.budget // 2 if s.budget else 10**9)
                why = ("the shifts have settled" if largest < s.settle_px else
                       "two thirds of the iterations are spent (the shifts still move by "
                       f"{largest:.3g} px)")
            else:
                state.params["align_early_restarts"] = early + 1
                why = f"the shifts moved by {since:.3g} px RMS (early restart {early + 1})"
            self.last_restart = clipped.copy()
            state.params["align_last_restart"] = self.gather(clipped).tolist()
            logger.info("iteration %d: %s (RMS %.3g px); the reconstruction restarts from "
                        "its initial state with them%s", iteration, why, moved,
                        f" (up to iteration {iteration + s.budget})" if self.restarted
                        and s.budget else "")
        if not self.restart:
            self._check_outliers(state, misfit, sqrt_f_local, valid_local, ptycho, iteration)
        old_positions = self.positions(old_shifts)
        new_positions = self.positions(clipped)
        rephase_far_fields([state.z_local, state.lam2_local], old_positions, new_positions)
        state.shifts_local = clipped
        return new_positions

    def _step(self, images_local, ptycho, sqrt_f_local, valid_local, old_shifts,
              search_px: float = 0.0):
        """The Gauss-Newton increments of this rank's shifts and each angle's misfit
        there: the search on the guarded frames; with an unguarded probe an angle's step
        is kept only where the model's own misfit drops (module notes, whole pixels)."""
        s = self.settings
        search = guarded(ptycho)
        d, misfit = gauss_newton_shifts(images_local, search, sqrt_f_local, valid_local,
                                        s.gn_iterations, s.step_px, search_px=search_px,
                                        bounds=(self.lo - old_shifts, self.hi - old_shifts))
        if search is not ptycho:  # an unguarded probe: the model's own misfit decides
            before = amplitude_objective(images_local, ptycho, np.zeros_like(d),
                                         sqrt_f_local, valid_local, gradient=False)
            after = amplitude_objective(images_local, ptycho, d, sqrt_f_local, valid_local,
                                        gradient=False)
            d[~lower(after, before)] = 0
        return d, misfit

    def _check_outliers(self, state, misfit_local, sqrt_f_local, valid_local, ptycho,
                        iteration: int) -> None:
        """Once, at the first update ``outlier_after`` iterations after the settled
        restart: the angles whose misfit per count exceeds ``outlier_factor`` times the
        median (module notes, leave-one-out re-fit). Where there are any, marks the state
        (``params["align_leave_out"]``) and asks the solver for a volume built without
        their frames (``self.leave_out``), then for :meth:`refit`."""
        s = self.settings
        params = state.params
        # (not where the volume without the angles would take longer than the whole run)
        if not (s.outlier_factor > 0 and self.restarted and "align_leave_out" not in params
                and iteration >= int(params.get("align_restart_at", 0)) + s.outlier_after
                and (not s.budget or s.budget > s.leave_out_iterations)):
            return
        xp = get_xp(sqrt_f_local)
        counts = sqrt_f_local**2 if valid_local is None else xp.where(valid_local,
                                                                      sqrt_f_local**2, 0)
        counts = _per_angle(to_host(xp.sum(counts, axis=(1, 2), dtype=xp.float64)), ptycho,
                            self.n_theta_local)
        local = np.where(counts > 0, np.asarray(misfit_local, dtype=np.float64)
                         / np.where(counts > 0, counts, 1), 0.0)
        per_count = np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1)
                                    for x in self.comm.allgather(local)])
        median = float(np.median(per_count))
        # a misfit per count below MISFIT_FLOOR is rounding (amplitudes within 3e-5), not
        # an outlier, however small the median
        outliers = [int(t) for t in np.flatnonzero(
            per_count > max(s.outlier_factor * median, MISFIT_FLOOR))]
        if per_count.size < 4:
            outliers = []  # too few angles for a median to mean anything
        params["align_leave_out"] = outliers
        params["align_outlier_misfit"] = per_count.tolist()
        if not outliers:
            logger.info("iteration %d: no outlying angle (misfit per count at most %.3g "
                        "times the median angle's)", iteration,
                        float(per_count.max() / median) if median > 0 else 1.0)
            return
        history_r = getattr(state, "history", {}).get("r_factor") or []
        params["align_leave_out_at"] = int(iteration)
        params["align_leave_out_r"] = float(history_r[-1]) if history_r else math.inf
        self.leave_out = outliers
        logger.info(
            "iteration %d: angle(s) %s fit the data %s times worse per count than the "
            "median angle; a volume is built without them over %d iterations and their "
            "shifts are re-fitted against it", iteration,
            ", ".join(str(t) for t in outliers),
            ", ".join(f"{per_count[t] / median:.3g}" if median > 0 else "infinitely"
                      for t in outliers),
            s.leave_out_iterations)

    def left_out_frames(self, params: dict) -> np.ndarray:
        """``(N_FRAMES_LOCAL,)`` bool: this rank's frames of the angles left out
        (``params["align_leave_out"]``)."""
        first = self._first()
        local = np.isin(np.arange(first, first + self.n_theta_local),
                        params.get("align_leave_out", []))
        return local[self.angle]

    def refit(self, state, images_local, ptycho, sqrt_f_local, valid_local=None,
              iteration: int = 0) -> np.ndarray:
        """Re-fit the shifts of the left-out angles against the reprojections
        ``images_local`` of the volume built without them (all data in ``sqrt_f_local``
        and ``valid_local``); the others stay. Where a shift moves by more than
        ``confirm_px``, the solver then restarts from its initial state with every angle
        at the new shifts (``self.restart``), which gets the whole budget again and holds
        the shift updates until its R-factor is back at the one before the leave-out
        (:func:`held`); otherwise the shifts are confirmed and stay as they were, and so
        does the solver's state. Returns the model positions."""
        s = self.settings
        params = state.params
        self.leave_out = None
        old_shifts = np.asarray(state.shifts_local, dtype=np.float64).reshape(-1, 2)
        d, _ = self._step(images_local, ptycho, sqrt_f_local, valid_local, old_shifts)
        first = self._first()
        d[~np.isin(np.arange(first, first + self.n_theta_local),
                   params["align_leave_out"])] = 0
        new = np.clip(old_shifts + d, self.lo, self.hi)
        before, after = self.gather(old_shifts), self.gather(new)
        moved = float(np.abs(after - before).max(initial=0))
        params["align_refit_at"] = int(iteration)
        params["align_refit_moved"] = moved
        confirmed = moved <= s.confirm_px
        for t in params["align_leave_out"]:
            logger.info("iteration %d: angle %d re-fitted without its own data: shift "
                        "(%.3f, %.3f) -> (%.3f, %.3f) px%s", iteration, t, *before[t],
                        *after[t], f" (within {s.confirm_px:.3g} px: kept as it was)"
                        if confirmed else "")
        if confirmed:
            logger.info("iteration %d: the shifts of the left-out angles are confirmed; "
                        "the reconstruction goes on unchanged", iteration)
            return self.positions(old_shifts)
        params["align_restart_at"] = int(iteration)
        if s.hold:
            params["align_hold_r"] = params["align_leave_out_r"]
            params["align_hold_until"] = int(iteration) + (s.budget // 2 if s.budget
                                                           else 10**9)
        self.last_restart = new.copy()
        params["align_last_restart"] = after.tolist()
        self.restart = True
        rephase_far_fields([state.z_local, state.lam2_local], self.positions(old_shifts),
                           self.positions(new))
        state.shifts_local = new
        return self.positions(new)

    def final_pass(self, state, iteration: int) -> bool:
        """At the end of the settled restart's budget (collective): True, with the state
        marked (``params["align_final_at"]``, a new ``align_restart_at``), where the shifts
        have moved by more than ``final_px`` RMS since that restart; the solver then
        restarts from its initial state at the current shifts, which no update changes
        any more (:meth:`due`)."""
        s = self.settings
        if not (s.final_px > 0 and self.restarted) or "align_final_at" in state.params:
            return False
        since = math.sqrt(float(np.mean(self.gather(
            np.asarray(state.shifts_local, dtype=np.float64).reshape(-1, 2)
            - self.last_restart) ** 2)))
        if since <= s.final_px:
            return False
        state.params["align_final_at"] = state.params["align_restart_at"] = int(iteration)
        self.last_restart = np.array(state.shifts_local, dtype=np.float64).reshape(-1, 2)
        state.params["align_last_restart"] = self.gather(self.last_restart).tolist()
        logger.info("iteration %d: the shifts moved by %.3g px RMS since the restart; the "
                    "reconstruction restarts from its initial state with them, held fixed "
                    "(final pass%s)", iteration, since,
                    f", up to iteration {iteration + s.budget}" if s.budget else "")
        return True

    def attach(self, state, set_positions) -> None:
        """Start ``state.shifts_local`` at 0, or (a resumed state) move the model's frames
        to the shifts it holds with ``set_positions(positions_local)``."""
        self.restarted = bool(state.params.get("align_restarted", False))
        self.restart = False
        self.leave_out = None
        last = state.params.get("align_last_restart")
        self.last_restart = (self.zeros() if last is None else
                             np.asarray(last, dtype=np.float64)[self._first():self._first()
                                                                + self.n_theta_local])
        if getattr(state, "shifts_local", None) is None:
            state.shifts_local = self.zeros()
            return
        state.shifts_local = np.asarray(state.shifts_local, dtype=np.float64).reshape(-1, 2)
        if np.any(state.shifts_local != 0):
            set_positions(self.positions(state.shifts_local))


def refit_pending(params: dict) -> bool:
    """Whether angles were left out (``params["align_leave_out"]``) and not re-fitted:
    only in a checkpoint written by the previous release inside its leave-out phase,
    whose volume was being built without them (this release builds that volume and
    re-fits within one update)."""
    return bool(params.get("align_leave_out")) and "align_refit_at" not in params


def held(iteration: int, params: dict, history: dict) -> bool:
    """True while the shift updates wait after the settled restart (``hold``): until an
    iteration after the restart has an R-factor at or below the one the run had when it
    restarted (``params["align_hold_r"]``), and at most until
    ``params["align_hold_until"]``. A function of the state alone, so a resumed run holds
    alike (the R-factor is the same number on every rank)."""
    hold_r = params.get("align_hold_r")
    if hold_r is None or iteration >= params.get("align_hold_until", 0):
        return False
    restart_at = params.get("align_restart_at", 0)
    since = [r for i, r in zip(history.get("iteration", []), history.get("r_factor", []),
                               strict=True)
             if i > restart_at]
    return not any(r <= hold_r for r in since)


def iteration_cap(iterations: int, params: dict) -> int:
    """The last iteration of a solve of ``iterations`` iterations: with ``--align``, once
    the shifts have settled and the reconstruction restarted from its initial state
    (module notes), that restart gets the whole budget again, so the volume from aligned
    positions is not cut short by the iterations spent aligning (64^3 paper geometry, exp
    model, drift 4: the restart came at iteration 65; 200 iterations in all gave 19.2 dB,
    200 after the restart 21.5 dB against 22.35 drift-free)."""
    return int(iterations) + int(params.get("align_restart_at", 0))


def make_aligner(settings, problem, comm, restart: bool = True,
                 early_restarts: int = 0, final_px: float = 0.0,
                 outlier_factor: float = 0.0, outlier_after: int = 100,
                 leave_out_iterations: int = 100,
                 confirm_px: float = 0.1) -> Aligner | None:
    """The :class:`Aligner` of a solve when ``settings.align`` is set (None otherwise);
    ``restart``: whether the solver restarts once the shifts have settled;
    ``early_restarts``, ``final_px``, ``outlier_factor``, ``outlier_after``,
    ``leave_out_iterations``, ``confirm_px``: see :class:`AlignSettings`."""
    if not getattr(settings, "align", False):
        return None
    if settings.align_gauge not in ("volume", "zero"):
        raise ValueError(f"align_gauge must be volume or zero, got {settings.align_gauge!r}")
    align = AlignSettings(every=settings.align_every, start=settings.align_start,
                          max_px=settings.align_max,
                          remove_translations=settings.align_gauge == "zero",
                          budget=int(settings.iterations),
                          restart_px=AlignSettings.restart_px if restart else 0.0,
                          early_restarts=early_restarts,
                          final_px=final_px if restart else 0.0,
                          outlier_factor=outlier_factor if restart else 0.0,
                          outlier_after=outlier_after,
                          leave_out_iterations=leave_out_iterations,
                          confirm_px=confirm_px)
    nz, _, n = problem.volume_shape
    return Aligner(align, problem.theta_local, problem.positions_local,
                   problem.frame_offset_local, (nz, n), int(problem.probe.shape[-1]), comm)
