"""Driver of ``ptmpi reconstruct``: validate, partition, read by rank, solve, write.

Order of work, chosen so that a bad run fails before any iteration and on every rank
with the same message: (0) apt/apts: rank 0 checks the checkpoint path and, for a resume,
that the checkpoint fits the input and settings (:mod:`ptmpi.restart`); (1) rank 0
validates the file's structure and the output path and broadcasts the verdict; (2) angles
are block-partitioned and each rank validates and reads only its own frames (and of a
checkpoint); (3) the solver runs, checkpointing as asked; (4) rank 0 writes the output and
its figures.

Algorithms: ``apt`` / ``apts`` (joint, :mod:`ptmpi.solvers.admm`), ``ptycho2d`` (per-angle
2-D ptychography, also for single-angle 2-D datasets) and ``two-step`` (ptycho2d, then
CG tomography), both from :mod:`ptmpi.solvers.ptycho2d`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from ptmpi.backend import DEFAULT_COMPLEX, get_array_module, select_device, to_device, to_host
from ptmpi.parallel import Comm, block_partition
from ptmpi.progress import Progress
from ptmpi.solvers.admm import LocalProblem, solve
from ptmpi.solvers.ptycho2d import (
    align_global_factor,
    normalise_pair,
    solve_ptycho2d,
    tomography_cg,
)

logger = logging.getLogger(__name__)

ALGORITHMS = ("apt", "apts", "two-step", "ptycho2d")
MODELS = ("linear", "exp")


class RunError(Exception):
    """A problem found collectively: every rank raises it with the same message."""


def _agree(comm: Comm, problems: list[str]) -> None:
    """Raise RunError on every rank if any rank found a problem (one collective)."""
    everyone = comm.allgather(problems)
    merged = list(dict.fromkeys(p for rank_problems in everyone for p in rank_problems))
    if merged:
        raise RunError("; ".join(merged) if len(merged) < 4 else
                       "\n  ".join(["input is not valid:"] + merged))


def _validate_and_read(input_path, output_path, algorithm, comm, force, dtype=DEFAULT_COMPLEX,
                       dry_run=False, figures=False, split_ok=False, modes=1, model="linear",
                       gpu=False, slabs=1, slab_refusal=None):
    """Steps (1) and (2): the collective checks, then this rank's block of the input.

    The memory check (:func:`_plan_memory`) runs before any frame is read; with
    ``dry_run`` the plan is returned instead of the data. ``slabs``: the number of z-slabs
    asked for (``"auto"``: chosen by :func:`_choose_slabs`); ``slab_refusal``: why this run
    cannot use more than one (None: it can). The slabs in use are ``data.slabs`` (and
    ``plan["slabs"]``).
    """
    from ptmpi.io.cxi import read_input
    from ptmpi.io.output import check_output_path
    from ptmpi.io.validate import validate_input
    from ptmpi.memory import format_bytes

    problems, n_angles, layout = [], 0, None
    if comm.is_root:
        problems = validate_input(input_path, 0, 0)
        if not problems:
            head = read_input(input_path, 0, 0)
            n_angles = head.n_angles
            layout = {"frame_offset": head.frame_offset, "m": int(head.probe.shape[-1]),
                      "shape": head.volume_shape or (1, *head.image_shape),
                      "truth": _has_truth(input_path), "subpixel": _has_subpixel(input_path)}
            if head.is_2d and algorithm != "ptycho2d":
                problems.append(f"{input_path}: a 2-D ptychography dataset (no volume_shape); "
                                f"{algorithm} needs a tomography series (use --algorithm "
                                "ptycho2d)")
        try:
            check_output_path(output_path, force, input_path,
                              figures=figure_paths(output_path, algorithm, modes)
                              if figures else ())
        except ValueError as exc:
            problems.append(str(exc))
    problems, n_angles, layout = comm.bcast((problems, n_angles, layout))
    _agree(comm, problems)
    split_frames = n_angles == 1 and comm.size > 1 and split_ok
    if split_frames and slabs not in (1, "auto"):
        raise RunError(f"--slabs {slabs}: {input_path} has one angle, whose frames are split "
                       "over the ranks; use --slabs 1")
    if split_frames:
        slabs = 1
        # One angle: its frames are split over the ranks, which share the image (ptycho2d)
        # or whose partial sums over frames DataTerm reduces (apt, apts).
        plan = _plan_memory(layout, algorithm, dtype, comm, modes, model, gpu)
        if dry_run:
            return plan
        _agree(comm, validate_input(input_path, 0, 1))
        data = read_input(input_path, 0, 1, read_truth=True)
        n_frames = int(data.frame_offset[-1])
        f0, f1 = block_partition(n_frames, comm.size, comm.rank)
        data.counts_local = data.counts_local[f0:f1]
        data.positions_local = data.positions_local[f0:f1]
        data.frame_offset_local = np.array([0, f1 - f0], dtype=np.int64)
        if data.valid_local is not None and data.valid_local.ndim == 3:
            data.valid_local = data.valid_local[f0:f1]
        data.shared_image = True
        data.frame_start = f0
        data.slabs = 1
        logger.info("%s: one angle, image %s, %d frames split over %d ranks (%d-%d per rank)",
                    input_path, tuple(data.image_shape), n_frames, comm.size,
                    n_frames // comm.size, -(-n_frames // comm.size))
        return data, 0, 1
    if comm.size > n_angles:
        angles = f"{n_angles} angle" + ("s" if n_angles != 1 else "")
        raise RunError(f"{comm.size} ranks but only {angles} in {input_path}: "
                       f"use at most {n_angles} rank" + ("s" if n_angles != 1 else ""))
    start, stop = block_partition(n_angles, comm.size, comm.rank)
    slabs_asked = slabs
    slabs = _choose_slabs(slabs, slab_refusal, layout, algorithm, dtype, comm, modes, model,
                          gpu)
    plan = _plan_memory(layout, algorithm, dtype, comm, modes, model, gpu, slabs)
    plan["layout"] = _describe_layout(comm.size, slabs, int(layout["shape"][0]),
                                      auto=slabs_asked == "auto")
    if dry_run:
        return plan
    _agree(comm, validate_input(input_path, start, stop))
    # with slabs, each rank reads its slab of the truth only (z-slab s = rank % slabs)
    truth_slices = (block_partition(int(layout["shape"][0]), slabs, comm.rank % slabs)
                    if slabs > 1 else None)
    data = read_input(input_path, start, stop, read_truth=True, truth_slices=truth_slices)
    data.slabs = slabs
    if comm.is_root:
        logger.info("%s", _describe_layout(comm.size, slabs, int(layout["shape"][0]),
                                           auto=slabs_asked == "auto"))
    frames = comm.allgather(int(data.counts_local.shape[0]))
    shape = data.volume_shape if data.volume_shape is not None else data.image_shape
    logger.info("%s: %s %s, %d angles, %d frames on %d rank(s) (frames per rank %d-%d, "
                "memory per rank up to %s)", input_path,
                "volume" if data.volume_shape is not None else "2-D image", tuple(shape),
                n_angles, sum(frames), comm.size, min(frames), max(frames),
                format_bytes(plan["bytes_per_rank_max"]))
    return data, start, stop


def _read_truth(path):
    """The ground-truth volume of a simulated input."""
    import h5py

    from ptmpi.io.cxi import TRUTH_VOLUME

    with h5py.File(path, "r") as f:
        return f[TRUTH_VOLUME][()]


def _has_truth(path) -> bool:
    import h5py

    from ptmpi.io.cxi import TRUTH_VOLUME

    with h5py.File(path, "r") as f:
        return TRUTH_VOLUME in f


def _truth_shifts(path):
    """``ptmpi/truth/shifts_px`` of a simulated input with drift, else None."""
    import h5py

    with h5py.File(path, "r") as f:
        name = "entry_1/ptmpi/truth/shifts_px"
        return f[name][()] if name in f else None


def _has_subpixel(path) -> bool:
    """True when some scan position is not a whole pixel (SPEC 8: a probe per frame)."""
    import h5py

    from ptmpi.io.cxi import POSITIONS
    from ptmpi.operators.ptycho import split_positions

    with h5py.File(path, "r") as f:
        return bool(np.any(split_positions(f[POSITIONS][()])[1] != 0))


def _slab_refusal(algorithm, settings, exp: bool, gpu: bool) -> str | None:
    """Why this run cannot use the angle x slab layout (None: it can)."""
    if algorithm not in ("apt", "apts"):
        return f"--algorithm {algorithm} (apt and apts only)"
    if exp:
        return "--model exp (the linear model only)"
    if getattr(settings, "align", False):
        return "--align"
    if getattr(settings, "probe_modes", 1) > 1:
        return "--probe-modes > 1"
    if getattr(settings, "start", "ones") == "coarse":
        return "--start coarse"
    return None  # --gpu: one GPU per rank, MPI buffers staged through host memory


def _check_slabs(slabs, comm: Comm, refusal: str | None) -> None:
    """Refuse ``--slabs S`` that does not fit the ranks or the run (every rank alike)."""
    if slabs == "auto" or slabs == 1:
        return
    if not isinstance(slabs, int) or slabs < 1:
        raise RunError(f"--slabs must be a positive integer or auto, got {slabs!r}")
    if comm.size % slabs:
        raise RunError(f"--slabs {slabs} must divide the rank count, {comm.size}")
    if refusal is not None:
        raise RunError(f"--slabs {slabs} is not supported with {refusal}: use --slabs 1")


MIN_SLAB_SLICES = 4
"""``--slabs auto`` keeps at least this many slices per slab (fewer only for memory)."""


def _node_slabs(comm: Comm, nz: int) -> int:
    """The slabs ``--slabs auto`` prefers on the CPU: one per rank of a node (angle groups
    = nodes), so that the ranks that share a node's memory bandwidth split the volume's
    work (CG vectors, TV) instead of each repeating it, and the projection transposes stay
    inside the node. The ranks per node must be alike (else their greatest common
    divisor), and the slabs at least :data:`MIN_SLAB_SLICES` thick."""
    per_node = 0
    for size in comm.allgather(int(comm.local_size)):
        per_node = math.gcd(per_node, size)
    return max([s for s in range(1, max(per_node, 1) + 1)
                if per_node % s == 0 and nz >= MIN_SLAB_SLICES * s] or [1])


def _choose_slabs(slabs, refusal, layout, algorithm, dtype, comm, modes, model, gpu) -> int:
    """The slabs of the run: ``slabs`` as asked (checked against the volume), or for
    ``auto`` on CPUs one slab per rank of a node (:func:`_node_slabs`; angle groups are
    nodes) and with ``--gpu`` 1 (replicated: each GPU has its own memory bandwidth; no
    halos, no transposes), when that plan fits the node's memory; else the next divisor of
    the rank count above it whose plan fits, then the ones below (the smallest plan when
    none does: the memory check then reports it)."""
    nz = int(layout["shape"][0])
    if slabs != "auto":
        if slabs > nz:
            raise RunError(f"--slabs {slabs}: the volume has only {nz} slices (z); use at "
                           f"most {nz} slabs")
        return slabs
    if refusal is not None:
        return 1
    preferred = 1 if gpu else _node_slabs(comm, nz)
    divisors = [s for s in range(1, comm.size + 1) if comm.size % s == 0 and s <= nz]
    order = ([preferred] + [s for s in divisors if s > preferred]
             + [s for s in reversed(divisors) if s < preferred])
    best = None
    for candidate in order:
        plan = _plan_memory(layout, algorithm, dtype, comm, modes, model, gpu, candidate,
                            check=False)
        if not plan["bytes_available"] or plan["bytes_node"] <= plan["bytes_available"]:
            return candidate
        if best is None or plan["bytes_per_rank_max"] < best[1]:
            best = (candidate, plan["bytes_per_rank_max"])
    return best[0] if best else 1


def _describe_layout(size: int, slabs: int, nz: int, auto: bool) -> str:
    """``layout: 2 angle group(s) x 2 z-slab(s) (...)`` for the log and the dry run."""
    return (f"layout: {size // slabs} angle group(s) x {slabs} z-slab(s) "
            + ("(replicated volume)" if slabs == 1 else
               f"({nz // slabs}-{-(-nz // slabs)} slices per slab)")
            + (", chosen by --slabs auto" if auto else ""))


def _plan_memory(layout, algorithm, dtype, comm, modes: int = 1, model="linear",
                 gpu=False, slabs: int = 1, check: bool = True) -> dict:
    """Predicted memory per rank (:mod:`ptmpi.memory`), checked against the node's.

    Every rank predicts its own need; the ranks on a node together must fit in what the
    node has available, or every rank raises the same :class:`RunError`. ``model``: the
    forward model (``linear`` or ``exp``), whose coefficients are used. With ``gpu`` the
    solver's arrays and the projector are on the rank's GPU (numpy-fallback coefficients,
    which CuPy arrays follow): the plan reports them as ``device_bytes_per_rank`` and the
    host need is the input block and the process only (device memory is not checked).
    The process counts its resident size now and what the first solve loads
    (``FIRST_SOLVE_BYTES``; for CuPy the numpy-fallback figure, not measured).
    """
    from ptmpi.memory import (
        FIRST_SOLVE_BYTES,
        available_bytes,
        format_bytes,
        predict_arrays,
        resident_bytes,
    )
    from ptmpi.operators import kernels

    n_angles = len(layout["frame_offset"]) - 1
    start, stop = block_partition(n_angles, comm.size, comm.rank)
    group = comm.rank - comm.rank % slabs  # first rank of this rank's angle group
    n_theta_group = (block_partition(n_angles, comm.size, group + slabs - 1)[1]
                     - block_partition(n_angles, comm.size, group)[0])
    offset = layout["frame_offset"]
    arrays = predict_arrays(layout["shape"], int(offset[stop] - offset[start]), layout["m"],
                            stop - start, algorithm, dtype, layout["truth"],
                            compiled=False if gpu else None,
                            subpixel=layout.get("subpixel", False), modes=modes, model=model,
                            slabs=slabs, n_theta_group=n_theta_group)
    device = arrays["solver"] + arrays["projector"] if gpu else 0
    runtime = FIRST_SOLVE_BYTES[bool(kernels.ENABLED and not gpu)]
    need = arrays["total"] - device + runtime + resident_bytes()
    needs = comm.allgather(need)
    node_need = sum(needs[comm.rank - comm.local_rank:][:comm.local_size])
    available = comm.allreduce_scalar(float(available_bytes()), "min")
    plan = {"bytes_per_rank_max": max(needs), "bytes_per_rank": needs,
            "bytes_node": node_need, "bytes_available": int(available), "arrays": arrays,
            "runtime": runtime, "model": model, "gpu": bool(gpu), "slabs": int(slabs),
            "layout": _describe_layout(comm.size, slabs, int(layout["shape"][0]), False)}
    if gpu:
        devices = comm.allgather(device)
        plan.update(device_bytes_per_rank=devices, device_bytes_per_rank_max=max(devices))
    logger.debug("memory: %s per rank (largest), %s on this node, %s available", format_bytes(
        max(needs)), format_bytes(node_need), format_bytes(available) if available else "?")
    too_big = comm.allreduce_scalar(float(available > 0 and node_need > available), "max")
    if too_big and check:
        raise RunError(f"not enough memory: the run needs about {format_bytes(max(needs))} "
                       f"per rank ({format_bytes(node_need)} for the ranks on one node) but "
                       f"only {format_bytes(available)} is available; use more nodes or "
                       "fewer ranks per node" + (" or drop --double" if np.dtype(dtype).itemsize
                                                 > 8 else ""))
    return plan


def _empty_sample_projections(data, start, stop, xp, dtype):
    """Projections ``P_t 1`` of the empty sample at the local angles (ones for 2-D data),
    and the local projector (None for 2-D data) for later use."""
    from ptmpi.operators.tomo import Projector

    if data.volume_shape is None:
        return xp.ones((stop - start, *data.image_shape), dtype=dtype), None
    projector = Projector(data.volume_shape, np.deg2rad(data.angles_deg[start:stop]), dtype)
    return projector.fwd(xp.ones(data.volume_shape, dtype=dtype)), projector


def reconstruct(input_path: str, output_path: str, settings, comm: Comm, *,
                algorithm: str | None = None, force: bool = False, gpu: bool = False,
                dtype=DEFAULT_COMPLEX, figures: bool = True, command: str | None = None,
                demo: bool = False, checkpoint: str | None = None, checkpoint_every: int = 0,
                resume: bool = False, stop_request=None, dry_run: bool = False,
                slabs: int | str = "auto") -> dict:
    """Reconstruct ``input_path`` into ``output_path`` (SPEC 4); returns a summary dict.

    ``settings`` is a :class:`SolverSettings` (apt/apts; ``algorithm`` taken from it) or a
    :class:`Ptycho2DSettings` (``algorithm`` must then be ``two-step`` or ``ptycho2d``).
    ``dry_run``: validate, predict the memory per rank and return that plan (no solve).

    Checkpoint and restart (apt/apts only; :mod:`ptmpi.restart`): ``checkpoint`` is the
    checkpoint file (default ``<output stem>-checkpoint.h5``), written every
    ``checkpoint_every`` iterations and after the last (0: only on a stop request);
    ``resume`` continues from it when it exists (from iteration 0 otherwise);
    ``stop_request`` (a :class:`ptmpi.restart.StopRequest`, set by signal handlers) makes
    every rank checkpoint and raise :class:`ptmpi.restart.Interrupted`. A checkpoint holds
    the whole volume, so it resumes on any rank count and any ``slabs``.

    ``slabs``: z-slabs of the angle x slab grid (:mod:`ptmpi.parallel.volume`; apt/apts with
    the linear model, one probe mode, no ``--align``, ``--start ones``; with ``gpu`` one
    GPU per rank, the MPI buffers of device arrays staged through host memory), a
    divisor of the rank count; 1 is the replicated volume; ``"auto"`` (the default, as
    for the command line, ``demo`` and ``paper``) chooses from the ranks per node and the
    memory plan (:func:`_choose_slabs`).
    """
    from ptmpi.io.cxi import input_checksum
    from ptmpi.io.output import write_output
    from ptmpi.solvers.admm_exp import ExpSolverSettings

    algorithm = algorithm or getattr(settings, "algorithm", None)
    if algorithm not in ALGORITHMS:
        raise RunError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    exp = isinstance(settings, ExpSolverSettings)
    joint = algorithm in ("apt", "apts")
    if not joint and (checkpoint is not None or checkpoint_every or resume):
        raise RunError(f"--checkpoint, --checkpoint-every and --resume are not supported with "
                       f"--algorithm {algorithm} (apt and apts only)")
    if checkpoint_every < 0:
        raise RunError(f"--checkpoint-every must be >= 0, got {checkpoint_every}")
    # one angle on several ranks: its frames are split (not for two-step, whose tomography
    # sums projections over ranks, nor for the exp model's per-angle transmissions)
    split_ok = not exp and algorithm in ("ptycho2d", "apt", "apts")
    refusal = _slab_refusal(algorithm, settings, exp, gpu)
    _check_slabs(slabs, comm, refusal)
    if dry_run:
        plan = _validate_and_read(input_path, output_path, algorithm, comm, force, dtype,
                                  dry_run=True, split_ok=split_ok,
                                  modes=getattr(settings, "probe_modes", 1),
                                  model="exp" if exp else "linear", gpu=gpu, slabs=slabs,
                                  slab_refusal=refusal)
        return {"dry_run": True, **plan}
    if joint:
        path, header, checksum = _check_restart(input_path, output_path, settings, dtype, comm,
                                                checkpoint, resume, force)
    modes = getattr(settings, "probe_modes", 1)
    if getattr(settings, "start", "ones") != "ones" and modes > 1:
        raise RunError(f"--start {settings.start} with --probe-modes > 1 is not supported "
                       "yet: use the default start")
    data, start, stop = _validate_and_read(input_path, output_path, algorithm, comm, force,
                                           dtype, figures=figures, split_ok=split_ok,
                                           modes=modes, model="exp" if exp else "linear",
                                           gpu=gpu, slabs=slabs, slab_refusal=refusal)
    grid = None
    if getattr(data, "slabs", 1) > 1:
        from ptmpi.parallel.slab_data_term import SlabGrid

        grid = SlabGrid(comm, data.slabs)  # data.truth_volume: this rank's slab
    if getattr(settings, "align", False) and data.n_angles < 2:
        raise RunError(f"--align: {input_path} has one angle; shifts of one angle are all "
                       "translations of the volume, which the data cannot see")
    if not joint:
        checksum = input_checksum(input_path) if comm.is_root else ""
    xp = get_array_module(gpu)
    if gpu:
        logger.info("rank %d uses GPU %d", comm.rank, select_device(comm.local_rank))

    n_iter = settings.iterations
    progress = Progress(n_iter, enabled=comm.is_root)
    try:
        if joint:
            restart = _open_restart(path, header, data, start, stop, settings, comm, xp, dtype,
                                    checksum, checkpoint_every, stop_request, grid)
            result = _run_joint(data, start, stop, settings, comm, xp, dtype, progress,
                                *restart, grid=grid)
        elif exp:  # two-step of the exp model
            result = _run_joint(data, start, stop, settings, comm, xp, dtype, progress)
        else:
            result = _run_ptycho(data, start, stop, algorithm, settings, comm, xp, dtype,
                                 progress)
    except FloatingPointError as exc:
        # Every rank detects a divergence of replicated quantities at the same iteration.
        raise RunError(f"{exc}; lower --r1/--tv-weight or raise --r2") from exc
    finally:
        progress.close()

    history, image, omega = result["history"], result["image"], result["omega"]
    params = result["params"]
    params["slabs"] = grid.n_slabs if grid is not None else 1  # the layout, for provenance
    summary = {k: (v[-1] if len(v) else math.nan) for k, v in history.items()}
    summary.update(result.get("final", {}))
    positions = comm.gather(np.asarray(result.get("positions_local", data.positions_local),
                                       dtype=np.float64))
    shifts = shift_std = None
    if "shifts_local" in result:
        shifts = comm.gather(result["shifts_local"])
        shifts = np.concatenate(shifts) if comm.is_root else None
    if "shift_std_local" in result:
        shift_std = comm.gather(result["shift_std_local"])
        shift_std = np.concatenate(shift_std) if comm.is_root else None
    if comm.is_root:
        write_output(
            output_path, volume=image, probe=to_host(omega), metrics=history,
            positions_px=np.concatenate(positions), frame_offset=data.frame_offset,
            parameters={"algorithm": algorithm, "model": "exp" if exp else "linear", **params},
            n_ranks=comm.size,
            input_file=str(input_path), input_checksum=checksum,
            command=command, overwrite=force, root_attrs={"ptmpi_demo": 1} if demo else None,
            image_axes="z:y:x" if algorithm != "ptycho2d" else "angle:y:x",
            shifts_px=shifts, angles_deg=data.angles_deg, shift_std_px=shift_std,
        )
        if figures:
            if grid is not None and data.truth_volume is not None:
                data.truth_volume = _read_truth(input_path)
            _figures(output_path, algorithm, image, to_host(omega), data, history,
                     len(history["iteration"]), exp=exp)
            if shifts is not None:
                from ptmpi.plots import save_shifts

                save_shifts(shifts_figure_path(output_path), data.angles_deg, shifts,
                            _truth_shifts(input_path), std=shift_std)
        snr = summary.get("snr_db", math.nan)
        extra = f", SNR {snr:.2f} dB" if math.isfinite(snr) else ""
        logger.info("wrote %s after %d iterations (%.1f s): R-factor %.4g%s", output_path,
                    len(history["iteration"]), summary["wall_s"], summary["r_factor"], extra)
    comm.barrier()
    return {"iterations": len(history["iteration"]), "parameters": params, **summary}


def align_passes(settings) -> int:
    """The most iterations a solve can run, in units of ``settings.iterations``: with
    ``--align`` the settled restart gets the whole budget again, and the exp model's final
    pass once more (:mod:`ptmpi.solvers.align`)."""
    from ptmpi.solvers.admm_exp import ExpSolverSettings

    if not getattr(settings, "align", False):
        return 1
    return 3 if isinstance(settings, ExpSolverSettings) else 2


def _check_restart(input_path, output_path, settings, dtype, comm, checkpoint, resume,
                   force):
    """Rank 0's checks of the checkpoint (:func:`ptmpi.restart.checkpoint_problems`), before
    any frame is read, agreed by every rank.

    Returns the checkpoint path, the header of the checkpoint to resume from (None: start
    from iteration 0) and the input's checksum (rank 0 only, "" elsewhere).
    """
    from ptmpi.io.checkpoint import default_checkpoint_path
    from ptmpi.io.cxi import input_checksum
    from ptmpi.io.output import check_output_path
    from ptmpi.restart import checkpoint_problems

    path = Path(checkpoint) if checkpoint else default_checkpoint_path(output_path)
    problems, header, checksum = [], None, ""
    if comm.is_root:
        try:
            checksum = input_checksum(input_path)
        except OSError:
            pass  # a missing or unreadable input is reported by the validation next
        # A problem with the output is reported first: it is the user's real mistake, and
        # its folder is also that of the default checkpoint.
        try:
            check_output_path(output_path, force, input_path)
        except ValueError as exc:
            problems = [str(exc)]
        else:
            problems, header = checkpoint_problems(
                path, input_path=input_path, output_path=output_path, resume=resume,
                force=force, settings=settings.to_dict(), dtype=dtype,
                # --align: a restart after the shifts settle extends the run by up to
                # its own iteration count (align.iteration_cap), the exp model's final
                # pass by as much again
                iterations=settings.iterations * align_passes(settings), checksum=checksum)
    problems, header = comm.bcast((problems, header))
    _agree(comm, problems)
    return path, header, checksum


def _open_restart(path, header, data, start, stop, settings, comm, xp, dtype, checksum, every,
                  stop_request, grid=None):
    """This rank's part of the checkpoint to resume from (``header``; None: none), and the
    :class:`ptmpi.restart.Checkpointer` of the run; returns ``(state, checkpointer)``.
    With the slab grid (``grid``) the volume arrays are read and written by slab."""
    from ptmpi.io.checkpoint import read_checkpoint, write_checkpoint
    from ptmpi.restart import Checkpointer

    f0, f1 = int(data.frame_offset[start]), int(data.frame_offset[stop])
    if data.frame_start is not None:  # the frames of one angle split over the ranks
        f0 = data.frame_start
        f1 = f0 + int(data.counts_local.shape[0])
    slab = None
    if grid is not None:
        volume = grid.volume(data.volume_shape)
        # every rank reads its slab; the first angle group's ranks write theirs
        slab = (volume.z0, volume.z1, grid.group_index == 0, volume.shape[0])
    state = None
    if header is not None:
        # The checksum matched, so this guards against a damaged checkpoint only.
        if (header.volume_shape != tuple(data.volume_shape) or header.n_frames != data.n_frames
                or header.probe_shape[-2:] != data.probe.shape):
            raise RunError(f"{path}: checkpoint shapes (volume {header.volume_shape}, probe "
                           f"{header.probe_shape}, {header.n_frames} frames) do not match "
                           f"{data.path}")
        problems = []
        try:
            state = read_checkpoint(path, f0, f1, xp, start, stop,
                                    z_range=None if slab is None else slab[:2])
        except (OSError, KeyError, ValueError) as exc:
            problems = [f"{path}: cannot read the checkpoint ({exc})"]
        _agree(comm, problems)
        logger.info("resuming from %s at iteration %d (written by %d rank(s))", path,
                    header.iteration, header.n_ranks)

    def write(state_now):
        write_checkpoint(path, state_now, comm, settings=settings.to_dict(), dtype=dtype,
                         input_checksum=checksum, frame_start=f0, n_frames=data.n_frames,
                         angle_start=start, n_angles=data.n_angles, slab=slab)

    last = header.iteration if header is not None else None
    return state, Checkpointer(path, every, comm, stop_request, write, last)


def _run_joint(data, start, stop, settings, comm, xp, dtype, progress, state=None,
               checkpointer=None, grid=None) -> dict:
    from ptmpi.io.checkpoint import CheckpointWriteError
    from ptmpi.solvers.align import iteration_cap

    problem = LocalProblem(
        volume_shape=tuple(data.volume_shape),
        theta_local=np.deg2rad(data.angles_deg[start:stop]),
        f_local=data.counts_local,
        positions_local=data.positions_local,
        frame_offset_local=data.frame_offset_local,
        probe=data.probe,
        truth_volume=data.truth_volume,
        valid_local=data.valid_local,
    )

    def callback(state_now, row):
        progress.total = max(progress.total, iteration_cap(settings.iterations,
                                                           state_now.params))
        progress(row)
        if checkpointer is not None:
            checkpointer(state_now, row)

    from ptmpi.solvers.admm_exp import ExpSolverSettings, solve_exp

    run = solve_exp if isinstance(settings, ExpSolverSettings) else solve
    start_info = {}
    if state is None and getattr(settings, "start", "ones") == "coarse":
        from ptmpi.solvers.start import coarse_start

        state, start_info = coarse_start(problem, settings, comm, xp=xp, dtype=dtype)
    elif state is None and getattr(settings, "start", "ones") == "two-step":
        from ptmpi.solvers.start import two_step_start

        state, start_info = two_step_start(problem, settings, comm, xp=xp, dtype=dtype,
                                           layout=grid)
    try:
        state, params = run(problem, settings, comm, xp=xp, dtype=dtype, state=state,
                            callback=callback, **({"layout": grid} if grid else {}))
        if checkpointer is not None:
            checkpointer.finish(state)
    except FloatingPointError as exc:
        # Every rank detects a divergence of replicated quantities at the same iteration.
        kept = "" if checkpointer is None else f"; {checkpointer.describe_last()}"
        raise RunError(f"{exc}; lower --r1/--tv-weight or raise --r2{kept}") from exc
    except CheckpointWriteError as exc:  # raised alike on every rank
        raise RunError(str(exc)) from exc
    if grid is None:
        image = to_host(state.u) if comm.is_root else None
    else:  # the first angle group gathers its slabs on rank 0 (the rest of the state
        # is dropped first: the root then holds the volume beside its slab only)
        state.p = state.lam1 = state.step = state.z_local = state.lam2_local = None
        image = (grid.volume(data.volume_shape).gather(state.u) if grid.group_index == 0
                 else None)
    result = {"history": state.history, "image": image, "omega": state.omega,
              "params": {**settings.to_dict(), **params, **start_info}}
    if getattr(state, "shifts_local", None) is not None:
        # --align: the shifts of this rank's angles and the positions the model used
        shifts = np.asarray(state.shifts_local, dtype=np.float64).reshape(-1, 2)
        angle = np.repeat(np.arange(shifts.shape[0]), np.diff(data.frame_offset_local))
        result["shifts_local"] = shifts
        if getattr(state, "shift_std_local", None) is not None:
            result["shift_std_local"] = np.asarray(state.shift_std_local, dtype=np.float64)
        result["positions_local"] = np.asarray(data.positions_local, np.float64) + shifts[angle]
    return result


def _run_ptycho(data, start, stop, algorithm, settings, comm, xp, dtype, progress) -> dict:
    from ptmpi.metrics import r_factor, snr_db
    from ptmpi.operators.model import JointModel

    empty, projector = _empty_sample_projections(data, start, stop, xp, dtype)
    logger.info("%s: per-angle ptychography, %d iterations, %s likelihood, damping %.3g%s",
                algorithm, settings.iterations, settings.likelihood.upper(), settings.damping,
                ", probe refined" if settings.refine_probe else "")
    shared = getattr(data, "shared_image", False)
    state = solve_ptycho2d(empty, data.counts_local, data.probe, data.positions_local,
                           data.frame_offset_local, settings, comm,
                           callback=lambda _state, row: progress(row),
                           valid_local=data.valid_local, shared_image=shared)
    history = state.history
    # The stored images and probe reproduce the model (and so the R-factor): the images'
    # common scale is taken out of the probe (normalise_pair).
    images_local, omega = normalise_pair(state.v_local, state.omega, empty, comm, shared)
    params = settings.to_dict()
    if algorithm == "ptycho2d":
        if shared:  # replicated: rank 0's copy
            image = to_host(images_local) if comm.is_root else None
        else:
            images = comm.gather(to_host(images_local))
            image = np.concatenate(images) if comm.is_root else None
        return {"history": history, "image": image, "omega": omega, "params": params}

    # two-step: tomography of the projections, each aligned to its empty-sample projection.
    aligned = align_global_factor(state.v_local, empty)
    theta_local = projector.theta
    u = tomography_cg(projector, aligned, comm, settings.tomo_iterations)
    model = JointModel(data.volume_shape, theta_local, to_device(omega, xp),
                       data.positions_local, data.frame_offset_local, dtype=dtype)
    f_local = to_device(data.counts_local, xp)
    valid = None if data.valid_local is None else to_device(data.valid_local, xp)
    d = model.fwd(u)
    if d.ndim == 4:  # probe modes: the model modulus sqrt(sum_k |d_k|^2)
        from ptmpi.operators.modes import modulus

        d = modulus(d)
    final = {"final_r_factor": r_factor(d, f_local, comm=comm, valid=valid)}
    if data.truth_volume is not None:
        final["final_snr_db"] = snr_db(u, to_device(data.truth_volume, xp))
    logger.info("two-step: tomography by %d CG iterations: R-factor %.4g%s",
                settings.tomo_iterations, final["final_r_factor"],
                f", SNR {final['final_snr_db']:.2f} dB" if "final_snr_db" in final else "")
    # The SPEC 4 metrics record the ptychography iterations and, as the last row, the
    # tomography result (iteration count + 1; relative change not defined: NaN).
    last = history["iteration"][-1] if history["iteration"] else 0
    history["iteration"].append(last + 1)
    history["r_factor"].append(final["final_r_factor"])
    history["rel_change"].append(math.nan)
    history["wall_s"].append(history["wall_s"][-1] if history["wall_s"] else 0.0)
    if "final_snr_db" in final:
        history["snr_db"] = [math.nan] * last + [final["final_snr_db"]]
    image = to_host(u) if comm.is_root else None
    return {"history": history, "image": image, "omega": omega, "params": params,
            "final": {"snr_db": final.get("final_snr_db", math.nan)}}


def figure_paths(output_path, algorithm: str, modes: int = 1) -> tuple[Path, ...]:
    """The PNG figures written beside ``output_path``: images or slices, convergence, and
    with ``modes > 1`` probe modes the modes' amplitudes (``<stem>-probe-modes.png``)."""
    stem = Path(output_path).with_suffix("")
    first = "images" if algorithm == "ptycho2d" else "slices"
    paths = (Path(f"{stem}-{first}.png"), Path(f"{stem}-convergence.png"))
    return paths + ((Path(f"{stem}-probe-modes.png"),) if modes > 1 else ())


