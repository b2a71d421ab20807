"""Memory a rank needs for a reconstruction: predicted before the run, measured during it.

The prediction counts the arrays alive at the solver's peak in units of one complex volume
``V = nz n^2`` and of one stack of the rank's far-field frames ``Fb = N_FRAMES_LOCAL M^2``
(both in the complex dtype's bytes), plus the projector's sparse matrices. The peak is the
larger of two phases: the volume phase (CG on ``u``, the TV step) holds the volumes and the
frames that live through the iteration; the frame phase (far field and prox) holds all the
frames' temporaries and fewer volumes.

============  ==========================  ==========================  =====================
algorithm     volume phase                frame phase                 per projector nnz
============  ==========================  ==========================  =====================
APT           ``15.7 V + 5.0 Fb``         ``12.9 V + 7.0 Fb``         ``78 B``
APTs          ``9.8 V + 5.1 Fb``          ``5.8 V + 7.0 Fb``          ``50 B``
two-step      ``16 V + 4 Fb``             ``2 V + 16 Fb``             ``40 B``
============  ==========================  ==========================  =====================

ptycho2d holds no volume and no projector: ``(3.0 + 3.5 K) Fb + 14 Pb`` with ``K`` probe
modes and ``Pb`` the rank's image stack (``N_THETA_LOCAL nz n`` complex), plus ``1.0 K Fb``
for sub-pixel scans (the moved probes), fitted to ``tracemalloc`` peaks of two-iteration
solves with the probe refined (1-3 modes, 6 geometries 32^2-64^2 with 4-12 angles and
probes of 16-32 px, whole and sub-pixel positions; largest misfit 11%); on the Siemens star
it predicts 510 MiB / 1.35 GiB of solver arrays for 1 / 4 modes (733 MiB / 1.57 GiB per
rank with the input and the process) against whole-run ``tracemalloc`` peaks of 0.60 /
1.44 GiB and peak resident sizes of 0.71 / 1.55 GiB. Until this fit ptycho2d used the
two-step figures, 1.8-2.9 times too high there.

APT's volumes are u, the previous u, the CG vectors (x, r, d, A d, b), p and lam1 (3 V
each) and the complex128 sums of the normal operator (kept between calls: 2 V through the
iteration); APTs has no p, lam1 or TV step. The
frames are the counts, their square roots, z, lam2, D u, z + lam2 and the prox temporaries.
The projector holds the float32 matrix and its transpose in CSR and the wider copies the
normal operator sums with; it has about ``2.2 n^2`` non-zeros per local angle.
With the numpy fallback (no Numba, ``PTMPI_NUMBA=0``, or GPU arrays) more temporaries are
alive: APT ``24.1 V + 6.1 Fb`` / ``12.1 V + 11.2 Fb`` / ``71 B``, APTs ``14.8 V + 5.1 Fb``
/ ``5.7 V + 11.2 Fb`` / ``45 B``. Add the input block as read and, with
ground truth, one volume. Sub-pixel scan positions add ``1 Fb`` to both phases: the cached
probe of every frame (measured +0.84 to +1.00 Fb for APT and APTs, kernels and numpy).

The exponential model (``--model exp``, :mod:`ptmpi.solvers.admm_exp`) also holds the
per-angle transmissions psi and mu and the Gauss-Newton CG vectors on them, so its figures
have a third unit, the projection stack ``Pb = N_THETA_LOCAL nz n`` (complex), and its
initialisation (per-angle ptychography, then the phase-gradient tomography) is one of the
phases that may peak:

=================  =================================  =================================  ======
exp model          volume phase                       frame phase                        per nnz
=================  =================================  =================================  ======
APT                ``18.8 V + 5.1 Fb + 9.6 Pb``       ``0.1 V + 8.1 Fb + 7.5 Pb``        ``41 B``
APTs               ``11.8 V + 4.6 Fb + 8.3 Pb``       ``0.7 V + 8.1 Fb + 6.7 Pb``        ``42 B``
two-step           ``12.4 V + 3.1 Fb + 7.3 Pb``       ``0.7 V + 8.1 Fb + 6.4 Pb``        ``42 B``
=================  =================================  =================================  ======

and with the numpy fallback (or GPU arrays): APT ``20.7 V + 5.3 Fb + 11.8 Pb`` /
``0.8 V + 12.2 Fb + 7.2 Pb`` / ``40 B``, APTs ``13.4 V + 3.4 Fb + 13.0 Pb`` /
``1.0 V + 12.2 Fb + 6.8 Pb`` / ``41 B``, two-step ``13.7 V + 2.9 Fb + 11.9 Pb`` /
``0.8 V + 12.2 Fb + 7.3 Pb`` / ``40 B``. They are non-negative least-squares fits of the
relative misfit (alternating with the phase each run peaks in;
:mod:`ptmpi.bench.memory_fit`) to ``tracemalloc`` peaks of exp solves with two
initialisation ptychography iterations and Gauss-Newton steps and two joint iterations
(the peaks do not depend on these counts), after the kernels were compiled, on 24
geometries: 24^3-64^3 (nz 16-64), 4-24 angles, far-field stacks from 0.1 to 75 volumes
(the peaks: ``docs/results/memory/exp-peaks.jsonl``).
Largest misfit of the rounded coefficients: APT 2.3% (kernels) / 4.5% (numpy), APTs 4.5% /
2.4%, two-step 2.0% / 1.4%; a test checks APT and APTs on a geometry outside the fit. The
sub-pixel ``1 Fb`` is carried over from the linear model, not measured for exp.

The APT and APTs coefficients are the same fits (:mod:`ptmpi.bench.memory_fit`, ``linear``)
to ``tracemalloc`` peaks of two-iteration runs on 14 geometries at 32^3-96^3 with 4-48
angles and far-field stacks from 0.1 to 14 volumes (``docs/results/memory/
linear-peaks.jsonl``; largest misfit of the rounded coefficients 3.3%, kernels, and 0.9%,
numpy), refitted when the CG loop began to keep its buffers; a test checks them on a
geometry outside the fit, and ``ptmpi bench`` prints the prediction beside the measured
peak.
The angle x slab layout (``--slabs S``, :mod:`ptmpi.parallel.volume`) holds the volumes of
its slab only, so ``V`` becomes ``V_S = ceil(nz / S) n^2`` (truth included), while the
projector covers the angles of the rank's angle group (``N_THETA_GROUP``, about ``S`` times
the rank's own), and the projection transposes add, not fitted but counted from the
arrays alive in the forward map and the adjoint: the group's slab rows and their receive
buffer ``2 N_THETA_GROUP ceil(nz / S) n`` complex, the rows of ``W`` (real), and the rank's
full-height projections and their send buffer ``2 N_THETA_LOCAL nz n`` complex. Writing
the output gathers the volume on rank 0 after the iterations (``V`` beside ``u``'s slab, the
frames and the input: below the iteration's peak up to ``S`` of about 16; not counted).
At 384^3 with 12 angles (2028 frames of 64^2) on 4 ranks, ``S = 4``, the plan is 2.35 GiB
per rank and the measured peak resident size of two iterations 2.32-2.33 GiB (the
replicated plan: 7.4 GiB).

To the arrays add the process baseline (interpreter, numpy, scipy, MPI), measured at run
time as the resident size before the data are read, and what the first solve loads beyond
it (:data:`FIRST_SOLVE_BYTES`: the Numba-compiled kernels, FFT plans, modules imported on
first use): measured as the resident growth of a one-angle, eight-frame solve (arrays
negligible) right after reading the input, 80 MiB with the kernels and 21-22 MiB without
(linear and exp model alike; Numba 0.68, numpy 2.4, one rank). With it the plan of exp
runs (48 x 56^2, 10 angles, 990 frames of 16^2, two iterations after the default
initialisation) was, against the measured peak resident size, APT 229 / 222 MiB and APTs
220 / 215 MiB (numpy fallback: 174 / 178 MiB and 164 / 168 MiB); without it, 149 MiB for
APT. On 56 x 64^2, 20 angles, 8800 frames (exp APT, solver arrays 143 MiB on one rank) the
plan was 352 MiB against 382 MiB measured on one rank, 296 against 305 MiB (the larger
rank) on two.
"""

