"""The forces trainer: schedules, weight-decay groups, EMA, accumulation, atomic checkpoints
and resuming, with fairchem's own launcher code building the trainer in-process."""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fairchem.core.common.flags import flags
from fairchem.core.common.registry import registry
from fairchem.core.common.utils import build_config, new_trainer_context
from fairchem.core.models.equiformer_v2.equiformer_v2_deprecated import EquiformerV2 as Reference
from fairchem.core.models.equiformer_v2.trainers.lr_scheduler import CosineLRLambda

from fairchem_equiformers import EquiformerV2, ForcesTrainer
from fairchem_equiformers.training import LRScheduler, no_weight_decay_names

from .conftest import TINY_V2, cli_config, slab_with_adsorbate, to_batch
from .test_common_model_keys import COMMON, COMMON_KEYS, MODELS, TINY


def scheduler_for(optim: dict, batches_per_epoch: int) -> LRScheduler:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=optim["lr_initial"])
    return LRScheduler(optimizer, optim, batches_per_epoch)


def lrs(scheduler: LRScheduler, batches: int) -> list[float]:
    out = []
    for _ in range(batches):
        out.append(scheduler.get_lr())
        scheduler.step()
    return out


COSINE = {
    "lr_initial": 4e-4,
    "max_epochs": 3,
    "scheduler": "LambdaLR",
    "scheduler_params": {
        "lambda_type": "cosine",
        "warmup_factor": 0.2,
        "warmup_epochs": 0.5,
        "lr_min_factor": 0.01,
    },
}


def test_cosine_schedule_matches_closed_form_and_reference():
    optim = copy.deepcopy(COSINE)
    got = lrs(scheduler_for(optim, batches_per_epoch=10), 35)
    assert optim == COSINE  # the user's config is not mutated
    warmup, total = 5.0, 30.0
    for step, lr in enumerate(got):
        if step <= warmup:
            expected = 0.2 + (1 - 0.2) * step / warmup
        elif step < total:
            expected = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / total))
        else:
            expected = 0.01
        assert lr == pytest.approx(4e-4 * expected, rel=1e-12)
    # fairchem's EquiformerV2 trainer lambda, with the same steps (it needs integer epochs)
    reference = CosineLRLambda(
        {"warmup_epochs": 5, "warmup_factor": 0.2, "epochs": 30, "lr_min_factor": 0.01}
    )
    assert got == pytest.approx([4e-4 * reference(s) for s in range(35)], rel=1e-12)


def test_warmup_shorter_than_one_batch_and_other_schedules():
    short = copy.deepcopy(COSINE)
    short["scheduler_params"]["warmup_epochs"] = 0.01  # 0.1 batch: the host trainer divides by zero
    got = lrs(scheduler_for(short, batches_per_epoch=10), 3)
    assert got[0] == pytest.approx(4e-4 * 0.2) and got[1] == pytest.approx(
        4e-4 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi / 30)))
    )

    multistep = {
        "lr_initial": 1e-3,
        "max_epochs": 4,
        "scheduler": "LambdaLR",
        "scheduler_params": {
            "lambda_type": "multistep",
            "warmup_epochs": 0.2,
            "warmup_factor": 0.5,
            "decay_epochs": [1, 2.5],
            "decay_rate": 0.1,
        },
    }
    got = lrs(scheduler_for(multistep, batches_per_epoch=10), 40)
    assert got[0] == pytest.approx(5e-4) and got[1] == pytest.approx(7.5e-4) and got[2] == pytest.approx(1e-3)
    assert got[9] == pytest.approx(1e-3) and got[10] == pytest.approx(1e-4)
    assert got[24] == pytest.approx(1e-4) and got[25] == pytest.approx(1e-5)

    constant = {"lr_initial": 2e-3, "max_epochs": 1, "scheduler": "Null"}
    assert lrs(scheduler_for(constant, 5), 5) == [2e-3] * 5


def test_schedule_config_errors_name_the_key():
    bad = copy.deepcopy(COSINE)
    bad["scheduler_params"]["decay_rate"] = 0.1
    with pytest.raises(ValueError, match="decay_rate"):
        scheduler_for(bad, 10)
    with pytest.raises(ValueError, match="lambda_type"):
        scheduler_for({**COSINE, "scheduler_params": {"lambda_type": "linear"}}, 10)


