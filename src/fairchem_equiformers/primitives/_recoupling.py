"""Tensor products with solid harmonics of an edge vector, computed per node by Wigner-6j
recoupling (E2Former, Liu et al., arXiv:2501.19216).

A message ``sum_j a_ij [h_j (x) R^L(r_i - r_j)]`` needs one tensor product per edge. Regular
solid harmonics ``R^L(v) = |v|^L Y^L(v/|v|)`` are homogeneous polynomials, and obey the addition
theorem ``R^L(a - s) = sum_k c_Lk [R^k(a) (x) R^(L-k)(s)]^L``. Substituting and recoupling the
three angular momenta with Wigner 6j symbols,

    [h (x) [A (x) B]^L]^o = sum_l' W(l_h, k, L-k, L, o; l') [[h (x) B]^l' (x) A]^o,

splits every edge product into one product per *source* (``[h_j (x) R^(L-k)(r_j)]``, O(|V|)),
an attention-weighted sum over edges of those node features (no tensor product), and one
product per *target* with ``R^k(r_i)``. The identity is exact; it is checked to 1e-10 in float64.

Conventions: node features ``[*, (lmax+1)**2, C]`` in the node layout (l-major, e3nn's real
basis, ``l = 1`` components ordered x, y, z), one channel count for every degree, channel-wise
("depthwise") products with one learned weight per path ``(l_h, l_out)`` and channel.
``[x (x) y]^l3`` is ``sqrt(2 l3 + 1)`` times e3nn's (unit-norm) ``wigner_3j`` contraction.
Parity is not tracked (as in EquiformerV2): every path allowed by the triangle rule is used.
The addition-theorem and recoupling coefficients are fitted by least squares from e3nn's
harmonics and 3j symbols in float64; the fit residual is asserted to be at round-off, which
proves the identities rather than assuming a phase convention. :func:`wigner_6j` is the Racah
formula, against which the fitted recoupling coefficients are tested.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import cache

import torch
from e3nn import o3
from torch import nn


def solid_harmonics(l: int, vectors: torch.Tensor) -> torch.Tensor:
    """Regular solid harmonics ``|v|^l Y^l(v/|v|)`` (component norm: ``|Y^l|^2 = 2l+1``).

    Shapes: ``vectors: [*, 3] -> [*, 2l+1]``."""
    return o3.spherical_harmonics(l, vectors, normalize=False, normalization="component")


@cache
def coupling(l1: int, l2: int, l3: int) -> torch.Tensor:
    """``[2l1+1, 2l2+1, 2l3+1]`` float64: ``[x (x) y]^l3 = einsum('abc,a,b->c', C, x, y)``."""
    return o3.wigner_3j(l1, l2, l3, dtype=torch.float64) * math.sqrt(2 * l3 + 1)


def _fit(columns: torch.Tensor, target: torch.Tensor, what: str) -> torch.Tensor:
    """Least-squares coefficients of ``target`` in the span of ``columns``; the identity must
    hold exactly, so the residual has to be at float64 round-off."""
    solution = torch.linalg.lstsq(columns, target[:, None]).solution[:, 0]
    residual = (columns @ solution - target).abs().max() / target.abs().max()
    if residual > 1e-11:
        raise ArithmeticError(f"{what}: no exact expansion (residual {float(residual):.1e})")
    return solution


@cache
def addition_coefficients(order: int) -> torch.Tensor:
    """``c[k]`` (k = 0..order, float64) with ``R^L(a - s) = sum_k c[k] [R^k(a) (x) R^(L-k)(s)]^L``."""
    generator = torch.Generator().manual_seed(order)
    a, s = torch.randn(2, 4 * (2 * order + 1), 3, dtype=torch.float64, generator=generator)
    products = [
        torch.einsum("xyz,px,py->pz", coupling(k, order - k, order), solid_harmonics(k, a),
                     solid_harmonics(order - k, s)).reshape(-1)
        for k in range(order + 1)
    ]  # fmt: skip
    target = solid_harmonics(order, a - s).reshape(-1)
    return _fit(torch.stack(products, dim=1), target, f"addition theorem of order {order}")


def intermediate_degrees(l1: int, l2: int) -> range:
    return range(abs(l1 - l2), l1 + l2 + 1)


@cache
def recoupling_coefficients(l_h: int, k: int, b: int, order: int, l_out: int) -> dict[int, float]:
    """``W[l']`` with ``[h (x) [A (x) B]^L]^o = sum_l' W[l'] [[h (x) B]^l' (x) A]^o`` for
    degrees ``h: l_h``, ``A: k``, ``B: b``, ``L = order``, ``o = l_out`` (e3nn's real basis).

    Up to phase and normalisation these are Wigner 6j symbols
    ``{l_h b l'; k o L}`` (see :func:`wigner_6j`)."""
    left = torch.einsum("abM,hMo->habo", coupling(k, b, order), coupling(l_h, order, l_out))
    degrees = [lp for lp in intermediate_degrees(l_h, b) if abs(lp - k) <= l_out <= lp + k]
    right = [torch.einsum("hbm,mao->habo", coupling(l_h, b, lp), coupling(lp, k, l_out)) for lp in degrees]
    what = f"recoupling (l_h={l_h}, k={k}, b={b}, L={order}, o={l_out})"
    solution = _fit(torch.stack([r.reshape(-1) for r in right], dim=1), left.reshape(-1), what)
    return {lp: float(w) for lp, w in zip(degrees, solution) if abs(w) > 1e-12}


def wigner_6j(j1: int, j2: int, j3: int, j4: int, j5: int, j6: int) -> float:
    """The Wigner 6j symbol ``{j1 j2 j3; j4 j5 j6}`` of integer arguments (Racah's formula,
    in exact rational arithmetic)."""
    triads = [(j1, j2, j3), (j1, j5, j6), (j4, j2, j6), (j4, j5, j3)]
    if any(a + b < c or a + c < b or b + c < a for a, b, c in triads):
        return 0.0

    def delta(a: int, b: int, c: int) -> Fraction:
        f = math.factorial
        return Fraction(f(a + b - c) * f(a - b + c) * f(-a + b + c), f(a + b + c + 1))

    prefactor = math.prod(delta(*t) for t in triads)
    sums = [sum(t) for t in triads]
    pairs = [j1 + j2 + j4 + j5, j2 + j3 + j5 + j6, j3 + j1 + j6 + j4]
    total = Fraction(0)
    for t in range(max(sums), min(pairs) + 1):
        denominator = math.prod(math.factorial(t - s) for s in sums)
        denominator *= math.prod(math.factorial(p - t) for p in pairs)
        total += Fraction((-1) ** t * math.factorial(t + 1), denominator)
    return math.copysign(math.sqrt(prefactor * total * total), total)


def _degree_slice(l: int) -> slice:
    return slice(l * l, (l + 1) * (l + 1))


class SolidHarmonicTensorProduct(nn.Module):
    """``out^o = sum_{l_h} w[(l_h, o)] [h^{l_h} (x) R^L(v)]^o``, channel-wise, for one order L,
    evaluated either per edge (:meth:`per_edge`) or per node by 6j recoupling
    (:meth:`source_stage`, a weighted sum over edges, then :meth:`target_stage`).

    ``paths``: every ``(l_h, l_out)`` with both in ``0..lmax`` and ``|l_h - L| <= l_out <= l_h + L``.
    The per-node route carries ``P`` intermediate coefficients per channel (``source_stage``
    output ``[S, P, C]``, P summed over the split index k = 0..L).

    Shapes: ``h: [*, K, C]``, ``weight: [num_paths, C]``; positions ``[*, 3]`` already divided
    by the length scale the caller chooses."""

    def __init__(self, lmax: int, order: int, num_channels: int) -> None:
        super().__init__()
        self.lmax, self.order, self.num_channels = lmax, order, num_channels
        degrees = range(lmax + 1)
        self.paths = [(lh, lo) for lh in degrees for lo in degrees if abs(lh - order) <= lo <= lh + order]
        if not self.paths:
            raise ValueError(f"order {order} couples no degrees up to lmax={lmax} (need order <= 2 * lmax)")
        self.weight = nn.Parameter(torch.randn(len(self.paths), num_channels) / math.sqrt(len(self.paths)))
        num_coefficients = (lmax + 1) ** 2
        path_rows = [(p, lo, m) for p, (_, lo) in enumerate(self.paths) for m in range(2 * lo + 1)]
        # [K, X]: sums the path rows X = (path, m_out) into the output coefficients
        gather = torch.zeros(num_coefficients, len(path_rows), dtype=torch.float64)
        for x, (_, lo, m) in enumerate(path_rows):
            gather[lo * lo + m, x] = 1.0
        self.register_buffer("path_to_output", gather, persistent=False)
        self.register_buffer("path_of_row", torch.tensor([p for p, _, _ in path_rows]), persistent=False)

        # per edge: [X, K * (2L+1)] from the outer product h (x) R^L
        per_edge = torch.zeros(len(path_rows), num_coefficients, 2 * order + 1, dtype=torch.float64)
        for p, (lh, lo) in enumerate(self.paths):
            rows = [x for x, (q, _, _) in enumerate(path_rows) if q == p]
            per_edge[rows, _degree_slice(lh)] = coupling(lh, order, lo).permute(2, 0, 1)
        self.register_buffer("per_edge_matrix", per_edge.flatten(1), persistent=False)

        self.intermediate_sizes = []
        c = addition_coefficients(order)
        for k in range(order + 1):
            b = order - k
            # intermediates (l_h, l') of [h (x) R^b(s)]^l' that some path needs
            inter = sorted(
                {(lh, lp) for lh, lo in self.paths for lp in recoupling_coefficients(lh, k, b, order, lo)}
            )
            offsets, size = {}, 0
            for lh, lp in inter:
                offsets[(lh, lp)] = size
                size += 2 * lp + 1
            source = torch.zeros(size, num_coefficients, 2 * b + 1, dtype=torch.float64)
            for lh, lp in inter:
                block = slice(offsets[(lh, lp)], offsets[(lh, lp)] + 2 * lp + 1)
                source[block, _degree_slice(lh)] = coupling(lh, b, lp).permute(2, 0, 1)
            target = torch.zeros(len(path_rows), size, 2 * k + 1, dtype=torch.float64)
            for p, (lh, lo) in enumerate(self.paths):
                rows = [x for x, (q, _, _) in enumerate(path_rows) if q == p]
                for lp, w in recoupling_coefficients(lh, k, b, order, lo).items():
                    block = slice(offsets[(lh, lp)], offsets[(lh, lp)] + 2 * lp + 1)
                    target[rows, block] = c[k] * w * coupling(lp, k, lo).permute(2, 0, 1)
            self.register_buffer(f"source_matrix_{k}", source.flatten(1), persistent=False)
            self.register_buffer(f"target_matrix_{k}", target.flatten(1), persistent=False)
            self.intermediate_sizes.append(size)

    @property
    def num_intermediate(self) -> int:
        """P: intermediate coefficients per channel carried from sources to targets."""
        return sum(self.intermediate_sizes)

    def _weighted_paths(self, rows: torch.Tensor) -> torch.Tensor:
        """``[*, X, C]`` path rows -> ``[*, K, C]`` output, each path scaled by its weight."""
        weight = self.weight.index_select(0, self.path_of_row).to(rows.dtype)  # [X, C]
        return self.path_to_output.to(rows.dtype) @ (rows * weight)

    @staticmethod
    def _outer(h: torch.Tensor, harmonics: torch.Tensor) -> torch.Tensor:
        """``[*, K, C] x [*, D] -> [*, K * D, C]``."""
        return (h[:, :, None, :] * harmonics[:, None, :, None]).flatten(1, 2)

    def per_edge(self, h: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
        """The explicit product with ``R^L(displacement)``, one per row (edge).

        Shapes: ``h: [E, K, C]``, ``displacement: [E, 3]`` (target - source) ``-> [E, K, C]``."""
        harmonics = solid_harmonics(self.order, displacement)  # [E, 2L+1]
        rows = self.per_edge_matrix.to(h.dtype) @ self._outer(h, harmonics)  # [E, X, C]
        return self._weighted_paths(rows)

    def source_stage(self, h: torch.Tensor, source_pos: torch.Tensor) -> torch.Tensor:
        """Node-level products ``[h_j (x) R^(L-k)(s_j)]^l'`` for every k, concatenated.

        Shapes: ``h: [S, K, C]``, ``source_pos: [S, 3] -> [S, P, C]``."""
        parts = []
        for k in range(self.order + 1):
            harmonics = solid_harmonics(self.order - k, source_pos)  # [S, 2(L-k)+1]
            parts.append(getattr(self, f"source_matrix_{k}").to(h.dtype) @ self._outer(h, harmonics))
        return torch.cat(parts, dim=1)

    def target_stage(self, aggregated: torch.Tensor, target_pos: torch.Tensor) -> torch.Tensor:
        """Recoupled products of the edge sums with ``R^k(a_i)``, weighted per path.

        Shapes: ``aggregated: [N, P, C]``, ``target_pos: [N, 3] -> [N, K, C]``."""
        rows = 0
        for k, part in enumerate(aggregated.split(self.intermediate_sizes, dim=1)):
            harmonics = solid_harmonics(k, target_pos)  # [N, 2k+1]
            rows = rows + getattr(self, f"target_matrix_{k}").to(part.dtype) @ self._outer(part, harmonics)
        return self._weighted_paths(rows)

    def node_level(
        self,
        h: torch.Tensor,
        source_pos: torch.Tensor,
        target_pos: torch.Tensor,
        edge_source: torch.Tensor,
        edge_target: torch.Tensor,
        edge_weight: torch.Tensor,
    ) -> torch.Tensor:
        """``out_i = sum_j w_ij [h_j (x) R^L(a_i - s_j)]`` through the node-level route, with a
        plain weighted sum over the edges (models fuse this step with their attention).

        Shapes: ``h: [S, K, C]``, ``source_pos: [S, 3]``, ``target_pos: [N, 3]``,
        ``edge_source, edge_target, edge_weight: [E] -> [N, K, C]``."""
        intermediate = self.source_stage(h, source_pos)  # [S, P, C]
        messages = intermediate.index_select(0, edge_source) * edge_weight[:, None, None]  # [E, P, C]
        summed = messages.new_zeros(target_pos.shape[0], *messages.shape[1:]).index_add_(
            0, edge_target, messages
        )
        return self.target_stage(summed, target_pos)

    def extra_repr(self) -> str:
        return (
            f"lmax={self.lmax}, order={self.order}, channels={self.num_channels}, "
            f"paths={len(self.paths)}, intermediate={self.num_intermediate}"
        )
