"""Predictions of MACE checkpoints on extended-XYZ files, for ``bench_real_data.py``.

Runs in MACE's own virtualenv (``benchmarks/.venv-mace``, see ``mace_env.sh``), not the project's:

    benchmarks/.venv-mace/bin/python benchmarks/mace_predict.py --model run/checkpoints/x.model \
        --checkpoints run/snapshots/x_epoch-3.pt ... --configs test.xyz ... --out predictions/ [--stress]

``--model`` is the model ``mace_run_train`` saved (the whole module, pickled): it gives the architecture;
each checkpoint's ``model`` state dict (MACE saves the EMA weights when ``--ema`` is on) is loaded into
it in turn. Evaluation follows ``mace_eval_configs`` (same data pipeline, batches, ``compute_stress``).
Writes ``<out>/<checkpoint stem>__<config stem>.npz`` with ``energy`` [frames] (eV, the per-atom
energies summed in float64), ``forces``
[atoms, 3] (eV/A, frames concatenated in file order) and, with ``--stress``, ``stress`` [frames, 3, 3]
(eV/A^3, ASE's sign), and prints one JSON line: the parameter count and the files written.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import ase.io
import numpy as np
import torch
from mace import data
from mace.tools import torch_geometric, torch_tools, utils


def predict(model, atoms_list, batch_size: int, stress: bool) -> dict[str, np.ndarray]:
    configs = [data.config_from_atoms(atoms) for atoms in atoms_list]
    z_table = utils.AtomicNumberTable([int(z) for z in model.atomic_numbers])
    heads = getattr(model, "heads", None)
    loader = torch_geometric.dataloader.DataLoader(
        dataset=[
            data.AtomicData.from_config(config, z_table=z_table, cutoff=float(model.r_max), heads=heads)
            for config in configs
        ],
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
    )
    energies, forces, stresses = [], [], []
    for batch in loader:
        output = model(batch.to_dict(), compute_stress=stress, training=False)
        # per-atom energies (E0 + interaction) in float64, summed in float64: a float32 total of
        # ~1e4 eV would be rounded to 1-2 meV
        node_energy = output["node_energy"].double()
        energy = torch.zeros(int(batch.num_graphs), dtype=torch.float64).index_add_(
            0, batch.batch, node_energy
        )
        energies.append(torch_tools.to_numpy(energy))
        forces.append(torch_tools.to_numpy(output["forces"]))
        if stress:
            stresses.append(torch_tools.to_numpy(output["stress"]))
    result = {"energy": np.concatenate(energies), "forces": np.concatenate(forces)}
    if stress:
        result["stress"] = np.concatenate(stresses)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--checkpoints", type=Path, nargs="+", required=True)
    parser.add_argument("--configs", type=Path, nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stress", action="store_true")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch_tools.set_default_dtype(args.dtype)
    base = torch.load(args.model, map_location="cpu", weights_only=False)
    base = base.to(torch.float32 if args.dtype == "float32" else torch.float64)
    for param in base.parameters():
        param.requires_grad = False
    atoms_lists = {path: ase.io.read(path, index=":") for path in args.configs}
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for checkpoint in args.checkpoints:
        model = copy.deepcopy(base)
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
        model.load_state_dict(state)
        model.eval()
        for path, atoms_list in atoms_lists.items():
            result = predict(model, atoms_list, args.batch_size, args.stress)
            out = args.out / f"{checkpoint.stem}__{path.stem}.npz"
            np.savez(out, **result)
            written.append(str(out))
    num_params = sum(p.numel() for p in base.parameters())
    print(json.dumps({"num_params": num_params, "written": written}))


if __name__ == "__main__":
    main()
