"""Registration with fairchem's registry and the stock ``fairchem`` CLI running plugin configs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from .conftest import TINY_V2, cli_config

BUILTIN_MODELS = {
    "equiformer_v2", "equiformer_v2_backbone", "equiformerV2_scalar_head", "equiformerV2_vector_head",
    "equiformer_v2_energy_head", "equiformer_v2_force_head", "equiformer_v2_dens_backbone", "escn", "hydra",
}  # fmt: skip
BUILTIN_TRAINERS = {
    "ocp",
    "forces",
    "energy",
    "equiformerv2_forces",
    "equiformerv2_energy",
    "equiformerv2_dens",
}


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_full_class_path_resolves_without_importing_the_plugin():
    out = run_python(
        """
        import sys
        from fairchem.core.common.registry import registry
        assert "fairchem_equiformers" not in sys.modules
        for name in ("EquiformerV2", "DEQEquiformerV1"):
            cls = registry.get_model_class(f"fairchem_equiformers.{name}")
            print(cls.__module__, cls.__name__)
        """
    )
    assert out.split() == [
        "fairchem_equiformers.equiformer_v2.model", "EquiformerV2",
        "fairchem_equiformers.deq.model", "DEQEquiformerV1",
    ]  # fmt: skip


def test_registered_names_do_not_shadow_fairchem_builtins():
    out = run_python(
        """
        from fairchem.core.common.registry import registry
        from fairchem.core.common.utils import setup_imports
        setup_imports()
        before = {k: dict(v) for k, v in registry.mapping.items() if isinstance(v, dict)}
        import fairchem_equiformers
        for kind, names in before.items():
            for name, obj in names.items():
                assert registry.mapping[kind][name] is obj, (kind, name)
        new = {k: sorted(set(registry.mapping[k]) - set(v)) for k, v in before.items()}
        print({k: v for k, v in new.items() if v})
        """
    )
    new = eval(out.strip())
    import fairchem_equiformers

    models = sorted(
        f"fairchem_equiformers.{name}"
        for name in fairchem_equiformers.__all__
        if name not in ("ForcesTrainer", *DATASETS) and isinstance(getattr(fairchem_equiformers, name), type)
    )  # every exported class but the trainer and the datasets (keep_freed_memory is a function)
    for name in ("EquiformerV1", "EquiformerV2", "E2Former", "DEQEquiformerV1", "DEQEquiformerV2"):
        assert f"fairchem_equiformers.{name}" in models
    assert new["model_name_mapping"] == models
    assert new["trainer_name_mapping"] == ["fairchem_equiformers.ForcesTrainer"]
    assert new["dataset_name_mapping"] == [f"fairchem_equiformers.{name}" for name in DATASETS]
    assert not set(new["model_name_mapping"]) & BUILTIN_MODELS
    assert not set(new.get("trainer_name_mapping", [])) & BUILTIN_TRAINERS


DATASETS = ("NoisyNodesLmdbDataset", "OC20TotalEnergyLmdbDataset")  # registered datasets, sorted


def test_top_level_exports():
    from fairchem.core.common.registry import registry

    import fairchem_equiformers

    kinds = {"ForcesTrainer": registry.get_trainer_class}
    kinds |= {name: registry.get_dataset_class for name in DATASETS}
    for name in fairchem_equiformers.__all__:
        cls = getattr(fairchem_equiformers, name)
        kind = kinds.get(name, registry.get_model_class)
        assert kind(f"fairchem_equiformers.{name}") is cls


def run_fairchem(config: dict, run_dir: Path, *args: str) -> str:
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    fairchem = str(Path(sys.executable).parent / "fairchem")  # the CLI of this environment
    cmd = [fairchem, "--config-yml", str(config_path), "--run-dir", str(run_dir), "--cpu", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=run_dir)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return log


PLUGIN_MODEL = {"name": "fairchem_equiformers.EquiformerV2", **TINY_V2}


def test_stock_cli_trains_plugin_model(emt_database, tmp_path):
    log = run_fairchem(
        cli_config(emt_database, PLUGIN_MODEL), tmp_path, "--mode", "train", "--identifier", "one"
    )
    assert re.search(r"Loaded EquiformerV2 with \d+ parameters", log)
    assert list(tmp_path.glob("checkpoints/*/checkpoint.pt"))


def test_stock_cli_two_ranks_resolve_plugin_model(emt_database, tmp_path):
    log = run_fairchem(
        cli_config(emt_database, PLUGIN_MODEL),
        tmp_path,
        "--mode",
        "train",
        "--num-gpus",
        "2",
        "--identifier",
        "two",
    )
    assert re.search(r"Loaded EquiformerV2 with \d+ parameters", log)
    assert list(tmp_path.glob("checkpoints/*/checkpoint.pt"))


def validation_metrics(log: str) -> dict[str, float]:
    """The last ``energy_mae: ..., forces_mae: ...`` line fairchem logs in validate mode."""
    found = re.findall(r"(energy_mae|forces_mae): ([0-9.eE+-]+)", log)
    return {key: float(value) for key, value in found}


def test_stock_cli_validates_released_checkpoint_like_the_reference(emt_database, tmp_path):
    """A checkpoint in the released layout (module.module.*, per-block buffers) validated with
    fairchem's --checkpoint path gives the reference's metrics."""
    from fairchem.core.models.equiformer_v2.equiformer_v2_deprecated import EquiformerV2 as Reference

    config = {k: v for k, v in TINY_V2.items()}
    torch.manual_seed(0)
    reference = Reference(**config)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    checkpoint = tmp_path / "released.pt"
    state = {"module.module." + k: v for k, v in reference.state_dict().items()}
    torch.save({"state_dict": state, "normalizers": {}, "epoch": 0, "step": 0}, checkpoint)
    metrics = {}
    for name in ["equiformer_v2", "fairchem_equiformers.EquiformerV2"]:
        log = run_fairchem(
            cli_config(emt_database, {**config, "name": name}),
            tmp_path / name, "--mode", "validate", "--checkpoint", str(checkpoint),
        )  # fmt: skip
        metrics[name] = validation_metrics(log)
    print(metrics)
    ours, ref = metrics["fairchem_equiformers.EquiformerV2"], metrics["equiformer_v2"]
    for key in ("energy_mae", "forces_mae"):
        assert ours[key] == pytest.approx(ref[key], rel=1e-4)
