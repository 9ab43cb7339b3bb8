"""The frozen configuration of one `alexpipe build-shards` run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.build.sources import LAYOUTS as SOURCE_LAYOUTS
from pipeline.build.sources import SPLITS
from pipeline.build.transform import RESIZE_MODES

LAYOUTS = ("auto", *SOURCE_LAYOUTS)
__all__ = ["LAYOUTS", "RESIZE_MODES", "SPLITS", "BuildConfig"]


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides the bytes of the output, plus how to run.

    ``output_settings()`` is the part that decides the bytes; ``workers`` and
    ``address`` only decide how fast they are made.
    """

    src: Path
    out: Path
    layout: str = "auto"
    size: int = 256
    quality: int = 90
    resize: str = "center-crop"
    shard_size: int = 1000
    seed: int = 0
    splits: tuple[str, ...] = SPLITS
    max_rejected: float = 0.001
    exif_transpose: bool = False
    workers: int | None = None
    address: str | None = None
    progress: bool = True

    def output_settings(self, resolved_layout: str) -> dict:
        """The settings recorded in manifest.json: same settings, same bytes."""
        return {
            "size": self.size,
            "quality": self.quality,
            "resize": self.resize,
            "shard_size": self.shard_size,
            "seed": self.seed,
            "layout": resolved_layout,
            "exif_transpose": self.exif_transpose,
            "splits": list(self.splits),
        }
