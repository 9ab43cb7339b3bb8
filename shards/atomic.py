"""Atomic file writes: a file appears under its final name complete, or not at all.

Every output of a build (shards, index files, manifest, statistics) goes
through here. Content is written to a hidden temporary name in the *same*
directory (so the final rename never crosses a filesystem), flushed and
fsynced, renamed over the final name with :func:`os.replace` (atomic on
POSIX), and then the directory itself is fsynced so that the rename survives
a power loss. A crash leaves at most a ``.NAME.tmp-*`` file, which no reader
looks at (readers go through the manifest) and which
:func:`remove_temporaries` clears before a rerun.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TEMPORARY_MARKER = ".tmp-"


def temporary_path(final_path: Path) -> Path:
    """A fresh hidden temporary name beside ``final_path``.

    The pid tells a human which process left it; the random suffix keeps
    writers on different nodes of a shared filesystem (where pids collide)
    from ever opening the same temporary file.
    """
    final_path = Path(final_path)
    suffix = f"{TEMPORARY_MARKER}{os.getpid()}-{secrets.token_hex(4)}"
    return final_path.with_name(f".{final_path.name}{suffix}")


def is_temporary(path: Path) -> bool:
    """True for names made by :func:`temporary_path`."""
    name = Path(path).name
    return name.startswith(".") and TEMPORARY_MARKER in name


def fsync_directory(directory: Path) -> None:
    """Make renames and creations inside ``directory`` durable."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_file(final_path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file that replaces ``final_path`` when the block ends.

    On normal exit the file is flushed, fsynced, renamed to ``final_path``
    and the directory fsynced. If the block raises, the temporary file is
    removed and ``final_path`` is left exactly as it was.
    """
    if mode != "wb":
        raise ValueError(f"atomic_file writes bytes (mode 'wb'), not {mode!r}")
    final_path = Path(final_path)
    temporary = temporary_path(final_path)
    # "x": never truncate a file some other writer has open.
    handle = open(temporary, "xb")
    try:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        os.replace(temporary, final_path)
    except BaseException:
        # On a full disk the close fails too (it flushes what is buffered);
        # the temporary must go regardless.
        with contextlib.suppress(OSError):
            handle.close()
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    fsync_directory(final_path.parent)


def write_bytes_atomic(final_path: Path, data: bytes) -> None:
    """Write ``data`` to ``final_path`` atomically."""
    with atomic_file(final_path, "wb") as handle:
        handle.write(data)


def write_text_atomic(final_path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``final_path`` atomically."""
    write_bytes_atomic(final_path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """The one JSON rendering of alexpipe's own files: indented, stable, newline-terminated."""
    return json.dumps(obj, indent=2, ensure_ascii=True, allow_nan=False) + "\n"


def remove_temporaries(directory: Path) -> list[Path]:
    """Delete temporary files left in ``directory`` by crashed writers; return them.

    Only safe when no writer is active in ``directory`` (e.g. at the start of
    a build), since a live writer's temporary file looks the same.
    """
    removed = []
    for path in sorted(Path(directory).iterdir()):
        if is_temporary(path) and path.is_file():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed
