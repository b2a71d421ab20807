"""Failures end cleanly (SPEC 3 and 6): one clear line, a non-zero exit, promptly, no damage.

Each case is a real job through the command line: under ``mpiexec -n 2`` (or 3) for the
situations that matter under MPI, serially for a few. For every case the test checks:

- the exit status (1 for an error, 2 for bad command-line usage);
- the job ends within 30 s (no rank left waiting in a collective);
- stderr holds exactly one error line, naming the file or dataset, what was expected and
  what was found, and no traceback. Rank 0's progress lines may come before it; cases
  found before the solve end by agreement (every rank exits by itself), a failure on one
  rank by an abort, after which the MPI launcher adds at most one ``Abort(...)`` line;
- no user file was damaged: the sha256 of every file in the case's folder is the same
  before and after, and nothing was left behind (no half output, no temporary file).

All bad inputs are made from one tiny valid simulated file (2 angles, volume 12 x 16 x 16,
8 x 8 frames), corrupted with h5py. ``ptmpi info`` must reject each bad file in one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from jobs import job_env, mpiexec
from ptmpi.backend import gpu_available
from ptmpi.cli import main
from ptmpi.io.cxi import ANGLES, DATA, FRAME_OFFSET, POSITIONS, PROBE, write_input
from ptmpi.sim.presets import SimulationSettings
from ptmpi.sim.simulate import simulate

IN = "in.h5"  # the input file of every case, in the case's folder
N_ANGLES = 2

# ---------------------------------------------------------------------------- the valid file


@pytest.fixture(scope="session")
def base_file(tmp_path_factory) -> Path:
    """One tiny valid input file: 2 angles of 20 frames each, 8 x 8 pixels."""
    data = simulate(SimulationSettings(n=16, nz=12, n_angles=N_ANGLES, step=4, probe_size=8,
                                       fwhm=3.0, seed=7, jitter=1.5))
    path = tmp_path_factory.mktemp("failures") / "valid.h5"
    write_input(path, counts=data.counts, probe=data.probe, positions_px=data.positions_px,
                frame_offset=data.frame_offset, angles_deg=data.angles_deg,
                volume_shape=data.volume.shape, truth_volume=data.volume,
                truth_probe=data.probe)
    return path


# ---------------------------------------------------------------------------- corruptions


def _edit(edit: Callable[[h5py.File], None]) -> Callable[[Path, Path], None]:
    """A setup that copies the valid file to ``in.h5`` and applies ``edit`` to it."""
    def setup(folder: Path, base: Path) -> None:
        shutil.copyfile(base, folder / IN)
        with h5py.File(folder / IN, "r+") as f:
            edit(f)
    return setup


def _valid(folder: Path, base: Path) -> None:
    shutil.copyfile(base, folder / IN)


def _offsets(f: h5py.File) -> np.ndarray:
    return np.asarray(f[FRAME_OFFSET][()])


def _negative_counts(f):
    f[DATA][0, 1, 2] = -3.0  # frame 0: rank 0's block


def _nan_counts_in_last_angle(f):
    # Only in the frames of the last angle, which only rank 1 reads under 2 ranks.
    f[DATA][int(_offsets(f)[-2]) + 3, 0, 0] = np.nan


def _replace(f, name, value):
    del f[name]
    f[name] = value


def _positions_rows(f):
    _replace(f, POSITIONS, np.asarray(f[POSITIONS][()])[:-1])


def _probe_size(f):
    _replace(f, PROBE, np.ones((6, 6), np.complex64))


def _offset_short(f):
    off = _offsets(f)
    off[-1] -= 1
    f[FRAME_OFFSET][...] = off


def _window_outside(f):
    positions = np.asarray(f[POSITIONS][()])
    positions[5] = (1000.0, -1000.0)
    f[POSITIONS][...] = positions


def _zero_probe(f):
    f[PROBE][...] = 0


def _delete(name):
    def edit(f):
        del f[name]
    return edit


def _truncated(folder: Path, base: Path) -> None:
    raw = base.read_bytes()
    (folder / IN).write_bytes(raw[: len(raw) // 2])


def _not_hdf5(folder: Path, base: Path) -> None:
    (folder / IN).write_text("frame,row,col\n0,1,2\n")


def _nothing(folder: Path, base: Path) -> None:
    pass


def _with(*setups: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    def setup(folder: Path, base: Path) -> None:
        for s in setups:
            s(folder, base)
    return setup


def _file(name: str, content: bytes = b"a user's own file\n"):
    def setup(folder: Path, base: Path) -> None:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return setup


def _folder(name: str):
    def setup(folder: Path, base: Path) -> None:
        (folder / name).mkdir()
    return setup


# ---------------------------------------------------------------------------- failures on one rank

# Makes ``MODULE.FUNCTION`` raise on one rank (PTMPI_TEST_FAIL="MODULE.FUNCTION:RANK",
# a RuntimeError, or "...:RANK:UserError", an error meant for the user that the code
# wrongly raises on that rank only), then runs the command line: the other ranks go on
# into the next collective and would wait there forever unless the whole job is ended.
_INJECT = """
    import importlib
    import os
    import sys

    from ptmpi.cli import UserError, main

    target, rank, *kind = os.environ["PTMPI_TEST_FAIL"].split(":")
    module_name, name = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    original = getattr(module, name)
    error = UserError if kind == ["UserError"] else RuntimeError


    def failing(*args, **kwargs):
        if os.environ.get("PMI_RANK", "0") == rank:
            raise error(f"injected failure in {name}")
        return original(*args, **kwargs)


    setattr(module, name, failing)
    sys.exit(main(sys.argv[1:]))
