"""The two halves of the data path, which never import each other.

- :mod:`pipeline.build`: the offline job, raw ILSVRC in, shards and statistics out.
- :mod:`pipeline.load`: the online loaders that feed the trainer from those shards.

Both read and write the shard format through :mod:`shards`.
"""
