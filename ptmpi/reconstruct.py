"""Driver of ``ptmpi reconstruct``: validate, partition, read by rank, solve, write.

Order of work, chosen so that a bad run fails before any iteration and on every rank
with the same message: (1) rank 0 validates the file's structure and the output path and
broadcasts the verdict; (2) angles are block-partitioned and each rank validates and reads
only its own frames; (3) the solver runs; (4) rank 0 writes the output and its figures.

Algorithms: ``apt`` / ``apts`` (joint, :mod:`ptmpi.solvers.admm`), ``ptycho2d`` (per-angle
2-D ptychography, also for single-angle 2-D datasets) and ``two-step`` (ptycho2d, then
CG tomography), both from :mod:`ptmpi.solvers.ptycho2d`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np

from ptmpi.backend import DEFAULT_COMPLEX, get_array_module, select_device, to_device, to_host
from ptmpi.parallel import SerialComm, block_partition
from ptmpi.progress import Progress
from ptmpi.solvers.admm import LocalProblem, SolverSettings, solve
from ptmpi.solvers.ptycho2d import (
    Ptycho2DSettings,
    align_global_factor,
    solve_ptycho2d,
    tomography_cg,
)

logger = logging.getLogger(__name__)

ALGORITHMS = ("apt", "apts", "two-step", "ptycho2d")


class RunError(Exception):
    """A problem found collectively: every rank raises it with the same message."""


def _agree(comm: SerialComm, problems: list[str]) -> None:
    """Raise RunError on every rank if any rank found a problem (one collective)."""
    everyone = comm.allgather(problems)
    merged = list(dict.fromkeys(p for rank_problems in everyone for p in rank_problems))
    if merged:
        raise RunError("; ".join(merged) if len(merged) < 4 else
                       "\n  ".join(["input is not valid:"] + merged))


def _validate_and_read(input_path, output_path, algorithm, comm, force):
    """Steps (1) and (2): the collective checks, then this rank's block of the input."""
    from ptmpi.io.cxi import read_input
    from ptmpi.io.output import check_output_path
    from ptmpi.io.validate import validate_input

    problems, n_angles = [], 0
    if comm.is_root:
        problems = validate_input(input_path, 0, 0)
        if not problems:
            head = read_input(input_path, 0, 0)
            n_angles = head.n_angles
            if head.is_2d and algorithm != "ptycho2d":
                problems.append(f"{input_path}: a 2-D ptychography dataset (no volume_shape); "
                                f"{algorithm} needs a tomography series (use --algorithm "
                                "ptycho2d)")
        try:
            check_output_path(output_path, force)
        except ValueError as exc:
            problems.append(str(exc))
    problems, n_angles = comm.bcast((problems, n_angles))
    _agree(comm, problems)
    if comm.size > n_angles:
        raise RunError(f"{comm.size} ranks but only {n_angles} angles in {input_path}: "
                       f"use at most {n_angles} ranks")
    start, stop = block_partition(n_angles, comm.size, comm.rank)
    _agree(comm, validate_input(input_path, start, stop))
    data = read_input(input_path, start, stop, read_truth=True)
    frames = comm.allgather(int(data.counts_local.shape[0]))
    shape = data.volume_shape if data.volume_shape is not None else data.image_shape
    logger.info("%s: %s %s, %d angles, %d frames on %d rank(s) (frames per rank %d-%d)",
                input_path, "volume" if data.volume_shape is not None else "2-D image",
                tuple(shape), n_angles, sum(frames), comm.size, min(frames), max(frames))
    return data, start, stop


def _empty_sample_projections(data, start, stop, xp, dtype):
    """Projections ``P_t 1`` of the empty sample at the local angles (ones for 2-D data),
    and the local projector (None for 2-D data) for later use."""
    from ptmpi.operators.tomo import Projector

    if data.volume_shape is None:
        return xp.ones((stop - start, *data.image_shape), dtype=dtype), None
    projector = Projector(data.volume_shape, np.deg2rad(data.angles_deg[start:stop]), dtype)
    return projector.fwd(xp.ones(data.volume_shape, dtype=dtype)), projector


