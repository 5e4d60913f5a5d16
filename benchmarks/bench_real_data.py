"""Each Equiformer family against MACE on real DFT data, every model with the same CPU budget.

Data (vendored under ``benchmarks/data/real``, see ``scripts/vendor_real_data.py``):

* ``3bpa``: BOTNet's 3BPA (27-atom drug-like molecule): train on the 500 frames of ``train_300K``,
  test on ``train_mixedT`` (500 frames of 300, 600 and 1200 K MD: mostly extrapolation);
* ``acac``: BOTNet's acetylacetone (15 atoms): train on ``train_300K`` (500 frames), test on
  ``test_MD_300K`` and ``test_MD_600K`` (650 frames each);
* ``si``: mlearn's Si (periodic, 2-64 atoms, energies, forces and stress): train on the 214 training
  structures, test on the 25 test structures.

5% of each training file (seed 0) is the validation set, split by frame: the BOTNet training files
are decorrelated MD samples, so a random frame split is acceptable for that small part. The
package's converter (``fairchem-equiformers-data convert``) writes our LMDBs; MACE gets exactly the
same training and validation frames (written back to XYZ from our validation LMDB) and the same test
files. Energies are referenced to the isolated-atom DFT energies (3BPA, acac: ``--isolated-atoms``
for ours, ``--E0s`` for MACE) or to fitted per-element energies (Si: fitted references for ours,
``--E0s average`` for MACE).

Budget. Per data set the models train one after another (never two at once), each with the same
budget (``--minutes``, 2 threads): a one-epoch calibration run measures the start-up (launch to the
first training step) and the time of an epoch, then the real run gets as many epochs as fit the
budget, and its schedule always completes (cosine decay for ours, MACE's stage two over the last
20%). Training time is from launching the training command to the write of its last checkpoint
(start-up, data loading and per-epoch validation included; the final evaluation excluded).
``--clock wall`` (default) budgets wall time; ``--clock cpu`` budgets the training process's CPU
time per thread, which other processes on a shared machine hardly change. Every run's OpenMP
threads wait passively (``OMP_WAIT_POLICY=PASSIVE``): spinning threads of two processes on 2 cores
slow both 10-20x. The mean load average during each run is reported: above the thread count,
something else competed for the CPU and the wall-clock budget bought less.

Models (conservative forces for all):

* ours (EquiformerV2, EquiformerV3, EquiformerV1, E2Former, DEQ-EquiformerV2): the stock
  ``fairchem`` CLI with the plugin's ``fairchem_equiformers.ForcesTrainer``; small MD17-style models
  (``FAMILIES`` below), loss energy MAE x1 + force L2-MAE x80 (+ stress MAE x100 for Si, for every
  family but the DEQ, whose wrapper has no stress output), AdamW, cosine learning rate with a 5%
  warm-up, EMA of the weights (decay 0.99, less for runs under 1,000 steps: fairchem's EMA has no
  warm-up), batch 8.
* MACE: ``mace-torch`` in its own virtualenv (``benchmarks/.venv-mace``, made on first use by
  ``mace_env.sh``: MACE pins e3nn 0.4.4, ours needs 0.6; the same torch 2.4.1), trained with its
  ``mace_run_train`` CLI and its README's settings for small sets: ScaleShiftMACE (which shifts and
  scales the interaction energy, as our normalizers do), 64 channels, max_L 1, correlation 3, 2
  interactions, r_max 5 A, AMSGrad Adam lr 0.01, EMA 0.99, stage two (swa) over the last 20% of the
  epochs, its weighted loss (+ stress for Si), batch 8, float32 like ours (MACE's default float64
  trains about 2x slower).

Evaluation, after training and in float32: test errors of the final checkpoint on the whole test
files (the table), and a learning curve from checkpoints copied during training (about
``--curve-points`` of them, evaluated on ``--curve-frames`` frames spread over each test file). Ours
in-process through fairchem's ``OCPCalculator`` (the checkpoint's EMA weights, normalizers and
element references; total energies in eV, references added in float64); MACE with
``mace_predict.py`` in MACE's venv (its checkpoints hold the EMA weights; per-atom energies summed
in float64).

    python benchmarks/bench_real_data.py --datasets acac --minutes 5
    python benchmarks/bench_real_data.py --datasets acac --models equiformer_v2 mace --minutes 1

Prints, per data set and model, the calibration and the epochs chosen, the training time, the
parameter count and the final test errors; then markdown tables: per model the parameters, epochs,
seconds per epoch, start-up, training time (wall and CPU per thread), calibration time and mean
load; per test file and model the energy MAE/RMSE (meV and meV/atom), force MAE/RMSE (meV/A),
stress MAE (meV/A^3, Si) and the energy and force MAE as multiples of MACE's (x2.00: twice MACE's
error). The tables also go to ``benchmarks/results/real_data_<datasets>_<date>.md`` (with the command line,
the CPU, the versions) and ``.json`` (with the learning curves), the curves (test force MAE against
training time) to ``docs/real_data_<dataset>.png``. Runs (LMDBs, configs, logs, checkpoints) go to
``runs/real_data/`` (``--work-dir``); ``--reuse`` skips the training of runs already finished there
with the same budget and only reports again.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data" / "real"
VENV_BIN = Path(sys.executable).parent
MACE_ENV = ROOT / "benchmarks" / "mace_env.sh"
MACE_PREDICT = ROOT / "benchmarks" / "mace_predict.py"

DATASETS = {
    "3bpa": dict(
        train=DATA / "botnet/dataset_3BPA/train_300K.xyz",
        tests={"mixedT": DATA / "botnet/dataset_3BPA/train_mixedT.xyz"},
        isolated=DATA / "botnet/dataset_3BPA/iso_atoms.xyz",
        periodic=False,
    ),
    "acac": dict(
        train=DATA / "botnet/dataset_acac/train_300K.xyz",
        tests={"MD_300K": DATA / "botnet/dataset_acac/test_MD_300K.xyz",
               "MD_600K": DATA / "botnet/dataset_acac/test_MD_600K.xyz"},
        isolated=DATA / "botnet/dataset_acac/isolated_atoms.xyz",
        periodic=False,
    ),
    "si": dict(
        train=DATA / "mlearn/Si_train.xyz",
        tests={"test": DATA / "mlearn/Si_test.xyz"},
        isolated=None,
        periodic=True,
    ),
}  # fmt: skip

CUTOFF = 5.0  # A, every model
MAX_NEIGHBORS = 100  # never reached at 5 A in these sets (no truncation of the graph)

# Small MD17-style models (0.3-2 M parameters, an acac epoch in 0.3-0.6 min on 2 idle threads),
# conservative forces.
FAMILIES = {
    "equiformer_v2": dict(
        label="EquiformerV2", name="fairchem_equiformers.EquiformerV2", stress=True, avg=True,
        model=dict(num_layers=4, sphere_channels=64, attn_hidden_channels=64, num_heads=4,
                   attn_alpha_channels=16, attn_value_channels=16, ffn_hidden_channels=128,
                   norm_type="layer_norm_sh", lmax_list=[2], mmax_list=[2], edge_channels=64,
                   num_distance_basis=128, use_grid_mlp=True, use_sep_s2_act=True, alpha_drop=0.0,
                   drop_path_rate=0.0, proj_drop=0.0, weight_init="uniform"),
        lr=1e-3,
    ),
    "equiformer_v1": dict(
        label="EquiformerV1", name="fairchem_equiformers.EquiformerV1", stress=True, avg=True,
        model=dict(num_layers=2, irreps_node_embedding="64x0e+32x1e+16x2e",
                   irreps_head="16x0e+8x1e+4x2e", num_heads=4, irreps_mlp_mid="192x0e+96x1e+48x2e",
                   irreps_feature="256x0e", attention_type="mlp_nonlinear", radial_basis="exp",
                   num_radial_basis=32, radial_hidden_channels=[64, 64], alpha_drop=0.0,
                   drop_path_rate=0.0),
        lr=1e-3,
    ),
    "equiformer_v3": dict(
        label="EquiformerV3", name="fairchem_equiformers.EquiformerV3", stress=True, avg=True,
        gradient_key="direct_prediction",
        model=dict(num_layers=4, num_channels=64, attn_hidden_channels=32, num_heads=4,
                   attn_alpha_channels=16,
                   attn_value_channels=16, ffn_hidden_channels=128, lmax=2, mmax=2,
                   attn_grid_resolution_list=[8, 7], ffn_grid_resolution_list=[8, 8], edge_channels=64,
                   num_radial_basis=64, attn_weights_drop=0.0, drop_path_rate=0.0),
        lr=1e-3,
    ),
    "e2former": dict(
        label="E2Former", name="fairchem_equiformers.E2Former", stress=True, avg=False,
        model=dict(num_layers=2, irreps_node_embedding="64x0e+64x1e+64x2e", num_heads=4,
                   attn_type="all-order", alpha_type="QK", attn_alpha_channels=16,
                   ffn_hidden_channels=128, norm_type="rms_norm_sh", num_distance_basis=128,
                   edge_channels=64, drop_path_rate=0.0),
        lr=1e-3,
    ),
    "deq_equiformer_v2": dict(
        label="DEQ-EquiformerV2", name="fairchem_equiformers.DEQEquiformerV2", stress=False, avg=True,
        model=dict(num_layers=1, solver="anderson", solver_train={"rel_tol": 1.0e-3, "max_iter": 24},
                   solver_eval={"rel_tol": 1.0e-4, "max_iter": 40},
                   solver_reuse={"rel_tol": 1.0e-3, "max_iter": 40}, gradient="phantom",
                   reuse_fixed_point=False, sphere_channels=64, attn_hidden_channels=64, num_heads=4,
                   attn_alpha_channels=32, attn_value_channels=16, ffn_hidden_channels=128,
                   norm_type="layer_norm_sh", lmax_list=[2], mmax_list=[2],
                   edge_channels=64, num_distance_basis=64, use_grid_mlp=True, use_sep_s2_act=True),
        lr=5e-4,
    ),
}  # fmt: skip
MODELS = [*FAMILIES, "mace"]
LABELS = {**{key: family["label"] for key, family in FAMILIES.items()}, "mace": "MACE"}

MACE_SETTINGS = [
    "--model", "ScaleShiftMACE", "--num_channels", "64", "--max_L", "1", "--correlation", "3",
    "--num_interactions", "2", "--r_max", str(CUTOFF), "--lr", "0.01", "--amsgrad", "--ema",
    "--ema_decay", "0.99", "--default_dtype", "float32", "--device", "cpu", "--num_workers", "0",
]  # fmt: skip


# ----------------------------------------------------------------------------------------- data


def log(message: str) -> None:
    print(message, flush=True)


def read_frames(path: Path):
    import ase.io

    return ase.io.read(path, index=":")


def convert(name: str, spec: dict, out: Path, seed: int, reconvert: bool) -> None:
    """LMDBs of the data set with the package's own converter (skipped when already there)."""
    if (out / "dataset.yml").exists() and not reconvert:
        return
    cmd = [str(VENV_BIN / "fairchem-equiformers-data"), "convert", "--input", str(spec["train"]),
           "--out", str(out), "--val-fraction", "0.05", "--test-fraction", "0", "--split-by", "frame",
           "--test-input", *map(str, spec["tests"].values()), "--seed", str(seed), "--overwrite"]  # fmt: skip
    if spec["isolated"] is not None:
        cmd += ["--isolated-atoms", str(spec["isolated"])]
    log(f"[{name}] converting: {' '.join(cmd)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.parent / "convert.log"
    with open(log_path, "w") as handle:
        result = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"conversion failed, see {log_path}:\n{log_path.read_text()[-3000:]}")


