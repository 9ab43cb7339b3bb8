"""Check a shard directory against its manifest; say exactly what is wrong.

``verify_shards`` returns a list of one-line problems (empty means the
directory is intact). It never stops at the first problem, so one run lists
everything a user has to fix. Per shard: present, size and sha256 as
recorded, index present and describing exactly the tar's members, every
sample with ``cls``/``jpg``/``json``, labels in range, JSON readable, and with
``decode=True`` every JPEG decodes to a baseline RGB image of the built size.
Per split: sample counts add up and keys are unique. Directory-wide: no
shard or index file that the manifest does not list, statistics present.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shards.index import IndexFormatError, group_components, parse_index
from shards.manifest import MEAN_NAME, Manifest, index_name
from shards.reader import (
    ShardFormatError,
    decode_label,
    iter_members,
    iter_shard,
    sha256_of_file,
)
from shards.remote import read_manifest
from shards.writer import MEMBER_EXTENSIONS, ShardInfo

# Past this many problems in one shard, the rest are counted, not listed:
# a shard with every label wrong needs one message, not a thousand.
MAX_PROBLEMS_PER_SHARD = 10
STATS_KEYS = ("num_images", "num_pixels", "mean_rgb", "std_rgb", "cov_rgb", "eigvals", "eigvecs")


@dataclass
class ShardReport:
    """What checking one shard found: its problems and the keys it holds."""

    problems: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)


def _short(digest: str) -> str:
    return f"{digest[:8]}…"


def check_jpeg(data: bytes, size: int) -> str | None:
    """Why ``data`` is not a baseline RGB JPEG of ``size``×``size``, or None if it is."""
    from PIL import Image  # only verify --decode needs PIL

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG":
                return f"is {image.format}, not JPEG"
            if image.info.get("progressive") or image.info.get("progression"):
                return "is a progressive JPEG, not baseline"
            if image.mode != "RGB":
                return f"has mode {image.mode}, not RGB"
            if image.size != (size, size):
                return f"is {image.size[0]}x{image.size[1]}, not {size}x{size}"
            image.load()
    except Exception as error:  # PIL raises many types for bad data
        return f"does not decode ({type(error).__name__}: {error})"
    return None


def _compare_index(tar_path: Path, report: ShardReport) -> int | None:
    """Check the index against the tar's members; return the tar's sample count if readable."""
    name = tar_path.name
    try:
        from_tar = group_components(member.as_tuple() for member in iter_members(tar_path))
    except (ShardFormatError, IndexFormatError) as error:
        report.problems.append(str(error) if name in str(error) else f"{name}: {error}")
        return None
    index_path = tar_path.with_suffix(".idx")
    if not index_path.is_file():
        report.problems.append(f"{index_path.name}: index file missing")
        return len(from_tar)
    try:
        from_index = parse_index(index_path.read_text(encoding="ascii"))
    except (IndexFormatError, UnicodeDecodeError, OSError) as error:
        report.problems.append(f"{index_path.name}: malformed ({error})")
        return len(from_tar)
    if from_index != from_tar:
        if len(from_index) != len(from_tar):
            detail = f"{len(from_index)} samples in the index, {len(from_tar)} in the tar"
        else:
            pairs = enumerate(zip(from_index, from_tar, strict=True))
            position = next(i for i, (indexed, actual) in pairs if indexed != actual)
            detail = f"sample {position} ({from_tar[position].key}) differs from the tar"
        report.problems.append(f"{index_path.name}: does not match {name}: {detail}")
    return len(from_tar)


def _check_samples(
    tar_path: Path, num_classes: int, decode_size: int | None, report: ShardReport
) -> int:
    """Check every sample's members; return how many samples were read."""
    name = tar_path.name
    expected_parts = set(MEMBER_EXTENSIONS)
    count = 0
    try:
        for key, parts in iter_shard(tar_path):
            count += 1
            report.keys.append(key)
            if set(parts) != expected_parts:
                report.problems.append(
                    f"{name}: sample {key} has members {sorted(parts)}, "
                    f"expected {sorted(expected_parts)}"
                )
            if "cls" in parts:
                try:
                    label = decode_label(parts["cls"])
                    if not 0 <= label < num_classes:
                        report.problems.append(
                            f"{name}: sample {key} label {label} outside 0..{num_classes - 1}"
                        )
                except ValueError as error:
                    report.problems.append(f"{name}: sample {key}: {error}")
            if "json" in parts:
                try:
                    if not isinstance(json.loads(parts["json"]), dict):
                        report.problems.append(f"{name}: sample {key}.json is not an object")
                except (ValueError, UnicodeDecodeError):
                    report.problems.append(f"{name}: sample {key}.json is not valid JSON")
            if decode_size is not None and "jpg" in parts:
                reason = check_jpeg(parts["jpg"], decode_size)
                if reason:
                    report.problems.append(f"{name}: sample {key}.jpg {reason}")
    except ShardFormatError as error:
        report.problems.append(str(error))
    return count


