"""Where ``--shards`` points, and reading from it: a local directory, any fsspec URL, or ``pipe:``.

``--shards`` (and every API that takes a shard location) accepts:

- a local directory: ``/data/shards`` or ``file:///data/shards``;
- any URL fsspec knows: ``https://host/path/``, ``s3://bucket/prefix`` (the ``s3``
  extra installs s3fs), ``gs://`` (gcsfs), ``hf://datasets/...`` (huggingface_hub)...;
  fsspec and the store's own library move the bytes, with their configuration
  (credentials, endpoints such as ``AWS_ENDPOINT_URL``) and their retries;
- ``pipe:COMMAND``: as in WebDataset, a shell command that writes one file to its
  stdout, ``{file}`` standing for the file's name (``pipe:cat /mnt/shards/{file}``,
  ``pipe:aws s3 cp s3://bucket/shards/{file} -``); a non-zero exit status is an error.

File names come from the manifest, which may itself be remote, so every name is
checked to be a plain file name before it reaches a URL, a path or a shell command.
This module reads a location's files and metadata; it does not check shard contents
(:mod:`shards.cache` does, before a shard is used).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import tempfile
import urllib.parse
from pathlib import Path
from typing import IO, Any

from shards.errors import UserError
from shards.manifest import (
    MANIFEST_NAME,
    MEAN_NAME,
    STATS_NAME,
    Manifest,
    check_file_name,
    index_name,
    parse_manifest,
)

PLACEHOLDER = "{file}"
CHUNK_BYTES = 1 << 20
# Manifests, statistics, mean images and index files are read whole into memory;
# a bound keeps a wrong URL (a video, a disk image) from filling it.
METADATA_LIMIT = 256 << 20
# One streamed GET per file: fsspec's default block reads need Range requests,
# which plain static servers (python -m http.server) do not answer.
STORAGE_OPTIONS = {"http": {"block_size": 0}, "https": {"block_size": 0}}


class SourceFileMissing(UserError):
    """The location has no file of that name (HTTP 404, no such key, no such file)."""


@contextlib.contextmanager
def reading(where: str):
    """Turn what a transport raises while reading ``where`` into one line (a UserError)."""
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError as error:
        # fsspec's HTTP filesystem reports any failure of its HEAD and GET as a missing file.
        cause = error.__cause__
        status = getattr(cause, "status", None)
        if isinstance(cause, OSError) or status not in (None, 404, 410):
            raise UserError(f"cannot fetch {where} ({cause})") from None
        detail = f" (HTTP {status})" if status else ""
        raise SourceFileMissing(f"{where} is missing{detail}") from None
    except Exception as error:
        raise UserError(f"cannot read {where} ({type(error).__name__}: {error})") from None


class ShardSource:
    """Where the files of one shard directory come from. Subclasses implement :meth:`open`."""

    location: str

    def open(self, name: str) -> IO[bytes]:
        """A readable binary stream of the file ``name``; raises :class:`SourceFileMissing`."""
        raise NotImplementedError

    def describe(self, name: str) -> str:
        """Where ``name`` is read from, for messages (a path, URL or command)."""
        return f"{self.location}/{check_file_name(name)}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"


class LocalSource(ShardSource):
    """A directory on local disk or a shared filesystem: read in place, never staged."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.location = str(self.directory)

    def open(self, name: str) -> IO[bytes]:
        path = self.directory / check_file_name(name)
        with reading(str(path)):
            return open(path, "rb")


class FsspecSource(ShardSource):
    """Any fsspec URL; each process makes its own filesystem (fsspec's async ones are not
    fork-safe, and DataLoader workers are forked)."""

    def __init__(self, url: str):
        self.location = url.rstrip("/")
        self._protocol = url.split("://", 1)[0].lower()
        import fsspec

        try:  # fails here, at once, for an unknown protocol or a store whose library is missing
            fsspec.get_filesystem_class(self._protocol)
        except ImportError as error:
            extra = " (pip install 'alexpipe[s3]')" if self._protocol in ("s3", "s3a") else ""
            raise UserError(f"{url}: {error}{extra}") from None
        except ValueError as error:
            raise UserError(f"{url}: unsupported shard location ({error})") from None
        self._filesystem = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_filesystem": None}

    def open(self, name: str) -> IO[bytes]:
        import fsspec

        where = self.describe(name)
        with reading(where):
            if self._filesystem is None or self._filesystem[0] != os.getpid():
                options = STORAGE_OPTIONS.get(self._protocol, {})
                self._filesystem = (os.getpid(), *fsspec.core.url_to_fs(self.location, **options))
            _pid, filesystem, root = self._filesystem
            return filesystem.open(f"{root}/{check_file_name(name)}", "rb")