from __future__ import annotations

import math
import os
import resource

import numpy as np

NNZ_PER_VOXEL_ANGLE = 2.2

# resident growth of the first solve beyond the baseline, by whether the compiled kernels
# are in use (see the module doc)
FIRST_SOLVE_BYTES = {True: 80 * 2**20, False: 22 * 2**20}

# (volume phase: V, Fb), (frame phase: V, Fb), bytes per projector non-zero
_COEFFICIENTS = {
    (True, "apt"): ((15.7, 5.0), (12.9, 7.0), 78),
    (True, "apts"): ((9.8, 5.1), (5.8, 7.0), 50),
    (False, "apt"): ((24.1, 6.1), (12.1, 11.2), 71),
    (False, "apts"): ((14.8, 5.1), (5.7, 11.2), 45),
}
_TWO_STEP = ((16.0, 4.0), (2.0, 16.0), 40)

# ptycho2d: bytes = a Fb + b K Fb + c K Fb (sub-pixel scans) + d Pb, K probe modes, Pb the
# image stack (N_THETA_LOCAL nz n complex); see the module doc
_PTYCHO2D = (3.0, 3.5, 1.0, 14.0)

# exp model (--model exp): (volume phase: V, Fb, Pb), (frame phase: V, Fb, Pb), bytes per
# projector non-zero (see the module doc)
_EXP_COEFFICIENTS = {
    (True, "apt"): ((18.8, 5.1, 9.6), (0.1, 8.1, 7.5), 41),
    (True, "apts"): ((11.8, 4.6, 8.3), (0.7, 8.1, 6.7), 42),
    (True, "two-step"): ((12.4, 3.1, 7.3), (0.7, 8.1, 6.4), 42),
    (False, "apt"): ((20.7, 5.3, 11.8), (0.8, 12.2, 7.2), 40),
    (False, "apts"): ((13.4, 3.4, 13.0), (1.0, 12.2, 6.8), 41),
    (False, "two-step"): ((13.7, 2.9, 11.9), (0.8, 12.2, 7.3), 40),
}