def shifts_figure_path(output_path) -> Path:
    """The PNG of the shifts against the angle (``--align``) beside ``output_path``."""
    return Path(f"{Path(output_path).with_suffix('')}-shifts.png")


def _figures(output_path, algorithm, image, omega, data, history, n_iter,
             exp: bool = False) -> None:
    from ptmpi.plots import save_convergence, save_images, save_probe_modes, save_slices

    modes = omega.shape[0] if omega.ndim == 3 else 1
    first, convergence, *rest = figure_paths(output_path, algorithm, modes)
    label = f"{algorithm.upper()}, {n_iter} iterations"
    if rest:
        save_probe_modes(rest[0], omega, label)
    if algorithm == "ptycho2d":
        save_images(first, image, omega[0] if modes > 1 else omega, label)
    else:
        truth = None if data.truth_volume is None else to_host(data.truth_volume)
        save_slices(first, image, truth, label, exp=exp)
    save_convergence(convergence, history, label)


def input_model(path) -> str:
    """The forward model an input file records (``/entry_1/ptmpi@model``, written by
    ``ptmpi simulate``); ``linear`` when absent or unreadable (validation reports the
    latter)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            value = f["entry_1/ptmpi"].attrs.get("model", "linear")
    except (OSError, KeyError):
        return "linear"
    value = value.decode() if isinstance(value, bytes) else str(value)
    return value if value in MODELS else "linear"
