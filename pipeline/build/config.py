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

    @classmethod
    def from_settings(cls, settings: dict, src: Path, out: Path, **run) -> BuildConfig:
        """The config whose ``output_settings`` are ``settings`` (a manifest's ``config``):
        the build that made a shard directory, to make its shards again.

        ``run``: how to run (workers, address, progress), which changes no byte.
        """
        return cls(
            src=Path(src),
            out=Path(out),
            layout=settings["layout"],
            size=settings["size"],
            quality=settings["quality"],
            resize=settings["resize"],
            shard_size=settings["shard_size"],
            seed=settings["seed"],
            exif_transpose=settings["exif_transpose"],
            splits=tuple(settings["splits"]),
            **run,
        )

    def transform_config(self):
        """The per-image settings every shard task gets (a ``TransformConfig``)."""
        from pipeline.build.transform import TransformConfig

        return TransformConfig(
            size=self.size,
            quality=self.quality,
            resize=self.resize,
            exif_transpose=self.exif_transpose,
        )
