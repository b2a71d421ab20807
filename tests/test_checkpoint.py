"""Checkpoint and restart of ``ptmpi reconstruct`` (apt, apts).

One tiny case throughout (volume 12 x 16 x 16, probe 8, 7 angles, Poisson counts):

- the checkpoint file holds the solver state exactly, whoever wrote it (1, 2 or 4 ranks);
- a resumed run reproduces the uninterrupted one: bit for bit with the same rank count,
  within 1e-4 with another (1 -> 2 and 2 -> 4 ranks);
- a checkpoint of another input or configuration is refused with one line, exit 1;
- a divergent iterate is never written: the last good checkpoint stays;
- whole 2-rank jobs (``mpiexec`` launched from the test): ``kill -9`` at a random instant
  and in the middle of a checkpoint write, SIGUSR1 to one rank and SIGTERM to the launcher
  (exit 75); each then resumes to the reference volume of an uninterrupted 2-rank job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from jobs import job_env, mpiexec
from ptmpi.cli import EXIT_CHECKPOINTED, main
from ptmpi.io.checkpoint import (
    default_checkpoint_path,
    read_checkpoint,
    read_checkpoint_header,
    temporary_path,
    write_checkpoint,
)
from ptmpi.io.cxi import input_checksum, write_input
from ptmpi.parallel import MPIComm, SerialComm, block_partition
from ptmpi.reconstruct import reconstruct
from ptmpi.sim.presets import SimulationSettings
from ptmpi.sim.simulate import simulate
from ptmpi.solvers.admm import LocalProblem, SolverSettings, solve

NZ, N, M = 12, 16, 8
N_ANGLES = 7
SHAPE = (NZ, N, N)
VOLUME = "entry_1/image_1/data"
METRICS = "entry_1/ptmpi/metrics"
JOB_ITERATIONS = 40  # whole jobs: long enough to be stopped while they run


def write_case(path: Path, seed: int = 7):
    """Simulate the tiny case and write it as a SPEC 3 input file; returns the data."""
    data = simulate(SimulationSettings(n=N, nz=NZ, n_angles=N_ANGLES, step=4, probe_size=M,
                                       fwhm=3.0, eta=50.0, seed=seed, jitter=1.5))
    write_input(path, counts=data.counts, probe=data.probe, positions_px=data.positions_px,
                frame_offset=data.frame_offset, angles_deg=data.angles_deg,
                volume_shape=data.volume.shape, truth_volume=data.volume)
    return data


def local_problem(data, a0: int, a1: int) -> LocalProblem:
    """The LocalProblem of angles ``[a0, a1)`` of simulated ``data``."""
    off = data.frame_offset
    f0, f1 = int(off[a0]), int(off[a1])
    return LocalProblem(volume_shape=SHAPE, theta_local=np.deg2rad(data.angles_deg[a0:a1]),
                        f_local=np.fft.ifftshift(data.counts[f0:f1], axes=(-2, -1)),
                        positions_local=data.positions_px[f0:f1],
                        frame_offset_local=off[a0:a1 + 1] - f0, probe=data.probe)


def volume(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[VOLUME][...]


def metrics(path: Path) -> dict:
    """The output's metrics without the wall times (which differ from run to run)."""
    with h5py.File(path, "r") as f:
        return {k: f[METRICS][k][...] for k in f[METRICS] if k != "wall_s"}


