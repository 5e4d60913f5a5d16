"""The shipped training configs (``configs/**/*.yml``): each loads with fairchem's own config loader,
builds its trainer and FULL-SIZE model through fairchem's launcher code, and takes one training step
on tiny EMT data; the released models have their released parameter counts; and misspelt keys fail."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ase.db import connect
from fairchem.core.common import distutils
from fairchem.core.common.flags import flags
from fairchem.core.common.utils import build_config, load_config, new_trainer_context

from fairchem_equiformers import ForcesTrainer

from .conftest import TINY_V2

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yml"))
CONFIG_IDS = [str(path.relative_to(CONFIG_DIR)) for path in CONFIGS]
RELAX_CONFIGS = [path for path in CONFIGS if "relax" in yaml.safe_load(path.read_text())["dataset"]]
NOISY_NODES = "fairchem_equiformers.NoisyNodesLmdbDataset"  # trains on IS2RE records (relaxed positions)
# The EquiformerV3 configs, the official recipes (see their headers), by plugin model: the official model
# of the same kind (`equiformer_v3`, or `equiformer_v3_dens` for the DeNS direct pre-training recipes).
V3_MODELS = {
    "fairchem_equiformers.EquiformerV3": "equiformer_v3",
    "fairchem_equiformers.EquiformerV3DeNS": "equiformer_v3_dens",
}
V3_CONFIGS = [path for path in CONFIGS if yaml.safe_load(path.read_text())["model"]["name"] in V3_MODELS]

# Parameter counts of the released checkpoints (README), by shipped config.
RELEASED_PARAMETERS = {
    "oc20/s2ef/2M/equiformer_v2_N@12_L@6_M@2.yml": 83_164_802,  # eq2_83M_2M
    "oc20/s2ef/all_md/equiformer_v2_N@8_L@4_M@2_31M.yml": 31_058_690,  # eq2_31M_ec4_allmd
    "oc20/s2ef/all_md/equiformer_v2_N@20_L@6_M@3_153M.yml": 153_602_690,  # eq2_153M_ec4_allmd
    "oc20/is2re/equiformer_v2_N@20_L@6_M@3_153M_relax.yml": 153_602_690,  # relaxes eq2_153M_ec4_allmd
    "oc22/s2ef/equiformer_v2_N@18_L@6_M@2_e4_f100_121M.yml": 121_526_492,  # eq2_121M_e4_f100_oc22_s2ef
}

# The released recipes (per-GPU batch, lr, epochs, warmup epochs, energy and force loss coefficients,
# gradient clipping, stochastic depth), from atomicarchitects/equiformer_v2 oc20/configs/s2ef/... and
# FAIR-Chem/fairchem configs/oc22/s2ef/equiformer_v2/... (see each config's header).
RECIPE_KEYS = ("batch", "lr", "epochs", "warmup_epochs", "energy", "forces", "clip", "drop_path")
RELEASED_RECIPES = {
    "oc20/s2ef/2M/equiformer_v2_N@12_L@6_M@2.yml": (4, 4e-4, 30, 0.1, 2, 100, 100, 0.05),
    "oc20/s2ef/all_md/equiformer_v2_N@8_L@4_M@2_31M.yml": (8, 4e-4, 3, 0.01, 4, 100, 100, 0.1),
    "oc20/s2ef/all_md/equiformer_v2_N@20_L@6_M@3_153M.yml": (4, 4e-4, 1, 0.01, 4, 100, 100, 0.1),
    "oc20/is2re/equiformer_v2_N@20_L@6_M@3_153M_relax.yml": (4, 4e-4, 1, 0.01, 4, 100, 100, 0.1),
    "oc22/s2ef/equiformer_v2_N@18_L@6_M@2_e4_f100_121M.yml": (4, 2e-4, 6, 0.1, 4, 100, 50, 0.1),
}

# Top-level keys of a config FILE that fairchem 1.10's launcher (`fairchem` = fairchem.core._cli:main)
# reads for a single-task trainer; any other key is silently ignored by fairchem, so it is a typo here.
LAUNCHER_KEYS = {
    "includes",  # common/utils.py load_config
    # common/utils.py new_trainer_context (-> trainer constructor) and _cli.py main (slurm)
    "trainer", "model", "optim", "dataset", "task", "outputs", "loss_functions", "evaluation_metrics",
    "logger", "slurm",
    "hide_eval_progressbar",  # tasks/task.py
    "timeout", "use_cuda_visibile_devices",  # common/distutils.py setup (the misspelling is fairchem's)
    "skip_experimental_imports",  # common/utils.py setup_imports
}  # fmt: skip
# Read only when the trainer's name contains "multitask" (new_trainer_context).
MULTITASK_KEYS = {"tasks", "datasets", "combined_dataset", "evaluations"}


def cli_owned_keys(workdir: Path) -> set[str]:
    """Keys that build_config sets from the command line, overwriting whatever a config file says
    (mode, seed, amp, checkpoint, cpu, ...): in a file they would be silently ineffective."""
    empty = workdir / "empty.yml"
    empty.write_text("{}\n")
    args, overrides = flags.get_parser().parse_known_args(["--mode", "train", "--config-yml", str(empty)])
    return set(build_config(args, overrides))


def unknown_top_level_keys(config: dict) -> list[str]:
    allowed = set(LAUNCHER_KEYS)
    if "multitask" in str(config.get("trainer", "")):
        allowed |= MULTITASK_KEYS
    return sorted(set(config) - allowed)


def load_shipped(path: Path) -> dict:
    """The config as fairchem loads it (includes resolved); shipped configs have none."""
    config, duplicates_warning, duplicates_error = load_config(str(path))
    assert not duplicates_warning and not duplicates_error
    return config


# ---------------------------------------------------------------------------------------------------
# Tiny data in place of the released datasets


def linear_reference_coefficients(database: Path) -> np.ndarray:
    """Per-element energy references least-squares fitted on the tiny data (100 elements)."""
    rows = list(connect(database).select())
    counts = np.zeros((len(rows), 100))
    for i, row in enumerate(rows):
        np.add.at(counts[i], row.numbers, 1)
    return np.linalg.lstsq(counts, np.array([row.energy for row in rows]), rcond=None)[0]


def write_references(database: Path, out: Path) -> Path:
    """A per-target element-reference file fitted on the tiny data, in the format its suffix implies:
    OC22's legacy npz (`coeff`) or fairchem's .pt state dict."""
    coeff = linear_reference_coefficients(database)
    if out.suffix == ".npz":
        np.savez(out, coeff=coeff)
    else:
        torch.save({"element_references": torch.tensor(coeff)}, out)
    return out


def write_metadata(database: Path, out: Path) -> Path:
    """Atom counts per structure: what `load_balancing: atoms` reads (fairchem's make_lmdb_sizes)."""
    np.savez(out, natoms=np.array([row.natoms for row in connect(database).select()], dtype=np.int32))
    return out


def tiny_transforms(shipped: dict, outputs: dict, database: Path, workdir: Path) -> dict:
    """The shipped train transforms with every file that points at real data replaced: per-target
    reference files by files fitted on the tiny data (same format), other reference or normalizer files
    by fairchem's own fit on the tiny train set. Explicit normalizer values are kept as shipped."""
    transforms = copy.deepcopy(shipped)
    scalar_targets = [
        name
        for name, spec in outputs.items()
        if spec.get("level", "system") == "system" and spec.get("shape", 1) == 1
    ]
    references = transforms.get("element_references")
    if references:
        if "file" in references:  # one file for all targets
            references.pop("file")
            references["fit"] = {"targets": scalar_targets, "batch_size": 4}
        for target, settings in references.items():
            if target != "fit" and "file" in settings:
                suffix = Path(settings["file"]).suffix
                settings["file"] = str(write_references(database, workdir / f"references_{target}{suffix}"))
    normalizer = transforms.get("normalizer")
    if normalizer and "file" in normalizer and set(normalizer) == {"file"}:
        # a dataset written by fairchem-equiformers-data: one scale for every target (the force RMS)
        forces = np.concatenate([row.forces for row in connect(database).select()])
        scale = float(np.sqrt((forces**2).sum(axis=1).mean()))
        return transforms | {"normalizer": {target: {"mean": 0.0, "rmsd": scale} for target in outputs}}
    if normalizer:
        to_fit = [t for t in outputs if t not in normalizer] if normalizer.pop("file", None) else []
        for target in list(normalizer):
            if target != "fit" and "file" in normalizer[target]:
                normalizer.pop(target)
                to_fit.append(target)
        if to_fit:
            normalizer["fit"] = {"targets": {t: {} for t in to_fit}, "batch_size": 4}
    return transforms


def tiny_datasets(
    shipped: dict, outputs: dict, database: Path, workdir: Path, is2re: Path | None = None
) -> dict:
    """The shipped dataset section with every split replaced by the tiny ASE database; the train split
    keeps its transforms (see tiny_transforms). Noisy Nodes configs keep their dataset settings and
    read a copy of the EMT IS2RE splits under ``is2re`` instead (relaxed positions are needed)."""
    if shipped.get("train", {}).get("format") == NOISY_NODES:
        shutil.copytree(is2re / "is2re", workdir / "is2re")  # a private copy: LMDBs open once per process
        datasets = {
            split: shipped[split] | {"src": str(workdir / "is2re" / split)} for split in ("train", "val")
        }
        datasets["train"]["transforms"] = tiny_transforms(
            shipped["train"]["transforms"], outputs, database, workdir
        )
        return datasets
    tiny = {
        "format": "ase_db",
        "src": str(database),
        "a2g_args": {"r_energy": True, "r_forces": True, "r_stress": "stress" in outputs},
        "metadata_path": str(write_metadata(database, workdir / "metadata.npz")),
    }
    datasets = {split: dict(tiny) for split in ("train", "val", "test") if split in shipped}
    datasets["train"] = dict(tiny)  # also where the shipped config has only transforms (relaxations)
    transforms = shipped.get("train", {}).get("transforms")
    if transforms:
        datasets["train"]["transforms"] = tiny_transforms(transforms, outputs, database, workdir)
    if "relax" in shipped:
        datasets["relax"] = {**tiny, "use_train_settings": False}
    return datasets


@contextlib.contextmanager
def build_trainer(config: dict, workdir: Path, name: str):
    """The trainer fairchem's launcher builds from ``config`` (the code path of `fairchem --mode train`)."""
    run_dir = workdir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yml"
    path.write_text(yaml.safe_dump(config))
    argv = ["--mode", "train", "--config-yml", str(path), "--run-dir", str(run_dir), "--cpu"]
    args, overrides = flags.get_parser().parse_known_args([*argv, "--identifier", name])
    try:
        with new_trainer_context(config=build_config(args, overrides)) as ctx:
            ctx.task.setup(ctx.trainer)
            yield ctx.trainer
    finally:  # a trainer that fails to build leaves fairchem's process group behind
        if torch.distributed.is_initialized():
            distutils.cleanup()


def qm9_datasets(shipped: dict, qm9_dataset: Path) -> dict:
    """The shipped QM9 dataset section (``data/qm9/...``) pointed at the tiny generated set."""
    return yaml.safe_load(yaml.safe_dump(shipped).replace("data/qm9", str(qm9_dataset)))


def tiny_config(
    path: Path, database: Path, workdir: Path, is2re: Path | None = None, qm9_dataset: Path | None = None
) -> dict:
    """The shipped config with only its datasets replaced and batches of one structure (no workers):
    the tiny EMT data, or for QM9 property configs the tiny QM9-style set."""
    config = load_shipped(path)
    if qm9_dataset is not None:
        config["dataset"] = qm9_datasets(config["dataset"], qm9_dataset)
    else:
        config["dataset"] = tiny_datasets(config["dataset"], config["outputs"], database, workdir, is2re)
    config["optim"] |= {"batch_size": 1, "eval_batch_size": 1, "num_workers": 0}
    # one batch is one optimiser update, with a learning rate above 0 (the EquiformerV3 fine-tunes warm
    # up from 0, so their first update would not move the weights)
    config["optim"]["grad_accumulation_steps"] = 1
    schedule = config["optim"].get("scheduler_params", {})
    if schedule.get("warmup_factor") == 0.0:
        schedule["warmup_factor"] = 0.2
    return config


def one_training_step(trainer: ForcesTrainer) -> float:
    """One iteration of fairchem's OCPTrainer.train loop: forward, loss, backward + optimizer step."""
    trainer.model.train()
    batch = next(iter(trainer.train_loader))
    trainer.step = 1
    out = trainer._forward(batch)
    loss = trainer._compute_loss(out, batch)
    trainer._backward(loss)
    trainer.scheduler.step()
    return loss.item()


# ---------------------------------------------------------------------------------------------------


def test_every_release_has_a_config():
    assert set(RELEASED_PARAMETERS) <= set(CONFIG_IDS)
    assert set(RELEASED_RECIPES) == set(RELEASED_PARAMETERS)


@pytest.mark.parametrize("name", sorted(RELEASED_RECIPES))
def test_released_recipe(name):
    config = load_shipped(CONFIG_DIR / name)
    optim = config["optim"]
    coefficients = {k: v["coefficient"] for loss in config["loss_functions"] for k, v in loss.items()}
    got = (
        optim["batch_size"],
        optim["lr_initial"],
        optim["max_epochs"],
        optim["scheduler_params"]["warmup_epochs"],
        coefficients["energy"],
        coefficients["forces"],
        optim["clip_grad_norm"],
        config["model"]["drop_path_rate"],
    )
    assert dict(zip(RECIPE_KEYS, got)) == dict(zip(RECIPE_KEYS, RELEASED_RECIPES[name]))
    assert optim["optimizer"] == "AdamW" and optim["optimizer_params"] == {"weight_decay": 0.001}
    schedule = optim["scheduler_params"]
    assert optim["scheduler"] == "LambdaLR" and schedule["lambda_type"] == "cosine"
    assert schedule["warmup_factor"] == 0.2 and schedule["lr_min_factor"] == 0.01
    assert optim["ema_decay"] == 0.999 and optim.get("grad_accumulation_steps", 1) == 1
    assert config["model"]["alpha_drop"] == 0.1 and config["model"]["weight_init"] == "uniform"


@pytest.mark.parametrize("path", V3_CONFIGS, ids=[str(p.relative_to(CONFIG_DIR)) for p in V3_CONFIGS])
def test_v3_config_has_the_official_parameter_count(path):
    """The plugin's model and the official model of the same kind (``equiformer_v3`` or
    ``equiformer_v3_dens``) built from the config's model section have the same number of parameters."""
    try:
        import equiformer_v3  # noqa: F401  (registers the official "equiformer_v3" and "equiformer_v3_dens")
    except ImportError:
        if os.environ.get("CI") is not None:
            raise
        pytest.skip("the official equiformer_v3 package is not installed")
    from fairchem.core.common.registry import registry

    model_keys = dict(load_shipped(path)["model"])
    name = model_keys.pop("name")
    torch.manual_seed(0)
    official = registry.get_model_class(V3_MODELS[name])(**copy.deepcopy(model_keys))
    plugin = registry.get_model_class(name)(**copy.deepcopy(model_keys))
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(plugin) == count(official)


def test_v3_configs_are_the_official_recipes():
    found = {str(p.relative_to(CONFIG_DIR)): load_shipped(p)["model"]["name"] for p in V3_CONFIGS}
    dens, plain = "fairchem_equiformers.EquiformerV3DeNS", "fairchem_equiformers.EquiformerV3"
    assert found == {
        "mptrj/equiformer_v3_N@7_L@4_M@2.yml": dens,  # the DeNS direct pre-training recipes
        "omat24/equiformer_v3_N@7_L@4_M@2.yml": dens,
        "omat24/equiformer_v3_N@7_L@6_M@2.yml": dens,
        "mptrj/equiformer_v3_grad_N@7_L@4_M@2.yml": plain,  # the gradient fine-tunes
        "omat24/equiformer_v3_grad_N@7_L@4_M@2.yml": plain,
        "omat24/equiformer_v3_grad_N@7_L@6_M@2.yml": plain,
        "salex_mptrj/equiformer_v3_grad_N@7_L@4_M@2.yml": plain,
        "oc20/s2ef/2M/equiformer_v3_N@8_L@6_M@2.yml": plain,  # the OC20 base
    }
    for path in V3_CONFIGS:  # DeNS training exactly where the model has DeNS
        config = load_shipped(path)
        assert config["optim"].get("use_denoising_pos", False) == (config["model"]["name"] == dens)


def test_launcher_keys_are_not_command_line_keys(tmp_path):
    cli_keys = cli_owned_keys(tmp_path)
    assert {"mode", "seed", "amp", "checkpoint", "cpu", "identifier", "run_dir"} <= cli_keys
    assert not (LAUNCHER_KEYS | MULTITASK_KEYS) & cli_keys


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_config_is_self_contained_and_uses_current_keys(path):
    raw = yaml.safe_load(path.read_text())
    assert "includes" not in raw  # self-contained
    assert unknown_top_level_keys(raw) == []
    assert raw["trainer"].startswith("fairchem_equiformers.")
    assert raw["model"]["name"].startswith("fairchem_equiformers.")
    if str(path.relative_to(CONFIG_DIR)) in RELEASED_PARAMETERS:  # see the configs' comments
        assert raw["model"]["num_distance_basis"] == 600 and "num_sphere_samples" not in raw["model"]
    legacy = {"energy_coefficient", "force_coefficient", "loss_energy", "loss_force", "loss_forces"}
    assert not legacy & set(raw["optim"])
    assert raw["loss_functions"] and raw["outputs"] and raw["evaluation_metrics"]
    for split in raw["dataset"].values():  # fairchem 1.10 ignores `lin_ref` in oc22_lmdb datasets
        assert "lin_ref" not in split and "normalize_labels" not in split


# ~1 minute for the whole file on 2 idle cores (the three >100M models ~13 s each), so not marked slow.
@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_config_builds_the_released_model_and_trains_one_step(path, emt_database, tmp_path, request):
    qm9 = request.getfixturevalue("qm9_dataset") if path.parent.name == "qm9" else None
    noisy_nodes = yaml.safe_load(path.read_text())["dataset"]["train"].get("format") == NOISY_NODES
    is2re = request.getfixturevalue("emt_is2re_dataset") if noisy_nodes else None  # built only if needed
    config = tiny_config(path, emt_database, tmp_path, is2re, qm9)
    with build_trainer(config, tmp_path, path.stem) as trainer:
        assert isinstance(trainer, ForcesTrainer)
        model = trainer._unwrapped_model
        assert type(model).__module__.startswith("fairchem_equiformers.")
        count = sum(p.numel() for p in model.parameters())
        released = RELEASED_PARAMETERS.get(str(path.relative_to(CONFIG_DIR)))
        if released is not None:
            assert count == released
        # the shipped normalisation and references are in place
        transforms = config["dataset"]["train"].get("transforms", {})
        for target, settings in transforms.get("normalizer", {}).items():
            if target not in ("fit", "file"):  # explicit values (a file's are the tiny set's own)
                rmsd = settings.get("rmsd", settings.get("stdev"))
                assert trainer.normalizers[target].mean.item() == pytest.approx(settings.get("mean", 0.0))
                assert trainer.normalizers[target].rmsd.item() == pytest.approx(rmsd)
        expected_references = set(transforms.get("element_references", {})) - {"fit", "file"}
        assert expected_references <= set(trainer.elementrefs)
        assert len(trainer.loss_functions) == len(config["loss_functions"])

        before = [p.detach().clone() for p in model.parameters()]
        loss = one_training_step(trainer)
        assert math.isfinite(loss) and loss > 0
        changed = sum(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))
        assert changed > 0.5 * len(before)  # AdamW moved most tensors (some get no gradient)
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("path", RELAX_CONFIGS, ids=[p.stem for p in RELAX_CONFIGS])
def test_relaxation_config_runs_with_the_stock_cli(path, emt_database, tmp_path):
    """`fairchem --mode run-relaxations` with the shipped dataset (a train split without data) and task
    sections; only the relax path (tiny data) and, to keep it quick, the model (tiny) are swapped."""
    tiny_model = {"name": "fairchem_equiformers.EquiformerV2", **TINY_V2, "num_layers": 1}
    config = tiny_config(path, emt_database, tmp_path) | {"model": tiny_model}
    with build_trainer(config, tmp_path, "checkpoint") as trainer:
        checkpoint = trainer.save(checkpoint_file="checkpoint.pt")

    shipped = load_shipped(path)
    shipped["model"] = tiny_model
    tiny = tiny_datasets(shipped["dataset"], shipped["outputs"], emt_database, tmp_path)
    shipped["dataset"]["relax"] = tiny["relax"]  # the train split stays as shipped
    shipped["task"]["relaxation_steps"] = 2
    shipped["task"]["relax_opt"]["traj_dir"] = str(tmp_path / "trajectories")
    (tmp_path / "relax.yml").write_text(yaml.safe_dump(shipped))
    fairchem = Path(sys.executable).with_name("fairchem")
    argv = ["--mode", "run-relaxations", "--config-yml", str(tmp_path / "relax.yml"), "--cpu"]
    argv += ["--checkpoint", checkpoint, "--run-dir", str(tmp_path / "run")]
    result = subprocess.run([str(fairchem), *argv], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "trajectories").glob("*.traj"))) == len(connect(emt_database))
    (positions,) = (tmp_path / "run").rglob("relaxed_positions.npz")

    # the relaxation outputs are what the IS2RE / IS2RS submission command reads
    from fairchem_equiformers.tools.submission import load_split

    is2re = load_split("is2re", "id", tmp_path / "trajectories")
    is2rs = load_split("is2rs", "id", positions)
    num_systems = len(connect(emt_database))
    assert is2re.n_systems == is2rs.n_systems == num_systems
    assert np.isfinite(is2re.energy).all()
    assert is2rs.n_atoms == sum(row.natoms for row in connect(emt_database).select())


