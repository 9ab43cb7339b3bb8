"""What `alexpipe doctor` reports: versions and the facts that decide speed.

Every probe is a pure-ish function returning a string, so a missing or
broken dependency shows up as one line of the report instead of a crash.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_flags() -> set[str]:
    """SIMD flags of this CPU (Linux); empty where /proc/cpuinfo is absent."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def pillow_build() -> dict[str, object]:
    """Which PIL is active and whether its core uses AVX2 (256-bit ymm) code.

    Pillow-SIMD only pays off when compiled for the CPU; a plain Pillow wheel
    targets baseline x86-64 and holds no AVX2 instructions in ``_imaging``.
    """
    import PIL
    import PIL._imaging as imaging

    simd_version = _version("pillow-simd")
    # Both can be installed at once (a later `pip install` puts Pillow back over
    # Pillow-SIMD's files): what counts is whose files PIL is.
    simd_active = (
        simd_version is not None
        and _version("pillow") is None
        and PIL.__version__ in (simd_version, simd_version.split(".post")[0])
    )
    info: dict[str, object] = {
        "version": PIL.__version__,
        "distribution": "Pillow-SIMD" if simd_active else "Pillow",
        "avx2_code": None,
    }
    objdump = shutil.which("objdump")
    if objdump:
        listing = subprocess.run(
            [objdump, "-d", "--no-show-raw-insn", imaging.__file__],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        info["avx2_code"] = "%ymm" in listing
    return info


def _pil_line() -> str:
    info = pillow_build()
    avx2 = {True: "AVX2 code: yes", False: "AVX2 code: no", None: "AVX2 code: unknown"}
    simd_on = info["distribution"] == "Pillow-SIMD" and info["avx2_code"] is not False
    verdict = "SIMD on" if simd_on else "SIMD off (run `make install` to build Pillow-SIMD)"
    return f"{info['distribution']} {info['version']} ({avx2[info['avx2_code']]}; {verdict})"


def _jpeg_line() -> str:
    from PIL import features

    turbo = features.check_feature("libjpeg_turbo")
    return f"libjpeg {features.version('jpg')}{' (turbo)' if turbo else ''}"


def _torch_line() -> str:
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        gpus = f"{len(names)} GPU(s): {', '.join(names)}"
    else:
        gpus = "no CUDA GPU visible"
    return f"{torch.__version__}, {gpus}, {torch.get_num_threads()} CPU threads"


def _dali_line() -> str:
    import nvidia.dali

    return f"{nvidia.dali.__version__} (CPU pipelines always; GPU with a CUDA driver)"


def _plain_version(distribution: str) -> Callable[[], str]:
    def probe() -> str:
        version = _version(distribution)
        if version is None:
            raise ModuleNotFoundError(f"{distribution} is not installed")
        return version

    return probe


def _cpu_line() -> str:
    flags = cpu_flags()
    simd = [flag for flag in ("sse4_2", "avx2", "avx512f") if flag in flags]
    return f"{platform.machine()}, {os.cpu_count()} cores, SIMD: {', '.join(simd) or 'none seen'}"


PROBES: list[tuple[str, Callable[[], str]]] = [
    ("alexpipe", _plain_version("alexpipe")),
    ("python", lambda: platform.python_version()),
    ("cpu", _cpu_line),
    ("PIL", _pil_line),
    ("jpeg", _jpeg_line),
    ("torch", _torch_line),
    ("DALI", _dali_line),
    ("ray", _plain_version("ray")),
    ("webdataset", _plain_version("webdataset")),
    ("numpy", _plain_version("numpy")),
]


def report() -> list[tuple[str, str]]:
    """Run every probe; a failing probe reports its error instead of raising."""
    lines = []
    for name, probe in PROBES:
        try:
            lines.append((name, probe()))
        except Exception as error:  # noqa: BLE001 - a broken dependency is the answer
            lines.append((name, f"NOT AVAILABLE: {type(error).__name__}: {error}"))
    return lines