def verify_shard(
    tar_path: Path, expected: ShardInfo, num_classes: int, decode_size: int | None = None
) -> ShardReport:
    """Check one shard and its index against the manifest's record ``expected``."""
    tar_path = Path(tar_path)
    report = ShardReport()
    name = tar_path.name
    if not tar_path.is_file():
        report.problems.append(f"{name}: missing")
        if not tar_path.with_suffix(".idx").is_file():
            report.problems.append(f"{tar_path.with_suffix('.idx').name}: index file missing")
        return report
    actual_bytes = tar_path.stat().st_size
    if actual_bytes != expected.bytes:
        report.problems.append(
            f"{name}: size mismatch (expected {expected.bytes} bytes, got {actual_bytes})"
        )
    else:
        actual_sha = sha256_of_file(tar_path)
        if actual_sha != expected.sha256:
            report.problems.append(
                f"{name}: sha256 mismatch (expected {_short(expected.sha256)}, "
                f"got {_short(actual_sha)})"
            )
    tar_count = _compare_index(tar_path, report)
    if tar_count is None:
        # The tar's structure is unreadable; reading samples would repeat that error.
        return _capped(report, name)
    sample_count = _check_samples(tar_path, num_classes, decode_size, report)
    if sample_count != expected.num_samples:
        report.problems.append(
            f"{name}: {sample_count} samples, manifest says {expected.num_samples}"
        )
    return _capped(report, name)


def _capped(report: ShardReport, name: str) -> ShardReport:
    if len(report.problems) > MAX_PROBLEMS_PER_SHARD:
        hidden = len(report.problems) - MAX_PROBLEMS_PER_SHARD
        report.problems[MAX_PROBLEMS_PER_SHARD:] = [f"{name}: … and {hidden} more problems"]
    return report


def _check_statistics(shards_dir: Path, manifest: Manifest, size: int) -> list[str]:
    problems = []
    stats_name = manifest.stats
    if stats_name:
        try:
            stats = json.loads((shards_dir / stats_name).read_text(encoding="utf-8"))
            missing = [key for key in STATS_KEYS if key not in stats]
            if missing:
                problems.append(f"{stats_name}: missing {', '.join(missing)}")
        except FileNotFoundError:
            problems.append(f"{stats_name}: missing")
        except (OSError, ValueError) as error:
            problems.append(f"{stats_name}: unreadable ({error})")
    mean_path = shards_dir / MEAN_NAME
    if mean_path.is_file():
        import numpy  # only needed here; keeps `import shards.verify` light

        try:
            mean = numpy.load(mean_path, allow_pickle=False)
            if mean.shape != (size, size, 3) or mean.dtype != numpy.float32:
                problems.append(
                    f"{MEAN_NAME}: {mean.dtype} {list(mean.shape)}, "
                    f"expected float32 [{size}, {size}, 3]"
                )
        except (OSError, ValueError) as error:
            problems.append(f"{MEAN_NAME}: unreadable ({error})")
    elif "train" in manifest.splits:
        problems.append(f"{MEAN_NAME}: missing")
    return problems


def verify_shards(
    shards_dir: Path,
    decode: bool = False,
    progress: Callable[[str], None] | None = None,
    manifest: Manifest | None = None,
) -> list[str]:
    """Verify a shard directory; return its problems, one line each (empty = intact).

    Raises :class:`shards.errors.UserError` only when there is no usable
    manifest to verify against. ``progress`` is called with each shard's
    file name after it is checked. ``manifest``: the directory's manifest if
    the caller has loaded it already.
    """
    shards_dir = Path(shards_dir)
    manifest = manifest if manifest is not None else read_manifest(shards_dir)
    num_classes = manifest.num_classes
    size = int(manifest.config.get("size", 256))
    problems: list[str] = []
    listed: set[str] = set()
    for split, entry in manifest.splits.items():
        key_shards: dict[str, str] = {}
        total = 0
        for info in entry.shards:
            listed.update((info.file, index_name(info.file)))
            report = verify_shard(
                shards_dir / info.file, info, num_classes, size if decode else None
            )
            problems += report.problems
            total += len(report.keys)
            for key in report.keys:
                if key in key_shards:
                    problems.append(f"{split}: key {key} in both {key_shards[key]} and {info.file}")
                key_shards.setdefault(key, info.file)
            if progress is not None:
                progress(info.file)
        recorded = entry.num_samples
        if total != recorded:
            problems.append(f"{split}: {total} samples in the shards, manifest says {recorded}")
    for path in sorted(shards_dir.glob("*.tar")) + sorted(shards_dir.glob("*.idx")):
        if path.name not in listed:
            problems.append(f"{path.name}: not listed in the manifest")
    problems += _check_statistics(shards_dir, manifest, size)
    return problems
