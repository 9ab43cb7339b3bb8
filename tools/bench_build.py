#!/usr/bin/env python
"""Benchmark build-shards against a plain converter and the no-Ray kernel bound.

All three run in this one invocation on the same corpus, so the ratios hold
even though absolute times on shared machines are noisy:

(a) plain: one process, the straightforward script people write — PIL open,
    convert, resize shorter side to 256, centre crop, JPEG q90, tarfile —
    with plain Pillow (installed into bench-out/plain-pillow on first use;
    falls back to the active PIL with a warning);
(b) bound: alexpipe's own shard kernel (draft decoding, Pillow-SIMD, exact
    stats) on every core through a process pool, no Ray;
(c) alexpipe: `build-shards` end to end (listing, Ray start, tasks, merge).

Usage: python tools/bench_build.py [--images 6000] [--workers N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# ImageNet's size mix: most Flickr images have a 500 px long side; some are
# smaller, a minority much larger (which is where DCT-domain scaling pays).
SIZE_MIX = [(0.62, (500, 500)), (0.18, (200, 480)), (0.20, (600, 2400))]
ASPECTS = [4 / 3, 3 / 2, 1.0, 3 / 4, 2 / 3, 16 / 9]

PLAIN_CONVERTER = r"""
import io, sys, tarfile, time
from pathlib import Path
import PIL
from PIL import Image
src, out = Path(sys.argv[1]), Path(sys.argv[2])
files = sorted(src.rglob("*.JPEG"))
started = time.perf_counter()
with tarfile.open(out, "w") as archive:
    for path in files:
        image = Image.open(path).convert("RGB")
        width, height = image.size
        scale = 256 / min(width, height)
        size = (max(256, round(width * scale)), max(256, round(height * scale)))
        image = image.resize(size, Image.BICUBIC)
        left, top = (size[0] - 256) // 2, (size[1] - 256) // 2
        image = image.crop((left, top, left + 256, top + 256))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        data = buffer.getvalue()
        info = tarfile.TarInfo(path.stem + ".jpg")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
print(len(files) / (time.perf_counter() - started), PIL.__version__)
"""


def make_corpus(directory: Path, num_images: int, num_classes: int = 20, seed: int = 0) -> None:
    """An ImageNet-like folder tree (train only) of synthetic natural-looking JPEGs."""
    from alexpipe.sample.images import ImageSpec, class_style, encode_jpeg, render_image

    marker = directory / f".complete-{num_images}"
    if marker.exists():
        return
    shutil.rmtree(directory, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for index in range(num_images):
        label = index % num_classes
        wnid = f"n{10000000 + label * 7919:08d}"
        weights = [weight for weight, _ in SIZE_MIX]
        low, high = SIZE_MIX[rng.choice(len(SIZE_MIX), p=weights)][1]
        long_side = int(rng.integers(low, high + 1))
        aspect = ASPECTS[rng.integers(len(ASPECTS))]
        width, height = (
            (long_side, round(long_side / aspect))
            if aspect >= 1
            else (round(long_side * aspect), long_side)
        )
        spec = ImageSpec(
            width=width,
            height=height,
            quality=int(rng.integers(70, 96)),
            subsampling=2,
            grayscale=bool(rng.random() < 0.02),
            content_seed=int(rng.integers(2**31)),
            style=class_style(label, num_classes, seed),
        )
        path = directory / "train" / wnid / f"{wnid}_{index}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_jpeg(render_image(spec), spec))
    marker.touch()


def plain_pillow_path(work: Path) -> str | None:
    """A directory with plain Pillow to put first on PYTHONPATH (None: use active PIL)."""
    target = work / "plain-pillow"
    if not (target / "PIL").is_dir():
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--target",
                str(target),
                "--no-deps",
                "pillow",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            print(
                "WARNING: could not install plain Pillow; baseline uses the active PIL",
                file=sys.stderr,
            )
            return None
    return str(target)


def run_plain(corpus: Path, work: Path, plain_pillow: bool = True) -> tuple[float, str]:
    environment = dict(os.environ)
    plain = plain_pillow_path(work) if plain_pillow else None
    if plain:
        environment["PYTHONPATH"] = plain
    output = subprocess.run(
        [sys.executable, "-c", PLAIN_CONVERTER, str(corpus), str(work / "plain.tar")],
        capture_output=True,
        text=True,
        check=True,
        env=environment,
    ).stdout.split()
    return float(output[0]), output[1]


def _kernel_task(arguments):
    from pipeline.build.shard_task import run_shard

    plan, transform_config, out_dir = arguments
    return run_shard(plan, transform_config, Path(out_dir))


def run_bound(corpus: Path, work: Path, workers: int, shard_size: int) -> float:
    """alexpipe's shard kernel on every core with a process pool (no Ray)."""
    from pipeline.build.plan import plan_build
    from pipeline.build.sources import discover
    from pipeline.build.transform import TransformConfig

    out = work / "bound"
    shutil.rmtree(out, ignore_errors=True)
    (out / "_work").mkdir(parents=True)
    listing = discover(corpus, "folder", ("train",))
    plans = plan_build({"train": listing.items["train"]}, shard_size, seed=0)
    config = TransformConfig()
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        records = list(pool.map(_kernel_task, [(plan, config, str(out)) for plan in plans]))
    elapsed = time.perf_counter() - started
    return sum(len(plan.samples) for plan in plans) / elapsed, records


