"""Reading predictions: fairchem's npz files and ``run-relaxations`` trajectory directories, one
split (:func:`load_split`) or every split of a dataset (:func:`collect_predictions`), each checked
(``check``) and converted to the submission's dtypes."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .check import (
    check_across_splits,
    check_counts,
    check_energy,
    check_ids,
    check_per_atom,
    check_request,
    check_task,
    warn_float16,
)
from .spec import (
    REQUIRED_KEYS,
    SOURCE_HINTS,
    SOURCE_HINTS_SHORT,
    SplitPredictions,
    split_error,
    warn_split,
)


def read_npz(split: str, path: Path) -> dict[str, np.ndarray]:
    """Every array of the npz archive ``path`` (no pickled objects)."""
    if not zipfile.is_zipfile(path):
        raise split_error(split, f"{path} is not an npz archive; expected {SOURCE_HINTS_SHORT}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except ValueError as err:  # object arrays need pickle; fairchem never writes them
        raise split_error(split, f"cannot read {path}: {err}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise split_error(split, f"cannot read {path} as an npz file ({type(err).__name__}: {err})") from None


def read_trajectories(split: str, directory: Path) -> dict[str, np.ndarray]:
    """IS2RE energies from a ``run-relaxations`` trajectory directory: the last frame of each file."""
    import ase.io

    files = sorted(directory.glob("*.traj"), key=lambda p: p.stem)
    if not files:
        raise split_error(
            split, f"{directory} is a directory without .traj files; expected {SOURCE_HINTS['is2re']}"
        )
    unfinished = sorted(directory.glob("*.traj_tmp"))
    if unfinished:
        warn_split(split, f"{directory} has {len(unfinished)} unfinished trajectories (*.traj_tmp), ignored")
    ids, energies = [], []
    for file in files:
        try:
            energy = ase.io.read(file, index=-1).get_potential_energy()
        except Exception as err:  # any unreadable file or frame without energy, reported alike
            raise split_error(split, f"cannot read the last frame's energy from {file} ({err})") from None
        ids.append(file.stem)
        energies.append(energy)
    return {"ids": np.array(ids, dtype=str), "energy": np.asarray(energies, dtype=np.float64)}


def directory_hint(task: str, directory: Path) -> str:
    """The message for a directory given where ``task`` needs a prediction file."""
    known = sorted(
        p.name
        for p in directory.glob("*.npz")
        if p.name.endswith("_predictions.npz") or p.name == "relaxed_positions.npz"
    )
    found = f" (it holds {', '.join(known)})" if known else ""
    return f"{directory} is a directory{found}; give the prediction file: {SOURCE_HINTS[task]}"


def load_split(task: str, split: str, path: str | os.PathLike[str]) -> SplitPredictions:
    """Read and check one split's predictions (see the package docstring for the accepted files).

    Args:
        task: ``s2ef``, ``is2re`` or ``is2rs``.
        split: the split name, used in messages and as the key prefix.
        path: the prediction npz (IS2RE also: a directory of ``<sid>.traj`` files).

    Returns:
        The split's arrays, energies/forces/positions cast to float32 and ``chunk_idx`` to int64.

    Raises:
        SubmissionError: a missing or unreadable file, missing keys, bad ids, duplicated ids,
            non-finite values, or arrays whose shapes disagree.
    """
    check_task(task)
    path = Path(path)
    if not path.exists():
        raise split_error(split, f"file not found: {path}")
    if path.is_dir():
        if task != "is2re" or not any(path.glob("*.traj")):
            raise split_error(split, directory_hint(task, path))
        data = read_trajectories(split, path)
    else:
        data = read_npz(split, path)

    required = REQUIRED_KEYS[task]
    missing = [key for key in required if key not in data]
    if missing:
        raise split_error(
            split,
            f"{path} lacks key(s) {', '.join(missing)} (has: {', '.join(sorted(data)) or 'nothing'}); "
            f"expected {SOURCE_HINTS[task]}",
        )
    extra = sorted(set(data) - set(required))
    if extra:
        warn_split(split, f"ignoring key(s) not used by {task.upper()}: {', '.join(extra)}")

    ids = check_ids(task, split, data["ids"])
    energy = forces = pos = chunk_idx = None
    if "energy" in required:
        energy = check_energy(split, data["energy"], ids).astype(np.float32)
    if task == "s2ef":
        forces, chunk_idx = check_per_atom(split, "forces", data["forces"], data["chunk_idx"], ids)
        forces = forces.astype(np.float32)
    if task == "is2rs":
        pos, chunk_idx = check_per_atom(split, "pos", data["pos"], data["chunk_idx"], ids)
        pos = pos.astype(np.float32)
    warn_float16(split, {key: data[key] for key in ("energy", "forces") if key in required})
    return SplitPredictions(split, path, ids, energy=energy, forces=forces, pos=pos, chunk_idx=chunk_idx)


def collect_predictions(
    task: str,
    split_paths: Mapping[str, str | os.PathLike[str] | None],
    dataset: str = "oc20",
    expected_counts: Mapping[str, int | Mapping[str, int]] | None = None,
) -> dict[str, SplitPredictions]:
    """Load and check every split of ``dataset`` for ``task`` (nothing is written).

    Args:
        task: ``s2ef``, ``is2re`` or ``is2rs``.
        split_paths: split name -> prediction file; every split of the dataset is required.
        dataset: ``oc20`` (splits id, ood_ads, ood_cat, ood_both) or ``oc22`` (id, ood).
        expected_counts: optional split -> number of systems (or ``{"systems": n, "atoms": m}``, atoms
            being rows of forces for S2EF and of positions for IS2RS); splits left out are not checked.

    Returns:
        split -> checked predictions, in the dataset's split order.

    Raises:
        SubmissionError: see :func:`load_split`, plus a missing or unknown split, one file given for
            two splits, and counts differing from ``expected_counts``.
    """
    task, dataset = task.lower(), dataset.lower()
    paths, expected = check_request(task, dataset, split_paths, expected_counts)
    loaded = {split: load_split(task, split, path) for split, path in paths.items()}
    check_across_splits(loaded)
    check_counts(task, loaded, expected)
    return loaded
