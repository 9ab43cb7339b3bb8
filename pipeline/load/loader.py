"""``create_loader`` (SPEC §6) and what both backends share: shard access and epoch state.

Both backends read the same samples in the same order (``pipeline.load.epochs``)
with the same random draws (``pipeline.load.augment``): a sample's bytes are read
by offset, using the DALI ``.idx`` files the build wrote, so the loader
never scans a tar and any rank can start anywhere. The DALI backend then
decodes and augments with DALI operators (``pipeline.load.dali_pipes``); the
torch backend with PIL and numpy (``pipeline.load.torch_loader``). Backends are
imported only when chosen.

Epochs: each ``iter(loader)`` is the next epoch (the first is 0). A loader
remembers how many batches of the current epoch were handed out;
``state_dict()`` / ``load_state_dict()`` carry ``{"epoch",
"batches_consumed"}`` so a resumed run continues mid-epoch with the exact
remaining batches. ``set_epoch(n)`` makes the next iteration epoch ``n``.

Remote shards (``http(s)://``, ``s3://``, ``pipe:`` locations, see
:mod:`shards.remote`) are staged into a bounded local cache that both
backends read from (:mod:`pipeline.load.staging`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.load.augment import AugmentDraws, AugmentSpec, Normalize
from pipeline.load.augment import draw_augmentation as paper_draws
from pipeline.load.augment import spec_from_stats as _spec_from_stats
from pipeline.load.epochs import DEFAULT_SHUFFLE_WINDOW, EpochPlan, num_batches, plan_epoch
from pipeline.load.samples import SampleReader, SplitTable, load_split_table
from pipeline.load.staging import (
    LocalLeases,
    ShardLeases,
    StagedShards,
    attach_cache,
    cache_directory,
    minimum_cache_bytes,
    read_remote_split,
)
from shards.errors import UserError
from shards.remote import (
    LocalSource,
    ShardSource,
    SourceFileMissing,
    open_source,
    read_manifest,
    read_mean,
    read_stats,
)

BACKENDS = ("dali", "torch")
DEVICES = ("cpu", "gpu")
DrawFunction = Callable[[int, int, int, AugmentSpec], AugmentDraws]


def read_augment_spec(
    source: ShardSource, manifest: dict, normalize: str, lighting_std: float
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


# --- epoch state shared by the backends -----------------------------------------------------


def _torch_device(device: str):
    """The torch device batches are delivered on: the current CUDA device for ``"gpu"``."""
    import torch  # the backends need it anyway; importing this module does not

    if device == "gpu":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class LoaderConfig:
    """Run settings of a loader, resolved and validated by :func:`create_loader`."""

    split: str = "train"
    batch_size: int = 128
    device: str = "cpu"
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    num_threads: int = 2
    ten_crop: bool = False
    with_index: bool = False
    shuffle_window: int = DEFAULT_SHUFFLE_WINDOW

    @property
    def is_train(self) -> bool:
        return self.split == "train"


class EpochLoader:
    """Epoch bookkeeping; a backend implements ``_run(plan, first_batch, draws)``.

    ``_run`` yields ``(images, labels, indices)`` torch tensors for the
    batches ``first_batch..`` of ``plan``, reading through :meth:`reader`
    and holding shards through :meth:`leases` (staged remote shards).
    """

    def __init__(
        self,
        table: SplitTable,
        spec: AugmentSpec,
        config: LoaderConfig,
        draw: DrawFunction = paper_draws,
        staged: StagedShards | None = None,
    ):
        self.table = table
        self.spec = spec
        self.config = config
        self.staged = staged
        self._draw = draw
        self._length = num_batches(table.num_samples, config.batch_size, config.world_size)
        self._epoch = 0
        self._consumed = 0
        self._pending = True  # the next iteration resumes (_epoch, _consumed) as is
        self._running: weakref.ref | None = None
        self._readers: list[SampleReader] = []
        self.torch_device = _torch_device(config.device)

    def __len__(self) -> int:
        """Batches of this rank in a full epoch (equal on every rank)."""
        return self._length

    @property
    def epoch(self) -> int:
        """The epoch being iterated, or the one the next iteration starts."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch`` (no-op for the epoch a loaded state resumes)."""
        if self._pending and epoch == self._epoch:
            return
        self._epoch, self._consumed, self._pending = int(epoch), 0, True

    def state_dict(self) -> dict:
        """Where to resume: the epoch and how many of its batches were handed out."""
        epoch, consumed = self._epoch, self._consumed
        if not self._pending and consumed >= self._length:
            epoch, consumed = epoch + 1, 0
        config = self.config
        return {
            "epoch": epoch,
            "batches_consumed": consumed,
            "seed": config.seed,
            "world_size": config.world_size,
            "batch_size": config.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state`` (from :meth:`state_dict`); the next iteration continues there."""
        consumed = int(state.get("batches_consumed", 0))
        config = self.config
        if consumed and any(
            key in state and state[key] != getattr(config, key)
            for key in ("seed", "world_size", "batch_size")
        ):
            raise UserError(
                "cannot resume mid-epoch with another seed, world size or batch size "
                f"(saved {state}); the epoch's sample split would differ"
            )
        if not 0 <= consumed <= self._length:
            raise UserError(f"loader state has {consumed} batches of an epoch of {self._length}")
        self._epoch, self._consumed, self._pending = int(state["epoch"]), consumed, True

    @staticmethod
    def batches_in_flight(config: LoaderConfig) -> int:
        """Batches a backend may have out (being read) ahead of the one it returns."""
        return 0

    def plan(self, epoch: int) -> EpochPlan:
        """This rank's batches of ``epoch``."""
        config = self.config
        return plan_epoch(
            self.table.shard_sizes,
            config.batch_size,
            config.rank,
            config.world_size,
            config.seed,
            epoch,
            shuffle=config.is_train,
            shuffle_window=config.shuffle_window,
        )

    def reader(self) -> SampleReader:
        """A sample reader for this loader's shards (staged ones are opened per read),
        closed with the loader."""
        reader = SampleReader(
            self.table, keep_open=self.staged is None, with_index=self.config.with_index
        )
        self._readers.append(reader)
        return reader

    def leases(self, plan: EpochPlan, first_batch: int) -> ShardLeases | LocalLeases:
        """What holds the shards of batches ``first_batch..`` of ``plan`` while they are read."""
        if self.staged is None:
            return LocalLeases()
        return self.staged.leases(plan, first_batch)

    def close(self) -> None:
        """Stop the epoch in progress, close the shard files and let go of the shard
        cache (remote shards). Closing again does nothing."""
        self._close_running()
        for reader in self._readers:
            reader.close()
        if self.staged is not None:
            self.staged.close()

    def __iter__(self):
        self._close_running()  # an abandoned epoch: stop its prefetching first
        if not self._pending:
            self._epoch, self._consumed = self._epoch + 1, 0
        self._pending = False
        iteration = self._iterate(self._epoch, self._consumed)
        # Weak: a dropped iteration is closed (and its prefetching stopped) right away,
        # while the loader is still whole, instead of with the loader in a reference cycle.
        self._running = weakref.ref(iteration)
        return iteration

    def _close_running(self) -> None:
        """Close the iteration in progress, if there is one."""
        running = self._running() if self._running is not None else None
        if running is not None:
            running.close()

    def _iterate(self, epoch: int, first_batch: int):
        plan = self.plan(epoch)
        draws = None
        if self.config.is_train:
            draws = self._draw(self.config.seed, epoch, self.table.num_samples, self.spec)
        batches = self._run(plan, first_batch, draws)
        try:
            for images, labels, indices in batches:
                self._consumed += 1
                yield (images, labels, indices) if self.config.with_index else (images, labels)
        finally:
            batches.close()

    def _run(self, plan: EpochPlan, first_batch: int, draws: AugmentDraws | None):
        raise NotImplementedError


# --- factory --------------------------------------------------------------------------------


def create_loader(
    shards_dir,
    split: str = "train",
    batch_size: int = 128,
    backend: str = "dali",
    device: str = "cpu",
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
) -> EpochLoader:
    """A loader over ``split`` of a shard directory or location (SPEC §6).

    Yields ``(images, labels)`` (``(images, labels, indices)`` with
    ``with_index``): float32 N×3×224×224 (N×10×3×224×224 with ``ten_crop``,
    val only), int64 labels, int64 indices (``index`` of KEY.json). On
    ``device="gpu"`` (alias ``"cuda"``) all are on the current CUDA device.
    ``draw_augmentation`` replaces :func:`pipeline.load.augment.draw_augmentation`
    (tests use it to pin crops, flips and lighting).

    ``shards_dir`` may also be remote: ``http(s)://``, ``s3://`` or
    ``pipe:COMMAND`` (:mod:`shards.remote`). Shards are then staged into a
    local cache, verified against the manifest's sha256 before use, and
    prefetched in the order this rank's epoch reads them; both backends read
    the staged files (the torch backend could stream, but one verified path
    for both keeps them equal). ``cache_dir``: the cache's directory (one
    process at a time; loaders of one process share it), by default a
    temporary directory removed at exit. ``cache_bytes``: its size limit, by
    default twice the minimum; a limit under the minimum (the shards that
    the shuffle window and the batches in flight can span) is a UserError
    that says the minimum. Both are ignored for a local directory. Call
    ``loader.close()`` to let go of the cache before the process ends.
    """
    device = "gpu" if device == "cuda" else device
    if backend not in BACKENDS:
        raise UserError(f"unknown loader backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if device not in DEVICES:
        raise UserError(f"unknown device {device!r} (choose from cpu, gpu)")
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
    if device == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise UserError("device 'gpu' asked for, but torch sees no CUDA device")
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
    if backend == "dali":
        from pipeline.load.dali_pipes import DaliLoader as loader_class
    else:
        from pipeline.load.torch_loader import TorchLoader as loader_class
    staged = None
    if not local:
        staged = _stage_remote(source, manifest, config, loader_class, cache_dir, cache_bytes)
        table = staged.remote.table
    draw = draw_augmentation or paper_draws
    try:
        return loader_class(table, spec, config, draw, staged)
    except BaseException:
        if staged is not None:
            staged.close()
        raise


def _stage_remote(
    source: ShardSource, manifest: dict, config: LoaderConfig, loader_class, cache_dir, cache_bytes
) -> StagedShards:
    """The split's table over a shard cache, with a cache large enough for ``config``."""
    directory = cache_directory(source.location, cache_dir)
    remote = read_remote_split(source, manifest, config.split, directory)
    minimum = minimum_cache_bytes(
        remote,
        manifest,
        config.batch_size,
        config.rank,
        config.world_size,
        config.shuffle_window if config.is_train else None,
        loader_class.batches_in_flight(config),
    )
    return StagedShards(remote, attach_cache(source, manifest, directory, cache_bytes, minimum))
