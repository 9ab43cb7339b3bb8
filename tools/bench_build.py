#!/usr/bin/env python
"""Benchmark build-shards on real photographs against the converters it competes with.

Every row runs on the same corpus, in this one invocation, at two dataset
sizes, so the comparisons hold on a noisy shared machine. Each run is a fresh
process timed from its start to its exit; from the two sizes come

  slope    = (n2 - n1) / (t2 - t1)   images per second at scale, and
  start-up = t1 - n1 / slope         the fixed cost (interpreter, imports, Ray, ...).

Rows:
  plain     one process, the script people write: PIL open, convert, resize the
            shorter side to 256 (bicubic), centre crop, JPEG q90, tarfile; with
            plain Pillow (installed into WORK/plain-pillow on first use);
  pool      a bare process pool, the speed limit of this machine: Pillow-SIMD
            decode with JPEG draft, bilinear resize of the central square,
            JPEG q90, written to plain tars; no Ray, no statistics, no hashing;
  ffcv      FFCV's DatasetWriter (JPEG, max_resolution 256, jpeg_quality 90), in
            its own venv (tools/install_ffcv.sh); skipped, saying so, if absent;
  alexpipe  `alexpipe build-shards --workers N` end to end (the CLI in a
            subprocess): listing, Ray, decode, resize, encode, the stored JPEG
            decoded back for the exact statistics, tar + index + sha256, merge.

The corpus is alexpipe.sample.photos: scikit-image's and matplotlib's photos
cut and scaled to ImageNet's size mix (written once to WORK/photos-N, smaller
sizes are hard links to its first images). Also measured: the corpus (median
size, bytes, grayscale share, decode ms/image), the per-image stages of
alexpipe's kernel on one core, peak RSS of each run (largest process and the
whole process tree) and where alexpipe's CPU time goes (Ray's own processes
against the workers). A table goes to stdout, everything to WORK/bench_build.json.

Usage: python tools/bench_build.py [--sizes 2000,8000] [--repeats 2] [--workers 2]
       [--rows plain,pool,ffcv,alexpipe] [--work DIR] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from process_tree import run_timed  # noqa: E402 (tools/, this script's directory)

NUM_CLASSES = 10
SHARD_SIZE = 500  # alexpipe's shards, the pool's tars and FFCV's chunks alike
FFCV_PYTHON = ROOT / "tools" / "ffcv-venv" / "bin" / "python"
ROWS = ("plain", "pool", "ffcv", "alexpipe")
CONVERTERS = ROOT / "tools" / "converters"  # the baseline rows' scripts


# -- the corpus --------------------------------------------------------------------


def make_corpora(work: Path, sizes: list[int], workers: int) -> dict[int, Path]:
    """WORK/photos-N for each size: the largest written once, the others hard links."""
    from alexpipe.sample.photos import photo_path, write_photo_folder

    largest = max(sizes)
    source = work / f"photos-{largest}"
    marker = source / ".complete"
    if not marker.exists():
        shutil.rmtree(source, ignore_errors=True)
        print(f"writing {largest} photographs to {source} (once) ...", file=sys.stderr)
        write_photo_folder(
            source, NUM_CLASSES, largest // NUM_CLASSES, val_per_class=0, workers=workers
        )
        marker.touch()
    corpora = {largest: source / "train"}
    for size in sizes:
        if size == largest:
            continue
        target = work / f"photos-{size}"
        if not (target / ".complete").exists():
            shutil.rmtree(target, ignore_errors=True)
            for position in range(size):
                link = photo_path(target, "train", position, NUM_CLASSES)
                link.parent.mkdir(parents=True, exist_ok=True)
                os.link(photo_path(source, "train", position, NUM_CLASSES), link)
            (target / ".complete").touch()
        corpora[size] = target / "train"
    return corpora


def describe_corpus(train: Path, sample: int = 400) -> dict:
    """Median size and bytes, grayscale share and decode time (one core, this PIL)."""
    import numpy as np
    from PIL import Image

    paths = sorted(train.rglob("*.JPEG"))
    sizes = np.array([path.stat().st_size for path in paths])
    pixels, gray, over_1000 = [], 0, 0
    for path in paths:
        with Image.open(path) as image:
            pixels.append(image.size[0] * image.size[1])
            gray += image.mode == "L"
            over_1000 += max(image.size) > 1000
    median_index = int(np.argsort(pixels)[len(pixels) // 2])
    with Image.open(paths[median_index]) as image:
        median_size = image.size
    step = max(1, len(paths) // sample)
    datas = [path.read_bytes() for path in paths[::step]]
    timings = {}
    for name, draft in (("decode_ms", False), ("decode_draft_ms", True)):
        started = time.process_time()
        for data in datas:
            image = Image.open(io.BytesIO(data))
            if draft:
                image.draft("RGB", (256, 256))
            image.load()
        timings[name] = round((time.process_time() - started) / len(datas) * 1000, 3)
    return {
        "images": len(paths),
        "median_size": f"{median_size[0]}x{median_size[1]}",
        "median_kb": round(float(np.median(sizes)) / 1000, 1),
        "mean_kb": round(float(np.mean(sizes)) / 1000, 1),
        "grayscale_share": round(gray / len(paths), 4),
        "over_1000px_share": round(over_1000 / len(paths), 4),
        **timings,
    }


def kernel_stages(train: Path, work: Path, count: int = 200, rounds: int = 5) -> dict:
    """Per-image costs on one core, ms/image of this process's CPU time.

    alexpipe's stages, and the whole of one shard (``run_shard``: everything a
    worker does per image) against the pool's per-image work on the same
    images: the ratio of those two is the bound of the alexpipe/pool ratio,
    free of scheduling, Ray and the other processes. Every stage runs once per
    round and each stage's least disturbed round counts: a shared machine
    slows some rounds.
    """
    import numpy as np
    from converters import pool as pool_converter  # tools/converters/pool.py

    from pipeline.build.plan import ShardPlan, plan_build
    from pipeline.build.shard_task import run_shard
    from pipeline.build.sources import discover
    from pipeline.build.stats import PixelStats
    from pipeline.build.transform import TransformConfig, _decode_stored, process_image

    items = discover(train.parent, "folder", ("train",)).items["train"]
    plan = plan_build({"train": items}, len(items), seed=0)[0]
    plan = ShardPlan(**{**vars(plan), "samples": plan.samples[:count]})
    paths = [str(planned.item.location) for planned in plan.samples]
    datas = [Path(path).read_bytes() for path in paths]
    shard_dir = work / "out" / "stages"
    (shard_dir / "_work").mkdir(parents=True, exist_ok=True)
    config = TransformConfig()
    results = [process_image(data, config) for data in datas]
    jpgs = [result.jpg for result in results]
    pixels = [result.pixels for result in results]
    interleaved = [np.ascontiguousarray(image[::-1])[::-1] for image in pixels]  # strided
    per_shard = [plan]  # run_shard's time is divided by the plan's images below
    stages = {
        "pool_per_image_ms": (
            lambda chunk: pool_converter.chunk((str(shard_dir / "pool.tar"), chunk)),
            [paths],
        ),
        "run_shard_per_image_ms": (lambda one: run_shard(one, config, shard_dir), per_shard),
        "process_image_ms": (lambda data: process_image(data, config), datas),
        "process_image_no_stats_ms": (
            lambda data: process_image(data, config, decode_stored=False),
            datas,
        ),
        "decode_back_ms": (_decode_stored, jpgs),
        "pixel_stats_add_ms": (PixelStats(config.size).add, pixels),
        "pixel_stats_add_strided_ms": (PixelStats(config.size).add, interleaved),
    }
    best = dict.fromkeys(stages, float("inf"))
    for _ in range(rounds):
        for name, (function, items) in stages.items():
            started = time.process_time()
            for item in items:
                function(item)
            images = len(paths) if name in ("pool_per_image_ms", "run_shard_per_image_ms") else 1
            elapsed = (time.process_time() - started) / (len(items) * images) * 1000
            best[name] = min(best[name], elapsed)
    shutil.rmtree(shard_dir, ignore_errors=True)
    result = {name: round(value, 4) for name, value in best.items()}
    result["kernel_ratio_pool_vs_run_shard"] = round(
        best["pool_per_image_ms"] / best["run_shard_per_image_ms"], 3
    )
    return result


# -- running one converter -----------------------------------------------------------


def plain_pillow(work: Path) -> str | None:
    """A directory with plain Pillow to put first on PYTHONPATH (None: use the active PIL)."""
    target = work / "plain-pillow"
    if not (target / "PIL").is_dir():
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target)]
            + ["--no-deps", "pillow"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            print("WARNING: no plain Pillow; the plain row uses the active PIL", file=sys.stderr)
            return None
    return str(target)


def pil_name(environment: dict | None = None, python: str = sys.executable) -> str:
    probe = (
        "import importlib.metadata as m, PIL\n"
        "try: simd = m.version('pillow-simd')\nexcept m.PackageNotFoundError: simd = None\n"
        "print(('Pillow-SIMD ' if simd == PIL.__version__ else 'Pillow ') + PIL.__version__)"
    )
    result = subprocess.run(
        [python, "-c", probe], capture_output=True, text=True, env=environment, check=False
    )
    return result.stdout.strip() or "unknown"


def converters(args, work: Path, plain_path: str | None) -> dict:
    """Row name -> function(size, corpus) -> run result."""
    base = dict(os.environ)
    base["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([base["PYTHONPATH"]] if base.get("PYTHONPATH") else [])
    )
    plain_env = dict(base, PYTHONPATH=plain_path) if plain_path else base

    def out_dir(row: str, size: int) -> Path:
        path = work / "out" / f"{row}-{size}"
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def plain(size, corpus):
        target = out_dir("plain", size)
        command = [sys.executable, str(CONVERTERS / "plain_pillow.py"), str(corpus), str(target)]
        return run_timed(command, plain_env)

    def pool(size, corpus):
        target = out_dir("pool", size)
        command = [sys.executable, str(CONVERTERS / "pool.py"), str(corpus), str(target)]
        command += [str(args.workers)]
        return run_timed(command + [str(SHARD_SIZE)], base)

    def ffcv(size, corpus):
        target = out_dir("ffcv", size)
        target.mkdir()
        command = [
            str(args.ffcv_python),
            str(CONVERTERS / "ffcv_writer.py"),
            str(corpus),
            str(target / "data.beton"),
        ]
        return run_timed(command + [str(args.workers), str(SHARD_SIZE)])

    def alexpipe(size, corpus):
        target = out_dir("alexpipe", size)
        command = [sys.executable, "-m", "alexpipe.cli", "build-shards"]
        command += ["--src", str(corpus.parent), "--out", str(target), "--splits", "train"]
        command += ["--workers", str(args.workers)]
        command += ["--shard-size", str(SHARD_SIZE), "--no-progress"]
        result = run_timed(command, base)
        manifest = json.loads((target / "manifest.json").read_text())
        assert manifest["splits"]["train"]["num_samples"] == size, manifest["splits"]
        return result

    return {"plain": plain, "pool": pool, "ffcv": ffcv, "alexpipe": alexpipe}


def ffcv_problem(python: Path) -> str | None:
    """None when FFCV imports in ``python``'s venv, else why not, in one line."""
    if not python.exists():
        log = ROOT / "bench-out" / "install_ffcv.log"  # written by `make bench`
        lines = log.read_text().strip().splitlines() if log.exists() else []
        why = f": {lines[-1]}" if lines else ""
        return f"FFCV is not installed ({python} missing{why}); run tools/install_ffcv.sh"
    check = subprocess.run(
        [str(python), "-c", "import ffcv.writer, ffcv.fields"],
        capture_output=True,
        text=True,
        check=False,
    )
    if check.returncode != 0:
        lines = check.stderr.strip().splitlines() or ["import ffcv failed"]
        return f"FFCV does not import in {python}: {lines[-1]}"
    return None


