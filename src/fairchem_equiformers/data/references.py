"""Per-element linear energy references and target normalizers, fitted with fairchem's own functions.

Both files are ``torch.save``-d dicts of fairchem modules keyed by target name, the format
fairchem's trainer itself saves and ``load_references_from_config`` /
``load_normalizers_from_config`` read from a config's ``file:`` entry::

    element_references.pt  {"energy": LinearReferences}  # eV per atom of each element
    normalizers.pt         {"energy": Normalizer, "forces": Normalizer}

The element reference is either given (isolated-atom energies, eV per atom of each element) or
fitted on the train split's energies (least squares of energy against element counts).

S2EF datasets (``fit_references``) use one scale for every target: energy, forces and stress are
divided by the same number, the RMS of the train split's force vectors (eV/A; fairchem's fit of the
forces normalizer), so that a model whose forces are ``-dE/dpos`` (and stress ``(1/V)
dE/d(strain)``) in normalized units has them so in eV too (the trainer denormalizes each target
with its own normalizer; fairchem's OC20 configs use one scale for energy and forces for the same
reason). The energy normalizer's mean is the mean of the referenced energies (energy minus the
element reference); forces and stress have mean 0. Property datasets (``fit_property_references``,
QM9 style) normalize each scalar target by its own mean and RMSD.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from fairchem.core.datasets import LmdbDataset
from fairchem.core.modules.normalization.element_references import LinearReferences, fit_linear_references
from fairchem.core.modules.normalization.normalizer import Normalizer, fit_normalizers

KEY_MAPPING = {"y": "energy", "force": "forces"}
ELEMENT_REFERENCES_FILE = "element_references.pt"
NORMALIZERS_FILE = "normalizers.pt"
FIT_BATCH_SIZE = 64
MAX_NUM_ELEMENTS = 118  # the size of fairchem's LinearReferences table


def s2ef_dataset(src: Path) -> LmdbDataset:
    """fairchem's ``lmdb`` dataset on an S2EF folder, with the OC20 names mapped to energy/forces."""
    return LmdbDataset({"src": str(src), "key_mapping": dict(KEY_MAPPING)})


def fit_references(
    train_src: Path, seed: int, element_energies: dict[int, float] | None = None, stress: bool = False
) -> tuple[dict[str, LinearReferences], dict[str, Normalizer]]:
    """The ``energy`` element reference (``element_energies`` by atomic number, or fitted), then the
    normalizers of ``energy``, ``forces`` (and ``stress``) with one scale, on ``train_src``."""
    dataset = s2ef_dataset(train_src)
    common = {"dataset": dataset, "batch_size": FIT_BATCH_SIZE, "shuffle": False, "seed": seed}
    if element_energies is None:
        element_references = fit_linear_references(targets=["energy"], **common)
    else:
        values = torch.zeros(MAX_NUM_ELEMENTS + 1, dtype=torch.float64)
        for z, energy in element_energies.items():
            values[z] = energy
        element_references = {"energy": LinearReferences(element_references=values)}
    fitted = fit_normalizers(
        targets=["energy", "forces"],
        override_values={"forces": {"mean": 0.0}},
        element_references=element_references,
        **common,
    )
    scale = float(fitted["forces"].rmsd)
    normalizers = {
        "energy": Normalizer(mean=float(fitted["energy"].mean), rmsd=scale),
        "forces": Normalizer(mean=0.0, rmsd=scale),
    }
    if stress:
        normalizers["stress"] = Normalizer(mean=0.0, rmsd=scale)
    return element_references, normalizers


def fit_property_references(
    train_src: Path, seed: int, targets: Sequence[str]
) -> tuple[dict[str, LinearReferences], dict[str, Normalizer]]:
    """For records whose fields carry the target names (no key mapping): the fitted ``energy``
    element reference, then each of ``targets`` normalized by its own mean and RMSD (``energy``
    referenced), on ``train_src``."""
    dataset = LmdbDataset({"src": str(train_src)})
    common = {"dataset": dataset, "batch_size": FIT_BATCH_SIZE, "shuffle": False, "seed": seed}
    element_references = fit_linear_references(targets=["energy"], **common)
    normalizers = fit_normalizers(
        targets=list(targets), element_references=element_references, override_values={}, **common
    )
    return element_references, normalizers


def save_references(
    root: Path, element_references: dict[str, LinearReferences], normalizers: dict[str, Normalizer]
) -> tuple[Path, Path]:
    """Save ``element_references.pt`` and ``normalizers.pt`` in ``root``; returns both paths."""
    references_path = root / ELEMENT_REFERENCES_FILE
    normalizers_path = root / NORMALIZERS_FILE
    torch.save(element_references, references_path)
    torch.save(normalizers, normalizers_path)
    return references_path, normalizers_path
