"""Where bytes live: local paths and ``s3://`` URIs with atomic writes (:mod:`.uris`), file sets of images and masks
(:mod:`.sources`), and the Parquet shard format with its manifest (:mod:`.shards`).

May import: ``core``."""
