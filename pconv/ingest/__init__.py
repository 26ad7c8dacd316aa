"""Sources (folders, zips, ``s3://`` prefixes) -> Parquet shards + manifest: per-row decode and checks (:mod:`.rows`),
the single-process thread engine for small inputs (:mod:`.local`), and the Ray Data job (:mod:`.job`).

May import: ``core``, ``storage``, ``cluster``."""
