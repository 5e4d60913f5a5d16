"""Wigner-D matrices of real spherical harmonics (e3nn's basis) and edge-frame rotations.

A rotation with Y-X-Y Euler angles factors as ``D(a, b, c) = Y(a) J Y(b) J Y(c)``, where
``Y(t)`` rotates about the y axis (the polar axis of e3nn's harmonics; it only mixes ``+m`` with
``-m``) and ``J`` is a fixed orthogonal involution per degree. Only ``J`` needs a table; the
``Y`` factors are elementwise.

The edge frame maps the unit edge vector ``u`` to ``+y``, so that a feature rotated into it
has its ``m = 0`` components along the edge. The rotation about the edge axis is free (the
SO(2) convolution commutes with it); we fix it by the Euler angles of ``Q u`` with gamma = 0,
``Q`` a fixed rotation (:func:`frame_tilt`), which makes the frame a deterministic function of
``u`` (the released EquiformerV2 draws it at random on every call).

No frame field on the sphere is smooth everywhere: this one turns once about the edge as ``u``
circles its poles ``u = +-FRAME_POLE`` (where ``Q u = +-y``). A model exactly invariant to the
spin (SO(2) convolutions, gate activations) does not see it; one with an S2-grid activation in
the edge frame changes by its grid error there, over an arbitrarily short distance. ``Q`` puts
the poles on a direction no low-index lattice direction comes near (at least 5.7 degrees from
every cubic and hexagonal direction with indices up to 4), instead of the y axis, which edges of
cubic cells and slabs lie on.

Everything is differentiable in the edge vector (conservative forces, stress). At the poles the
azimuth is undefined and fixed to 0; there the frame's gradient comes from
:func:`with_pole_gradients`.
"""

from __future__ import annotations

import math
from functools import cache

import torch
from e3nn import o3

# Constant matrices per degree, built in eager mode (``prepare_constants``, called by every
# ``SphericalLayout``) and then only read: torch.compile reads a global dict as constants, where a
# call into the builders (which switch the default dtype) would break the graph.
_SWAP: dict[int, torch.Tensor] = {}
_TILT: dict[int, torch.Tensor] = {}


@torch._dynamo.disable  # it switches the default dtype, which torch.compile must not trace
def _float64(build, *args) -> torch.Tensor:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return build(*args).contiguous()
    finally:
        torch.set_default_dtype(previous)


def swap_matrix(l: int) -> torch.Tensor:
    """J_l ``[2l+1, 2l+1]`` in float64: e3nn's Wigner-D of Euler angles (pi/2, pi/2, pi/2).

    e3nn builds the matrix from its so(3) generators in the default dtype; they are built here in
    float64 (from float32 generators the entries would be 1e-7 off), so ``Y(R v) = J Y(v)`` holds
    to float64 round-off (measured 9e-15 at l = 10)."""
    if l not in _SWAP:
        half_pi = math.pi / 2
        _SWAP[l] = _float64(lambda: o3.wigner_D(l, *(torch.tensor(half_pi),) * 3))
    return _SWAP[l]


# The frame's poles are the edges along +-FRAME_POLE (a unit vector).
_POLE = (-0.7530452, 0.65019034, 0.1008734)
FRAME_POLE = tuple(c / math.hypot(*_POLE) for c in _POLE)


