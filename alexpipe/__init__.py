"""alexpipe: ImageNet shards, DALI loaders and the AlexNet trainer."""

__version__ = "0.1.0"