def run_alexpipe(corpus: Path, work: Path, workers: int, shard_size: int):
    from pipeline.build.config import BuildConfig
    from pipeline.build.job import build_shards

    out = work / "alexpipe"
    shutil.rmtree(out, ignore_errors=True)
    config = BuildConfig(
        src=corpus,
        out=out,
        layout="folder",
        splits=("train",),
        shard_size=shard_size,
        workers=workers,
        progress=False,
    )
    started = time.perf_counter()
    summary = build_shards(config)
    elapsed = time.perf_counter() - started
    return summary.images_processed / elapsed, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--work", type=Path, default=ROOT / "bench-out" / "build")
    parser.add_argument(
        "--baseline-pil",
        choices=["plain", "active"],
        default="plain",
        help="plain: run the baseline with plain Pillow (pip-installed beside the corpus); "
        "active: with the PIL this environment has (Pillow-SIMD after make install)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    corpus = args.work / "corpus"
    print(f"corpus: {args.images} ImageNet-sized JPEGs in {corpus} ...", file=sys.stderr)
    make_corpus(corpus, args.images)
    sizes = [p.stat().st_size for p in corpus.rglob("*.JPEG")]
    plain_rate, plain_pil = run_plain(corpus, args.work, args.baseline_pil == "plain")
    bound_rate, bound_records = run_bound(corpus, args.work, args.workers, args.shard_size)
    alexpipe_rate, summary = run_alexpipe(corpus, args.work, args.workers, args.shard_size)
    result = {
        "images": args.images,
        "mean_jpeg_kb": round(float(np.mean(sizes)) / 1024, 1),
        "workers": args.workers,
        "plain_img_per_s": round(plain_rate, 1),
        "plain_pil": plain_pil,
        "bound_img_per_s": round(bound_rate, 1),
        "alexpipe_img_per_s": round(alexpipe_rate, 1),
        "alexpipe_vs_plain": round(alexpipe_rate / plain_rate, 2),
        "alexpipe_vs_bound": round(alexpipe_rate / bound_rate, 2),
        "peak_worker_rss_mb": summary.peak_worker_rss_mb,
        "bound_peak_worker_rss_mb": max(r["peak_rss_mb"] for r in bound_records),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"plain single-process Pillow ({plain_pil}): {plain_rate:8.1f} img/s")
    print(f"no-Ray kernel bound ({args.workers} procs):   {bound_rate:8.1f} img/s")
    print(
        f"alexpipe build-shards ({args.workers} workers): {alexpipe_rate:8.1f} img/s "
        f"= {result['alexpipe_vs_plain']}x plain, {result['alexpipe_vs_bound']}x bound "
        "(targets: >= 3x, >= 0.7x)"
    )
    print(f"peak RSS per worker: {summary.peak_worker_rss_mb:.0f} MB (target < 1024)")


if __name__ == "__main__":
    main()
