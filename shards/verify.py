"""Check a shard directory against its manifest; say exactly what is wrong.

``verify_shards`` returns a list of one-line problems (empty means the
directory is intact). It never stops at the first problem, so one run lists
everything a user has to fix. Per shard: present, size and sha256 as
recorded, index present and describing exactly the tar's members, every
sample with ``cls``/``jpg``/``json``, labels in range, JSON readable, and with
``decode=True`` every JPEG decodes to a baseline RGB image of the built size.
Per split: sample counts add up and keys are unique. Directory-wide: no
shard or index file that the manifest does not list, statistics present.

Each shard is read once (``shards.scan``): its size, sha256, tar structure,
samples and index check all come from the same bytes. Shards are checked in
parallel, one process per core (see :func:`_reports`). A shard whose bytes
no longer hash as recorded is decoded again, strictly, to name the samples
that were damaged, where decoding can tell.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from shards.index import WHITESPACE, IndexFormatError, group_components, index_text, parse_index
from shards.manifest import MEAN_NAME, Manifest, SplitEntry, index_name
from shards.reader import decode_label
from shards.remote import read_manifest
from shards.scan import ShardScan, scan_shard
from shards.writer import MEMBER_EXTENSIONS, ShardInfo

# Past this many problems in one shard, the rest are counted, not listed:
# a shard with every label wrong needs one message, not a thousand.
MAX_PROBLEMS_PER_SHARD = 10
# How many damaged samples the sha256 line names before it only counts them.
MAX_DAMAGED_NAMED = 3
STATS_KEYS = ("num_images", "num_pixels", "mean_rgb", "std_rgb", "cov_rgb", "eigvals", "eigvecs")
# Below this many bytes of shards, starting worker processes costs more than
# it saves (a spawned checker starts in ~0.2 s, the time to check ~100 MB here).
POOL_MIN_BYTES = 128 << 20


@dataclass(frozen=True)
class ShardCheck:
    """What a shard is checked against besides its manifest record."""

    num_classes: int
    image_size: int
    decode: bool = False


@dataclass
class ShardReport:
    """What checking one shard found: its problems and the keys it holds."""

    problems: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)


@dataclass
class DirectoryReport:
    """What checking a directory found: all problems in order, and per shard."""

    problems: list[str] = field(default_factory=list)
    shard_problems: dict[str, list[str]] = field(default_factory=dict)
    shard_keys: dict[str, list[str]] = field(default_factory=dict)

    @property
    def failing_shards(self) -> list[str]:
        """The manifest's shards (tar names, in manifest order) that have a problem."""
        return [name for name, problems in self.shard_problems.items() if problems]


def _short(digest: str) -> str:
    return f"{digest[:8]}…"


def check_jpeg(data: bytes, size: int) -> str | None:
    """Why ``data`` is not a baseline RGB JPEG of ``size``×``size``, or None if it is.

    The pixels are decoded strictly (libjpeg-turbo's warnings are errors, as
    for nvImageCodec on the GPU): Pillow decodes most corrupt entropy-coded
    data without a word, so it only reads the headers here.
    """
    import simplejpeg  # only verify --decode needs a decoder
    from PIL import Image

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
        simplejpeg.decode_jpeg(data, strict=True)
    except Exception as error:  # both decoders raise many types for bad data
        return f"does not decode ({type(error).__name__}: {error})"
    return None


class _SampleChecks:
    """The per-sample checks, fed by the scan one sample at a time."""

    EXPECTED_PARTS = frozenset(MEMBER_EXTENSIONS)

    def __init__(self, name: str, check: ShardCheck):
        self.name = name
        self.check = check
        self.keep = ("cls", "json", "jpg") if check.decode else ("cls", "json")
        self.problems: list[str] = []
        self.undecodable: list[str] = []
        self.keys: list[str] = []

    def __call__(self, key: str, parts: dict[str, bytes | None]) -> None:
        self.keys.append(key)
        if not self.check.decode and parts.keys() == self.EXPECTED_PARTS:
            # The common case in a few steps (1,000 calls a shard); any doubt
            # goes the long way, which says what is wrong.
            label, meta = parts["cls"], parts["json"]
            if label.isdigit() and int(label) < self.check.num_classes:
                try:
                    if isinstance(json.loads(meta.decode("utf-8")), dict):
                        return
                except (ValueError, UnicodeDecodeError):
                    pass
        self._check(key, parts)

    def _check(self, key: str, parts: dict[str, bytes | None]) -> None:
        name = self.name
        if parts.keys() != self.EXPECTED_PARTS:
            self.problems.append(
                f"{name}: sample {key} has members {sorted(parts)}, "
                f"expected {sorted(self.EXPECTED_PARTS)}"
            )
        if "cls" in parts:
            try:
                label = decode_label(parts["cls"])
                if not 0 <= label < self.check.num_classes:
                    self.problems.append(
                        f"{name}: sample {key} label {label} outside "
                        f"0..{self.check.num_classes - 1}"
                    )
            except ValueError as error:
                self.problems.append(f"{name}: sample {key}: {error}")
        if "json" in parts:
            try:
                # Decoded first: json.loads on bytes guesses the encoding, in Python.
                if not isinstance(json.loads(parts["json"].decode("utf-8")), dict):
                    self.problems.append(f"{name}: sample {key}.json is not an object")
            except (ValueError, UnicodeDecodeError):
                self.problems.append(f"{name}: sample {key}.json is not valid JSON")
        if self.check.decode and "jpg" in parts:
            reason = check_jpeg(parts["jpg"], self.check.image_size)
            if reason:
                self.undecodable.append(f"sample {key}.jpg {reason}")
                self.problems.append(f"{name}: sample {key}.jpg {reason}")


