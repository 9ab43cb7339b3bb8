"""The training configuration: built once (by the CLI or a test), never mutated."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.load.interface import BACKENDS, BAD_SAMPLE_POLICIES
from shards.errors import UserError
from shards.sizes import parse_size

DEVICES = ("cuda", "cpu")  # in this order in its error message (the loader's are cpu, cuda)
PARALLEL_MODES = ("ddp", "columns")
SCHEDULES = ("plateau", "step")
NORMALIZATIONS = ("paper", "channel")

# Fields that must not change across --resume: they decide the shapes of the
# saved model/optimizer/schedule state or how the saved per-rank states map
# onto processes.
RESUME_INVARIANTS = ("parallel", "width", "num_classes", "batch_size", "schedule")


# The paper's rate and the batch it was used with: 0.01 for 128 images per step.
PAPER_LR = 0.01
PAPER_BATCH_SIZE = 128


def default_lr(batch_size: int) -> float:
    """``--lr``'s default: the paper's per-sample rate, 0.01 × global batch / 128.

    The linear scaling rule of Goyal et al. 2017 ("Accurate, Large Minibatch
    SGD: Training ImageNet in 1 Hour", section 2.1): when the minibatch is
    multiplied by k, multiply the learning rate by k. torchvision's
    classification references (references/classification/README.md) give
    each rate for a global batch (AlexNet: 0.01 at 8 GPUs × 32) and say that
    with another batch "the learning rate should be scaled accordingly".
    0.0025 at batch 32, 0.08 at 1024. Full-width AlexNet at batch 32 with the
    batch-128 rate (4× the per-sample rate) does not learn (README, "Real
    use").
    """
    return PAPER_LR * batch_size / PAPER_BATCH_SIZE


def default_device() -> str:
    """``--device``'s default: "cuda" when a CUDA device is available, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; saved as RUN/config.json.

    Defaults are the paper's recipe: SGD with momentum 0.9 and weight decay
    5e-4, global batch 128, learning rate 0.01 (scaled with the batch,
    :func:`default_lr`) divided by 10 when the validation error stops
    improving (at most three times), 90 epochs. ``lr=None`` stands for the
    default until :meth:`resolved` fills it in.
    """

    shards_dir: str  # a directory, or http(s)://, s3://, pipe: (staged through a local cache)
    out_dir: str
    epochs: int = 90
    batch_size: int = 128  # global: divided over the processes
    lr: float | None = None  # None: default_lr(batch_size), filled in by resolved()
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "plateau"  # "plateau": ÷10 when val top-1 error stalls; "step": every N epochs
    plateau_patience: int = 3  # epochs without improvement before a reduction
    plateau_threshold: float = 1e-3  # smallest drop of top-1 error that counts as improvement
    step_epochs: int = 30  # "step" schedule: epochs between reductions
    max_lr_reductions: int = 3
    device: str = "cpu"  # "cuda" | "cpu"
    backend: str = "dali"  # loader backend, "dali" | "torch"
    parallel: str = "ddp"  # "ddp" | "columns"
    nproc: int = 1  # local processes to start (ignored under torchrun)
    resume: bool = False
    max_steps: int | None = None  # stop after this optimizer step (counted across resumes)
    checkpoint_every: int | None = None  # steps between mid-epoch checkpoints
    lighting_std: float = 0.1
    normalize: str = "paper"  # "paper" | "channel"
    seed: int = 0
    num_threads: int = 2  # loader threads per process
    on_bad_sample: str = "stop"  # a sample that does not decode: "stop" | "skip" (logged)
    cache_dir: str | None = None  # remote shards: each process caches in CACHE_DIR/rank-LOCAL_RANK
    cache_size: str | None = None  # e.g. "200G", split among the processes of a node
    num_classes: int | None = None  # None: from the shards' manifest
    width: float = 1.0  # layer width multiplier; 1.0 is the paper's network
    dropout: float = 0.5
    bf16: bool = False  # bf16 autocast
    channels_last: bool = False
    compile: bool = False  # torch.compile the model
    deterministic: bool = False  # deterministic kernels (exact resume also on GPU, slower)
    log_every: int = 10  # steps per metrics.jsonl training row
    progress: bool = True  # tqdm progress bar on rank 0

    def __post_init__(self) -> None:
        choices = {
            "device": DEVICES,
            "backend": BACKENDS,
            "parallel": PARALLEL_MODES,
            "schedule": SCHEDULES,
            "normalize": NORMALIZATIONS,
            "on_bad_sample": BAD_SAMPLE_POLICIES,
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise UserError(f"--{field.replace('_', '-')} must be one of {', '.join(allowed)}")
        positive = ("epochs", "batch_size", "nproc", "log_every", "step_epochs", "plateau_patience")
        for field in positive:
            if getattr(self, field) < 1:
                raise UserError(f"--{field.replace('_', '-')} must be at least 1")
        if self.num_threads < 0:
            raise UserError("--num-threads must be at least 0 (0: load in the training process)")
        for field in ("max_steps", "checkpoint_every", "num_classes"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise UserError(f"--{field.replace('_', '-')} must be at least 1")
        if (self.lr is not None and self.lr <= 0) or self.width <= 0:
            raise UserError("--lr and --width must be positive")
        if self.max_lr_reductions < 0:
            raise UserError("max_lr_reductions must be at least 0")
        if self.cache_size is not None and parse_size(self.cache_size) < 1:
            raise UserError("--cache-size must be positive")
        if self.parallel == "columns" and self.nproc > 1:
            raise UserError("--parallel columns runs in one process (one column per device)")

    def resolved(self) -> TrainConfig:
        """This config with the defaults that depend on other fields filled in (``lr``)."""
        if self.lr is not None:
            return self
        return self.replace(lr=default_lr(self.batch_size))

    def replace(self, **changes) -> TrainConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict of the fields."""
        return dataclasses.asdict(self)