# -- summary -------------------------------------------------------------------------


def fit(small: int, large: int, runs: dict) -> dict:
    """Slope and start-up from one run at each size; CPU ms per image at scale."""
    t1, t2 = runs[small]["seconds"], runs[large]["seconds"]
    slope = (large - small) / (t2 - t1) if t2 > t1 else float("inf")
    cpu = runs[large]["cpu_seconds"] - runs[small]["cpu_seconds"]
    return {
        "slope": slope,
        "startup_s": t1 - small / slope,
        "total_rate": large / t2,
        "cpu_ms_per_image": 1000 * cpu / (large - small),
    }


def span(values: list[float], digits: int = 0) -> str:
    low, high = min(values), max(values)
    if digits == 0:
        low, high = round(low), round(high)
        return f"{low:,}" if low == high else f"{low:,}–{high:,}"
    return f"{low:.{digits}f}" if low == high else f"{low:.{digits}f}–{high:.{digits}f}"


def summarize(rows: list[str], repeats: list[dict], sizes: list[int]) -> dict:
    small, large = sizes[0], sizes[-1]
    fits = {row: [fit(small, large, repeat[row]) for repeat in repeats] for row in rows}
    summary = {"rows": {}, "ratios": {}, "cpu_ratios": {}}
    for row in rows:
        summary["rows"][row] = {
            "slope_img_per_s": [round(f["slope"], 1) for f in fits[row]],
            "startup_s": [round(f["startup_s"], 2) for f in fits[row]],
            "total_rate_at_largest": [round(f["total_rate"], 1) for f in fits[row]],
            "cpu_ms_per_image": [round(f["cpu_ms_per_image"], 3) for f in fits[row]],
        }
    if "alexpipe" in rows:
        for other in rows:
            if other != "alexpipe":
                pairs = list(zip(fits["alexpipe"], fits[other], strict=True))
                summary["ratios"][f"alexpipe_vs_{other}"] = [
                    round(a["slope"] / b["slope"], 3) for a, b in pairs
                ]
                summary["cpu_ratios"][f"alexpipe_vs_{other}"] = [
                    round(b["cpu_ms_per_image"] / a["cpu_ms_per_image"], 3) for a, b in pairs
                ]
    return summary


