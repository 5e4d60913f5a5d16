"""``fairchem-equiformers-data convert`` on users' files: several inputs and globs, separate
val/test files, group splits, isolated-atom references, stress (unit and sign against the
energy's strain derivative), tags and fixed atoms, bad frames, the summary; on the vendored
real DFT data (BOTNet acetylacetone, mlearn silicon) and on EMT-labelled structures."""

from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from fairchem.core.datasets import LmdbDataset

from fairchem_equiformers.data import DataBuildError, convert_user_data
from fairchem_equiformers.data.cli import main

REAL = Path(__file__).parent / "data" / "real"
BENCHMARK_DATA = Path(__file__).parents[1] / "benchmarks" / "data" / "real"


def records(out: Path, split: str) -> list:
    dataset = LmdbDataset(
        {"src": str(out / "s2ef" / split), "key_mapping": {"y": "energy", "force": "forces"}}
    )
    return [dataset[i] for i in range(len(dataset))]


def emt_frames(count: int, seed: int, info: dict | None = None) -> list[Atoms]:
    """Rattled, strained 4-atom Cu cells labelled by EMT (energy, forces, stress)."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + rng.normal(0, 0.01, (3, 3))), scale_atoms=True)
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        results = {key: atoms.calc.get_property(key, atoms) for key in ("energy", "forces", "stress")}
        atoms.calc = SinglePointCalculator(atoms, **results)
        atoms.info.update(info or {})
        frames.append(atoms)
    return frames


def test_split_by_file_keeps_every_file_in_one_split_and_globs_expand(tmp_path, capsys):
    for i in range(6):
        ase.io.write(tmp_path / f"run{i}.extxyz", emt_frames(3, seed=i))
    out = tmp_path / "out"
    args = ["convert", "--input", str(tmp_path / "run*.extxyz"), "--out", str(out)]
    assert main([*args, "--val-fraction", "0.2", "--test-fraction", "0.2"]) == 0
    printed = capsys.readouterr().out
    assert "split: --split-by file, 6 group(s) in the training files" in printed
    sids = {split: {int(d.sid) for d in records(out, split)} for split in ("train", "val", "test")}
    assert {split: len(ids) for split, ids in sids.items()} == {"train": 4, "val": 1, "test": 1}
    for split in sids:  # three frames of each file, all in the same split
        assert len(records(out, split)) == 3 * len(sids[split])
        assert sorted(int(d.fid) for d in records(out, split)) == sorted([0, 1, 2] * len(sids[split]))
    assert "train: 12 frames, 4 group(s), elements Cu, energy" in printed and "max |force|" in printed


def test_one_file_is_never_split_frame_by_frame_unless_asked(tmp_path):
    source = tmp_path / "md.extxyz"
    ase.io.write(source, emt_frames(10, seed=0))
    with pytest.raises(
        DataBuildError, match=r"1 input file\(s\) to split by --split-by file.*--split-by frame"
    ):
        convert_user_data(source, tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()
    report = convert_user_data(source, tmp_path / "b", split_by="frame", progress=False)
    assert report.counts == {"s2ef/train": 8, "s2ef/val": 1, "s2ef/test": 1}
    assert report.notes[0] == "split: --split-by frame, 10 group(s) in the training files"


def test_split_by_info_key_keeps_trajectories_whole(tmp_path):
    frames = [atoms for t in range(8) for atoms in emt_frames(4, seed=t, info={"trajectory": f"t{t}"})]
    source = tmp_path / "all.extxyz"
    ase.io.write(source, frames)
    out = tmp_path / "out"
    report = convert_user_data(source, out, split_by="info:trajectory", val_fraction=0.25, test_fraction=0.25,
                               progress=False)  # fmt: skip
    assert report.counts == {"s2ef/train": 16, "s2ef/val": 8, "s2ef/test": 8}
    energies = {round(a.get_potential_energy(), 6): a.info["trajectory"] for a in frames}
    seen = {}
    for split in ("train", "val", "test"):
        for data in records(out, split):
            trajectory = energies[round(float(data.energy), 6)]
            assert seen.setdefault(trajectory, split) == split  # never in two splits
    missing = tmp_path / "missing.extxyz"
    ase.io.write(missing, frames[:3] + emt_frames(1, seed=99))
    with pytest.raises(DataBuildError, match=r"missing.extxyz frame 3 has no atoms.info\['trajectory'\]"):
        convert_user_data(missing, tmp_path / "m", split_by="info:trajectory", progress=False)


def test_real_molecular_data_with_separate_test_file_and_isolated_atoms(tmp_path, capsys):
    """BOTNet acetylacetone (ORCA PBE-D3): the isolated-atom energies are the element reference."""
    out = tmp_path / "acac"
    argv = ["convert", "--input", str(REAL / "acac_train.xyz"), "--test-input", str(REAL / "acac_test.xyz"),
            "--val-fraction", "0.1", "--split-by", "frame", "--isolated-atoms",
            str(REAL / "acac_isolated_atoms.xyz"), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "train: 90 frames" in printed and "val: 10 frames" in printed and " test: 50 frames" in printed
    assert "elements H C O" in printed
    train = ase.io.read(REAL / "acac_train.xyz", ":")
    test = ase.io.read(REAL / "acac_test.xyz", ":")
    assert sorted(float(d.energy) for d in records(out, "test")) == sorted(
        a.get_potential_energy() for a in test
    )
    e0 = {a.numbers[0]: a.get_potential_energy() for a in ase.io.read(REAL / "acac_isolated_atoms.xyz", ":")}
    references = torch.load(out / "element_references.pt", weights_only=False)["energy"].element_references
    assert {z: float(references[z]) for z in e0} == pytest.approx(e0, abs=1e-9)
    assert float(references.abs().sum()) == pytest.approx(sum(abs(v) for v in e0.values()))
    # one scale for energy and forces (gradient forces stay the energy's gradient in eV)
    normalizers = torch.load(out / "normalizers.pt", weights_only=False)
    forces = np.concatenate([data.forces.numpy() for data in records(out, "train")])
    force_rms = np.sqrt(
        np.mean(np.sum(forces.astype(float) ** 2, axis=1))
    )  # fairchem's: of the vectors' norms
    # fairchem divides by n - 1 (1,350 atoms: 3.7e-4 relative)
    assert float(normalizers["forces"].rmsd) == pytest.approx(force_rms * np.sqrt(1350 / 1349), rel=1e-5)
    assert float(normalizers["energy"].rmsd) == float(normalizers["forces"].rmsd)
    atomization = [a.get_potential_energy() - sum(e0[z] for z in a.numbers) for a in train]
    assert float(normalizers["energy"].mean) == pytest.approx(np.mean(atomization), abs=0.5)
    # no periodicity: boxed for fairchem, tags 1 (free), nothing fixed
    data = records(out, "train")[0]
    assert data.tags.tolist() == [1] * 15 and data.fixed.tolist() == [0] * 15
    # an element without an isolated-atom energy is an error naming it
    partial = tmp_path / "e0.xyz"
    ase.io.write(partial, ase.io.read(REAL / "acac_isolated_atoms.xyz", ":2"))
    with pytest.raises(DataBuildError, match=r"e0.xyz has no isolated-atom energy for O"):
        convert_user_data(REAL / "acac_train.xyz", tmp_path / "x", split_by="frame", isolated_atoms=partial,
                          progress=False)  # fmt: skip


def test_stress_unit_and_sign_equal_the_energy_strain_derivative(tmp_path):
    """Written stress == (1/V) dE/d(strain) by central differences of EMT energies (ASE's sign,
    eV/A^3), whether the file holds a stress or a virial."""
    frames = emt_frames(4, seed=3)
    with_virial = []
    for atoms in frames:
        copy = atoms.copy()
        copy.calc = SinglePointCalculator(
            copy, energy=atoms.get_potential_energy(), forces=atoms.get_forces()
        )
        copy.info["virial"] = -atoms.get_stress(voigt=False) * atoms.get_volume()
        with_virial.append(copy)
    ase.io.write(tmp_path / "stress.extxyz", frames)
    ase.io.write(tmp_path / "virial.extxyz", with_virial)
    for name in ("stress", "virial"):
        out = tmp_path / name
        convert_user_data(tmp_path / f"{name}.extxyz", out, split_by="frame", val_fraction=0, test_fraction=0,
                          progress=False)  # fmt: skip
        stored = sorted(records(out, "train"), key=lambda d: float(d.energy))
        assert all(d.stress.shape == (1, 3, 3) for d in stored)
        for data, atoms in zip(stored, sorted(frames, key=lambda a: a.get_potential_energy())):
            h, volume = 1e-5, atoms.get_volume()
            derivative = np.zeros((3, 3))
            for i in range(3):
                for j in range(3):
                    energies = []
                    for sign in (1, -1):
                        strain = np.eye(3)
                        strain[i, j] += sign * h / 2
                        strain[j, i] += sign * h / 2
                        strained = atoms.copy()
                        strained.set_cell(atoms.cell[:] @ strain, scale_atoms=True)
                        strained.calc = EMT()
                        energies.append(strained.get_potential_energy())
                    derivative[i, j] = (energies[0] - energies[1]) / (2 * h) / volume
            np.testing.assert_allclose(data.stress[0].numpy(), derivative, atol=2e-6)
            assert np.abs(derivative).max() > 1e-3
    assert "stress" in torch.load(tmp_path / "stress" / "normalizers.pt", weights_only=False)


def test_vendored_mlearn_stress_is_consistent_with_the_energies():
    """The vendored mlearn silicon stress (converted from VASP's kBar) predicts the energy change
    between strained "Elastic" cells: E_b - E_a = V sigma : strain (trapezoid), 30 pairs within 2%
    strain (measured mean error 0.008 eV against a 0.70 eV mean change; the opposite sign gives 1.4)."""
    frames = [
        a
        for a in ase.io.read(BENCHMARK_DATA / "mlearn" / "Si_train.xyz", ":")
        if a.info["group"] == "Elastic"
    ]
    errors, changes = [], []
    for k, a in enumerate(frames):
        for b in frames[k + 1 :]:
            if len(a) != len(b):
                continue
            deformation = np.linalg.solve(a.cell[:], b.cell[:])
            strain = (deformation + deformation.T) / 2 - np.eye(3)
            if not 1e-4 < np.abs(strain).max() < 0.02:
                continue
            work = (
                a.get_volume() * a.get_stress(voigt=False) + b.get_volume() * b.get_stress(voigt=False)
            ) / 2
            change = b.get_potential_energy() - a.get_potential_energy()
            errors.append(abs(change - (work * strain).sum()))
            changes.append(abs(change))
    assert len(errors) == 30
    assert np.mean(errors) < 0.012 and np.mean(changes) > 0.5


def test_mlearn_silicon_converts_with_stress_and_tags(tmp_path):
    out = tmp_path / "si"
    test = [REAL / "si_test.xyz"]
    report = convert_user_data(REAL / "si_train.xyz", out, split_by="info:group", val_fraction=0,
                               test_fraction=0, test_inputs=test, progress=False)  # fmt: skip
    assert report.counts == {"s2ef/train": 54, "s2ef/test": 25}
    assert "stress: written for every frame (eV/A^3, ASE's sign)" in report.notes
    source = ase.io.read(REAL / "si_test.xyz", ":")
    for data in records(out, "test"):  # one test file: fid is the frame's index in it
        atoms = source[int(data.fid)]
        assert float(data.energy) == atoms.get_potential_energy()
        np.testing.assert_allclose(
            data.stress[0].numpy(), atoms.get_stress(voigt=False), rtol=1e-6, atol=1e-9
        )
        assert data.tags.tolist() == [1] * len(atoms)


def test_tags_and_fixed_atoms_come_from_the_file(tmp_path):
    tagged, untagged = emt_frames(2, seed=5)
    tagged.set_tags([0, 1, 1, 2])
    untagged.set_constraint(FixAtoms(indices=[0, 2]))
    for name, atoms in (("tagged", tagged), ("untagged", untagged)):
        ase.io.write(tmp_path / f"{name}.traj", [atoms])
    out = tmp_path / "out"
    convert_user_data([tmp_path / "tagged.traj", tmp_path / "untagged.traj"], out, val_fraction=0,
                      test_fraction=0, progress=False)  # fmt: skip
    first, second = sorted(records(out, "train"), key=lambda d: int(d.sid))
    assert first.tags.tolist() == [0, 1, 1, 2] and first.fixed.tolist() == [0, 0, 0, 0]
    assert second.tags.tolist() == [0, 1, 0, 1] and second.fixed.tolist() == [1, 0, 1, 0]


def spoiled(atoms: Atoms, kind: str) -> Atoms:
    """``atoms`` with one defect, its labels kept."""
    results = dict(atoms.calc.results)
    atoms = atoms.copy()
    if kind == "nan":
        results["forces"] = results["forces"].copy()
        results["forces"][1, 2] = np.nan
    elif kind in ("overlap", "overlap_molecule"):
        atoms.positions[3] = atoms.positions[0] + [0.1, 0, 0]
        if kind == "overlap_molecule":  # no periodic boundaries: the k-d tree's search
            atoms.pbc = False
            results.pop("stress", None)
            atoms.positions[2] = atoms.positions[0] + [0, 0.2, 0]
    elif kind == "dummy":
        atoms.numbers[2] = 0
    atoms.calc = None if kind == "unlabelled" else SinglePointCalculator(atoms, **results)
    return atoms


BAD = {
    "nan": "forces of atom 1 are not finite",
    "overlap": "atoms 0 and 3 are 0.100 A apart (overlapping atoms",
    "overlap_molecule": "atoms 0 and 3 are 0.100 A apart (overlapping atoms",
    "unlabelled": "has no energy and forces",
    "dummy": "has unknown element(s) with atomic number [0]",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_frames_name_file_and_frame_and_nothing_is_written(kind, tmp_path, capsys):
    message = BAD[kind]
    frames = emt_frames(5, seed=1)
    frames[3] = spoiled(frames[3], kind)
    source = tmp_path / "bad.traj"
    ase.io.write(source, frames)
    out = tmp_path / "out"
    assert main(["convert", "--input", str(source), "--split-by", "frame", "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert f"bad.traj frame 3 {message}" in error and "Traceback" not in error, error
    assert not out.exists() and not list(tmp_path.glob(".*staging*"))
    argv = ["convert", "--input", str(source), "--split-by", "frame", "--val-fraction", "0",
            "--test-fraction", "0", "--skip-bad-frames", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "dropped: 1 bad frame(s) (--skip-bad-frames):" in printed and "bad.traj frame 3" in printed
    assert len(records(out, "train")) == 4


def test_input_errors_are_clear(tmp_path):
    good = tmp_path / "good.extxyz"
    ase.io.write(good, emt_frames(4, seed=0))
    with pytest.raises(DataBuildError, match=r"no input file matches '.*nothing\*.xyz'"):
        convert_user_data(str(tmp_path / "nothing*.xyz"), tmp_path / "a", progress=False)
    with pytest.raises(DataBuildError, match="give either --test-input or --test-fraction, not both"):
        convert_user_data(good, tmp_path / "a", test_inputs=[good], test_fraction=0.2, split_by="frame",
                          progress=False)  # fmt: skip
    with pytest.raises(DataBuildError, match="--split-by must be file, frame or info:KEY, got 'random'"):
        convert_user_data(good, tmp_path / "a", split_by="random", progress=False)
