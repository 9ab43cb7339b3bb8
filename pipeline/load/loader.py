"""``create_loader``: the one factory of the online loaders.

It checks the arguments, opens the shard location (:mod:`shards.remote`),
reads the manifest, the split's index files and the augmentation's
statistics, and builds the chosen backend, which it imports only in the
branch that chooses it (the DALI pipelines, :mod:`pipeline.load.dali_pipes`,
or the PyTorch reference, :mod:`pipeline.load.torch_loader`); the backends
share :mod:`pipeline.load.base` and never import this module.

Remote shards (any fsspec URL, or ``pipe:``) are read through a bounded,
verified local cache, the same for both backends (:mod:`pipeline.load.staging`).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.load.augment import AugmentSpec, Normalize
from pipeline.load.augment import draw_augmentation as paper_draws
from pipeline.load.augment import spec_from_stats as _spec_from_stats
from pipeline.load.bad_samples import BadSamples
from pipeline.load.base import DrawFunction, EpochLoader, LoaderConfig
from pipeline.load.epochs import DEFAULT_SHUFFLE_WINDOW
from pipeline.load.interface import (
    Backend,
    Device,
    OnBadSample,
    parse_backend,
    parse_device,
    parse_on_bad_sample,
)
from pipeline.load.samples import load_split_table
from pipeline.load.staging import open_remote_split, stretch_in_use
from shards.errors import UserError
from shards.manifest import Manifest
from shards.remote import (
    LocalSource,
    ShardSource,
    SourceFileMissing,
    open_source,
    read_manifest,
    read_mean,
    read_stats,
)


def read_augment_spec(
    source: ShardSource, manifest: Manifest, normalize: str, lighting_std: float
) -> AugmentSpec:
    """The augmentation description from ``stats.json`` and ``mean.npy`` of a shard location
    (a local directory or :mod:`shards.remote`)."""
    try:
        stats, mean_image = read_stats(source, manifest), read_mean(source, manifest)
    except SourceFileMissing as error:
        raise UserError(f"{error}; rebuild the shards") from None
    try:
        return _spec_from_stats(stats, mean_image, normalize, lighting_std)
    except (KeyError, ValueError) as error:
        raise UserError(f"{source.location}: unusable stats.json or mean.npy ({error})") from None


def create_loader(
    shards_dir,
    split: str = "train",
    batch_size: int = 128,
    backend: str | Backend = "dali",
    device: str | Device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_threads: int = 2,
    normalize: str = "paper",
    lighting_std: float = 0.1,
    ten_crop: bool = False,
    with_index: bool = False,
    *,
    draw_augmentation: DrawFunction | None = None,
    shuffle_window: int = DEFAULT_SHUFFLE_WINDOW,
    cache_dir: str | Path | None = None,
    cache_bytes: int | None = None,
    on_bad_sample: str | OnBadSample = OnBadSample.STOP,
) -> EpochLoader:
    """A loader over ``split`` of a shard directory or location.

    Yields ``(images, labels)`` (``(images, labels, indices)`` with
    ``with_index``): float32 N×3×224×224 (N×10×3×224×224 with ``ten_crop``,
    val only), int64 labels, int64 indices (``index`` of KEY.json). On
    ``device="cuda"`` (alias ``"gpu"``) all are on the current CUDA device.
    ``draw_augmentation`` replaces :func:`pipeline.load.augment.draw_augmentation`
    (tests use it to pin crops, flips and lighting).

    ``shards_dir`` may also be remote: any fsspec URL (``https://``, ``s3://``,
    ``gs://``, ``hf://``...) or ``pipe:COMMAND`` (:mod:`shards.remote`). Each
    shard is then staged into a local cache on its first read, verified against
    the manifest's size and sha256 before use, and prefetched in the order this
    rank's epoch reads them; both backends read the staged files.
    ``cache_dir``: the cache's directory (one process at a time; loaders of one
    process may share it), by default a temporary directory removed when the
    loader closes. ``cache_bytes``: its size limit, by default twice the
    minimum; a limit under the minimum (the shards that the shuffle window and
    the batches in flight can span) is a UserError that says the minimum. Both
    are ignored for a local directory.

    ``on_bad_sample``: a sample that does not decode stops the loader with a
    one-line UserError naming it (``"stop"``), or is left out of its batch
    and reported by ``loader.take_skipped()`` (``"skip"``); see
    :mod:`pipeline.load.bad_samples`.
    """
    backend, device = parse_backend(backend), parse_device(device)
    on_bad_sample = parse_on_bad_sample(on_bad_sample)
    if normalize not in {mode.value for mode in Normalize}:
        raise UserError(f"unknown normalization {normalize!r} (choose from paper, channel)")
    if ten_crop and split == "train":
        raise UserError("ten_crop is for evaluation; use it with split='val'")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside 0..{world_size - 1} (world size {world_size})")
    if batch_size < 1 or num_threads < 0 or lighting_std < 0 or seed < 0:
        raise UserError("batch_size >= 1, num_threads >= 0, lighting_std >= 0, seed >= 0")
    if cache_bytes is not None and cache_bytes < 1:
        raise UserError("the shard cache size must be positive")
    if device is Device.CUDA:
        import torch

        if not torch.cuda.is_available():
            raise UserError("device 'cuda' asked for, but torch sees no CUDA device")
    config = LoaderConfig(
        split=split,
        batch_size=batch_size,
        device=device,
        rank=rank,
        world_size=world_size,
        seed=seed,
        num_threads=num_threads,
        ten_crop=ten_crop,
        with_index=with_index,
        shuffle_window=shuffle_window,
    )
    source = open_source(shards_dir if isinstance(shards_dir, Path) else str(shards_dir))
    local = isinstance(source, LocalSource)
    manifest = read_manifest(source)
    if local:
        table = load_split_table(source.directory, split, manifest)
    spec = read_augment_spec(source, manifest, normalize, lighting_std)
    if backend is Backend.DALI:
        from pipeline.load.dali_pipes import DaliLoader as loader_class
    else:
        from pipeline.load.torch_loader import TorchLoader as loader_class
    cache = None
    if not local:
        stretch = stretch_in_use(
            manifest.split(split).num_samples,
            batch_size,
            rank,
            world_size,
            shuffle_window if config.is_train else None,
            loader_class.batches_in_flight(config),
        )
        table, cache = open_remote_split(source, manifest, split, cache_dir, cache_bytes, stretch)
    draw = draw_augmentation or paper_draws
    # The advice names the location as given (what the user typed, for verify to take).
    bad_samples = BadSamples(on_bad_sample, manifest.split(split).shards, str(shards_dir))
    try:
        return loader_class(table, spec, config, draw, cache, bad_samples=bad_samples)
    except BaseException:
        if cache is not None:
            cache.close()
        raise
