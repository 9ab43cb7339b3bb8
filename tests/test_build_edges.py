"""Edges of build-shards: splits rejected whole, and resuming with other inputs."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from pipeline.build.config import BuildConfig
from pipeline.build.job import build_shards
from pipeline.build.plan import plan_split
from pipeline.build.shard_task import load_finished_record, run_shard
from pipeline.build.sources import discover
from pipeline.build.transform import TransformConfig
from shards.errors import UserError


def _jpeg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (300, 260), colour).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _folder_tree(root: Path, val_wnid: str) -> Path:
    for index in range(3):
        path = root / "train" / "n00000001" / f"n00000001_{index}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg((40 * index, 100, 200)))
    val = root / "val" / val_wnid / "ILSVRC2012_val_00000001.JPEG"
    val.parent.mkdir(parents=True, exist_ok=True)
    val.write_bytes(_jpeg((10, 20, 30)))
    return root


def test_a_split_rejected_whole_is_kept_and_counts_against_the_limit(tmp_path):
    src = _folder_tree(tmp_path / "src", val_wnid="n99999999")  # not a train class
    config = BuildConfig(src=src, out=tmp_path / "out", workers=1, progress=False, max_rejected=1.0)
    summary = build_shards(config)
    manifest = json.loads((config.out / "manifest.json").read_text())
    assert manifest["splits"]["val"] == {"num_samples": 0, "num_rejected": 1, "shards": []}
    assert manifest["splits"]["train"]["num_samples"] == 3
    assert summary.splits["val"].num_rejected == 1
    assert (
        summary.over_rejection_limit(0.001)
        and "val: 1 of 1" in (summary.over_rejection_limit(0.001)[0])
    )
    rejected = [json.loads(line) for line in (config.out / "rejected.jsonl").open()]
    assert [row["split"] for row in rejected] == ["val"]


def test_a_rerun_with_another_source_is_refused(tmp_path):
    first = _folder_tree(tmp_path / "a", val_wnid="n00000001")
    second = tmp_path / "b"
    shutil.copytree(first, second)
    out = tmp_path / "out"
    # An interrupted build of `first`: its settings are recorded, no manifest yet.
    from pipeline.build.job import _claim_output, _run_identity

    settings = BuildConfig(src=first, out=out).output_settings("folder")
    assert not _claim_output(out, settings, _run_identity(BuildConfig(src=first, out=out)))
    with pytest.raises(UserError, match="other settings.*src"):
        build_shards(BuildConfig(src=second, out=out, workers=1, progress=False))


def test_a_finished_shard_is_redone_when_its_inputs_changed(tmp_path):
    src = _folder_tree(tmp_path / "src", val_wnid="n00000001")
    out = tmp_path / "out"
    (out / "_work").mkdir(parents=True)
    items = discover(src, "folder", ("train",)).items["train"]
    transform = TransformConfig()
    (plan,) = plan_split("train", items, shard_size=10, seed=0)
    run_shard(plan, transform, out)
    assert load_finished_record(out, plan, transform) is not None
    # Same count, other inputs: a file renamed in the source tree.
    (other_plan,) = plan_split("train", items[:2] + items[:1], shard_size=10, seed=0)
    assert len(other_plan.samples) == len(plan.samples)
    assert load_finished_record(out, other_plan, transform) is None
    # Same inputs, other transform settings.
    assert load_finished_record(out, plan, TransformConfig(quality=80)) is None
