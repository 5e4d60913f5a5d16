"""Checking predictions: ids, energies, per-atom arrays and their split points, float16 precision
(one split); the requested task, dataset and files, ids shared between splits and the expected
counts (all splits). Every failure raises :class:`SubmissionError` naming the split."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .spec import (
    DATASET_SPLITS,
    FLOAT16_MAX,
    ID_PATTERNS,
    TASK_DATASETS,
    TASKS,
    SplitPredictions,
    SubmissionError,
    shape_text,
    split_error,
    warn_split,
)

# ------------------------------------------------------------------------------------------ one split


def check_task(task: str) -> None:
    """Raise unless ``task`` is one of :data:`TASKS`."""
    if task not in TASKS:
        raise SubmissionError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def check_ids(task: str, split: str, raw: np.ndarray) -> np.ndarray:
    """The ids as a (N,) unicode array: non-empty, unique and of the task's form."""
    if raw.ndim != 1:
        raise split_error(split, f"ids has shape {shape_text(raw)}; expected (N,)")
    if raw.dtype.kind == "S":
        ids = np.char.decode(raw, "utf-8")
    elif raw.dtype.kind == "U" or (raw.dtype.kind in "iu" and task != "s2ef"):
        ids = raw.astype(str)
    else:
        raise split_error(split, f"ids has dtype {raw.dtype}; expected strings")
    if ids.shape[0] == 0:
        raise split_error(split, "no systems (ids is empty)")
    unique, counts = np.unique(ids, return_counts=True)
    if unique.shape[0] != ids.shape[0]:
        dup = unique[counts > 1]
        raise split_error(
            split, f"{dup.shape[0]} duplicated id(s), e.g. '{dup[0]}' appears {counts[counts > 1][0]} times"
        )
    pattern, form = ID_PATTERNS[task]
    bad = [i for i in ids.tolist() if pattern.fullmatch(i) is None]
    if bad:
        hint = ""
        if task != "s2ef" and ID_PATTERNS["s2ef"][0].fullmatch(bad[0]):
            hint = " (an S2EF-style '<sid>_<fid>' id: is this an S2EF prediction file?)"
        raise split_error(split, f"{len(bad)} id(s) not of the form {form}, e.g. {bad[0]!r}{hint}")
    return ids


def check_finite(split: str, key: str, values: np.ndarray, ids: np.ndarray, row_to_system) -> None:
    """Raise if ``values`` has a NaN or inf, naming the first system (``row_to_system(row)``)."""
    finite = np.isfinite(values)
    if finite.all():
        return
    rows = np.flatnonzero(~finite.reshape(values.shape[0], -1).all(axis=1))
    n_bad = int((~finite).sum())
    hint = ""
    if values.dtype == np.float16 and np.isinf(values).any():
        hint = f"; float16 overflows above {FLOAT16_MAX:g}: predict with `prediction_dtype: float32`"
    raise split_error(
        split,
        f"{key} has {n_bad} non-finite value(s) (NaN or inf), first in system '{ids[row_to_system(rows[0])]}'"
        f"{hint}",
    )


def check_float(split: str, key: str, values: np.ndarray) -> None:
    """Raise unless ``values`` is floating point."""
    if values.dtype.kind != "f":
        raise split_error(split, f"{key} has dtype {values.dtype}; expected floating point")


