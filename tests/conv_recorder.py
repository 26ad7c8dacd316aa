"""Shared by test_layers and test_model: count the convolutions a forward/backward really runs."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class ConvRecorder(TorchDispatchMode):
    """Records the weight shape of every aten convolution (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.forward: list[tuple[int, ...]] = []
        self.backward: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket == torch.ops.aten.convolution:
            self.forward.append(tuple(args[1].shape))
        elif func.overloadpacket == torch.ops.aten.convolution_backward:
            self.backward.append(tuple(args[2].shape))
        return func(*args, **(kwargs or {}))