def lmdb_frames(path: Path) -> list:
    from fairchem.core.datasets import LmdbDataset

    dataset = LmdbDataset({"src": str(path)})
    return [dataset[i] for i in range(len(dataset))]


def validation_indices(train_frames, val_lmdb: Path) -> list[int]:
    """Indices in the training file of the frames our converter put in the validation LMDB
    (matched on energy, then positions up to a translation: the converter centres molecules in
    their box), so that MACE trains and validates on the same frames."""
    import numpy as np

    by_energy: dict[float, list[int]] = {}
    for index, atoms in enumerate(train_frames):
        by_energy.setdefault(round(atoms.get_potential_energy(), 5), []).append(index)
    indices = []
    for data in lmdb_frames(val_lmdb):
        energy = float(data.y)
        candidates = [
            i
            for i in by_energy.get(round(energy, 5), [])
            if len(train_frames[i]) == len(data.pos)
            and np.allclose(
                train_frames[i].positions - train_frames[i].positions[0],
                (data.pos - data.pos[0]).numpy(),
                atol=1e-4,
            )
        ]
        if len(candidates) != 1:
            raise RuntimeError(f"validation frame with energy {energy} matches {len(candidates)} frames")
        indices.append(candidates[0])
    return sorted(indices)


def graph_statistics(frames) -> tuple[float, float]:
    """Mean atoms per structure and mean neighbours within the cutoff (the models' normalisers;
    MACE computes the latter itself)."""
    from ase.neighborlist import neighbor_list

    atoms_count = [len(a) for a in frames]
    degree = [len(neighbor_list("i", a, CUTOFF)) / len(a) for a in frames]
    return sum(atoms_count) / len(frames), sum(degree) / len(frames)