"""


# ---------------------------------------------------------------------------- the table


@dataclasses.dataclass
class Case:
    id: str
    args: list[str]
    words: list[str]
    setup: Callable[[Path, Path], None] = _valid
    ranks: int = 2
    code: int = 1
    inject: str | None = None  # "MODULE.FUNCTION:RANK[:UserError]"
    early: bool = True  # found by every rank or by rank 0 for all: no abort needed
    info: bool = False  # ``ptmpi info in.h5`` must reject the file in one line too
    skip: str | None = None  # why the case cannot run here


def _rec(*extra: str) -> list[str]:
    return ["reconstruct", IN, "-o", "rec.h5", "--iterations", "2", "--no-figures", *extra]


CASES = [
    # --- bad input files (SPEC 3)
    Case("negative-counts", _rec(), [IN, DATA, "expected non-negative", "frame 0"],
         _edit(_negative_counts), info=True),
    Case("nan-counts-only-in-rank-1-block", _rec(),
         [IN, DATA, "expected finite counts", "NaN", "frame 23"],
         _edit(_nan_counts_in_last_angle), info=True),
    Case("nan-counts-serial", _rec(), [IN, DATA, "NaN"], _edit(_nan_counts_in_last_angle),
         ranks=1),
    Case("truncated-file", _rec(), [IN, "not a readable HDF5 file", "truncated"], _truncated,
         info=True),
    Case("not-an-hdf5-file", _rec(), [IN, "not a readable HDF5 file", "signature"], _not_hdf5,
         info=True),
    Case("missing-input-file", _rec(), [IN, "does not exist"], _nothing, ranks=1, info=True),
    Case("missing-input-file-2-ranks", _rec(), [IN, "does not exist"], _nothing),
    Case("positions-rows-not-frames", _rec(), [IN, POSITIONS, "expected shape (40, 2)",
                                               "found (39, 2)"],
         _edit(_positions_rows), info=True),
    Case("probe-size-not-frame-size", _rec(), [IN, PROBE, "expected shape (8, 8)",
                                               "found (6, 6)"],
         _edit(_probe_size), info=True),
    Case("frame-offset-not-reaching-F", _rec(), [IN, FRAME_OFFSET, "F = 40", "found 39"],
         _edit(_offset_short), info=True),
    Case("window-outside-the-image", _rec(), [IN, POSITIONS, "frame 5", "entirely outside"],
         _edit(_window_outside), info=True),
    Case("zero-probe", _rec(), [IN, PROBE, "all zeros"], _edit(_zero_probe), info=True),
    Case("missing-counts", _rec(), [IN, DATA, "missing"], _edit(_delete(DATA)), info=True),
    Case("missing-angles", _rec(), [IN, ANGLES, "missing"], _edit(_delete(ANGLES)), info=True),
    # --- the output
    Case("output-parent-is-a-file", ["reconstruct", IN, "-o", "notes.txt/rec.h5"],
         ["notes.txt/rec.h5", "notes.txt is not a folder"], _with(_valid, _file("notes.txt"))),
    # /proc accepts os.access(W_OK) from root, yet no file can be created there.
    Case("output-folder-not-writable", ["reconstruct", IN, "-o", "/proc/ptmpi-rec.h5"],
         ["/proc/ptmpi-rec.h5", "cannot create a file in output folder /proc"],
         skip=None if os.path.isdir("/proc/self") else "no /proc file system"),
    Case("output-exists-without-force", _rec(), ["rec.h5", "exists", "--force"],
         _with(_valid, _file("rec.h5"))),
    Case("figure-beside-the-output-exists", ["reconstruct", IN, "-o", "rec.h5"],
         ["rec-slices.png", "exists", "figure of output rec.h5", "--force"],
         _with(_valid, _file("rec-slices.png"))),
    Case("output-is-a-folder", _rec("--force"), ["rec.h5", "is a folder"],
         _with(_valid, _folder("rec.h5")), ranks=1),
    Case("output-is-the-input", ["reconstruct", IN, "-o", IN],
         [IN, "is the input file"]),
    Case("output-is-the-input-even-with-force", ["reconstruct", IN, "-o", f"./{IN}", "--force"],
         [IN, "is the input file"]),
    # --- the job
    Case("more-ranks-than-angles", _rec(), ["3 ranks", "2 angles", IN, "at most 2"], ranks=3),
    Case("exception-on-rank-1-in-the-solver", _rec("--iterations", "100000"),
         ["on rank 1", "RuntimeError", "injected failure in solve"],
         inject="ptmpi.reconstruct.solve:1", early=False),
    Case("exception-on-rank-0-while-reading", _rec(),
         ["on rank 0", "RuntimeError", "injected failure in read_input"],
         inject="ptmpi.io.cxi.read_input:0", early=False),
    Case("user-error-on-rank-1-only", _rec(),
         ["on rank 1", "injected failure in settings_from_args"],
         inject="ptmpi.cli.settings_from_args:1:UserError", early=False),
    Case("output-write-fails-on-rank-0", _rec(),
         ["on rank 0", "RuntimeError", "injected failure in write_output"],
         inject="ptmpi.io.output.write_output:0", early=False),
    # --- the angle x slab grid (--slabs)
    Case("slabs-not-dividing-the-ranks", _rec("--slabs", "3"),
         ["--slabs 3", "must divide the rank count, 2"]),
    Case("slabs-with-two-step", _rec("--slabs", "2", "--algorithm", "two-step"),
         ["--slabs 2", "--algorithm two-step", "--slabs 1"]),
    Case("slabs-with-the-exp-model", _rec("--slabs", "2", "--model", "exp"),
         ["--slabs 2", "--model exp", "--slabs 1"]),
    Case("cg-tol-with-the-linear-model", _rec("--cg-tol", "0.1"),
         ["--cg-tol", "--model exp only", "--cg-iterations"]),
    Case("tv-continuation-with-apts", _rec("--tv-continuation", "on", "--algorithm", "apts"),
         ["--tv-continuation", "APT with the linear model only"]),
    Case("two-step-start-with-align", _rec("--start", "two-step", "--align"),
         ["--start two-step", "--align"]),
    Case("two-step-start-with-exp-model", _rec("--start", "two-step", "--model", "exp"),
         ["--start two-step", "linear model only"]),
    Case("two-step-start-with-probe-modes", _rec("--start", "two-step", "--probe-modes", "2"),
         ["--start two-step", "--probe-modes > 1", "not supported"]),
    # --- bad flag values: usage errors
    Case("slabs-zero", _rec("--slabs", "0"), ["--slabs", "positive integer or auto", "'0'"],
         code=2),
    Case("negative-iterations", _rec("--iterations", "-3"),
         ["--iterations", "expected an integer >= 1", "found '-3'"], code=2),
    Case("gpu-without-a-gpu", _rec("--gpu"), ["--gpu was requested", "no GPU is usable"],
         skip="a GPU is usable here" if gpu_available() else None),
    Case("cg-tol-one", _rec("--cg-tol", "1"), ["--cg-tol", "expected a number >= 0 and < 1",
                                              "found '1'"], code=2),
    Case("zero-iterations", _rec("--iterations", "0"),
         ["--iterations", "expected an integer >= 1", "found '0'"], code=2),
    Case("r2-zero", _rec("--r2", "0"), ["--r2", "expected a number > 0", "found '0'"],
         code=2),
    Case("r2-nan-serial", _rec("--r2", "nan"), ["--r2", "expected a number > 0", "'nan'"],
         code=2, ranks=1),
    Case("unknown-algorithm", _rec("--algorithm", "sirt"), ["--algorithm", "sirt"], code=2),
    Case("no-output-flag", ["reconstruct", IN], ["-o/--output", "required"], code=2),
    # --- other commands never overwrite a user's file
    Case("simulate-onto-an-existing-file",
         ["simulate", "-o", IN, "--n", "16", "--nz", "12", "--angles", "2", "--step", "4",
          "--probe-size", "8", "--fwhm", "3"], [IN, "exists", "--force"]),
    Case("demo-onto-a-user-file", ["demo", "--out", "mine", "--iterations", "1"],
         ["mine/demo.h5", "exists", "--force"], _file("mine/demo.h5")),
    Case("paper-onto-a-user-file",
         ["paper", "--out", "mine", "--size", "32", "--cases", "s32-a12", "--methods", "apt",
          "--iterations", "1"], ["mine/s32-a12-apt.h5", "exists", "--force"],
         _file("mine/s32-a12-apt.h5")),
    Case("paper-out-is-a-file", ["paper", "--out", "notes.txt", "--size", "32"],
         ["notes.txt", "expected a folder for --out, found a file"], _file("notes.txt")),
]


# ---------------------------------------------------------------------------- running a job


def _snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_failure_ends_the_job_cleanly(case: Case, base_file, tmp_path):
    if case.skip:
        pytest.skip(case.skip)
    case.setup(tmp_path, base_file)
    before = _snapshot(tmp_path)
    env = job_env()
    if case.inject:
        script = tmp_path.parent / f"{tmp_path.name}-inject.py"  # outside the case's folder
        script.write_text(textwrap.dedent(_INJECT))
        program = [sys.executable, str(script)]
        env["PTMPI_TEST_FAIL"] = case.inject
    else:
        program = [sys.executable, "-m", "ptmpi"]
    launcher = [mpiexec(), "-n", str(case.ranks)] if case.ranks > 1 else []
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([*launcher, *program, *case.args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{case.id}: the job did not end within 60 s")
    wall = time.perf_counter() - t0

    err = proc.stderr
    assert proc.returncode == case.code, err
    assert wall < 30, f"{case.id}: {wall:.1f} s to exit"
    assert "Traceback" not in err + proc.stdout, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"\berror\b", line)]
    assert len(errors) == 1, err
    line = errors[0]
    command = case.args[0]
    assert line.startswith(f"ptmpi {command}: error"), line
    for word in case.words:
        assert word in line, f"{word!r} not in {line!r}"
    aborts = [x for x in lines if "MPI_Abort" in x]
    assert len(aborts) <= (0 if case.early else 1), err
    if case.early and case.ranks == 1 or case.code == 2:
        assert lines == [line], err
    assert _snapshot(tmp_path) == before, "a file was changed, created or removed"
    print(f"{case.id}: exit {proc.returncode} after {wall:.2f} s: {line}")


@pytest.mark.parametrize("case", [c for c in CASES if c.info], ids=[c.id for c in CASES if c.info])
def test_info_rejects_the_bad_file_in_one_line(case: Case, base_file, tmp_path, capsys,
                                               monkeypatch):
    case.setup(tmp_path, base_file)
    before = _snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["info", IN]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and IN in lines[0]
    for word in case.words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert "Traceback" not in err
    assert _snapshot(tmp_path) == before