def _index_problems(index_path: Path, tar_name: str, scan: ShardScan) -> list[str]:
    """How the index disagrees with the tar's members (empty: it matches).

    Raises IndexFormatError for members no index can describe.
    """
    try:
        data = index_path.read_bytes()
    except FileNotFoundError:
        return [f"{index_path.name}: index file missing"]
    except OSError as error:
        return [f"{index_path.name}: malformed ({error})"]
    # The common case without parsing either side: the index is, byte for
    # byte, what write_shard writes for these members.
    names = "".join(member[0] for member in scan.members)
    if scan.sample_error is None and scan.index_lines and not WHITESPACE.search(names):
        expected = index_text(scan.index_lines)
        if expected.isascii() and data == expected.encode("ascii"):
            return []
    from_tar = group_components(scan.members)
    try:
        from_index = parse_index(data.decode("ascii"))
    except (IndexFormatError, UnicodeDecodeError) as error:
        return [f"{index_path.name}: malformed ({error})"]
    if from_index == from_tar:
        return []
    if len(from_index) != len(from_tar):
        detail = f"{len(from_index)} samples in the index, {len(from_tar)} in the tar"
    else:
        pairs = enumerate(zip(from_index, from_tar, strict=True))
        position = next(i for i, (indexed, actual) in pairs if indexed != actual)
        detail = f"sample {position} ({from_tar[position].key}) differs from the tar"
    return [f"{index_path.name}: does not match {tar_name}: {detail}"]


def _integrity_problem(name: str, scan: ShardScan, expected: ShardInfo) -> str | None:
    if scan.bytes_read != expected.bytes:
        return f"{name}: size mismatch (expected {expected.bytes} bytes, got {scan.bytes_read})"
    if scan.sha256 != expected.sha256:
        return (
            f"{name}: sha256 mismatch (expected {_short(expected.sha256)}, "
            f"got {_short(scan.sha256)})"
        )
    return None


def _damaged_samples(tar_path: Path, check: ShardCheck) -> list[str]:
    """The samples of a shard whose JPEG fails a strict decode: a second read, only for a
    shard that no longer hashes as recorded, to say where it was damaged."""
    samples = _SampleChecks(tar_path.name, replace(check, decode=True))
    scan_shard(tar_path, samples.keep, samples)
    return samples.undecodable


def verify_shard(tar_path: Path, expected: ShardInfo, check: ShardCheck) -> ShardReport:
    """Check one shard and its index against the manifest's record ``expected``."""
    tar_path = Path(tar_path)
    report = ShardReport()
    name = tar_path.name
    index_path = tar_path.with_suffix(".idx")
    samples = _SampleChecks(name, check)
    try:
        scan = scan_shard(tar_path, samples.keep, samples)
    except FileNotFoundError:
        report.problems.append(f"{name}: missing")
        if not index_path.is_file():
            report.problems.append(f"{index_path.name}: index file missing")
        return report
    except OSError as error:
        report.problems.append(f"{name}: unreadable ({error.strerror or error})")
        return report
    integrity = _integrity_problem(name, scan, expected)
    if integrity is not None:
        report.problems.append(integrity)
    if scan.member_error is not None:
        # The tar's structure is unusable: its samples and index say nothing more.
        report.problems.append(scan.member_error)
        return _capped(report, name)
    try:
        report.problems += _index_problems(index_path, name, scan)
    except IndexFormatError as error:  # names no index can hold: nothing more to say
        report.problems.append(f"{name}: {error}")
        return _capped(report, name)
    report.problems += samples.problems
    if scan.sample_error is not None:
        report.problems.append(scan.sample_error)
    report.keys = samples.keys
    if len(samples.keys) != expected.num_samples:
        report.problems.append(
            f"{name}: {len(samples.keys)} samples, manifest says {expected.num_samples}"
        )
    if integrity is not None and scan.bytes_read == expected.bytes and not check.decode:
        damaged = _damaged_samples(tar_path, check)
        if damaged:
            named = damaged[:MAX_DAMAGED_NAMED]
            if len(damaged) > len(named):
                named.append(f"… and {len(damaged) - len(named)} more damaged samples")
            report.problems[0] = "; ".join([integrity, *named])
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


