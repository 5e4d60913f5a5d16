"""The one neighbour graph of every model family, and the input checks shared by all of them."""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass

import torch

from ._neighbors import radius_graph


@dataclass
class Graph:
    """The edges of a batch.

    ``edge_index: [2, E]`` (source, target); ``edge_vec: [E, 3]`` source - target, periodic
    shift included, in the positions' dtype and carrying their gradient; ``cell_shift: [E, 3]``
    the Cartesian shift of each source image (zeros without periodic boundaries)."""

    edge_index: torch.Tensor
    edge_vec: torch.Tensor
    cell_shift: torch.Tensor


def radius_graph_nonperiodic(
    pos: torch.Tensor, batch: torch.Tensor, cutoff: float, max_neighbors: int
) -> torch.Tensor:
    """Edges ``[2, E]`` (source, target) between atoms of the same graph within ``cutoff``,
    keeping each target's ``max_neighbors`` nearest sources (strictly): :func:`radius_graph`
    without periodic boundaries."""
    natoms = torch.bincount(batch)
    edge_index, _ = radius_graph(pos, natoms, None, None, cutoff, max_neighbors, True)
    return edge_index


def build_graph(model, data, pos: torch.Tensor) -> Graph:
    """The graph of ``data`` with vectors from ``pos`` (``data.pos`` or its differentiable copy).

    ``model`` carries fairchem's graph settings (``use_pbc``, ``use_pbc_single``, ``otf_graph``,
    ``max_radius``, ``max_neighbors``, ``enforce_max_neighbors_strictly``) and fairchem's
    ``generate_graph`` (``GraphModelMixin``). Graphs built on the fly come from
    :func:`radius_graph` (linear time; fairchem's edges, in fairchem's order): periodic in the
    directions of ``data.pbc`` when the batch has it, in all three otherwise (fairchem's rule),
    none with ``use_pbc=False``. It only picks the edges, in float32 as fairchem. With
    ``otf_graph=False`` the batch's own ``edge_index`` (and ``cell_offsets``) are used, through
    fairchem's ``generate_graph``. The vectors are then
    ``pos[source] - pos[target] + cell_offsets @ cell`` in ``pos``'s dtype."""
    if model.otf_graph:
        pbc = None
        if model.use_pbc:
            given = getattr(data, "pbc", None)
            pbc = torch.ones(len(data.natoms), 3, dtype=torch.bool) if given is None else given
            pbc = torch.atleast_2d(pbc).bool().view(len(data.natoms), 3)
        cell = data.cell if model.use_pbc else None
        edge_index, cell_offsets = radius_graph(
            pos, data.natoms, cell, pbc, model.max_radius, model.max_neighbors,
            model.enforce_max_neighbors_strictly,
        )  # fmt: skip
    else:
        search_input = copy.copy(data)
        search_input.pos = pos.detach().float()
        if model.use_pbc:
            search_input.cell = data.cell.detach().float()
        found = model.generate_graph(
            search_input,
            enforce_max_neighbors_strictly=model.enforce_max_neighbors_strictly,
            use_pbc_single=model.use_pbc_single,
        )
        edge_index, cell_offsets = found.edge_index, found.cell_offsets
    if model.use_pbc:
        cells = data.cell.to(pos.dtype)[data.batch[edge_index[0]]]  # [E, 3, 3]
        shift = torch.einsum("ei,eij->ej", cell_offsets.to(pos.dtype), cells)
    else:
        shift = pos.new_zeros(edge_index.shape[1], 3)
    source, target = edge_index
    return Graph(edge_index, pos[source] - pos[target] + shift, shift)


GRAPH_FLAGS = ("use_pbc", "use_pbc_single", "otf_graph", "regress_forces", "enforce_max_neighbors_strictly")


