"""The machine's speed limit: a bare process pool, JPEG draft, bilinear resize of the central
square, JPEG q90, plain tars; no Ray, no statistics, no hashing.
Usage: pool.py SRC OUT_DIR WORKERS SHARD_SIZE"""

import io
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image


def convert(path):
    image = Image.open(path)
    image.draft("RGB", (256, 256))  # DCT scaling: both sides stay >= 256
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    image = image.resize((256, 256), Image.BILINEAR, box=(left, top, left + side, top + side))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer


def chunk(job):
    out, paths = job
    with tarfile.open(out, "w") as archive:
        for path in paths:
            buffer = convert(path)
            info = tarfile.TarInfo(Path(path).stem + ".jpg")
            info.size = buffer.tell()
            buffer.seek(0)
            archive.addfile(info, buffer)
    return len(paths)


if __name__ == "__main__":
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    workers, size = int(sys.argv[3]), int(sys.argv[4])
    out.mkdir(parents=True, exist_ok=True)
    paths = sorted(str(path) for path in src.rglob("*.JPEG"))
    jobs = [(out / f"{i:06d}.tar", paths[i : i + size]) for i in range(0, len(paths), size)]
    with ProcessPoolExecutor(workers) as pool:
        assert sum(pool.map(chunk, jobs)) == len(paths)
