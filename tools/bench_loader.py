#!/usr/bin/env python
"""Loader benchmark: DALI CPU loader vs a typical WebDataset + PIL + DataLoader loader.

On the same shards (``build-shards`` of real photographs at ImageNet's size
mix, ``alexpipe.sample.photos``, or ``--shards DIR``), measures the train
images/s of:

1. alexpipe's DALI loader on CPU (ROI decode, crop, flip, PCA lighting, mean
   subtraction; ``--threads`` DALI threads);
2. the baseline most PyTorch code uses: ``webdataset.WebDataset`` + PIL
   decode + random crop, flip, ToTensor/Normalize written as torchvision
   does + ``torch.utils.data.DataLoader`` with ``--threads`` workers;
3. alexpipe's torch reference backend (PIL, same DataLoader worker count);
4. DALI decoding alone (full 256×256 images, same threads): the bound for
   any CPU loader that decodes every pixel.

Each figure is the median of ``--repeats`` runs, run in turns so that
background load hits all of them alike. Usage:
    python tools/bench_loader.py [--images 2000] [--batches 40] [--shards DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARD_SIZE = 500


# --- shards of real photographs ----------------------------------------------------------


def build_photo_shards(out: Path, num_images: int, num_classes: int = 10) -> tuple[Path, int]:
    """A shard directory made by ``build-shards`` from real photographs at ImageNet's size
    mix (:mod:`alexpipe.sample.photos`): decode time follows a photograph's bytes, and
    synthetic JPEGs decode at another speed."""
    from alexpipe.sample.photos import write_photo_folder

    photos, shards = out / "photos", out / "shards"
    per_class = max(1, num_images // num_classes)
    write_photo_folder(photos, num_classes, per_class, val_per_class=0, workers=os.cpu_count())
    command = [sys.executable, "-m", "alexpipe.cli", "build-shards", "--src", str(photos)]
    command += ["--out", str(shards), "--splits", "train", "--shard-size", str(SHARD_SIZE)]
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run(command + ["--no-progress"], env=environment, check=True, capture_output=True)
    return shards, per_class * num_classes


# --- the loaders under test ---------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its children, live or exited."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    exited = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + exited.ru_utime + exited.ru_stime
    ticks = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == os.getpid():  # parent pid: a DataLoader worker
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def time_batches(batches, num_batches: int, warmup: int = 2) -> tuple[float, float]:
    """(images per second, images per CPU-second) of an endless batch iterator.

    Wall-clock rates swing with whatever else runs on the machine; CPU time
    per image (loader threads and worker processes included) is the steadier
    measure of how much work a loader needs.
    """
    for _ in range(warmup):
        next(batches)
    images, started, cpu_started = 0, time.perf_counter(), cpu_seconds()
    for _ in range(num_batches):
        images += len(next(batches)[1])
    wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    return images / wall, images / cpu


def endless(make_iterable):
    """Iterate ``make_iterable()`` again and again (one epoch after another)."""
    while True:
        yield from make_iterable()


def alexpipe_rate(shards_dir: Path, backend: str, batch_size: int, threads: int, batches: int):
    from pipeline.load.loader import create_loader

    loader = create_loader(
        shards_dir, "train", batch_size=batch_size, backend=backend, num_threads=threads
    )
    return time_batches(endless(lambda: loader), batches)


def webdataset_rate(shards_dir: Path, batch_size: int, workers: int, batches: int):
    """The typical PyTorch loader: WebDataset + PIL + torchvision-style transforms."""
    import torch
    import webdataset
    from torch.utils.data import DataLoader

    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

    def transform(image: Image.Image) -> torch.Tensor:
        # RandomCrop(224) + RandomHorizontalFlip() + ToTensor() + Normalize(mean, std)
        x, y = random.randint(0, 32), random.randint(0, 32)
        image = image.crop((x, y, x + 224, y + 224))
        if random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        tensor = torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float().div_(255)
        return (tensor - mean) / std

    urls = [str(path) for path in sorted(shards_dir.glob("train-*.tar"))]
    dataset = (
        webdataset.WebDataset(urls, shardshuffle=len(urls), empty_check=False)
        .shuffle(1000)
        .decode("pil")
        .to_tuple("jpg", "cls")
        .map_tuple(transform, int)
    )
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, persistent_workers=True
    )
    return time_batches(endless(lambda: loader), batches)


def dali_decode_rate(shards_dir: Path, batch_size: int, threads: int, batches: int):
    """DALI decoding whole 256×256 images, fed like the loader, nothing else."""
    from pipeline.load.dali_pipes import BatchFeeder, decode_only_pipeline
    from pipeline.load.loader import create_loader
    from pipeline.load.samples import SampleReader

    loader = create_loader(shards_dir, "train", batch_size=batch_size, num_threads=threads)
    feeder = BatchFeeder(SampleReader(loader.table), loader.spec, train=False)
    pipeline = decode_only_pipeline(
        feeder,
        device="cpu",
        batch_size=batch_size,
        num_threads=threads,
        device_id=None,
        prefetch_queue_depth=2,
    )
    pipeline.build()

    def epochs():
        for epoch in range(10**9):
            feeder.start(loader.plan(epoch), 0, None)
            while True:
                try:
                    outputs = pipeline.run()
                except StopIteration:
                    pipeline.reset()
                    break
                yield outputs[0], range(len(outputs[0]))

    return time_batches(epochs(), batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, help="existing shard directory (else synthetic)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    arguments = parser.parse_args()
    # Said once per worker and not about speed: the baseline's torch.from_numpy of a PIL
    # array (read-only), and DALI's note that the decode-only pipeline uses one feeder output.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    warnings.filterwarnings("ignore", message="The external source node")

    with tempfile.TemporaryDirectory(prefix="alexpipe-bench-") as temporary:
        shards_dir = arguments.shards
        if shards_dir is None:
            started = time.perf_counter()
            shards_dir, images = build_photo_shards(Path(temporary), arguments.images)
            sizes = [path.stat().st_size for path in shards_dir.glob("*.tar")]
            print(
                f"built {images} photographs into {len(sizes)} shards "
                f"({sum(sizes) / images / 1024:.1f} KiB/image) "
                f"in {time.perf_counter() - started:.1f} s",
                file=sys.stderr,
            )
        size, threads, batches = arguments.batch_size, arguments.threads, arguments.batches
        measures = {
            "dali_cpu": lambda: alexpipe_rate(shards_dir, "dali", size, threads, batches),
            "webdataset_pil_dataloader": lambda: webdataset_rate(
                shards_dir, size, threads, batches
            ),
            "torch_reference": lambda: alexpipe_rate(shards_dir, "torch", size, threads, batches),
            "dali_decode_only": lambda: dali_decode_rate(shards_dir, size, threads, batches),
        }
        runs = {name: [] for name in measures}
        for _ in range(arguments.repeats):
            for name, measure in measures.items():
                runs[name].append(measure())
    figures = {name: statistics.median(rate for rate, _ in rates) for name, rates in runs.items()}
    per_cpu = {name: statistics.median(rate for _, rate in rates) for name, rates in runs.items()}
    baseline = "webdataset_pil_dataloader"
    report = {
        "img_per_s": figures,
        "img_per_cpu_s": per_cpu,
        "runs_img_per_s": {name: [rate for rate, _ in rates] for name, rates in runs.items()},
        "dali_vs_webdataset": figures["dali_cpu"] / figures[baseline],
        "dali_vs_webdataset_per_cpu_s": per_cpu["dali_cpu"] / per_cpu[baseline],
        "batch_size": size,
        "threads": threads,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    if arguments.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{'':>28}  {'img/s':>7}  {'img/CPU-s':>9}  runs (img/s)")
    for name, rate in figures.items():
        runs_text = ", ".join(f"{rate:.0f}" for rate in report["runs_img_per_s"][name])
        print(f"{name:>28}: {rate:7.0f}  {per_cpu[name]:9.0f}  {runs_text}")
    print(
        f"{'DALI CPU / WebDataset':>28}: {report['dali_vs_webdataset']:.2f}x img/s, "
        f"{report['dali_vs_webdataset_per_cpu_s']:.2f}x img/CPU-s (target 2.5x); "
        f"load average {report['load_average'][0]:.1f} on {report['cpus']} CPUs"
    )


if __name__ == "__main__":
    main()
