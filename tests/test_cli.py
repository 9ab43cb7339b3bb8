"""The CLI's contract: every command explains itself, bad input is one line."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner

from alexpipe.cli import COMMAND_MODULES, cli


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_every_command_of_the_spec_is_registered_and_has_help():
    result = run("--help")
    assert result.exit_code == 0
    for name in COMMAND_MODULES:
        assert name in result.output
        help_result = run(name, "--help")
        assert help_result.exit_code == 0, name
        assert "Usage: " in help_result.output and len(help_result.output.splitlines()) > 3


def _bad_invocations(tmp_path):
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("not a directory")
    missing = str(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    out = str(tmp_path / "o")
    return {
        "unknown command": ["frobnicate"],
        "doctor: unknown option": ["doctor", "--bogus"],
        "sample: unknown layout": ["sample", "--out", str(tmp_path / "s"), "--layout", "zip"],
        "sample: out is a file": ["sample", "--out", str(a_file)],
        "sample: no classes": ["sample", "--out", str(tmp_path / "s2"), "--classes", "0"],
        "build: missing src": ["build-shards", "--src", missing, "--out", str(tmp_path / "o")],
        "build: src is a file": [
            "build-shards",
            "--src",
            str(a_file),
            "--out",
            str(tmp_path / "o"),
        ],
        "build: empty src": ["build-shards", "--src", str(empty), "--out", str(tmp_path / "o")],
        "build: no --src": ["build-shards", "--out", str(tmp_path / "o")],
        "build: wrong layout": ["build-shards", "--src", str(empty), "--out", "x", "--layout", "y"],
        "build: bad splits": ["build-shards", "--src", str(empty), "--out", "x", "--splits", "dev"],
        "build: bad address": ["build-shards", "--src", str(empty), "--out", out, "--address", "x"],
        "build: unreachable cluster": [
            "build-shards",
            "--src",
            str(empty),
            "--out",
            out,
            "--address",
            f"127.0.0.1:{closed_port}",
        ],
        "verify: missing dir": ["verify", missing],
        "verify: not shards": ["verify", str(empty)],
        "stats: missing dir": ["stats", missing],
        "stats: a file": ["stats", str(a_file)],
        "preview: not shards": ["preview", str(empty), "--out", str(tmp_path / "g.png")],
        "bench-loader: missing": ["bench-loader", "--shards", missing],
        "bench-loader: backend": ["bench-loader", "--shards", str(empty), "--backend", "x"],
        "train: missing shards": ["train", "--shards", missing, "--out", str(tmp_path / "r")],
        "train: not shards": ["train", "--shards", str(empty), "--out", str(tmp_path / "r")],
        "train: bad batch": ["train", "--shards", str(empty), "--out", "r", "--batch-size", "0"],
        "eval: missing checkpoint": ["eval", "--shards", str(empty), "--checkpoint", missing],
        "demo: workdir is a file": ["demo", "--workdir", str(a_file)],
    }


def test_bad_invocations_give_one_line_and_nonzero_exit(tmp_path):
    for name, args in _bad_invocations(tmp_path).items():
        result = run(*args)
        assert result.exit_code != 0, f"{name}: exit 0\n{result.output}"
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1, f"{name}: {len(lines)} lines:\n{result.output}"
        assert lines[0].startswith("alexpipe: error: "), f"{name}: {lines[0]}"
        assert "Traceback" not in result.output, name


def test_console_script_prints_to_stderr_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "alexpipe.cli", "verify", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("alexpipe: error: ") and result.stderr.count("\n") == 1


def test_verbose_shows_the_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "alexpipe.cli", "--verbose", "verify", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "Traceback" in result.stderr


@pytest.mark.parametrize("args", [["doctor"]])
def test_doctor_reports_pillow_simd_and_dependencies(args):
    result = run(*args)
    assert result.exit_code == 0, result.output
    report = dict(line.split(":", 1) for line in result.output.splitlines())
    report = {key.strip(): value.strip() for key, value in report.items()}
    assert report["PIL"].startswith("Pillow-SIMD") and "SIMD on" in report["PIL"]
    for name in ("torch", "DALI", "ray", "webdataset", "numpy", "cpu"):
        assert not report[name].startswith("NOT AVAILABLE"), report[name]
