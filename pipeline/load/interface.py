"""The loaders' interface, without heavy imports: the choices ``create_loader`` takes (enums
the command line turns into ``click.Choice``) and what a loader offers the trainer (protocols).
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum
from typing import Protocol, TypeVar, runtime_checkable

from shards.errors import UserError

E = TypeVar("E", bound=Enum)


class Backend(str, Enum):
    """DALI operators, or the pure PyTorch/PIL reference."""

    DALI = "dali"
    TORCH = "torch"


class Device(str, Enum):
    """Where batches are made and delivered, in PyTorch's words."""

    CPU = "cpu"
    CUDA = "cuda"


DEVICE_ALIASES = {"gpu": Device.CUDA}  # DALI's word for it


class OnBadSample(str, Enum):
    """What a loader does with a sample that does not decode: stop with one line naming
    it, or skip it, go on, and report it (:mod:`pipeline.load.bad_samples`)."""

    STOP = "stop"
    SKIP = "skip"


# The choices as the command line and the training config list them.
BACKENDS = tuple(backend.value for backend in Backend)
DEVICES = tuple(device.value for device in Device)
BAD_SAMPLE_POLICIES = tuple(policy.value for policy in OnBadSample)


def parse_choice(kind: type[E], name: str | E, what: str, aliases: dict | None = None) -> E:
    """``name`` as a member of the enum ``kind`` (or one of its ``aliases``); anything
    else is a one-line UserError naming ``what`` and the choices."""
    try:
        return (aliases or {}).get(name) or kind(name)
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise UserError(f"unknown {what} {name!r} (choose from {choices})") from None


def parse_device(name: str | Device) -> Device:
    """``"cpu"`` or ``"cuda"`` (``"gpu"`` is accepted as an alias) as a :class:`Device`."""
    return parse_choice(Device, name, "device", DEVICE_ALIASES)


def parse_backend(name: str | Backend) -> Backend:
    """``"dali"`` or ``"torch"`` as a :class:`Backend`."""
    return parse_choice(Backend, name, "loader backend")


def parse_on_bad_sample(name: str | OnBadSample) -> OnBadSample:
    """``"stop"`` or ``"skip"`` as an :class:`OnBadSample`."""
    return parse_choice(OnBadSample, name, "bad-sample policy")


@runtime_checkable
class Loader(Protocol):
    """What the trainer needs from a loader: each ``iter()`` is an epoch of ``(images,
    labels)`` batches, ``len()`` their number, and ``set_epoch`` picks the next epoch."""

    def __iter__(self) -> Iterator[tuple]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


@runtime_checkable
class ResumableLoader(Loader, Protocol):
    """A loader that tells where it is and continues from there: an exact mid-epoch resume.

    A trainer replays the epoch and skips the batches done for a loader that is not one.
    """

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class SkippingLoader(Protocol):
    """A loader that can skip samples that do not decode, and tells which it skipped."""

    def take_skipped(self) -> list: ...
