"""Partial-Convolution image inpainting (Liu et al., ECCV 2018) as a Ray + MLflow pipeline.

The packages are the pipeline's stages, and imports flow one way (the map: ``../shared/ARCHITECTURE.md``, checked by
``tests/test_architecture.py``)::

    core/        the paper: layers, U-Net, loss, masks, metrics, SR grid, image decode, config (no Ray, no MLflow)
    storage/     where bytes live: local / s3:// URIs, file sets, the shard format and manifest
    cluster.py   the cluster the autoscaler can make; the one way to join Ray
    ingest/      images and masks -> Parquet shards (Ray Data job, or threads for small inputs)
    data/        training input: transforms, epoch plan and data position, Ray Data streams, model inputs
    tracking/    MLflow runs and metric names, checkpoints, registry, any model URI -> model
    train/       the Ray Train driver, the worker loop, the train state
    inference/   inpaint / super-resolve any size, batch on Ray Data, the Ray Serve app, the pyfunc model
    evaluation/  the paper's per-bin protocol, SR vs bicubic, promotion
    commands/    one parser + main per ``pconv`` command
    apps/        the newcomer demo and the local S3 server
"""