def isolated_energies(path: Path) -> dict[int, float]:
    return {int(a.numbers[0]): float(a.get_potential_energy()) for a in read_frames(path)}


def has_stress(frames) -> bool:
    return all("stress" in (a.calc.results if a.calc else {}) for a in frames)


# ----------------------------------------------------------------------------- running a trainer


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a live process has used so far, or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Run:
    """A training subprocess: its output lines time-stamped into a log, its progress on two clocks.

    ``wall``: seconds since launch. ``cpu``: the process's CPU seconds divided by its threads (equal
    to the wall time when its threads are busy all the time; unlike the wall time, hardly changed
    when other processes compete for the cores)."""

    def __init__(self, cmd: list[str], cwd: Path, log_path: Path, threads: int, start_pattern: str) -> None:
        self.log_path, self.start_pattern, self.threads = log_path, re.compile(start_pattern), threads
        self.loop_start: dict | None = None
        self.usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.launch = time.time()
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=thread_env(threads), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1,
        )  # fmt: skip
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def clock(self) -> dict:
        cpu = cpu_seconds(self.proc.pid)
        return {"wall": time.time() - self.launch, "cpu": None if cpu is None else cpu / self.threads}

    def _read(self) -> None:
        with open(self.log_path, "w", buffering=1) as handle:  # line-buffered
            for line in self.proc.stdout:
                now = self.clock()
                if self.loop_start is None and self.start_pattern.search(line):
                    self.loop_start = now
                handle.write(f"{now['wall']:9.2f} {line}")

    def wait(self, poll=None, interval: float = 0.25) -> dict:
        """Wait for the end, calling ``poll`` meanwhile; returns both clocks at the end. Also
        samples the machine's 1-minute load average (``self.load``: the mean), which shows whether
        anything else competed for the CPU."""
        loads = []
        while self.proc.poll() is None:
            if poll:
                poll()
            loads.append(os.getloadavg()[0])
            time.sleep(interval)
        end = time.time() - self.launch
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = sum(getattr(usage, k) - getattr(self.usage, k) for k in ("ru_utime", "ru_stime"))
        self.load = sum(loads) / len(loads) if loads else os.getloadavg()[0]
        self.reader.join()
        if poll:
            poll()
        if self.proc.returncode != 0:
            tail = "".join(self.log_path.read_text().splitlines(keepends=True)[-30:])
            raise RuntimeError(f"training failed (exit {self.proc.returncode}), see {self.log_path}:\n{tail}")
        if self.loop_start is None:
            self.loop_start = {"wall": 0.0, "cpu": 0.0}
        return {"wall": end, "cpu": cpu / self.threads}


class SnapshotKeeper:
    """Which checkpoint saves to keep: the first, the first at or after each target time (on
    ``clock``), the last (or every one with ``keep_all``)."""

    def __init__(self, directory: Path, targets: list[float], clock: str, keep_all: bool = False) -> None:
        self.directory, self.targets, self.clock = directory, sorted(targets), clock
        self.keep_all = keep_all
        self.directory.mkdir(parents=True, exist_ok=True)
        self.kept: list[dict] = []  # {"path", "seconds", "cpu_seconds", "epoch"}

    def offer(self, source: Path, times: dict, epoch: int, last: bool = False) -> None:
        now = times[self.clock]
        due = self.keep_all or last or not self.kept or (self.targets and now >= self.targets[0])
        if not due:
            return
        while self.targets and now >= self.targets[0]:
            self.targets.pop(0)
        target = self.directory / f"epoch-{epoch}.pt"
        shutil.copy2(source, target)
        self.kept = [k for k in self.kept if k["epoch"] != epoch]
        self.kept.append({"path": str(target), "seconds": times["wall"], "cpu_seconds": times["cpu"],
                          "epoch": epoch})  # fmt: skip

    def fill_cpu(self, end_cpu: float) -> None:
        """Saves first seen after the process ended: its final CPU time."""
        for kept in self.kept:
            if kept["cpu_seconds"] is None:
                kept["cpu_seconds"] = end_cpu


OMP_WAIT_POLICY = "PASSIVE"


