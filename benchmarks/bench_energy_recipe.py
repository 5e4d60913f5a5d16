"""What makes a gradient-force model's energies good on real DFT data: one controlled comparison.

The same small EquiformerV2 (gradient forces, 2 layers, lmax 2, 16 channels) trains with the
plugin's trainer on BOTNet acetylacetone (``tests/data/real``: 90 training frames of the 300 K set,
isolated-atom references, 50 held-out frames of the 300 K test set), identical except for one
ingredient per variant:

* ``one scale`` (what ``fairchem-equiformers-data`` writes now): energy and forces normalized by
  the same number (the RMS of the training forces);
* ``two scales`` (what it wrote before): the energy normalized by the std of the referenced
  energies, the forces by the force RMS. The trainer denormalizes each target with its own
  normalizer, so the returned forces are ``sigma_F / sigma_E`` times the gradient of the returned
  energy: the model is asked to fit an energy whose gradient is not the forces;
* ``energy x10``: one scale, energy loss coefficient 10 instead of 1;
* ``per-atom energy``: one scale, fairchem's ``per_atom_mae`` energy loss;
* ``fitted references``: one scale, the per-element linear fit instead of isolated atoms.

For each variant: held-out energy and force MAE (fairchem's evaluator, EMA weights) and their
ratio to predicting the training mean; and, for the two-scale variant, the ratio between the
returned forces and the energy's gradient (central differences), which the others keep at 1.

    python benchmarks/bench_energy_recipe.py [--epochs 30] [--seeds 0 1] [--variants "one scale" ...]

Single-threaded (``OMP_NUM_THREADS=1``) by default; about 80 s per variant and seed at 30 epochs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import ase.io  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from fairchem.core.common.flags import flags  # noqa: E402
from fairchem.core.common.utils import build_config, new_trainer_context  # noqa: E402
from fairchem.core.modules.normalization.normalizer import Normalizer  # noqa: E402

from fairchem_equiformers import ForcesTrainer  # noqa: E402
from fairchem_equiformers.data import convert_user_data  # noqa: E402

REAL = Path(__file__).resolve().parents[1] / "tests" / "data" / "real"
MODEL = {
    "name": "fairchem_equiformers.EquiformerV2",
    "use_pbc": True, "otf_graph": True, "max_neighbors": 50, "max_radius": 5.0, "max_num_elements": 20,
    "num_layers": 2, "sphere_channels": 16, "attn_hidden_channels": 16, "num_heads": 2,
    "attn_alpha_channels": 8, "attn_value_channels": 4, "ffn_hidden_channels": 16,
    "norm_type": "layer_norm_sh", "lmax_list": [2], "mmax_list": [1], "grid_resolution": 8,
    "edge_channels": 16, "use_grid_mlp": True, "direct_forces": False,
    "alpha_drop": 0.0, "drop_path_rate": 0.0, "proj_drop": 0.0,
}  # fmt: skip
VARIANTS = ("one scale", "two scales", "energy x10", "per-atom energy", "fitted references")


def build(out: Path, isolated: bool) -> Path:
    convert_user_data(REAL / "acac_train.xyz", out, test_inputs=[REAL / "acac_test.xyz"], split_by="frame",
                      val_fraction=0, isolated_atoms=REAL / "acac_isolated_atoms.xyz" if isolated else None,
                      progress=False)  # fmt: skip
    return out


def copy_of(dataset: Path, out: Path) -> Path:
    """A private copy of ``dataset`` (fairchem opens each LMDB once per process)."""
    import shutil

    shutil.copytree(dataset, out)
    text = (out / "dataset.yml").read_text().replace(str(dataset), str(out))
    (out / "dataset.yml").write_text(text)
    return out


def two_scales(dataset: Path, out: Path) -> Path:
    """A copy of ``dataset`` whose energy normalizer uses the referenced energies' std (the old rule)."""
    out = copy_of(dataset, out)
    references = torch.load(out / "element_references.pt", weights_only=False)["energy"].element_references
    energies = np.array([a.get_potential_energy() - float(references[a.numbers].sum())
                         for a in ase.io.read(REAL / "acac_train.xyz", ":")])  # fmt: skip
    normalizers = torch.load(out / "normalizers.pt", weights_only=False)
    normalizers["energy"] = Normalizer(mean=float(energies.mean()), rmsd=float(energies.std(ddof=1)))
    torch.save(normalizers, out / "normalizers.pt")
    return out