def _verify_task(task: tuple[Path, ShardInfo, ShardCheck]) -> ShardReport:
    return verify_shard(*task)


def _reports(tasks: list[tuple[Path, ShardInfo, ShardCheck]], workers: int) -> Iterator:
    """``verify_shard`` of every task, in task order, on ``workers`` processes.

    Processes, not threads: sha256 releases the GIL, but the header and
    sample checks hold it, and they cost about as much CPU as the hash (a
    1,000-sample shard: ~20 ms of each on the dev machine), so threads top
    out near one core's worth of checks. The processes are forked from a
    fork server that imported the checker once (a spawned process costs
    ~0.3 CPU-seconds to start here; forking the caller would copy its
    threads' locks: tqdm's monitor, Ray's after a repair).
    """
    if workers <= 1 or len(tasks) <= 1:
        yield from map(_verify_task, tasks)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["shards.verify", "numpy"])
    pool = ProcessPoolExecutor(
        min(workers, len(tasks)), mp_context=context, initializer=_ignore_interrupts
    )
    try:
        yield from pool.map(_verify_task, tasks)
    finally:  # Ctrl-C or an early close: drop the shards not started
        pool.shutdown(wait=True, cancel_futures=True)


def _ignore_interrupts() -> None:
    """In a checker process: Ctrl-C is the parent's to handle (it ends the pool)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_count(workers: int | None, infos: list[ShardInfo]) -> int:
    if workers is not None:
        return max(1, workers)
    if sum(info.bytes for info in infos) < POOL_MIN_BYTES:
        return 1
    return len(os.sched_getaffinity(0))


def _add_split(report, split: str, entry: SplitEntry, results, progress) -> None:
    """Take one split's shard reports into ``report``; check its keys and its count."""
    key_shards: dict[str, str] = {}
    total = 0
    for info in entry.shards:
        shard = next(results)
        report.problems += shard.problems
        report.shard_problems[info.file] = shard.problems
        report.shard_keys[info.file] = shard.keys
        total += len(shard.keys)
        for key in shard.keys:
            if key in key_shards:
                report.problems.append(
                    f"{split}: key {key} in both {key_shards[key]} and {info.file}"
                )
            key_shards.setdefault(key, info.file)
        if progress is not None:
            progress(info.file)
    recorded = entry.num_samples
    if total != recorded:
        report.problems.append(f"{split}: {total} samples in the shards, manifest says {recorded}")


def verify_directory(
    shards_dir: Path,
    decode: bool = False,
    progress: Callable[[str], None] | None = None,
    manifest: Manifest | None = None,
    workers: int | None = None,
) -> DirectoryReport:
    """Verify a shard directory; see :func:`verify_shards`. The report also keeps each
    shard's problems and keys, for ``alexpipe verify --repair``."""
    shards_dir = Path(shards_dir)
    manifest = manifest if manifest is not None else read_manifest(shards_dir)
    size = int(manifest.config.get("size", 256))
    check = ShardCheck(manifest.num_classes, size, decode)
    report = DirectoryReport()
    everything = manifest.every_shard()
    tasks = [(shards_dir / info.file, info, check) for info in everything]
    with contextlib.closing(_reports(tasks, _worker_count(workers, everything))) as results:
        for split, entry in manifest.splits.items():
            _add_split(report, split, entry, results, progress)
    listed = {name for info in everything for name in (info.file, index_name(info.file))}
    for path in sorted(shards_dir.glob("*.tar")) + sorted(shards_dir.glob("*.idx")):
        if path.name not in listed:
            report.problems.append(f"{path.name}: not listed in the manifest")
    report.problems += _check_statistics(shards_dir, manifest, size)
    return report


def verify_shards(shards_dir: Path, **options) -> list[str]:
    """Verify a shard directory; return its problems, one line each (empty = intact).
    ``options`` are :func:`verify_directory`'s.

    Raises :class:`shards.errors.UserError` only when there is no usable
    manifest to verify against. ``decode``: also decode every sample
    strictly. ``progress`` is called with each shard's
    file name after it is checked, in manifest order. ``manifest``: the
    directory's manifest if the caller has loaded it already. ``workers``:
    processes checking shards (default: every core, or just this one for a
    small directory).
    """
    return verify_directory(shards_dir, **options).problems