def check_energy(split: str, energy: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Check ``energy``: (N,) or (N, 1) finite floats, one per id; return it."""
    check_float(split, "energy", energy)
    n = ids.shape[0]
    if energy.ndim == 0 or energy.ndim > 2 or (energy.ndim == 2 and energy.shape[1] != 1):
        raise split_error(split, f"energy has shape {shape_text(energy)}; expected (N,) or (N, 1)")
    if energy.shape[0] != n:
        raise split_error(split, f"energy has {energy.shape[0]} values but ids has {n} (shape mismatch)")
    check_finite(split, "energy", energy, ids, lambda row: row)
    return energy


def check_per_atom(
    split: str, key: str, values: np.ndarray, chunk_idx: np.ndarray, ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Check ``values`` (M, 3) against the split points ``chunk_idx`` (N - 1,); return both."""
    check_float(split, key, values)
    if values.ndim != 2 or values.shape[1] != 3:
        raise split_error(split, f"{key} has shape {shape_text(values)}; expected (M, 3)")
    if chunk_idx.ndim != 1 or (chunk_idx.size and chunk_idx.dtype.kind not in "iu"):
        raise split_error(
            split,
            f"chunk_idx has shape {shape_text(chunk_idx)} and dtype {chunk_idx.dtype}; "
            "expected (N - 1,) integers",
        )
    chunk_idx = chunk_idx.astype(np.int64)
    n, m = ids.shape[0], values.shape[0]
    if chunk_idx.shape[0] != n - 1:
        hint = ""
        if chunk_idx.shape[0] == n and chunk_idx[-1] == m:
            hint = "; it ends with the total, but fairchem writes the split points cumsum(natoms)[:-1]"
        raise split_error(
            split, f"chunk_idx has {chunk_idx.shape[0]} entries for {n} systems; expected {n - 1}{hint}"
        )
    if chunk_idx.size and (chunk_idx[0] < 0 or np.any(np.diff(chunk_idx) < 0)):
        raise split_error(split, "chunk_idx is not a non-decreasing sequence of non-negative split points")
    if chunk_idx.size and chunk_idx[-1] > m:
        raise split_error(
            split,
            f"{key} has {m} rows but chunk_idx splits after row {int(chunk_idx[-1])} (shape mismatch)",
        )
    check_finite(split, key, values, ids, lambda row: int(np.searchsorted(chunk_idx, row, side="right")))
    return values, chunk_idx


def warn_float16(split: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Warn (attributed to the caller) about the arrays predicted in float16."""
    details = []
    for key, values in arrays.items():
        if values.dtype == np.float16:
            largest = float(np.abs(values).max(initial=0.0))
            details.append(
                f"{key} (max |value| {largest:.4g}, float16 step there {np.spacing(np.float16(largest)):.2g})"
            )
    if details:
        warn_split(
            split,
            f"predicted in float16, fairchem's default: {'; '.join(details)}; written as float32, but "
            "the lost precision is not recovered: set `prediction_dtype: float32` under outputs.<key> "
            "when predicting",
        )


# ----------------------------------------------------------------------------------------- all splits


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


def normalise_expected(
    expected: Mapping[str, int | Mapping[str, int]], splits: tuple[str, ...], dataset: str
) -> dict[str, dict[str, int]]:
    """``expected`` as split -> ``{"systems": n[, "atoms": m]}``, checked against ``splits``."""
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


def check_request(
    task: str,
    dataset: str,
    split_paths: Mapping[str, str | os.PathLike[str] | None],
    expected_counts: Mapping[str, int | Mapping[str, int]] | None,
) -> tuple[dict[str, str | os.PathLike[str]], dict[str, dict[str, int]]]:
    """Check the task (lower case), dataset (lower case), one distinct file for every split of the
    dataset and the expected counts; return split -> file in the dataset's split order and the
    normalised expected counts."""
    check_task(task)
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
            raise split_error(split, f"not a split of {dataset.upper()} (splits: {', '.join(splits)}){hint}")
    for split in splits:
        if split not in given:
            raise split_error(split, f"no prediction file given (--{split.replace('_', '-')})")
    expected = normalise_expected(expected_counts or {}, splits, dataset)

    seen: dict[Path, str] = {}
    for split in splits:
        resolved = Path(given[split]).resolve()
        if resolved in seen:
            raise split_error(split, f"same file as split {seen[resolved]}: {given[split]}")
        seen[resolved] = split
    return {split: given[split] for split in splits}, expected


def check_across_splits(loaded: Mapping[str, SplitPredictions]) -> None:
    """Raise if two splits hold the same ids; warn (attributed to the caller's caller) if they
    share some."""
    splits = list(loaded)
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            shared = np.intersect1d(loaded[a].ids, loaded[b].ids)
            if shared.size == loaded[a].n_systems == loaded[b].n_systems:
                raise split_error(b, f"the same ids as split {a}: the same predictions were given twice?")
            if shared.size:
                warn_split(b, f"{shared.size} id(s) also in split {a}, e.g. '{shared[0]}'", stacklevel=4)


def check_counts(
    task: str, loaded: Mapping[str, SplitPredictions], expected: Mapping[str, Mapping[str, int]]
) -> None:
    """Raise where a split's systems or atoms differ from ``expected`` (see :func:`normalise_expected`)."""
    for split, entry in expected.items():
        found = {"systems": loaded[split].n_systems, "atoms": loaded[split].n_atoms}
        for key, number in entry.items():
            if found[key] is None:
                raise split_error(split, f"expected counts: {task.upper()} predictions have no atom count")
            if found[key] != number:
                raise split_error(split, f"{found[key]} {key}, expected {number} (wrong count)")