@contextlib.contextmanager
def trainer_for(config: dict, run_dir: Path, name: str):
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yml"
    path.write_text(yaml.safe_dump(config))
    argv = [
        "--mode",
        "train",
        "--config-yml",
        str(path),
        "--run-dir",
        str(run_dir),
        "--cpu",
        "--identifier",
        name,
    ]
    args, overrides = flags.get_parser().parse_known_args(argv)
    try:
        with new_trainer_context(config=build_config(args, overrides)) as ctx:
            yield ctx.trainer
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def config_for(dataset: Path, variant: str, epochs: int, seed: int) -> dict:
    section = yaml.safe_load((dataset / "dataset.yml").read_text())["dataset"]
    section["val"] = section.pop("test")
    energy_loss = {"fn": "per_atom_mae" if variant == "per-atom energy" else "mae",
                   "coefficient": 10 if variant == "energy x10" else 1}  # fmt: skip
    return {
        "trainer": "fairchem_equiformers.ForcesTrainer",
        "logger": {"name": "tensorboard"},
        "seed": seed,
        "dataset": section,
        "outputs": {
            "energy": {"shape": 1, "level": "system"},
            "forces": {
                "irrep_dim": 1,
                "level": "atom",
                "train_on_free_atoms": True,
                "eval_on_free_atoms": True,
            },
        },  # fmt: skip
        "loss_functions": [{"energy": energy_loss}, {"forces": {"fn": "l2mae", "coefficient": 10}}],
        "evaluation_metrics": {
            "metrics": {"energy": ["mae"], "forces": ["mae"]},
            "primary_metric": "forces_mae",
        },
        "optim": {
            "batch_size": 8,
            "eval_batch_size": 16,
            "num_workers": 0,
            "optimizer": "AdamW",
            "optimizer_params": {"weight_decay": 0.0},
            "lr_initial": 5e-3,
            "scheduler": "LambdaLR",
            "scheduler_params": {
                "lambda_type": "cosine",
                "warmup_epochs": 0.5,
                "warmup_factor": 0.2,
                "lr_min_factor": 0.01,
            },
            "max_epochs": epochs,
            "eval_every": 10**6,
            "ema_decay": 0.99,
        },  # fmt: skip
        "model": MODEL,
    }


def force_to_gradient_ratio(trainer) -> float:
    """Returned forces divided by minus the returned energy's central-difference gradient (one atom,
    one component, the first test frame), both denormalized as the trainer returns them (the
    element references, constant in the positions, are left out: float32 could not resolve a
    milli-eV change on top of -9,400 eV)."""
    from fairchem.core.datasets import data_list_collater

    frame = next(iter(trainer.val_loader)).to_data_list()[0]
    trainer.ema.store()
    trainer.ema.copy_to()
    trainer.model.eval()

    def predict(pos):
        data = frame.clone()
        data.pos = pos
        out = trainer._forward(data_list_collater([data]))
        return {
            key: trainer.normalizers[key].denorm(out[key]).detach().double() for key in ("energy", "forces")
        }

    h = 1e-3
    forces = predict(frame.pos.clone())["forces"]
    energies = []
    for sign in (1, -1):
        pos = frame.pos.clone()
        pos[0, 0] += sign * h
        energies.append(float(predict(pos)["energy"].sum()))
    trainer.ema.restore()
    return float(forces[0, 0]) / (-(energies[0] - energies[1]) / (2 * h))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="energy_recipe_"))
    isolated = build(root / "isolated", isolated=True)
    datasets = {"two scales": two_scales(isolated, root / "two_scales"),
                "fitted references": build(root / "fitted", isolated=False)}  # fmt: skip
    for variant in ("one scale", "energy x10", "per-atom energy"):
        datasets[variant] = copy_of(isolated, root / variant.replace(" ", "_"))
    train = ase.io.read(REAL / "acac_train.xyz", ":")
    test = ase.io.read(REAL / "acac_test.xyz", ":")
    mean_energy = np.mean([a.get_potential_energy() for a in train])
    baseline_energy = np.mean([abs(a.get_potential_energy() - mean_energy) for a in test])
    baseline_forces = np.mean(np.abs(np.concatenate([a.get_forces() for a in test])))
    print(f"mean predictor on the 50 test frames: energy MAE {1000 * baseline_energy:.1f} meV, "
          f"forces {1000 * baseline_forces:.1f} meV/A; {args.epochs} epochs, seeds {args.seeds}")  # fmt: skip
    print("| variant | energy MAE (meV) | force MAE (meV/A) | energy / mean predictor "
          "| forces / mean predictor | forces / -dE/dx | s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for variant in args.variants:
        results = []
        for seed in args.seeds:
            start = time.perf_counter()
            config = config_for(datasets[variant], variant, args.epochs, seed)
            # the trainer refuses two scales for gradient forces; the old rule is measured on purpose
            check = ForcesTrainer.check_gradient_scales
            if variant == "two scales":
                ForcesTrainer.check_gradient_scales = lambda self: None
            with trainer_for(config, root / "runs" / f"{variant}-{seed}".replace(" ", "_"), "run") as trainer:
                trainer.train()
                metrics = trainer.validate(split="val", disable_tqdm=True)
                ratio = force_to_gradient_ratio(trainer)
            ForcesTrainer.check_gradient_scales = check
            results.append((metrics["energy_mae"]["metric"], metrics["forces_mae"]["metric"], ratio,
                            time.perf_counter() - start))  # fmt: skip
        energy, forces, ratio, seconds = (float(np.mean(column)) for column in zip(*results))
        print(f"| {variant} | {1000 * energy:.1f} | {1000 * forces:.1f} | {energy / baseline_energy:.3f} | "
              f"{forces / baseline_forces:.3f} | {ratio:.3f} | {seconds:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
