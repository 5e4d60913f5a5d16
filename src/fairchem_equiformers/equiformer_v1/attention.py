"""Equivariant graph attention (Equiformer, Liao & Smidt, arXiv:2206.11990, section 3.3).

Per edge ``s -> t`` the two endpoints are merged (``linear(x)[s] + linear(x)[t]``) and a
depthwise tensor product with the edge's spherical harmonics, weighted per edge by a radial MLP,
gives the message. From it, for each head:

* ``mlp_nonlinear`` (the paper's default): attention logits are a linear map of the message,
  passed through a smooth leaky ReLU and dotted with a learned vector; values are the message
  through a linear layer, a gate and a second depthwise tensor product (weights shared by edges);
* ``mlp_linear``: logits (the same MLP attention) and values are one linear map of the message;
* ``dot_product``: values as in ``mlp_linear``, logits are the scaled dot product of a query
  (linear map of the target's features) with a key (linear map of the message).

Logits are normalised by a softmax over each target's incoming edges; the weighted values are
summed on the target and projected back to the node irreps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from e3nn import o3
from torch import nn

from fairchem_equiformers.primitives import (
    DepthwiseTensorProduct,
    RadialMLP,
    SmoothLeakyReLU,
    gate_activation,
    graph_softmax,
    head_index,
    repeat_heads,
)

ATTENTION_TYPES = ("mlp_nonlinear", "mlp_linear", "dot_product")


@dataclass
class EdgeFeatures:
    """What every attention layer needs to know about the edges.

    Shapes: ``source``/``target: [E]``, ``sh: [E, D_sh]`` spherical harmonics of the unit edge
    vector (source - target), ``radial: [E, num_radial_basis]`` radial basis of its length."""

    source: torch.Tensor
    target: torch.Tensor
    sh: torch.Tensor
    radial: torch.Tensor
    num_nodes: int


class EquivariantGraphAttention(nn.Module):
    """Equivariant graph attention from ``irreps_in`` node features to ``irreps_out``.

    ``radial_channels``: ``[num_radial_basis, hidden, ...]``, the radial MLP without its output
    layer (whose width is the tensor product's number of weights).

    Shapes: ``x: [N, irreps_in.dim] -> [N, irreps_out.dim]``."""

    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_sh: o3.Irreps,
        irreps_out: o3.Irreps,
        irreps_head: o3.Irreps,
        num_heads: int,
        radial_channels: list[int],
        attention_type: str,
        alpha_drop: float,
    ) -> None:
        super().__init__()
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type={attention_type!r} is not one of {ATTENTION_TYPES}")
        self.attention_type, self.num_heads = attention_type, num_heads
        head_scalars = sum(mul for mul, ir in irreps_head if ir.l == 0 and ir.p == 1)
        if head_scalars == 0:
            raise ValueError(f"irreps_head={irreps_head} needs even scalars (0e) for the attention logits")
        self.alpha_channels = head_scalars  # per head
        irreps_value = repeat_heads(irreps_head, num_heads)
        irreps_alpha = o3.Irreps(f"{num_heads * head_scalars}x0e")

        self.merge_source = o3.Linear(irreps_in, irreps_in, biases=True)
        self.merge_target = o3.Linear(irreps_in, irreps_in, biases=False)
        # which degrees the message keeps: the node irreps (non-linear messages, whose values come
        # from a second tensor product) or those of the logits and values (a linear map follows)
        nonlinear = attention_type == "mlp_nonlinear"
        irreps_kept = irreps_in if nonlinear else irreps_alpha + irreps_value
        self.tensor_product = DepthwiseTensorProduct(irreps_in, irreps_sh, irreps_kept, shared_weights=False)
        self.radial = RadialMLP([*radial_channels, self.tensor_product.weight_numel])
        irreps_message = self.tensor_product.irreps_out
        if nonlinear:
            self.alpha_linear = o3.Linear(irreps_message, irreps_alpha, biases=True)
            self.gate = gate_activation(irreps_in)
            self.value_linear = o3.Linear(irreps_message, self.gate.irreps_in, biases=True)
            self.value_tensor_product = DepthwiseTensorProduct(
                irreps_in, irreps_sh, irreps_value, shared_weights=True
            )
            self.value_projection = o3.Linear(self.value_tensor_product.irreps_out, irreps_value, biases=True)
        else:
            self.alpha_value_linear = o3.Linear(irreps_message, irreps_alpha + irreps_value, biases=True)
        if attention_type == "dot_product":
            self.query = o3.Linear(irreps_in, irreps_alpha, biases=True)
        else:
            self.alpha_act = SmoothLeakyReLU(0.2)
            self.alpha_dot = nn.Parameter(torch.empty(num_heads, head_scalars))
            bound = math.sqrt(6.0 / (num_heads + head_scalars))  # Glorot, as GATv2 and the reference
            nn.init.uniform_(self.alpha_dot, -bound, bound)
        self.alpha_dropout = nn.Dropout(alpha_drop)
        self.register_buffer("value_heads", head_index(irreps_head, num_heads), persistent=False)
        self.projection = o3.Linear(irreps_value, irreps_out, biases=True)

    def forward(self, x: torch.Tensor, edges: EdgeFeatures) -> torch.Tensor:
        num_edges, heads = edges.source.shape[0], self.num_heads
        message = self.merge_source(x)[edges.source] + self.merge_target(x)[edges.target]  # [E, D_in]
        weight = self.radial(edges.radial)  # [E, weight_numel]
        message = self.tensor_product(message, edges.sh, weight)  # [E, D_message]
        if self.attention_type == "mlp_nonlinear":
            alpha = self.alpha_linear(message)  # [E, H * A]
            value = self.gate(self.value_linear(message))  # [E, D_in]
            value = self.value_projection(self.value_tensor_product(value, edges.sh))  # [E, D_value]
        else:
            alpha_and_value = self.alpha_value_linear(message)
            alpha_width = heads * self.alpha_channels
            alpha, value = alpha_and_value[:, :alpha_width], alpha_and_value[:, alpha_width:]
        alpha = alpha.reshape(num_edges, heads, self.alpha_channels)  # [E, H, A]
        if self.attention_type == "dot_product":
            query = self.query(x)[edges.target].reshape(num_edges, heads, self.alpha_channels)
            logits = (query * alpha).sum(dim=-1) / math.sqrt(self.alpha_channels)  # [E, H]
        else:
            logits = (self.alpha_act(alpha) * self.alpha_dot).sum(dim=-1)  # [E, H]
        weights = self.alpha_dropout(graph_softmax(logits, edges.target, edges.num_nodes))  # [E, H]
        value = value * weights.index_select(1, self.value_heads)  # [E, D_value]
        out = value.new_zeros(edges.num_nodes, value.shape[1]).index_add_(0, edges.target, value)
        return self.projection(out)  # [N, D_out]
