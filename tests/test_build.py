"""build-shards end to end: real sample data, real Ray (on loopback), real tars."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alexpipe.sample import REJECTED_KINDS, SampleConfig, write_sample
from pipeline.build.config import BuildConfig
from pipeline.build.job import build_shards
from pipeline.build.ray_runtime import ray_session
from shards.reader import iter_shard

ALEXPIPE = [sys.executable, "-m", "alexpipe.cli"]
SAMPLE = dict(classes=3, train_per_class=8, val_per_class=3, image_scale=0.3)


@pytest.fixture(scope="module")
def ray_cluster():
    """One private loopback Ray instance shared by the in-process builds."""
    with ray_session(None, 2):
        yield


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """The same images in all three layouts, plus one with odd files."""
    root = tmp_path_factory.mktemp("samples")
    made = {}
    for layout in ("folder", "tars", "kaggle"):
        made[layout] = write_sample(SampleConfig(out=root / layout, layout=layout, **SAMPLE))
    made["odd"] = write_sample(
        SampleConfig(out=root / "odd", layout="tars", odd_files=True, **SAMPLE)
    )
    return made


def _build(src: Path, out: Path, **options) -> object:
    settings = dict(shard_size=7, progress=False, max_rejected=1.0)
    settings.update(options)
    return build_shards(BuildConfig(src=src, out=out, **settings))


def _file_hashes(directory: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
        if path.is_file()
    }


def _samples_by_split(out: Path) -> dict[str, list[tuple[str, bytes, int]]]:
    manifest = json.loads((out / "manifest.json").read_text())
    result = {}
    for split, entry in manifest["splits"].items():
        rows = []
        for shard in entry["shards"]:
            for key, parts in iter_shard(out / shard["file"]):
                rows.append((key, parts["jpg"], int(parts["cls"])))
        result[split] = sorted(rows)
    return result


def test_three_layouts_give_identical_samples(samples, tmp_path, ray_cluster):
    built = {
        layout: _samples_by_split(_build(samples[layout].out, tmp_path / layout).out)
        for layout in ("folder", "tars", "kaggle")
    }
    assert built["folder"] == built["tars"] == built["kaggle"]
    expected = {(item.split, item.key): item.label for item in samples["tars"].items}
    for split, rows in built["tars"].items():
        assert len(rows) == sum(1 for item in samples["tars"].items if item.split == split)
        for key, _, label in rows:
            assert label == expected[(split, key)], f"{split} {key}: wrong label"


def test_output_is_independent_of_workers_and_reruns(samples, tmp_path, ray_cluster):
    src = samples["tars"].out
    reference = _file_hashes(_build(src, tmp_path / "shared-ray").out)
    rebuilt = _file_hashes(_build(src, tmp_path / "rebuild").out)
    assert rebuilt == reference
    # A separate process with its own one-worker Ray instance.
    out_one = tmp_path / "one-worker"
    subprocess.run(
        [
            *ALEXPIPE,
            "build-shards",
            "--src",
            str(src),
            "--out",
            str(out_one),
            "--workers",
            "1",
            "--shard-size",
            "7",
            "--max-rejected",
            "1",
            "--no-progress",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert _file_hashes(out_one) == reference
    assert {"manifest.json", "stats.json", "mean.npy", "mean.png", "rejected.jsonl"} <= set(
        reference
    )


def test_complete_output_is_not_rebuilt_and_other_settings_are_refused(
    samples, tmp_path, ray_cluster
):
    out = tmp_path / "out"
    _build(samples["folder"].out, out)
    again = _build(samples["folder"].out, out)
    assert again.already_complete
    from shards.errors import UserError

    with pytest.raises(UserError, match="other settings"):
        _build(samples["folder"].out, out, quality=80)


def test_every_input_lands_in_a_shard_or_rejected(samples, tmp_path, ray_cluster):
    sample = samples["odd"]
    out = _build(sample.out, tmp_path / "odd").out
    stored = _samples_by_split(out)
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    rejected_keys = {Path(row["source"].split("/")[-1]).stem: row for row in rejected}
    for item in sample.items:
        in_shards = [key for key, _, _ in stored[item.split] if key == item.key]
        if item.kind in REJECTED_KINDS:
            assert not in_shards and item.key in rejected_keys, item
        else:
            assert len(in_shards) == 1 and item.key not in rejected_keys, item
    reasons = {sample.odd_files[key]: row["reason"] for key, row in rejected_keys.items()}
    assert reasons == {"truncated-jpeg": "truncated image", "zero-bytes": "empty file"}
    # Every stored image is a 256x256 RGB baseline JPEG, odd inputs included.
    metas = {}
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            for key, parts in iter_shard(out / shard["file"]):
                image = Image.open(io.BytesIO(parts["jpg"]))
                assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (256, 256))
                assert not image.info.get("progressive")
                metas[key] = json.loads(parts["json"])
    odd_repairs = {
        kind: metas[key]["repairs"] for key, kind in sample.odd_files.items() if key in metas
    }
    assert "png-content" in " ".join(odd_repairs["png-as-jpeg"])
    assert any("cmyk" in repair for repair in odd_repairs["cmyk-jpeg"])
    assert odd_repairs["grayscale-jpeg"] and odd_repairs["palette-png"]
    assert any("16" in repair for repair in odd_repairs["16bit-png"])
    assert manifest["splits"]["train"]["num_rejected"] == 2


def test_statistics_equal_an_independent_computation(samples, tmp_path, ray_cluster):
    out = _build(samples["folder"].out, tmp_path / "stats").out
    manifest = json.loads((out / "manifest.json").read_text())
    images = []
    for shard in manifest["splits"]["train"]["shards"]:
        for _, parts in iter_shard(out / shard["file"]):
            images.append(np.asarray(Image.open(io.BytesIO(parts["jpg"])).convert("RGB")))
    stack = np.stack(images).astype(np.float64)
    pixels = stack.reshape(-1, 3)
    covariance = np.cov(pixels, rowvar=False, bias=True)
    eigvals, eigvecs = np.linalg.eigh(covariance)
    eigvals, eigvecs = eigvals[::-1], eigvecs[:, ::-1]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_images"] == len(images)
    assert stats["num_pixels"] == pixels.shape[0]
    np.testing.assert_allclose(stats["mean_rgb"], pixels.mean(axis=0), atol=0.5)
    np.testing.assert_allclose(stats["std_rgb"], pixels.std(axis=0), rtol=0.01)
    np.testing.assert_allclose(stats["eigvals"], eigvals, rtol=0.03)
    cosines = np.abs(np.sum(np.asarray(stats["eigvecs"]) * eigvecs, axis=0))
    assert cosines.min() >= 0.999
    mean_image = np.load(out / "mean.npy")
    assert mean_image.dtype == np.float32 and mean_image.shape == (256, 256, 3)
    assert np.abs(mean_image - stack.mean(axis=0)).mean() <= 1.0


def _session_processes(session_id: int) -> list[int]:
    """Process ids in a session we created (the killed build and what it started)."""
    listing = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    return [
        int(pid)
        for pid, sid in (line.split() for line in listing.splitlines())
        if int(sid) == session_id
    ]


def test_kill_minus_nine_then_rerun_is_byte_identical(samples, tmp_path, ray_cluster):
    src = samples["tars"].out
    reference_dir = _build(src, tmp_path / "reference", shard_size=2).out
    reference = _file_hashes(reference_dir)
    out = tmp_path / "killed"
    command = [
        *ALEXPIPE,
        "build-shards",
        "--src",
        str(src),
        "--out",
        str(out),
        "--workers",
        "1",
        "--shard-size",
        "2",
        "--max-rejected",
        "1",
        "--no-progress",
    ]
    process = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(out.glob("_work/train-*.json"))) < 3:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    for pid in _session_processes(process.pid):
        os.kill(pid, signal.SIGKILL)
    assert not (out / "manifest.json").exists(), "killed too late to test resuming"
    # Whatever is under a final name is complete: equal to the reference file.
    finals = {
        name: digest for name, digest in _file_hashes(out).items() if not name.startswith(".")
    }
    assert finals, "nothing was written before the kill"
    for name, digest in finals.items():
        assert digest == reference[name], f"{name} is partial under its final name"
    finished_before = len(list(out.glob("_work/*-*.json")))

    rerun = _build(src, out, shard_size=2)
    assert rerun.shards_skipped == finished_before >= 3
    assert _file_hashes(out) == reference
    assert not (out / "_work").exists()


def _live(pids: list[int]) -> list[int]:
    """Those of ``pids`` still running (a zombie no longer runs)."""
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state not in ("Z", "X"):
            running.append(pid)
    return running


def test_ctrl_c_mid_build_stops_every_process_and_the_rerun_finishes(samples, tmp_path):
    src = samples["tars"].out
    out = tmp_path / "interrupted"
    command = [*ALEXPIPE, "build-shards", "--src", str(src), "--out", str(out)]
    command += ["--workers", "2", "--shard-size", "1", "--max-rejected", "1", "--no-progress"]
    process = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(out.glob("_work/*-*.json")):
            time.sleep(0.02)
        started = _session_processes(process.pid)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        assert process.wait(timeout=120) != 0
        deadline = time.monotonic() + 60
        while _live(started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _live(started), "processes outlived Ctrl-C"
    finally:
        for pid in _session_processes(process.pid):
            os.kill(pid, signal.SIGKILL)
    assert len(started) > 3, "Ray had not started: interrupted too early to test"
    assert not (out / "manifest.json").exists(), "interrupted too late to test"
    rerun = subprocess.run(command, capture_output=True, text=True)  # the same command
    assert rerun.returncode == 0, rerun.stderr
    verify = subprocess.run([*ALEXPIPE, "verify", str(out)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_verify_catches_damage(samples, tmp_path, ray_cluster):
    out = _build(samples["folder"].out, tmp_path / "verify").out

    def verify() -> subprocess.CompletedProcess:
        return subprocess.run(
            [*ALEXPIPE, "verify", str(out), "--decode"], capture_output=True, text=True
        )

    assert verify().returncode == 0
    shard = out / "train-000001.tar"
    original = shard.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    result = verify()
    assert result.returncode == 1 and "train-000001.tar" in result.stderr
    assert "Traceback" not in result.stderr
    shard.write_bytes(original[: len(original) // 3])
    result = verify()
    assert result.returncode == 1 and "train-000001.tar" in result.stderr
    shard.unlink()
    result = verify()
    assert result.returncode == 1 and "train-000001.tar" in result.stderr
    shard.write_bytes(original)
    assert verify().returncode == 0


def test_too_many_rejections_exit_nonzero_after_writing(samples, tmp_path):
    out = tmp_path / "strict"
    result = subprocess.run(
        [
            *ALEXPIPE,
            "build-shards",
            "--src",
            str(samples["odd"].out),
            "--out",
            str(out),
            "--workers",
            "1",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "max-rejected" in result.stderr and "Traceback" not in result.stderr
    assert (out / "manifest.json").is_file()
