"""Merge fairchem prediction files of the OC20/OC22 test splits into one EvalAI submission file.

Inputs are what fairchem 1.10 writes (``OCPTrainer.predict`` / ``run_relaxations`` and
``BaseTrainer.save_results``):

* S2EF, ``--mode predict``: ``results/<id>/<name>_predictions.npz`` where ``<name>`` is ``s2ef`` for
  the ``forces``/``equiformerv2_forces`` trainers and ``ocp`` for the default ``ocp`` trainer. Keys:
  ``ids`` (N,) str ``"<sid>_<fid>"`` sorted as strings; ``energy`` (N, 1) float16 (float32 with
  ``prediction_dtype: float32``); ``forces`` (M, 3) of the *free* atoms only, concatenated over
  systems; ``chunk_idx`` (N - 1,) int64, the split points ``cumsum(free_atoms)[:-1]``
  (``np.split(forces, chunk_idx)`` gives the per-system forces).
* IS2RE, ``--mode predict`` with an energy-only model (``is2re_predictions.npz`` for the
  ``energy``/``equiformerv2_energy`` trainers, ``ocp_predictions.npz`` for ``ocp``): ``ids`` (N,) str
  ``"<sid>"`` and ``energy`` (N, 1). Or, for IS2RE by relaxation, the ``relax_opt.traj_dir`` directory
  of ``<sid>.traj`` files written by ``--mode run-relaxations`` (fairchem 1.10 saves relaxed energies
  nowhere else); the last frame's energy is used.
* IS2RS, ``--mode run-relaxations`` with ``task.write_pos: True``: ``results/<id>/relaxed_positions.npz``
  with ``ids`` (N,) str ``"<sid>"``, ``pos`` (M, 3) float64 of *all* atoms (fixed ones included) and
  ``chunk_idx`` (N - 1,) int64 split points.

The submission holds, for every split ``s`` of the dataset (OC20: ``id``, ``ood_ads``, ``ood_cat``,
``ood_both``; OC22: ``id``, ``ood``), the task's arrays prefixed by the split name:

* S2EF: ``s_ids`` (N,) str, ``s_energy`` (N, 1) or (N,) float32 (the input's shape),
  ``s_forces`` (M, 3) float32, ``s_chunk_idx`` (N - 1,) int64;
* IS2RE: ``s_ids`` (N,) str, ``s_energy`` (N, 1) or (N,) float32;
* IS2RS: ``s_ids`` (N,) str, ``s_pos`` (M, 3) float32, ``s_chunk_idx`` (N - 1,) int64.

Rows keep the order of the input files. Every check failure raises :class:`SubmissionError` with a
one-line message naming the split; the command line prints it and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DATASET_SPLITS",
    "SplitPredictions",
    "SubmissionError",
    "SubmissionWarning",
    "TASKS",
    "collect_predictions",
    "format_summary",
    "load_split",
    "main",
    "make_submission",
    "read_expected_counts",
    "write_submission",
]

TASKS: tuple[str, ...] = ("s2ef", "is2re", "is2rs")
DATASET_SPLITS: dict[str, tuple[str, ...]] = {
    "oc20": ("id", "ood_ads", "ood_cat", "ood_both"),
    "oc22": ("id", "ood"),
}
ALL_SPLITS: tuple[str, ...] = ("id", "ood_ads", "ood_cat", "ood_both", "ood")
# EvalAI hosts OC22 S2EF-Total and IS2RE-Total only.
TASK_DATASETS: dict[str, tuple[str, ...]] = {
    "s2ef": ("oc20", "oc22"),
    "is2re": ("oc20", "oc22"),
    "is2rs": ("oc20",),
}

REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "s2ef": ("ids", "energy", "forces", "chunk_idx"),
    "is2re": ("ids", "energy"),
    "is2rs": ("ids", "pos", "chunk_idx"),
}
ID_PATTERNS: dict[str, tuple[re.Pattern[str], str]] = {
    "s2ef": (re.compile(r"\d+_\d+"), "'<sid>_<fid>' (e.g. '2472718_12')"),
    "is2re": (re.compile(r"\d+"), "'<sid>' (e.g. '2472718')"),
    "is2rs": (re.compile(r"\d+"), "'<sid>' (e.g. '2472718')"),
}
SOURCE_HINTS: dict[str, str] = {
    "s2ef": "an S2EF file from `fairchem --mode predict` with energy and forces outputs "
    "(s2ef_predictions.npz or ocp_predictions.npz)",
    "is2re": "an energy file from `fairchem --mode predict` (is2re_predictions.npz or ocp_predictions.npz) "
    "or a directory of <sid>.traj files from `--mode run-relaxations`",
    "is2rs": "relaxed_positions.npz from `fairchem --mode run-relaxations` with `task.write_pos: True`",
}
SOURCE_HINTS_SHORT = "a prediction file written by fairchem (np.savez_compressed)"
FLOAT16_MAX = float(np.finfo(np.float16).max)


class SubmissionError(ValueError):
    """A prediction file or the requested submission is unusable; the message is one line."""


class SubmissionWarning(UserWarning):
    """Something worth knowing that does not stop the submission (e.g. float16 predictions)."""


@dataclass(frozen=True, eq=False)
class SplitPredictions:
    """The checked predictions of one split, converted to the submission's dtypes.

    Attributes:
        split: split name (``id``, ``ood_ads``, ...).
        source: the file or directory they were read from.
        ids: (N,) unicode system ids.
        energy: (N, 1) or (N,) float32 energies (S2EF, IS2RE), else None.
        forces: (M, 3) float32 forces of the free atoms (S2EF), else None.
        pos: (M, 3) float32 relaxed positions of all atoms (IS2RS), else None.
        chunk_idx: (N - 1,) int64 split points into ``forces``/``pos`` (S2EF, IS2RS), else None.
    """

    split: str
    source: Path
    ids: np.ndarray
    energy: np.ndarray | None = None
    forces: np.ndarray | None = None
    pos: np.ndarray | None = None
    chunk_idx: np.ndarray | None = None

    @property
    def n_systems(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_atoms(self) -> int | None:
        """Rows of ``forces`` (S2EF: free atoms) or ``pos`` (IS2RS: all atoms); None for IS2RE."""
        per_atom = self.forces if self.forces is not None else self.pos
        return None if per_atom is None else int(per_atom.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """The submission entries of this split: ``{f"{split}_{key}": array}``."""
        out = {}
        for key in ("ids", "energy", "forces", "pos", "chunk_idx"):
            value = getattr(self, key)
            if value is not None:
                out[f"{self.split}_{key}"] = value
        return out


def _fail(split: str, message: str) -> SubmissionError:
    return SubmissionError(f"split {split}: {message}")


def _warn(split: str, message: str) -> None:
    warnings.warn(f"split {split}: {message}", SubmissionWarning, stacklevel=3)


def _shape(array: np.ndarray) -> str:
    return str(tuple(int(n) for n in array.shape))


# ---------------------------------------------------------------------------------------------- loading


def _read_npz(split: str, path: Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise _fail(split, f"{path} is not an npz archive; expected {SOURCE_HINTS_SHORT}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except ValueError as err:  # object arrays need pickle; fairchem never writes them
        raise _fail(split, f"cannot read {path}: {err}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise _fail(split, f"cannot read {path} as an npz file ({type(err).__name__}: {err})") from None


def _read_trajectories(split: str, directory: Path) -> dict[str, np.ndarray]:
    """IS2RE energies from a ``run-relaxations`` trajectory directory: the last frame of each file."""
    import ase.io

    files = sorted(directory.glob("*.traj"), key=lambda p: p.stem)
    if not files:
        raise _fail(
            split, f"{directory} is a directory without .traj files; expected {SOURCE_HINTS['is2re']}"
        )
    unfinished = sorted(directory.glob("*.traj_tmp"))
    if unfinished:
        _warn(split, f"{directory} has {len(unfinished)} unfinished trajectories (*.traj_tmp), ignored")
    ids, energies = [], []
    for file in files:
        try:
            energy = ase.io.read(file, index=-1).get_potential_energy()
        except Exception as err:  # any unreadable file or frame without energy, reported alike
            raise _fail(split, f"cannot read the last frame's energy from {file} ({err})") from None
        ids.append(file.stem)
        energies.append(energy)
    return {"ids": np.array(ids, dtype=str), "energy": np.asarray(energies, dtype=np.float64)}


def _directory_hint(task: str, directory: Path) -> str:
    known = sorted(
        p.name
        for p in directory.glob("*.npz")
        if p.name.endswith("_predictions.npz") or p.name == "relaxed_positions.npz"
    )
    found = f" (it holds {', '.join(known)})" if known else ""
    return f"{directory} is a directory{found}; give the prediction file: {SOURCE_HINTS[task]}"


def _check_ids(task: str, split: str, raw: np.ndarray) -> np.ndarray:
    if raw.ndim != 1:
        raise _fail(split, f"ids has shape {_shape(raw)}; expected (N,)")
    if raw.dtype.kind == "S":
        ids = np.char.decode(raw, "utf-8")
    elif raw.dtype.kind == "U" or (raw.dtype.kind in "iu" and task != "s2ef"):
        ids = raw.astype(str)
    else:
        raise _fail(split, f"ids has dtype {raw.dtype}; expected strings")
    if ids.shape[0] == 0:
        raise _fail(split, "no systems (ids is empty)")
    unique, counts = np.unique(ids, return_counts=True)
    if unique.shape[0] != ids.shape[0]:
        dup = unique[counts > 1]
        raise _fail(
            split, f"{dup.shape[0]} duplicated id(s), e.g. '{dup[0]}' appears {counts[counts > 1][0]} times"
        )
    pattern, form = ID_PATTERNS[task]
    bad = [i for i in ids.tolist() if pattern.fullmatch(i) is None]
    if bad:
        hint = ""
        if task != "s2ef" and ID_PATTERNS["s2ef"][0].fullmatch(bad[0]):
            hint = " (an S2EF-style '<sid>_<fid>' id: is this an S2EF prediction file?)"
        raise _fail(split, f"{len(bad)} id(s) not of the form {form}, e.g. {bad[0]!r}{hint}")
    return ids


def _check_finite(split: str, key: str, values: np.ndarray, ids: np.ndarray, row_to_system) -> None:
    finite = np.isfinite(values)
    if finite.all():
        return
    rows = np.flatnonzero(~finite.reshape(values.shape[0], -1).all(axis=1))
    n_bad = int((~finite).sum())
    hint = ""
    if values.dtype == np.float16 and np.isinf(values).any():
        hint = f"; float16 overflows above {FLOAT16_MAX:g}: predict with `prediction_dtype: float32`"
    raise _fail(
        split,
        f"{key} has {n_bad} non-finite value(s) (NaN or inf), first in system '{ids[row_to_system(rows[0])]}'"
        f"{hint}",
    )


def _check_float(split: str, key: str, values: np.ndarray) -> None:
    if values.dtype.kind != "f":
        raise _fail(split, f"{key} has dtype {values.dtype}; expected floating point")


def _check_energy(split: str, energy: np.ndarray, ids: np.ndarray) -> np.ndarray:
    _check_float(split, "energy", energy)
    n = ids.shape[0]
    if energy.ndim == 0 or energy.ndim > 2 or (energy.ndim == 2 and energy.shape[1] != 1):
        raise _fail(split, f"energy has shape {_shape(energy)}; expected (N,) or (N, 1)")
    if energy.shape[0] != n:
        raise _fail(split, f"energy has {energy.shape[0]} values but ids has {n} (shape mismatch)")
    _check_finite(split, "energy", energy, ids, lambda row: row)
    return energy


def _check_per_atom(
    split: str, key: str, values: np.ndarray, chunk_idx: np.ndarray, ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Check ``values`` (M, 3) against the split points ``chunk_idx`` (N - 1,); return both."""
    _check_float(split, key, values)
    if values.ndim != 2 or values.shape[1] != 3:
        raise _fail(split, f"{key} has shape {_shape(values)}; expected (M, 3)")
    if chunk_idx.ndim != 1 or (chunk_idx.size and chunk_idx.dtype.kind not in "iu"):
        raise _fail(
            split,
            f"chunk_idx has shape {_shape(chunk_idx)} and dtype {chunk_idx.dtype}; "
            "expected (N - 1,) integers",
        )
    chunk_idx = chunk_idx.astype(np.int64)
    n, m = ids.shape[0], values.shape[0]
    if chunk_idx.shape[0] != n - 1:
        hint = ""
        if chunk_idx.shape[0] == n and chunk_idx[-1] == m:
            hint = "; it ends with the total, but fairchem writes the split points cumsum(natoms)[:-1]"
        raise _fail(
            split, f"chunk_idx has {chunk_idx.shape[0]} entries for {n} systems; expected {n - 1}{hint}"
        )
    if chunk_idx.size and (chunk_idx[0] < 0 or np.any(np.diff(chunk_idx) < 0)):
        raise _fail(split, "chunk_idx is not a non-decreasing sequence of non-negative split points")
    if chunk_idx.size and chunk_idx[-1] > m:
        raise _fail(
            split,
            f"{key} has {m} rows but chunk_idx splits after row {int(chunk_idx[-1])} (shape mismatch)",
        )
    _check_finite(split, key, values, ids, lambda row: int(np.searchsorted(chunk_idx, row, side="right")))
    return values, chunk_idx


