"""Converting the user's labelled files (``user_data``) into the plugin's S2EF dataset layout.

Inputs: training files (``inputs``; paths or globs) and optional separate validation and test
files. Frames of the training files are split into train/val/test **by group**, never frame by
frame unless asked (``split_by``):

- ``"file"`` (the default): each input file is one group (one trajectory, one relaxation);
- ``"info:KEY"``: frames sharing ``atoms.info[KEY]`` (a trajectory or system id) form a group;
- ``"frame"``: every frame is its own group (frames of one MD run then land in several splits).

A split given by its own files (``val_inputs`` / ``test_inputs``) is not also drawn from the
training files. Element references are the isolated-atom energies when ``isolated_atoms`` is
given (MACE's E0s), otherwise a linear fit on the train split (``references``). The stress is
written when every frame has one.

Tags and fixed atoms: ``FixAtoms`` constraints become ``fixed``; tags are the file's where it
has them (OC20: 0 subsurface, 1 surface, 2 adsorbate), otherwise 0 for fixed atoms and 1 for
the others. Frame ``i`` of group ``g`` gets ``sid = g`` and ``fid = i`` (``split_by="frame"``:
``sid`` counts the frames and ``fid = 0``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from ase.constraints import FixAtoms
from ase.data import chemical_symbols
from tqdm import tqdm

from .errors import DataBuildError
from .frames import Frame
from .lmdb_writer import SplitWriters
from .oc20_format import s2ef_data
from .output import check_output, staged_output
from .pipeline import DEFAULT_TEST_FRACTION, DEFAULT_VAL_FRACTION, BuildReport, finish_dataset
from .references import fit_references
from .splits import SPLITS, assign_splits, present_splits
from .user_data import BadFrame, LabelKeys, expand_inputs, read_frames, read_isolated_atoms


@dataclass(frozen=True)
class _Scanned:
    """What the first pass keeps of a good frame (the second pass re-reads the structure)."""

    file: int
    index: int
    group: object
    numbers: tuple[int, ...]
    energy: float
    max_force: float
    has_stress: bool


def _group_of(split_by: str, frame: Frame, file: int, index: int, where: str) -> object:
    if split_by == "file":
        return file
    if split_by == "frame":
        return (file, index)
    key = split_by.removeprefix("info:")
    if key not in frame.atoms.info:
        raise DataBuildError(f"{where} has no atoms.info[{key!r}] to group by (--split-by {split_by})")
    return frame.atoms.info[key]


def _fractions(val_fraction, test_fraction, val_inputs, test_inputs) -> tuple[float, float]:
    """The fractions of the training files' groups for val and test (0 where files are given)."""
    chosen = []
    for name, fraction, files, default in (
        ("val", val_fraction, val_inputs, DEFAULT_VAL_FRACTION),
        ("test", test_fraction, test_inputs, DEFAULT_TEST_FRACTION),
    ):
        if files and fraction:
            raise DataBuildError(f"give either --{name}-input or --{name}-fraction, not both")
        chosen.append(0.0 if files else default if fraction is None else fraction)
    return chosen[0], chosen[1]


