"""Shard directories that are not on local disk: where ``--shards`` points, and reading from it.

``--shards`` (and every API that takes a shard location) accepts:

- a local directory: ``/data/shards`` (or ``file:///data/shards``);
- ``http://HOST/PATH/`` or ``https://...``: files are fetched as ``PATH/NAME``
  with the standard library (a trailing ``/`` is added if missing);
- ``s3://BUCKET/PREFIX``: objects ``PREFIX/NAME``, through ``boto3`` if it is
  installed (alexpipe does not depend on it; credentials, region and
  ``AWS_ENDPOINT_URL`` come from boto3's usual configuration);
- ``pipe:COMMAND``: as in WebDataset, a shell command that writes one file to
  its stdout. ``{file}`` in COMMAND is replaced by the file's name (e.g.
  ``train-000000.tar``, ``manifest.json``), so one template serves every file:
  ``pipe:cat /mnt/shards/{file}``, ``pipe:curl -fsS https://host/shards/{file}``,
  ``pipe:aws s3 cp s3://bucket/shards/{file} -``. A non-zero exit status is
  an error.

File names come from the manifest, which may itself be remote, so every name
is checked to be a plain file name before it reaches a URL, a path or a shell
command. Shard bytes are trusted only after their size and sha256 match the
manifest; ``shards.verified`` checks them, as a stream ends or before a
staged file gets its final name.

This module opens files of a source and reads its metadata (manifest,
statistics, mean image, index files); it does not check shard contents.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
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
HTTP_TIMEOUT_SECONDS = 60
HTTP_RETRIES = 2
RETRY_PAUSE_SECONDS = 0.5


class SourceFileMissing(UserError):
    """The source has no file of that name (HTTP 404, no such key, no such file)."""


class ShardSource:
    """Where the files of one shard directory come from. Subclasses implement :meth:`open`."""

    location: str

    def open(self, name: str) -> IO[bytes]:
        """A readable binary stream of the file ``name``; raises :class:`SourceFileMissing`."""
        raise NotImplementedError

    def describe(self, name: str) -> str:
        """Where ``name`` is read from, for messages (a path, URL or command)."""
        raise NotImplementedError

    def local_path(self, name: str) -> Path | None:
        """The file itself if it already is on local disk (nothing to stage), else None."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"


class LocalSource(ShardSource):
    """A directory on local disk or a shared filesystem."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.location = str(self.directory)

    def open(self, name: str) -> IO[bytes]:
        path = self.directory / check_file_name(name)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise SourceFileMissing(f"{path} is missing") from None
        except OSError as error:
            raise UserError(f"{path}: cannot read ({error.strerror or error})") from None

    def describe(self, name: str) -> str:
        return str(self.directory / name)

    def local_path(self, name: str) -> Path | None:
        return self.directory / check_file_name(name)


class HttpSource(ShardSource):
    """``http(s)://HOST/PATH/``: files fetched with urllib, transient failures retried."""

    def __init__(self, url: str, retries: int = HTTP_RETRIES):
        self.location = url if url.endswith("/") else url + "/"
        self.retries = retries

    def describe(self, name: str) -> str:
        return urllib.parse.urljoin(self.location, urllib.parse.quote(check_file_name(name)))

    def open(self, name: str) -> IO[bytes]:
        url = self.describe(name)
        request = urllib.request.Request(url, headers={"User-Agent": "alexpipe"})
        for attempt in range(self.retries + 1):
            try:
                return urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_SECONDS)
            except urllib.error.HTTPError as error:
                error.close()
                if error.code in (404, 410):
                    raise SourceFileMissing(f"{url}: not found (HTTP {error.code})") from None
                # Client errors (403, 401...) will not go away by asking again.
                if error.code < 500 or attempt == self.retries:
                    raise UserError(f"{url}: HTTP {error.code} {error.reason}") from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
                if attempt == self.retries:
                    reason = getattr(error, "reason", error)
                    raise UserError(f"cannot fetch {url} ({reason})") from None
            time.sleep(RETRY_PAUSE_SECONDS * 2**attempt)
        raise AssertionError("unreachable")


