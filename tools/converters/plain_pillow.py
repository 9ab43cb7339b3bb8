"""The script people write: one process, PIL open, convert, resize the shorter side to 256
(bicubic), centre crop, JPEG q90, one tarfile. Usage: plain_pillow.py SRC OUT.tar"""

import io
import sys
import tarfile
from pathlib import Path

from PIL import Image

src, out = Path(sys.argv[1]), Path(sys.argv[2])
with tarfile.open(out, "w") as archive:
    for path in sorted(src.rglob("*.JPEG")):
        image = Image.open(path).convert("RGB")
        width, height = image.size
        scale = 256 / min(width, height)
        size = (max(256, round(width * scale)), max(256, round(height * scale)))
        image = image.resize(size, Image.BICUBIC)
        left, top = (size[0] - 256) // 2, (size[1] - 256) // 2
        image = image.crop((left, top, left + 256, top + 256))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        info = tarfile.TarInfo(path.stem + ".jpg")
        info.size = buffer.tell()
        buffer.seek(0)
        archive.addfile(info, buffer)
