"""Models and batches for the client benchmarks: a small transformer and MLPs of a chosen size."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class TinyTransformer(nn.Module):
    """A token-level transformer encoder with a vocabulary head (about 4.2M parameters by default)."""

    def __init__(self, *, vocab: int = 2000, width: int = 256, layers: int = 4, seq_len: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(seq_len, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embed(tokens) + self.position[: tokens.shape[1]])
        return self.head(hidden).flatten(0, 1)


def build_mlp(*, inputs: int, hidden: int, classes: int = 10) -> nn.Module:
    """Return a two-hidden-layer ReLU MLP."""
    return nn.Sequential(
        nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)
    )


def mlp_hidden_for(parameter_count: int, *, inputs: int = 512, classes: int = 10) -> int:
    """Return the hidden width at which build_mlp has about parameter_count parameters."""
    # Parameters: hidden**2 + (inputs + classes + 3) * hidden + classes; solve the quadratic.
    linear = inputs + classes + 3
    return max(1, int((-linear + (linear * linear + 4 * parameter_count) ** 0.5) / 2))


def count_parameters(model: nn.Module) -> int:
    """Return the number of parameter elements of model."""
    return sum(parameter.numel() for parameter in model.parameters())


@dataclass(kw_only=True)
class Workload:
    """A model with a fixed batch: what one training step of a benchmark runs on."""

    name: str
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor


def transformer_workload(*, width: int = 256, layers: int = 4, seq_len: int = 64, batch: int = 8,
                         vocab: int = 2000) -> Workload:
    """Return the transformer workload with random tokens and next-token-like targets."""
    generator = torch.Generator().manual_seed(0)
    model = TinyTransformer(vocab=vocab, width=width, layers=layers, seq_len=seq_len)
    tokens = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    targets = torch.randint(0, vocab, (batch * seq_len,), generator=generator)
    return Workload(name="transformer", model=model, inputs=tokens, targets=targets)


def mlp_workload(*, parameter_count: int = 2_000_000, batch: int = 64, inputs: int = 512) -> Workload:
    """Return an MLP workload of about parameter_count parameters with a random batch."""
    generator = torch.Generator().manual_seed(0)
    model = build_mlp(inputs=inputs, hidden=mlp_hidden_for(parameter_count, inputs=inputs))
    features = torch.randn(batch, inputs, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    return Workload(name="mlp", model=model, inputs=features, targets=labels)
