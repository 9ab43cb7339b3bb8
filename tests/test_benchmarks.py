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


def test_bench_build_measures_every_row_at_two_sizes(tmp_path):
    report = _run_tool(
        "tools/bench_build.py",
        "--sizes",
        "20,40",
        "--repeats",
        "1",
        "--rows",
        "plain,pool,ffcv,alexpipe",
        "--plain-pil",
        "active",
        "--ffcv-python",
        str(tmp_path / "no-ffcv" / "python"),
        "--work",
        str(tmp_path),
        "--json",
    )
    # FFCV is not there: its row is skipped, saying so, and the rest goes on
    assert "FFCV is not installed" in report["ffcv_skipped"]
    assert report["rows"] == ["plain", "pool", "alexpipe"]
    corpus = report["corpus"]
    assert corpus["images"] == 40 and corpus["median_kb"] > 10 and corpus["decode_ms"] > 0
    for row in report["rows"]:
        runs = report["repeats"][0][row]
        assert set(runs) == {"20", "40"}, row
        assert all(run["seconds"] > 0 and run["peak_tree_rss_mb"] > 0 for run in runs.values())
        assert len(report["summary"]["rows"][row]["slope_img_per_s"]) == 1
    assert set(report["summary"]["ratios"]) == {"alexpipe_vs_plain", "alexpipe_vs_pool"}
    assert report["stages"]["pixel_stats_add_ms"] > 0
    assert json.loads((tmp_path / "bench_build.json").read_text())["sizes"] == [20, 40]


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