def assert_same_run(a: Path, b: Path) -> None:
    """Two outputs of the same computation: volume, probe and metrics bit for bit."""
    assert np.array_equal(volume(a), volume(b))
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert np.array_equal(fa["entry_1/image_2/data"][...], fb["entry_1/image_2/data"][...])
    ma, mb = metrics(a), metrics(b)
    assert sorted(ma) == sorted(mb)
    for key in ma:
        assert np.array_equal(ma[key], mb[key]), key


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Path:
    """The tiny input file (read only: tests copy what they change)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.h5"
    write_case(path)
    return path


# ---------------------------------------------------------------------------- file


@pytest.mark.parametrize("algorithm", ["apt", "apts"])
def test_checkpoint_round_trip_equals_the_state(algorithm, tmp_path):
    data = write_case(tmp_path / "tiny.h5")
    settings = SolverSettings(algorithm=algorithm, iterations=3, refine_probe=True)
    state, params = solve(local_problem(data, 0, N_ANGLES), settings, SerialComm())
    path = tmp_path / "ck.h5"
    checksum = input_checksum(tmp_path / "tiny.h5")
    write_checkpoint(path, state, SerialComm(), settings=settings.to_dict(),
                     dtype=np.complex64, input_checksum=checksum, frame_start=0,
                     n_frames=data.counts.shape[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.h5", "tiny.h5"]  # no temporary

    header = read_checkpoint_header(path)
    assert header.iteration == 3 and header.input_checksum == checksum
    assert header.settings == settings.to_dict() and header.dtype == "complex64"
    assert header.params == params == state.params and header.n_ranks == 1
    assert header.volume_shape == SHAPE and header.probe_shape == (M, M)
    assert header.n_frames == data.counts.shape[0]

    back = read_checkpoint(path, 0, header.n_frames)
    for name in ("u", "z_local", "lam2_local", "omega", "p", "lam1"):
        mine, theirs = getattr(state, name), getattr(back, name)
        if algorithm == "apts" and name in ("p", "lam1"):
            assert mine is None and theirs is None
            continue
        assert theirs.dtype == np.complex64 and np.array_equal(theirs, mine), name
    # the probe was refined, so omega is not the input's probe: it must come from the file
    assert not np.array_equal(back.omega, data.probe)
    assert back.iteration == 3 and back.history == state.history and back.params == params
    # a rank reads only its own frames, at their global (angle-major) place
    f0, f1 = int(data.frame_offset[2]), int(data.frame_offset[5])
    part = read_checkpoint(path, f0, f1)
    assert np.array_equal(part.z_local, state.z_local[f0:f1])
    assert np.array_equal(part.lam2_local, state.lam2_local[f0:f1])
    assert default_checkpoint_path("out/rec.h5") == Path("out/rec-checkpoint.h5")


def test_resume_reproduces_the_uninterrupted_run(case, tmp_path, capsys):
    """Serial, through the command line: 8 iterations in one go, and 4 + 4 with --resume."""
    common = [str(case), "--no-figures", "--refine-probe", "--checkpoint", str(tmp_path / "ck.h5")]
    assert main(["reconstruct", *common[:3], "-o", str(tmp_path / "full.h5"),
                 "--iterations", "8"]) == 0
    # --resume without a checkpoint starts from iteration 0 (a job script always passes it)
    assert main(["reconstruct", *common, "-o", str(tmp_path / "part.h5"), "--iterations", "4",
                 "--checkpoint-every", "3", "--resume"]) == 0
    assert "no checkpoint" in capsys.readouterr().err
    assert read_checkpoint_header(tmp_path / "ck.h5").iteration == 4  # the final one
    assert main(["reconstruct", *common, "-o", str(tmp_path / "resumed.h5"),
                 "--iterations", "8", "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().err
    assert_same_run(tmp_path / "full.h5", tmp_path / "resumed.h5")
    assert metrics(tmp_path / "resumed.h5")["iteration"].tolist() == list(range(1, 9))
    assert not temporary_path(tmp_path / "ck.h5").exists()
    assert main(["info", str(tmp_path / "ck.h5")]) == 0
    out = capsys.readouterr().out
    assert "kind: checkpoint" in out and "iteration: 8 (of --iterations 8)" in out


def test_resume_from_the_iteration_that_raises_r2_is_bit_for_bit(case, tmp_path):
    """The checkpoint of the iteration whose end raises ``r2`` holds the raised ``r2`` and
    halved ``lam2``. It held the old ones, and the resumed run went on without the raise
    (found by the kill -9 test, which lands on such a checkpoint now and then)."""
    whole, ck = tmp_path / "whole.h5", tmp_path / "ck.h5"
    assert main(["reconstruct", str(case), "-o", str(whole), "--iterations", "40",
                 "--no-figures"]) == 0
    r2 = metrics(whole)["r2"]
    # row k (0-based) is iteration k + 1: a raise at the end of iteration k + 1
    raised = [k + 1 for k in range(len(r2) - 1) if r2[k + 1] > r2[k]]
    assert raised and raised[0] < 40
    common = [str(case), "-o", str(tmp_path / "part.h5"), "--no-figures", "--checkpoint",
              str(ck), "--checkpoint-every", "1"]
    assert main(["reconstruct", *common, "--iterations", str(raised[0])]) == 0
    assert read_checkpoint_header(ck).iteration == raised[0]
    assert main(["reconstruct", *common, "--iterations", "40", "--resume", "--force"]) == 0
    assert_same_run(whole, tmp_path / "part.h5")


# ---------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def checkpointed(case, tmp_path_factory):
    """A checkpoint of 2 default APT iterations on ``case``, and another input file."""
    folder = tmp_path_factory.mktemp("refuse")
    assert main(["reconstruct", str(case), "-o", str(folder / "first.h5"), "--iterations", "2",
                 "--checkpoint", str(folder / "ck.h5"), "--no-figures"]) == 0
    write_case(folder / "other.h5", seed=8)
    return folder


@pytest.mark.parametrize("flags,expected", [
    (["--input", "other.h5"], "checkpoint of another input file"),
    (["--tv-weight", "0.5"], "tv_weight: None there, 0.5 now"),
    (["--algorithm", "apts"], "algorithm: apt there, apts now"),
    (["--likelihood", "agm"], "likelihood: ipm there, agm now"),
    (["--cg-iterations", "3"], "cg_iterations: 8 there, 3 now"),
    (["--refine-probe"], "refine_probe: False there, True now"),
    (["--double"], "dtype: complex64 there, complex128 now"),
    (["--iterations", "1"], "checkpoint at iteration 2, beyond --iterations 1"),
    (["--no-resume"], "checkpoint exists; pass --resume"),
    (["--algorithm", "two-step"], "not supported with --algorithm two-step"),
    (["--checkpoint", "tiny.h5"], "the checkpoint cannot be the input file"),
    (["--checkpoint", "first.h5"], "not a ptmpi checkpoint"),
    (["--checkpoint", "no/such/ck.h5"], "checkpoint folder"),
], ids=["input", "tv-weight", "algorithm", "likelihood", "cg", "probe", "dtype", "iterations",
        "no-resume", "two-step", "is-input", "not-checkpoint", "no-folder"])
def test_resume_refuses_another_input_or_configuration(case, checkpointed, tmp_path, capsys,
                                                       flags, expected):
    shutil.copy(case, tmp_path / "tiny.h5")
    for name in ("ck.h5", "first.h5", "other.h5"):
        shutil.copy(checkpointed / name, tmp_path / name)
    before = {p.name: digest(p) for p in tmp_path.iterdir()}
    args = {"--input": "tiny.h5", "--checkpoint": "ck.h5", "--iterations": "10"}
    extra, resume = [], True
    rest = iter(flags)
    for flag in rest:
        if flag in args:
            args[flag] = next(rest)
        elif flag == "--no-resume":
            resume = False
        else:
            extra.append(flag)
    argv = ["reconstruct", str(tmp_path / args["--input"]), "-o", str(tmp_path / "rec.h5"),
            "--checkpoint", str(tmp_path / args["--checkpoint"]), "--iterations",
            args["--iterations"], "--no-figures", *(["--resume"] if resume else []), *extra]
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ptmpi reconstruct: error: "), err
    assert expected in lines[0]
    # nothing written, nothing changed
    assert {p.name: digest(p) for p in tmp_path.iterdir()} == before


def test_settings_added_later_take_the_value_older_checkpoints_ran_with():
    """An exp checkpoint from before ``cg_tol`` ran exactly ``cg_iterations`` CG steps: it
    resumes with the default (0) and is refused, with that named, with ``--cg-tol 0.2``;
    from before ``support`` it ran without one and with 20 initialisation steps, and
    resumes with ``--support none --tomo-iterations 20`` only.
    A linear checkpoint has no such setting and none is compared."""
    from ptmpi.io.checkpoint import config_differences
    from ptmpi.solvers.admm_exp import ExpSolverSettings

    class Header:
        settings = {k: v for k, v in ExpSolverSettings(support="none", init_gn_iterations=20)
                    .to_dict().items()
                    if (not k.startswith("cg_") or k == "cg_iterations") and k != "support"}
        dtype = "complex64"

    old = ExpSolverSettings(support="none", init_gn_iterations=20)
    assert config_differences(Header, old.to_dict(), np.complex64) == []
    assert config_differences(Header, dataclasses.replace(old, cg_tol=0.2).to_dict(),
                              np.complex64) == ["cg_tol: 0.0 there, 0.2 now"]
    # ... without the field-of-view support, and with 20 initialisation steps at any size
    assert config_differences(Header, ExpSolverSettings().to_dict(), np.complex64) == [
        "init_gn_iterations: 20 there, None now", "support: none there, fov now"]

    class LinearHeader:
        settings = SolverSettings().to_dict()
        dtype = "complex64"

    assert config_differences(LinearHeader, SolverSettings().to_dict(), np.complex64) == []


# ---------------------------------------------------------------------------- divergence


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning",
                            "ignore:invalid value:RuntimeWarning")
def test_divergence_keeps_the_last_good_checkpoint(case, tmp_path, capsys):
    """``--r2 1e30`` overflows the unsmoothed z-step (``--epsilon 0``) at iteration 2:
    iteration 1 is the last one written."""
    ck = tmp_path / "ck.h5"
    base = ["reconstruct", str(case), "--r2", "1e30", "--epsilon", "0", "--iterations", "5",
            "--no-figures"]
    assert main([*base, "-o", str(tmp_path / "a.h5")]) == 1
    err = capsys.readouterr().err.strip()
    assert "diverged at iteration 2" in err and err.endswith("no checkpoint was written")
    assert not default_checkpoint_path(tmp_path / "a.h5").exists()

    assert main([*base, "-o", str(tmp_path / "b.h5"), "--checkpoint", str(ck),
                 "--checkpoint-every", "1"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == (f"ptmpi reconstruct: error: the volume u is no longer finite: "
                         f"diverged at iteration 2; lower --r1/--tv-weight or raise --r2; "
                         f"the last good checkpoint (iteration 1) is kept in {ck}")
    state = read_checkpoint(ck, 0, 0)
    assert state.iteration == 1 and np.all(np.isfinite(state.u))
    assert not temporary_path(ck).exists()

    # resuming runs into the same wall, and leaves the good checkpoint as it was
    kept = digest(ck)
    assert main([*base, "-o", str(tmp_path / "c.h5"), "--checkpoint", str(ck), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "diverged at iteration 2" in err and "(iteration 1) is kept in" in err
    assert digest(ck) == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.h5"]


# ---------------------------------------------------------------------------- rank counts


@pytest.mark.mpi(ranks=[2, 4], timeout=120, unit="s")
def test_checkpoint_written_by_ranks_holds_every_frame(mpi_ranks, shared_tmp):
    """Each rank writes its own hyperslab; read back whole and with another partition."""
    comm = MPIComm()
    path = shared_tmp / "tiny.h5"
    data = comm.bcast(write_case(path) if comm.is_root else None)
    a0, a1 = block_partition(N_ANGLES, comm.size, comm.rank)
    settings = SolverSettings(iterations=2)
    state, _ = solve(local_problem(data, a0, a1), settings, comm)
    n_frames = data.counts.shape[0]
    ck = shared_tmp / "ck.h5"
    f0, f1 = int(data.frame_offset[a0]), int(data.frame_offset[a1])
    write_checkpoint(ck, state, comm, settings=settings.to_dict(), dtype=np.complex64,
                     input_checksum="sha256:0", frame_start=f0, n_frames=n_frames)
    z_all = comm.gather(state.z_local)
    lam2_all = comm.gather(state.lam2_local)
    # another partition: the frames of the angles one rank count down would give
    b0, b1 = block_partition(N_ANGLES, comm.size // 2, comm.rank % (comm.size // 2))
    g0, g1 = int(data.frame_offset[b0]), int(data.frame_offset[b1])
    other = read_checkpoint(ck, g0, g1)
    comm.barrier()  # the last collective: asserts come after it

    mine = read_checkpoint(ck, f0, f1)
    assert np.array_equal(mine.z_local, state.z_local)
    assert np.array_equal(mine.lam2_local, state.lam2_local)
    assert np.array_equal(mine.u, state.u) and np.array_equal(mine.lam1, state.lam1)
    assert other.z_local.shape == (g1 - g0, M, M)
    assert read_checkpoint_header(ck).n_ranks == comm.size
    if comm.is_root:
        whole = read_checkpoint(ck, 0, n_frames)
        assert np.array_equal(whole.z_local, np.concatenate(z_all))
        assert np.array_equal(whole.lam2_local, np.concatenate(lam2_all))
        assert np.array_equal(other.z_local, whole.z_local[g0:g1])
        assert not temporary_path(ck).exists()


@pytest.mark.mpi(ranks=[2, 4], timeout=120, unit="s")
def test_resume_with_another_rank_count(mpi_ranks, shared_tmp):
    """Half of the ranks run 4 iterations and checkpoint; all of them resume to 8.

    Same rank count: bit for bit. Another (1 -> 2 or 2 -> 4 ranks): within 1e-4.
    """
    from mpi4py import MPI

    world = MPIComm()
    half = world.size // 2
    group = world.rank // half
    sub = MPIComm(MPI.COMM_WORLD.Split(group, world.rank))
    path, ck = shared_tmp / "tiny.h5", shared_tmp / "ck.h5"
    if world.is_root:
        write_case(path)
    world.barrier()
    eight, four = SolverSettings(iterations=8), SolverSettings(iterations=4)

    def run(name, settings, comm, **kwargs):
        return reconstruct(str(path), str(shared_tmp / name), settings, comm, figures=False,
                           **kwargs)

    if group == 0:
        run("part.h5", four, sub, checkpoint=str(ck), checkpoint_every=4)
        run("half-full.h5", eight, sub)
        run("half-resumed.h5", eight, sub, checkpoint=str(ck), resume=True)
    world.barrier()
    run("world-resumed.h5", eight, world, checkpoint=str(ck), resume=True)
    run("world-full.h5", eight, world)
    world.barrier()  # the last collective
    if not world.is_root:
        return

    assert read_checkpoint_header(ck).n_ranks == half and read_checkpoint_header(ck).iteration == 4
    assert_same_run(shared_tmp / "half-full.h5", shared_tmp / "half-resumed.h5")
    resumed = volume(shared_tmp / "world-resumed.h5")
    assert rel(resumed, volume(shared_tmp / "world-full.h5")) < 1e-4
    assert rel(resumed, volume(shared_tmp / "half-full.h5")) < 1e-4
    assert rel(resumed, np.ones(SHAPE)) > 1e-2  # the run did something
    m = metrics(shared_tmp / "world-resumed.h5")
    assert m["iteration"].tolist() == list(range(1, 9))
    r_half = metrics(shared_tmp / "half-full.h5")["r_factor"]
    assert np.max(np.abs(m["r_factor"] - r_half) / r_half) < 1e-4


# ---------------------------------------------------------------------------- whole jobs


class Job:
    """A 2-rank ``ptmpi reconstruct`` launched with mpiexec; stderr goes to a file."""

    def __init__(self, folder: Path, args: list[str]):
        self.folder = folder
        self.log = folder / f"job-{time.monotonic_ns()}.log"
        self.t0 = time.perf_counter()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [mpiexec(), "-n", "2", sys.executable, "-m", "ptmpi", "reconstruct",
                 "tiny.h5", "--no-figures", *args],
                cwd=folder, env=job_env(), stdout=log, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = 60) -> tuple[int, float, str]:
        code = self.proc.wait(timeout=timeout)
        wall = time.perf_counter() - self.t0
        text = self.text()
        self.log.unlink()
        return code, wall, text

    def wait_for(self, predicate, what: str, timeout: float = 30, poll: float = 0.01) -> None:
        end = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                pytest.fail(f"the job ended before {what}:\n{self.text()}")
            if time.monotonic() > end:
                self.kill()
                pytest.fail(f"no {what} after {timeout} s:\n{self.text()}")
            time.sleep(poll)

    def ranks(self) -> list[int]:
        """Process ids of the ranks (descendants of mpiexec running ``-m ptmpi``)."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry.name))
        found, todo = [], [self.proc.pid]
        while todo:
            for pid in children.get(todo.pop(), []):
                todo.append(pid)
                try:
                    if "\0-m\0ptmpi\0" in Path(f"/proc/{pid}/cmdline").read_text():
                        found.append(pid)
                except OSError:
                    pass
        return sorted(found)

    def kill(self) -> int:
        """``kill -9`` of the ranks, then of mpiexec; returns mpiexec's status when all are
        gone."""
        pids = self.ranks()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait(timeout=30)
        end = time.monotonic() + 30
        while any(_alive(pid) for pid in pids) and time.monotonic() < end:
            time.sleep(0.01)
        return self.proc.returncode


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def job_case(case, tmp_path_factory):
    """The input, and the volume of an uninterrupted 2-rank job of JOB_ITERATIONS."""
    folder = tmp_path_factory.mktemp("jobs")
    shutil.copy(case, folder / "tiny.h5")
    job = Job(folder, ["-o", "reference.h5", "--iterations", str(JOB_ITERATIONS)])
    code, _, text = job.wait()
    assert code == 0, text
    return folder


def _fresh(job_case: Path, tmp_path: Path) -> tuple[Path, str]:
    shutil.copy(job_case / "tiny.h5", tmp_path / "tiny.h5")
    return tmp_path, digest(tmp_path / "tiny.h5")


def _resume_and_compare(folder: Path, job_case: Path, args: list[str]) -> None:
    """Run ``args`` with --resume to the end: the reference volume, bit for bit."""
    code, wall, text = Job(folder, [*args, "--resume"]).wait()
    assert code == 0, text
    assert wall < 30 and "resuming from" in text and "Traceback" not in text
    assert_same_run(job_case / "reference.h5", folder / "rec.h5")


def test_kill_9_at_a_random_instant_then_resume(job_case, tmp_path):
    folder, input_digest = _fresh(job_case, tmp_path)
    args = ["-o", "rec.h5", "--iterations", str(JOB_ITERATIONS), "--checkpoint", "ck.h5",
            "--checkpoint-every", "4"]
    job = Job(folder, args)
    ck = folder / "ck.h5"
    job.wait_for(ck.exists, "first checkpoint")
    # The pace of the iterations, from the first two checkpoints (each one a new inode),
    # sets the range of the random instant: anywhere in the first half of what is left.
    t_first, first = time.perf_counter(), ck.stat().st_ino
    job.wait_for(lambda: ck.stat().st_ino != first, "second checkpoint")
    per_iteration = (time.perf_counter() - t_first) / 4
    delay = random.uniform(0, per_iteration * (JOB_ITERATIONS - 8) / 2)
    time.sleep(delay)
    assert job.proc.poll() is None, f"the job ended within {delay:.3f} s"
    assert job.kill() == -signal.SIGKILL
    assert time.perf_counter() - job.t0 < 30
    assert "error" not in job.text() and "Traceback" not in job.text()
    assert not (folder / "rec.h5").exists()
    header = read_checkpoint_header(ck)
    assert header.iteration % 4 == 0 and 8 <= header.iteration < JOB_ITERATIONS, delay
    _resume_and_compare(folder, job_case, args)
    assert digest(folder / "tiny.h5") == input_digest
    assert read_checkpoint_header(ck).iteration == JOB_ITERATIONS


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(job_case, tmp_path):
    """A checkpoint every iteration; killed as soon as the temporary file appears."""
    folder, input_digest = _fresh(job_case, tmp_path)
    ck, tmp = folder / "ck.h5", temporary_path(folder / "ck.h5")
    args = ["-o", "rec.h5", "--iterations", str(JOB_ITERATIONS), "--checkpoint", "ck.h5",
            "--checkpoint-every", "1"]
    for _attempt in range(5):
        job = Job(folder, args)
        job.wait_for(ck.exists, "first checkpoint")
        job.wait_for(tmp.exists, "checkpoint write", poll=0.0002)
        assert job.kill() == -signal.SIGKILL
        assert time.perf_counter() - job.t0 < 30
        assert "error" not in job.text() and "Traceback" not in job.text()
        if tmp.exists():  # killed in the middle of a write
            break
        ck.unlink()
    else:
        pytest.fail("no kill landed during a checkpoint write in 5 attempts")
    header = read_checkpoint_header(ck)
    state = read_checkpoint(ck, 0, header.n_frames)
    assert 1 <= header.iteration < JOB_ITERATIONS
    assert state.history["iteration"] == list(range(1, header.iteration + 1))
    assert np.all(np.isfinite(state.z_local)) and np.all(np.isfinite(state.u))
    _resume_and_compare(folder, job_case, args)
    assert not tmp.exists()  # the stale temporary file was written over and renamed
    assert digest(folder / "tiny.h5") == input_digest


