"""Using trained checkpoints: fairchem predict/validate with no train set, and ASE through
fairchem's OCPCalculator (relaxation and NVE molecular dynamics)."""

from __future__ import annotations

import numpy as np
import pytest
from ase import units
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet
from ase.optimize import FIRE

from .conftest import TINY_V2, cli_config, slab_with_adsorbate
from .test_registry_and_cli import run_fairchem

MODEL = {"name": "fairchem_equiformers.EquiformerV2", **TINY_V2, "num_layers": 1}


@pytest.fixture(scope="module")
def trained_checkpoint(emt_database, tmp_path_factory):
    """A full training checkpoint (optimizer, scheduler, EMA) from the plugin's trainer."""
    run_dir = tmp_path_factory.mktemp("train")
    config = cli_config(
        emt_database,
        MODEL,
        max_epochs=3,
        eval_every=4,
        ema_decay=0.5,  # 12 steps: 0.9 would leave 28% of the random initialisation in the EMA weights,
        # which OCPCalculator predicts with
        lr_initial=2e-3,
        scheduler="LambdaLR",
        scheduler_params={
            "lambda_type": "cosine",
            "warmup_epochs": 0.3,
            "warmup_factor": 0.2,
            "lr_min_factor": 0.01,
        },
    )
    config["trainer"] = "fairchem_equiformers.ForcesTrainer"
    run_fairchem(config, run_dir, "--mode", "train", "--identifier", "trained")
    (checkpoint,) = run_dir.glob("checkpoints/*/checkpoint.pt")
    return checkpoint


def test_predict_and_validate_without_train_set_from_full_checkpoint(
    emt_database, trained_checkpoint, tmp_path
):
    """The host's equiformerv2_forces trainer fails here ('NoneType' has no attribute 'scheduler')."""
    config = cli_config(emt_database, MODEL)
    config["trainer"] = "fairchem_equiformers.ForcesTrainer"
    dataset = config["dataset"].pop("train")
    config["dataset"] = {"test": dataset, "val": dataset}
    run_fairchem(
        config, tmp_path, "--mode", "predict", "--checkpoint", str(trained_checkpoint), "--identifier", "p"
    )
    (predictions,) = tmp_path.glob("results/*/s2ef_predictions.npz")
    data = np.load(predictions)
    assert data["energy"].shape == (8,) or data["energy"].shape == (8, 1)
    assert np.isfinite(data["forces"].astype(np.float64)).all()
    log = run_fairchem(config, tmp_path / "v", "--mode", "validate", "--checkpoint", str(trained_checkpoint))
    assert "forces_mae" in log


def test_ocp_calculator_relaxes_and_runs_nve(trained_checkpoint):
    from fairchem.core.common.relaxation.ase_utils import OCPCalculator

    calculator = OCPCalculator(
        checkpoint_path=str(trained_checkpoint), cpu=True, seed=0
    )  # no trainer= needed
    atoms = slab_with_adsorbate("Cu", "111", "O", seed=11)
    atoms.calc = calculator
    start_energy = atoms.get_potential_energy()
    start_fmax = np.abs(atoms.get_forces()).max()
    # FIRE needs only forces: these direct forces are not the gradient of the energy, which
    # misleads BFGS's line-search-free quadratic model on a briefly trained model
    FIRE(atoms, logfile=None).run(fmax=0.05, steps=60)
    assert atoms.get_potential_energy() < start_energy
    assert np.abs(atoms.get_forces()[atoms.get_tags() > 0]).max() < start_fmax

    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dynamics = VelocityVerlet(atoms, timestep=1.0 * units.fs, logfile=None)
    energies = []
    dynamics.attach(lambda: energies.append(atoms.get_total_energy()), interval=1)
    dynamics.run(50)
    energies = np.array(energies)
    drift = energies[-1] - energies[0]
    print(f"NVE 50 x 1 fs: total energy drift {drift:+.4f} eV ({drift / len(atoms) * 1000:+.2f} meV/atom)")
    assert np.isfinite(energies).all() and len(energies) == 51