@cache
def frame_tilt() -> torch.Tensor:
    """``Q [3, 3]`` float64: the smallest rotation taking ``FRAME_POLE`` to ``+y``."""
    pole = torch.tensor(FRAME_POLE, dtype=torch.float64)
    axis = torch.linalg.cross(pole, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    sin, cos = axis.norm(), pole[1]
    k = axis / sin
    cross = torch.tensor(
        [[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]], dtype=torch.float64
    )  # k x .
    return torch.eye(3, dtype=torch.float64) + sin * cross + (1 - cos) * cross @ cross


def tilt_wigner(l: int) -> torch.Tensor:
    """``D_l(Q) [2l+1, 2l+1]`` float64: ``Y_l(Q v) = D_l(Q) Y_l(v)``."""
    if l not in _TILT:
        _TILT[l] = _float64(lambda: o3.Irrep(l, 1).D_from_matrix(frame_tilt()))
    return _TILT[l]


def prepare_constants(lmax: int) -> None:
    """Build the constant matrices of degrees 0..lmax (in eager mode, before any tracing)."""
    for l in range(lmax + 1):
        swap_matrix(l)
        tilt_wigner(l)


def multiple_angles(cos: torch.Tensor, sin: torch.Tensor, lmax: int):
    """cos(m t) and sin(m t) for m = -lmax..lmax, from cos t and sin t (no trigonometric calls).

    Shapes: ``cos, sin: [E]`` -> two tensors ``[E, 2*lmax+1]``."""
    cos_m, sin_m = [torch.ones_like(cos)], [torch.zeros_like(sin)]
    for _ in range(lmax):
        cos_m, sin_m = (
            cos_m + [cos_m[-1] * cos - sin_m[-1] * sin],
            sin_m + [sin_m[-1] * cos + cos_m[-1] * sin],
        )
    cos_pos, sin_pos = torch.stack(cos_m, dim=-1), torch.stack(sin_m, dim=-1)  # [E, lmax+1]
    cos_all = torch.cat([cos_pos[:, 1:].flip(-1), cos_pos], dim=-1)
    sin_all = torch.cat([-sin_pos[:, 1:].flip(-1), sin_pos], dim=-1)
    return cos_all, sin_all


def _slice_orders(values: torch.Tensor, l: int, lmax: int) -> torch.Tensor:
    """Columns m = -l..l of a ``[E, 2*lmax+1]`` table indexed by m = -lmax..lmax."""
    return values[:, lmax - l : lmax + l + 1]


def wigner_d_columns(
    cos_alpha: torch.Tensor,
    sin_alpha: torch.Tensor,
    cos_beta: torch.Tensor,
    sin_beta: torch.Tensor,
    lmax: int,
    mmax: int,
    cos_gamma: torch.Tensor | None = None,
    sin_gamma: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Columns ``|m| <= mmax`` of ``D_l(a, b, g) = Y(a) J Y(b) J Y(g)`` for every degree.

    Returns ``[E, 2l+1, r_l]`` per degree l, ``r_l = 2*min(l, mmax)+1``, columns by ascending m.
    ``D(a, b, g)`` maps ``+y`` to the direction with polar angle b and azimuth a, so its
    transpose rotates that direction onto ``+y``; g spins the frame about that direction."""
    cos_a, sin_a = multiple_angles(cos_alpha, sin_alpha, lmax)  # [E, 2lmax+1]
    cos_b, sin_b = multiple_angles(cos_beta, sin_beta, lmax)
    if cos_gamma is not None:
        cos_g, sin_g = multiple_angles(cos_gamma, sin_gamma, mmax)  # [E, 2mmax+1]
    blocks = []
    for l in range(lmax + 1):
        if l == 0:
            blocks.append(cos_alpha.new_ones(cos_alpha.shape[0], 1, 1))
            continue
        mm = min(l, mmax)
        swap = swap_matrix(l).to(dtype=cos_alpha.dtype, device=cos_alpha.device)
        cb, sb = _slice_orders(cos_b, l, lmax), _slice_orders(sin_b, l, lmax)  # [E, 2l+1]
        ca, sa = _slice_orders(cos_a, l, lmax), _slice_orders(sin_a, l, lmax)
        # J Y(b): column j mixes with column -j
        jy = swap * cb[:, None, :] + swap.flip(-1) * sb[:, None, :]  # [E, 2l+1, 2l+1]
        jyj = jy @ swap[:, l - mm : l + mm + 1]  # [E, 2l+1, r_l]
        # Y(a) (J Y(b) J): row m mixes with row -m
        block = ca[:, :, None] * jyj - sa[:, :, None] * jyj.flip(-2)
        if cos_gamma is not None:  # (...) Y(g): column m mixes with column -m
            cg, sg = _slice_orders(cos_g, mm, mmax), _slice_orders(sin_g, mm, mmax)
            block = block * cg[:, None, :] + block.flip(-1) * sg[:, None, :]
        blocks.append(block)
    return blocks


def frame_angles_from_matrices(rotation: torch.Tensor):
    """Euler angles (as cos/sin) of ``rotation^T`` for rotations ``[E, 3, 3]`` that map each
    edge direction onto ``+y`` (any spin about the edge).

    Returns cos/sin of alpha, beta, gamma, each ``[E]``."""
    inverse = rotation.transpose(1, 2)  # maps +y to the edge direction
    cos_a, sin_a, cos_b, sin_b = edge_frame_angles(inverse[:, :, 1])
    zero, one = torch.zeros_like(cos_a), torch.ones_like(cos_a)
    rot_y = torch.stack([cos_a, zero, sin_a, zero, one, zero, -sin_a, zero, cos_a], -1).view(-1, 3, 3)
    rot_x = torch.stack([one, zero, zero, zero, cos_b, -sin_b, zero, sin_b, cos_b], -1).view(-1, 3, 3)
    spin = (rot_y @ rot_x).transpose(1, 2) @ inverse  # rotation about y by gamma
    return cos_a, sin_a, cos_b, sin_b, spin[:, 0, 0], spin[:, 0, 2]


def edge_frame_angles(edge_vec: torch.Tensor):
    """Euler angles (as cos/sin) of the unit edge vectors, e3nn convention.

    ``edge_vec: [E, 3]`` (need not be normalised; must be non-zero).
    Returns cos_alpha, sin_alpha, cos_beta, sin_beta, each ``[E]``."""
    unit = edge_vec / edge_vec.norm(dim=-1, keepdim=True)
    x, y, z = unit.unbind(-1)
    squared = x * x + z * z
    on_axis = _on_pole(squared)
    # sqrt has an infinite slope at 0: on the axis take the value without its gradient (the
    # pole's gradient is added by `with_pole_gradients`), elsewhere the plain square root
    off_axis_root = torch.where(on_axis, torch.ones_like(squared), squared).sqrt()
    sin_beta = torch.where(on_axis, squared.detach().sqrt(), off_axis_root)
    safe = torch.where(on_axis, torch.ones_like(sin_beta), sin_beta)
    cos_alpha = torch.where(on_axis, torch.ones_like(z), z / safe)
    sin_alpha = torch.where(on_axis, torch.zeros_like(x), x / safe)
    return cos_alpha, sin_alpha, y, sin_beta


def _on_pole(sin_beta_squared: torch.Tensor) -> torch.Tensor:
    """Edges whose direction is +-y to float64 round-off (``sin(beta) < 1e-12``), ``[E]`` bool."""
    return sin_beta_squared.detach().sqrt() < 1e-12


@cache
def rotation_generators(l: int) -> torch.Tensor:
    """``[3, 2l+1, 2l+1]`` float64: ``X_a`` with ``D_l(rotation by t about axis a) = exp(t X_a)``,
    axes x, y, z (e3nn's generators)."""
    return o3.so3_generators(l).to(torch.float64)


def with_pole_gradients(blocks: list[torch.Tensor], edge_vec: torch.Tensor) -> list[torch.Tensor]:
    """Blocks of :func:`wigner_d_columns` (from :func:`edge_frame_angles` of ``edge_vec [E, 3]``)
    with the right first derivative at edges exactly along +-y; values are unchanged.

    At a pole ``s`` the Euler frame has no derivative (the azimuth is undefined there). A frame
    that is smooth through the pole is the minimal rotation taking ``s`` to ``u`` composed with
    the pole's frame ``D``; to first order that is ``(I + sum_a w_a X_a) D`` with ``w = s x u``.
    This adds ``(w . X) D`` with ``w`` zero in value and that gradient. It is the exact
    derivative for every function invariant to the frame's spin about the edge (the SO(2)
    convolutions exactly, the S2-grid activations to their grid's accuracy)."""
    if not edge_vec.requires_grad:
        return blocks
    unit = edge_vec / edge_vec.norm(dim=-1, keepdim=True)
    poles = _on_pole(unit[:, 0] ** 2 + unit[:, 2] ** 2).nonzero()[:, 0]  # [P]
    if poles.numel() == 0:
        return blocks
    u = unit[poles]  # [P, 3]
    sign = torch.sign(u[:, 1].detach())
    s_cross_u = torch.stack([sign * u[:, 2], torch.zeros_like(sign), -sign * u[:, 0]], dim=-1)
    w = s_cross_u - s_cross_u.detach()  # [P, 3], exactly zero
    out = [blocks[0]]
    for l in range(1, len(blocks)):
        generators = rotation_generators(l).to(dtype=edge_vec.dtype, device=edge_vec.device)
        tangent = torch.einsum("pa,aij->pij", w, generators)  # [P, 2l+1, 2l+1]
        out.append(blocks[l].index_add(0, poles, tangent @ blocks[l][poles]))
    return out
