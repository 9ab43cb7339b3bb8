"""Where ``--shards`` points: a local directory, any fsspec URL or ``pipe:COMMAND``; reading it.

- ``/data/shards`` or ``file:///data/shards``: read in place;
- any URL fsspec knows (``https://``, ``s3://`` with the ``s3`` extra, ``gs://``, ``hf://``...):
  fsspec and the store's library move the bytes, with their configuration and retries;
- ``pipe:COMMAND``: as in WebDataset, a shell command writing one file to stdout, ``{file}``
  standing for its name (``pipe:aws s3 cp s3://b/shards/{file} -``); a non-zero exit fails.

Names come from a manifest that may itself be remote, so each is checked to be a plain file
name before it reaches a URL, a path or a command. :mod:`shards.cache` checks shard contents.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import urllib.parse
from pathlib import Path
from subprocess import DEVNULL, PIPE, Popen
from typing import IO, Any

from shards import manifest as names
from shards.errors import UserError
from shards.manifest import Manifest, check_file_name

PLACEHOLDER = "{file}"
CHUNK_BYTES = 1 << 20
# Metadata is read whole into memory; the bound keeps a wrong URL (a video) from filling it.
METADATA_LIMIT = 256 << 20
# One streamed GET per file: fsspec's block reads need Range requests, which plain static
# servers (python -m http.server) do not answer.
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
        cause, status = error.__cause__, getattr(error.__cause__, "status", None)
        if isinstance(cause, OSError) or status not in (None, 404, 410):
            raise UserError(f"cannot fetch {where} ({cause})") from None
        detail = f" (HTTP {status})" if status else ""
        raise SourceFileMissing(f"{where} is missing{detail}") from None
    except Exception as error:
        raise UserError(f"cannot read {where} ({type(error).__name__}: {error})") from None


class ShardSource:
    """Where the files of one shard directory come from."""

    location: str

    def open(self, name: str) -> IO[bytes]:
        """A readable binary stream of the file ``name``; raises :class:`SourceFileMissing`."""
        raise NotImplementedError

    def describe(self, name: str) -> str:
        """Where ``name`` is read from, for messages (a path, URL or command)."""
        return f"{self.location}/{check_file_name(name)}"


class LocalSource(ShardSource):
    """A directory on local disk or a shared filesystem: read in place, never staged."""

    def __init__(self, directory: Path):
        self.directory, self.location = Path(directory), str(directory)

    def open(self, name: str) -> IO[bytes]:
        with reading(where := self.describe(name)):
            return open(where, "rb")


class FsspecSource(ShardSource):
    """Any fsspec URL. Each process makes its own filesystem: fsspec's asynchronous ones are
    not fork-safe, and DataLoader workers are forked."""

    def __init__(self, url: str):
        import fsspec

        self.location, self.protocol = url.rstrip("/"), url.split("://", 1)[0].lower()
        try:  # at once, for an unknown protocol or a store whose library is missing
            fsspec.get_filesystem_class(self.protocol)
        except ImportError as error:
            extra = " (pip install 'alexpipe[s3]')" if self.protocol in ("s3", "s3a") else ""
            raise UserError(f"{url}: {error}{extra}") from None
        except ValueError as error:
            raise UserError(f"{url}: unsupported shard location ({error})") from None
        self._filesystem = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_filesystem": None}

    def open(self, name: str) -> IO[bytes]:
        import fsspec

        with reading(self.describe(name)):
            if self._filesystem is None or self._filesystem[0] != os.getpid():
                options = STORAGE_OPTIONS.get(self.protocol, {})
                self._filesystem = (os.getpid(), *fsspec.core.url_to_fs(self.location, **options))
            _pid, filesystem, root = self._filesystem
            return filesystem.open(f"{root}/{check_file_name(name)}", "rb")


class PipeSource(ShardSource):
    """``pipe:COMMAND``: a shell command per file, ``{file}`` replaced by the file name."""

    def __init__(self, location: str):
        self.location, self.template = location, location.removeprefix("pipe:").strip()
        if PLACEHOLDER not in self.template:
            raise UserError(
                f"{location}: a pipe: location needs {PLACEHOLDER} where the file name goes, "
                "e.g. 'pipe:cat /mnt/shards/{file}'"
            )

    def describe(self, name: str) -> str:
        return "pipe:" + self.template.replace(PLACEHOLDER, check_file_name(name))

    def open(self, name: str) -> _PipeStream:
        return _PipeStream(self.describe(name).removeprefix("pipe:"))


class _PipeStream:
    """stdout of a shell command; its end checks the exit status."""

    def __init__(self, command: str):
        self.command = command
        self._stderr = tempfile.TemporaryFile()  # a file: much of it cannot block the command
        self._process = Popen(command, shell=True, stdin=DEVNULL, stdout=PIPE, stderr=self._stderr)

    def read(self, size: int = -1) -> bytes:
        data = self._process.stdout.read(size)
        if not data and size and (status := self._process.wait()):
            self._stderr.seek(0)
            lines = self._stderr.read()[-2000:].decode("utf-8", "replace").strip().splitlines()
            detail = f": {lines[-1]}" if lines else ""
            error_type = SourceFileMissing if status in (1, 22) and lines else UserError
            raise error_type(f"pipe:{self.command} exited with status {status}{detail}")
        return data

    def close(self) -> None:
        if self._process.poll() is None:  # stopped early: its output is no longer wanted
            self._process.kill()
        self._process.stdout.close()
        self._process.wait()
        self._stderr.close()


def open_source(location: str | Path | ShardSource) -> ShardSource:
    """The :class:`ShardSource` for a ``--shards`` value (see the module docstring)."""
    text = str(location)
    if isinstance(location, ShardSource):
        return location
    if isinstance(location, Path) or ("://" not in text and not text.startswith("pipe:")):
        return LocalSource(Path(text))
    if text.startswith("pipe:"):
        return PipeSource(text)
    if text.lower().startswith("file://"):
        return LocalSource(Path(urllib.parse.unquote(urllib.parse.urlparse(text).path)))
    return FsspecSource(text)


def read_bytes(source: ShardSource, name: str, limit: int = METADATA_LIMIT) -> bytes:
    """The whole file ``name`` (metadata, not shards: at most ``limit`` bytes)."""
    where, chunks, total = source.describe(name), [], 0
    with contextlib.closing(source.open(name)) as stream:
        while total <= limit:  # a stream may return less than asked before its end
            with reading(where):
                chunk = stream.read(min(CHUNK_BYTES, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    if total > limit:
        raise UserError(f"{where} is larger than {limit} bytes; wrong location?")
    return b"".join(chunks)


def read_manifest(location: ShardSource | str | Path) -> Manifest:
    """The manifest of a shard directory or location (what :func:`open_source` takes): the one
    reader of ``manifest.json``. A UserError says what is wrong: no such directory, no
    manifest (an unfinished build), a damaged or foreign one."""
    source = open_source(location)
    if isinstance(source, LocalSource) and not source.directory.is_dir():
        state = "is not a directory" if source.directory.exists() else "does not exist"
        raise UserError(f"shard directory {source.directory} {state}")
    try:
        data = read_bytes(source, names.MANIFEST_NAME)
    except SourceFileMissing as error:
        raise UserError(
            f"{source.location} is not a complete alexpipe shard directory ({error}); "
            "run build-shards, or check the location"
        ) from None
    return names.parse_manifest(data, source.describe(names.MANIFEST_NAME))


def read_stats(source: ShardSource, manifest: Manifest) -> dict:
    """The dataset statistics the manifest names (``stats.json``)."""
    name = check_file_name(manifest.stats or names.STATS_NAME)
    try:
        stats = json.loads(read_bytes(source, name).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{source.describe(name)}: cannot read statistics ({error})") from None
    if not isinstance(stats, dict):
        raise UserError(f"{source.describe(name)}: expected a JSON object")
    return stats


def read_mean(source: ShardSource, manifest: Manifest) -> Any:
    """The mean image (``mean.npy``, float32 H×W×3) as a numpy array."""
    import numpy as np

    name = check_file_name(manifest.mean or names.MEAN_NAME)
    try:
        return np.load(io.BytesIO(read_bytes(source, name)), allow_pickle=False)
    except ValueError as error:
        raise UserError(f"{source.describe(name)}: not a .npy array ({error})") from None


def read_index(source: ShardSource, tar_name: str) -> str:
    """The text of the DALI index file beside shard ``tar_name``."""
    name = names.index_name(check_file_name(tar_name))
    try:
        return read_bytes(source, name).decode("ascii")
    except UnicodeDecodeError:
        raise UserError(f"{source.describe(name)}: an index file must be ASCII") from None