def thread_env(threads: int) -> dict:
    """The training and evaluation processes' threads: OpenMP threads that sleep rather than spin
    while they wait (``OMP_WAIT_POLICY``, ``--omp-wait-policy``): on a shared 2-core machine, spinning
    threads of two processes slow both 10-20x (measured: one EquiformerV2 step 32 s spinning, 1.8 s
    passive, 0.5 s alone)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    if OMP_WAIT_POLICY:
        env["OMP_WAIT_POLICY"] = OMP_WAIT_POLICY
    return env


def choose_epochs(budget: float, overhead: float, epoch_seconds: float) -> int:
    return max(1, int((budget - overhead) / epoch_seconds))


# ---------------------------------------------------------------------------------------- ours


def dataset_section(data_dir: Path) -> dict:
    """The converter's ``dataset.yml`` (train and val; the test files are evaluated separately), its
    paths pointed at ``data_dir``."""
    import yaml

    path = data_dir / "dataset.yml"
    if path.exists():
        section = yaml.safe_load(path.read_text())
        section = section.get("dataset", section)
    else:  # a converter without dataset.yml: its standard layout
        keys = {"y": "energy", "force": "forces"}
        transforms = {"element_references": {"file": "element_references.pt"},
                      "normalizer": {"file": "normalizers.pt"}}  # fmt: skip
        section = {
            "train": {"format": "lmdb", "src": "s2ef/train", "key_mapping": keys, "transforms": transforms},
            "val": {"format": "lmdb", "src": "s2ef/val", "key_mapping": keys},
        }
    section = {split: section[split] for split in ("train", "val") if split in section}

    def absolute(value):
        if isinstance(value, dict):
            return {k: absolute(v) if k not in ("src", "file") else rebase(v) for k, v in value.items()}
        return value

    def rebase(value: str) -> str:
        """The path inside this data folder (dataset.yml may name where it was first written)."""
        parts = Path(value).parts
        tail = parts[parts.index("s2ef") :] if "s2ef" in parts else parts[-1:]
        return str(data_dir.joinpath(*tail))

    return {split: absolute(entry) for split, entry in section.items()}


def ema_decay(total_steps: int) -> float:
    """0.99, or less for short runs: fairchem's EMA starts from the initial weights with no warm-up,
    so 0.99 over 120 steps would still hold 30% of the random initialisation (MACE's torch_ema
    warms up); here the initial weights keep at most e^-10 of the average."""
    return min(0.99, max(0.0, 1.0 - 10.0 / max(total_steps, 1)))


def ours_config(family: str, data_dir: Path, periodic: bool, stress: bool, epochs: int, batch_size: int,
                stats: tuple[float, float], total_steps: int) -> dict:  # fmt: skip
    spec = FAMILIES[family]
    stress = stress and spec["stress"]
    model = {
        "name": spec["name"], "use_pbc": periodic, "otf_graph": True, "regress_forces": True,
        spec.get("gradient_key", "direct_forces"): False, "max_neighbors": MAX_NEIGHBORS,
        "max_radius": CUTOFF,
        "max_num_elements": 90, **copy.deepcopy(spec["model"]),
    }  # fmt: skip
    if spec["avg"]:
        model["avg_num_nodes"], model["avg_degree"] = stats
    if stress:
        model["regress_stress"] = True
    outputs = {
        "energy": {"shape": 1, "level": "system"},
        "forces": {"irrep_dim": 1, "level": "atom", "train_on_free_atoms": True, "eval_on_free_atoms": True},
    }
    losses = [{"energy": {"fn": "mae", "coefficient": 1}}, {"forces": {"fn": "l2mae", "coefficient": 80}}]
    metrics = {"energy": ["mae"], "forces": ["mae"]}
    if stress:
        outputs["stress"] = {"shape": 9, "level": "system"}
        losses.append({"stress": {"fn": "mae", "coefficient": 100}})
        metrics["stress"] = ["mae"]
    return {
        "trainer": "fairchem_equiformers.ForcesTrainer",
        "hide_eval_progressbar": True,
        "dataset": dataset_section(data_dir),
        "logger": {"name": "tensorboard"},
        "outputs": outputs,
        "loss_functions": losses,
        "evaluation_metrics": {"metrics": metrics, "primary_metric": "forces_mae"},
        "model": model,
        "optim": {
            "batch_size": batch_size, "eval_batch_size": 16, "num_workers": 0, "optimizer": "AdamW",
            "optimizer_params": {"weight_decay": 1.0e-6}, "lr_initial": spec["lr"], "scheduler": "LambdaLR",
            "scheduler_params": {"lambda_type": "cosine", "warmup_factor": 0.2,
                                 "warmup_epochs": 0.05 * epochs, "lr_min_factor": 0.01},
            "max_epochs": epochs, "clip_grad_norm": 100, "ema_decay": ema_decay(total_steps),
        },
    }  # fmt: skip


def run_ours(family: str, config: dict, run_dir: Path, threads: int, seed: int, keeper=None) -> dict:
    import yaml

    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    config_path = run_dir / "config.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [str(VENV_BIN / "fairchem"), "--mode", "train", "--cpu", "--config-yml", str(config_path),
           "--run-dir", str(run_dir), "--identifier", family, "--timestamp-id", family,
           "--print-every", "1", "--seed", str(seed)]  # fmt: skip
    run = Run(cmd, ROOT, run_dir / "train.log", threads, r"\bstep: ")
    state = {"mtime": None, "epoch": 0, "path": None, "times": None}

    def poll():
        paths = list((run_dir / "checkpoints").glob("*/checkpoint.pt"))
        if not paths:
            return
        try:
            mtime = paths[0].stat().st_mtime
        except FileNotFoundError:  # being replaced
            return
        if mtime != state["mtime"]:
            times = {**run.clock(), "wall": mtime - run.launch}  # cpu None once it has ended
            state.update(mtime=mtime, epoch=state["epoch"] + 1, path=paths[0], times=times)
            if keeper is not None:
                keeper.offer(paths[0], times, state["epoch"])

    end = run.wait(poll)
    if state["path"] is None:
        raise RuntimeError(f"no checkpoint written, see {run_dir / 'train.log'}")
    if state["times"]["cpu"] is None:
        state["times"]["cpu"] = end["cpu"]
    epochs = config["optim"]["max_epochs"]
    if keeper is not None:
        if not keeper.kept or keeper.kept[-1]["epoch"] != state["epoch"]:
            keeper.offer(state["path"], state["times"], state["epoch"], last=True)
        keeper.kept[-1]["epoch"] = epochs  # the final checkpoint is the schedule's end
        keeper.fill_cpu(end["cpu"])
    return {"loop_start": run.loop_start, "last_checkpoint": state["times"], "exit": end, "epochs": epochs,
            "command": " ".join(cmd), "load": run.load}  # fmt: skip


# ---------------------------------------------------------------------------------------- MACE


def mace_python() -> Path:
    """The MACE venv's python (created by mace_env.sh on first use)."""
    out = subprocess.run(["bash", str(MACE_ENV)], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def mace_command(mace_bin: Path, name: str, work_dir: Path, files: dict, e0s: str, stress: bool, epochs: int,
                 batch_size: int, seed: int) -> list[str]:  # fmt: skip
    cmd = [str(mace_bin / "mace_run_train"), "--name", name, "--seed", str(seed), "--work_dir", str(work_dir),
           "--train_file", str(files["train"]), "--valid_file", str(files["valid"]), "--E0s", e0s,
           "--energy_key", "energy", "--forces_key", "forces", *MACE_SETTINGS,
           "--batch_size", str(batch_size), "--valid_batch_size", "16", "--max_num_epochs", str(epochs),
           "--save_all_checkpoints", "--keep_checkpoints", "--plot", "False",
           "--skip_evaluate_heads", "Default"]  # fmt: skip
    if stress:
        cmd += ["--stress_key", "stress", "--compute_stress", "True", "--loss", "stress",
                "--error_table", "PerAtomMAEstressvirials"]  # fmt: skip
    else:
        cmd += ["--error_table", "PerAtomMAE"]
    if epochs >= 2:  # MACE needs at least one epoch of each stage
        cmd += ["--swa", "--start_swa", str(min(epochs - 1, max(1, round(0.8 * epochs))))]
    return cmd


def run_mace(cmd: list[str], run_dir: Path, threads: int, keeper=None) -> dict:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    run = Run(cmd, run_dir, run_dir / "train.log", threads, r"===TRAINING===|Started training")
    pattern = re.compile(r"_epoch-(\d+)(_swa)?\.pt$")
    first_seen: dict[Path, dict] = {}  # the clocks when a file appeared (the save just happened)
    done: dict[Path, tuple[int, bool]] = {}

    def poll(final: bool = False):
        found = {}
        for path in (run_dir / "checkpoints").glob("*_epoch-*.pt"):
            match = pattern.search(path.name)
            if match:
                found[path] = (int(match.group(1)), bool(match.group(2)))
                first_seen.setdefault(path, run.clock())
        ordered = sorted(found, key=lambda p: found[p][0])
        complete = ordered if final else ordered[:-1]  # the newest may still be being written
        for path in complete:
            if path not in done:
                done[path] = found[path]
                times = {**first_seen[path], "wall": path.stat().st_mtime - run.launch}
                if times["cpu"] is None:  # first seen after the end
                    times["cpu"] = end_times.get("cpu")
                if keeper is not None:
                    keeper.offer(path, times, found[path][0] + 1, last=final and path == ordered[-1])
                done_times[path] = times
        # bounded disk use: MACE reloads only the newest checkpoint of each stage at the end
        newest = {max((p for p in ordered if found[p][1] == swa), key=lambda p: found[p][0], default=None)
                  for swa in (False, True)}  # fmt: skip
        for path in complete:
            if path not in newest and path.exists():
                path.unlink()

    end_times: dict = {}
    done_times: dict[Path, dict] = {}
    end_times.update(run.wait(poll))
    poll(final=True)
    if not done:
        raise RuntimeError(f"no MACE checkpoint written, see {run_dir / 'train.log'}")
    last = max(done, key=lambda p: done[p][0])
    if done_times[last]["cpu"] is None:
        done_times[last]["cpu"] = end_times["cpu"]
    if keeper is not None:
        keeper.fill_cpu(end_times["cpu"])
    models = sorted(p for p in run_dir.glob("*.model") if "compiled" not in p.name)
    return {"loop_start": run.loop_start, "last_checkpoint": done_times[last], "exit": end_times,
            "epochs": done[last][0] + 1, "command": " ".join(cmd), "model_file": str(models[0]),
            "load": run.load}  # fmt: skip


# ---------------------------------------------------------------------------------- evaluation


def metrics_of(frames, energy, forces, stress=None) -> dict:
    """Errors of predicted total energies [frames] (eV), forces [atoms, 3] (eV/A) and stress
    [frames, 3, 3] (eV/A^3) against the frames' DFT labels, in meV units."""
    import numpy as np

    natoms = np.array([len(a) for a in frames])
    e_ref = np.array([a.get_potential_energy() for a in frames])
    f_ref = np.concatenate([a.get_forces() for a in frames])
    de = (np.asarray(energy, dtype=np.float64) - e_ref) * 1000
    df = (np.asarray(forces, dtype=np.float64) - f_ref) * 1000
    out = {
        "energy_mae": float(np.abs(de).mean()), "energy_rmse": float(np.sqrt((de**2).mean())),
        "energy_mae_per_atom": float(np.abs(de / natoms).mean()),
        "energy_rmse_per_atom": float(np.sqrt(((de / natoms) ** 2).mean())),
        "forces_mae": float(np.abs(df).mean()), "forces_rmse": float(np.sqrt((df**2).mean())),
    }  # fmt: skip
    if stress is not None:
        s_ref = np.stack([a.get_stress(voigt=False) for a in frames])
        ds = (np.asarray(stress, dtype=np.float64).reshape(-1, 3, 3) - s_ref) * 1000
        out["stress_mae"] = float(np.abs(ds).mean())
    return out


def curve_subset(frames: list, count: int) -> list:
    """``count`` frames spread evenly over the file (all of them if it has fewer)."""
    if count <= 0 or count >= len(frames):
        return frames
    step = len(frames) / count
    return [frames[int(i * step)] for i in range(count)]


def load_ours(path):
    """fairchem's ``OCPCalculator`` on a checkpoint, its model in eval mode with the checkpoint's
    EMA weights (whether or not the trainer applies them itself)."""
    import torch
    from fairchem.core.common.relaxation.ase_utils import OCPCalculator
    from fairchem.core.modules.exponential_moving_average import ExponentialMovingAverage

    calc = OCPCalculator(checkpoint_path=str(path), cpu=True, seed=0)
    model = calc.trainer._unwrapped_model
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if checkpoint.get("ema") is not None:
        ema = ExponentialMovingAverage(model.parameters(), checkpoint["ema"]["decay"])
        ema.load_state_dict(checkpoint["ema"])
        ema.copy_to()
    model.eval()
    return calc


def predict_ours(calc, atoms_list: list, stress: bool, batch_size: int = 16) -> dict:
    """Total energies [frames] (eV, denormalized and referenced in float64), forces [atoms, 3]
    and, with ``stress``, stresses [frames, 9] of a :func:`load_ours` calculator."""
    import torch
    from fairchem.core.datasets import data_list_collater

    trainer = calc.trainer
    energies, forces, stresses = [], [], []
    for start in range(0, len(atoms_list), batch_size):
        chunk = atoms_list[start : start + batch_size]
        batch = data_list_collater([calc.a2g.convert(a) for a in chunk], otf_graph=True)
        with torch.no_grad():  # the models enable gradients themselves for -dE/dpos
            out = trainer._forward(batch)
        energy = trainer._denorm_preds("energy", out["energy"].detach().double(), batch)
        energies.append(energy.view(-1))
        forces.append(trainer._denorm_preds("forces", out["forces"].detach(), batch))
        if stress and "stress" in out:
            stresses.append(trainer._denorm_preds("stress", out["stress"].detach(), batch))
    return {
        "energy": torch.cat(energies).numpy(),
        "forces": torch.cat(forces).numpy(),
        "stress": torch.cat(stresses).numpy() if stresses else None,
    }


def evaluate_ours(jobs: list[tuple[str, dict]], stress: bool, batch_size: int = 16) -> tuple[int, list[dict]]:
    """Test errors of each checkpoint of ``jobs`` ([(path, {set name: frames})]): the checkpoint's
    EMA weights, a float32 model, energies denormalized and referenced in float64. Returns the
    parameter count and one {set name: metrics} per job."""
    import logging

    logging.disable(logging.INFO)  # the calculator logs its whole config
    results, num_params = [], 0
    for path, sets in jobs:
        calc = load_ours(path)
        num_params = sum(p.numel() for p in calc.trainer._unwrapped_model.parameters())
        metrics = {}
        for name, atoms_list in sets.items():
            out = predict_ours(calc, atoms_list, stress, batch_size)
            metrics[name] = metrics_of(atoms_list, out["energy"], out["forces"], out["stress"])
        results.append(metrics)
    logging.disable(logging.NOTSET)
    return num_params, results


def evaluate_mace(python: Path, model_file: str, checkpoints: list[str], files: dict, stress: bool, out: Path,
                  threads: int) -> tuple[int, list[dict]]:  # fmt: skip
    """As ``evaluate_ours`` for MACE checkpoints on XYZ ``files`` ({set name: path}), through
    ``mace_predict.py`` in MACE's venv."""
    import numpy as np

    cmd = [str(python), str(MACE_PREDICT), "--model", model_file, "--checkpoints", *checkpoints,
           "--configs", *map(str, files.values()), "--out", str(out), "--threads", str(threads)]  # fmt: skip
    if stress:
        cmd.append("--stress")
    result = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(threads))
    if result.returncode != 0:
        raise RuntimeError(f"mace_predict.py failed:\n{result.stderr[-3000:]}")
    num_params = json.loads(result.stdout.strip().splitlines()[-1])["num_params"]
    frames = {name: read_frames(path) for name, path in files.items()}
    results = []
    for checkpoint in checkpoints:
        metrics = {}
        for name, path in files.items():
            prediction = np.load(out / f"{Path(checkpoint).stem}__{Path(path).stem}.npz")
            metrics[name] = metrics_of(
                frames[name],
                prediction["energy"],
                prediction["forces"],
                prediction["stress"] if stress else None,
            )
        results.append(metrics)
    return num_params, results