def print_table(result: dict) -> None:
    sizes, rows = result["sizes"], result["rows"]
    corpus = result["corpus"]
    print(
        f"\ncorpus: {corpus['images']} photographs, median {corpus['median_size']}, "
        f"median {corpus['median_kb']} KB (mean {corpus['mean_kb']} KB), "
        f"{corpus['grayscale_share']:.1%} grayscale, {corpus['over_1000px_share']:.1%} "
        f"over 1000 px; decode {corpus['decode_ms']} ms/image "
        f"({corpus['decode_draft_ms']} with draft), {result['pil']}"
    )
    if not result["pil"].startswith("Pillow-SIMD"):
        print("WARNING: the active PIL is not Pillow-SIMD (make install builds it)")
    print(f"{result['workers']} workers, {len(result['repeats'])} repeat(s); ranges over repeats\n")
    header = ["converter"] + [f"s @ {size:,}" for size in sizes]
    header += ["img/s at scale", "start-up s", "CPU ms/img at scale"]
    header += [f"peak RSS MB, largest process (all) @ {sizes[0]:,} / {sizes[-1]:,}"]
    table = [header]
    for row in rows:
        runs = [repeat[row] for repeat in result["repeats"]]
        line = [row] + [span([run[size]["seconds"] for run in runs], 1) for size in sizes]
        line.append(span(result["summary"]["rows"][row]["slope_img_per_s"]))
        line.append(span(result["summary"]["rows"][row]["startup_s"], 1))
        line.append(span(result["summary"]["rows"][row]["cpu_ms_per_image"], 2))
        peaks = [
            span([run[size]["peak_process_rss_mb"] for run in runs])
            + " ("
            + span([run[size]["peak_tree_rss_mb"] for run in runs])
            + ")"
            for size in (sizes[0], sizes[-1])
        ]
        line.append(" / ".join(peaks))
        table.append(line)
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
    print()
    targets = {"alexpipe_vs_pool": 0.75, "alexpipe_vs_ffcv": 1.15}
    for name, values in result["summary"]["ratios"].items():
        target = f" (target >= {targets[name]})" if name in targets else ""
        cpu = span(result["summary"]["cpu_ratios"][name], 2)
        print(f"{name}: slope ratio {span(values, 2)}{target}; by CPU time per image {cpu}")
    if result.get("ffcv_skipped"):
        print(f"ffcv: SKIPPED ({result['ffcv_skipped']})")
    stages = result.get("stages")
    if stages:
        print(
            f"one core, best of 5 rounds, ms/image: the pool's work {stages['pool_per_image_ms']}, "
            f"alexpipe's run_shard {stages['run_shard_per_image_ms']}: "
            f"{stages['kernel_ratio_pool_vs_run_shard']}x, the bound of alexpipe_vs_pool"
        )
        print(
            f"alexpipe kernel, one core, ms/image: process_image {stages['process_image_ms']} "
            f"(without the decode-back and stats {stages['process_image_no_stats_ms']}); "
            f"decode-back {stages['decode_back_ms']}; PixelStats.add "
            f"{stages['pixel_stats_add_ms']} (target <= 0.1; "
            f"{stages['pixel_stats_add_strided_ms']} from a strided array)"
        )
    if "alexpipe" in rows:
        run = result["repeats"][-1]["alexpipe"][sizes[-1]]
        roles = sorted(run["cpu_by_role"].items(), key=lambda item: -item[1])
        roles = ", ".join(f"{role} {seconds}" for role, seconds in roles)
        print(
            f"alexpipe @ {sizes[-1]:,}, CPU seconds: {run['cpu_seconds']} in all; "
            f"sampled by process: {roles}"
        )
        for size in sizes:
            peaks = result["repeats"][-1]["alexpipe"][size]["peak_rss_mb_by_role"]
            peaks = ", ".join(f"{role} {mb:.0f}" for role, mb in peaks.items() if mb)
            print(f"alexpipe @ {size:,}, peak RSS MB of the largest process of each kind: {peaks}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2000,8000", help="two dataset sizes (images)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--work", type=Path, default=ROOT / "bench-out" / "build")
    parser.add_argument("--ffcv-python", type=Path, default=FFCV_PYTHON)
    parser.add_argument(
        "--plain-pil",
        choices=["plain", "active"],
        default="plain",
        help="plain: the plain row with plain Pillow (pip-installed into WORK on first use); "
        "active: with this environment's PIL",
    )
    parser.add_argument("--no-stages", action="store_true", help="skip the one-core stage timings")
    parser.add_argument("--json", action="store_true", help="print the JSON result, not the table")
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.sizes.split(","))
    if len(sizes) != 2 or sizes[0] < 1 or sizes[0] == sizes[1]:
        parser.error("--sizes takes two different image counts, e.g. 2000,8000")
    rows = [row for row in args.rows.split(",") if row]
    if unknown := set(rows) - set(ROWS):
        parser.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    args.work.mkdir(parents=True, exist_ok=True)

    result = {"sizes": sizes, "workers": args.workers, "shard_size": SHARD_SIZE, "pil": pil_name()}
    if "ffcv" in rows and (reason := ffcv_problem(args.ffcv_python)):
        print(f"SKIPPING the ffcv row: {reason}", file=sys.stderr)
        result["ffcv_skipped"] = reason
        rows.remove("ffcv")
    result["rows"] = rows
    corpora = make_corpora(args.work, sizes, args.workers)
    result["corpus"] = describe_corpus(corpora[sizes[-1]])
    if not args.no_stages:
        result["stages"] = kernel_stages(corpora[sizes[-1]], args.work)
    plain_path = plain_pillow(args.work) if "plain" in rows and args.plain_pil == "plain" else None
    if "plain" in rows:
        result["plain_pil"] = pil_name(dict(os.environ, PYTHONPATH=plain_path or ""))
    run = converters(args, args.work, plain_path)
    result["repeats"] = []
    for repeat in range(args.repeats):
        # Alternate the order, so that a slow spell of a shared machine does not
        # always fall on the same row.
        order = rows if repeat % 2 == 0 else rows[::-1]
        runs = {row: {} for row in rows}
        for row in order:
            for size in sizes:
                print(f"repeat {repeat + 1}: {row} @ {size} ...", file=sys.stderr)
                runs[row][size] = run[row](size, corpora[size])
        result["repeats"].append(runs)
    result["summary"] = summarize(rows, result["repeats"], sizes)
    shutil.rmtree(args.work / "out", ignore_errors=True)
    (args.work / "bench_build.json").write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
        print(f"\n(all figures: {args.work / 'bench_build.json'})")


if __name__ == "__main__":
    main()
