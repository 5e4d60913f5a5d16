"""Neighbour graphs for molecules and input checks shared by every model family."""

from __future__ import annotations

import math
import numbers

import torch


def radius_graph_nonperiodic(
    pos: torch.Tensor, batch: torch.Tensor, cutoff: float, max_neighbors: int
) -> torch.Tensor:
    """Edges ``[2, E]`` (source, target) between atoms of the same graph closer than ``cutoff``,
    keeping each target's ``max_neighbors`` nearest sources. Needs neither torch-cluster nor
    pyg-lib. Memory is quadratic in the atoms of the largest graph; meant for molecules."""
    edges = []
    counts = torch.bincount(batch)
    starts = torch.cumsum(counts, 0) - counts
    for start, count in zip(starts.tolist(), counts.tolist()):
        p = pos[start : start + count].detach()
        dist = torch.cdist(p, p)  # [n, n]  (row: target, column: source)
        dist.fill_diagonal_(float("inf"))
        k = min(max_neighbors, count - 1)
        if k <= 0:
            continue
        nearest, source = torch.topk(dist, k, dim=1, largest=False)  # [n, k]
        target = torch.arange(count, device=pos.device)[:, None].expand_as(source)
        keep = nearest < cutoff
        edges.append(torch.stack([source[keep], target[keep]]) + start)
    if not edges:
        return torch.zeros(2, 0, dtype=torch.long, device=pos.device)
    return torch.cat(edges, dim=1)


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
    atoms (or an atom and a periodic image of another) closer than ``min_distance``."""
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
    for graph, (start, count) in enumerate(zip(first_atom.tolist(), natoms.tolist())):
        if count < 2:
            continue
        p = pos[start : start + count].detach()
        diff = p[:, None, :] - p[None, :, :]  # [n, n, 3]
        if cell is not None:
            lattice = cell[graph].detach().to(p.dtype)
            frac = torch.linalg.solve(lattice.T, diff.reshape(-1, 3).T).T
            diff = (frac - torch.round(frac)) @ lattice
        dist = diff.reshape(count, count, 3).norm(dim=-1)
        dist.fill_diagonal_(float("inf"))
        if (dist < min_distance).any():
            i, j = (dist < min_distance).nonzero()[0].tolist()
            raise ValueError(
                f"{_graph_name(graph, sid)}: atoms {i} and {j} overlap "
                f"(distance {float(dist[i, j]):.2e} A{' modulo the cell' if cell is not None else ''})"
            )
