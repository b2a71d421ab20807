"""Memory a rank needs for a reconstruction: predicted before the run, measured during it.

The prediction counts the arrays alive at the solver's peak in units of one complex volume
``V = nz n^2`` and of one stack of the rank's far-field frames ``Fb = N_FRAMES_LOCAL M^2``
(both in the complex dtype's bytes), plus the projector's sparse matrices:

============  ==========================================================================
APT           ``16.5 V``: u, the previous u, the CG vectors (x, r, s, d, A d, b), p and
              lam1 (3 V each), the complex128 sums of the normal operator
APTs          ``4 V``: no p, lam1 or TV step
two-step,     ``max(16 Fb + 2 V, 16 V + 4 Fb)``: the ptychography phase holds the frames'
ptycho2d      split variables and temporaries; the tomography phase the CG volumes
all           ``+ 8.8 Fb`` (APT/APTs: counts, their square roots, z, lam2, D u, z + lam2
              and the prox temporaries), ``+ 40 B`` per projector non-zero (the float32
              matrix and its transpose, and the float64 pair of the wide sums; about
              ``2.2 n^2`` non-zeros per local angle), the input block as read and, with
              ground truth, one volume
============  ==========================================================================

The coefficients were read off ``tracemalloc`` peaks of short runs at 48^3-96^3 (with the
compiled kernels; the numpy fallback holds a few more temporaries) and are checked by
``ptmpi bench``, which prints the prediction beside the measured peak.
To the arrays add the process baseline (interpreter, numpy, scipy, MPI), measured at run
time as the resident size before the data are read.
"""

from __future__ import annotations

import math
import os
import resource

import numpy as np

NNZ_PER_VOXEL_ANGLE = 2.2
BYTES_PER_NNZ = 40


def predict_arrays(volume_shape, n_frames_local: int, probe_size: int, n_theta_local: int,
                   algorithm: str, dtype=np.complex64, truth: bool = False) -> dict:
    """Predicted peak bytes of the solver's arrays on one rank, by part (see module doc)."""
    itemsize = np.dtype(dtype).itemsize
    nz, ny, nx = (int(s) for s in volume_shape)
    vol = nz * ny * nx * itemsize
    frames = n_frames_local * probe_size * probe_size * itemsize
    if algorithm == "apt":
        solver = 16.5 * vol + 8.8 * frames
    elif algorithm == "apts":
        solver = 4.0 * vol + 8.8 * frames
    elif algorithm in ("two-step", "ptycho2d"):
        solver = max(16 * frames + 2 * vol, 16 * vol + 4 * frames)
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}")
    nnz = 0.0 if algorithm == "ptycho2d" and nz == 1 else (
        NNZ_PER_VOXEL_ANGLE * n_theta_local * ny * nx)
    parts = {
        "solver": solver,
        "projector": BYTES_PER_NNZ * nnz,
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
