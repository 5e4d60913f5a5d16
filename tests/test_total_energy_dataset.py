"""``fairchem_equiformers.OC20TotalEnergyLmdbDataset`` on a tiny S2EF-style LMDB it writes: ``energy``
is ``y`` plus the system's reference from oc20_ref.pkl, a record's own ``energy`` is kept, ``y`` goes."""

from __future__ import annotations

import pickle

import lmdb
import pytest
import torch
from fairchem.core.common.registry import registry
from fairchem.core.datasets import create_dataset
from torch_geometric.data import Data

import fairchem_equiformers  # noqa: F401  (registers the dataset)

REFS = {"random7": -300.5, "random9": -12.25}


def s2ef_record(sid: int, y: float, **extra) -> Data:
    return Data(
        pos=torch.rand(3, 3),
        cell=torch.eye(3).unsqueeze(0) * 5,
        atomic_numbers=torch.tensor([1.0, 8.0, 1.0]),
        natoms=3, fixed=torch.zeros(3), tags=torch.ones(3), force=torch.rand(3, 3), y=y, sid=sid, fid=0,
        **extra,
    )  # fmt: skip


@pytest.fixture
def tiny_lmdb(tmp_path):
    folder = tmp_path / "s2ef"
    folder.mkdir()
    records = [s2ef_record(7, -1.5), s2ef_record(9, 0.75), s2ef_record(7, 2.0, energy=-123.0)]
    env = lmdb.open(str(folder / "data.0000.lmdb"), subdir=False, map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, record in enumerate(records):
            txn.put(f"{i}".encode("ascii"), pickle.dumps(record, protocol=-1))
    env.close()
    refs = tmp_path / "oc20_ref.pkl"
    refs.write_bytes(pickle.dumps(REFS))
    return folder, refs


def test_total_energies(tiny_lmdb):
    folder, refs = tiny_lmdb
    config = {
        "format": "fairchem_equiformers.OC20TotalEnergyLmdbDataset",
        "src": str(folder),
        "oc20_ref": str(refs),
        "key_mapping": {"force": "forces"},
    }
    cls = registry.get_dataset_class(config["format"])
    via_format = create_dataset(config, "train").dataset  # fairchem's `format:` path
    assert isinstance(via_format, cls)
    via_format.__del__()  # an LMDB file opens once per process
    dataset = cls(config)
    energies = [float(dataset[i].energy) for i in range(len(dataset))]
    assert energies == pytest.approx([-1.5 - 300.5, 0.75 - 12.25, -123.0])
    for i in range(len(dataset)):
        assert "y" not in dataset[i] and "force" not in dataset[i]
        assert dataset[i].forces.shape == (3, 3)


def test_missing_reference_and_y_mapping_fail(tiny_lmdb, tmp_path):
    folder, _ = tiny_lmdb
    refs = tmp_path / "other_ref.pkl"
    refs.write_bytes(pickle.dumps({"random9": 0.0}))
    config = {
        "format": "fairchem_equiformers.OC20TotalEnergyLmdbDataset",
        "src": str(folder),
        "oc20_ref": str(refs),
    }
    with pytest.raises(KeyError, match="random7"):
        registry.get_dataset_class(config["format"])(config)[0]
    with pytest.raises(ValueError, match="key_mapping"):
        create_dataset(config | {"key_mapping": {"y": "energy"}}, "train")
    with pytest.raises(ValueError, match="oc20_ref"):
        create_dataset({"format": config["format"], "src": str(folder)}, "train")
