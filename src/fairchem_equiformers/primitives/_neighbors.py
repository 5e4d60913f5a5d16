"""Neighbour search in time linear in the atoms: vesin's cell lists, with fairchem's rules.

fairchem 1.10's ``radius_graph_pbc`` compares every pair of atoms of a structure against every
periodic image in range (quadratic: 4.6 s at 1,002 atoms). Here vesin (a maintained C library,
CPU and CUDA) finds the candidate pairs in linear time, and the edges kept are fairchem's: the
squared distances recomputed in float32 as fairchem computes them, pairs with
``0.0001 < d^2 <= r^2`` kept, and fairchem's own ``get_max_neighbors_mask`` applied to the
candidates in fairchem's order (target atom, source atom, cell offset in ``cartesian_prod``
order), so that ``max_neighbors`` (strict or with fairchem's degeneracy tolerance) picks the
same neighbours and the edges come out in the same order.
"""

from __future__ import annotations

import numpy as np
import torch
from fairchem.core.common.utils import get_max_neighbors_mask
from vesin import NeighborList

# candidates within radius * (1 + SEARCH_MARGIN) + SEARCH_MARGIN (A): vesin's float64 distances
# and fairchem's float32 ones must not disagree about a pair at the cutoff
SEARCH_MARGIN = 1e-4


def radius_graph(
    pos: torch.Tensor,
    natoms: torch.Tensor,
    cell: torch.Tensor | None,
    pbc: torch.Tensor | None,
    radius: float,
    max_neighbors: int,
    enforce_max_neighbors_strictly: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges of a batch: ``edge_index [2, E]`` (source, target; global atom indices) and the
    source image's ``cell_offsets [E, 3]`` (float, in cell vectors), each target's sources within
    ``radius`` (Angstrom), at most ``max_neighbors`` of them by fairchem's rule.

    ``pos [N, 3]`` (detached; the distances are compared in float32, as fairchem does),
    ``natoms [B]``, ``cell [B, 3, 3]`` and ``pbc [B, 3]`` bool (``None``: no periodic direction)."""
    pos32 = pos.detach().to(torch.float32)
    cell32 = None if cell is None else cell.detach().to(torch.float32)
    search = NeighborList(cutoff=radius * (1 + SEARCH_MARGIN) + SEARCH_MARGIN, full_list=True)
    points = pos32.cpu().double().numpy()
    boxes = None if cell32 is None else cell32.cpu().double().numpy()
    periodic = None if pbc is None else pbc.cpu().numpy()
    targets, sources, offsets, start = [], [], [], 0
    for graph, count in enumerate(natoms.tolist()):
        if count > 1:
            box = np.zeros((3, 3)) if boxes is None else boxes[graph]
            flags = [False] * 3 if periodic is None else [bool(p) for p in periodic[graph]]
            i, j, shift = search.compute(points[start : start + count], box, flags, quantities="ijS")
            order = np.lexsort((shift[:, 2], shift[:, 1], shift[:, 0], j, i))  # fairchem's order
            targets.append(i[order] + start)
            sources.append(j[order] + start)
            offsets.append(shift[order])
        start += count
    device = pos.device
    if not targets:
        return torch.zeros(2, 0, dtype=torch.long, device=device), torch.zeros(0, 3, device=device)
    target = torch.from_numpy(np.concatenate(targets)).long().to(device)  # [E']
    source = torch.from_numpy(np.concatenate(sources)).long().to(device)
    offset = torch.from_numpy(np.concatenate(offsets)).float().to(device)  # [E', 3]
    shift = torch.zeros_like(offset) if cell32 is None else _image_shifts(offset, cell32, natoms, target)
    distance_sqr = ((pos32[target] - (pos32[source] + shift)) ** 2).sum(dim=1)  # float32, fairchem's
    keep = (distance_sqr <= radius * radius) & (distance_sqr > 0.0001)
    target, source, offset, distance_sqr = target[keep], source[keep], offset[keep], distance_sqr[keep]
    mask, _ = get_max_neighbors_mask(
        natoms=natoms,
        index=target,
        atom_distance=distance_sqr.to(torch.get_default_dtype()),  # what fairchem's buffer holds
        max_num_neighbors_threshold=max_neighbors,
        enforce_max_strictly=enforce_max_neighbors_strictly,
    )
    return torch.stack([source[mask], target[mask]]), offset[mask]


def _image_shifts(
    offset: torch.Tensor, cell: torch.Tensor, natoms: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Cartesian shifts ``[E, 3]`` of the source images, float32 as fairchem's ``bmm``."""
    graph_of_atom = torch.repeat_interleave(torch.arange(len(natoms), device=natoms.device), natoms)
    cells = cell[graph_of_atom.to(target.device)[target]]  # [E, 3, 3]
    return torch.bmm(cells.transpose(1, 2), offset[:, :, None])[:, :, 0]
