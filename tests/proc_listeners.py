"""Which TCP ports a set of processes listens on, read from /proc (Linux).

A socket is a process's when one of its file descriptors links to
``socket:[INODE]``; /proc/net/tcp and /proc/net/tcp6 list every socket with
its state (0A: listening), local address and inode.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

LISTENING = "0A"


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for descriptor in descriptors:
        try:
            target = os.readlink(descriptor)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def _decode(hex_address: str, family: int) -> tuple[str, int]:
    """/proc/net's "0100007F:1F90" (32-bit words in host order) -> ("127.0.0.1", 8080)."""
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    words = b"".join(raw[start : start + 4][::-1] for start in range(0, len(raw), 4))
    return socket.inet_ntop(family, words), int(port, 16)


def listening_addresses(pids: list[int]) -> list[tuple[str, int]]:
    """(host, port) of every TCP socket in LISTEN state that one of ``pids`` holds."""
    inodes = set().union(*(_socket_inodes(pid) for pid in pids)) if pids else set()
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == LISTENING and fields[9] in inodes:
                found.append(_decode(fields[1], family))
    return sorted(found)
