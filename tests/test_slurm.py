"""SLURM: the ``jobs/`` templates on a real one-node SLURM, the srun trap, GPU choice.

The SLURM tests start a private one-node cluster on loopback for the session
(:mod:`slurm_cluster`: its own munged, slurmctld and slurmd, MpiDefault=pmi2, which pip's
MPICH speaks) and skip, saying why, where SLURM and MUNGE are not installed or the tests do
not run as root. The plain-bash run of the template and the unit tests run everywhere.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
from slurm_cluster import FINAL_STATES, SlurmCluster, missing_reason

from ptmpi import backend
from ptmpi.cli import main
from ptmpi.parallel import SerialComm, get_comm
from ptmpi.parallel.comm import check_launcher, check_slurm_step

JOBS = Path(__file__).resolve().parents[1] / "jobs"
PTMPI = f"{sys.executable} -m ptmpi"
#: Iterations of the run that is interrupted and resumed (a few seconds on 2 ranks).
N_LONG = 300
#: Variables of launchers and allocations that must not reach a run "outside SLURM".
LAUNCHER_VARS = ("PMI_", "PMIX_", "OMPI_", "HYD", "MPI_LOCAL", "SLURM_", "SBATCH_", "SRUN_",
                 "SALLOC_")

def job_env(base: dict | None = None, **extra: str) -> dict:
    """Environment for a job: no launcher variables, ptmpi from this interpreter."""
    env = {k: v for k, v in (base or os.environ).items()
           if not k.startswith(LAUNCHER_VARS) or k == "SLURM_CONF"}
    env.update(PTMPI_CMD=PTMPI, PATH=os.path.dirname(sys.executable) + os.pathsep
               + env.get("PATH", ""), MPIR_CVAR_ENABLE_HEAVY_YIELD="1")
    env.update(extra)
    return env


def read_output(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {"volume": f["entry_1/image_1/data"][...],
                "probe": f["entry_1/image_2/data"][...],
                "n_ranks": int(f["entry_1/process_1/n_ranks"][()]),
                "iterations": f["entry_1/ptmpi/metrics/iteration"][...]}


def assert_valid_output(path: Path, ranks: int, iterations: int) -> dict:
    assert path.exists(), f"{path} not written"
    info = subprocess.run([sys.executable, "-m", "ptmpi", "info", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stdout + info.stderr
    out = read_output(path)
    assert out["n_ranks"] == ranks
    assert out["iterations"][-1] == iterations
    return out


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Path:
    """A tiny simulated input (12 x 16 x 16 volume, 6 angles, 120 frames)."""
    path = tmp_path_factory.mktemp("slurm-case") / "in.h5"
    assert main(["simulate", "-o", str(path), "--n", "16", "--nz", "12", "--angles", "6",
                 "--step", "4", "--probe-size", "8", "--fwhm", "3"]) == 0
    return path


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def run_plain(template: str, folder: Path, case: Path, args: str, **extra: str):
    """``bash jobs/<template>`` outside SLURM; the completed process (output in stdout)."""
    env = job_env(PTMPI_INPUT=str(case), PTMPI_OUTPUT=str(folder / "out.h5"),
                  PTMPI_ARGS=args, **{"PTMPI_RANKS": "2", **extra})
    return subprocess.run(["bash", str(JOBS / template)], cwd=folder, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def plain_run(case, tmp_path_factory):
    """The CPU template as plain bash (mpiexec, 2 ranks), N_LONG iterations, uninterrupted."""
    folder = tmp_path_factory.mktemp("plain")
    proc = run_plain("cpu.sbatch", folder, case, f"--iterations {N_LONG} --tol 0 --no-figures")
    return folder / "out.h5", proc


def submit(cluster: SlurmCluster, folder: Path, case: Path, args: str, **extra: str) -> str:
    """``sbatch`` the CPU template with 2 tasks; the job id."""
    env = job_env(cluster.env, PTMPI_INPUT=str(case), PTMPI_OUTPUT=str(folder / "out.h5"),
                  PTMPI_ARGS=args, **extra)
    r = cluster.run("sbatch", "--parsable", "--ntasks=2", "--cpus-per-task=1", "--time=10",
                    f"--output={folder}/job-%j.out", str(JOBS / "cpu.sbatch"),
                    cwd=folder, env=env)
    return r.stdout.strip().split(";")[0]


def job_log(folder: Path, job_id: str) -> str:
    path = folder / f"job-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else "(no job output)"


# ---------------------------------------------------------------------------- SLURM


@pytest.mark.slow
def test_sbatch_cpu_template_runs_on_two_ranks(cluster, case, tmp_path):
    job = submit(cluster, tmp_path, case, "--iterations 10 --no-figures")
    info = cluster.wait_job(job, timeout=240)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert "2 tasks on localhost" in log and "srun" in log
    assert_valid_output(tmp_path / "out.h5", ranks=2, iterations=10)


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes_to_the_same_result(cluster, case, plain_run,
                                                                  tmp_path):
    ref, proc = plain_run
    assert proc.returncode == 0, proc.stdout
    ckpt = tmp_path / "out-checkpoint.h5"
    # --checkpoint-every 0: the only checkpoint is the one the signal asks for.
    job = submit(cluster, tmp_path, case, f"--iterations {N_LONG} --tol 0 --no-figures",
                 PTMPI_CHECKPOINT_EVERY="0")
    # Signal once the ranks iterate (what --signal=USR1@T does before the time limit).
    deadline = time.monotonic() + 180
    while f"iteration 1/{N_LONG}:" not in job_log(tmp_path, job):
        state = cluster.job(job).get("JobState")
        assert state not in FINAL_STATES, job_log(tmp_path, job)
        assert time.monotonic() < deadline, f"not iterating: {job_log(tmp_path, job)}"
        time.sleep(0.1)
    assert not ckpt.exists()
    cluster.run("scancel", "--signal=USR1", job)
    info = cluster.wait_job(job, timeout=300)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert info["Restarts"] == "1", log
    stopped = re.search(r"SIGUSR1: checkpointed at iteration (\d+)", log)
    assert stopped and int(stopped.group(1)) < N_LONG, log
    assert f"requeued job {job}" in log
    assert f"resuming from {ckpt} at iteration {stopped.group(1)}" in log
    out = assert_valid_output(tmp_path / "out.h5", ranks=2, iterations=N_LONG)
    expected = read_output(ref)
    np.testing.assert_array_equal(out["volume"], expected["volume"])
    np.testing.assert_array_equal(out["probe"], expected["probe"])


@pytest.mark.slow
def test_scancel_stops_without_requeue(cluster, case, tmp_path):
    job = submit(cluster, tmp_path, case, f"--iterations {N_LONG} --tol 0 --no-figures",
                 PTMPI_CHECKPOINT_EVERY="0")
    deadline = time.monotonic() + 180
    while f"iteration 1/{N_LONG}:" not in job_log(tmp_path, job):
        assert cluster.job(job).get("JobState") not in FINAL_STATES, job_log(tmp_path, job)
        assert time.monotonic() < deadline, f"not iterating: {job_log(tmp_path, job)}"
        time.sleep(0.1)
    cluster.run("scancel", job)
    info = cluster.wait_job(job, timeout=120)
    time.sleep(2)  # the batch shell may still be writing its last lines
    log = job_log(tmp_path, job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", log
    assert "requeued" not in log
    assert cluster.job(job)["JobState"] == "CANCELLED"


@pytest.mark.slow
def test_srun_without_mpi_plugin_is_refused_but_serial_batch_calls_are_not(cluster, case,
                                                                           tmp_path):
    script = tmp_path / "trap.sh"
    script.write_text(f"""#!/bin/bash
{PTMPI} info {case} > /dev/null; echo "serial=$?"
srun --mpi=pmi2 {PTMPI} info {case} > /dev/null; echo "pmi2=$?"
srun --mpi=none {PTMPI} info {case}; echo "none=$?"
""")
    r = cluster.run("sbatch", "--parsable", "--ntasks=2", "--time=5",
                    f"--output={tmp_path}/job-%j.out", str(script), cwd=tmp_path,
                    env=job_env(cluster.env))
    job = r.stdout.strip().split(";")[0]
    cluster.wait_job(job, timeout=240)
    log = job_log(tmp_path, job)
    assert "serial=0" in log and "pmi2=0" in log and "none=1" in log, log
    # One line for both tasks (rank 0 speaks).
    assert log.count("srun started 2 tasks (SLURM_STEP_NUM_TASKS=2) but MPI sees a single "
                     "process") == 1, log


# ---------------------------------------------------------------------------- plain bash


@pytest.mark.slow
def test_cpu_template_runs_under_plain_bash_with_mpiexec(plain_run):
    out, proc = plain_run
    assert proc.returncode == 0, proc.stdout
    assert "no SLURM allocation: mpiexec -n 2" in proc.stdout
    assert "--resume" in proc.stdout and "done:" in proc.stdout
    assert_valid_output(out, ranks=2, iterations=N_LONG)


@pytest.mark.slow
def test_plain_bash_forwards_usr1_and_exits_75(case, tmp_path):
    env = job_env(PTMPI_INPUT=str(case), PTMPI_OUTPUT=str(tmp_path / "out.h5"),
                  PTMPI_ARGS=f"--iterations {N_LONG} --tol 0 --no-figures", PTMPI_RANKS="2",
                  PTMPI_CHECKPOINT_EVERY="0")
    log = tmp_path / "log"
    with open(log, "w") as f:
        proc = subprocess.Popen(["bash", str(JOBS / "cpu.sbatch")], cwd=tmp_path, env=env,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while f"iteration 1/{N_LONG}:" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)  # to the script, which passes it on to mpiexec
        assert proc.wait(timeout=120) == 75, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the script, mpiexec and the ranks
            proc.wait()
    text = log.read_text()
    assert "SIGUSR1: checkpointed at iteration" in text
    assert "to continue, run the same job again" in text
    assert (tmp_path / "out-checkpoint.h5").exists() and not (tmp_path / "out.h5").exists()


@pytest.mark.slow
def test_gpu_template_passes_gpu(case, tmp_path):
    proc = run_plain("gpu.sbatch", tmp_path, case, "--iterations 2 --no-figures",
                     PTMPI_RANKS="1")
    assert " reconstruct " in proc.stdout and " --gpu" in proc.stdout, proc.stdout
    if backend.gpu_available():
        assert proc.returncode == 0, proc.stdout
    else:
        assert proc.returncode == 1, proc.stdout
        assert "--gpu was requested but CuPy is not installed or no GPU" in proc.stdout


def test_template_without_input_is_a_usage_error(tmp_path):
    env = job_env()
    env.pop("PTMPI_INPUT", None)
    proc = subprocess.run(["bash", str(JOBS / "cpu.sbatch")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "set PTMPI_INPUT" in proc.stderr


# ---------------------------------------------------------------------------- srun trap


@pytest.fixture
def no_launcher(monkeypatch):
    for key in list(os.environ):
        if key.startswith(LAUNCHER_VARS):
            monkeypatch.delenv(key)
    return monkeypatch


def test_batch_script_environment_runs_serial(no_launcher):
    # What sbatch -n 2 sets in the batch script itself (verified on slurm 22.05): no step.
    no_launcher.setenv("SLURM_JOB_ID", "7")
    no_launcher.setenv("SLURM_NTASKS", "2")
    no_launcher.setenv("SLURM_NPROCS", "2")
    assert type(get_comm()) is SerialComm
    no_launcher.setenv("SLURM_STEP_NUM_TASKS", "1")  # srun -n 1
    assert type(get_comm()) is SerialComm


def test_multi_task_step_without_mpi_is_refused(no_launcher, case, capsys):
    # srun -n 2 --mpi=none: each task sees SLURM_STEP_NUM_TASKS=2 and no PMI variables.
    no_launcher.setenv("SLURM_NTASKS", "2")
    no_launcher.setenv("SLURM_STEP_NUM_TASKS", "2")
    no_launcher.setenv("SLURM_PROCID", "0")
    with pytest.raises(RuntimeError, match=r"srun started 2 tasks .* srun --mpi=pmi2"):
        get_comm()
    assert main(["info", str(case)]) == 1
    assert capsys.readouterr().err.startswith("ptmpi: error: srun started 2 tasks")
    no_launcher.setenv("SLURM_PROCID", "1")  # the other task fails alike, silently
    assert main(["info", str(case)]) == 1
    assert capsys.readouterr().err == ""
    assert type(get_comm(force_serial=True)) is SerialComm


def test_step_check_trusts_a_launcher_that_announces_one_process(no_launcher):
    no_launcher.setenv("SLURM_STEP_NUM_TASKS", "2")
    no_launcher.setenv("PMI_SIZE", "1")  # mpiexec -n 1 inside a two-node step
    check_slurm_step(1)
    no_launcher.setenv("PMI_SIZE", "2")  # srun --mpi=pmi2 but an MPI that ignores PMI-2
    with pytest.raises(RuntimeError, match="MPI sees a single process"):
        check_slurm_step(1)
    check_slurm_step(2)


def test_singletons_under_a_launcher_of_several_processes_are_refused(no_launcher):
    # mpiexec -n 2 of one MPI, mpi4py loading another libmpi: two worlds of one process.
    check_launcher(1)  # no launcher: a plain serial run
    no_launcher.setenv("PMI_SIZE", "1")
    check_launcher(1)
    no_launcher.setenv("PMI_SIZE", "2")
    with pytest.raises(RuntimeError, match="started 2 processes but MPI sees a single"):
        check_launcher(1)
    check_launcher(2)
    no_launcher.delenv("PMI_SIZE")
    no_launcher.setenv("OMPI_COMM_WORLD_SIZE", "4")
    with pytest.raises(RuntimeError, match="started 4 processes"):
        check_launcher(1)


# ---------------------------------------------------------------------------- GPU choice


def fake_cupy(physical: int, used: dict):
    """A CuPy stand-in whose runtime counts CUDA_VISIBLE_DEVICES as CUDA does.

    ``used["physical"]`` gets the physical GPU behind the device a rank selects.
    """
    def visible() -> list[int]:
        cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
        return list(range(physical)) if cvd is None else [int(v) for v in cvd.split(",") if v]

    class Device:
        def __init__(self, i: int):
            if not 0 <= i < len(visible()):
                raise ValueError(f"invalid device ordinal {i}")
            self.i = i

        def use(self):
            used["physical"] = visible()[self.i]

    runtime = types.SimpleNamespace(getDeviceCount=lambda: len(visible()))
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime, Device=Device))


@pytest.mark.parametrize("binding", ["one per task", "all visible", "unset"])
def test_each_local_rank_gets_its_own_gpu(binding, monkeypatch):
    used: dict = {}
    monkeypatch.setattr(backend, "_cupy", lambda: fake_cupy(4, used))
    physical = []
    for local_rank in range(4):
        if binding == "one per task":  # srun --gpus-per-task=1: SLURM binds GPU k to task k
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", str(local_rank))
        elif binding == "all visible":  # --gres=gpu:4 without binding
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
        else:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        backend.select_device(local_rank)
        physical.append(used["physical"])
    assert sorted(physical) == [0, 1, 2, 3]
