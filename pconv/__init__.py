"""Partial-Convolution image inpainting (Liu et al., ECCV 2018) as a Ray + MLflow pipeline.

The packages are the pipeline's stages, and imports flow one way: each may import only the packages after its
``<-`` (the same map: README's Architecture section, ``../shared/ARCHITECTURE.md``'s table, and
``tests/test_architecture.py``, which checks every import against it)::

    core/        the paper: layers, U-Net, loss, masks, metrics, SR grid, decode, config   <- nothing
    storage/     where bytes live: URIs (local, s3://), file sets, shards + manifest        <- core
    cluster.py   the cluster the autoscaler can make; the one way to join Ray               <- nothing
    ingest/      images and masks -> Parquet shards (Ray Data job, or threads)            <- core, storage, cluster
    data/        training input: transforms, epoch plan, data position, streams           <- core, storage, cluster
    tracking/    MLflow runs, metric names, checkpoints, registry, model URI -> model     <- core, storage
    train/       the Ray Train driver, the worker loop, the train state     <- core, storage, cluster, data, tracking
    inference/   inpaint / super-resolve, batch, Serve app, pyfunc model        <- core, storage, cluster, tracking
    evaluation/  the paper's per-bin protocol, SR vs bicubic, promotion       <- core, storage, tracking, inference
    apps/        the newcomer demo and the local S3 server                  <- any library package
    commands/    one parser + main per ``pconv`` command                    <- any library package and apps

The library (core ... evaluation) never imports ``apps`` or ``commands``; ``pipelines/*.py`` are shims that call
``pconv.commands``.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from pconv.inference.api import Inpainter, SuperResolver

__all__ = ["Inpainter", "SuperResolver"]


def __getattr__(name: str):
    """``from pconv import Inpainter`` (the Python API, :mod:`pconv.inference.api`), imported on first use so that
    ``import pconv.core`` stays free of everything else (PEP 562)."""
    if name in __all__:
        from pconv.inference import api

        return getattr(api, name)
    raise AttributeError(f"module 'pconv' has no attribute {name!r}")
