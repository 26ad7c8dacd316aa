"""Training input: per-sample transforms and the one pair-source interface of both tasks (inpainting's mask bank,
SR's grid and LR crop: :mod:`.transforms`); the epoch plan, each rank's data position and the stream that keeps it
(:mod:`.plan`, pure); each training worker's Ray Data datasets and the in-process validation pairs (:mod:`.stream`);
rows -> model inputs (:mod:`.inputs`); and the decode tasks' allocator setting (:mod:`.allocator`).

May import: ``core``, ``storage``, ``cluster``."""
