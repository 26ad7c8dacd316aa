"""The paper's evaluation: inputs streamed from shards or files (:mod:`.inputs`), the per-bin inpainting protocol and
promotion (:mod:`.inpainting`), super-resolution vs bicubic (:mod:`.sr`).

May import: ``core``, ``storage``, ``tracking``, ``inference``."""