def reconstruct(input_path: str, output_path: str, settings, comm: SerialComm, *,
                algorithm: str | None = None, force: bool = False, gpu: bool = False,
                dtype=DEFAULT_COMPLEX, figures: bool = True, command: str | None = None,
                demo: bool = False) -> dict:
    """Reconstruct ``input_path`` into ``output_path`` (SPEC 4); returns a summary dict.

    ``settings`` is a :class:`SolverSettings` (apt/apts; ``algorithm`` taken from it) or a
    :class:`Ptycho2DSettings` (``algorithm`` must then be ``two-step`` or ``ptycho2d``).
    """
    from ptmpi.io.cxi import input_checksum
    from ptmpi.io.output import write_output

    algorithm = algorithm or getattr(settings, "algorithm", None)
    if algorithm not in ALGORITHMS:
        raise RunError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    data, start, stop = _validate_and_read(input_path, output_path, algorithm, comm, force)
    xp = get_array_module(gpu)
    if gpu:
        logger.info("rank %d uses GPU %d", comm.rank, select_device(comm.local_rank))

    n_iter = settings.iterations
    progress = Progress(n_iter, enabled=comm.is_root)
    try:
        if algorithm in ("apt", "apts"):
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
    summary = {k: (v[-1] if len(v) else math.nan) for k, v in history.items()}
    summary.update(result.get("final", {}))
    if comm.is_root:
        write_output(
            output_path, volume=image, probe=to_host(omega), metrics=history,
            parameters={"algorithm": algorithm, **params}, n_ranks=comm.size,
            input_file=str(input_path), input_checksum=input_checksum(input_path),
            command=command, overwrite=force, root_attrs={"ptmpi_demo": 1} if demo else None,
            image_axes="z:y:x" if algorithm != "ptycho2d" else "angle:y:x",
        )
        if figures:
            _figures(output_path, algorithm, image, to_host(omega), data, history,
                     len(history["iteration"]))
        snr = summary.get("snr_db", math.nan)
        extra = f", SNR {snr:.2f} dB" if math.isfinite(snr) else ""
        logger.info("wrote %s after %d iterations (%.1f s): R-factor %.4g%s", output_path,
                    len(history["iteration"]), summary["wall_s"], summary["r_factor"], extra)
    comm.barrier()
    return {"iterations": len(history["iteration"]), "parameters": params, **summary}


def _run_joint(data, start, stop, settings, comm, xp, dtype, progress) -> dict:
    problem = LocalProblem(
        volume_shape=tuple(data.volume_shape),
        theta_local=np.deg2rad(data.angles_deg[start:stop]),
        f_local=data.counts_local,
        positions_local=data.positions_local,
        frame_offset_local=data.frame_offset_local,
        probe=data.probe,
        truth_volume=data.truth_volume,
    )
    state, params = solve(problem, settings, comm, xp=xp, dtype=dtype,
                          callback=lambda _state, row: progress(row))
    image = to_host(state.u) if comm.is_root else None
    return {"history": state.history, "image": image, "omega": state.omega,
            "params": {**settings.to_dict(), **params}}


def _run_ptycho(data, start, stop, algorithm, settings, comm, xp, dtype, progress) -> dict:
    from ptmpi.metrics import r_factor, snr_db
    from ptmpi.operators.model import JointModel

    empty, projector = _empty_sample_projections(data, start, stop, xp, dtype)
    logger.info("%s: per-angle ptychography, %d iterations, %s likelihood, damping %.3g%s",
                algorithm, settings.iterations, settings.likelihood.upper(), settings.damping,
                ", probe refined" if settings.refine_probe else "")
    state = solve_ptycho2d(empty, data.counts_local, data.probe, data.positions_local,
                           data.frame_offset_local, settings, comm,
                           callback=lambda _state, row: progress(row))
    history = state.history
    aligned = align_global_factor(state.v_local, empty)
    params = settings.to_dict()
    if algorithm == "ptycho2d":
        images = comm.gather(to_host(aligned))
        image = np.concatenate(images) if comm.is_root else None
        return {"history": history, "image": image, "omega": state.omega, "params": params}

    # two-step: tomography of the aligned projections.
    theta_local = projector.theta
    u = tomography_cg(projector, aligned, comm, settings.tomo_iterations)
    model = JointModel(data.volume_shape, theta_local, to_device(state.omega, xp),
                       data.positions_local, data.frame_offset_local, dtype=dtype)
    f_local = to_device(data.counts_local, xp)
    final = {"final_r_factor": r_factor(model.fwd(u), f_local, comm=comm)}
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
    return {"history": history, "image": image, "omega": state.omega, "params": params,
            "final": {"snr_db": final.get("final_snr_db", math.nan)}}


def _figures(output_path, algorithm, image, omega, data, history, n_iter) -> None:
    from ptmpi.plots import save_convergence, save_images, save_slices

    stem = Path(output_path).with_suffix("")
    label = f"{algorithm.upper()}, {n_iter} iterations"
    if algorithm == "ptycho2d":
        save_images(Path(f"{stem}-images.png"), image, omega, label)
    else:
        truth = None if data.truth_volume is None else to_host(data.truth_volume)
        save_slices(Path(f"{stem}-slices.png"), image, truth, label)
    save_convergence(Path(f"{stem}-convergence.png"), history, label)


def settings_from_args(args):
    """Solver settings from the ``reconstruct`` flags (unset flags keep the defaults)."""
    algorithm = args.algorithm or "apt"
    if algorithm in ("apt", "apts"):
        fields = {
            "algorithm": algorithm, "iterations": args.iterations, "tol": args.tol,
            "likelihood": args.likelihood, "tv_weight": args.tv_weight, "r1": args.r1,
            "r2": args.r2, "cg_iterations": args.cg_iterations,
            "refine_probe": args.refine_probe,
        }
        base = SolverSettings()
    else:
        fields = {
            "iterations": args.iterations, "likelihood": args.likelihood, "r2": args.r2,
            "refine_probe": args.refine_probe, "tomo_iterations": args.tomo_iterations,
            "damping": args.damping,
        }
        base = Ptycho2DSettings()
    return algorithm, dataclasses.replace(base, **{k: v for k, v in fields.items()
                                                   if v is not None})
