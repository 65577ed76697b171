"""A real, private SLURM cluster on this machine for tests: munged, slurmctld and two slurmd as plain processes.

Both nodes (node1, node2) run on this host (the Debian build supports multiple slurmd per host) with
their own spool directories and ports; jobs see distinct SLURMD_NODENAME, SLURM_NODEID and
SLURM_PROCID exactly as on two machines. Everything lives in one scratch directory; the daemons are
stopped through their pid files.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "libpmix-dev")
"""Debian packages the cluster needs: SLURM 22.05, MUNGE, and PMIx for `srun --mpi=pmix` (SLURM loads libpmix.so)."""
NODES = ("node1", "node2")
CPUS_PER_NODE = 2
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}
REQUIRED_PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "srun")
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


class SlurmClusterError(RuntimeError):
    pass


def ensure_packages() -> None:
    """Install missing Debian packages (as root, with apt-get), or fail saying what is missing and how to install it."""
    install = ["apt-get", "install", "-y", "--no-install-recommends", *APT_PACKAGES]
    if shutil.which("dpkg-query") is None:
        missing = [p for p in REQUIRED_PROGRAMS if shutil.which(p, path=SBIN_PATH) is None]
        if missing:
            raise SlurmClusterError(f"SLURM/MUNGE programs {missing} not found; on Debian/Ubuntu: {' '.join(install)}")
        return
    missing = [p for p in APT_PACKAGES
               if subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True).stdout
               != "install ok installed"]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmClusterError(f"Debian packages {missing} are not installed; as root run: {' '.join(install)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "--no-install-recommends", *missing]):
        result = subprocess.run(step, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SlurmClusterError(f"{' '.join(step)} failed ({result.returncode}):\n{result.stderr[-2000:]}")


def free_ports(count: int) -> list[int]:
    """Distinct TCP ports free right now (bound together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def parse_record(line: str) -> dict[str, str]:
    """One `scontrol show ... -o` line as a dict of its KEY=VALUE fields (a value with spaces keeps its first word)."""
    record = {}
    for item in line.split():
        key, sep, value = item.partition("=")
        if sep:
            record[key] = value
    return record


def _sbin(program: str) -> str:
    path = shutil.which(program, path=SBIN_PATH)
    if path is None:
        raise SlurmClusterError(f"{program} not found")
    return path


class SlurmCluster:
    """Start with `start()`, submit jobs, `stop()` at the end. All paths live under `root`."""

    def __init__(self, root: Path, nodes: Sequence[str] = NODES, cpus_per_node: int = CPUS_PER_NODE) -> None:
        self.root = Path(root)
        self.nodes = tuple(nodes)
        self.cpus_per_node = cpus_per_node
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_dir = Path(tempfile.mkdtemp(prefix="moelora-munge-"))
        """Outside `root`: munged needs every directory above its socket to be searchable by all."""
        self.munge_socket = self.munge_dir / "munge.socket"
        self.log_dir = self.root / "log"
        self.pid_dir = self.root / "run"
        self._processes: dict[str, subprocess.Popen] = {}

    # -- configuration -------------------------------------------------------------------------------
    def slurm_conf(self, ctld_port: int, node_ports: Sequence[int]) -> str:
        host = socket.gethostname()
        lines = [
            "ClusterName=moelora-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            # cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            "CredType=cred/munge",
            "AuthType=auth/munge",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill",
            # Pending jobs that become eligible later (a requeued job) are started within a second, not a minute.
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            "ReturnToService=2",
            "MinJobAge=300",
            "KillWait=5",
            "InactiveLimit=0",
            "JobRequeue=1",
            # Job ids (and so the MASTER_PORTs derived from them) differ between concurrent test sessions.
            f"FirstJobId={random.randrange(1000, 9000)}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool' / '%n'}",
            f"TmpFS={self.root / 'tmpfs' / '%n'}",
            f"SlurmctldPidFile={self.pid_dir / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.pid_dir / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.log_dir / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for node, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus_per_node} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    @property
    def env(self) -> dict[str, str]:
        """The caller's environment pointed at this cluster (SLURM_CONF), with the sbin programs on PATH."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
        return env

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        """Write the configuration, start munged, slurmctld and one slurmd per node, wait until all nodes are idle."""
        ensure_packages()
        for sub in ("etc", "state", "log", "run", "spool", "tmpfs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(exist_ok=True)
            (self.root / "tmpfs" / node).mkdir(exist_ok=True)
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        self.conf.write_text(self.slurm_conf(ctld_port, node_ports))
        key = self.munge_dir / "munge.key"
        self.munge_dir.chmod(0o755)
        result = subprocess.run([_sbin("mungekey"), "--create", f"--keyfile={key}"], capture_output=True, text=True)
        if result.returncode != 0:
            raise SlurmClusterError(f"mungekey failed: {result.stderr.strip()}")
        self._spawn("munged", [_sbin("munged"), "--foreground", f"--key-file={key}", f"--socket={self.munge_socket}",
                               f"--pid-file={self.pid_dir / 'munged.pid'}", f"--log-file={self.log_dir / 'munged.log'}",
                               f"--seed-file={self.munge_dir / 'munged.seed'}"])
        self._wait_for_path(self.munge_socket, "munged", timeout)
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-f", str(self.conf)])
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", [_sbin("slurmd"), "-D", "-f", str(self.conf), "-N", node])
        self.wait_idle(timeout)

    def _spawn(self, name: str, command: list[str]) -> None:
        """Start a daemon in the foreground (so this process reaps it); it writes its own pid file."""
        with open(self.log_dir / f"{name}.stderr", "w") as stderr:
            self._processes[name] = subprocess.Popen(command, env=self.env, stdin=subprocess.DEVNULL,
                                                     stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)

    def _check_alive(self) -> None:
        for name, process in self._processes.items():
            if process.poll() is not None:
                raise SlurmClusterError(f"{name} exited with {process.returncode}\n{self.logs_tail()}")

    def _wait_for_path(self, path: Path, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"{what} did not create {path} within {timeout:.0f}s\n{self.logs_tail()}")
            time.sleep(0.05)

    def wait_idle(self, timeout: float) -> None:
        """Poll `sinfo` until every node is idle."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            self._check_alive()
            result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
            if result.returncode == 0:
                states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
                if all(states.get(node) == "idle" for node in self.nodes):
                    return
            time.sleep(0.1)
        raise SlurmClusterError(f"nodes not idle after {timeout:.0f}s: {states}\n{self.logs_tail()}")

    def stop(self) -> None:
        """SIGTERM slurmd, slurmctld and munged (pids from their pid files), in that order, and reap each."""
        for name in [f"slurmd-{node}" for node in self.nodes] + ["slurmctld", "munged"]:
            process = self._processes.pop(name, None)
            if process is None:
                continue
            try:
                pid = int((self.pid_dir / f"{name}.pid").read_text().split()[0])
            except (FileNotFoundError, ValueError, IndexError):
                pid = process.pid
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.munge_dir, ignore_errors=True)

    def logs_tail(self, lines: int = 20) -> str:
        parts = []
        for log in sorted(self.log_dir.iterdir()) if self.log_dir.is_dir() else []:
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(parts)

    # -- jobs -----------------------------------------------------------------------------------------
    def submit(self, script: str | Path, args: Sequence[str] = (), env: Optional[Mapping[str, str]] = None,
               options: Sequence[str] = (), cwd: Optional[Path] = None) -> int:
        """`sbatch [options] script [args]` with `env` (merged over the cluster's); returns the job id."""
        result = subprocess.run(["sbatch", "--parsable", *options, str(script), *args],
                                env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True)
        if result.returncode != 0:
            raise SlurmClusterError(f"sbatch failed ({result.returncode}): {result.stderr.strip()}")
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o JOBID` as a dict (JobState, ExitCode, NodeList, Restarts, ...)."""
        result = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], env=self.env, capture_output=True,
                                text=True)
        if result.returncode != 0:
            raise SlurmClusterError(f"scontrol show job {job_id} failed: {result.stderr.strip()}")
        return parse_record(result.stdout)

    def wait(self, job_id: int, timeout: float, poll: float = 0.25) -> dict[str, str]:
        """Poll until the job reaches a terminal state; returns its final record."""
        deadline = time.monotonic() + timeout
        record = self.job(job_id)
        while record.get("JobState") not in TERMINAL_STATES:
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"job {job_id} still {record.get('JobState')} after {timeout:.0f}s: {record}")
            time.sleep(poll)
            record = self.job(job_id)
        return record

    def wait_for(self, predicate, timeout: float, what: str, poll: float = 0.2) -> None:
        """Poll `predicate()` until it is true."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(poll)

    def command(self, *args: str) -> str:
        """Run a SLURM client command against this cluster; returns stdout, raises with stderr on failure."""
        result = subprocess.run(list(args), env=self.env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SlurmClusterError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

