"""Using a trained model: inpaint any size (:mod:`.inpaint`), super-resolve (:mod:`.super_resolve`), batch on Ray
Data (:mod:`.batch`), the Ray Serve app and page (:mod:`.serve`), the MLflow pyfunc model (:mod:`.pyfunc`), and the
non-learned baseline (:mod:`.baseline`).

May import: ``core``, ``storage``, ``cluster``, ``tracking``."""