class S3Source(ShardSource):
    """``s3://BUCKET/PREFIX``: objects read with boto3 (an optional dependency)."""

    def __init__(self, url: str):
        parsed = urllib.parse.urlparse(url)
        if not parsed.netloc:
            raise UserError(f"{url}: expected s3://BUCKET/PREFIX")
        try:
            import boto3  # noqa: F401  (optional: only s3:// shards need it)
        except ImportError:
            raise UserError(
                f"{url}: reading shards from s3:// needs boto3, which is not installed; "
                "install it into alexpipe's environment (pip install boto3) or use an "
                "http(s):// or pipe: location"
            ) from None
        self.location = url
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self._client = None

    def __getstate__(self) -> dict:
        # A boto3 client does not pickle; each process makes its own.
        return {**self.__dict__, "_client": None}

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def describe(self, name: str) -> str:
        return f"s3://{self.bucket}/{self._key(check_file_name(name))}"

    def open(self, name: str) -> IO[bytes]:
        import botocore.exceptions

        if self._client is None:
            import boto3

            self._client = boto3.client("s3")
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(name))
        except botocore.exceptions.ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise SourceFileMissing(f"{self.describe(name)}: no such object") from None
            raise UserError(f"{self.describe(name)}: {error}") from None
        except botocore.exceptions.BotoCoreError as error:
            raise UserError(f"{self.describe(name)}: {error}") from None
        return response["Body"]


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
        if count == 0 and len(buffer):
            self._check_exit()
        return count

    def _check_exit(self) -> None:
        status = self._process.wait()
        if status == 0:
            return
        self._stderr.seek(0)
        lines = self._stderr.read()[-2000:].decode("utf-8", "replace").strip().splitlines()
        detail = f": {lines[-1]}" if lines else ""
        error_type = SourceFileMissing if status in (1, 22) and lines else UserError
        raise error_type(f"pipe:{self.command} exited with status {status}{detail}")

    def close(self) -> None:
        if not self.closed:
            if self._process.poll() is None:
                # The reader stopped early: this command's output is no longer wanted.
                self._process.kill()
            self._process.stdout.close()
            self._process.wait()
            self._stderr.close()
        super().close()


def open_source(location: str | Path) -> ShardSource:
    """The :class:`ShardSource` for a ``--shards`` value (see the module docstring)."""
    if isinstance(location, Path):
        return LocalSource(location)
    text = str(location)
    if text.startswith("pipe:"):
        return PipeSource(text)
    scheme = urllib.parse.urlparse(text).scheme.lower() if "://" in text else ""
    if scheme in ("http", "https"):
        return HttpSource(text)
    if scheme == "s3":
        return S3Source(text)
    if scheme == "file":
        return LocalSource(Path(urllib.parse.unquote(urllib.parse.urlparse(text).path)))
    if scheme:
        raise UserError(
            f"{text}: unsupported shard location scheme {scheme!r} "
            "(use a directory, http(s)://, s3:// or pipe:COMMAND)"
        )
    return LocalSource(Path(text))


# --- reading metadata -------------------------------------------------------------------------


def read_bytes(source: ShardSource, name: str, limit: int = METADATA_LIMIT) -> bytes:
    """The whole file ``name`` (metadata, not shards: at most ``limit`` bytes)."""
    with contextlib.closing(source.open(name)) as stream:
        chunks, total = [], 0
        try:
            # In chunks: some streams allocate the whole size asked for up front.
            while total <= limit and (chunk := stream.read(min(CHUNK_BYTES, limit + 1 - total))):
                chunks.append(chunk)
                total += len(chunk)
        except (OSError, http.client.HTTPException) as error:
            raise UserError(f"{source.describe(name)}: read failed ({error})") from None
    if total > limit:
        raise UserError(f"{source.describe(name)} is larger than {limit} bytes; wrong location?")
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
    source = location if isinstance(location, ShardSource) else open_source(location)
    if isinstance(source, LocalSource):
        if not source.directory.exists():
            raise UserError(f"shard directory {source.directory} does not exist")
        if not source.directory.is_dir():
            raise UserError(f"{source.directory} is not a directory")
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
