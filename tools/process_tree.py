"""A subprocess timed from start to exit, with its whole process tree sampled from /proc:
wall and CPU seconds, peak RSS of the largest process and of the tree, CPU and RSS per
kind of process (the driver, each of Ray's daemons, Ray's workers, forks)."""

from __future__ import annotations

import os
import subprocess
import threading
import time


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, by parent pid (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # ended meanwhile
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def _command(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().decode(errors="replace").split("\0")
    except OSError:
        return []


# Ray's processes by their executable or script (workers rename themselves ray::...).
RAY_ROLES = {
    "gcs_server": "ray gcs_server",
    "raylet": "ray raylet",
    "ray::DashboardAgent": "ray dashboard agent",
    "dashboard/agent.py": "ray dashboard agent",
    "ray::RuntimeEnvAgent": "ray runtime-env agent",
    "runtime_env/agent/main.py": "ray runtime-env agent",
    "dashboard/dashboard.py": "ray dashboard head",
    "log_monitor.py": "ray log monitor",
    "autoscaler/_private/monitor.py": "ray autoscaler monitor",
    "default_worker.py": "ray worker",
}


def _role(pid: int, root_pid: int) -> str:
    """What a process of the run is: the driver, a Ray daemon, a worker, ..."""
    if pid == root_pid:
        return "driver"
    command = _command(pid)
    if not command:
        return "gone"
    for word in command[:3]:
        for ending, role in RAY_ROLES.items():
            if word.endswith(ending) or word == ending:
                return role
        if word.startswith("ray::"):
            return "ray worker"
    if command == _command(root_pid):
        return "driver's fork"
    return os.path.basename(command[0])


class TreeSampler(threading.Thread):
    """Samples a process tree's RSS and CPU time (from /proc) until stopped.

    CPU time per role is the sum of each process's last sample: up to
    ``interval`` of a process's life before it exits is missed. (getrusage of
    the reaped children would miss more: Ray's workers outlive their raylet.)
    """

    def __init__(self, root_pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.interval = interval
        self.stopped = threading.Event()
        self.peak_process_mb = 0.0
        self.peak_tree_mb = 0.0
        self.cpu_by_pid: dict[int, tuple[str, float]] = {}
        self.peak_rss_by_role: dict[str, float] = {}  # the largest process of each role
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20

    def run(self) -> None:
        self.sample()
        while not self.stopped.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        tree_mb = 0.0
        for pid in descendants(self.root_pid):
            try:
                with open(f"/proc/{pid}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            rss_mb = int(fields[21]) * self.page_mb
            tree_mb += rss_mb
            self.peak_process_mb = max(self.peak_process_mb, rss_mb)
            role = self.cpu_by_pid.get(pid, (None,))[0] or _role(pid, self.root_pid)
            self.cpu_by_pid[pid] = (role, (int(fields[11]) + int(fields[12])) / self.ticks)
            self.peak_rss_by_role[role] = max(self.peak_rss_by_role.get(role, 0.0), rss_mb)
        self.peak_tree_mb = max(self.peak_tree_mb, tree_mb)

    def cpu_by_role(self) -> dict[str, float]:
        roles: dict[str, float] = {}
        for role, seconds in self.cpu_by_pid.values():
            roles[role] = round(roles.get(role, 0.0) + seconds, 2)
        return roles


def run_timed(command: list[str], environment: dict | None = None) -> dict:
    """Run a converter to completion: wall seconds, CPU seconds, peak RSS."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    sampler = TreeSampler(process.pid)
    sampler.start()
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    sampler.stopped.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed ({process.returncode}): {stderr[-2000:]}")
    return {
        "seconds": round(seconds, 3),
        "cpu_seconds": round(sum(sampler.cpu_by_role().values()), 2),
        "peak_process_rss_mb": round(sampler.peak_process_mb, 1),
        "peak_tree_rss_mb": round(sampler.peak_tree_mb, 1),
        "cpu_by_role": sampler.cpu_by_role(),
        "peak_rss_mb_by_role": {
            role: round(mb, 1) for role, mb in sorted(sampler.peak_rss_by_role.items())
        },
    }
