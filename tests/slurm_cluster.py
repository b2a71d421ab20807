"""A throw-away one-node SLURM cluster on loopback, for testing the ``jobs/`` templates.

:class:`SlurmCluster` writes a ``slurm.conf`` into a private folder, starts its own
``munged`` (own key and socket), ``slurmctld`` and ``slurmd`` in the foreground as child
processes, and waits until ``sinfo`` shows the node idle. Ports are picked free, and state,
spool, logs and pid files all live in the folder, so it neither reads nor disturbs a SLURM or
MUNGE installed on the machine, and two sessions can run side by side. Client commands
(``sbatch``, ``scontrol``, ...) find it through ``SLURM_CONF`` in :attr:`SlurmCluster.env`.

Needs root (slurmd starts jobs as their submitting user) and Debian's ``slurm-wlm`` and
``munge`` packages (or the same programs from elsewhere on PATH); :func:`missing_reason`
says what is absent.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue",
            "scancel")
#: States after which a job record no longer changes (scontrol show job ``JobState``).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def _which(name: str) -> str | None:
    # The daemons live in /usr/sbin, which a non-login PATH may lack.
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return shutil.which(name, path=path)


def missing_reason() -> str | None:
    """Why a local SLURM cannot be started here (None when it can)."""
    absent = [p for p in PROGRAMS if _which(p) is None]
    if absent:
        return (f"SLURM/MUNGE not installed ({', '.join(absent)} not found; on Debian: "
                "apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        return "a local SLURM (slurmd) needs root"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _real_memory_mb() -> int:
    """Half the machine's memory in MiB (slurmd drains a node that claims more than it has)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return max(256, int(line.split()[1]) // 2048)
    return 1024


def parse_job(text: str) -> dict[str, str]:
    """``Key=Value`` pairs of ``scontrol show job -o`` output (values without spaces)."""
    return dict(re.findall(r"(\w+)=(\S*)", text))


class SlurmCluster:
    """One node ``localhost`` with ``cpus`` CPUs (at least 2), partition ``debug``.

    Parameters
    ----------
    root
        Empty folder for the configuration, state, spool and logs.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.cpus = max(2, len(os.sched_getaffinity(0)))
        self.conf = self.root / "slurm.conf"
        self.logs = self.root / "log"
        self._procs: list[tuple[str, subprocess.Popen]] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for key in list(self.env):  # a surrounding job's variables must not leak in
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and key != "SLURM_CONF":
                del self.env[key]

    # ------------------------------------------------------------------ set-up

    def _write_files(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(128))
        os.chmod(key, 0o600)
        r = self.root
        # cred_expire also sets how long a requeued job waits before it may start again
        # (default 120 s); sched_interval makes the scheduler notice it within seconds.
        self.conf.write_text(f"""\
ClusterName=ptmpitest
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.sock,cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=pmi2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
InactiveLimit=0
KillWait=10
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_real_memory_mb()} \
State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.logs / f"{name}.console", "wb")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self._procs.append((name, proc))

    def start(self, timeout: float = 60.0) -> None:
        """Start munged, slurmctld and slurmd; return when the node is idle."""
        self._write_files()
        m = self.root / "munge"
        self._start("munged", [
            _which("munged"), "--foreground", "--force", f"--socket={m}/munge.sock",
            f"--key-file={m}/munge.key", f"--pid-file={m}/munged.pid",
            f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"])
        self._wait(lambda: (m / "munge.sock").exists(), timeout, "munged socket")
        self._start("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
        self._start("slurmd", [_which("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)])
        self._wait(lambda: self.node_state() == "idle", timeout, "node localhost idle")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [(n, p.returncode) for n, p in self._procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"local SLURM: {dead[0][0]} exited with status "
                                   f"{dead[0][1]} while waiting for {what}\n{self.log_tail()}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"local SLURM: no {what} after {timeout:.0f} s\n{self.log_tail()}")

    # ------------------------------------------------------------------ use

    def run(self, *argv: str, check: bool = True, timeout: float = 60.0,
            **kwargs) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster (text output captured)."""
        return subprocess.run(argv, env=kwargs.pop("env", self.env), capture_output=True,
                              text=True, check=check, timeout=timeout, **kwargs)

    def node_state(self) -> str:
        r = self.run("sinfo", "-h", "-n", "localhost", "-o", "%T", check=False, timeout=20)
        return r.stdout.strip() if r.returncode == 0 else ""

    def job(self, job_id: str) -> dict[str, str]:
        """The job's ``scontrol show job`` fields ({} once the record is gone)."""
        r = self.run("scontrol", "-o", "show", "job", job_id, check=False, timeout=20)
        return parse_job(r.stdout) if r.returncode == 0 else {}

    def wait_job(self, job_id: str, timeout: float) -> dict[str, str]:
        """Poll until the job reaches a final state; its fields then."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in FINAL_STATES:
                return info
            time.sleep(1.0)
        self.run("scancel", job_id, check=False)
        raise TimeoutError(f"job {job_id} not done after {timeout:.0f} s: {info}")

    def log_tail(self, lines: int = 15) -> str:
        out = []
        for path in sorted(self.logs.glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    # ------------------------------------------------------------------ tear-down

    def stop(self) -> None:
        """Cancel every job, wait for them to end, stop the daemons."""
        if any(n == "slurmctld" and p.poll() is None for n, p in self._procs):
            self.run("scancel", "--partition=debug", check=False, timeout=20)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                r = self.run("squeue", "-h", check=False, timeout=20)
                if r.returncode != 0 or not r.stdout.strip():
                    break
                time.sleep(1.0)
        for _name, proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
        for _name, proc in reversed(self._procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._procs.clear()
