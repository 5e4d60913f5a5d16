"""Softmax over the incoming edges of each node."""

from __future__ import annotations

import torch

from ._autocast import accumulation_dtype


def graph_softmax(logits: torch.Tensor, target: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Softmax of ``logits: [E, H]`` over edges sharing a target node (``target: [E]``).

    Numerically stable (the per-node maximum is subtracted). A node without incoming edges
    simply contributes nothing; the 1e-16 floor matches torch_geometric's ``softmax``.
    Half-precision logits (autocast) are cast to float32 first."""
    logits = logits.to(accumulation_dtype(logits))
    index = target[:, None].expand_as(logits)
    node_max = logits.new_full((num_nodes, logits.shape[1]), float("-inf"))
    node_max = node_max.scatter_reduce(0, index, logits.detach(), "amax", include_self=True)
    exp = torch.exp(logits - node_max.index_select(0, target))
    node_sum = exp.new_zeros((num_nodes, logits.shape[1])).index_add_(0, target, exp)
    return exp / (node_sum.index_select(0, target) + 1e-16)
