"""The built-in architectures, written to compile with torch.jit.script.

Every exported model takes the raw features a client has (the standardisation fitted on the
training split is baked in) and returns logits for classes or tokens, or the target itself for
regression (the target's scaling is undone inside). One input, one output, so the inference
runner feeds it positionally.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class Standardize(nn.Module):
    """(x - mean) / std with statistics from the training split; constant features pass as zeros."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", torch.where(std > 1e-6, std, torch.ones_like(std)).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Affine(nn.Module):
    """Linear or logistic regression: one affine map of the flattened features."""

    def __init__(self, features: int, outputs: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class Mlp(nn.Module):
    def __init__(self, features: int, outputs: int, hidden_sizes: list[int], dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = features
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class Cnn(nn.Module):
    """3x3 convolution, batch norm, ReLU and 2x2 max-pool per block, then two dense layers."""

    def __init__(
        self, shape: tuple[int, ...], outputs: int, channels: list[int], hidden_size: int, dropout: float
    ) -> None:
        super().__init__()
        in_channels = shape[0] if len(shape) == 3 else 1
        height, width = shape[-2], shape[-1]
        blocks: list[nn.Module] = []
        for out_channels in channels:
            blocks += [
                nn.Conv2d(in_channels, out_channels, 3, padding=1),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            in_channels, height, width = out_channels, height // 2, width // 2
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * height * width, hidden_size),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, outputs),
        )
        self.add_channel = len(shape) == 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.add_channel:
            x = x.unsqueeze(1)
        return self.head(self.features(x))


class Recurrent(nn.Module):
    """An LSTM, GRU or plain RNN over the time steps; the last step's output predicts."""

    def __init__(
        self, shape: tuple[int, ...], outputs: int, cell: str, hidden_size: int, num_layers: int, dropout: float
    ) -> None:
        super().__init__()
        features = shape[1] if len(shape) == 2 else 1
        kinds = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
        self.rnn = kinds[cell](
            features, hidden_size, num_layers=num_layers, batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.head = nn.Linear(hidden_size, outputs)
        self.add_feature = len(shape) == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.add_feature:
            x = x.unsqueeze(-1)
        output, _ = self.rnn(x)
        return self.head(output[:, -1])


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, block_size: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        mask = torch.tril(torch.ones(block_size, block_size, dtype=torch.bool))
        self.register_buffer("mask", mask.view(1, 1, block_size, block_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, steps, dim = x.shape
        q, k, v = self.qkv(x).split(dim, dim=2)
        q = q.view(batch, steps, self.heads, dim // self.heads).transpose(1, 2)
        k = k.view(batch, steps, self.heads, dim // self.heads).transpose(1, 2)
        v = v.view(batch, steps, self.heads, dim // self.heads).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(dim // self.heads)
        scores = scores.masked_fill(~self.mask[:, :, :steps, :steps], float("-inf"))
        attended = self.dropout(torch.softmax(scores, dim=-1)) @ v
        return self.proj(attended.transpose(1, 2).reshape(batch, steps, dim))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, block_size: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = CausalSelfAttention(dim, heads, block_size, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Gpt(nn.Module):
    """A character-level decoder-only transformer: tokens [B, T <= block_size] -> logits [B, T, V]."""

    def __init__(
        self, vocabulary: int, block_size: int, embedding_dim: int, num_layers: int, num_heads: int, dropout: float
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.tokens = nn.Embedding(vocabulary, embedding_dim)
        self.positions = nn.Embedding(block_size, embedding_dim)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(embedding_dim, num_heads, block_size, dropout) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(embedding_dim)
        self.head = nn.Linear(embedding_dim, vocabulary)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        steps = tokens.shape[1]
        if steps > self.block_size:
            tokens = tokens[:, -self.block_size :]
            steps = self.block_size
        positions = torch.arange(steps, device=tokens.device)
        x = self.dropout(self.tokens(tokens) + self.positions(positions))
        return self.head(self.norm(self.blocks(x)))


class Exported(nn.Module):
    """What gets registered: standardise the input, run the network, undo the target's scaling."""

    def __init__(self, net: nn.Module, standardize: nn.Module, target_mean: torch.Tensor, target_std: torch.Tensor) -> None:
        super().__init__()
        self.standardize = standardize
        self.net = net
        self.register_buffer("target_mean", target_mean.float())
        self.register_buffer("target_std", target_std.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardize(x)) * self.target_std + self.target_mean


def build(
    architecture: str, params: dict[str, Any], sample_shape: tuple[int, ...], outputs: int
) -> nn.Module:
    """The bare network for a resolved spec; `outputs` is classes, targets or vocabulary size."""
    features = math.prod(sample_shape) if sample_shape else 0
    if architecture in ("linear", "logistic"):
        return Affine(features, outputs)
    if architecture == "mlp":
        return Mlp(features, outputs, params["hidden_sizes"], params["dropout"])
    if architecture == "cnn":
        return Cnn(sample_shape, outputs, params["channels"], params["hidden_size"], params["dropout"])
    if architecture == "recurrent":
        return Recurrent(
            sample_shape, outputs, params["cell"], params["hidden_size"], params["num_layers"], params["dropout"]
        )
    return Gpt(
        outputs, params["block_size"], params["embedding_dim"], params["num_layers"], params["num_heads"],
        params["dropout"],
    )
