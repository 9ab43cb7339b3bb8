"""FFCV's DatasetWriter (JPEG, max_resolution 256, q90), run in tools/ffcv-venv.
Usage: ffcv_writer.py SRC OUT.beton WORKERS CHUNK_SIZE"""

import sys
from pathlib import Path

from ffcv.fields import IntField, RGBImageField
from ffcv.writer import DatasetWriter
from PIL import Image


class ImageFolder:
    # torchvision's ImageFolder, which cannot be installed here: (PIL image, label)
    def __init__(self, root):
        classes = sorted(path.name for path in root.iterdir())
        self.samples = [
            (path, label)
            for label, name in enumerate(classes)
            for path in sorted((root / name).glob("*.JPEG"))
        ]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        with Image.open(path) as image:
            return image.convert("RGB"), label


if __name__ == "__main__":
    src, out, workers, size = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    fields = {
        "image": RGBImageField(write_mode="jpg", max_resolution=256, jpeg_quality=90),
        "label": IntField(),
    }
    DatasetWriter(out, fields, num_workers=workers).from_indexed_dataset(
        ImageFolder(src), chunksize=size
    )
