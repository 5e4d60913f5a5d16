"""What EvalAI expects: the tasks, the datasets and their splits, the keys and id forms of each
task's prediction files; the error and warning types; one split's checked predictions."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


def split_error(split: str, message: str) -> SubmissionError:
    """The error to raise for ``split``: ``split <name>: <message>``."""
    return SubmissionError(f"split {split}: {message}")


def warn_split(split: str, message: str, stacklevel: int = 3) -> None:
    """A :class:`SubmissionWarning` about ``split``, attributed to the caller's caller (by default)."""
    warnings.warn(f"split {split}: {message}", SubmissionWarning, stacklevel=stacklevel)


def shape_text(array: np.ndarray) -> str:
    """``array``'s shape as ``(a, b)``, for messages."""
    return str(tuple(int(n) for n in array.shape))