def convert_user_data(
    inputs: Path | str | list[Path | str],
    out: Path,
    *,
    val_inputs: list[Path | str] = (),
    test_inputs: list[Path | str] = (),
    split_by: str = "file",
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    isolated_atoms: Path | None = None,
    energy_key: str | None = None,
    forces_key: str | None = None,
    stress_key: str | None = None,
    skip_bad_frames: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> BuildReport:
    """Convert the labelled frames of ``inputs`` (and ``val_inputs``/``test_inputs``) to S2EF LMDBs.

    ``val_fraction``/``test_fraction`` (default 0.1 each, 0 where separate files are given) are
    fractions of the training files' groups (see the module docstring). Bad frames raise
    ``DataBuildError`` naming the file and frame, or are left out and listed with
    ``skip_bad_frames``. Nothing is written unless everything succeeds.
    """
    if split_by not in ("file", "frame") and not (split_by.startswith("info:") and len(split_by) > 5):
        raise DataBuildError(f"--split-by must be file, frame or info:KEY, got {split_by!r}")
    sources = {
        "train": expand_inputs(inputs if isinstance(inputs, list | tuple) else [inputs]),
        "val": expand_inputs(val_inputs),
        "test": expand_inputs(test_inputs),
    }
    val_fraction, test_fraction = _fractions(val_fraction, test_fraction, sources["val"], sources["test"])
    check_output(out, overwrite)  # before the slow first pass
    keys = LabelKeys(energy=energy_key, forces=forces_key, stress=stress_key)
    element_energies = read_isolated_atoms(isolated_atoms) if isolated_atoms is not None else None

    # First pass: check every frame, keep what the split and the summary need.
    files = [(role, path) for role in SPLITS for path in sources[role]]
    scanned: list[tuple[str, _Scanned]] = []
    bad: list[BadFrame] = []
    show = None if progress else True  # tqdm's None: a bar only on a terminal
    with tqdm(desc="checking frames", unit=" frames", disable=show) as bar:
        for file, (role, path) in enumerate(files):
            for index, frame in enumerate(read_frames(path, keys, skip_bad=skip_bad_frames)):
                bar.update()
                if isinstance(frame, BadFrame):
                    bad.append(frame)
                    continue
                where = f"{path} frame {index}"
                group = _group_of(split_by, frame, file, index, where) if role == "train" else None
                forces = float(np.linalg.norm(frame.forces, axis=1).max())
                numbers = tuple(int(z) for z in frame.atoms.numbers)
                has_stress = frame.stress is not None
                scanned.append(
                    (role, _Scanned(file, index, group, numbers, frame.energy, forces, has_stress))
                )
    if not any(role == "train" for role, _ in scanned):
        raise DataBuildError(f"no usable frame in {', '.join(str(path) for path in sources['train'])}")

    # Split the training files' groups; val/test files go whole to their split.
    groups = list(dict.fromkeys(item.group for role, item in scanned if role == "train"))
    try:
        group_split = dict(zip(groups, assign_splits(len(groups), val_fraction, test_fraction, seed)))
    except DataBuildError as exc:
        what = {"file": "input file(s)", "frame": "frame(s)"}.get(split_by, f"value(s) of {split_by}")
        raise DataBuildError(
            f"{exc} ({len(groups)} {what} to split by --split-by {split_by}); give --val-input/--test-input, "
            "more input files, --split-by info:KEY (a trajectory or system id), or --split-by frame to split "
            "frames at random"
        ) from None
    split_of = [group_split[item.group] if role == "train" else role for role, item in scanned]
    if split_of.count("train") == 1 and element_energies is None:
        raise DataBuildError(
            f"{len(split_of)} frames give 1 training frame; fitting the references needs at least 2"
        )
    splits = present_splits(split_of)
    train_elements = {
        z for (role, item), split in zip(scanned, split_of) if split == "train" for z in item.numbers
    }
    if element_energies is not None:
        missing = sorted(train_elements - set(element_energies))
        if missing:
            names = ", ".join(chemical_symbols[z] for z in missing)
            raise DataBuildError(f"{isolated_atoms} has no isolated-atom energy for {names}")
    with_stress = sum(item.has_stress for _, item in scanned)
    write_stress = with_stress == len(scanned)

    report = BuildReport(out=out, counts={}, files={})
    ids = _ids(scanned, split_by)
    with staged_output(out, overwrite) as stage:
        with SplitWriters(stage, "s2ef", splits) as writers:
            position = 0
            with tqdm(total=len(scanned), desc="writing", unit=" frames", disable=show) as bar:
                for _, path in files:
                    for frame in read_frames(path, keys, skip_bad=skip_bad_frames):
                        if isinstance(frame, BadFrame):
                            continue
                        writers.add(split_of[position], _record(frame, *ids[position], write_stress))
                        position += 1
                        bar.update()
        report.counts = writers.counts
        manifest = {
            "source": "convert",
            "inputs": {role: [str(path) for path in sources[role]] for role in SPLITS},
            "split_by": split_by,
            "seed": seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "energy": {
                "y": "the input's energy (eV), unreferenced",
                "energy_key": energy_key,
                "element_references": "isolated atoms" if element_energies else "linear fit on train",
                "isolated_atoms": str(isolated_atoms) if isolated_atoms else None,
                "isolated_atom_energies_eV": {
                    chemical_symbols[z]: e for z, e in (element_energies or {}).items()
                },
            },
            "forces_key": forces_key,
            "stress": "eV/A^3, ASE's sign ((1/V) dE/d(strain))" if write_stress else None,
            "skipped_frames": [{"frame": item.where, "reason": item.reason} for item in bad],
        }
        fit = partial(fit_references, seed=seed, element_energies=element_energies, stress=write_stress)
        report.files = finish_dataset(stage, out, splits, report.counts, manifest, fit)
    report.dropped_frames = len(bad)
    report.notes = _summary(scanned, split_of, split_by, groups, bad, with_stress, write_stress)
    return report


def _ids(scanned: list[tuple[str, _Scanned]], split_by: str) -> list[tuple[int, int]]:
    """``(sid, fid)`` per kept frame: group number and position in the group (``frame``: index, 0)."""
    if split_by == "frame":
        return [(position, 0) for position in range(len(scanned))]
    numbers: dict[object, int] = {}
    seen: Counter = Counter()
    ids = []
    for role, item in scanned:
        group = (role, item.file) if role != "train" else ("train", item.group)
        sid = numbers.setdefault(group, len(numbers))
        ids.append((sid, seen[group]))
        seen[group] += 1
    return ids


def _record(frame: Frame, sid: int, fid: int, write_stress: bool):
    """The S2EF record of ``frame``, with the tag rule and the stress [1, 3, 3] when written."""
    atoms = frame.atoms
    if "tags" not in atoms.arrays:
        fixed = np.zeros(len(atoms), dtype=bool)
        for constraint in atoms.constraints:
            if isinstance(constraint, FixAtoms):
                fixed[constraint.get_indices()] = True
        atoms.set_tags(np.where(fixed, 0, 1))
    data = s2ef_data(atoms, frame.energy, frame.forces, sid=sid, fid=fid)
    if write_stress:
        data.stress = torch.tensor(frame.stress, dtype=torch.float32).reshape(1, 3, 3)
    return data


def _summary(scanned, split_of, split_by, groups, bad, with_stress, write_stress) -> list[str]:
    """The one-screen summary the CLI prints: splits, elements, label ranges, what was dropped."""
    lines = [f"split: --split-by {split_by}, {len(groups)} group(s) in the training files"]
    for split in SPLITS:
        members = [item for (role, item), name in zip(scanned, split_of) if name == split]
        if not members:
            continue
        energy = np.array([item.energy for item in members])
        per_atom = energy / np.array([len(item.numbers) for item in members])
        elements = Counter(z for item in members for z in set(item.numbers))
        lines.append(
            f"{split:>5}: {len(members)} frames, {len({item.group for item in members})} group(s), "
            f"elements {' '.join(chemical_symbols[z] for z in sorted(elements))}, "
            f"energy {energy.min():.3f} .. {energy.max():.3f} eV "
            f"({per_atom.min():.3f} .. {per_atom.max():.3f} eV/atom), "
            f"max |force| {max(item.max_force for item in members):.3f} eV/A"
        )
    if write_stress:
        lines.append("stress: written for every frame (eV/A^3, ASE's sign)")
    elif with_stress:
        lines.append(f"stress: only {with_stress} of {len(scanned)} frames have one, so none is written")
    lines.append(f"dropped: {len(bad)} bad frame(s)" + (" (--skip-bad-frames):" if bad else ""))
    lines.extend(f"  {item.where}: {item.reason}" for item in bad[:10])
    if len(bad) > 10:
        lines.append(f"  ... and {len(bad) - 10} more (all listed in manifest.json)")
    return lines
