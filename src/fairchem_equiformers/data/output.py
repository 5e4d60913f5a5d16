"""The output folder: refusing to clobber, building in a staging folder, manifest and config snippet.

A build writes into a hidden staging folder beside ``out`` and renames it to ``out`` only when
everything succeeded, so a failed build leaves no half-written dataset. ``--overwrite`` replaces
only a folder this tool wrote (it has ``manifest.json``) or an empty one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from .errors import DataBuildError
from .references import ELEMENT_REFERENCES_FILE, KEY_MAPPING, NORMALIZERS_FILE

MANIFEST_FILE = "manifest.json"
DATASET_CONFIG_FILE = "dataset.yml"


def check_output(out: Path, overwrite: bool) -> None:
    """Raise ``DataBuildError`` unless ``out`` may be (re)written."""
    if not out.exists():
        return
    if not overwrite:
        raise DataBuildError(f"output folder {out} already exists (pass --overwrite to replace it)")
    if not out.is_dir():
        raise DataBuildError(f"output path {out} exists and is not a folder")
    if any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise DataBuildError(
            f"refusing to replace {out}: it is not empty and has no {MANIFEST_FILE}, "
            "so it was not written by fairchem-equiformers-data"
        )


@contextmanager
def staged_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces ``out``, on an error it is removed."""
    check_output(out, overwrite)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    if staging.exists():  # left by a killed build of a process with the same id
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    check_output(out, overwrite)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` (how the dataset was built, counts, energy references)."""
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def dataset_config(
    out: Path,
    splits: list[str],
    task: str = "s2ef",
    key_mapping: Mapping[str, str] | None = KEY_MAPPING,
) -> dict[str, Any]:
    """fairchem 1.10 ``dataset`` section for the ``task`` ``splits`` of ``out`` (paths as ``out`` is given).

    val/test inherit ``key_mapping`` from train in fairchem, but state it for clarity (None: no
    mapping, the fields carry the target names); the normalizer and element references are read
    from ``train.transforms`` (present with train).
    """
    section: dict[str, Any] = {}
    for split in splits:
        entry: dict[str, Any] = {"format": "lmdb", "src": str(out / task / split)}
        if key_mapping is not None:
            entry["key_mapping"] = dict(key_mapping)
        if split == "train":
            entry["transforms"] = {
                "element_references": {"file": str(out / ELEMENT_REFERENCES_FILE)},
                "normalizer": {"file": str(out / NORMALIZERS_FILE)},
            }
        section[split] = entry
    return {"dataset": section}


def write_dataset_config(
    folder: Path,
    out: Path,
    splits: list[str],
    task: str = "s2ef",
    key_mapping: Mapping[str, str] | None = KEY_MAPPING,
) -> Path:
    """Write ``dataset.yml``: the config snippet to train on this dataset (see ``dataset_config``)."""
    path = folder / DATASET_CONFIG_FILE
    path.write_text(yaml.safe_dump(dataset_config(out, splits, task, key_mapping), sort_keys=False))
    return path
