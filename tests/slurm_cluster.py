"""A throw-away one-node SLURM cluster on localhost (munged + slurmctld + slurmd) for the tests.

Written by hand because no library starts a SLURM cluster: Debian's ``slurm-wlm`` and ``munge``
packages provide the daemons, and this module writes the smallest ``slurm.conf`` that works in a
container. Choices that matter (found on the sandbox this was written on):

- ``ProctrackType=proctrack/linuxproc`` and ``TaskPlugin=task/none``: no cgroups in a container.
- No accounting (``accounting_storage/none``): ``sacct`` then reports accounting disabled and the
  executor plugin's default status query hangs, so the test profile sets ``slurm-status-command:
  squeue`` and ``slurm-no-account: true``. ``MinJobAge`` keeps finished jobs visible to ``squeue``
  far longer than the plugin's status-check delay, or a finished job would look lost.
- The config lives at ``/etc/slurm/slurm.conf``: the job-step executor strips ``SLURM_*`` variables
  before calling ``srun``, so a ``SLURM_CONF`` pointing elsewhere never reaches it.

Only processes started here are stopped, by PID; an already running cluster is reused untouched.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SLURM_CONF = Path("/etc/slurm/slurm.conf")
MUNGE_SOCKET_DIR = Path("/run/munge")
MARKER = "# written by tests/slurm_cluster.py (HemExp one-node test cluster)"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "srun")
PARTITION = "debug"
MIN_JOB_AGE_S = 900  # >> the status-check delay the tests use (seconds)


class ClusterUnavailable(RuntimeError):
    """SLURM cannot be provided here; the message says why (a skip reason outside CI)."""


@dataclass
class SlurmCluster:
    """A running one-node cluster; ``started`` holds only the daemons this module launched."""

    node: str
    cpus: int
    mem_mb: int
    state_dir: Path
    started: list[subprocess.Popen] = field(default_factory=list)
    conf_backup: Path | None = None
    wrote_conf: bool = False

    def stop(self) -> None:
        """Cancel leftover jobs of a cluster we own, stop our daemons by PID, restore the config."""
        if self.started:
            subprocess.run(["scancel", "--partition", PARTITION], capture_output=True, timeout=30)
        for proc in reversed(self.started):  # slurmd, slurmctld, then munged
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self.started.clear()
        if self.wrote_conf:
            SLURM_CONF.unlink(missing_ok=True)
            if self.conf_backup is not None:
                self.conf_backup.replace(SLURM_CONF)


def _missing_binaries() -> list[str]:
    return [b for b in DAEMONS if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_installed() -> None:
    """Install Debian's slurm-wlm and munge when absent (root + apt-get), else raise ClusterUnavailable."""
    if not _missing_binaries():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ClusterUnavailable(f"SLURM binaries {_missing_binaries()} missing and apt-get as root is not possible")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if out.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(cmd)} failed: {out.stderr.strip()[-500:]}")
    if _missing_binaries():
        raise ClusterUnavailable(f"still missing after apt-get install: {_missing_binaries()}")


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def node_state() -> str | None:
    """State of the first node as ``sinfo`` reports it, or None when no controller answers."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.split()
    return lines[0].rstrip("*~#") if out.returncode == 0 and lines else None


def _memory_mb() -> int:
    """Physical memory in MB, as slurmd would detect it (from /proc/meminfo)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise ClusterUnavailable("cannot read MemTotal from /proc/meminfo")


def slurm_conf_text(node: str, cpus: int, mem_mb: int, state_dir: Path) -> str:
    """The one-node ``slurm.conf`` (see the module docstring for why each non-default line is there)."""
    return f"""{MARKER}
ClusterName=hemexp-test
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmdParameters=config_overrides
SlurmctldPidFile={state_dir}/slurmctld.pid
SlurmdPidFile={state_dir}/slurmd.pid
SlurmdSpoolDir={state_dir}/slurmd
StateSaveLocation={state_dir}/slurmctld
SlurmctldLogFile={state_dir}/slurmctld.log
SlurmdLogFile={state_dir}/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge={MIN_JOB_AGE_S}
InactiveLimit=0
KillWait=5
Waittime=0
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _munge_works() -> bool:
    try:
        enc = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        dec = subprocess.run(["unmunge"], input=enc.stdout, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return enc.returncode == 0 and dec.returncode == 0


def _start(cmd: list[str], log: Path, **kwargs) -> subprocess.Popen:
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kwargs)


def _wait(predicate, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        dead = [p.args[0] for p in cluster.started if p.poll() is not None]
        if dead:
            break
        time.sleep(0.5)
    logs = "".join(f"\n--- {p.name} ---\n{p.read_text()[-2000:]}" for p in sorted(cluster.state_dir.glob("*.log")))
    cluster.stop()
    raise ClusterUnavailable(f"{what} did not come up within {timeout:.0f} s{logs}")


def start_cluster(state_dir: Path) -> SlurmCluster:
    """Start (or reuse) a one-node cluster whose state and logs live under ``state_dir``."""
    ensure_installed()
    node = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    mem_mb = int(_memory_mb() * 0.8)
    cluster = SlurmCluster(node=node, cpus=cpus, mem_mb=mem_mb, state_dir=state_dir)
    if node_state() in ("idle", "mixed", "allocated"):
        return cluster  # someone else's cluster (e.g. a CI step): use it, stop nothing
    if os.geteuid() != 0:
        raise ClusterUnavailable("starting slurmctld/slurmd needs root")
    for sub in ("slurmd", "slurmctld"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)
    if not _munge_works():
        MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
        cluster.started.append(_start([_sbin("munged"), "-F"], state_dir / "munged.log", user="munge", group="munge"))
        _wait(_munge_works, 30, "munged", cluster)
    if SLURM_CONF.exists() and MARKER not in SLURM_CONF.read_text():
        cluster.conf_backup = SLURM_CONF.with_name("slurm.conf.hemexp-backup")
        SLURM_CONF.replace(cluster.conf_backup)
    SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SLURM_CONF.write_text(slurm_conf_text(node, cpus, mem_mb, state_dir))
    cluster.wrote_conf = True
    cluster.started.append(_start([_sbin("slurmctld"), "-D", "-i"], state_dir / "slurmctld.out"))
    cluster.started.append(_start([_sbin("slurmd"), "-D"], state_dir / "slurmd.out"))
    _wait(lambda: node_state() == "idle", 90, "the SLURM node", cluster)
    return cluster
