"""The alexpipe shard format: WebDataset tars with DALI index files and a manifest.

Modules (import the one you need; this package imports nothing heavy):

- ``shards.writer``: write one reproducible shard and its index (``write_shard``).
- ``shards.index``: the DALI ``fn.readers.webdataset`` index format.
- ``shards.reader``: read shards back, refusing unsafe members (``iter_shard``).
- ``shards.manifest``: ``manifest.json``, file names, shard paths of a split.
- ``shards.verify``: check a shard directory against its manifest.
- ``shards.remote``: shard locations that are not local directories (any fsspec URL,
  ``pipe:``) and reading their metadata (``open_source``, ``read_manifest``).
- ``shards.cache``: a bounded local cache of remote shards, each verified against the
  manifest's size and sha256 before use (``ShardCache``).
- ``shards.sizes``: ``--cache-size`` values in bytes (``parse_size``).
- ``shards.atomic``: temp-file + fsync + rename writes.
- ``shards.errors``: ``UserError``.

Depends on neither ``pipeline`` nor ``trainer``.
"""