def test_weight_decay_groups_follow_the_official_rule():
    config = {**TINY_V2, "num_layers": 1}
    ours = EquiformerV2(**config)
    exempt = no_weight_decay_names(ours)
    reference = Reference(**config)
    assert exempt == set(reference.no_weight_decay())  # the released model's own list
    for name in [
        "blocks.0.norm_1.norm_l0.weight",
        "blocks.0.norm_1.affine_weight",
        "blocks.0.ga.proj.bias",
        "blocks.0.ga.alpha_norm.weight",
        "blocks.0.ga.so2_conv_1.rad_func.net.1.bias",
        "norm.affine_weight",
    ]:
        assert name in exempt
    for name in [
        "blocks.0.ga.so2_conv_1.fc_m0.weight",
        "sphere_embedding.weight",
        "blocks.0.ga.alpha_dot",
        "blocks.0.ffn.grid_mlp.0.weight",
        "blocks.0.ga.proj.weight",
    ]:
        assert name not in exempt


def test_weight_decay_groups_for_a_fairchem_model():
    reference = Reference(**{**TINY_V2, "num_layers": 1})
    exempt = no_weight_decay_names(reference)
    assert set(reference.no_weight_decay()) <= exempt
    assert "blocks.0.ga.so2_conv_1.fc_m0.weight" not in exempt


@contextlib.contextmanager
def make_trainer(
    tmp_path: Path,
    config: dict,
    name: str,
    mode: str = "train",
    checkpoint: str | None = None,
    gpu: bool = False,
):
    """A trainer built by fairchem's own launcher code from ``config`` (as the CLI would): on the
    CPU (``--cpu``), or with ``gpu`` on the GPU with mixed precision (``--amp``)."""
    run_dir = tmp_path / name
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yml"
    path.write_text(yaml.safe_dump(config))
    argv = [
        "--mode",
        mode,
        "--config-yml",
        str(path),
        "--run-dir",
        str(run_dir),
        "--amp" if gpu else "--cpu",
        "--identifier",
        name,
    ]
    if checkpoint:
        argv += ["--checkpoint", checkpoint]
    args, overrides = flags.get_parser().parse_known_args(argv)
    try:
        with new_trainer_context(config=build_config(args, overrides)) as ctx:
            ctx.task.setup(ctx.trainer)  # loads --checkpoint, as fairchem's runner does
            yield ctx.trainer
    finally:  # a trainer that failed to build leaves fairchem's process group behind
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


MODEL = {"name": "fairchem_equiformers.EquiformerV2", **TINY_V2, "num_layers": 1}


def trainer_config(database, **optim):
    config = cli_config(database, MODEL, **optim)
    config["trainer"] = "fairchem_equiformers.ForcesTrainer"
    return config


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_gradient_accumulation_2x4_equals_1x8(emt_database, tmp_path):
    """Same update (SGD, so the update is the gradient itself; equal-size structures)."""
    weights = {}
    for name, batch, steps in [("one_by_eight", 8, 1), ("two_by_four", 4, 2)]:
        config = trainer_config(
            emt_database, batch_size=batch, grad_accumulation_steps=steps, eval_every=100, optimizer="SGD"
        )
        with make_trainer(tmp_path, config, name) as trainer:
            assert isinstance(trainer, ForcesTrainer)
            start = flat_params(trainer.model)
            trainer.train()
            weights[name] = flat_params(trainer.model)
            assert not torch.equal(weights[name], start)
    torch.testing.assert_close(weights["two_by_four"], weights["one_by_eight"], rtol=1e-5, atol=1e-7)


def test_ema_weights_are_used_for_validation_and_saved(emt_database, tmp_path):
    config = trainer_config(
        emt_database, ema_decay=0.5, max_epochs=2, eval_every=100, checkpoint_every=4, lr_initial=5e-3
    )
    with make_trainer(tmp_path, config, "ema") as trainer:
        trainer.train()
        with_ema = trainer.validate(split="val", disable_tqdm=True)["forces_mae"]["metric"]
        ema, trainer.ema = trainer.ema, None
        raw = trainer.validate(split="val", disable_tqdm=True)["forces_mae"]["metric"]
        ema.store()
        ema.copy_to()
        manual = trainer.validate(split="val", disable_tqdm=True)["forces_mae"]["metric"]
        ema.restore()
        checkpoint = Path(trainer.config["cmd"]["checkpoint_dir"]) / "checkpoint.pt"
    assert with_ema == pytest.approx(manual, rel=1e-6)
    assert abs(with_ema - raw) > 1e-6 * raw
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["ema"] is not None and saved["ema"]["decay"] == 0.5


