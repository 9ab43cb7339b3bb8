"""The processes that run shards while Ray starts: same bytes, each plan once, no orphans."""

from __future__ import annotations

import collections
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alexpipe.sample import SampleConfig, write_sample
from pipeline.build.plan import plan_build
from pipeline.build.shard_task import run_shard, work_dir
from pipeline.build.sources import discover
from pipeline.build.transform import TransformConfig
from pipeline.build.warm_up import RAN_IN_DRIVER, WarmUpProcesses
from shards.errors import UserError


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm-up")
    sample = write_sample(
        SampleConfig(
            out=root / "src", classes=2, train_per_class=6, val_per_class=2, image_scale=0.2
        )
    )
    listing = discover(sample.out, "folder", ("train", "val"))
    return plan_build(listing.items, shard_size=2, seed=0), sample.out


def _hashes(directory: Path) -> dict[str, str]:
    """Shards, indexes and partial statistics (records hold timings, so not those)."""
    return {
        path.relative_to(directory).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and not (path.parent.name == "_work" and path.suffix == ".json")
    }


def _run_to_end(warm_up: WarmUpProcesses) -> list:
    warm_up.start()
    warm_up.join(timeout=120)
    warm_up.stop()
    warm_up.join(timeout=120)
    assert warm_up.error is None
    return list(warm_up.drain())


def test_every_plan_runs_once_with_the_in_process_bytes(plans, tmp_path):
    plan_list, _ = plans
    config = TransformConfig()
    in_process, forked = tmp_path / "in-process", tmp_path / "forked"
    for out in (in_process, forked):
        work_dir(out).mkdir(parents=True)
    for plan in plan_list:
        run_shard(plan, config, in_process)

    queue = collections.deque(plan_list)
    finished = _run_to_end(WarmUpProcesses(queue, config, forked, count=2))

    assert sorted(plan.name for plan, _ in finished) == sorted(p.name for p in plan_list)
    assert not queue
    assert {record["ran_in"] for _, record in finished} == {RAN_IN_DRIVER}
    assert _hashes(forked) == _hashes(in_process)


def test_stopping_leaves_unstarted_plans_for_ray(plans, tmp_path):
    plan_list, _ = plans
    work_dir(tmp_path).mkdir()
    queue = collections.deque(plan_list)
    warm_up = WarmUpProcesses(queue, TransformConfig(), tmp_path, count=1)
    warm_up.start()
    warm_up.stop()
    warm_up.join(timeout=120)
    finished = list(warm_up.drain())
    # One shard was in flight when it stopped; it finished, nothing else ran.
    assert len(finished) == 1
    assert len(queue) == len(plan_list) - 1
    assert finished[0][0].name not in {plan.name for plan in queue}


def test_a_failing_shard_stops_the_warm_up_with_its_error(plans, tmp_path):
    plan_list, _ = plans
    unwritable = tmp_path / "not-a-directory"
    unwritable.write_text("")
    warm_up = WarmUpProcesses(collections.deque(plan_list), TransformConfig(), unwritable, 2)
    warm_up.start()
    warm_up.join(timeout=120)
    warm_up.stop()
    warm_up.join(timeout=120)
    assert isinstance(warm_up.error, OSError)
    assert not list(warm_up.drain())


def test_a_killed_worker_is_one_clear_error(plans, tmp_path):
    plan_list, _ = plans
    work_dir(tmp_path).mkdir()
    warm_up = WarmUpProcesses(collections.deque(plan_list * 20), TransformConfig(), tmp_path, 1)
    before = set(_children(os.getpid()))
    warm_up.start()
    children = set(_children(os.getpid())) - before
    assert children, "the pool did not fork"
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    warm_up.join(timeout=120)
    warm_up.stop()
    warm_up.join(timeout=120)
    assert isinstance(warm_up.error, UserError)
    assert "process died" in str(warm_up.error)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that just ended
            pass
    return found


def _command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def _is_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie no longer runs


def _start_build(src: Path, out: Path) -> tuple[subprocess.Popen, list[int]]:
    """Start a CLI build in its own session; return it once its warm-up processes run."""
    command = [sys.executable, "-m", "alexpipe.cli", "build-shards", "--src", str(src)]
    command += ["--out", str(out), "--workers", "2", "--shard-size", "1"]
    command += ["--no-progress", "--max-rejected", "1"]
    driver = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    own_command = _command_line(driver.pid)
    forks: list[int] = []
    deadline = time.monotonic() + 60
    while not forks and time.monotonic() < deadline and driver.poll() is None:
        forks = [pid for pid in _children(driver.pid) if _command_line(pid) == own_command]
        time.sleep(0.01)
    return driver, forks


def _session(session_id: int) -> list[int]:
    listing = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True)
    pairs = (map(int, line.split()) for line in listing.stdout.splitlines())
    return [pid for pid, sid in pairs if sid == session_id and pid != os.getpid()]


def _end_session(session_id: int) -> None:
    """Ray, if it had started, ends with its driver; clear the session regardless."""
    for pid in _session(session_id):
        os.kill(pid, signal.SIGKILL)


def _wait_until_gone(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not all(_is_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return all(_is_gone(pid) for pid in pids)


def test_killing_the_driver_alone_ends_its_warm_up_processes(plans, tmp_path):
    _, src = plans
    driver, forks = _start_build(src, tmp_path / "out")
    try:
        assert forks, "no warm-up process was seen"
        driver.kill()  # the driver only, not its process group
        driver.wait()
        assert _wait_until_gone(forks, 20), "warm-up processes outlived the driver"
    finally:
        _end_session(driver.pid)


def test_ctrl_c_during_the_warm_up_stops_everything_and_the_rerun_finishes(plans, tmp_path):
    _, src = plans
    out = tmp_path / "out"
    driver, forks = _start_build(src, out)
    try:
        assert forks, "no warm-up process was seen"
        os.killpg(driver.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        assert driver.wait(timeout=60) != 0
        assert _wait_until_gone(_session(driver.pid), 20), "processes outlived Ctrl-C"
    finally:
        _end_session(driver.pid)
    assert not (out / "manifest.json").exists(), "interrupted too late to test"
    rerun = subprocess.run(
        [sys.executable, "-m", "alexpipe.cli", "build-shards", "--src", str(src)]
        + ["--out", str(out), "--shard-size", "1", "--no-progress", "--max-rejected", "1"],
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr
    verify = subprocess.run(
        [sys.executable, "-m", "alexpipe.cli", "verify", str(out)], capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
