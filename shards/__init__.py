"""The alexpipe shard format: WebDataset tars with DALI index files and a manifest.

Modules (import the one you need; this package imports nothing heavy):

- ``shards.writer``: write one reproducible shard and its index (``write_shard``).
- ``shards.index``: the DALI ``fn.readers.webdataset`` index format.
- ``shards.reader``: read shards back, refusing unsafe members (``iter_shard``).
- ``shards.manifest``: ``manifest.json``, file names, shard paths of a split.
- ``shards.verify``: check a shard directory against its manifest.
- ``shards.remote``: shard locations that are not local directories (``http(s)://``,
  ``s3://``, ``pipe:``) and reading their metadata (``open_source``, ``read_manifest``).
- ``shards.verified``: shard bytes from a source checked against the manifest's size
  and sha256, streamed (``open_verified``) or staged to a file (``stage_shard``).
- ``shards.cache``: a bounded, prefetching local cache of remote shards (``ShardCache``).
- ``shards.eviction``: which staged shards a full cache gives up (pure, no I/O).
- ``shards.cache_dir``: a cache directory's file names, lock and leftovers (``cached_name``).
- ``shards.sizes``: ``--cache-size`` values in bytes (``parse_size``).
- ``shards.atomic``: temp-file + fsync + rename writes.
- ``shards.errors``: ``UserError``.

Depends on neither ``pipeline`` nor ``trainer``.
"""
