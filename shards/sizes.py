"""Byte counts written by people: ``--cache-size`` values such as ``500M`` or ``1.5TiB``."""

from __future__ import annotations

import re

from shards.errors import UserError

# K/M/G/T and KiB.. are powers of 1024, KB.. powers of 1000.
SIZE_UNITS = {"": 1, "b": 1}
for _power, _letter in enumerate("kmgt", start=1):
    SIZE_UNITS |= {_letter: 1024**_power, f"{_letter}ib": 1024**_power, f"{_letter}b": 1000**_power}


def parse_size(text: str) -> int:
    """Bytes in a ``--cache-size`` value: ``500M``, ``50G``, ``1.5TiB``, ``20GB``, ``1000000``.

    K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024; KB/MB/GB/TB powers of 1000.
    """
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match and SIZE_UNITS.get(match.group(2).lower())
    if not match or unit is None:
        raise UserError(f"cannot read size {text!r}; write e.g. 500M, 50G or 1.5T")
    return int(float(match.group(1)) * unit)