class PipeSource(ShardSource):
    """``pipe:COMMAND``: a shell command per file, ``{file}`` replaced by the file name."""

    def __init__(self, location: str):
        self.location = location
        self.template = location[len("pipe:") :].strip()
        if PLACEHOLDER not in self.template:
            raise UserError(
                f"{location}: a pipe: location needs {PLACEHOLDER} where the file name goes, "
                "e.g. 'pipe:cat /mnt/shards/{file}'"
            )

    def command(self, name: str) -> str:
        """The shell command that writes ``name`` to stdout."""
        return self.template.replace(PLACEHOLDER, check_file_name(name))

    def describe(self, name: str) -> str:
        return f"pipe:{self.command(name)}"

    def open(self, name: str) -> IO[bytes]:
        return _PipeStream(self.command(name))


class _PipeStream(io.RawIOBase):
    """stdout of a shell command; reaching its end checks the exit status."""

    def __init__(self, command: str):
        self.command = command
        # stderr to a file, not a pipe: a command that writes much of it cannot block.
        self._stderr = tempfile.TemporaryFile()
        self._process = subprocess.Popen(
            command,
            shell=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._process.stdout.readinto(buffer)
        if count == 0 and len(buffer) and (status := self._process.wait()):
            self._stderr.seek(0)
            lines = self._stderr.read()[-2000:].decode("utf-8", "replace").strip().splitlines()
            detail = f": {lines[-1]}" if lines else ""
            error_type = SourceFileMissing if status in (1, 22) and lines else UserError
            raise error_type(f"pipe:{self.command} exited with status {status}{detail}")
        return count

    def close(self) -> None:
        if not self.closed:
            if self._process.poll() is None:
                # The reader stopped early: this command's output is no longer wanted.
                self._process.kill()
            self._process.stdout.close()
            self._process.wait()
            self._stderr.close()
        super().close()


def open_source(location: str | Path | ShardSource) -> ShardSource:
    """The :class:`ShardSource` for a ``--shards`` value (see the module docstring)."""
    if isinstance(location, ShardSource):
        return location
    text = str(location)
    if isinstance(location, Path) or ("://" not in text and not text.startswith("pipe:")):
        return LocalSource(Path(text))
    if text.startswith("pipe:"):
        return PipeSource(text)
    if text.lower().startswith("file://"):
        return LocalSource(Path(urllib.parse.unquote(urllib.parse.urlparse(text).path)))
    return FsspecSource(text)


# --- reading metadata -------------------------------------------------------------------------


def read_bytes(source: ShardSource, name: str, limit: int = METADATA_LIMIT) -> bytes:
    """The whole file ``name`` (metadata, not shards: at most ``limit`` bytes)."""
    where = source.describe(name)
    with contextlib.closing(source.open(name)) as stream:
        chunks, total = [], 0
        # In chunks: a stream may return less than asked before its end.
        while total <= limit:
            with reading(where):
                chunk = stream.read(min(CHUNK_BYTES, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    if total > limit:
        raise UserError(f"{where} is larger than {limit} bytes; wrong location?")
    return b"".join(chunks)


def _read_json(source: ShardSource, name: str, what: str) -> Any:
    try:
        return json.loads(read_bytes(source, name).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{source.describe(name)}: cannot read {what} ({error})") from None


def read_manifest(location: ShardSource | str | Path) -> Manifest:
    """The manifest of a shard directory or location (a :class:`ShardSource`, or what
    :func:`open_source` takes): the one reader of ``manifest.json``. A UserError says what
    is wrong: no such directory, no manifest (an unfinished build), a damaged or foreign one."""
    source = open_source(location)
    if isinstance(source, LocalSource) and not source.directory.is_dir():
        state = "is not a directory" if source.directory.exists() else "does not exist"
        raise UserError(f"shard directory {source.directory} {state}")
    try:
        data = read_bytes(source, MANIFEST_NAME)
    except SourceFileMissing as error:
        raise UserError(
            f"{source.location} is not a complete alexpipe shard directory ({error}); "
            "run build-shards, or check the location"
        ) from None
    return parse_manifest(data, source.describe(MANIFEST_NAME))


def read_stats(source: ShardSource, manifest: Manifest) -> dict:
    """The dataset statistics the manifest names (``stats.json``)."""
    name = check_file_name(manifest.stats or STATS_NAME)
    stats = _read_json(source, name, "statistics")
    if not isinstance(stats, dict):
        raise UserError(f"{source.describe(name)}: expected a JSON object")
    return stats


def read_mean(source: ShardSource, manifest: Manifest):
    """The mean image (``mean.npy``, float32 H×W×3) as a numpy array."""
    import numpy as np

    name = check_file_name(manifest.mean or MEAN_NAME)
    try:
        return np.load(io.BytesIO(read_bytes(source, name)), allow_pickle=False)
    except ValueError as error:
        raise UserError(f"{source.describe(name)}: not a .npy array ({error})") from None


def read_index(source: ShardSource, tar_name: str) -> str:
    """The text of the DALI index file beside shard ``tar_name``."""
    name = index_name(check_file_name(tar_name))
    try:
        return read_bytes(source, name).decode("ascii")
    except UnicodeDecodeError:
        raise UserError(f"{source.describe(name)}: an index file must be ASCII") from None
