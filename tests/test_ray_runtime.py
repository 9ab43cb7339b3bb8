"""The private Ray instance: lean, on loopback, and left with no references alive."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run_script(body: str) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh interpreter (Ray ends a process it considers broken)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(body)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_no_object_reference_outlives_the_build_session(tmp_path):
    # A build shuts its Ray down in the background while it writes its
    # outputs. An ObjectRef released during that shutdown makes Ray end the
    # whole process ("The core worker has already been shutdown"), which is
    # what happened while the shard loop's references lived until
    # run_shards returned. So: none may be alive when the session ends.
    result = _run_script(
        f"""
        import contextlib
        from pathlib import Path
        import ray
        import pipeline.build.scheduler as scheduler
        from alexpipe.sample import SampleConfig, write_sample
        from pipeline.build.job import build_shards
        from pipeline.build.config import BuildConfig

        session = scheduler.ray_session
        alive_at_exit = []

        @contextlib.contextmanager
        def observed_session(*args, **kwargs):  # the real session, looked into
            with session(*args, **kwargs) as cpus:
                yield cpus
                counts = ray._private.worker.global_worker.core_worker.get_all_reference_counts()
                alive_at_exit.append(sum(count["local"] for count in counts.values()))

        scheduler.ray_session = observed_session
        root = Path({str(tmp_path)!r})
        sample = write_sample(
            SampleConfig(out=root / "src", classes=2, train_per_class=6, val_per_class=2,
                         image_scale=0.2)
        )
        for run in range(2):
            out = root / f"out{{run}}"
            build_shards(BuildConfig(src=sample.out, out=out, shard_size=2, progress=False))
            print("built", run, flush=True)
        print("references alive at the end of each session:", alive_at_exit)
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [
        "built 0",
        "built 1",
        "references alive at the end of each session: [0, 0]",
    ]


def test_the_local_head_runs_without_monitors_and_listens_on_loopback():
    result = _run_script(
        """
        import subprocess
        from pipeline.build.ray_runtime import ray_session

        with ray_session(None, 1):
            import os
            daemons = subprocess.run(
                ["ps", "-ww", "-o", "args=", "--ppid", str(os.getpid())],
                capture_output=True, text=True,
            ).stdout
            loopback = "--node-ip-address=127.0.0.1" in daemons
            print("monitor" in daemons, "gcs_server" in daemons, loopback)
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # No autoscaler monitor nor log monitor; the GCS is there, on loopback.
    assert result.stdout.split() == ["False", "True", "True"]
