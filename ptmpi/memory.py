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
APT           ``17.7 V + 4.9 Fb``         ``9.3 V + 7.0 Fb``          ``68 B``
APTs          ``8.9 V + 4.9 Fb``          ``2.7 V + 7.0 Fb``          ``45 B``
two-step,     ``16 V + 4 Fb``             ``2 V + 16 Fb``             ``40 B``
ptycho2d
============  ==========================  ==========================  =====================

APT's volumes are u, the previous u, the CG vectors (x, r, s, d, A d, b), p and lam1 (3 V
each) and the complex128 sums of the normal operator; APTs has no p, lam1 or TV step. The
frames are the counts, their square roots, z, lam2, D u, z + lam2 and the prox temporaries.
The projector holds the float32 matrix and its transpose in CSR and the wider copies the
normal operator sums with; it has about ``2.2 n^2`` non-zeros per local angle.
With the numpy fallback (no Numba, ``PTMPI_NUMBA=0``, or GPU arrays) a few more
temporaries are alive: APT ``19.4 V + 6.0 Fb`` / ``9.3 V + 9.1 Fb`` / ``69 B``, APTs
``7.9 V + 7.6 Fb`` / ``2.9 V + 9.1 Fb`` / ``42 B``. Add the input block as read and, with
ground truth, one volume. Sub-pixel scan positions add ``1 Fb`` to both phases: the cached
probe of every frame (measured +0.84 to +1.00 Fb for APT and APTs, kernels and numpy).

The APT and APTs coefficients are least-squares fits to ``tracemalloc`` peaks of two-iteration
runs at 32^3-96^3 with 4-48 angles and far-field stacks from 0.1 to 14 volumes (largest
misfit 3.5%); a test checks them on a geometry outside the fit, and ``ptmpi bench`` prints
the prediction beside the measured peak.
To the arrays add the process baseline (interpreter, numpy, scipy, MPI), measured at run
time as the resident size before the data are read.
"""

from __future__ import annotations

import math
import os
import resource

import numpy as np

NNZ_PER_VOXEL_ANGLE = 2.2

# (volume phase: V, Fb), (frame phase: V, Fb), bytes per projector non-zero
_COEFFICIENTS = {
    (True, "apt"): ((17.7, 4.9), (9.3, 7.0), 68),
    (True, "apts"): ((8.9, 4.9), (2.7, 7.0), 45),
    (False, "apt"): ((19.4, 6.0), (9.3, 9.1), 69),
    (False, "apts"): ((7.9, 7.6), (2.9, 9.1), 42),
}
_TWO_STEP = ((16.0, 4.0), (2.0, 16.0), 40)


def predict_arrays(volume_shape, n_frames_local: int, probe_size: int, n_theta_local: int,
                   algorithm: str, dtype=np.complex64, truth: bool = False,
                   compiled: bool | None = None, subpixel: bool = False,
                   modes: int = 1) -> dict:
    """Predicted peak bytes of the solver's arrays on one rank, by part (see module doc).

    ``compiled`` selects the coefficients of the compiled kernels (default: whether they
    are enabled in this process) or of the numpy fallback; ``subpixel``: the scan has
    sub-pixel positions (one shifted probe per frame); ``modes``: incoherent probe modes
    (ptycho2d), each with its own far fields, multipliers and shifted probes.
    """
    if compiled is None:
        from ptmpi.operators import kernels

        compiled = kernels.ENABLED
    if algorithm in ("two-step", "ptycho2d"):
        volume_phase, frame_phase, per_nnz = _TWO_STEP
    elif algorithm in ("apt", "apts"):
        volume_phase, frame_phase, per_nnz = _COEFFICIENTS[bool(compiled), algorithm]
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}")
    itemsize = np.dtype(dtype).itemsize
    nz, ny, nx = (int(s) for s in volume_shape)
    vol = nz * ny * nx * itemsize
    frames = n_frames_local * probe_size * probe_size * itemsize
    frames_all = frames * modes
    solver = max(volume_phase[0] * vol + volume_phase[1] * frames_all,
                 frame_phase[0] * vol + frame_phase[1] * frames_all) + (
                     frames_all if subpixel else 0)
    nnz = 0.0 if algorithm == "ptycho2d" and nz == 1 else (
        NNZ_PER_VOXEL_ANGLE * n_theta_local * ny * nx)
    parts = {
        "solver": solver,
        "projector": per_nnz * nnz,
        "input": n_frames_local * probe_size * probe_size * 4 + (vol if truth else 0),
    }
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