def predict_arrays(volume_shape, n_frames_local: int, probe_size: int, n_theta_local: int,
                   algorithm: str, dtype=np.complex64, truth: bool = False,
                   compiled: bool | None = None, subpixel: bool = False,
                   modes: int = 1, model: str = "linear", slabs: int = 1,
                   n_theta_group: int | None = None) -> dict:
    """Predicted peak bytes of the solver's arrays on one rank, by part (see module doc).

    ``compiled`` selects the coefficients of the compiled kernels (default: whether they
    are enabled in this process) or of the numpy fallback (also GPU arrays); ``subpixel``:
    the scan has sub-pixel positions (one shifted probe per frame); ``modes``: incoherent
    probe modes, each with its own far fields, multipliers and shifted probes; ``model``:
    the forward model, ``linear`` or ``exp`` (apt, apts and two-step);
    ``slabs``: z-slabs of the angle x slab layout (apt, apts, linear model), with
    ``n_theta_group`` the angles of the rank's angle group (part ``transposes``).
    """
    if compiled is None:
        from ptmpi.operators import kernels

        compiled = kernels.ENABLED
    itemsize = np.dtype(dtype).itemsize
    nz, ny, nx = (int(s) for s in volume_shape)
    if model == "exp":
        if algorithm not in ("apt", "apts", "two-step"):
            raise ValueError(f"unknown algorithm {algorithm!r} for the exp model")
        volume_phase, frame_phase, per_nnz = _EXP_COEFFICIENTS[bool(compiled), algorithm]
        # With K probe modes every frame-sized array of the solver is counted K times
        # (conservative: the counts and the mask are not per mode).
        units = np.array([nz * ny * nx, n_frames_local * probe_size * probe_size * modes,
                          n_theta_local * nz * nx], dtype=float) * itemsize
        frames = units[1]
        solver = max(float(np.dot(volume_phase, units)), float(np.dot(frame_phase, units))) + (
            frames if subpixel else 0)
        parts = {
            "solver": solver,
            "projector": per_nnz * NNZ_PER_VOXEL_ANGLE * n_theta_local * ny * nx,
            "input": n_frames_local * probe_size * probe_size * 4 + (units[0] if truth else 0),
        }
        parts["total"] = sum(parts.values())
        return {k: int(v) for k, v in parts.items()}
    if model != "linear":
        raise ValueError(f"unknown model {model!r}")
    if algorithm == "ptycho2d":
        if slabs > 1:
            raise ValueError(f"--slabs > 1 is for apt and apts, not {algorithm}")
        frames = n_frames_local * probe_size * probe_size * itemsize
        a, b, c, d = _PTYCHO2D
        parts = {
            "solver": (a + (b + (c if subpixel else 0.0)) * modes) * frames
            # the images: (N_THETA, nz, n), or one (H, W) image for 2-D data, passed as
            # volume_shape (1, H, W) (conservative for a one-slice volume)
            + d * n_theta_local * (ny if nz == 1 else nz) * nx * itemsize,
            "projector": 0,
            "input": n_frames_local * probe_size * probe_size * 4
            + (nz * ny * nx * itemsize if truth else 0),
        }
        parts["total"] = sum(parts.values())
        return {k: int(v) for k, v in parts.items()}
    if algorithm == "two-step":
        volume_phase, frame_phase, per_nnz = _TWO_STEP
    elif algorithm in ("apt", "apts"):
        volume_phase, frame_phase, per_nnz = _COEFFICIENTS[bool(compiled), algorithm]
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}")
    nz_full = nz
    if slabs > 1:
        if algorithm not in ("apt", "apts"):
            raise ValueError(f"--slabs > 1 is for apt and apts, not {algorithm}")
        nz = -(-nz // slabs)
    vol = nz * ny * nx * itemsize
    frames = n_frames_local * probe_size * probe_size * itemsize
    frames_all = frames * modes
    solver = max(volume_phase[0] * vol + volume_phase[1] * frames_all,
                 frame_phase[0] * vol + frame_phase[1] * frames_all) + (
                     frames_all if subpixel else 0)
    n_theta_proj = n_theta_local if slabs == 1 else (n_theta_group or n_theta_local * slabs)
    nnz = 0.0 if algorithm == "ptycho2d" and nz == 1 else (
        NNZ_PER_VOXEL_ANGLE * n_theta_proj * ny * nx)
    parts = {
        "solver": solver,
        "projector": per_nnz * nnz,
        "input": n_frames_local * probe_size * probe_size * 4 + (vol if truth else 0),
    }
    if slabs > 1:
        parts["transposes"] = (2.5 * n_theta_proj * nz * nx
                               + 2 * n_theta_local * nz_full * nx) * itemsize
    parts["total"] = sum(parts.values())
    return {k: int(v) for k, v in parts.items()}


def resident_bytes() -> int:
    """Current resident set size of this process (bytes; 0 where unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_resident_bytes() -> int:
    """Peak resident set size of this process so far (bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if os.uname().sysname == "Darwin" else 1024)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_headroom() -> int | None:
    """Bytes left under this process's cgroup memory limit (SLURM's ``--mem``), if any."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit = _read_int(limit_file)
        if limit is not None and limit < 2**60:
            return max(0, limit - (_read_int(usage_file) or 0))
    return None


def available_bytes() -> int:
    """Memory available for new work: ``MemAvailable`` of the node, or less where a cgroup
    limit (e.g. a SLURM job's ``--mem``) leaves less; 0 where unknown."""
    node = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    node = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    headroom = _cgroup_headroom()
    if headroom is not None:
        node = min(node, headroom) if node else headroom
    return node


def format_bytes(n: float) -> str:
    """``1.23 GiB`` style."""
    if n <= 0 or not math.isfinite(n):
        return "0 B"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    k = min(len(units) - 1, int(math.log(n, 1024)))
    return f"{n / 1024**k:.3g} {units[k]}"
