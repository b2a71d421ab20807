"""Driver of ``ptmpi reconstruct``: validate, partition, read by rank, solve, write.

Order of work, chosen so that a bad run fails before any iteration and on every rank
with the same message: (1) rank 0 validates the file's structure and the output path and
broadcasts the verdict; (2) angles are block-partitioned and each rank validates and reads
only its own frames; (3) the solver runs; (4) rank 0 writes the output and its figures.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np

from ptmpi.backend import DEFAULT_COMPLEX, get_array_module, select_device, to_host
from ptmpi.parallel import SerialComm, block_partition
from ptmpi.progress import Progress
from ptmpi.solvers.admm import LocalProblem, SolverSettings, solve

logger = logging.getLogger(__name__)


class RunError(Exception):
    """A problem found collectively: every rank raises it with the same message."""


def _agree(comm: SerialComm, problems: list[str]) -> None:
    """Raise RunError on every rank if any rank found a problem (one collective)."""
    everyone = comm.allgather(problems)
    merged = list(dict.fromkeys(p for rank_problems in everyone for p in rank_problems))
    if merged:
        raise RunError("; ".join(merged) if len(merged) < 4 else
                       "\n  ".join(["input is not valid:"] + merged))


def reconstruct(input_path: str, output_path: str, settings: SolverSettings,
                comm: SerialComm, *, force: bool = False, gpu: bool = False,
                dtype=DEFAULT_COMPLEX, figures: bool = True, command: str | None = None,
                demo: bool = False) -> dict:
    """Run APT/APTs on ``input_path`` and write ``output_path`` (SPEC 4); returns a summary."""
    from ptmpi.io.cxi import input_checksum, read_input
    from ptmpi.io.output import check_output_path, write_output
    from ptmpi.io.validate import validate_input

    # (1) structure and output path, checked once on rank 0.
    problems, n_angles = [], 0
    if comm.is_root:
        problems = validate_input(input_path, 0, 0)
        if not problems:
            head = read_input(input_path, 0, 0)
            n_angles = head.n_angles
            if head.is_2d:
                problems.append(f"{input_path}: a 2-D ptychography dataset (no volume_shape); "
                                "APT needs a tomography series")
        try:
            check_output_path(output_path, force)
        except ValueError as exc:
            problems.append(str(exc))
    problems, n_angles = comm.bcast((problems, n_angles))
    _agree(comm, problems)
    if comm.size > n_angles:
        raise RunError(f"{comm.size} ranks but only {n_angles} angles in {input_path}: "
                       f"use at most {n_angles} ranks")

    # (2) this rank's block: validate its counts, then read only its hyperslab.
    start, stop = block_partition(n_angles, comm.size, comm.rank)
    _agree(comm, validate_input(input_path, start, stop))
    data = read_input(input_path, start, stop, read_truth=True)
    xp = get_array_module(gpu)
    if gpu:
        device = select_device(comm.local_rank)
        logger.info("rank %d uses GPU %d", comm.rank, device)
    problem = LocalProblem(
        volume_shape=tuple(data.volume_shape),
        theta_local=np.deg2rad(data.angles_deg[start:stop]),
        f_local=data.counts_local,
        positions_local=data.positions_local,
        frame_offset_local=data.frame_offset_local,
        probe=data.probe,
        truth_volume=data.truth_volume,
    )
    frames = comm.allgather(int(data.counts_local.shape[0]))
    logger.info("%s: volume %s, %d angles, %d frames on %d rank(s) (frames per rank %d-%d)",
                input_path, problem.volume_shape, n_angles, sum(frames), comm.size,
                min(frames), max(frames))

    # (3) solve.
    progress = Progress(settings.iterations, enabled=comm.is_root)
    try:
        state, params = solve(problem, settings, comm, xp=xp, dtype=dtype,
                              callback=lambda _state, row: progress(row))
    except FloatingPointError as exc:
        # u is replicated: every rank detects the divergence at the same iteration.
        raise RunError(f"{exc}; lower --r1/--tv-weight or raise --r2") from exc
    finally:
        progress.close()
    resolved = {**settings.to_dict(), **params}

    # (4) output on rank 0.
    history = state.history
    summary = {k: (v[-1] if v else math.nan) for k, v in history.items()}
    if comm.is_root:
        volume = to_host(state.u)
        write_output(
            output_path, volume=volume, probe=to_host(state.omega), metrics=history,
            parameters=resolved, n_ranks=comm.size, input_file=str(input_path),
            input_checksum=input_checksum(input_path), command=command, overwrite=force,
            root_attrs={"ptmpi_demo": 1} if demo else None,
        )
        if figures:
            from ptmpi.plots import save_convergence, save_slices

            stem = Path(output_path).with_suffix("")
            truth = None if data.truth_volume is None else to_host(data.truth_volume)
            label = f"{settings.algorithm.upper()}, {state.iteration} iterations"
            save_slices(Path(f"{stem}-slices.png"), volume, truth, label)
            save_convergence(Path(f"{stem}-convergence.png"), history, label)
        logger.info("wrote %s after %d iterations (%.1f s): R-factor %.4g%s", output_path,
                    state.iteration, summary["wall_s"], summary["r_factor"],
                    f", SNR {summary['snr_db']:.2f} dB" if "snr_db" in summary else "")
    comm.barrier()
    return {"iterations": state.iteration, "parameters": resolved, **summary,
            "time_s": time.perf_counter()}


def settings_from_args(args) -> SolverSettings:
    """SolverSettings from the ``reconstruct`` flags (unset flags keep the defaults)."""
    fields = {
        "algorithm": args.algorithm, "iterations": args.iterations, "tol": args.tol,
        "likelihood": args.likelihood, "tv_weight": args.tv_weight, "r1": args.r1,
        "r2": args.r2, "cg_iterations": args.cg_iterations, "refine_probe": args.refine_probe,
    }
    return dataclasses.replace(SolverSettings(), **{k: v for k, v in fields.items()
                                                    if v is not None})
