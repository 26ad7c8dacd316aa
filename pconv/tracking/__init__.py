"""MLflow and model files: the store and its retries (:mod:`.store`), runs and metric logging (:mod:`.runs`), the
checkpoint contract (:mod:`.checkpoints`), the registry (:mod:`.registry`), any model URI -> model
(:mod:`.loading`).

May import: ``core``, ``storage``."""