def test_checkpoints_are_written_atomically(emt_database, tmp_path, monkeypatch):
    with make_trainer(tmp_path, trainer_config(emt_database, eval_every=100), "atomic") as trainer:
        path = Path(trainer.save(checkpoint_file="checkpoint.pt"))
        good = path.read_bytes()

        def crash(state, filename, *args, **kwargs):
            Path(filename).write_bytes(b"partial")
            raise OSError("disk full")

        monkeypatch.setattr(torch, "save", crash)
        with pytest.raises(OSError, match="disk full"):
            trainer.save(checkpoint_file="checkpoint.pt")
    assert path.read_bytes() == good  # the previous checkpoint is intact
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint.pt"
    ]


class Killed(Exception):
    pass


def test_resume_after_kill_mid_epoch_continues_exactly(emt_database, tmp_path):
    """Killed after step 3 (checkpoint every step), resumed with --checkpoint: same step, lr,
    EMA and final weights as an uninterrupted run."""
    optim = dict(
        max_epochs=2,
        batch_size=2,
        eval_every=100,
        checkpoint_every=1,
        ema_decay=0.9,
        scheduler="LambdaLR",
        scheduler_params={
            "lambda_type": "cosine",
            "warmup_epochs": 0.5,
            "warmup_factor": 0.2,
            "lr_min_factor": 0.01,
        },
    )
    config = trainer_config(emt_database, **optim)
    with make_trainer(tmp_path, config, "full") as full:
        full.train()
        full_weights, full_ema = (
            flat_params(full.model),
            torch.cat([p.flatten() for p in full.ema.shadow_params]),
        )
        assert full.step == 8

    with make_trainer(tmp_path, config, "killed") as killed:
        original = killed._backward

        def backward_then_die(loss):
            if killed.step == 4:
                raise Killed
            original(loss)

        killed._backward = backward_then_die
        with pytest.raises(Killed):
            killed.train()
        checkpoint = Path(killed.config["cmd"]["checkpoint_dir"]) / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=False)
    assert state["step"] == 3

    with make_trainer(tmp_path, config, "resumed", checkpoint=str(checkpoint)) as resumed:
        assert resumed.step == 3
        expected_lr = 1e-3 * resumed.scheduler.lr_lambda(3)
        assert resumed.scheduler.get_lr() == pytest.approx(expected_lr)
        torch.testing.assert_close(
            torch.cat([p.flatten() for p in resumed.ema.shadow_params]),
            torch.cat([torch.as_tensor(p).flatten() for p in state["ema"]["shadow_params"]]),
        )
        resumed.train()
        assert resumed.step == 8
        torch.testing.assert_close(flat_params(resumed.model), full_weights, rtol=1e-5, atol=1e-7)
        resumed_ema = torch.cat([p.flatten() for p in resumed.ema.shadow_params])
        torch.testing.assert_close(resumed_ema, full_ema, rtol=1e-5, atol=1e-7)


def ema_params(trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.ema.shadow_params])


def trainable_params(model) -> torch.Tensor:
    """The parameters the EMA averages (frozen ones, e.g. a force-head bias, are left out)."""
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])


