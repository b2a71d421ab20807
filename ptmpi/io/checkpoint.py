"""Checkpoints of APT / APTs: the full solver state, written by all ranks, atomically.

Layout (one HDF5 file; frames in the input file's global, angle-major order)::

    /                  @ptmpi_checkpoint   int, layout version (1)
                       @iteration          int, iterations completed
                       @input_checksum     "sha256:<hex>" of the input file
                       @settings           JSON of SolverSettings.to_dict()
                       @dtype              "complex64" or "complex128"
                       @params             JSON of the penalties in use: tv_weight, r1, r2,
                                           norm_DhD (L = ||D^H D||), noise_amplitude
                       @n_ranks            ranks of the run that wrote it (information only)
                       @program, @version, @date
    u                  (nz, n, n) dtype          volume
    omega              (M, M) dtype              probe
    p, lam1            (3, nz, n, n) dtype       gradient split variable, multiplier (APT only)
    step               (nz, n, n) dtype          last step u_k - u_{k-1} (period-2 detection)
    z, lam2            (N_FRAMES, M, M) dtype    far-field split variable, multiplier
                                                 (K probe modes: omega (K, M, M), z and
                                                 lam2 (K, N_FRAMES, M, M))
    psi, mu            (N_ANGLES, nz, n) dtype   exp model only: transmission split
                                                 variable and its multiplier, per angle
    shifts             (N_ANGLES, 2) float64     --align only: per-angle shifts (row, col)
    metrics/<column>   (iteration,) history so far: iteration int64, others float64

Writing (:func:`write_checkpoint`, collective): rank 0 creates ``.<name>.tmp`` in the
checkpoint's folder with every dataset, writes the replicated arrays, the metrics and its
own frames, and closes it; then ranks 1, 2, ... in turn open it and write their own
hyperslab of ``z`` and ``lam2``. A token passed by one broadcast per rank orders them and
carries any error, so no rank ever holds the frames of another. Rank 0 then flushes the
file to disk and renames it over ``<name>`` (``os.replace``, atomic on POSIX): a kill at
any instant leaves either the previous checkpoint or the new one, both complete. A stale
``.<name>.tmp`` of a killed run is overwritten by the next checkpoint.

With the angle x slab grid (``--slabs S > 1``) the volume arrays ``u``, ``step``, ``p``
and ``lam1`` are split in z-slabs: rank 0 creates them at full size and the ranks of the
first angle group write their slab's hyperslab in their turn, so the file is the same
whatever the grid.

Reading: :func:`read_checkpoint_header` (metadata only, for the checks of a resume) and
:func:`read_checkpoint` (the replicated arrays, or one slab of them, and one rank's frames
``[f0, f1)``), so a run may resume with another rank count and another slab grid.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from pathlib import Path

import h5py
import numpy as np

from ptmpi import __version__
from ptmpi.backend import to_device, to_host
from ptmpi.solvers.admm import ADMMState

LAYOUT_VERSION = 1

#: Settings a resumed run may change: they decide when to stop, not what is computed, or
#: only how a run from iteration 0 starts (a resume starts from the checkpoint; its
#: penalties, ``r2`` included, come from the checkpoint's parameters).
RESUMABLE_CHANGES = ("iterations", "tol", "start", "start_iterations", "start_levels",
                     "r2_factor", "r2_default_max", "r2_ray_factor", "tv_continuation",
                     "tv_continuation_start", "tv_continuation_rate",
                     "tv_continuation_floor", "tv_continuation_voxel")

#: Settings added after checkpoints were first written, with the value that a checkpoint
#: without them ran with (so that those checkpoints still resume).
ADDED_SETTINGS = {"align": False, "align_every": 3, "align_start": 2, "align_max": None,
                  "align_gauge": "volume",
                  # the exp model's u-step: exactly cg_iterations CG steps before cg_tol
                  "cg_tol": 0.0, "cg_max_iterations": 64,
                  # the exp model's field-of-view support: none before it existed
                  "support": "none",
                  # --align's leave-one-out re-fit (linear model): a resumed run of an
                  # earlier release checks for outlying angles as a new one does
                  "align_outlier_factor": 2.0, "align_outlier_after": 100,
                  "align_leave_out_iterations": 100,
                  # (and its re-fit, which restarted whatever the shifts did, confirms
                  # the shifts as a new run's does)
                  "align_confirm_px": 0.1}


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; raised on every rank with the same message."""


