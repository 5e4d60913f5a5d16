"""The demo (the README's main job): from nothing to a trained model, its metrics, an EvalAI
submission file and a simulation, on a CPU in about four minutes (2 cores).

1. build the embedded OC20-style dataset with EMT (``fairchem-equiformers-data emt``): the
   in-distribution splits, plus three test sets with held-out adsorbates, held-out metals and
   both, standing in for OC20's ood_ads / ood_cat / ood_both;
2. train a small EquiformerV2 with the stock ``fairchem`` CLI (``configs/demo``);
3. validate the best checkpoint and compare with predicting the training mean;
4. predict the four test splits and merge them into an EvalAI S2EF submission file;
5. relax a slab with fairchem's ``OCPCalculator`` and run 50 steps of NVE MD (energy drift).

    python -m fairchem_equiformers.tools.demo [--run-dir runs/demo] [--max-epochs N]
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CONFIG = Path("configs/demo/equiformer_v2_emt.yml")
# in-distribution metals/adsorbates, and the held-out ones of the ood test sets
METALS, OOD_METALS = "Cu,Ag,Pd,Ni", "Pt,Au"
ADSORBATES, OOD_ADSORBATES = "O,H,C,OH,CO,CH", "N,NH,NO"
OOD_SPLITS = {
    "ood_ads": (METALS, OOD_ADSORBATES),
    "ood_cat": (OOD_METALS, ADSORBATES),
    "ood_both": (OOD_METALS, OOD_ADSORBATES),
}


def tool(name: str) -> str:
    """A console script of this environment."""
    return str(Path(sys.executable).parent / name)


def run(cmd: list[str], log: Path) -> str:
    """Run ``cmd``, keep its output in ``log``; on failure show the end of it."""
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    output = result.stdout + result.stderr
    log.write_text(output)
    if result.returncode != 0:
        raise SystemExit(f"command failed ({' '.join(cmd)}); end of {log}:\n{output[-3000:]}")
    print(f"   done in {time.perf_counter() - start:.0f} s (log: {log})")
    return output


def last_metrics(log: str) -> dict[str, float]:
    """The last value fairchem logged for each ``<name>: <number>`` metric."""
    return {
        k: float(v)
        for k, v in re.findall(r"(energy_mae|forces_mae|forces_cosine_similarity): ([-0-9.e+]+)", log)
    }


def mean_predictor_maes(data: Path) -> dict[str, float]:
    """MAE on the val split of predicting the train mean (energy, and each force component on
    free atoms), in the units fairchem reports (eV, eV/A)."""
    from fairchem_equiformers.data.references import s2ef_dataset

    def arrays(split):
        dataset = s2ef_dataset(data / "s2ef" / split)
        energies = np.array([float(d.energy) for d in dataset])
        forces = np.concatenate([d.forces[d.fixed == 0].numpy() for d in dataset])
        return energies, forces

    train_e, train_f = arrays("train")
    val_e, val_f = arrays("val")
    return {
        "energy_mae": float(np.abs(val_e - train_e.mean()).mean()),
        "forces_mae": float(np.abs(val_f - train_f.mean(axis=0)).mean()),
    }


def build_data(data: Path, logs: Path) -> dict[str, Path]:
    """The dataset and the three ood test sets; returns the four test splits."""
    if not (data / "manifest.json").exists():
        print(f"1. building the embedded EMT dataset in {data}")
        cmd = [
            tool("fairchem-equiformers-data"),
            "emt",
            "--out",
            str(data),
            "--seed",
            "0",
            "--num-systems",
            "100",
        ]
        run([*cmd, "--metals", METALS, "--adsorbates", ADSORBATES], logs / "data.log")
    tests = {"id": data / "s2ef" / "test"}
    for index, (split, (metals, adsorbates)) in enumerate(OOD_SPLITS.items(), start=1):
        out = data.parent / f"data_{split}"
        if not (out / "manifest.json").exists():
            print(f"1. building the {split} test set in {out}")
            cmd = [
                tool("fairchem-equiformers-data"),
                "emt",
                "--out",
                str(out),
                "--seed",
                "1",
                "--num-systems",
                "12",
            ]
            cmd += ["--first-sid", str(100_000 * index), "--metals", metals, "--adsorbates", adsorbates]
            run([*cmd, "--val-fraction", "0", "--test-fraction", "1"], logs / f"data_{split}.log")
        tests[split] = out / "s2ef" / "test"
    return tests


def fairchem(mode: str, run_dir: Path, identifier: str, logs: Path, *extra: str) -> str:
    cmd = [tool("fairchem"), "--mode", mode, "--config-yml", str(CONFIG), "--run-dir", str(run_dir),
           "--cpu", "--timestamp-id", identifier, *extra]  # fmt: skip
    return run(cmd, logs / f"{identifier}.log")


def simulate(checkpoint: Path) -> dict[str, float]:
    """Relax a Cu(111)+O slab with the trained model, then 50 x 1 fs of NVE from 300 K."""
    from ase import units
    from ase.build import add_adsorbate, fcc111
    from ase.constraints import FixAtoms
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet
    from ase.optimize import BFGS
    from fairchem.core.common.relaxation.ase_utils import OCPCalculator

    atoms = fcc111("Cu", size=(2, 2, 3), vacuum=7.0)
    atoms.set_constraint(FixAtoms(mask=atoms.positions[:, 2] < atoms.positions[:, 2].min() + 0.1))
    add_adsorbate(atoms, "O", height=1.5, position="fcc")
    logging.disable(logging.INFO)  # OCPCalculator logs its whole config
    atoms.calc = OCPCalculator(checkpoint_path=str(checkpoint), cpu=True, seed=0)
    logging.disable(logging.NOTSET)
    optimizer = BFGS(atoms, logfile=None)
    converged = optimizer.run(fmax=0.05, steps=100)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    energies = []
    dynamics = VelocityVerlet(atoms, timestep=1.0 * units.fs, logfile=None)
    dynamics.attach(lambda: energies.append(atoms.get_total_energy()), interval=1)
    dynamics.run(50)
    return {
        "relaxation_steps": optimizer.get_number_of_steps(),
        "relaxed": bool(converged),
        "drift_ev": energies[-1] - energies[0],
        "max_deviation_ev": float(np.max(np.abs(np.array(energies) - energies[0]))),
        "natoms": len(atoms),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--max-epochs", type=int, help="override the config's max_epochs (quick runs)")
    args = parser.parse_args(argv)
    if not CONFIG.exists():
        raise SystemExit(f"run the demo from the repository root ({CONFIG} not found)")
    run_dir = args.run_dir
    logs = run_dir / "logs_demo"
    logs.mkdir(parents=True, exist_ok=True)
    data = run_dir / "data"
    started = time.perf_counter()

    tests = build_data(data, logs)
    data_overrides = [f"--dataset.{split}.src={data / 's2ef' / split}" for split in ("train", "val", "test")]
    data_overrides += [
        f"--dataset.train.transforms.element_references.file={data / 'element_references.pt'}",
        f"--dataset.train.transforms.normalizer.file={data / 'normalizers.pt'}",
    ]
    epochs = [f"--optim.max_epochs={args.max_epochs}"] if args.max_epochs else []

    print("2. training EquiformerV2 with the stock fairchem CLI (CPU)")
    fairchem("train", run_dir, "demo-train", logs, *data_overrides, *epochs)
    checkpoints = run_dir / "checkpoints" / "demo-train"
    best = checkpoints / "best_checkpoint.pt"
    checkpoint = best if best.exists() else checkpoints / "checkpoint.pt"

    print(f"3. validating {checkpoint}")
    metrics = last_metrics(
        fairchem("validate", run_dir, "demo-validate", logs, "--checkpoint", str(checkpoint), *data_overrides)
    )
    baseline = mean_predictor_maes(data)

    print("4. predicting the four test splits and writing the EvalAI submission file")
    predictions = {}
    for split, src in tests.items():
        overrides = [*data_overrides[:2], f"--dataset.test.src={src}", *data_overrides[3:]]
        fairchem(
            "predict", run_dir, f"demo-predict-{split}", logs, "--checkpoint", str(checkpoint), *overrides
        )
        predictions[split] = run_dir / "results" / f"demo-predict-{split}" / "s2ef_predictions.npz"
    submission = run_dir / "submission_s2ef.npz"
    splits = [f"--{split.replace('_', '-')}={path}" for split, path in predictions.items()]
    run(
        [tool("fairchem-equiformers-submission"), "s2ef", *splits, "--out-path", str(submission)],
        logs / "submission.log",
    )

    print("5. relaxation and NVE molecular dynamics through fairchem's OCPCalculator")
    md = simulate(checkpoint)

    print(f"\nDemo finished in {(time.perf_counter() - started) / 60:.1f} min. Outputs:")
    print(f"  dataset             {data} (+ {', '.join(str(tests[s].parents[1]) for s in OOD_SPLITS)})")
    print(f"  checkpoints         {checkpoints}")
    print(f"  tensorboard logs    {run_dir / 'logs' / 'tensorboard' / 'demo-train'}")
    print(f"  predictions         {run_dir / 'results'}")
    print(f"  EvalAI submission   {submission}")
    print(f"  command logs        {logs}")
    print("\nValidation (val split)          model   mean predictor   ratio")
    for key, unit in (("energy_mae", "eV"), ("forces_mae", "eV/A")):
        ratio = metrics[key] / baseline[key]
        print(f"  {key:<28}{metrics[key]:8.4f}   {baseline[key]:8.4f} {unit:<5}  {ratio:5.2f}")
    print(
        f"\nASE: BFGS relaxation of Cu(111)+O ({md['natoms']} atoms) "
        f"{'converged' if md['relaxed'] else 'stopped'} after {md['relaxation_steps']} steps; "
        "NVE 50 x 1 fs from 300 K: total-energy drift "
        f"{md['drift_ev']:+.4f} eV, largest deviation {md['max_deviation_ev']:.4f} eV (direct forces are not "
        "conservative)"
    )
    learned = all(metrics[k] <= 0.5 * baseline[k] for k in ("energy_mae", "forces_mae"))
    print("\nThe model learned: both MAEs are at most half the mean predictor's." if learned else
          "\nWARNING: an MAE is above half the mean predictor's.")  # fmt: skip
    return 0 if learned else 1


if __name__ == "__main__":
    sys.exit(main())
