"""Per-element linear energy references and target normalizers, fitted with fairchem's own functions.

Both files are ``torch.save``-d dicts of fairchem modules keyed by target name, the format
fairchem's trainer itself saves and ``load_references_from_config`` /
``load_normalizers_from_config`` read from a config's ``file:`` entry::

    element_references.pt  {"energy": LinearReferences}  # eV per atom of each element
    normalizers.pt         {"energy": Normalizer, "forces": Normalizer}

The linear reference is fitted on the train split's energies (least squares of energy against
element counts). The energy normalizer is fitted on the referenced energies (energy minus the
linear reference), as the trainer normalizes them; the forces normalizer has mean 0 (forces are
vectors) and the RMS of the force components (eV/A).
"""

from __future__ import annotations

from pathlib import Path

import torch
from fairchem.core.datasets import LmdbDataset
from fairchem.core.modules.normalization.element_references import LinearReferences, fit_linear_references
from fairchem.core.modules.normalization.normalizer import Normalizer, fit_normalizers

KEY_MAPPING = {"y": "energy", "force": "forces"}
ELEMENT_REFERENCES_FILE = "element_references.pt"
NORMALIZERS_FILE = "normalizers.pt"
FIT_BATCH_SIZE = 64


def s2ef_dataset(src: Path) -> LmdbDataset:
    """fairchem's ``lmdb`` dataset on an S2EF folder, with the OC20 names mapped to energy/forces."""
    return LmdbDataset({"src": str(src), "key_mapping": dict(KEY_MAPPING)})


def fit_references(train_src: Path, seed: int) -> tuple[dict[str, LinearReferences], dict[str, Normalizer]]:
    """Fit the ``energy`` linear reference, then the ``energy``/``forces`` normalizers, on ``train_src``."""
    dataset = s2ef_dataset(train_src)
    common = {"dataset": dataset, "batch_size": FIT_BATCH_SIZE, "shuffle": False, "seed": seed}
    element_references = fit_linear_references(targets=["energy"], **common)
    normalizers = fit_normalizers(
        targets=["energy", "forces"],
        override_values={"forces": {"mean": 0.0}},
        element_references=element_references,
        **common,
    )
    return element_references, normalizers


def write_references(root: Path, train_src: Path, seed: int) -> tuple[Path, Path]:
    """Fit on ``train_src`` and save ``element_references.pt`` and ``normalizers.pt`` in ``root``."""
    element_references, normalizers = fit_references(train_src, seed)
    references_path = root / ELEMENT_REFERENCES_FILE
    normalizers_path = root / NORMALIZERS_FILE
    torch.save(element_references, references_path)
    torch.save(normalizers, normalizers_path)
    return references_path, normalizers_path
