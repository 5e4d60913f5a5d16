"""The dataset builder: EMT generation, user-data conversion, fitted references, the CLI.

Every dataset here is read back with fairchem's own ``LmdbDataset`` and config loaders.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import ase.io
import lmdb
import numpy as np
import pytest
import torch
import yaml
from ase import Atoms
from ase.build import add_adsorbate, fcc100, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.data import chemical_symbols
from ase.db import connect
from fairchem.core.datasets import LmdbDataset
from fairchem.core.modules.normalization.element_references import load_references_from_config
from fairchem.core.modules.normalization.normalizer import load_normalizers_from_config

from fairchem_equiformers.data import DataBuildError, build_emt_dataset, convert_user_data
from fairchem_equiformers.data.adsorbates import ADSORBATES, atomic_references, gas_energies, reference_energy
from fairchem_equiformers.data.cli import main
from fairchem_equiformers.data.emt import draw_spec, system_rng
from fairchem_equiformers.data.slabs import METALS, relaxed_clean_slab
from fairchem_equiformers.data.splits import assign_splits

from .conftest import TINY_V2, s2ef_config

CLI = Path(sys.executable).parent / "fairchem-equiformers-data"
KEY_MAPPING = {"y": "energy", "force": "forces"}
SPLITS = ("train", "val", "test")
NUM_SYSTEMS = 4
ADSORBATE_ELEMENTS = {1, 6, 7, 8}


def s2ef(root: Path, split: str) -> LmdbDataset:
    return LmdbDataset({"src": str(root / "s2ef" / split), "key_mapping": KEY_MAPPING})


def raw_values(root: Path) -> dict[str, bytes]:
    """Every key/value of every LMDB under ``root``, keyed by ``<folder>/<key>``."""
    values = {}
    for path in sorted(root.rglob("*.lmdb")):
        env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
        with env.begin() as txn:
            for key, value in txn.cursor():
                values[f"{path.parent.relative_to(root)}/{key.decode()}"] = bytes(value)
        env.close()
    return values


def emt_atoms(data) -> Atoms:
    """The structure of a record as ASE atoms (float32 positions), with EMT attached."""
    atoms = Atoms(numbers=data.atomic_numbers.long().numpy(), positions=data.pos.double().numpy(),
                  cell=data.cell[0].double().numpy(), pbc=True)  # fmt: skip
    atoms.calc = EMT()
    return atoms


@pytest.fixture(scope="module")
def emt_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emt") / "emt"
    report = build_emt_dataset(out, seed=0, num_systems=NUM_SYSTEMS, workers=1, progress=False)
    assert report.out == out
    return out


@pytest.fixture(scope="module")
def cli_emt_dataset(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The same build through the console script, in two worker processes."""
    out = tmp_path_factory.mktemp("cli") / "emt"
    args = ["emt", "--out", str(out), "--seed", "0", "--num-systems", str(NUM_SYSTEMS), "--workers", "2"]
    result = subprocess.run([str(CLI), *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


# ---------------------------------------------------------------------------------------------
# EMT S2EF
# ---------------------------------------------------------------------------------------------


def test_emt_s2ef_loads_with_fairchem(emt_dataset):
    manifest = yaml.safe_load((emt_dataset / "manifest.json").read_text())
    sids = {}
    for split in SPLITS:
        dataset = s2ef(emt_dataset, split)
        assert len(dataset) == manifest["counts"][f"s2ef/{split}"] > 0
        sids[split] = set()
        for data in dataset:
            n = data.natoms
            assert 17 <= n <= 38  # 16-36 metal atoms plus a 1-2 atom adsorbate
            assert data.pos.shape == (n, 3) and data.pos.dtype == torch.float32
            assert data.cell.shape == (1, 3, 3) and data.cell.dtype == torch.float32
            assert data.atomic_numbers.shape == (n,) and data.atomic_numbers.dtype == torch.uint8
            assert data.forces.shape == (n, 3) and data.forces.dtype == torch.float32
            assert data.tags.dtype == torch.int32 and data.fixed.dtype == torch.int32
            assert isinstance(data.energy, float) and isinstance(data.sid, int) and isinstance(data.fid, int)
            assert not hasattr(data, "y") or data.get("y") is None  # renamed by key_mapping
            tags = data.tags.numpy()
            numbers = data.atomic_numbers.numpy()
            assert set(np.unique(tags)) == {0, 1, 2}
            assert set(numbers[tags == 2]) <= ADSORBATE_ELEMENTS and 1 <= (tags == 2).sum() <= 2
            assert not set(numbers[tags < 2]) & ADSORBATE_ELEMENTS and len(set(numbers[tags < 2])) == 1
            np.testing.assert_array_equal(data.fixed.numpy(), (tags == 0).astype(np.int32))
            assert data.forces.norm(dim=1).max() <= 20.0
            assert -5.0 < data.energy < 15.0  # adsorption energies, not EMT totals of ~30-90 eV
            sids[split].add(data.sid)
    # systems, not frames, are split
    assert not (sids["train"] & sids["val"]) and not (sids["train"] & sids["test"])
    assert sids["train"] | sids["val"] | sids["test"] == set(range(NUM_SYSTEMS))
    assert manifest["dropped_frames"] == 0


def test_emt_energies_are_oc20_adsorption_energies(emt_dataset):
    """E_EMT(frame) - y = E(relaxed clean slab) + sum of gas references, for every frame of a system."""
    references = atomic_references(gas_energies())
    gas = yaml.safe_load((emt_dataset / "manifest.json").read_text())["energy"]
    assert references == pytest.approx(gas["atomic_references_eV"], abs=0)
    assert references["O"] == pytest.approx(gas["gas_energies_eV"]["H2O"] - gas["gas_energies_eV"]["H2"])
    dataset = s2ef(emt_dataset, "train")
    data = dataset[0]
    spec = draw_spec(data.sid, system_rng(0, data.sid), list(METALS), list(ADSORBATES))
    _, clean_energy = relaxed_clean_slab(spec.slab)
    adsorbate = [chemical_symbols[z] for z in data.atomic_numbers[data.tags == 2].tolist()]
    assert sorted(adsorbate) == sorted(symbol for symbol, _ in ADSORBATES[spec.adsorbate])
    offset = clean_energy + reference_energy(adsorbate, references)
    for data in (d for d in dataset if d.sid == spec.sid):
        atoms = emt_atoms(data)
        # float32 positions shift EMT energies by ~1e-5 eV and forces by ~1e-4 eV/A
        assert atoms.get_potential_energy() - data.energy == pytest.approx(offset, abs=2e-4)
        np.testing.assert_allclose(atoms.get_forces(), data.forces.numpy(), atol=2e-3)


def test_emt_frames_per_system(emt_dataset):
    """fids are 0..k-1 per system: >= 2 relaxation, 8 MD and 4 rattled frames, at most 41 + 1 + 12."""
    for split in SPLITS:
        per_system = {}
        for data in s2ef(emt_dataset, split):
            per_system.setdefault(data.sid, []).append(data.fid)
        for fids in per_system.values():
            assert fids == list(range(len(fids))) and 13 <= len(fids) <= 54


def test_metadata_natoms(emt_dataset):
    for task in ("s2ef", "is2re"):
        for split in SPLITS:
            folder = emt_dataset / task / split
            natoms = np.load(folder / "metadata.npz")["natoms"]
            dataset = LmdbDataset({"src": str(folder)})
            assert np.issubdtype(natoms.dtype, np.integer)
            assert natoms.tolist() == [data.natoms for data in dataset]
            assert dataset.get_metadata("natoms", 0) == dataset[0].natoms  # fairchem reads it


# ---------------------------------------------------------------------------------------------
# EMT IS2RE / IS2RS
# ---------------------------------------------------------------------------------------------


def test_is2re_records(emt_dataset):
    manifest = yaml.safe_load((emt_dataset / "manifest.json").read_text())
    total = 0
    for split in SPLITS:
        dataset = LmdbDataset({"src": str(emt_dataset / "is2re" / split)})
        total += len(dataset)
        for data in dataset:
            assert data.pos_relaxed.shape == data.pos.shape and data.pos_relaxed.dtype == torch.float32
            assert isinstance(data.y_init, float) and isinstance(data.y_relaxed, float)
            assert data.y_relaxed <= data.y_init
            moved = (data.pos_relaxed - data.pos).norm(dim=1)
            fixed = data.fixed.bool()
            assert moved[fixed].max() < 1e-5  # fixed atoms stay
            assert moved[data.tags == 2].max() > 0.01  # the adsorbate relaxes from its jittered start
            initial, relaxed = emt_atoms(data), emt_atoms(data)
            relaxed.positions = data.pos_relaxed.double().numpy()
            relaxed.set_constraint(FixAtoms(mask=fixed.numpy()))
            assert np.linalg.norm(relaxed.get_forces(), axis=1).max() < 0.06  # converged to fmax 0.05
            offset = initial.get_potential_energy() - data.y_init
            assert relaxed.get_potential_energy() - data.y_relaxed == pytest.approx(offset, abs=2e-4)
            # the relaxed energy is the last relaxation frame of the same system in S2EF
            frames = [d for d in s2ef(emt_dataset, split) if d.sid == data.sid]
            assert any(abs(d.energy - data.y_relaxed) < 1e-12 for d in frames)
    assert total + manifest["is2re_excluded_systems"] == NUM_SYSTEMS


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_across_processes_and_workers(emt_dataset, cli_emt_dataset):
    cli_out, _ = cli_emt_dataset
    ours, theirs = raw_values(emt_dataset), raw_values(cli_out)
    counts = yaml.safe_load((emt_dataset / "manifest.json").read_text())["counts"]
    assert len(ours) == sum(counts.values()) + len(counts)  # entries plus one `length` per LMDB
    assert ours == theirs

    # every file, LMDBs, metadata, references and manifest included; dataset.yml names its own path
    def files(root: Path) -> dict[str, bytes]:
        paths = [path for path in sorted(root.rglob("*")) if path.is_file() and path.name != "dataset.yml"]
        return {str(path.relative_to(root)): path.read_bytes() for path in paths}

    assert len(files(emt_dataset)) == 2 * len(counts) + 3
    assert files(emt_dataset) == files(cli_out)


def test_different_seed_gives_different_data(emt_dataset, tmp_path):
    other = build_emt_dataset(tmp_path / "seed1", seed=1, num_systems=3, workers=1, progress=False).out
    energies = {d.energy for split in SPLITS for d in s2ef(emt_dataset, split)}
    other_energies = {d.energy for split in SPLITS for d in s2ef(other, split)}
    assert len(other_energies) > 30 and not energies & other_energies

    def records(root: Path) -> set[bytes]:
        return {value for key, value in raw_values(root).items() if not key.endswith("/length")}

    assert not records(emt_dataset) & records(other)


def test_first_sid_offsets_ids_only(emt_dataset, tmp_path):
    """Separately built test sets get disjoint system ids; nothing else changes."""
    shifted = build_emt_dataset(
        tmp_path / "shifted", seed=0, num_systems=NUM_SYSTEMS, workers=1, progress=False, first_sid=1000
    ).out
    for split in SPLITS:
        base, moved = list(s2ef(emt_dataset, split)), list(s2ef(shifted, split))
        assert [int(d.sid) + 1000 for d in base] == [int(d.sid) for d in moved]
        assert [float(d.energy) for d in base] == [float(d.energy) for d in moved]
    with pytest.raises(DataBuildError, match="first-sid"):
        build_emt_dataset(tmp_path / "bad", seed=0, num_systems=2, progress=False, first_sid=-1)


def test_split_assignment_is_seeded_and_sized():
    a = assign_splits(20, 0.1, 0.2, seed=3)
    assert a == assign_splits(20, 0.1, 0.2, seed=3) != assign_splits(20, 0.1, 0.2, seed=4)
    assert (a.count("train"), a.count("val"), a.count("test")) == (14, 2, 4)
    assert assign_splits(3, 0.1, 0.1, seed=0).count("train") == 1
    with pytest.raises(DataBuildError, match="need at least 3"):
        assign_splits(2, 0.1, 0.1, seed=0)
    # fractions summing to 1: a held-out set without train
    assert assign_splits(12, 0.0, 1.0, seed=0) == ["test"] * 12
    assert sorted(assign_splits(5, 0.5, 0.5, seed=0)) == ["test"] * 3 + ["val"] * 2


# ---------------------------------------------------------------------------------------------
# Normalizers and linear references
# ---------------------------------------------------------------------------------------------


def test_references_load_through_fairchem_config_loaders(emt_dataset):
    config = yaml.safe_load((emt_dataset / "dataset.yml").read_text())["dataset"]
    transforms = config["train"]["transforms"]
    assert Path(transforms["element_references"]["file"]) == emt_dataset / "element_references.pt"
    assert Path(transforms["normalizer"]["file"]) == emt_dataset / "normalizers.pt"
    assert config["train"]["key_mapping"] == KEY_MAPPING and config["val"]["format"] == "lmdb"
    assert all(Path(config[split]["src"]) == emt_dataset / "s2ef" / split for split in SPLITS)

    # exactly what fairchem's trainer does with the train dataset's transforms
    references = load_references_from_config(dict(transforms["element_references"]), dataset=None)
    normalizers = load_normalizers_from_config(
        dict(transforms["normalizer"]), dataset=None, element_references=references
    )
    assert set(references) == {"energy"} and set(normalizers) == {"energy", "forces"}

    train = list(s2ef(emt_dataset, "train"))
    coefficients = references["energy"].element_references.double()
    assert coefficients.shape == (119,)
    # an independent least-squares fit of energy against element counts gives the same coefficients
    elements = sorted({int(z) for d in train for z in d.atomic_numbers})
    counts = np.array([[int((d.atomic_numbers == z).sum()) for z in elements] for d in train], dtype=float)
    raw = np.array([d.energy for d in train])
    expected = np.linalg.lstsq(counts, raw, rcond=None)[0]
    np.testing.assert_allclose(coefficients[elements].numpy(), expected, atol=1e-4)
    assert coefficients[[z for z in range(119) if z not in elements]].abs().max() == 0
    referenced = raw - counts @ coefficients[elements].numpy()
    assert (referenced**2).sum() <= (raw**2).sum()

    energy, forces = normalizers["energy"], normalizers["forces"]
    assert float(energy.mean) == pytest.approx(referenced.mean(), abs=1e-4)
    # one scale for energy and forces (forces = -dE/dpos in eV/A when the model's are in its units)
    assert float(energy.rmsd) == float(forces.rmsd)
    # fairchem's forces rmsd is the RMS of the per-atom force norms (sum over [N, 3] / (N - 1))
    per_atom = torch.cat([d.forces for d in train]).double()
    assert float(forces.mean) == 0.0
    expected_rmsd = (per_atom.pow(2).sum() / (len(per_atom) - 1)).sqrt()
    assert float(forces.rmsd) == pytest.approx(float(expected_rmsd), rel=1e-5)
    assert 0.1 < float(forces.rmsd) < 5.0 and 0.01 < float(energy.rmsd) < 5.0


def test_stock_fairchem_trains_on_the_dataset_config(emt_dataset, tmp_path):
    """``dataset.yml`` as the config's dataset section: fairchem's trainer reads the LMDBs (with
    ``load_balancing: atoms``), loads both files and trains."""
    dataset = yaml.safe_load((emt_dataset / "dataset.yml").read_text())["dataset"]
    model = {"name": "fairchem_equiformers.EquiformerV2", **TINY_V2}
    config = s2ef_config(
        dataset, model, batch_size=8, eval_batch_size=8, eval_every=4, load_balancing="atoms"
    )
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    fairchem = str(Path(sys.executable).parent / "fairchem")
    args = ["--mode", "train", "--config-yml", "config.yml", "--run-dir", ".", "--cpu", "--identifier", "d"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([fairchem, *args], capture_output=True, text=True, cwd=tmp_path, env=env)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "Loaded element_references for the following targets: ['energy']" in log
    assert "Loaded normalizers for the following targets: ['energy', 'forces']" in log
    normalizers = torch.load(emt_dataset / "normalizers.pt")
    logged = re.search(r"Normalization values for output forces: mean=(\S+), rmsd=(\S+)\.", log)
    assert float(logged.group(2)) == pytest.approx(float(normalizers["forces"].rmsd))
    assert np.isfinite(float(re.findall(r"forces_mae: ([0-9.eE+-]+)", log)[-1]))
    assert list(tmp_path.glob("checkpoints/*/checkpoint.pt"))


# ---------------------------------------------------------------------------------------------
# User data
# ---------------------------------------------------------------------------------------------


TRUE_REFERENCES = {29: -3.5, 8: -4.0, 1: -2.0}  # eV per atom: made-up total-energy labels


def labelled_frames(count: int) -> list[Atoms]:
    """Cu(100) slabs of three sizes with O, H or OH, and one H2O without a cell, labelled with
    ``sum(TRUE_REFERENCES[Z]) + N(0, 0.01)`` eV and random forces (eV/A)."""
    rng = np.random.default_rng(0)
    frames = []
    for i in range(count):
        if i == count - 1:
            atoms = molecule("H2O")
        else:
            atoms = fcc100("Cu", size=[(2, 2, 2), (2, 2, 3), (3, 3, 2)][i % 3], vacuum=6.0)
            adsorbate = ["O", "H", "OH"][(i // 3) % 3]
            add_adsorbate(atoms, molecule(adsorbate) if len(adsorbate) > 1 else adsorbate, 1.5, "hollow")
            atoms.pbc = True
            atoms.rattle(0.05, seed=i)
            del atoms.info["adsorbate_info"]  # a dict extxyz cannot store
        energy = sum(TRUE_REFERENCES[z] for z in atoms.numbers) + rng.normal(0.0, 0.01)
        forces = rng.normal(0.0, 0.5, size=(len(atoms), 3))
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        frames.append(atoms)
    return frames


def test_convert_extxyz(tmp_path):
    source = tmp_path / "mine.extxyz"
    ase.io.write(source, labelled_frames(20))
    frames = ase.io.read(source, ":")  # what the file holds (extxyz rounds the forces)
    report = convert_user_data(
        source, tmp_path / "mine", split_by="frame", val_fraction=0.1, test_fraction=0.2, progress=False
    )
    assert report.counts == {"s2ef/train": 14, "s2ef/val": 2, "s2ef/test": 4}
    expected_split = assign_splits(20, 0.1, 0.2, seed=0)
    seen = set()
    for split in SPLITS:
        for data in s2ef(tmp_path / "mine", split):
            original = frames[data.sid]
            assert expected_split[data.sid] == split and data.fid == 0
            assert data.energy == original.get_potential_energy()  # stored as given, unreferenced
            np.testing.assert_array_equal(data.forces.numpy(), original.get_forces().astype(np.float32))
            np.testing.assert_array_equal(data.atomic_numbers.numpy(), original.numbers)
            if original.pbc.any():
                np.testing.assert_allclose(data.cell[0].numpy(), original.cell[:], atol=1e-6)
            else:  # the molecule is centred in a periodic box with 20 A of vacuum
                assert np.diag(data.cell[0].numpy()).min() >= 40.0
                np.testing.assert_allclose(
                    torch.cdist(data.pos, data.pos).numpy(), original.get_all_distances(), atol=1e-5
                )
            seen.add(data.sid)
    assert seen == set(range(20))
    # fitted on the train split, the linear reference recovers the per-element energies ...
    references = load_references_from_config({"file": str(report.files["element_references"])}, dataset=None)
    coefficients = references["energy"].element_references.double()
    for z, value in TRUE_REFERENCES.items():
        assert float(coefficients[z]) == pytest.approx(value, abs=0.02)
    # ... and removes all but the noise from the total energies' spread
    train = list(s2ef(tmp_path / "mine", "train"))
    raw = torch.tensor([d.energy for d in train], dtype=torch.float64)
    referenced = raw - torch.stack([coefficients[d.atomic_numbers.long()].sum() for d in train])
    assert raw.std() > 10.0 and referenced.std() < 0.02


def test_convert_ase_db_keeps_constraints(tmp_path):
    source = tmp_path / "mine.db"
    with connect(source) as db:
        for atoms in labelled_frames(5)[:-1]:
            atoms.set_constraint(FixAtoms(indices=[0, 1]))
            db.write(atoms)
    out = tmp_path / "mine"
    report = convert_user_data(
        source, out, split_by="frame", val_fraction=0, test_fraction=0.25, progress=False
    )
    assert report.counts == {"s2ef/train": 3, "s2ef/test": 1}
    assert not (out / "s2ef" / "val").exists()
    assert "val" not in yaml.safe_load((out / "dataset.yml").read_text())["dataset"]
    rows = list(connect(source).select())
    for data in s2ef(out, "train"):
        assert data.fixed.tolist() == [1, 1] + [0] * (data.natoms - 2)
        assert data.energy == rows[data.sid].energy


def test_convert_with_info_keys_and_overwrite(tmp_path):
    frames = labelled_frames(5)
    for atoms in frames:
        atoms.info["REF_energy"] = atoms.get_potential_energy() + 1.0
        atoms.arrays["REF_forces"] = atoms.get_forces() * 2
        atoms.calc = None
    source = tmp_path / "keys.extxyz"
    ase.io.write(source, frames)
    frames = ase.io.read(source, ":")
    out = tmp_path / "keys"
    with pytest.raises(DataBuildError, match="frame 0 has no energy and forces"):
        convert_user_data(source, out, split_by="frame", progress=False)
    assert not out.exists()
    keys = {"energy_key": "REF_energy", "forces_key": "REF_forces", "split_by": "frame"}
    report = convert_user_data(source, out, **keys, progress=False)
    assert sum(report.counts.values()) == 5
    for data in s2ef(out, "train"):
        expected = frames[data.sid].arrays["REF_forces"].astype(np.float32)
        np.testing.assert_array_equal(data.forces.numpy(), expected)
        assert data.energy == frames[data.sid].info["REF_energy"]
    with pytest.raises(DataBuildError, match="already exists"):
        convert_user_data(source, out, **keys, progress=False)
    convert_user_data(source, out, **keys, seed=1, overwrite=True, progress=False)
    assert yaml.safe_load((out / "manifest.json").read_text())["seed"] == 1


def test_held_out_set_has_no_train_split_and_no_references(tmp_path, capsys):
    source = tmp_path / "ood.extxyz"
    ase.io.write(source, labelled_frames(4))
    out = tmp_path / "ood"
    args = ["--val-fraction", "0", "--test-fraction", "1"]
    assert main(["convert", "--input", str(source), "--out", str(out), *args]) == 0
    assert "no train split: no element_references.pt/normalizers.pt" in capsys.readouterr().out
    assert sorted(path.name for path in out.iterdir()) == ["dataset.yml", "manifest.json", "s2ef"]
    assert [path.name for path in (out / "s2ef").iterdir()] == ["test"]
    assert len(s2ef(out, "test")) == 4
    section = yaml.safe_load((out / "dataset.yml").read_text())["dataset"]
    assert list(section) == ["test"] and Path(section["test"]["src"]) == out / "s2ef" / "test"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_emt_prints_outputs_and_counts(cli_emt_dataset):
    out, result = cli_emt_dataset
    counts = yaml.safe_load((out / "manifest.json").read_text())["counts"]
    for name, count in counts.items():
        line = next(line for line in result.stdout.splitlines() if line.split()[:1] == [name])
        assert line.split()[1] == str(count) and line.split()[-1] == str(out / name)
    assert f"normalizers         {out / 'normalizers.pt'}" in result.stdout
    assert "dropped 0 frame(s)" in result.stdout


def test_cli_errors_are_one_line_messages(tmp_path):
    unlabelled = tmp_path / "unlabelled.extxyz"
    ase.io.write(unlabelled, Atoms("Cu2", positions=[(0, 0, 0), (0, 0, 2.5)], cell=[5, 5, 5], pbc=True))
    unknown = tmp_path / "unknown.extxyz"
    unknown.write_text("1\nProperties=species:S:1:pos:R:3:forces:R:3 energy=1.0\nXx 0 0 0 0 0 0\n")
    good = tmp_path / "good.extxyz"
    ase.io.write(good, labelled_frames(5))
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    missing = tmp_path / "missing.xyz"
    cases = {
        "input file not found: ": ["convert", "--input", str(missing), "--out", str(tmp_path / "a")],
        "has no energy and forces": ["convert", "--input", str(unlabelled), "--out", str(tmp_path / "b")],
        "already exists (pass --overwrite": ["convert", "--input", str(good), "--out", str(existing)],
        "unknown element 'Xx'": ["convert", "--input", str(unknown), "--out", str(tmp_path / "c")],
    }
    running = {message: subprocess.Popen([str(CLI), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True) for message, args in cases.items()}  # fmt: skip
    for message, process in running.items():
        stdout, stderr = process.communicate()
        assert process.returncode == 1, (message, stderr)
        assert message in stderr and "Traceback" not in stderr, stderr
        assert stderr.startswith("fairchem-equiformers-data: error: ") and stdout == ""
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    assert (existing / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".*staging*"))


def test_cli_refuses_to_overwrite_a_foreign_folder(tmp_path, capsys):
    good = tmp_path / "good.extxyz"
    ase.io.write(good, labelled_frames(3))
    assert main(["convert", "--input", str(good), "--out", str(tmp_path / "w"), "--split-by", "frame"]) == 1
    error = capsys.readouterr().err
    assert "3 frames give 1 training frame; fitting the references needs at least 2" in error
    ase.io.write(good, labelled_frames(5))
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    assert main(["convert", "--input", str(good), "--out", str(existing), "--overwrite"]) == 1
    assert "refusing to replace" in capsys.readouterr().err
    assert main(["convert", "--input", str(good), "--out", str(tmp_path / "x"), "--val-fraction", "0.6",
                 "--test-fraction", "0.5"]) == 1  # fmt: skip
    assert "--val-fraction + --test-fraction must not exceed 1, got 1.1" in capsys.readouterr().err
    assert main(["emt", "--out", str(tmp_path / "y"), "--adsorbates", "OOH"]) == 1
    error = capsys.readouterr().err
    assert "unknown adsorbate(s) for EMT: OOH; choose from O, H, N, C, OH, CO, NH, CH, NO" in error
    assert main(["emt", "--out", str(tmp_path / "y"), "--metals", "Cu,Fe"]) == 1
    assert "unknown metal(s) for EMT: Fe; choose from Al, Cu, Ag, Au, Ni, Pd, Pt" in capsys.readouterr().err
    assert main(["convert", "--input", str(good), "--out", str(tmp_path / "z"), "--split-by", "frame"]) == 0
    stdout = capsys.readouterr().out
    assert "s2ef/train" in stdout
    assert f"element_references  {tmp_path / 'z' / 'element_references.pt'}" in stdout
