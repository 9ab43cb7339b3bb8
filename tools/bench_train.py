#!/usr/bin/env python
"""Training speed with real data vs synthetic data: does the loader starve the GPU?

Runs the paper's AlexNet for N optimizer steps twice in one process: once on
one fixed random batch already on the device (the model's own speed), once
fed by alexpipe's loader from real shards. The ratio real/synthetic near 1
means the loader keeps up; well below 1 means the GPU waits for data
(``data_wait_frac`` says how much).

Also the place for the PyTorch-side GPU checks: ``--bf16``,
``--channels-last`` and ``--parallel columns`` (the paper's two-column split,
on two GPUs, or both columns on one).

Usage:
  python tools/bench_train.py --shards DIR [--device cuda] [--backend dali]
         [--batch-size 128] [--steps 50] [--bf16] [--channels-last]
         [--parallel single|columns] [--width 1.0] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.load.loader import create_loader  # noqa: E402
from shards.remote import read_manifest  # noqa: E402
from trainer.config import TrainConfig, default_device  # noqa: E402
from trainer.distributed import DistributedContext  # noqa: E402
from trainer.engine import measure_batches, to_device, train_step  # noqa: E402
from trainer.run import build_network, build_optimizer  # noqa: E402


def train_config(arguments, classes: int) -> TrainConfig:
    """The trainer's config for the benchmarked network (the paper's recipe otherwise)."""
    return TrainConfig(
        shards_dir=str(arguments.shards),
        out_dir="",  # nothing is written
        device=arguments.device,
        parallel="columns" if arguments.parallel == "columns" else "ddp",
        num_classes=classes,
        width=arguments.width,
        channels_last=arguments.channels_last,
    ).resolved()


def build_model(config: TrainConfig) -> torch.nn.Module:
    """The network as alexpipe train builds it, in one process."""
    return build_network(config, DistributedContext(device=config.device))


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


WARM_UP_STEPS = 3


def run_steps(model, optimizer, timed_batches, steps: int, arguments) -> dict:
    """Time ``steps`` training steps after :data:`WARM_UP_STEPS` warm-up steps.

    ``timed_batches`` yields ``(batch, wait_seconds)`` as
    :func:`trainer.engine.measure_batches` does. The clock starts when the
    first timed batch has arrived, so the wait for that batch fell before it
    and is not counted; only the waits inside the timed window are.
    """
    device = torch.device(arguments.device)
    images_done, waited, started = 0, 0.0, None
    for step, ((images, labels), wait) in enumerate(timed_batches):
        if step == WARM_UP_STEPS:
            _synchronize(arguments.device)
            started, images_done, waited = time.perf_counter(), 0, 0.0
        elif step > WARM_UP_STEPS:
            waited += wait
        images, labels = to_device(images, labels, device, arguments.channels_last)
        train_step(model, optimizer, images, labels, bf16=arguments.bf16)
        images_done += images.shape[0]
        if step + 1 >= steps + WARM_UP_STEPS:
            break
    _synchronize(arguments.device)
    elapsed = time.perf_counter() - started
    return {"img_per_s": images_done / elapsed, "data_wait_frac": waited / elapsed}


def synthetic_batches(batch_size: int, classes: int, device: str):
    images = torch.randn(batch_size, 3, 224, 224, device=device)
    labels = torch.randint(0, classes, (batch_size,), device=device)
    while True:
        yield images, labels


def real_batches(arguments):
    loader = create_loader(
        arguments.shards,
        split="train",
        batch_size=arguments.batch_size,
        backend=arguments.backend,
        device=arguments.device,
        num_threads=arguments.num_threads,
    )
    while True:
        yield from loader


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--device", default=default_device(), choices=["cuda", "cpu"])
    parser.add_argument("--backend", default="dali", choices=["dali", "torch"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--num-threads", type=int, default=4)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--parallel", default="single", choices=["single", "columns"])
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--json", action="store_true")
    arguments = parser.parse_args(argv)

    classes = read_manifest(arguments.shards).num_classes
    result = {
        "device": arguments.device,
        "backend": arguments.backend,
        "batch_size": arguments.batch_size,
        "parallel": arguments.parallel,
        "bf16": arguments.bf16,
        "channels_last": arguments.channels_last,
    }
    if arguments.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    for name, batches in (
        ("synthetic", synthetic_batches(arguments.batch_size, classes, arguments.device)),
        ("real", real_batches(arguments)),
    ):
        torch.manual_seed(0)
        config = train_config(arguments, classes)
        model = build_model(config)
        optimizer = build_optimizer(model, config)
        measured = run_steps(model, optimizer, measure_batches(batches), arguments.steps, arguments)
        result[f"{name}_img_per_s"] = round(measured["img_per_s"], 1)
        result[f"{name}_data_wait_frac"] = round(measured["data_wait_frac"], 3)
    result["real_vs_synthetic"] = round(result["real_img_per_s"] / result["synthetic_img_per_s"], 3)
    if arguments.json:
        print(json.dumps(result))
    else:
        print(f"synthetic data: {result['synthetic_img_per_s']:9.1f} img/s (the model's speed)")
        print(
            f"real data:      {result['real_img_per_s']:9.1f} img/s "
            f"(waiting for data {result['real_data_wait_frac']:.0%} of the time)"
        )
        print(f"real/synthetic: {result['real_vs_synthetic']:.2f} (1.0: the loader keeps up)")
    return result


if __name__ == "__main__":
    main()
