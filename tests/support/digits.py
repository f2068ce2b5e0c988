"""A real model for end-to-end tests and benchmarks: an MLP trained on scikit-learn's digits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from maas import Client
from maas.tensors import signature
from sklearn.datasets import load_digits

SIGNATURE = signature({"x": ("FP32", [64])}, {"logits": ("FP32", [10])})


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class DigitsModel:
    module: torch.jit.ScriptModule
    path: Path
    test_x: np.ndarray  # float32 [n, 64], scaled to [0, 1]
    test_y: np.ndarray
    accuracy: float

    def reference(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.module(torch.from_numpy(x)).numpy()


def train_digits_mlp(folder: Path, epochs: int = 30, seed: int = 0) -> DigitsModel:
    torch.manual_seed(seed)
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[:1400], order[1400:]
    model = MLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    xs, ys = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    for _ in range(epochs):
        for batch in torch.randperm(len(xs)).split(128):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xs[batch]), ys[batch]).backward()
            optimizer.step()
    scripted = torch.jit.script(model.eval())
    path = folder / "digits_mlp.pt"
    torch.jit.save(scripted, str(path))
    with torch.inference_mode():
        accuracy = float((scripted(torch.from_numpy(x[test])).argmax(1).numpy() == y[test]).mean())
    return DigitsModel(scripted, path, x[test], y[test], accuracy)


def deploy_digits(
    gateway: str, admin_key: str, model: DigitsModel, tenant: str = "acme", max_batch_size: int = 8
) -> tuple[Client, str]:
    """A new tenant with a developer key, the digits model uploaded and deployed as "digits",
    READY. Returns the tenant's client and its key."""
    admin = Client(gateway, admin_key)
    admin.create_tenant(tenant)
    _, key = admin.create_api_key(tenant, "developer")
    admin.close()
    client = Client(gateway, key)
    client.create_model("digits")
    client.upload_version("digits", model.path, format="torchscript", signature=SIGNATURE)
    client.create_deployment("digits", "digits", version=1, max_batch_size=max_batch_size)
    client.wait_ready("digits", timeout=180)
    return client, key