def evaluate(model: str, snapshots: list[dict], prep: dict, args, mace_py: Path | None, run_dir: Path):
    """The learning curve (every snapshot on ``--curve-frames`` frames of each test file) and the
    final checkpoint's errors on the whole test files."""
    stress = prep["stress"] and (model == "mace" or FAMILIES[model]["stress"])
    paths = [s["path"] for s in snapshots]
    if model == "mace":
        out = run_dir / "predictions"
        model_file = snapshots[-1]["model_file"]
        num_params, curve = evaluate_mace(mace_py, model_file, paths, prep["curve_files"], stress, out,
                                          args.threads)  # fmt: skip
        _, (final,) = evaluate_mace(mace_py, model_file, paths[-1:], prep["tests"], stress, out, args.threads)
    else:
        curve_sets = {name: read_frames(path) for name, path in prep["curve_files"].items()}
        test_sets = {name: read_frames(path) for name, path in prep["tests"].items()}
        jobs = [(path, curve_sets) for path in paths] + [(paths[-1], test_sets)]
        num_params, results = evaluate_ours(jobs, stress)
        curve, final = results[:-1], results[-1]
    points = [
        {"seconds": s["seconds"], "cpu_seconds": s["cpu_seconds"], "epoch": s["epoch"], "metrics": m}
        for s, m in zip(snapshots, curve)
    ]
    return num_params, points, final


