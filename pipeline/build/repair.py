"""`alexpipe verify DIR --repair --src SRC`: make the shards that fail verification again.

A rerun of build-shards trusts every shard of the right size (it does not
hash), so bit rot can only be repaired by a rebuild of exactly the damaged
shards. This is the build's own path, not a copy of it: the settings the
manifest recorded give the :class:`BuildConfig`, ``sources.discover`` and
``plan.plan_build`` give the same plan, and the shard task
(``shard_task.run_shard``, on Ray through ``scheduler.run_shards``) writes
each shard, into a staging folder inside DIR.

Nothing is put in place unless it is what the manifest recorded: before any
work, the listing of SRC must give the same classes, inputs and sample keys
as DIR holds; after the work, every rebuilt shard must have the recorded
size and sha256. Then the index and the tar replace the damaged ones
(atomic renames on one filesystem). Statistics, rejections and the manifest
are left as they are: a repaired train shard holds the same pixels as
before, so the exact statistics do not change.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.build.config import BuildConfig
from pipeline.build.job import output_error, validate
from pipeline.build.plan import ShardPlan, plan_build
from pipeline.build.ray_runtime import ray_session
from pipeline.build.scheduler import run_shards
from pipeline.build.shard_task import work_dir
from shards.atomic import fsync_directory
from shards.errors import UserError
from shards.manifest import REJECTED_NAME, Manifest, index_name, shard_name
from shards.remote import read_manifest
from shards.verify import DirectoryReport
from shards.writer import ShardInfo

STAGING_NAME = "_repair"


@dataclass(frozen=True)
class RepairConfig:
    """One repair: the shard directory, the raw inputs it was built from, how to run."""

    shards_dir: Path
    src: Path
    workers: int | None = None


def repair_shards(config: RepairConfig, report: DirectoryReport) -> list[str]:
    """Rebuild the shards that ``report`` (a verification of the directory) found failing.

    The keys it read from the intact shards are checked against the plan for
    SRC. Returns the shards put in place, in manifest order. Raises
    :class:`UserError`, with DIR unchanged, when SRC is not what DIR was built
    from or a rebuilt shard is not byte-identical to the recorded one.
    """
    if not report.failing_shards:
        return []
    shards_dir = Path(config.shards_dir)
    manifest = read_manifest(shards_dir)
    recorded = _recorded_shards(manifest)
    build = _build_config(manifest, config)
    validate(build)
    intact_keys = {
        name: report.shard_keys[name]
        for name, problems in report.shard_problems.items()
        if not problems
    }
    plans = _plans(build, manifest, recorded, intact_keys)
    chosen = [plans[name] for name in report.failing_shards]
    staging = shards_dir / STAGING_NAME
    shutil.rmtree(staging, ignore_errors=True)
    work_dir(staging).mkdir(parents=True)
    try:
        try:
            records = _run(chosen, build, staging)
        except OSError as error:  # a full or read-only disk: one line, as in a build
            problem = output_error(error, shards_dir)
            if problem is None:
                raise
            raise problem from error
        for plan in chosen:
            _require_identical(records[plan.name]["shard"], recorded[_tar(plan)], config.src)
        for plan in chosen:
            tar = _tar(plan)
            os.replace(staging / index_name(tar), shards_dir / index_name(tar))
            os.replace(staging / tar, shards_dir / tar)
        fsync_directory(shards_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [_tar(plan) for plan in chosen]


def _tar(plan: ShardPlan) -> str:
    return shard_name(plan.split, plan.shard_index)


def _build_config(manifest: Manifest, config: RepairConfig) -> BuildConfig:
    try:
        return BuildConfig.from_settings(
            manifest.config,
            src=config.src,
            out=config.shards_dir,
            workers=config.workers,
            progress=False,
        )
    except (KeyError, TypeError) as error:
        raise UserError(
            f"{config.shards_dir}: its manifest does not record the build's settings "
            f"({error}), so its shards cannot be made again; build a new --out"
        ) from None


def _recorded_shards(manifest: Manifest) -> dict[str, ShardInfo]:
    """Every shard the manifest records, by tar name."""
    return {info.file: info for info in manifest.every_shard()}


def _plans(
    build: BuildConfig, manifest: Manifest, recorded: dict[str, ShardInfo], intact_keys: dict
) -> dict:
    """The build's plan for SRC, by tar name, once SRC is seen to hold DIR's inputs:
    the same classes, the same shards (``recorded``: the manifest's, by tar name), and in
    each intact shard the same keys."""
    from pipeline.build.sources import discover, resolve_layout

    source, shards_dir = f"--src {build.src}", build.out
    listing = discover(build.src, resolve_layout(build.src, build.layout), build.splits)
    wnids = [entry.wnid for entry in manifest.classes]
    if list(listing.classes) != wnids:
        raise UserError(
            f"{source} has {len(listing.classes)} classes, {shards_dir} was built from "
            f"{len(wnids)} other ones; give the --src it was built from"
        )
    plans = plan_build(listing.items, build.shard_size, build.seed)
    rejected = _rejected_sources(shards_dir)
    by_tar = {}
    for plan in plans:
        keys = [s.item.key for s in plan.samples if (plan.split, s.item.source) not in rejected]
        tar = _tar(plan)
        if bool(keys) != (tar in recorded):
            raise UserError(f"{source} gives other shards than {shards_dir} holds (at {tar})")
        held = intact_keys.get(tar)
        if held is not None and held != keys:
            pairs = enumerate(zip(held, keys, strict=False))
            first = next((i for i, (a, b) in pairs if a != b), min(len(held), len(keys)))
            raise UserError(
                f"{source} plans other samples for {tar} than {shards_dir} holds "
                f"({_key_at(keys, first)} where it holds {_key_at(held, first)}); "
                "give the --src it was built from"
            )
        by_tar[tar] = plan
    missing = sorted(set(recorded) - set(by_tar))
    if missing:
        raise UserError(f"{source} gives fewer shards than {shards_dir} holds (no {missing[0]})")
    return by_tar


def _key_at(keys: list[str], position: int) -> str:
    return keys[position] if position < len(keys) else "no more keys"


def _rejected_sources(shards_dir: Path) -> set[tuple[str, str]]:
    """(split, source) of every input the build rejected, from rejected.jsonl."""
    path = shards_dir / REJECTED_NAME
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        return {(row["split"], row["source"]) for row in map(json.loads, filter(None, lines))}
    except FileNotFoundError:
        return set()
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path}: unreadable ({error}); cannot tell which inputs to skip") from None


def _run(plans: list[ShardPlan], build: BuildConfig, staging: Path) -> dict[str, dict]:
    """The shard task of each plan, on Ray as in a build, writing into ``staging``."""
    records: dict[str, dict] = {}

    def finished(plan: ShardPlan, record: dict) -> None:
        records[plan.name] = record

    with ray_session(None, build.workers) as cpus:
        run_shards(plans, build.transform_config(), staging, cpus, finished)
    return records


def _require_identical(rebuilt: dict | None, recorded: ShardInfo, src: Path) -> None:
    """``rebuilt``: the shard task's record of the shard (None: every input rejected)."""
    if rebuilt is not None and ShardInfo(**rebuilt) == recorded:
        return
    if rebuilt is None:
        found = "no shard (every input rejected)"
    else:
        found = f"{rebuilt['bytes']} bytes, sha256 {rebuilt['sha256'][:8]}…"
    raise UserError(
        f"--src {src} makes {recorded.file} as {found}, not as the manifest recorded it "
        f"({recorded.bytes} bytes, sha256 {recorded.sha256[:8]}…): other input bytes, "
        "or another Pillow/libjpeg than the build had; nothing was changed"
    )