@pytest.mark.parametrize("signum,target", [(signal.SIGUSR1, "one rank"),
                                           (signal.SIGTERM, "mpiexec")],
                         ids=["SIGUSR1-to-one-rank", "SIGTERM-to-mpiexec"])
def test_stop_signal_checkpoints_and_exits_75(job_case, tmp_path, signum, target):
    """No --checkpoint: the default name; the ranks agree even if only one was signalled."""
    folder, input_digest = _fresh(job_case, tmp_path)
    args = ["-o", "rec.h5", "--iterations", str(JOB_ITERATIONS)]
    job = Job(folder, args)
    job.wait_for(lambda: "iteration 1/" in job.text(), "first iteration")
    ranks = job.ranks()
    assert len(ranks) == 2
    os.kill(ranks[-1] if target == "one rank" else job.proc.pid, signum)
    code, wall, text = job.wait()
    assert code == EXIT_CHECKPOINTED == 75, text
    assert wall < 30
    found = re.findall(rf"ptmpi reconstruct: {signum.name}: checkpointed at iteration (\d+) in "
                       r"rec-checkpoint.h5; run the same command with --resume to continue "
                       r"\(exit status 75\)\n", text)
    assert len(found) == 1, text
    assert "error" not in text and "Traceback" not in text
    iteration = int(found[0])
    assert 1 <= iteration < JOB_ITERATIONS
    assert read_checkpoint_header(folder / "rec-checkpoint.h5").iteration == iteration
    assert not (folder / "rec.h5").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["rec-checkpoint.h5", "tiny.h5"]
    _resume_and_compare(folder, job_case, args)
    assert digest(folder / "tiny.h5") == input_digest
