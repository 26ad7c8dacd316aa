"""Training input: per-sample transforms and the pairing with masks or SR grids (:mod:`.transforms`), the epoch plan
and each rank's data position (:mod:`.plan`), the Ray Data streams (:mod:`.stream`), rows -> model inputs
(:mod:`.inputs`), and the decode tasks' allocator setting (:mod:`.allocator`).

May import: ``core``, ``storage``, ``cluster``."""
