"""Samples that do not decode: named in one line, and stopped at or skipped.

A backend finds out that a sample does not decode (the torch backend as PIL
fails on it, the DALI backend by decoding a failed batch's samples one by
one) and hands a :class:`BadSample` to its loader's :class:`BadSamples`,
the error policy it was given, as webdataset's stages are given a
``handler=``: the backend does not decide, the policy does.

- ``stop`` (the default) raises :class:`BadSampleError`, a UserError whose
  one line names the shard, the sample's key and index, says whether the
  shard's sha256 still matches the manifest (computed here, on the failure
  path only) and what to do: verify, repair, resume.
- ``skip`` records the sample and returns; the backend delivers the batch
  without it, and the trainer logs each one (``take_skipped``). An epoch then
  gives every sample once except those reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.load.interface import OnBadSample
from shards.errors import UserError
from shards.manifest import ShardInfo
from shards.reader import sha256_of_file

# The spellings of the commands the advice gives (alexpipe verify's --repair rebuilds
# the shards that fail, byte-identical to a clean build).
REPAIR_SOURCE = "SRC"


@dataclass(frozen=True)
class BadSample:
    """One sample that does not decode: where it is, what it is, and the decoder's words."""

    shard: str  # the shard's file name, e.g. train-000003.tar
    key: str
    index: int  # the sample's index (``index`` of KEY.json), what loaders yield
    position: int  # its position in the split (``pipeline.load.epochs``)
    reason: str

    def as_row(self) -> dict:
        """What metrics.jsonl records of it."""
        return {"shard": self.shard, "key": self.key, "index": self.index}


class BadSampleError(UserError):
    """A sample does not decode and the policy is to stop; ``str()`` is the one line."""

    def __init__(self, message: str, sample: BadSample):
        super().__init__(message)
        self.sample = sample


class AllSamplesBadError(UserError):
    """Every sample of a batch is bad: skipping them would leave a rank without a step."""


def repair_command(location: str) -> str:
    """The command that rebuilds the failing shards of ``location`` byte-identical."""
    return f"alexpipe verify {location} --repair --src {REPAIR_SOURCE}"


def stop_message(sample: BadSample, shard_matches: bool | None, location: str) -> str:
    """The one line a stopped run ends with."""
    named = (
        f"{sample.shard}: sample {sample.key} (index {sample.index}) does not decode "
        f"({sample.reason})"
    )
    repair = repair_command(location)
    then = "then --resume (or --on-bad-sample skip to train without it)"
    if shard_matches is False:
        return (
            f"{named}, and the shard's sha256 no longer matches the manifest; "
            f"run alexpipe verify {location}, rebuild with {repair}, {then}"
        )
    if shard_matches:
        return (
            f"{named}, though the shard's sha256 matches the manifest (it was built so); "
            f"run alexpipe verify {location} --decode, rebuild with {repair}, {then}"
        )
    return f"{named}; run alexpipe verify {location}, rebuild with {repair}, {then}"


class BadSamples:
    """A loader's policy for samples that do not decode (see the module docstring).

    ``shards`` are the split's manifest records (their sha256 is checked when
    a run stops); ``location`` is the shard directory the advice names.
    """

    def __init__(
        self,
        action: OnBadSample,
        shards: Sequence[ShardInfo],
        location: str,
    ):
        self.action = OnBadSample(action)
        self.location = location
        self._sha256 = {info.file: info.sha256 for info in shards}
        self._skipped: list[BadSample] = []

    def __call__(self, sample: BadSample, shard_path: Path) -> None:
        """Stop (raise :class:`BadSampleError`) or record ``sample`` and return."""
        if self.action is OnBadSample.SKIP:
            self._skipped.append(sample)
            return
        expected = self._sha256.get(sample.shard)
        matches = None if expected is None else sha256_of_file(Path(shard_path)) == expected
        raise BadSampleError(stop_message(sample, matches, self.location), sample)

    def take_skipped(self) -> list[BadSample]:
        """The samples skipped since the last call, in the order they were met."""
        skipped, self._skipped = self._skipped, []
        return skipped


def no_sample_left(batch_number: int, rank: int, bad: Sequence[BadSample], location: str) -> str:
    """The line for a batch whose every sample is bad (nothing left to deliver)."""
    names = ", ".join(f"{sample.shard}: {sample.key} (index {sample.index})" for sample in bad)
    return (
        f"every sample of batch {batch_number} of rank {rank} does not decode ({names}); "
        f"skipping them would leave this rank without its step: run alexpipe verify "
        f"{location}, rebuild with {repair_command(location)}, then --resume"
    )
