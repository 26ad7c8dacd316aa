"""Training on Ray Train: the driver that plans and launches the run (:mod:`.driver`), the worker loop (:mod:`.loop`)
and the train state with its checkpoint record (:mod:`.state`).

May import: ``core``, ``storage``, ``cluster``, ``data``, ``tracking``."""