def check_common_model_keys(
    *,
    max_neighbors,
    max_radius,
    max_num_elements,
    **flags,
) -> None:
    """Raise ``ValueError`` naming the key for a value of fairchem's common model keys that no
    family can honour: a flag (``GRAPH_FLAGS``) that is not a boolean (e.g. the string
    ``"false"``, which would read as true), ``max_neighbors`` not a positive integer,
    ``max_radius`` not a positive finite number, ``max_num_elements`` below 2 (hydrogen needs 2)."""
    for name, value in flags.items():
        if name not in GRAPH_FLAGS:
            raise TypeError(f"unknown graph flag {name!r}; the flags are {GRAPH_FLAGS}")
        if type(value).__name__ not in ("bool", "bool_"):
            raise ValueError(f"{name}={value!r} must be a boolean (true or false)")

    def integer(value) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    if not integer(max_neighbors) or max_neighbors < 1:
        raise ValueError(f"max_neighbors={max_neighbors!r} must be a positive integer")
    real = isinstance(max_radius, numbers.Real) and not isinstance(max_radius, bool)
    if not real or not (max_radius > 0 and math.isfinite(max_radius)):
        raise ValueError(f"max_radius={max_radius!r} must be a positive number (Angstrom)")
    if not integer(max_num_elements) or max_num_elements < 2:
        raise ValueError(
            f"max_num_elements={max_num_elements!r} must be an integer >= 2 "
            "(atomic numbers 1..max_num_elements-1)"
        )


def _graph_name(graph: int, sid) -> str:
    if sid is None:
        return f"graph {graph}"
    value = sid[graph]
    value = value.item() if isinstance(value, torch.Tensor) else value
    return f"graph {graph} (sid {value})"


MAX_BINS = 1 << 16  # voxels per axis and graph in the overlap search (keys stay below 2**63)


