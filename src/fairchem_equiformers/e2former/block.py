"""Gated feed-forward network, its mixture-of-experts form, and the pre-norm E2Former block."""

from __future__ import annotations

import torch
from torch import nn

from fairchem_equiformers.primitives import GateActivation, GraphDropPath, SO3Linear, equivariant_norm

from .attention import Neighbourhood, Wigner6jAttention


class GatedFeedForward(nn.Module):
    """SO3 linear -> gate activation (SiLU on scalars, sigmoid gates of the scalars on l > 0) ->
    SO3 linear. Exactly equivariant (no S2 grid).

    Shapes: ``x: [N, K, C_in] -> [N, K, C_out]``."""

    def __init__(self, lmax: int, in_channels: int, hidden_channels: int, out_channels: int) -> None:
        super().__init__()
        self.linear_1 = SO3Linear(in_channels, hidden_channels, lmax)
        self.gates = nn.Linear(in_channels, lmax * hidden_channels)
        degrees = [l for l in range(1, lmax + 1) for _ in range(2 * l + 1)]
        self.gate_act = GateActivation(degrees, lmax, hidden_channels)
        self.linear_2 = SO3Linear(hidden_channels, out_channels, lmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.gate_act(self.gates(x[:, 0]), self.linear_1(x))  # [N, K, hidden]
        return self.linear_2(hidden)


class MixtureOfExperts(nn.Module):
    """``sum_e p_e(x) FFN_e(x)`` over the ``top_k`` experts a router picks from each node's
    scalars (softmax over the kept logits, the rest get weight 0). Weights are invariant, so the
    mixture is as equivariant as each expert. Every expert is evaluated on every node (dense
    dispatch): simple and exact, at ``num_experts`` times the FFN cost.

    Shapes: ``x: [N, K, C] -> [N, K, C]``."""

    def __init__(self, lmax: int, channels: int, hidden_channels: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"moe_top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.top_k = top_k
        self.router = nn.Linear(channels, num_experts)
        self.experts = nn.ModuleList(
            GatedFeedForward(lmax, channels, hidden_channels, channels) for _ in range(num_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x[:, 0])  # [N, num_experts]
        kept, index = logits.topk(self.top_k, dim=1)
        weights = torch.zeros_like(logits).scatter(1, index, torch.softmax(kept, dim=1))
        outputs = torch.stack([expert(x) for expert in self.experts], dim=-1)  # [N, K, C, num_experts]
        return torch.einsum("nkce,ne->nkc", outputs, weights)


class E2FormerBlock(nn.Module):
    """``x + attention(norm(x))`` then ``x + ffn(norm(x))``, each branch with graph drop-path.

    Shapes: ``x: [N, K, C] -> [N, K, C]``."""

    def __init__(
        self,
        attention: Wigner6jAttention,
        ffn: nn.Module,
        norm_type: str,
        lmax: int,
        channels: int,
        drop_path_rate: float,
    ) -> None:
        super().__init__()
        self.norm_1 = equivariant_norm(norm_type, lmax, channels)
        self.attention = attention
        self.norm_2 = equivariant_norm(norm_type, lmax, channels)
        self.ffn = ffn
        self.drop_path = GraphDropPath(drop_path_rate)

    def forward(
        self, x: torch.Tensor, geometry: Neighbourhood, batch: torch.Tensor, num_graphs: int
    ) -> torch.Tensor:
        x = x + self.drop_path(self.attention(self.norm_1(x), geometry), batch, num_graphs)
        return x + self.drop_path(self.ffn(self.norm_2(x)), batch, num_graphs)