def _warn_float16(split: str, arrays: Mapping[str, np.ndarray]) -> None:
    details = []
    for key, values in arrays.items():
        if values.dtype == np.float16:
            largest = float(np.abs(values).max(initial=0.0))
            details.append(
                f"{key} (max |value| {largest:.4g}, float16 step there {np.spacing(np.float16(largest)):.2g})"
            )
    if details:
        _warn(
            split,
            f"predicted in float16, fairchem's default: {'; '.join(details)}; written as float32, but "
            "the lost precision is not recovered: set `prediction_dtype: float32` under outputs.<key> "
            "when predicting",
        )


def load_split(task: str, split: str, path: str | os.PathLike[str]) -> SplitPredictions:
    """Read and check one split's predictions (see the module docstring for the accepted files).

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
    if task not in TASKS:
        raise SubmissionError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    path = Path(path)
    if not path.exists():
        raise _fail(split, f"file not found: {path}")
    if path.is_dir():
        if task != "is2re" or not any(path.glob("*.traj")):
            raise _fail(split, _directory_hint(task, path))
        data = _read_trajectories(split, path)
    else:
        data = _read_npz(split, path)

    required = REQUIRED_KEYS[task]
    missing = [key for key in required if key not in data]
    if missing:
        raise _fail(
            split,
            f"{path} lacks key(s) {', '.join(missing)} (has: {', '.join(sorted(data)) or 'nothing'}); "
            f"expected {SOURCE_HINTS[task]}",
        )
    extra = sorted(set(data) - set(required))
    if extra:
        _warn(split, f"ignoring key(s) not used by {task.upper()}: {', '.join(extra)}")

    ids = _check_ids(task, split, data["ids"])
    energy = forces = pos = chunk_idx = None
    if "energy" in required:
        energy = _check_energy(split, data["energy"], ids).astype(np.float32)
    if task == "s2ef":
        forces, chunk_idx = _check_per_atom(split, "forces", data["forces"], data["chunk_idx"], ids)
        forces = forces.astype(np.float32)
    if task == "is2rs":
        pos, chunk_idx = _check_per_atom(split, "pos", data["pos"], data["chunk_idx"], ids)
        pos = pos.astype(np.float32)
    _warn_float16(split, {key: data[key] for key in ("energy", "forces") if key in required})
    return SplitPredictions(split, path, ids, energy=energy, forces=forces, pos=pos, chunk_idx=chunk_idx)


# --------------------------------------------------------------------------------------------- checking


def read_expected_counts(path: str | os.PathLike[str]) -> dict[str, int | dict[str, int]]:
    """Read a JSON object mapping split -> number of systems, or -> ``{"systems": n, "atoms": m}``."""
    path = Path(path)
    try:
        counts = json.loads(path.read_text())
    except OSError as err:
        raise SubmissionError(f"expected counts: cannot read {path} ({err.strerror or err})") from None
    except json.JSONDecodeError as err:
        raise SubmissionError(f"expected counts: {path} is not valid JSON ({err})") from None
    if not isinstance(counts, dict):
        raise SubmissionError(f"expected counts: {path} must hold a JSON object mapping split -> count")
    return counts


def _normalise_expected(
    expected: Mapping[str, int | Mapping[str, int]], splits: tuple[str, ...], dataset: str
) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for split, value in expected.items():
        if split not in splits:
            raise SubmissionError(
                f"expected counts: unknown split {split!r} for {dataset.upper()} "
                f"(splits: {', '.join(splits)})"
            )
        entry = dict(value) if isinstance(value, Mapping) else {"systems": value}
        for key, number in entry.items():
            if key not in ("systems", "atoms") or isinstance(number, bool) or not isinstance(number, int):
                raise SubmissionError(
                    f"expected counts: split {split}: expected an integer or "
                    f'{{"systems": int, "atoms": int}}, got {value!r}'
                )
        out[split] = entry
    return out


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
    if task not in TASKS:
        raise SubmissionError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if dataset not in DATASET_SPLITS:
        raise SubmissionError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASET_SPLITS)}")
    if dataset not in TASK_DATASETS[task]:
        raise SubmissionError(f"{dataset.upper()} has no {task.upper()} task on EvalAI")
    splits = DATASET_SPLITS[dataset]
    given = {split: path for split, path in split_paths.items() if path is not None}
    for split in given:
        if split not in splits:
            other = [name for name, names in DATASET_SPLITS.items() if split in names and name != dataset]
            hint = f" (an {other[0].upper()} split: use --dataset {other[0]})" if other else ""
            raise _fail(split, f"not a split of {dataset.upper()} (splits: {', '.join(splits)}){hint}")
    for split in splits:
        if split not in given:
            raise _fail(split, f"no prediction file given (--{split.replace('_', '-')})")
    expected = _normalise_expected(expected_counts or {}, splits, dataset)

    seen: dict[Path, str] = {}
    for split in splits:
        resolved = Path(given[split]).resolve()
        if resolved in seen:
            raise _fail(split, f"same file as split {seen[resolved]}: {given[split]}")
        seen[resolved] = split

    loaded = {split: load_split(task, split, given[split]) for split in splits}

    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            shared = np.intersect1d(loaded[a].ids, loaded[b].ids)
            if shared.size == loaded[a].n_systems == loaded[b].n_systems:
                raise _fail(b, f"the same ids as split {a}: the same predictions were given twice?")
            if shared.size:
                _warn(b, f"{shared.size} id(s) also in split {a}, e.g. '{shared[0]}'")

    for split, entry in expected.items():
        found = {"systems": loaded[split].n_systems, "atoms": loaded[split].n_atoms}
        for key, number in entry.items():
            if found[key] is None:
                raise _fail(split, f"expected counts: {task.upper()} predictions have no atom count")
            if found[key] != number:
                raise _fail(split, f"{found[key]} {key}, expected {number} (wrong count)")
    return loaded


# ---------------------------------------------------------------------------------------------- writing


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


# ------------------------------------------------------------------------------------------ command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fairchem-equiformers-submission",
        description="Check fairchem prediction files of the OC20/OC22 test splits and merge them into one "
        "EvalAI submission npz ({split}_ids, {split}_energy, {split}_forces, {split}_pos, "
        "{split}_chunk_idx).",
    )
    parser.add_argument("task", type=str.lower, choices=TASKS, help="which EvalAI task")
    parser.add_argument(
        "--dataset", type=str.lower, choices=tuple(DATASET_SPLITS), default="oc20", help="default: oc20"
    )
    for split in ALL_SPLITS:
        datasets = [name.upper() for name, names in DATASET_SPLITS.items() if split in names]
        parser.add_argument(
            f"--{split.replace('_', '-')}",
            dest=split,
            metavar="PATH",
            help=f"predictions of the {split} split ({', '.join(datasets)})",
        )
    parser.add_argument("--out-path", required=True, metavar="PATH", help="submission file to write (.npz)")
    parser.add_argument(
        "--expected-counts",
        metavar="JSON",
        help='JSON file mapping split -> number of systems, or -> {"systems": n, "atoms": m}',
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 on success, 1 on a failed check)."""
    args = _parser().parse_args(argv)
    split_paths = {split: getattr(args, split) for split in ALL_SPLITS}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SubmissionWarning)
        try:
            expected = read_expected_counts(args.expected_counts) if args.expected_counts else None
            splits = collect_predictions(
                args.task, split_paths, dataset=args.dataset, expected_counts=expected
            )
            out_path = write_submission(splits, args.out_path)
        except SubmissionError as err:
            _print_warnings(caught)
            print(f"error: {err}", file=sys.stderr)
            return 1
    _print_warnings(caught)
    print(format_summary(args.task, args.dataset, splits, out_path.resolve()))
    return 0


def _print_warnings(caught: list[warnings.WarningMessage]) -> None:
    for warning in caught:
        if issubclass(warning.category, SubmissionWarning):
            print(f"warning: {warning.message}", file=sys.stderr)
        else:
            text = warnings.formatwarning(warning.message, warning.category, warning.filename, warning.lineno)
            print(text, end="", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
