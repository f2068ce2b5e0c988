"""A compute-bound model: about 100 MFLOP per request, slow enough on a CPU that requests queue
inside Triton (the load the autoscaler reads; the digits MLP finishes before the next arrives)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from maas.common.v1 import common_pb2

WIDTH = 512

HEAVY_SIGNATURE = common_pb2.Signature(
    inputs=[common_pb2.TensorSpec(name="x", datatype=common_pb2.DATA_TYPE_FP32, shape=[WIDTH])],
    outputs=[common_pb2.TensorSpec(name="y", datatype=common_pb2.DATA_TYPE_FP32, shape=[WIDTH])],
)


class Heavy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(WIDTH, WIDTH) / WIDTH**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(200):
            x = torch.tanh(x @ self.weight)
        return x


def save_heavy(folder: Path) -> Path:
    path = folder / "heavy.pt"
    torch.jit.script(Heavy()).save(str(path))
    return path


def heavy_input(rows: int = 1) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((rows, WIDTH)).astype(np.float32)