@dataclasses.dataclass
class CheckpointHeader:
    """What a checkpoint says about itself (no large arrays).

    Attributes
    ----------
    path : str
    iteration : int
        Iterations completed.
    input_checksum : str
    settings : dict
        ``SolverSettings.to_dict()`` of the run that wrote it.
    dtype : str
        Complex dtype of the iterates.
    params : dict
        Penalties in use (see :func:`ptmpi.solvers.admm.resolve`).
    n_ranks : int
    volume_shape : tuple (nz, n, n)
    probe_shape : tuple (M, M)
    n_frames : int
    """

    path: str
    iteration: int
    input_checksum: str
    settings: dict
    dtype: str
    params: dict
    n_ranks: int
    volume_shape: tuple
    probe_shape: tuple
    n_frames: int


def default_checkpoint_path(output_path: str | os.PathLike) -> Path:
    """``<output stem>-checkpoint.h5`` beside the output (``rec.h5`` -> ``rec-checkpoint.h5``)."""
    output_path = Path(output_path)
    return output_path.with_name(f"{output_path.with_suffix('').name}-checkpoint.h5")


def temporary_path(path: str | os.PathLike) -> Path:
    """The name a checkpoint is written under before it is renamed to ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def write_checkpoint(path, state: ADMMState, comm, *, settings: dict, dtype,
                     input_checksum: str, frame_start: int, n_frames: int,
                     angle_start: int = 0, n_angles: int = 0, slab=None) -> None:
    """Write ``state`` to ``path`` (collective: every rank calls it; see the module notes).

    Parameters
    ----------
    path : str or PathLike
        Checkpoint file; replaced atomically.
    state : ADMMState
        ``u``, ``p``, ``lam1``, ``omega`` replicated; ``z_local`` and ``lam2_local``
        ``(N_FRAMES_LOCAL, M, M)`` this rank's frames; numpy or CuPy arrays.
    comm : communicator
    settings : dict
        ``SolverSettings.to_dict()``.
    dtype : complex dtype of the iterates.
    input_checksum : str
        Checksum of the input file (only rank 0's value is used).
    frame_start : int
        Global index of this rank's first frame (``frame_offset[angle_start]``).
    n_frames : int
        Frames in the whole input file.
    angle_start, n_angles : int
        Exp model (a state with ``psi_local``): this rank's first angle and the angles of
        the whole input file.
    slab : (z0, z1, writes, nz), optional
        The volume arrays of ``state`` are the slices ``[z0, z1)`` of a volume of ``nz``
        slices; this rank writes them when ``writes`` (one rank per slab). None: replicated.

    Raises
    ------
    CheckpointWriteError
        On every rank, with the same message, when any rank failed; the previous
        checkpoint is then left as it was.
    """
    path = Path(path)
    tmp = temporary_path(path)
    dtype = np.dtype(dtype)
    error = None
    for writer in range(comm.size):
        if comm.rank == writer and error is None:
            try:
                if writer == 0:
                    _create(tmp, state, comm.size, settings, dtype, input_checksum, n_frames,
                            n_angles, slab)
                _write_frames(tmp, state, frame_start, angle_start)
                if slab is not None and slab[2]:
                    _write_slab(tmp, state, slab[0], slab[1], dtype)
            except Exception as exc:  # noqa: BLE001 - reported on every rank below
                error = f"{type(exc).__name__}: {exc}"
        error = comm.bcast(error, root=writer)
    if error is None and comm.is_root:
        try:
            _fsync(tmp)
            os.replace(tmp, path)
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
    error = comm.bcast(error)
    if error is not None:
        if comm.is_root:
            tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"{path}: cannot write the checkpoint ({error})")


VOLUME_ARRAYS = ("u", "p", "lam1", "step")
"""The state's volume-space arrays (split in z-slabs on the slab grid)."""


def _create(tmp: Path, state: ADMMState, n_ranks: int, settings: dict, dtype, checksum: str,
            n_frames: int, n_angles: int = 0, slab=None) -> None:
    """Rank 0: the file with every dataset, the replicated arrays and the metrics (the
    volume arrays empty when they are split in slabs)."""
    m = state.omega.shape[-1]
    with h5py.File(tmp, "w") as f:
        f.attrs["ptmpi_checkpoint"] = np.int64(LAYOUT_VERSION)
        f.attrs["iteration"] = np.int64(state.iteration)
        f.attrs["input_checksum"] = checksum
        f.attrs["settings"] = json.dumps(settings, sort_keys=True)
        f.attrs["dtype"] = dtype.name
        f.attrs["params"] = json.dumps(state.params, sort_keys=True)
        f.attrs["n_ranks"] = np.int64(n_ranks)
        f.attrs["program"] = "ptmpi"
        f.attrs["version"] = __version__
        f.attrs["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
        for name in ("u", "omega", "p", "lam1", "step"):
            value = getattr(state, name)
            if value is None:
                continue
            if slab is not None and name in VOLUME_ARRAYS:
                shape = (*value.shape[:-3], slab[3], *value.shape[-2:])
                f.create_dataset(name, shape=shape, dtype=dtype)
            else:
                f.create_dataset(name, data=to_host(value).astype(dtype, copy=False))
        modes = state.omega.shape[:-2]  # () or (K,): incoherent probe modes
        for name in ("z", "lam2"):
            f.create_dataset(name, shape=(*modes, n_frames, m, m), dtype=dtype)
        if getattr(state, "shifts_local", None) is not None:
            f.create_dataset("shifts", shape=(n_angles, 2), dtype=np.float64)
        if getattr(state, "psi_local", None) is not None:
            nz, _, n = state.u.shape
            for name in ("psi", "mu"):
                f.create_dataset(name, shape=(n_angles, nz, n), dtype=dtype)
        metrics = f.create_group("metrics")
        for key, values in state.history.items():
            metrics.create_dataset(key, data=np.asarray(
                values, dtype=np.int64 if key == "iteration" else np.float64))


def _write_slab(tmp: Path, state: ADMMState, z0: int, z1: int, dtype) -> None:
    """This rank's z-slab of the volume arrays."""
    with h5py.File(tmp, "r+") as f:
        for name in VOLUME_ARRAYS:
            value = getattr(state, name)
            if value is not None:
                f[name][..., z0:z1, :, :] = to_host(value).astype(dtype, copy=False)


def _write_frames(tmp: Path, state: ADMMState, frame_start: int, angle_start: int = 0) -> None:
    """This rank's hyperslab of ``z`` and ``lam2`` (and of ``psi``, ``mu``: exp model)."""
    n_local = state.z_local.shape[-3]
    psi = getattr(state, "psi_local", None)
    n_angles_local = 0 if psi is None else psi.shape[0]
    shifts = getattr(state, "shifts_local", None)
    if shifts is not None and len(shifts):
        with h5py.File(tmp, "r+") as f:
            f["shifts"][angle_start:angle_start + len(shifts)] = np.asarray(shifts, np.float64)
    if n_local == 0 and n_angles_local == 0:
        return
    with h5py.File(tmp, "r+") as f:
        frames = (Ellipsis, slice(frame_start, frame_start + n_local), slice(None), slice(None))
        f["z"][frames] = to_host(state.z_local)
        f["lam2"][frames] = to_host(state.lam2_local)
        if n_angles_local:
            f["psi"][angle_start:angle_start + n_angles_local] = to_host(psi)
            f["mu"][angle_start:angle_start + n_angles_local] = to_host(state.mu_local)


def _fsync(path: Path) -> None:
    """Flush ``path`` to disk, so a node crash after the rename cannot leave it empty."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint_header(path: str | os.PathLike) -> CheckpointHeader:
    """Metadata of a checkpoint; raises ValueError (one sentence) when it is not one."""
    path = str(path)
    try:
        with h5py.File(path, "r") as f:
            if "ptmpi_checkpoint" not in f.attrs:
                raise ValueError(f"{path}: not a ptmpi checkpoint (no @ptmpi_checkpoint)")
            version = int(f.attrs["ptmpi_checkpoint"])
            if version != LAYOUT_VERSION:
                raise ValueError(f"{path}: checkpoint layout {version}, this ptmpi reads "
                                 f"layout {LAYOUT_VERSION}")
            missing = [name for name in ("u", "omega", "z", "lam2") if name not in f]
            if missing:
                raise ValueError(f"{path}: checkpoint without {', '.join(missing)}")
            return CheckpointHeader(
                path=path,
                iteration=int(f.attrs["iteration"]),
                input_checksum=str(f.attrs["input_checksum"]),
                settings=json.loads(f.attrs["settings"]),
                dtype=str(f.attrs["dtype"]),
                params=json.loads(f.attrs["params"]),
                n_ranks=int(f.attrs["n_ranks"]),
                volume_shape=tuple(f["u"].shape),
                probe_shape=tuple(f["omega"].shape),
                n_frames=int(f["z"].shape[-3]),
            )
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable ptmpi checkpoint ({exc})") from exc


def config_differences(header: CheckpointHeader, settings: dict, dtype) -> list[str]:
    """``"name: A there, B now"`` for each setting that a resume may not change.

    Everything in ``SolverSettings`` counts except :data:`RESUMABLE_CHANGES`, and the dtype.
    """
    keys = sorted((set(header.settings) | set(settings)) - set(RESUMABLE_CHANGES))
    missing = "(not set)"
    there = {**ADDED_SETTINGS, **header.settings}
    diffs = [f"{key}: {there.get(key, missing)} there, {settings.get(key, missing)} now"
             for key in keys if there.get(key, missing) != settings.get(key, missing)]
    if np.dtype(header.dtype) != np.dtype(dtype):
        diffs.append(f"dtype: {header.dtype} there, {np.dtype(dtype).name} now (--double)")
    return diffs


def read_checkpoint(path: str | os.PathLike, frame_start: int, frame_stop: int,
                    xp=np, angle_start: int = 0, angle_stop: int = 0,
                    z_range=None) -> ADMMState:
    """The state of a checkpoint with the frames ``[frame_start, frame_stop)`` of ``z``, ``lam2``.

    Parameters
    ----------
    path : str or PathLike
    frame_start, frame_stop : int
        This rank's frames (``frame_offset[angle_start]``, ``frame_offset[angle_stop]``).
    xp : array module of the returned arrays (numpy or cupy).
    angle_start, angle_stop : int
        This rank's angles, for the ``psi`` and ``mu`` of an exp-model checkpoint.
    z_range : (z0, z1), optional
        Read only these slices of the volume arrays (this rank's z-slab).

    Returns
    -------
    ADMMState
        Arrays in the checkpoint's dtype, ``history`` as lists, ``params`` set; an
        :class:`~ptmpi.solvers.admm_exp.ExpADMMState` for an exp-model checkpoint.
    """
    with h5py.File(path, "r") as f:
        def get(name, sel=()):
            return to_device(f[name][sel], xp) if name in f else None

        frames = (Ellipsis, slice(frame_start, frame_stop), slice(None), slice(None))
        slices = () if z_range is None else (Ellipsis, slice(*z_range), slice(None),
                                             slice(None))
        history = {key: f["metrics"][key][...].tolist() for key in f["metrics"]}
        fields = dict(
            u=get("u", slices), z_local=get("z", frames), lam2_local=get("lam2", frames),
            p=get("p", slices), lam1=get("lam1", slices), omega=get("omega"),
            step=get("step", slices),
            iteration=int(f.attrs["iteration"]), history=history,
            params=json.loads(f.attrs["params"]),
            shifts_local=f["shifts"][angle_start:angle_stop] if "shifts" in f else None,
        )
        if "psi" in f:
            from ptmpi.solvers.admm_exp import ExpADMMState

            angles = slice(angle_start, angle_stop)
            return ExpADMMState(**fields, psi_local=get("psi", angles),
                                mu_local=get("mu", angles))
        return ADMMState(**fields)
