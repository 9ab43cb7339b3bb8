"""The benchmark tools run end to end (tiny sizes; speed targets live in `make bench`)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run_tool(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout[result.stdout.index("{") :])


def test_bench_build_compares_three_converters(tmp_path):
    report = _run_tool(
        "tools/bench_build.py",
        "--images",
        "40",
        "--shard-size",
        "10",
        "--work",
        str(tmp_path),
        "--baseline-pil",
        "active",
        "--json",
    )
    for key in ("plain_img_per_s", "bound_img_per_s", "alexpipe_img_per_s"):
        assert report[key] > 0, key
    assert report["alexpipe_vs_plain"] > 0 and report["bound_peak_worker_rss_mb"] > 0


def test_bench_loader_compares_dali_with_webdataset():
    report = _run_tool(
        "tools/bench_loader.py",
        "--images",
        "64",
        "--batch-size",
        "8",
        "--batches",
        "2",
        "--repeats",
        "1",
        "--json",
    )
    text = json.dumps(report)
    assert "dali" in text and "webdataset" in text
