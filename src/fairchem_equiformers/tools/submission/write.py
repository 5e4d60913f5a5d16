"""Writing the submission: the merged ``{split}_{key}`` arrays in one npz, put in place atomically,
and the summary the command line prints."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .read import collect_predictions
from .spec import SplitPredictions, SubmissionError


def write_submission(splits: Mapping[str, SplitPredictions], out_path: str | os.PathLike[str]) -> Path:
    """Write the merged ``{split}_{key}`` arrays to ``out_path`` (``.npz`` appended if missing).

    The file is written next to its destination and renamed into place, so a failed write leaves no
    partial submission. Returns the path written.
    """
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".npz":
        out_path = out_path.with_name(out_path.name + ".npz")
    if out_path.is_dir():
        raise SubmissionError(f"output path {out_path} is a directory")
    arrays: dict[str, np.ndarray] = {}
    for predictions in splits.values():
        arrays.update(predictions.arrays())
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    except OSError as err:
        raise SubmissionError(f"cannot write {out_path} ({err.strerror or err})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez_compressed(handle, **arrays)
        os.replace(tmp_name, out_path)
    except OSError as err:
        Path(tmp_name).unlink(missing_ok=True)
        raise SubmissionError(f"cannot write {out_path} ({err.strerror or err})") from None
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out_path


def make_submission(
    task: str,
    split_paths: Mapping[str, str | os.PathLike[str] | None],
    out_path: str | os.PathLike[str],
    expected_counts: Mapping[str, int | Mapping[str, int]] | None = None,
    dataset: str = "oc20",
) -> Path:
    """Check the per-split prediction files and merge them into one EvalAI submission npz.

    Args:
        task: ``s2ef``, ``is2re`` or ``is2rs``.
        split_paths: split name -> fairchem prediction file, for every split of ``dataset``.
        out_path: where to write (``.npz`` is appended if missing).
        expected_counts: optional split -> number of systems (or ``{"systems": n, "atoms": m}``).
        dataset: ``oc20`` or ``oc22``.

    Returns:
        The path written. Its keys are ``{split}_ids`` (N,) str plus, per task, ``{split}_energy``
        (N, 1)/(N,) float32, ``{split}_forces`` (M, 3) float32, ``{split}_pos`` (M, 3) float32 and
        ``{split}_chunk_idx`` (N - 1,) int64.

    Raises:
        SubmissionError: any failed check; nothing is written then.
    """
    splits = collect_predictions(task, split_paths, dataset=dataset, expected_counts=expected_counts)
    return write_submission(splits, out_path)


def format_summary(task: str, dataset: str, splits: Mapping[str, SplitPredictions], out_path: Path) -> str:
    """A human-readable table of systems (and atoms) per split and the output path."""
    atoms_label = {"s2ef": "free atoms", "is2rs": "atoms"}.get(task.lower())
    header = f"{'split':<10}{'systems':>12}" + (f"{atoms_label:>14}" if atoms_label else "")
    lines = [f"{task.upper()} submission for {dataset.upper()}", header]
    total_systems = total_atoms = 0
    for name, predictions in splits.items():
        row = f"{name:<10}{predictions.n_systems:>12,}"
        if atoms_label:
            row += f"{predictions.n_atoms:>14,}"
            total_atoms += predictions.n_atoms or 0
        total_systems += predictions.n_systems
        lines.append(row)
    lines.append(f"{'total':<10}{total_systems:>12,}" + (f"{total_atoms:>14,}" if atoms_label else ""))
    keys = [key for predictions in splits.values() for key in predictions.arrays()]
    lines.append(f"wrote {out_path} (keys: {', '.join(keys)})")
    return "\n".join(lines)
