#!/usr/bin/env python
"""Benchmark `alexpipe verify` against one pass of hashlib.sha256 over the same files.

Both run in this one invocation, on the same shard set, with a warm page
cache, alternating (hash, verify, hash, verify ...) and keeping each one's
best pass, so the ratio holds even though absolute rates on shared machines
are noisy. The target (README, "Checking a shard directory"): verify at
least 0.5x the hashlib rate.

The shard set is a real build: ImageNet-sized photographs
(``alexpipe.sample.photos``) through ``build-shards`` at 256 px, 1000 images
a shard (about 22 KB a sample, as on ILSVRC), made once under --work and
reused while its size and seed are unchanged.

Usage: python tools/bench_verify.py [--images 45000] [--workers N] [--repeats 2] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NUM_CLASSES = 10
VAL_SHARE = 10  # one image in ten is a val image
HASH_CHUNK = 1 << 20


def shard_set(work: Path, images: int, shard_size: int, workers: int | None) -> Path:
    """The benchmark's shard directory, built (once) from real photographs."""
    from alexpipe.sample.photos import write_photo_folder
    from pipeline.build.config import BuildConfig
    from pipeline.build.job import build_shards

    per_class = max(images // NUM_CLASSES, 1)
    val_per_class = max(per_class // VAL_SHARE, 1)
    train_per_class = max(per_class - val_per_class, 1)
    name = f"{NUM_CLASSES}x{train_per_class}+{val_per_class}-s{shard_size}"
    photos, out = work / f"photos-{name}", work / f"shards-{name}"
    if (out / "manifest.json").is_file():
        return out
    for stale in work.glob("photos-*"):
        if stale != photos:
            shutil.rmtree(stale)
    for stale in work.glob("shards-*"):
        shutil.rmtree(stale)
    marker = photos / ".complete"
    if not marker.exists():
        shutil.rmtree(photos, ignore_errors=True)
        print(f"writing {images} photographs to {photos} ...", file=sys.stderr)
        write_photo_folder(photos, NUM_CLASSES, train_per_class, val_per_class)
        marker.touch()
    print(f"building shards into {out} ...", file=sys.stderr)
    build_shards(
        BuildConfig(
            src=photos,
            out=out,
            shard_size=shard_size,
            workers=workers,
            max_rejected=1.0,
            progress=False,
        )
    )
    return out


def shard_files(directory: Path) -> list[Path]:
    """The files verify reads whole: every tar and every index."""
    return sorted(directory.glob("*.tar")) + sorted(directory.glob("*.idx"))


def hash_pass(files: list[Path]) -> float:
    """Seconds for one sequential pass of hashlib.sha256 over ``files`` (1 MiB reads)."""
    started = time.perf_counter()
    for path in files:
        digest = hashlib.sha256()
        with open(path, "rb", buffering=0) as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
        digest.hexdigest()
    return time.perf_counter() - started


def verify_pass(directory: Path, workers: int | None, clock=time.perf_counter) -> float:
    """Seconds (of ``clock``) for one ``verify_shards`` of the whole directory, which
    must find it intact."""
    from shards.verify import verify_shards

    options = {} if workers is None else {"workers": workers}
    started = clock()
    problems = verify_shards(directory, **options)
    elapsed = clock() - started
    if problems:
        raise SystemExit(f"verify found problems in the benchmark set: {problems[:3]}")
    return elapsed


def cpu_cost(directory: Path, files: list[Path]) -> float:
    """CPU-seconds of verify in this one process over those of hashlib, same bytes.

    Unlike the rates, this hardly moves with what else the machine runs: on N
    idle cores, verify's rate is about N / cost times hashlib's.
    """
    started = time.process_time()
    hash_pass(files)
    hash_cpu = time.process_time() - started
    return verify_pass(directory, 1, time.process_time) / hash_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=45_000, help="about 1 GB of shards")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=None, help="verify's (default: all cores)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / "bench-out" / "verify")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    directory = shard_set(args.work, args.images, args.shard_size, args.workers)
    files = shard_files(directory)
    total_bytes = sum(path.stat().st_size for path in files)
    hash_pass(files)  # warm the page cache: both sides then read from memory
    hash_seconds, verify_seconds = [], []
    for _ in range(args.repeats):
        hash_seconds.append(hash_pass(files))
        verify_seconds.append(verify_pass(directory, args.workers))
    cost = cpu_cost(directory, files)
    hash_rate = total_bytes / min(hash_seconds)
    verify_rate = total_bytes / min(verify_seconds)
    result = {
        "set_bytes": total_bytes,
        "shards": len(files) // 2,
        "cores": os.cpu_count(),
        "workers": args.workers or os.cpu_count(),
        "hashlib_mb_per_s": round(hash_rate / 1e6, 1),
        "verify_mb_per_s": round(verify_rate / 1e6, 1),
        "verify_vs_hashlib": round(verify_rate / hash_rate, 2),
        "verify_cpu_per_hashlib_cpu": round(cost, 2),
        "load_average": round(os.getloadavg()[0], 1),
        "hashlib_seconds": [round(s, 3) for s in hash_seconds],
        "verify_seconds": [round(s, 3) for s in verify_seconds],
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"set: {total_bytes / 1e9:.2f} GB in {result['shards']} shards; "
        f"{result['cores']} cores, verify with {result['workers']} workers"
    )
    print(f"hashlib.sha256, one pass, 1 thread: {result['hashlib_mb_per_s']:8.1f} MB/s")
    print(f"alexpipe verify:                    {result['verify_mb_per_s']:8.1f} MB/s")
    print(f"ratio: {result['verify_vs_hashlib']}x (target >= 0.5x)")
    print(
        f"CPU per byte, verify in one process / hashlib: {cost:.2f} "
        f"(load average {result['load_average']})"
    )


if __name__ == "__main__":
    main()