def test_end_of_training_leaves_a_checkpoint_that_resumes(emt_database, tmp_path):
    """eval_every (so checkpoint_every) beyond the run's 4 steps: the host's loop saves nothing,
    the trainer still ends with checkpoint.pt at the final step holding the final weights, EMA and
    optimiser; resumed with --checkpoint into a 2-epoch run it ends as an uninterrupted 2-epoch run."""
    optim = dict(max_epochs=1, eval_every=100, ema_decay=0.9, lr_initial=5e-3)
    with make_trainer(tmp_path, trainer_config(emt_database, **optim), "short") as trainer:
        saved_at = []
        original_save = trainer.save

        def save(*args, **kwargs):
            saved_at.append(trainer.completed_step)
            return original_save(*args, **kwargs)

        trainer.save = save
        trainer.train()
        assert trainer.step == 4 and saved_at == [4]  # once, after the loop
        checkpoint = Path(trainer.config["cmd"]["checkpoint_dir"]) / "checkpoint.pt"
        weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        ema = ema_params(trainer)
        assert not torch.allclose(ema, trainable_params(trainer.model))
        optimizer_state = copy.deepcopy(trainer.optimizer.state_dict())
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["checkpoint.pt"]  # no temporaries
    state = torch.load(checkpoint, weights_only=False)
    assert state["step"] == 4 and state["epoch"] == 1.0
    assert state["state_dict"].keys() == weights.keys()
    for name, value in weights.items():  # the final weights, bit for bit
        assert torch.equal(state["state_dict"][name], value), name
    assert state["ema"]["decay"] == 0.9
    assert torch.equal(torch.cat([torch.as_tensor(p).flatten() for p in state["ema"]["shadow_params"]]), ema)
    for saved, final in zip(state["optimizer"]["state"].values(), optimizer_state["state"].values()):
        assert torch.equal(saved["exp_avg_sq"], final["exp_avg_sq"]) and saved["step"] == final["step"] == 4

    longer = trainer_config(emt_database, **{**optim, "max_epochs": 2})
    with make_trainer(tmp_path, longer, "resumed", checkpoint=str(checkpoint)) as resumed:
        assert resumed.step == 4
        assert torch.equal(ema_params(resumed), ema)
        assert torch.equal(flat_params(resumed.model), torch.cat([v.flatten() for v in weights.values()]))
        resumed.train()
        assert resumed.step == 8
        resumed_weights, resumed_ema = flat_params(resumed.model), ema_params(resumed)
        final = torch.load(
            Path(resumed.config["cmd"]["checkpoint_dir"]) / "checkpoint.pt", weights_only=False
        )
        assert final["step"] == 8
    with make_trainer(tmp_path, longer, "uninterrupted") as full:
        full.train()
        full_weights, full_ema = flat_params(full.model), ema_params(full)
    print(
        f"resumed vs uninterrupted: weights {(resumed_weights - full_weights).abs().max():.1e}, "
        f"EMA {(resumed_ema - full_ema).abs().max():.1e}"
    )
    torch.testing.assert_close(resumed_weights, full_weights, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(resumed_ema, full_ema, rtol=1e-5, atol=1e-7)


def test_checkpoint_saved_during_validation_holds_the_training_weights(emt_database, tmp_path):
    """SLURM's pre-emption signal may arrive while validation runs with the EMA weights copied into
    the model: the checkpoint saved then holds the training weights (and the EMA as the EMA)."""
    config = trainer_config(emt_database, eval_every=100, ema_decay=0.5, lr_initial=5e-3)
    with make_trainer(tmp_path, config, "during_validation") as trainer:
        trainer.train()
        weights, ema = flat_params(trainer.model), ema_params(trainer)
        assert not torch.allclose(trainable_params(trainer.model), ema)
        model = trainer._unwrapped_model
        original_forward, seen = model.forward, []

        def forward_then_preempted(data):
            if not seen:  # the handler runs trainer.save mid-validation, as submitit's would
                seen.append(trainable_params(trainer.model))
                trainer.save(checkpoint_file="checkpoint.pt", training_state=True)
            return original_forward(data)

        model.forward = forward_then_preempted
        trainer.validate(split="val", disable_tqdm=True)
        model.forward = original_forward
        assert torch.equal(seen[0], ema)  # the EMA weights were in the model
        assert torch.equal(flat_params(trainer.model), weights)  # and are back out
        checkpoint = Path(trainer.config["cmd"]["checkpoint_dir"]) / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=False)
    assert torch.equal(torch.cat([v.flatten() for v in state["state_dict"].values()]), weights)
    assert torch.equal(torch.cat([torch.as_tensor(p).flatten() for p in state["ema"]["shadow_params"]]), ema)