def test_misspelt_keys_fail(emt_database, tmp_path):
    path = CONFIG_DIR / "oc20/s2ef/all_md/equiformer_v2_N@8_L@4_M@2_31M.yml"
    config = tiny_config(path, emt_database, tmp_path)

    bad_model = copy.deepcopy(config)
    bad_model["model"]["num_layer"] = 8
    with pytest.raises(TypeError, match="num_layer"):
        with build_trainer(bad_model, tmp_path, "model_typo"):
            pass

    bad_optim = copy.deepcopy(config)
    bad_optim["optim"]["lr_inital"] = 4e-4
    with pytest.raises(ValueError, match="lr_inital"):
        with build_trainer(bad_optim, tmp_path, "optim_typo"):
            pass

    bad_schedule = copy.deepcopy(config)
    bad_schedule["optim"]["scheduler_params"]["warmup_epoch"] = 0.01
    with pytest.raises(ValueError, match="warmup_epoch"):
        with build_trainer(bad_schedule, tmp_path, "schedule_typo"):
            pass

    # fairchem ignores unknown top-level keys (and overwrites command-line ones), so the checker does
    bad_top = copy.deepcopy(config) | {"optm": {"lr_initial": 1.0}, "seed": 3}
    assert unknown_top_level_keys(bad_top) == ["optm", "seed"]
    assert unknown_top_level_keys(config) == []
