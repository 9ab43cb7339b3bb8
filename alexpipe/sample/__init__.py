"""A deterministic, ImageNet-shaped sample dataset (``alexpipe sample``).

    from alexpipe.sample import SampleConfig, write_sample
    summary = write_sample(SampleConfig(out=Path("sample"), layout="tars"))

Same config, same bytes: every file, archive and meta.mat is reproducible,
and an image's bytes depend only on (seed, split, key), so the folder, tars
and kaggle layouts of one seed hold identical pictures. Classes are learnable
(each has a hue, stripe texture and shape of its own), images have realistic
sizes, and ``odd_files`` adds the oddities real ImageNet readers meet.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from alexpipe.sample.oddities import ODD_KINDS, REJECTED_KINDS
from alexpipe.sample.plan import (
    LAYOUTS,
    SampleClass,
    SampleConfig,
    SampleItem,
    SamplePlan,
    plan_sample,
)
from shards.errors import UserError

__all__ = [
    "LAYOUTS",
    "ODD_KINDS",
    "REJECTED_KINDS",
    "SampleClass",
    "SampleConfig",
    "SampleItem",
    "SamplePlan",
    "SampleSummary",
    "check_sample",
    "plan_sample",
    "write_sample",
]


@dataclass(frozen=True)
class SampleSummary:
    """What :func:`write_sample` wrote.

    ``items`` has every image file (split, key, wnid, label, kind, size, mode),
    sorted by split then key; ``files`` the paths written, relative to ``out``
    (the archives for ``tars``, every image otherwise).
    """

    out: Path
    layout: str
    classes: tuple[SampleClass, ...]
    items: tuple[SampleItem, ...]
    files: tuple[Path, ...]
    total_bytes: int

    @property
    def counts(self) -> dict[str, int]:
        """Number of files per split, odd files included."""
        return dict(Counter(item.split for item in self.items))

    @property
    def odd_files(self) -> dict[str, str]:
        """key -> odd kind, for every odd file (keys are unique across splits)."""
        return {item.key: item.kind for item in self.items if item.kind != "normal"}

    def describe(self) -> str:
        """One line for the user."""
        counts = self.counts
        odd = f", {len(self.odd_files)} odd files" if self.odd_files else ""
        return (
            f"wrote {counts.get('train', 0)} train + {counts.get('val', 0)} val images of "
            f"{len(self.classes)} classes{odd} as {self.layout} layout to {self.out} "
            f"({self.total_bytes / 1e6:.1f} MB)"
        )


def check_sample(config: SampleConfig) -> SamplePlan:
    """Raise UserError if ``config`` cannot be written (bad values, ``out`` not
    a new or empty directory); otherwise return its plan (``len(plan.items)``
    images, for a progress bar), which :func:`write_sample` can take."""
    plan = plan_sample(config)
    _check_out(Path(config.out))
    return plan


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        # Writing over an older sample could mix two configs in one tree.
        raise UserError(f"--out {out} is not empty; choose a new or empty directory")


def write_sample(
    config: SampleConfig,
    on_image: Callable[[], object] | None = None,
    *,
    plan: SamplePlan | None = None,
) -> SampleSummary:
    """Write the sample described by ``config`` under ``config.out``.

    ``on_image`` is called once per image written (e.g. a progress bar's
    ``update``). ``plan``: this config's plan from :func:`check_sample`, so
    that it is not drawn twice. Raises UserError for a bad config or a
    non-empty ``out``.
    """
    from alexpipe.sample.layouts import WRITERS  # loads scipy, needed only to write

    if plan is None:
        plan = plan_sample(config)
    elif plan.config != config:
        raise ValueError("write_sample: the plan is of another config")
    out = Path(config.out)
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    files = WRITERS[config.layout](plan, out, on_image or (lambda: None))
    return SampleSummary(
        out=out,
        layout=config.layout,
        classes=plan.classes,
        items=plan.items,
        files=tuple(sorted(files)),
        total_bytes=sum((out / path).stat().st_size for path in files),
    )