def test_predict_uses_the_ema_weights_and_equals_a_forward_pass(emt_database, tmp_path):
    """``--mode predict`` from a training checkpoint: its energies and forces (free atoms, as
    written to s2ef_predictions.npz) are those of the model with the EMA weights, run directly on
    the same batches: to float32 round-off with ``prediction_dtype: float32``, to float16 rounding
    with fairchem's default; the training weights predict something else."""
    config = trainer_config(emt_database, max_epochs=2, eval_every=100, ema_decay=0.5, lr_initial=5e-3)
    with make_trainer(tmp_path, config, "trained") as trainer:
        trainer.train()
        checkpoint = Path(trainer.config["cmd"]["checkpoint_dir"]) / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=False)

    predict_config = trainer_config(emt_database)
    predict_config["dataset"] = {"test": predict_config["dataset"]["train"]}
    for output in predict_config["outputs"].values():
        output["prediction_dtype"] = "float32"
    with make_trainer(
        tmp_path, predict_config, "predict", mode="predict", checkpoint=str(checkpoint)
    ) as predictor:
        predictor.predict(predictor.test_loader, results_file="predictions", disable_tqdm=True)
        results = Path(predictor.config["cmd"]["results_dir"])
        float32 = dict(np.load(results / "s2ef_predictions.npz"))
        for output in predictor.config["outputs"].values():
            output["prediction_dtype"] = "float16"  # fairchem's default
        predictor.predict(predictor.test_loader, results_file="predictions", disable_tqdm=True)
        float16 = dict(np.load(results / "s2ef_predictions.npz"))
        batches = list(predictor.test_loader)

    def direct(weights: str) -> tuple[np.ndarray, np.ndarray]:
        """Energies and free-atom forces, ordered as the npz (by id), of a fresh model."""
        model = EquiformerV2(**{k: v for k, v in MODEL.items() if k != "name"})
        model.load_state_dict(state["state_dict"])
        if weights == "ema":
            trainable = [p for p in model.parameters() if p.requires_grad]
            assert len(trainable) == len(state["ema"]["shadow_params"])
            with torch.no_grad():
                for param, average in zip(trainable, state["ema"]["shadow_params"]):
                    param.copy_(average)
        model.eval()
        energy, forces = {}, {}
        with torch.no_grad():
            for batch in batches:
                out = model(batch)
                free = batch.fixed == 0
                ids = [f"{sid}_{fid}" for sid, fid in zip(batch.sid.tolist(), batch.fid.tolist())]
                for i, atoms in enumerate(torch.split(torch.arange(len(free)), batch.natoms.tolist())):
                    energy[ids[i]] = out["energy"][i].item()
                    forces[ids[i]] = out["forces"][atoms][free[atoms]].numpy()
        order = sorted(energy)
        assert order == list(float32["ids"])
        return np.array([energy[i] for i in order]), np.concatenate([forces[i] for i in order])

    energy, forces = direct("ema")
    raw_energy, raw_forces = direct("training")
    predicted_energy, predicted_forces = float32["energy"].reshape(-1), float32["forces"]
    assert predicted_energy.dtype == np.float32 and predicted_forces.shape == forces.shape
    print(
        f"float32 prediction vs EMA forward: |dE| {np.abs(predicted_energy - energy).max():.1e} eV, "
        f"|dF| {np.abs(predicted_forces - forces).max():.1e} eV/A; vs training weights: "
        f"|dE| {np.abs(predicted_energy - raw_energy).max():.1e} eV, "
        f"|dF| {np.abs(predicted_forces - raw_forces).max():.1e} eV/A; "
        f"float16: |dE| {np.abs(float16['energy'].reshape(-1) - energy).max():.1e}, "
        f"|dF| {np.abs(float16['forces'] - forces).max():.1e}"
    )
    np.testing.assert_allclose(predicted_energy, energy, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(predicted_forces, forces, rtol=1e-6, atol=1e-7)
    assert np.abs(predicted_energy - raw_energy).max() > 1e-2
    assert np.abs(predicted_forces - raw_forces).max() > 1e-2
    # float16 (fairchem's default): the same values rounded to 11 significant bits
    assert float16["energy"].dtype == np.float16
    np.testing.assert_allclose(
        float16["energy"].reshape(-1).astype(np.float64), energy, rtol=2**-11, atol=1e-7
    )
    np.testing.assert_allclose(float16["forces"].astype(np.float64), forces, rtol=2**-11, atol=2**-25)

    # ASE through fairchem's OCPCalculator (an inference-only trainer, which the host leaves
    # without EMA): the same EMA predictions
    from ase.db import connect
    from fairchem.core.common.relaxation.ase_utils import OCPCalculator

    calculator = OCPCalculator(checkpoint_path=str(checkpoint), cpu=True, seed=0)
    with connect(emt_database) as db:
        atoms = db.get_atoms(id=1)
    atoms.calc = calculator
    first = list(float32["ids"]).index("0_0")  # the database's first row (AseDBDataset ids from 0)
    assert abs(atoms.get_potential_energy() - energy[first]) < 1e-6
    assert abs(atoms.get_potential_energy() - raw_energy[first]) > 1e-3


def test_misspelt_optim_key_is_an_error(emt_database, tmp_path):
    config = trainer_config(emt_database, lr_intial=1e-3)
    with pytest.raises(ValueError, match="lr_intial"):
        with make_trainer(tmp_path, config, "typo"):
            pass


# float16 autocast against float32, relative to the largest |E| and |F| of the batch (the tiny
# models of test_common_model_keys, two slabs): about 3x the measured errors, which are, in the
# same order, DEQEquiformerV1 1.6e-3 / 5.5e-3, DEQEquiformerV2 6.1e-4 / 1.2e-3, E2Former 1.0e-3 /
# 2.9e-3, EquiformerV1 4.0e-4 / 4.9e-3, EquiformerV2 6.5e-4 / 4.4e-2 (600 narrow Gaussians into
# a half-precision radial MLP), EquiformerV3 5.7e-4 / 2.2e-3 (its edge frames in float32)
AUTOCAST_RTOL = {
    "DEQEquiformerV1": (5e-3, 2e-2),
    "DEQEquiformerV2": (2e-3, 4e-3),
    "E2Former": (3e-3, 1e-2),
    "EquiformerV1": (1.5e-3, 1.5e-2),
    "EquiformerV2": (2e-3, 0.15),
    "EquiformerV3": (2e-3, 7e-3),
}
# the DeNS models on ordinary batches (other random weights than the plain models'), measured
# 2026-12-06: EquiformerV2DeNS 2.2e-3 / 3.5e-2, EquiformerV3DeNS 1.9e-4 / 1.4e-3
AUTOCAST_RTOL |= {"EquiformerV2DeNS": (5e-3, 0.15), "EquiformerV3DeNS": AUTOCAST_RTOL["EquiformerV3"]}


@pytest.mark.parametrize("name", MODELS)
def test_every_model_trains_under_autocast(name):
    """What --amp does to a model, here on the CPU: float16 autocast around the forward, the
    backward outside it. Every family runs (the norms' statistics and the sums over edges and
    atoms in float32; the custom autograd functions and the rest in half precision), stays within
    float16 noise of float32, and every trainable parameter gets a finite gradient (no overflow
    without loss scaling; the DEQs' map parameters get one although the solve ran without autograd)."""
    family = name.split(".")[-1]
    keys = {k: v for k, v in TINY[family].items() if k not in COMMON_KEYS}
    torch.manual_seed(0)
    model = registry.get_model_class(name)(**keys, **COMMON, use_pbc=True).train()
    with torch.no_grad():  # as in test_common_model_keys: away from the symmetric initialisation
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = to_batch(
        [slab_with_adsorbate("Cu", "111", "O", seed=0), slab_with_adsorbate("Pt", "100", "CO", seed=1)]
    )
    reference = model(batch)
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(batch)
    (out["energy"].float().sum() + out["forces"].float().pow(2).sum()).backward()
    errors = [
        ((out[key].float() - reference[key]).abs().max() / reference[key].abs().max()).item()
        for key in ("energy", "forces")
    ]
    print(
        f"{family}: float16 autocast vs float32, relative errors "
        f"energy {errors[0]:.1e}, forces {errors[1]:.1e}"
    )
    assert errors[0] <= AUTOCAST_RTOL[family][0] and errors[1] <= AUTOCAST_RTOL[family][1]
    for param_name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), param_name


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="AMP needs a CUDA GPU (fairchem's --amp: CUDA autocast and GradScaler); none is available here",
)
def test_amp_training_on_gpu(emt_database, tmp_path):
    """Mixed precision through fairchem's --amp (CUDA autocast, GradScaler) with accumulation and
    clipping: every training forward runs under autocast with half-precision outputs, losses and
    weights stay finite, the optimiser steps (GradScaler skips the first steps, whose scaled
    gradients overflow float16, until its scale settles: 2 of 16 with float16 autocast on the CPU),
    and validation under autocast matches validation of the same weights in float32."""
    config = trainer_config(
        emt_database, eval_every=100, grad_accumulation_steps=2, clip_grad_norm=10, max_epochs=8
    )
    with make_trainer(tmp_path, config, "amp", gpu=True) as trainer:
        assert trainer.scaler is not None and trainer.scaler.is_enabled()
        assert all(p.is_cuda for p in trainer.model.parameters())
        model = trainer._unwrapped_model
        under_autocast, force_dtypes = [], []
        hooks = [
            model.register_forward_pre_hook(
                lambda m, a: under_autocast.append(torch.is_autocast_enabled("cuda"))
            ),
            model.register_forward_hook(lambda m, a, out: force_dtypes.append(out["forces"].dtype)),
        ]
        start = flat_params(trainer.model).cpu()
        trainer.train()
        for hook in hooks:
            hook.remove()
        assert trainer.step == 32 and under_autocast == [True] * 32
        assert set(force_dtypes) <= {torch.float16, torch.bfloat16}, force_dtypes  # really half precision
        steps_taken = max(int(state["step"]) for state in trainer.optimizer.state.values())
        print(
            f"AMP: {steps_taken} of 16 optimiser steps taken, final loss scale {trainer.scaler.get_scale()}"
        )
        assert steps_taken >= 8 and 0 < trainer.scaler.get_scale() < float("inf")
        assert torch.isfinite(flat_params(trainer.model)).all()
        assert not torch.equal(flat_params(trainer.model).cpu(), start)
        amp = trainer.validate(split="val", disable_tqdm=True)
        scaler, trainer.scaler = trainer.scaler, None  # the host's evaluation autocasts only with a scaler
        float32 = trainer.validate(split="val", disable_tqdm=True)
        trainer.scaler = scaler
    for metric in ("energy_mae", "forces_mae"):
        print(f"{metric}: AMP {amp[metric]['metric']:.6f}, float32 {float32[metric]['metric']:.6f}")
        assert math.isfinite(amp[metric]["metric"])
        # not yet measured on a GPU; float16 autocast on the CPU, when the package's fused kernels
        # still ran in float32 (before 2026-12-06): 2.1e-5 (energy), 1.3e-3 (forces)
        assert amp[metric]["metric"] == pytest.approx(float32[metric]["metric"], rel=1e-2)


