"""MD17-style molecular data: GFN2-xTB (tblite) molecular dynamics, deterministic, labelled
consistently with tblite, and written as LMDBs that fairchem's ``lmdb`` dataset reads."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from ase.neighborlist import NeighborList, natural_cutoffs
from fairchem.core.datasets import LmdbDataset
from scipy.sparse.csgraph import connected_components

from fairchem_equiformers.data import DataBuildError
from fairchem_equiformers.data.cli import main
from fairchem_equiformers.data.molecules import build_md17_dataset, md17_splits, md_frames


def tblite_labels(frames) -> tuple[np.ndarray, np.ndarray]:
    """Energies [F] and forces [F, N, 3] of ``frames`` from tblite's own ASE calculator, in a fresh
    interpreter that loads tblite before torch (see data/molecules.py)."""
    script = textwrap.dedent(
        """
        import pickle, sys
        from tblite.ase import TBLite
        from ase import Atoms
        numbers, positions = pickle.load(sys.stdin.buffer)
        energies, forces = [], []
        for p in positions:
            atoms = Atoms(numbers, positions=p)
            atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
            energies.append(atoms.get_potential_energy())
            forces.append(atoms.get_forces())
        pickle.dump((energies, forces), sys.stdout.buffer)
        """
    )
    payload = pickle.dumps((frames[0].numbers, [f.positions for f in frames]))
    result = subprocess.run([sys.executable, "-c", script], input=payload, capture_output=True, check=True)
    energies, forces = pickle.loads(result.stdout)
    return np.array(energies), np.array(forces)


@pytest.fixture(scope="module")
def ethanol_frames():
    return md_frames("ethanol", 12, seed=3, stride=4)


def test_frames_are_deterministic_and_the_seed_matters(ethanol_frames):
    again = md_frames("ethanol", 12, seed=3, stride=4)
    other = md_frames("ethanol", 12, seed=4, stride=4)
    for a, b in zip(ethanol_frames, again):
        assert np.array_equal(a.positions, b.positions)
        assert a.get_potential_energy() == b.get_potential_energy()
        assert np.array_equal(a.get_forces(), b.get_forces())
    assert not np.allclose(ethanol_frames[-1].positions, other[-1].positions, atol=1e-3)


def test_labels_are_tblite_gfn2_energies_and_forces(ethanol_frames):
    frames = ethanol_frames[::4]
    energies, forces = tblite_labels(frames)
    # the MD's calculator starts each SCF from the previous frame's solution, a fresh one from
    # scratch: they agree to tblite's default SCF convergence (measured 1.0e-8 eV, 7.6e-5 eV/A)
    np.testing.assert_allclose([f.get_potential_energy() for f in frames], energies, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.array([f.get_forces() for f in frames]), forces, rtol=0, atol=3e-4)


def test_frames_are_a_500k_trajectory_of_an_intact_molecule(ethanol_frames):
    """Non-periodic frames that move (thermal motion of ~0.1 A), keep the molecule in one piece and
    have forces of the size of MD17's (about 1 eV/A at 500 K)."""
    first = ethanol_frames[0]
    assert first.get_chemical_formula() == "C2H6O" and not first.pbc.any()
    steps = [np.abs(b.positions - a.positions).max() for a, b in zip(ethanol_frames, ethanol_frames[1:])]
    assert 0.01 < min(steps) and max(steps) < 0.5
    for atoms in ethanol_frames:
        neighbours = NeighborList(natural_cutoffs(atoms), self_interaction=False, bothways=True)
        neighbours.update(atoms)
        assert connected_components(neighbours.get_connectivity_matrix())[0] == 1
    mean_force = np.mean([np.abs(a.get_forces()).mean() for a in ethanol_frames])
    print(f"ethanol at 500 K: mean |force component| {mean_force:.3f} eV/A")
    assert 0.2 < mean_force < 3.0


@pytest.mark.parametrize("name,formula", [("malonaldehyde", "C3H4O2"), ("aspirin", "C9H8O4")])
def test_built_in_molecules(name, formula):
    (frame,) = md_frames(name, 1, seed=0, stride=2)
    assert frame.get_chemical_formula() == formula
    distances = frame.get_all_distances()[np.triu_indices(len(frame), 1)]
    assert distances.min() > 0.85
    neighbours = NeighborList(natural_cutoffs(frame), self_interaction=False, bothways=True)
    neighbours.update(frame)
    assert connected_components(neighbours.get_connectivity_matrix())[0] == 1


def test_md17_split_style():
    split = md17_splits(100, train_size=60, val_size=10, seed=0)
    assert (split.count("train"), split.count("val"), split.count("test")) == (60, 10, 30)
    assert split == md17_splits(100, train_size=60, val_size=10, seed=0)
    assert split != md17_splits(100, train_size=60, val_size=10, seed=1)


def test_dataset_is_deterministic_and_read_by_fairchem(tmp_path, capsys):
    out = tmp_path / "ethanol"
    argv = ["md17", "--molecule", "ethanol", "--out", str(out), "--num-frames", "16"]
    assert main([*argv, "--train-size", "10", "--val-size", "2", "--stride", "3", "--seed", "5"]) == 0
    assert "s2ef/train" in capsys.readouterr().out
    frames = md_frames("ethanol", 16, seed=5, stride=3)
    split = md17_splits(16, train_size=10, val_size=2, seed=5)
    for name, size in (("train", 10), ("val", 2), ("test", 4)):
        dataset = LmdbDataset(
            {"src": str(out / "s2ef" / name), "key_mapping": {"y": "energy", "force": "forces"}}
        )
        assert len(dataset) == size
        indices = [i for i in range(16) if split[i] == name]
        for data, index in zip(dataset, indices):
            atoms = frames[index]
            assert data.sid == index
            assert data.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
            np.testing.assert_allclose(data.forces.numpy(), atoms.get_forces(), atol=1e-5)
            assert int(data.natoms) == 9
    assert (out / "normalizers.pt").is_file() and (out / "dataset.yml").is_file()

    again = build_md17_dataset(
        tmp_path / "again", molecule_name="ethanol", num_frames=16, train_size=10, val_size=2,
        stride=3, seed=5, progress=False,
    )  # fmt: skip
    for name in ("train", "val", "test"):
        path = f"s2ef/{name}/data.lmdb"
        assert (out / path).read_bytes() == (again.out / path).read_bytes()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"molecule_name": "caffeine"}, "unknown molecule 'caffeine'; choose from"),
        ({"molecule_name": "ethanol", "num_frames": 10, "train_size": 10}, "10 frames cannot hold 10 train"),
    ],
)
def test_bad_requests_are_clear_errors(tmp_path, kwargs, message):
    with pytest.raises(DataBuildError, match=message):
        build_md17_dataset(tmp_path / "out", **kwargs)
    with pytest.raises(DataBuildError, match="num_frames"):
        md_frames("ethanol", 0, seed=0)
