"""Checkpoint and restart of ``ptmpi reconstruct`` (APT / APTs): when to write, when to stop.

- **Periodic checkpoints**: every ``checkpoint_every`` iterations and after the last one.
- **Stop requests**: SIGTERM or SIGUSR1 (what SLURM sends before a time limit or a
  preemption) only set a flag (:func:`stop_on_signals`). After each iteration the ranks
  agree on it with one reduction (max), so all of them stop after the same iteration; a
  checkpoint is written and :class:`Interrupted` raised (the command exits with status 75).
- **Divergence**: an iterate that is no longer finite is never written; the last good
  checkpoint stays, and the solver's error says which one it is.
- **Resume**: :func:`checkpoint_problems` checks on rank 0 that a checkpoint belongs to the
  same input and configuration before any rank reads its own frames of it.

The file format is :mod:`ptmpi.io.checkpoint`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from ptmpi.io.checkpoint import config_differences, read_checkpoint_header
from ptmpi.io.output import same_file

logger = logging.getLogger(__name__)

#: Signals that ask a run to checkpoint and stop.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclasses.dataclass
class StopRequest:
    """Set by a signal handler: ``signum`` of the last stop signal received (0: none)."""

    signum: int = 0


@contextlib.contextmanager
def stop_on_signals(signals=STOP_SIGNALS):
    """Within the block, the ``signals`` only set the yielded :class:`StopRequest`.

    The previous handlers come back on exit. Outside the main thread (where Python cannot
    install handlers) nothing is installed and the request is never set.
    """
    request = StopRequest()

    def handler(signum, _frame):
        request.signum = signum

    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Interrupted(Exception):
    """Raised on every rank after a stop request was checkpointed."""

    def __init__(self, signum: int, iteration: int, path: Path):
        self.signum, self.iteration, self.path = signum, iteration, path
        super().__init__(
            f"{signal.Signals(signum).name}: checkpointed at iteration {iteration} in {path}; "
            "run the same command with --resume to continue")


class Checkpointer:
    """Callback after each iteration: stop requests, periodic and final checkpoints.

    Parameters
    ----------
    path : Path
        The checkpoint file.
    every : int
        Write every ``every`` iterations and after the last one; 0: only on a stop request.
    comm : communicator
    stop_request : StopRequest or None
        None: no stop requests (no reduction per iteration).
    write : callable(state)
        Writes the checkpoint (collective).
    last : int or None
        Iteration of the last good checkpoint in ``path`` (that of a resumed one).
    """

    def __init__(self, path: Path, every: int, comm, stop_request: StopRequest | None,
                 write: Callable, last: int | None = None):
        self.path, self.every, self.comm = path, every, comm
        self.stop_request, self.write, self.last = stop_request, write, last

    def __call__(self, state, row: dict) -> None:
        signum = 0
        if self.stop_request is not None:
            signum = int(self.comm.allreduce_scalar(float(self.stop_request.signum), "max"))
        if not math.isfinite(row["rel_change"]):
            return  # diverged: the solver raises next, the last good checkpoint stays
        if signum or (self.every and state.iteration % self.every == 0):
            self._write(state)
        if signum:
            raise Interrupted(signum, state.iteration, self.path)

    def finish(self, state) -> None:
        """After the last iteration: a final checkpoint (periodic checkpoints only)."""
        if self.every and self.last != state.iteration:
            self._write(state)

    def _write(self, state) -> None:
        self.write(state)
        self.last = state.iteration
        logger.debug("checkpoint at iteration %d: %s", state.iteration, self.path)

    def describe_last(self) -> str:
        """For an error message: where the last good checkpoint is, if any."""
        if self.last is None:
            return "no checkpoint was written"
        return f"the last good checkpoint (iteration {self.last}) is kept in {self.path}"


def checkpoint_problems(path: Path, *, input_path, output_path, resume: bool, force: bool,
                        settings: dict, dtype, iterations: int, checksum: str):
    """Rank 0's checks of the checkpoint path before a run; returns (problems, header).

    ``header`` is the checkpoint's :class:`~ptmpi.io.checkpoint.CheckpointHeader` when the
    run resumes from it, else None. Refused: a checkpoint path that is the input or the
    output; a folder that is missing or not writable; an existing checkpoint without
    ``resume`` (or ``force``); for a resume, a checkpoint of another input (``checksum``
    of the input; "" skips that check), of another configuration, or past ``iterations``.
    """
    for other, what in ((input_path, "input"), (output_path, "output")):
        # The checkpoint may not exist yet: the same spelled path counts too.
        if same_file(path, other) or os.path.abspath(path) == os.path.abspath(other):
            return [f"{path}: the checkpoint cannot be the {what} file"], None
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        found = "is not a folder" if folder.exists() else "does not exist"
        return [f"{path}: checkpoint folder {folder} {found}"], None
    if not os.access(folder, os.W_OK):
        return [f"{path}: checkpoint folder {folder} is not writable"], None
    if not path.exists():
        if resume:
            logger.info("--resume: no checkpoint %s yet; starting from iteration 0", path)
        return [], None
    if not resume:
        if force:
            return [], None
        return [f"{path}: checkpoint exists; pass --resume to continue from it or --force "
                "to overwrite it"], None
    try:
        header = read_checkpoint_header(path)
    except ValueError as exc:
        return [str(exc)], None
    if checksum and header.input_checksum != checksum:
        return [f"{path}: checkpoint of another input file (input checksum "
                f"{header.input_checksum[:19]}..., {input_path} has {checksum[:19]}...)"], None
    diffs = config_differences(header, settings, dtype)
    if diffs:
        return [f"{path}: checkpoint of another configuration ({'; '.join(diffs)}); resume "
                "with the settings it was written with"], None
    if header.iteration > iterations:
        return [f"{path}: checkpoint at iteration {header.iteration}, beyond --iterations "
                f"{iterations}"], None
    return [], header