def test_trainer_adds_the_deq_auxiliary_loss_and_logs_the_solver_statistics(emt_database, tmp_path):
    """Through the trainer's own loss: with a Jacobian penalty the loss is the task loss plus the
    DEQ's declared ``deq_auxiliary_loss``, and its ``deq_stats`` reach the logger."""
    from fairchem.core.trainers import OCPTrainer

    from .test_deq import TINY_DEQ

    model = {"name": "fairchem_equiformers.DEQEquiformerV2", **TINY_DEQ, "jacobian_weight": 0.5}
    with make_trainer(tmp_path, trainer_config(emt_database) | {"model": model}, "deq") as trainer:
        logged = []
        trainer.logger.log = lambda values, step=None, split="": logged.append((split, dict(values)))
        trainer.model.train()
        batch = next(iter(trainer.train_loader))
        out = trainer._forward(batch)
        deq = trainer._unwrapped_model
        auxiliary = deq.deq_auxiliary_loss
        task = OCPTrainer._compute_loss(trainer, out, batch)
        total = trainer._compute_loss(out, batch)
    assert auxiliary is not None and float(auxiliary) > 0
    torch.testing.assert_close(total, task + auxiliary)
    stats = [values for split, values in logged if split == "train" and "deq_iterations" in values]
    assert stats and stats[-1]["deq_iterations"] == deq.deq_stats["iterations"] > 0
