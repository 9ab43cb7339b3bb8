"""The last step of a build: merge what the shard tasks left, write the outputs.

Order matters: statistics and rejections first, ``manifest.json`` last and
atomically, because its presence is what tells users and loaders that the
directory is complete.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.build.plan import ShardPlan, ordered_splits
from pipeline.build.shard_task import load_partial_stats
from shards.atomic import dumps_json, remove_temporaries, write_bytes_atomic, write_text_atomic
from shards.manifest import (
    MEAN_NAME,
    MEAN_PNG_NAME,
    REJECTED_NAME,
    STATS_NAME,
    ClassInfo,
    Manifest,
    ShardInfo,
    SplitEntry,
    write_manifest,
)


@dataclass(frozen=True)
class SplitSummary:
    num_inputs: int
    num_samples: int
    rejected_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def num_rejected(self) -> int:
        return sum(self.rejected_by_reason.values())

    @property
    def rejected_fraction(self) -> float:
        return self.num_rejected / self.num_inputs if self.num_inputs else 0.0


def reason_kind(reason: str) -> str:
    """The reason without its details ("truncated image: ..." -> "truncated image")."""
    return reason.split(":", 1)[0].strip()


def merge_train_statistics(out_dir: Path, train_plans: list[ShardPlan]):
    """Merge the train shards' partial statistics, in shard order."""
    merged = None
    for plan in train_plans:
        partial = load_partial_stats(out_dir, plan.name)
        merged = partial if merged is None else merged.merge(partial)
    return merged


def write_statistics(out_dir: Path, pixel_stats) -> dict:
    """stats.json, mean.npy and mean.png from the merged train statistics."""
    from pipeline.build.stats import mean_png_bytes

    stats, mean_image = pixel_stats.finalize()
    buffer = io.BytesIO()
    np.save(buffer, mean_image)  # float32 already (finalize)
    write_bytes_atomic(out_dir / MEAN_NAME, buffer.getvalue())
    write_bytes_atomic(out_dir / MEAN_PNG_NAME, mean_png_bytes(mean_image))
    write_text_atomic(out_dir / STATS_NAME, dumps_json(stats))
    return stats


def write_outputs(
    out_dir: Path,
    settings: dict,
    classes: tuple[ClassInfo, ...],
    splits: list[str],
    plans: list[ShardPlan],
    records: dict[str, dict],
    listing_rejected: list[dict],
) -> dict[str, SplitSummary]:
    """Write stats, rejected.jsonl and finally manifest.json; return per-split summaries.

    ``splits`` are the splits asked for: one whose every input was rejected
    still appears (with no shards), so its rejections count against
    ``--max-rejected`` instead of the split silently vanishing.
    """
    out_dir = Path(out_dir)
    splits = ordered_splits(splits)
    rejected = list(listing_rejected)
    for plan in plans:
        rejected.extend(records[plan.name]["rejected"])
    rejected.sort(key=lambda row: (splits.index(row["split"]), row["source"]))

    train_plans = [plan for plan in plans if plan.split == "train"]
    has_stats = any(records[p.name]["shard"] for p in train_plans)
    if has_stats:
        write_statistics(out_dir, merge_train_statistics(out_dir, train_plans))
    write_text_atomic(
        out_dir / REJECTED_NAME,
        "".join(json.dumps(row, sort_keys=True) + "\n" for row in rejected),
    )

    summaries: dict[str, SplitSummary] = {}
    manifest_splits = {}
    for split in splits:
        split_plans = [plan for plan in plans if plan.split == split]
        shard_rows = [records[p.name]["shard"] for p in split_plans if records[p.name]["shard"]]
        reasons = Counter(reason_kind(row["reason"]) for row in rejected if row["split"] == split)
        listing_inputs = sum(1 for row in listing_rejected if row["split"] == split)
        summary = SplitSummary(
            num_inputs=sum(len(p.samples) for p in split_plans) + listing_inputs,
            num_samples=sum(row["num_samples"] for row in shard_rows),
            rejected_by_reason=dict(sorted(reasons.items())),
        )
        summaries[split] = summary
        manifest_splits[split] = SplitEntry(
            summary.num_samples, summary.num_rejected, tuple(ShardInfo(**row) for row in shard_rows)
        )
    manifest = Manifest(
        config=settings,
        classes=classes,
        splits=manifest_splits,
        stats=STATS_NAME if has_stats else None,
        mean=MEAN_NAME if has_stats else None,
        rejected=REJECTED_NAME,
    )
    # Writers killed mid-shard (a worker lost to OOM, then retried) leave
    # temporaries that no rerun would see: clear them while no writer runs.
    remove_temporaries(out_dir)
    write_manifest(out_dir, manifest)
    return summaries
