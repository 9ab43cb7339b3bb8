"""The unit of work of build-shards: turn one planned shard into files.

``run_shard`` is plain Python (no Ray): the Ray job calls it once per shard,
and the benchmark calls the same function from a process pool. Everything a
rerun needs to skip a finished shard is written beside it, in ``_work/``:
the shard's partial pixel statistics and a record (written last) that says
the shard is done, so a rerun recomputes nothing.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import resource
import time
from pathlib import Path

from pipeline.build.plan import ShardPlan
from shards.atomic import atomic_file, dumps_json, write_text_atomic
from shards.manifest import index_name, shard_name
from shards.writer import ShardSample, shard_info_dict, write_shard

WORK_DIR_NAME = "_work"


def work_dir(out_dir: Path) -> Path:
    """Where per-shard records and partial statistics live until the build ends."""
    return Path(out_dir) / WORK_DIR_NAME


def record_path(out_dir: Path, plan_name: str) -> Path:
    return work_dir(out_dir) / f"{plan_name}.json"


def stats_path(out_dir: Path, plan_name: str) -> Path:
    return work_dir(out_dir) / f"{plan_name}.stats.npz"


def plan_digest(plan: ShardPlan, transform_config) -> str:
    """A fingerprint of everything a shard's bytes depend on besides the codec:
    its inputs (position, key, source, label) and the transform settings.

    A rerun trusts a finished shard only if its record carries the same
    digest, so changed inputs are redone instead of silently mixed in.
    """
    hasher = hashlib.sha256(repr(sorted(vars(transform_config).items())).encode())
    for planned in plan.samples:
        item = planned.item
        hasher.update(f"{planned.index}\t{item.key}\t{item.source}\t{item.label}\n".encode())
    return hasher.hexdigest()


def _processed_samples(plan: ShardPlan, transform_config, rejected: list, pixel_stats):
    """Yield shard samples for the plan, recording rejections on the way.

    A generator, so the shard is streamed into the tar one image at a time:
    a worker's memory does not grow with the shard size.
    """
    from pipeline.build.sources import read_bytes, rejection
    from pipeline.build.transform import Rejected, process_image

    for planned in plan.samples:
        item = planned.item
        try:
            data = read_bytes(item)
        except OSError as error:
            rejected.append(rejection(plan.split, item.source, f"unreadable: {error}"))
            continue
        result = process_image(data, transform_config, decode_stored=pixel_stats is not None)
        if isinstance(result, Rejected):
            rejected.append(rejection(plan.split, item.source, result.reason))
            continue
        if pixel_stats is not None:
            pixel_stats.add(result.pixels)
        yield ShardSample(
            key=item.key,
            jpg=result.jpg,
            label=item.label,
            meta={
                "index": planned.index,
                "wnid": item.wnid,
                "source": item.source,
                "orig_size": list(result.orig_size),
                "orig_mode": result.orig_mode,
                "repairs": list(result.repairs),
            },
        )


def run_shard(plan: ShardPlan, transform_config, out_dir: Path) -> dict:
    """Write one shard (tar + idx), its partial statistics, then its record.

    Returns the record. Order matters for crash safety: the record is the
    last file written, so a record on disk means everything before it is
    complete; without one, the shard is simply redone (same bytes).
    """
    from pipeline.build.stats import PixelStats

    started = time.perf_counter()
    out_dir = Path(out_dir)
    rejected: list[dict] = []
    pixel_stats = PixelStats(transform_config.size) if plan.split == "train" else None
    tar_path = out_dir / shard_name(plan.split, plan.shard_index)
    samples = _processed_samples(plan, transform_config, rejected, pixel_stats)
    first = next(samples, None)
    shard = None  # every input rejected: no empty shard for loaders to trip over
    if first is not None:
        info = write_shard(tar_path, itertools.chain([first], samples))
        shard = shard_info_dict(info)
    if pixel_stats is not None:
        with atomic_file(stats_path(out_dir, plan.name)) as handle:
            pixel_stats.save(handle)
    record = {
        "name": plan.name,
        "split": plan.split,
        "plan_digest": plan_digest(plan, transform_config),
        "num_inputs": len(plan.samples),
        "shard": shard,
        "rejected": rejected,
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    write_text_atomic(record_path(out_dir, plan.name), dumps_json(record))
    return record


def load_finished_record(out_dir: Path, plan: ShardPlan, transform_config) -> dict | None:
    """The record of a shard a previous run finished, or None to (re)do it.

    Cheap on purpose (stat calls, no hashing): a rerun over thousands of
    finished shards must start in seconds. ``alexpipe verify`` does the
    full hash check.
    """
    out_dir = Path(out_dir)
    try:
        record = json.loads(record_path(out_dir, plan.name).read_text())
    except (OSError, ValueError):
        return None
    if record.get("plan_digest") != plan_digest(plan, transform_config):
        return None
    shard = record.get("shard")
    if shard is not None:
        tar_path = out_dir / shard["file"]
        if not tar_path.is_file() or tar_path.stat().st_size != shard["bytes"]:
            return None
        if not (out_dir / index_name(shard["file"])).is_file():
            return None
    if plan.split == "train" and not stats_path(out_dir, plan.name).is_file():
        return None
    return record


def load_partial_stats(out_dir: Path, plan_name: str):
    """The pixel statistics a finished train shard recorded."""
    from pipeline.build.stats import PixelStats

    return PixelStats.load(stats_path(out_dir, plan_name))
