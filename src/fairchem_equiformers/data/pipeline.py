"""The one pipeline every dataset source (EMT slabs, users' files, MD17, QM9) goes through.

Every build writes, under ``out``::

    <task>/{train,val,test}/data.lmdb, metadata.npz   records (``s2ef``: frames, ``is2re``: EMT
                                                    systems, ``properties``: QM9 conformers)
    element_references.pt, normalizers.pt           fitted on the layout's train split
    manifest.json                                   parameters, counts, energy references
    dataset.yml                                     the fairchem ``dataset`` config section

in four steps, each implemented once:

1. **stage** (``output.staged_output``): everything is written into a staging folder that
   replaces ``out`` only when the build succeeded;
2. **splits** (``splits.assign_splits`` by fractions, ``splits.assign_sizes`` by sizes, then
   ``splits.present_splits``): items, not frames, are split, with a seeded permutation;
3. **records** (``lmdb_writer.SplitWriters``, one per task): ``<task>/<split>`` LMDBs;
4. **finish** (:func:`finish_dataset`): the references of the train split (``references``),
   ``manifest.json`` and ``dataset.yml`` for the source's :class:`Layout`.

A split with fraction 0 is not written; with fractions summing to 1 there is no train split (a
held-out set) and no references are fitted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .output import write_dataset_config, write_manifest
from .references import KEY_MAPPING, save_references

DEFAULT_VAL_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.1

# train_src -> (element references, normalizers), fairchem modules keyed by target name
FitReferences = Callable[[Path], tuple[dict[str, Any], dict[str, Any]]]


@dataclass
class BuildReport:
    """Where a build went: ``counts`` maps ``"s2ef/train"`` etc. to entries, ``files`` names the extras."""

    out: Path
    counts: dict[str, int]
    files: dict[str, Path]
    dropped_frames: int = 0
    is2re_excluded: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of the costly stages
    notes: list[str] = field(default_factory=list)  # summary lines the CLI prints (``convert``)


@dataclass(frozen=True)
class Layout:
    """What ``dataset.yml`` points at: the task folder trained on and fairchem's ``key_mapping``
    of its fields (None: the fields already carry the target names)."""

    task: str
    key_mapping: Mapping[str, str] | None


S2EF = Layout("s2ef", KEY_MAPPING)  # OC20 names y/force mapped to energy/forces
PROPERTIES = Layout("properties", None)  # QM9-style: energy, homo, ... as fields


def finish_dataset(
    stage: Path,
    out: Path,
    splits: list[str],
    counts: dict[str, int],
    manifest: dict[str, Any],
    fit: FitReferences,
    layout: Layout = S2EF,
) -> dict[str, Path]:
    """The last step of every build, in the staging folder ``stage`` of ``out``: the references
    ``fit`` returns for the layout's train split (if there is one), the manifest (``manifest`` plus
    ``counts`` and the layout's ``key_mapping``) and the config snippet. Returns the written files
    by name, as paths under ``out``.
    """
    files = {}
    if "train" in splits:
        element_references, normalizers = fit(stage / layout.task / "train")
        files["element_references"], files["normalizers"] = save_references(
            stage, element_references, normalizers
        )
    manifest = {**manifest, "counts": counts}
    if layout.key_mapping is not None:
        manifest["key_mapping"] = dict(layout.key_mapping)
    files["manifest"] = write_manifest(stage, manifest)
    files["dataset_config"] = write_dataset_config(stage, out, splits, layout.task, layout.key_mapping)
    return {name: out / path.name for name, path in files.items()}