def _close_pairs(
    pos: torch.Tensor, batch: torch.Tensor, num_graphs: int, cell: torch.Tensor | None, min_distance: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs ``i < j`` ``[P]`` of atoms of one graph that may be closer than ``min_distance``
    (periodic images included) and their (minimum-image) distances ``[P]``.

    Atoms are hashed into voxels at least ``min_distance`` wide (fractional coordinates,
    wrapped, with a cell); only atoms in the same or adjacent voxels are compared, so time and
    memory are O(N log N) for any structure whose atoms are not piled up on one point."""
    pos = pos.detach().double()
    if cell is not None:
        lattice = cell.detach().double()  # [B, 3, 3] (rows: lattice vectors)
        frac = torch.linalg.solve(lattice.transpose(1, 2)[batch], pos[..., None])[..., 0]  # [N, 3]
        frac = frac - torch.floor(frac)
        volume = torch.linalg.det(lattice).abs()  # [B]
        faces = torch.stack(
            [
                torch.linalg.cross(lattice[:, (a + 1) % 3], lattice[:, (a + 2) % 3]).norm(dim=-1)
                for a in range(3)
            ],
            dim=1,
        )  # [B, 3]
        heights = volume[:, None] / faces  # [B, 3]
        bins = torch.floor(heights / min_distance).clamp(1, MAX_BINS).long()  # [B, 3]
        voxel = torch.floor(frac * bins[batch]).long().clamp_max(bins[batch] - 1)  # [N, 3]
    else:
        index = batch[:, None].expand(-1, 3)
        low = torch.full((num_graphs, 3), math.inf, dtype=pos.dtype, device=pos.device)
        low = low.scatter_reduce(0, index, pos, "amin")  # [B, 3]
        extent = torch.zeros_like(low).scatter_reduce(0, index, pos - low[batch], "amax")
        width = torch.clamp(extent / (MAX_BINS - 3), min=min_distance)  # [B, 3] voxel size
        voxel = torch.floor((pos - low[batch]) / width[batch]).long()  # [N, 3]
        bins = torch.full((num_graphs, 3), MAX_BINS, dtype=torch.long, device=pos.device)
    atom_bins = bins[batch]  # [N, 3]

    def key(v: torch.Tensor) -> torch.Tensor:
        return ((batch * MAX_BINS + v[:, 0]) * MAX_BINS + v[:, 1]) * MAX_BINS + v[:, 2]

    sorted_keys, order = torch.sort(key(voxel))
    firsts, seconds = [], []
    steps = torch.tensor([-1, 0, 1], device=pos.device)
    for step in torch.cartesian_prod(steps, steps, steps):
        neighbour = voxel + step
        if cell is not None:
            neighbour = neighbour % atom_bins
        else:
            neighbour = neighbour.clamp(0, MAX_BINS - 1)  # edges of the box: a duplicate voxel at worst
        nk = key(neighbour)
        lo = torch.searchsorted(sorted_keys, nk)
        hi = torch.searchsorted(sorted_keys, nk, right=True)
        counts = hi - lo  # [N] atoms in that voxel
        first = torch.repeat_interleave(torch.arange(len(pos), device=pos.device), counts)
        within = torch.arange(len(first), device=pos.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts
        )
        second = order[torch.repeat_interleave(lo, counts) + within]
        keep = first < second
        firsts.append(first[keep])
        seconds.append(second[keep])
    i, j = torch.cat(firsts), torch.cat(seconds)
    if cell is not None:
        diff = frac[i] - frac[j]
        diff = diff - torch.round(diff)
        distance = torch.einsum("pa,pab->pb", diff, lattice[batch[i]]).norm(dim=-1)
    else:
        distance = (pos[i] - pos[j]).norm(dim=-1)
    return i, j, distance


def check_structures(
    atomic_numbers: torch.Tensor,
    pos: torch.Tensor,
    natoms: torch.Tensor,
    max_num_elements: int,
    cell: torch.Tensor | None = None,
    sid=None,
    min_distance: float = 1e-4,
) -> None:
    """Raise ``ValueError`` naming the graph and atom for input no model can handle: an empty
    batch, atomic numbers outside ``[1, max_num_elements - 1]``, non-finite positions, or two
    atoms (or an atom and a periodic image of another) closer than ``min_distance``. Time and
    memory are O(N) (the overlap search hashes atoms into voxels)."""
    if natoms.numel() == 0 or int(natoms.sum()) == 0:
        raise ValueError("empty batch: no atoms to run the model on")
    if pos.shape[0] != atomic_numbers.shape[0]:
        raise ValueError(f"{pos.shape[0]} positions but {atomic_numbers.shape[0]} atomic numbers")
    first_atom = torch.cumsum(natoms, 0) - natoms
    batch = torch.repeat_interleave(torch.arange(natoms.numel(), device=natoms.device), natoms)

    def locate(index: int) -> str:
        graph = int(batch[index])
        return f"{_graph_name(graph, sid)}, atom {index - int(first_atom[graph])}"

    bad_z = (atomic_numbers < 1) | (atomic_numbers >= max_num_elements)
    if bad_z.any():
        i = int(bad_z.nonzero()[0])
        raise ValueError(
            f"{locate(i)}: atomic number {int(atomic_numbers[i])} is outside the supported "
            f"range 1..{max_num_elements - 1} (max_num_elements={max_num_elements})"
        )
    bad_pos = ~torch.isfinite(pos).all(dim=1)
    if bad_pos.any():
        i = int(bad_pos.nonzero()[0])
        raise ValueError(f"{locate(i)}: position {pos[i].tolist()} is not finite")
    i, j, distance = _close_pairs(pos, batch, natoms.numel(), cell, min_distance)
    overlapping = distance < min_distance
    if overlapping.any():
        i, j, distance = i[overlapping], j[overlapping], distance[overlapping]
        first = int(torch.argmin(i * len(pos) + j))  # the pair the old N x N search reported
        a, b = int(i[first]), int(j[first])
        graph = int(batch[a])
        start = int(first_atom[graph])
        raise ValueError(
            f"{_graph_name(graph, sid)}: atoms {a - start} and {b - start} overlap "
            f"(distance {float(distance[first]):.2e} A{' modulo the cell' if cell is not None else ''})"
        )
