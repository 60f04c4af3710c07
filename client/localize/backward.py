"""Backward search of a replay: the first autograd node that made a non-finite gradient from finite ones."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from nanwatch.client.localize.origins import OpSite, produced_text

# Graphs larger than this are searched only in part; hooks cost memory per node.
MAX_NODES = 200_000


@dataclass(kw_only=True)
class BackwardResult:
    """Result of the backward search of a replay."""

    node: str = ""
    """Name of the first node whose gradients went non-finite from finite incoming ones."""
    site: OpSite | None = None
    """The forward operation that created that node, when the replay traced it."""
    parameters: list[str] = field(default_factory=list)
    """Parameters whose gradient was non-finite, in the order backward computed them."""
    seed_nonfinite: bool = False
    """True when a gradient fed into the backward was already non-finite."""
    produced: str = ""
    """Kinds of value the first node made: "nan", "inf", "-inf" or a mix such as "nan,inf"."""


def _any_nonfinite(tensors: Sequence[Any]) -> bool:
    return any(isinstance(t, torch.Tensor) and not bool(torch.isfinite(t).all()) for t in tensors)


def graph_nodes(roots: Sequence[torch.Tensor]) -> list[Any]:
    """Return the autograd nodes reachable from roots, without AccumulateGrad nodes."""
    seen: set[int] = set()
    stack = [root.grad_fn for root in roots if root.grad_fn is not None]
    nodes = []
    while stack and len(nodes) < MAX_NODES:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if "AccumulateGrad" not in node.name():
            nodes.append(node)
        stack.extend(child for child, _ in node.next_functions)
    return nodes


def search_backward(
    roots: Sequence[torch.Tensor],
    seeds: Sequence[torch.Tensor] | None,
    leaves: Sequence[tuple[str, torch.Tensor]],
    node_sites: dict[int, OpSite],
) -> BackwardResult:
    """Run backward from roots to leaves with hooks and return where the first non-finite gradient appeared.

    torch.autograd.grad leaves every .grad untouched, and no optimizer reads the result.
    """
    result = BackwardResult(seed_nonfinite=seeds is not None and _any_nonfinite(seeds))
    handles = [node.register_hook(_node_hook(node, result, node_sites)) for node in graph_nodes(roots)]
    grad_leaves = [(name, tensor) for name, tensor in leaves if tensor.requires_grad]
    handles += [tensor.register_hook(_leaf_hook(name, result)) for name, tensor in grad_leaves]
    try:
        if grad_leaves:
            torch.autograd.grad(list(roots), [tensor for _, tensor in grad_leaves], grad_outputs=seeds,
                                allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    return result


def _node_hook(node: Any, result: BackwardResult, node_sites: dict[int, OpSite]) -> Any:
    def hook(grad_inputs: Sequence[Any], grad_outputs: Sequence[Any]) -> None:
        if result.node or not _any_nonfinite(grad_inputs) or _any_nonfinite(grad_outputs):
            return
        result.node = node.name()
        result.site = node_sites.get(id(node))
        bad = [tensor for tensor in grad_inputs if isinstance(tensor, torch.Tensor) and not bool(torch.isfinite(tensor).all())]
        result.produced = ",".join(dict.fromkeys(part for tensor in bad for part in produced_text(tensor).split(",")))

    return hook


def _leaf_hook(name: str, result: BackwardResult) -> Any:
    def hook(grad: torch.Tensor) -> None:
        if not bool(torch.isfinite(grad).all()):
            result.parameters.append(name)

    return hook