# -------------------------------------------------------------------------------------- report


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "python": platform.python_version()}


def versions(mace_py: Path | None) -> dict:
    import fairchem.core
    import torch

    import fairchem_equiformers

    out = {"torch": torch.__version__, "fairchem-core": fairchem.core.__version__,
           "fairchem-equiformers": fairchem_equiformers.__version__}  # fmt: skip
    if mace_py is not None:
        code = "import mace, torch, e3nn; print(mace.__version__, torch.__version__, e3nn.__version__)"
        mace, torch_version, e3nn = subprocess.run(
            [str(mace_py), "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()[-3:]
        out.update({"mace-torch": mace, "torch (MACE venv)": torch_version, "e3nn (MACE venv)": e3nn})
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        out["git"] = commit.stdout.strip()
    except OSError:
        pass
    return out


def ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base == 0:
        return ""
    return f"x{value / base:.2f}"


def tables(results: dict) -> str:
    """Markdown: per data set, a training table and a test-error table."""
    lines = []
    for dataset, entry in results.items():
        models = entry["models"]
        lines += ["", f"### {dataset}", "",
                  f"Train {entry['counts']['train']} frames, validation {entry['counts']['val']}; "
                  + (f"budget {entry['budget_s'] / 60:g} min per model ({entry['clock']} clock)."
                     if entry["budget_s"] else "fixed epochs (no budget)."), "",
                  "| model | params | epochs | s/epoch | start-up s | training s | CPU s/thread | "
                  "calibration s | load |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for key, run in models.items():
            lines.append(
                f"| {LABELS[key]} | {run['num_params']:,} | {run['epochs']} | {run['seconds_per_epoch']:.1f} "
                f"| {run['startup_s']:.0f} | {run['training_s']:.0f} | {run['training_cpu_s']:.0f} "
                f"| {run['calibration_s']:.0f} | {run['load']:.1f} |"
            )
        has_stress = any("stress_mae" in m for run in models.values() for m in run["final"].values())
        header = (
            "| test set | model | E MAE meV | E MAE meV/atom | E RMSE meV | E RMSE meV/atom | F MAE meV/A "
            "| F RMSE meV/A |" + (" S MAE meV/A^3 |" if has_stress else "") + " E MAE / MACE | F MAE / MACE |"
        )
        lines += ["", header, "|---|---|" + "---:|" * (header.count("|") - 3)]  # fmt: skip
        for test in entry["tests"]:
            base = models.get("mace", {}).get("final", {}).get(test)
            for key, run in models.items():
                m = run["final"][test]
                stress = f" {m['stress_mae']:.2f} |" if "stress_mae" in m else " |"
                lines.append(
                    f"| {test} | {LABELS[key]} | {m['energy_mae']:.1f} | {m['energy_mae_per_atom']:.2f} | "
                    f"{m['energy_rmse']:.1f} | {m['energy_rmse_per_atom']:.2f} | {m['forces_mae']:.1f} | "
                    f"{m['forces_rmse']:.1f} |" + (stress if has_stress else "") +
                    f" {ratio(m['energy_mae'], base and base['energy_mae'])} |"
                    f" {ratio(m['forces_mae'], base and base['forces_mae'])} |"
                )  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def plot(dataset: str, entry: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = entry["tests"]
    time_key = "cpu_seconds" if entry.get("clock") == "cpu" else "seconds"
    fig, axes = plt.subplots(1, len(tests), figsize=(5.5 * len(tests), 4.2), squeeze=False)
    for ax, test in zip(axes[0], tests):
        for key, run in entry["models"].items():
            xs = [point[time_key] / 60 for point in run["curve"]]
            ys = [point["metrics"][test]["forces_mae"] for point in run["curve"]]
            ax.plot(xs, ys, marker="o", markersize=3, label=f"{LABELS[key]} ({run['num_params'] / 1e3:.0f}k)")
        if entry["budget_s"]:
            ax.axvline(entry["budget_s"] / 60, color="grey", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        what = "CPU time per thread" if time_key == "cpu_seconds" else "wall time"
        ax.set_xlabel(f"training {what} (min, {entry['threads']} threads)")
        ax.set_ylabel("test force MAE (meV/A)")
        ax.set_title(f"{dataset}: test {test} ({entry['curve_frames'][test]} frames)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- main


def prepare(name: str, args) -> dict:
    """LMDBs, the split as XYZ for MACE, statistics."""
    import ase.io

    spec = DATASETS[name]
    root = args.work_dir / name
    data_dir = root / "lmdb"
    convert(name, spec, data_dir, args.seed, args.reconvert)
    train_frames = read_frames(spec["train"])
    val = set(validation_indices(train_frames, data_dir / "s2ef" / "val"))
    files = {"train": root / "mace_train.xyz", "valid": root / "mace_valid.xyz"}
    ase.io.write(files["train"], [a for i, a in enumerate(train_frames) if i not in val], format="extxyz")
    ase.io.write(files["valid"], [a for i, a in enumerate(train_frames) if i in val], format="extxyz")
    stress = has_stress(train_frames)
    if spec["isolated"] is not None:
        e0s = (
            "{"
            + ", ".join(f"{z}: {e!r}" for z, e in sorted(isolated_energies(spec["isolated"]).items()))
            + "}"
        )
    else:
        e0s = "average"
    train_only = [a for i, a in enumerate(train_frames) if i not in val]
    curve_files = {}
    for test, path in spec["tests"].items():  # the learning curve's subset of each test file
        curve_files[test] = root / f"curve_{test}.xyz"
        ase.io.write(curve_files[test], curve_subset(read_frames(path), args.curve_frames), format="extxyz")
    return {"root": root, "curve_files": curve_files, "data_dir": data_dir, "files": files, "stress": stress,
            "e0s": e0s, "stats": graph_statistics(train_only), "periodic": spec["periodic"],
            "tests": spec["tests"],
            "counts": {"train": len(train_frames) - len(val), "val": len(val)}}  # fmt: skip


def train_and_evaluate(model: str, dataset: str, prep: dict, args, mace_py: Path | None) -> dict:
    budget, clock = args.minutes * 60, args.clock
    label = f"[{dataset}] {LABELS[model]}"
    run_dir = prep["root"] / model
    summary_path = run_dir / "summary.json"
    if args.reuse and summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("budget_s") == (None if args.epochs else budget) and summary.get("clock") == clock:
            log(f"{label}: reusing {summary_path}")
            return summary
    batch = args.batch_size
    steps_per_epoch = math.ceil(prep["counts"]["train"] / batch)

    def launch(directory: Path, epochs: int, keeper=None) -> dict:
        """One training run of ``epochs`` (the calibration run is a one-epoch run)."""
        if model == "mace":
            cmd = mace_command(mace_py.parent, "mace", directory, prep["files"], prep["e0s"], prep["stress"],
                               epochs, batch, args.seed)  # fmt: skip
            return run_mace(cmd, directory, args.threads, keeper)
        config = ours_config(model, prep["data_dir"], prep["periodic"], prep["stress"], epochs, batch,
                             prep["stats"], epochs * steps_per_epoch)  # fmt: skip
        return run_ours(model, config, directory, args.threads, args.seed, keeper)

    # calibration: one epoch, timed from launch to the training loop (start-up) and to the end
    calibration = {"exit": {"wall": 0.0, "cpu": 0.0}, "epoch_s": None}
    if args.epochs:
        epochs = args.epochs
        log(f"{label}: {epochs} epochs (--epochs, no calibration)")
    else:
        calibration = launch(run_dir / "calibration", 1)
        startup = calibration["loop_start"][clock]
        # one epoch and one validation: ours validates after its checkpoint, so up to the exit
        # (which follows at once); MACE validates before its checkpoint, then still compiles
        # and saves the model, so up to the checkpoint
        end = calibration["last_checkpoint" if model == "mace" else "exit"][clock]
        epoch_seconds = calibration["epoch_s"] = end - startup
        epochs = choose_epochs(budget, startup, epoch_seconds)
        log(f"{label}: calibration epoch {epoch_seconds:.1f} s after {startup:.1f} s of start-up ({clock} "
            f"clock) -> {epochs} epochs fit {args.minutes:g} min")  # fmt: skip
        if startup + epoch_seconds > budget:
            log(f"{label}: warning: one epoch does not fit the budget; running one")
    targets = [budget * k / args.curve_points for k in range(1, args.curve_points)]
    snapshots = run_dir / "snapshots"
    if snapshots.exists():
        shutil.rmtree(snapshots)
    keeper = SnapshotKeeper(snapshots, targets, clock, keep_all=bool(args.epochs))
    run = launch(run_dir / "train", epochs, keeper)
    startup, training = run["loop_start"], run["last_checkpoint"]
    summary = {
        "model": model, "clock": clock, "budget_s": None if args.epochs else budget, "epochs": run["epochs"],
        "training_s": training["wall"], "training_cpu_s": training["cpu"], "startup_s": startup["wall"],
        "seconds_per_epoch": (training["wall"] - startup["wall"]) / max(run["epochs"], 1),
        "cpu_seconds_per_epoch": (training["cpu"] - startup["cpu"]) / max(run["epochs"], 1),
        "calibration_s": calibration["exit"]["wall"], "calibration_epoch_s": calibration["epoch_s"],
        "load": run["load"], "command": run["command"],
    }  # fmt: skip
    log(f"{label}: trained {run['epochs']} epochs in {training['wall']:.0f} s wall, {training['cpu']:.0f} s "
        f"CPU/thread ({summary['seconds_per_epoch']:.1f} s/epoch wall, start-up {startup['wall']:.0f} s, "
        f"mean load {run['load']:.1f}); evaluating {len(keeper.kept)} checkpoints")  # fmt: skip
    if run["load"] > args.threads + 0.5:
        log(f"{label}: warning: the machine's load ({run['load']:.1f}) exceeded the {args.threads} threads "
            "of the run: something else competed for the CPU")  # fmt: skip
    if model == "mace":
        keeper.kept[-1]["model_file"] = run["model_file"]
    num_params, curve, final = evaluate(model, keeper.kept, prep, args, mace_py, run_dir)
    summary.update(num_params=num_params, curve=curve, final=final)
    final = ", ".join(
        f"{t}: F {m['forces_mae']:.1f} meV/A, E {m['energy_mae']:.1f} meV"
        for t, m in summary["final"].items()
    )
    log(f"{label}: {num_params:,} parameters; test {final}")
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget per model per data set")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="every model")
    parser.add_argument("--seed", type=int, default=0, help="split and training seed")
    parser.add_argument("--curve-points", type=int, default=8, help="checkpoints per learning curve (about)")
    parser.add_argument(
        "--curve-frames",
        type=int,
        default=200,
        help="frames of each test file for the curve's points (0: all)",
    )
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="budget and curves in wall time, or in the run's CPU time per thread (robust to other load)",
    )  # fmt: skip
    parser.add_argument(
        "--epochs", type=int, help="fixed epochs for every model instead of the budget (tests)"
    )
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "real_data")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--plots", type=Path, default=ROOT / "docs")
    parser.add_argument("--name", help="results file stem (default real_data_<datasets>_<date>)")
    parser.add_argument(
        "--omp-wait-policy", choices=["PASSIVE", "ACTIVE", "default"], default="PASSIVE",
        help="OMP_WAIT_POLICY of every run (default leaves the environment's)",
    )  # fmt: skip
    parser.add_argument("--reconvert", action="store_true", help="rebuild the LMDBs")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs of the same budget")
    args = parser.parse_args()
    args.work_dir = args.work_dir.resolve()
    global OMP_WAIT_POLICY
    OMP_WAIT_POLICY = "" if args.omp_wait_policy == "default" else args.omp_wait_policy
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if OMP_WAIT_POLICY:  # this process evaluates our models
        os.environ["OMP_WAIT_POLICY"] = OMP_WAIT_POLICY
    import torch

    torch.set_num_threads(args.threads)
    started = datetime.datetime.now()
    command = " ".join([Path(sys.executable).name, *sys.argv])
    mace_py = mace_python() if "mace" in args.models else None
    info = {"command": command, "date": started.isoformat(timespec="seconds"), "machine": machine(),
            "threads": args.threads, "versions": versions(mace_py)}  # fmt: skip
    log(f"{info['machine']['cpu']}, {args.threads} threads; budget {args.minutes:g} min per model per "
        f"data set ({args.clock} clock)")  # fmt: skip
    results = {}
    for dataset in args.datasets:
        prep = prepare(dataset, args)
        log(f"[{dataset}] {prep['counts']['train']} training + {prep['counts']['val']} validation frames; "
            f"tests {', '.join(prep['tests'])}; mean {prep['stats'][0]:.1f} atoms, "
            f"{prep['stats'][1]:.1f} neighbours within {CUTOFF} A")  # fmt: skip
        entry = {"tests": list(prep["tests"]), "counts": prep["counts"],
                 "budget_s": None if args.epochs else args.minutes * 60, "clock": args.clock,
                 "curve_frames": {t: len(read_frames(p)) for t, p in prep["curve_files"].items()},
                 "threads": args.threads, "models": {}}  # fmt: skip
        for model in args.models:
            entry["models"][model] = train_and_evaluate(model, dataset, prep, args, mace_py)
        results[dataset] = entry
        plot(dataset, entry, args.plots / f"real_data_{dataset}.png")
    report = tables(results)
    print()
    print(report)
    name = (
        args.name or f"real_data_{'_'.join(results)}_{started.date().isoformat()}"
    )  # never another run's file
    args.results.mkdir(parents=True, exist_ok=True)
    header = [f"# Real DFT data: Equiformers against MACE ({started.date().isoformat()})", "",
              f"Command: `{command}`", "",
              f"Machine: {info['machine']['cpu']} ({info['machine']['logical_cpus']} logical CPUs), "
              f"{args.threads} threads per run, models one after another. Versions: "
              + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".", "",
              "Training time: launch of the training command to its last checkpoint; the budget "
              f"counts {'CPU time per thread' if args.clock == 'cpu' else 'wall time'} "
              f"(`--clock {args.clock}`), OMP_WAIT_POLICY={OMP_WAIT_POLICY or 'unset'}. `load`: the "
              f"machine's mean 1-minute load average during the run ({args.threads} = the run alone). "
              "Test errors of the final checkpoint (EMA weights), float32, on the whole test files. "
              "`x` columns: the model's MAE / MACE's.", ""]  # fmt: skip
    (args.results / f"{name}.md").write_text("\n".join(header) + report + "\n")
    (args.results / f"{name}.json").write_text(
        json.dumps({**info, "results": results}, indent=1, default=str)
    )
    log(f"\nwrote {args.results / (name + '.md')}, {args.results / (name + '.json')} and "
        + ", ".join(str(args.plots / f"real_data_{d}.png") for d in results))  # fmt: skip


if __name__ == "__main__":
    main()
