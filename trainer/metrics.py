"""RUN/metrics.jsonl (one JSON object per line) and RUN/curves.png.

Training rows: ``epoch, step, loss, lr, img_per_s, data_wait_frac``;
evaluation rows: ``epoch, step, top1_err, top5_err, val_loss``; with
``--on-bad-sample skip``, a row ``epoch, step, skipped: {shard, key, index}``
for each sample left out of a batch because it does not decode (an epoch
gives every other sample once). ``epoch`` counts from 1 (the epoch the row
belongs to), ``step`` is the number of optimizer steps done since the start
of the run.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from shards.atomic import atomic_file, write_text_atomic

METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"
SUMMARY_SAMPLES = 5  # skipped samples named in the end-of-run line; the rest are counted


def read_rows(path: Path) -> list[dict]:
    """All rows of a metrics file (a torn last line from a crash is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsLog:
    """Appends rows to metrics.jsonl; written by rank 0 only."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, row: dict) -> None:
        """Add one row and flush it, so a crash loses at most the row being written."""
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def keep_until(self, step: int) -> None:
        """Drop rows after ``step``: on resume they are logged again from the checkpoint."""
        rows = [row for row in read_rows(self.path) if row["step"] <= step]
        write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in rows))


def skipped_summary(path: Path, shards_dir: str) -> str | None:
    """One line on the samples a run skipped (None if it skipped none), from its rows."""
    skips = [row["skipped"] for row in read_rows(path) if "skipped" in row]
    if not skips:
        return None
    samples = sorted({(skip["shard"], skip["key"], skip["index"]) for skip in skips})
    named = ", ".join(
        f"{shard}: {key} (index {index})" for shard, key, index in samples[:SUMMARY_SAMPLES]
    )
    if len(samples) > SUMMARY_SAMPLES:
        named += f" and {len(samples) - SUMMARY_SAMPLES} more"
    return (
        f"skipped {_count(len(samples), 'bad sample')} ({named}) {_count(len(skips), 'time')} "
        f"in all, each a 'skipped' row of {Path(path).name}; run alexpipe verify {shards_dir}, "
        f"rebuild with alexpipe verify {shards_dir} --repair --src SRC"
    )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def epoch_curves(rows: list[dict]) -> dict[str, dict[int, float]]:
    """Per-epoch series: mean training loss, last lr, top-1/top-5 error."""
    losses: dict[int, list[float]] = defaultdict(list)
    curves: dict[str, dict[int, float]] = {"loss": {}, "lr": {}, "top1_err": {}, "top5_err": {}}
    for row in rows:
        epoch = row["epoch"]
        if "loss" in row:
            losses[epoch].append(row["loss"])
            curves["lr"][epoch] = row["lr"]
        if "top1_err" in row:
            curves["top1_err"][epoch] = row["top1_err"]
            curves["top5_err"][epoch] = row["top5_err"]
    curves["loss"] = {epoch: math.fsum(values) / len(values) for epoch, values in losses.items()}
    return curves


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    """Draw loss, learning rate and top-1/top-5 error per epoch into ``png_path``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    curves = epoch_curves(read_rows(metrics_path))
    figure, (loss_axis, lr_axis, error_axis) = pyplot.subplots(1, 3, figsize=(14, 4), dpi=80)
    # Fixed margins: tight_layout costs about a second per drawing.
    figure.subplots_adjust(left=0.05, right=0.98, bottom=0.14, top=0.9, wspace=0.25)
    for axis, name, title in (
        (loss_axis, "loss", "training loss"),
        (lr_axis, "lr", "learning rate"),
    ):
        series = curves[name]
        axis.plot(list(series), list(series.values()), marker="o")
        axis.set_title(title)
        axis.set_xlabel("epoch")
    if curves["lr"]:
        lr_axis.set_yscale("log")
    for name, label in (("top1_err", "top-1 error"), ("top5_err", "top-5 error")):
        series = curves[name]
        error_axis.plot(list(series), list(series.values()), marker="o", label=label)
    error_axis.set_title("validation error")
    error_axis.set_xlabel("epoch")
    error_axis.legend()
    with atomic_file(Path(png_path), "wb") as handle:
        figure.savefig(handle, format="png")
    pyplot.close(figure)
