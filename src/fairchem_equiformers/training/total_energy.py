"""OC20 S2EF LMDBs as total DFT energies (the EquiformerV3 OC20 recipe trains on total energies).

The OC20 S2EF LMDBs store ``y`` = E_DFT - E_ref, where E_ref is the per-system reference (clean
slab plus gas-phase adsorbate energies) that the Open Catalyst Project publishes as
``oc20_ref.pkl`` (a dict ``"random<sid>" -> E_ref`` in eV). This dataset returns
``energy = y + E_ref[sid]``, the total DFT energy. A record that already holds ``energy`` (LMDBs
written with total energies) keeps it; ``y`` is dropped either way, so ``energy`` is the only
energy label. Everything else is fairchem's ``lmdb`` dataset (``key_mapping``, e.g.
``force: forces``, and ``transforms``); per-element linear references and normalisation are
fairchem's ``transforms.element_references`` / ``transforms.normalizer``, which the trainer
applies to the targets and undoes on the predictions.

Why a dataset: fairchem 1.10's LMDB dataset and transforms have no per-system reference (its
``element_references`` are per element). Config: ``format:
fairchem_equiformers.OC20TotalEnergyLmdbDataset``, ``oc20_ref: <path to oc20_ref.pkl>``.
"""

from __future__ import annotations

import pickle

from fairchem.core.common.registry import registry
from fairchem.core.datasets import LmdbDataset


@registry.register_dataset("fairchem_equiformers.OC20TotalEnergyLmdbDataset")
class OC20TotalEnergyLmdbDataset(LmdbDataset):
    """fairchem's ``lmdb`` dataset with ``energy`` = total DFT energy (see the module docstring)."""

    def __new__(cls, config: dict, *args, **kwargs):
        # checked before the object exists: fairchem's __del__ would trip on a half-built dataset
        if "y" in (config.get("key_mapping") or {}):
            raise ValueError(
                "OC20TotalEnergyLmdbDataset makes `energy` from `y` itself; remove `y` from key_mapping"
            )
        if not config.get("oc20_ref"):
            raise ValueError("OC20TotalEnergyLmdbDataset needs `oc20_ref`: the path of oc20_ref.pkl")
        return super().__new__(cls)

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        with open(config["oc20_ref"], "rb") as handle:
            self.oc20_ref = pickle.load(handle)

    def __getitem__(self, idx: int):
        data = super().__getitem__(idx)
        if "energy" not in data and "y" in data:
            sid = data.sid.item() if hasattr(data.sid, "item") else data.sid
            key = f"random{sid}"
            if key not in self.oc20_ref:
                raise KeyError(f"system {key} is not in oc20_ref ({self.config['oc20_ref']})")
            data.energy = data.y + self.oc20_ref[key]
        if "y" in data:
            del data.y
        return data
