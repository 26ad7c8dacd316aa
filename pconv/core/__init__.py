"""The paper in code, importable without Ray or MLflow: partial/gated convolution layers, the PConv U-Net, the
loss, masks and hole-ratio bins, metrics, the super-resolution grid, image decoding and the training config.

May import: nothing else of ``pconv``."""
