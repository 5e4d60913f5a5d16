"""The forces trainer: fairchem's OCPTrainer with the EquiformerV2 training recipe.

Differences from the host's ``forces`` trainer (datasets, normalizers, linear references,
losses, evaluation, logging and distributed training are the host's):

* AdamW parameter groups: no weight decay for biases, normalisation and radial-basis
  parameters and whatever the model lists in ``no_weight_decay()``;
* learning-rate schedules given in epochs (``schedule.py``), stepped every batch;
* gradient accumulation (``optim.grad_accumulation_steps``), gradient clipping
  (``optim.clip_grad_norm``), EMA of the weights (``optim.ema_decay``, used for validation and
  prediction and saved in checkpoints), AMP on GPU (``--amp``);
* checkpoints written atomically (a crash mid-write never leaves a truncated file) and always
  at the last completed optimiser update, also when SLURM's pre-emption signal triggers the save
  mid-batch; a resumed run continues at the same step, learning rate and EMA;
* the end of training always leaves ``checkpoint.pt`` with the final weights, EMA, optimiser and
  schedule, whatever ``eval_every``/``checkpoint_every`` say (the host saves only every
  ``checkpoint_every`` steps, so a run shorter than that ended with no checkpoint at all);
* the logged training loss is the loss of the global batch (the mean over ranks), not rank 0's
  share of it;
* a checkpoint saved while the EMA weights are in the model for validation or prediction (the
  pre-emption signal can arrive then) holds the training weights, not the EMA's;
* the EMA weights of a checkpoint are used for prediction and validation whatever the config
  says (the host uses them only when the config has ``optim.ema_decay``);
* predict/validate from a full training checkpoint without a train set, and warmups shorter
  than one batch, both of which trip the host's ``equiformerv2_forces`` trainer;
* a loss coefficient may decay linearly over the run (``final_coefficient`` next to
  ``coefficient`` in ``loss_functions``; the Equiformer IS2RS auxiliary loss goes from 15 to 1);
* ``optim.load_pretrained_weights: <checkpoint>`` starts from a checkpoint's model weights only
  (the official EquiformerV3 fine-tuning key): fresh optimiser, schedule and EMA; the model's
  own loading rules apply (prefixes, a direct checkpoint into a gradient model drops the direct
  heads with a warning); parameters the checkpoint lacks keep their initialisation and are
  logged, checkpoint keys the model lacks are an error naming them. ``--checkpoint`` (resuming)
  loads after it and wins;
* a training set with ``set_epoch`` (``NoisyNodesLmdbDataset``) is told the epoch before each
  one, which switches on and seeds its perturbations (val/test sets are never told);
* ``optim.use_compile`` (the official EquiformerV3 key): the model compiled in place with
  ``torch.compile`` (inductor, automatic dynamic shapes; checkpoints keep their keys), for
  models with direct forces (a gradient-force model's training differentiates twice, which
  torch 2.4's compiled autograd cannot: an error says so);
* ``optim.keep_freed_memory: true``: glibc keeps freed memory for the rest of the run
  (:func:`fairchem_equiformers.keep_freed_memory`), so CPU training steps reuse their pages
  instead of page-faulting their per-edge tensors anew; the process keeps its peak memory;
* DeNS (``optim.use_denoising_pos``, the official EquiformerV3 and fairchem EquiformerV2 keys;
  ``denoising.py``) for the DeNS models: training batches corrupted with the given probability,
  the noise trained beside the forces, DeNS batches' metrics logged apart (``denoising_*``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path

import numpy as np
import torch
from fairchem.core.common import distutils
from fairchem.core.common.registry import registry
from fairchem.core.modules.exponential_moving_average import ExponentialMovingAverage
from fairchem.core.trainers import OCPTrainer

from fairchem_equiformers.deq import DEQBackbone
from fairchem_equiformers.heads.denoising import ForceEncoding
from fairchem_equiformers.tools.allocator import keep_freed_memory

from . import denoising
from .param_groups import parameter_groups
from .schedule import LRScheduler

# Every ``optim`` key this trainer or the host trainer reads; anything else is a typo.
OPTIM_KEYS = {
    "batch_size", "eval_batch_size", "load_balancing", "load_balancing_on_error", "num_workers",
    "optimizer", "optimizer_params", "lr_initial", "scheduler", "scheduler_params", "max_epochs",
    "clip_grad_norm", "ema_decay", "grad_accumulation_steps", "eval_every", "checkpoint_every",
    "checkpoint_format", "load_datasets_and_model_then_exit", "load_pretrained_weights", "use_compile",
    "keep_freed_memory", *denoising.OPTIM_KEYS,
}  # fmt: skip


# Signals whose handlers may save a checkpoint (SLURM pre-emption / time limit through submitit).
CHECKPOINT_SIGNALS = {signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM}


@contextlib.contextmanager
def checkpoint_signals_held():
    """Defer checkpointing signals until the block ends, so a handler never sees the weights, the
    optimiser and the EMA half-updated (delivery is held by the OS, not dropped)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, CHECKPOINT_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def check_optim_keys(optim: dict) -> None:
    unknown = sorted(set(optim) - OPTIM_KEYS)
    if unknown:
        raise ValueError(f"unknown optim key(s) {unknown}; this trainer reads {sorted(OPTIM_KEYS)}")


def load_pretrained_weights(model: torch.nn.Module, path: str) -> None:
    """A checkpoint's model weights (``state_dict``; the raw weights, as the official recipe) into
    ``model``: keys it lacks keep the model's initialisation (logged), keys the model lacks are
    an error naming them."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"optim.load_pretrained_weights: no checkpoint at {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"optim.load_pretrained_weights: {path} holds no state_dict")
    prefixes = ("module.", "_orig_mod.")  # DDP, torch.compile
    while any(k.startswith(prefixes) for k in state):
        state = {k.split(".", 1)[1] if k.startswith(prefixes) else k: v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise KeyError(
            f"optim.load_pretrained_weights: {path} has weights the model lacks: "
            f"{', '.join(result.unexpected_keys[:10])}{' ...' if len(result.unexpected_keys) > 10 else ''}; "
            "check that the model section matches the checkpoint's"
        )
    if distutils.is_master():
        fresh = (
            f"; initialised fresh (not in the checkpoint): {result.missing_keys}"
            if result.missing_keys
            else ""
        )
        logging.info(f"model weights from {path}{fresh}")


class DatasetEpochSampler:
    """The host's training batch sampler, also handing the epoch to the dataset (before the data
    loader's workers copy it), so per-epoch random draws in the dataset are seeded by the epoch."""

    def __init__(self, sampler, dataset) -> None:
        self.sampler, self.dataset = sampler, dataset

    def __iter__(self):
        return iter(self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch_and_start_iteration(self, epoch: int, start_iteration: int) -> None:
        self.sampler.set_epoch_and_start_iteration(epoch, start_iteration)
        self.dataset.set_epoch(epoch)


@registry.register_trainer("fairchem_equiformers.ForcesTrainer")
class ForcesTrainer(OCPTrainer):
    """Energy and force training with the EquiformerV2 recipe (see the module docstring).

    The task is S2EF whatever name the launcher passes (fairchem names tasks after its own
    trainers), so evaluation defaults and ``s2ef_predictions.npz`` match the host's ``forces``.
    Checkpoints record this trainer's registered name, so ``OCPCalculator(checkpoint_path=...)``
    needs no ``trainer=`` argument."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["name"] = "s2ef"
        optim = kwargs.get("optimizer") or {}
        check_optim_keys(optim)
        if optim.get("keep_freed_memory", False):
            keep_freed_memory()  # before the first step allocates
        super().__init__(*args, **kwargs)
        self.config["trainer"] = "fairchem_equiformers.ForcesTrainer"
        self.denoising = denoising.DenoisingParams.from_optim(self.config["optim"])
        if self.denoising is not None and not any(
            isinstance(module, ForceEncoding) for module in self._unwrapped_model.modules()
        ):
            raise ValueError(
                f"optim.use_denoising_pos needs a DeNS model (fairchem_equiformers.EquiformerV2DeNS or "
                f"EquiformerV3DeNS, which take the forces as input), got "
                f"{type(self._unwrapped_model).__name__}"
            )

    def load_model(self) -> None:
        super().load_model()
        path = self.config["optim"].get("load_pretrained_weights")
        if path:
            load_pretrained_weights(self._unwrapped_model, path)
        if self.config["optim"].get("use_compile", False):
            model = self._unwrapped_model
            if getattr(model, "conservative", False):
                raise ValueError(
                    f"optim.use_compile: {type(model).__name__} returns forces as -dE/dpos, and training "
                    "them differentiates the compiled model twice, which torch 2.4 cannot (AOTAutograd has "
                    "no double backward); set use_compile: false (the official gradient recipes do)"
                )
            model.compile()  # in place: parameter names and checkpoints unchanged

    def load_optimizer(self) -> None:
        optim = self.config["optim"]
        optimizer_class = getattr(torch.optim, optim.get("optimizer", "AdamW"))
        optimizer_params = dict(optim.get("optimizer_params", {}))
        weight_decay = optimizer_params.pop("weight_decay", optim.get("weight_decay", 0.0))
        groups, exempt = parameter_groups(self._unwrapped_model, weight_decay)
        if distutils.is_master():
            logging.info(f"{len(exempt)} parameter tensors without weight decay: {exempt}")
        self.optimizer = optimizer_class(groups, lr=optim["lr_initial"], **optimizer_params)

    def load_extras(self) -> None:
        optim = self.config["optim"]
        batches_per_epoch = len(self.train_loader) if self.train_loader is not None else 1
        self.scheduler = LRScheduler(self.optimizer, optim, batches_per_epoch)
        self.clip_grad_norm = optim.get("clip_grad_norm")
        self.grad_accumulation_steps = int(optim.get("grad_accumulation_steps", 1))
        if self.grad_accumulation_steps < 1:
            raise ValueError(
                f"optim.grad_accumulation_steps must be >= 1, got {self.grad_accumulation_steps}"
            )
        self._accumulated_batches = 0
        self._rank_and_global_loss = None
        self.completed_step = self.step  # the step of the last optimiser update
        self._checkpoint_saved_at = None  # the step of the last checkpoint.pt with training state
        self.ema_decay = optim.get("ema_decay")
        self.ema = (
            ExponentialMovingAverage(self.model.parameters(), self.ema_decay) if self.ema_decay else None
        )
        self.check_gradient_scales()

    def check_gradient_scales(self) -> None:
        """A model whose forces (and stress) are gradients of its energy needs one normalizer scale
        for all of them: the host denormalizes each target with its own ``rmsd``, so different
        scales would return forces ``rmsd_F / rmsd_E`` times the energy's gradient. Raises
        ``ValueError`` naming the scales."""
        model = self._unwrapped_model
        if getattr(model, "direct_forces", True) or not getattr(model, "regress_forces", True):
            return
        targets = [name for name in ("energy", "forces", "stress") if name in self.output_targets]
        scales = {
            name: float(self.normalizers[name].rmsd) if name in self.normalizers else 1.0 for name in targets
        }
        if len(set(scales.values())) > 1 and max(scales.values()) > min(scales.values()) * (1 + 1e-6):
            listed = ", ".join(f"{name} {scale:.6g}" for name, scale in scales.items())
            raise ValueError(
                f"{type(model).__name__} returns forces as -dE/dpos, so energy, forces and stress need "
                f"one normalizer scale (rmsd), got {listed}: the returned forces would not be the gradient "
                "of the returned energy. Rebuild the dataset with fairchem-equiformers-data (it writes one "
                "scale) or give every normalizer the same rmsd."
            )

    def load_datasets(self) -> None:
        super().load_datasets()
        dataset = getattr(getattr(self, "train_dataset", None), "dataset", None)  # in a Subset
        if self.train_loader is not None and hasattr(dataset, "set_epoch"):
            self.train_sampler = DatasetEpochSampler(self.train_sampler, dataset)
            self.train_loader = self.get_dataloader(self.train_dataset, self.train_sampler)

    def load_loss(self) -> None:
        """The host's losses; those with a ``final_coefficient`` are interpolated linearly from
        ``coefficient`` (step 0) to it (last step) as training goes."""
        super().load_loss()
        settings = [entry for loss in self.config["loss_functions"] for entry in loss.values()]
        self._coefficient_ranges = {
            index: (float(entry["coefficient"]), float(entry["final_coefficient"]))
            for index, entry in enumerate(settings)  # the host's order of self.loss_functions
            if "final_coefficient" in entry
        }

    def _update_loss_coefficients(self) -> None:
        if not self._coefficient_ranges or self.train_loader is None:
            return
        total_steps = len(self.train_loader) * self.config["optim"]["max_epochs"]
        progress = min(1.0, self.step / total_steps)
        for index, (start, final) in self._coefficient_ranges.items():
            self.loss_functions[index][1]["coefficient"] = start + (final - start) * progress

    def _forward(self, batch):
        """The host's forward; in training with DeNS, the batch (the loop's own object, which the
        loss and metrics then read) first becomes a DeNS batch with probability ``prob``."""
        params = self.denoising
        if params is not None and self.model.training:
            early = params.early_epochs is None or self.epoch <= params.early_epochs
            if early and np.random.rand() < params.prob:
                denoising.corrupt(batch.to(self.device), params)
        return super()._forward(batch)

    def _host_loss(self, out, batch) -> torch.Tensor:
        """The host's loss; for a DeNS batch with its ``forces`` term replaced by the DeNS one."""
        if not denoising.is_denoising(batch) or self.denoising is None:
            return super()._compute_loss(out, batch)
        everything = self.loss_functions
        forces = [(name, info) for name, info in everything if name == "forces"]
        self.loss_functions = [(name, info) for name, info in everything if name != "forces"]
        try:
            loss = super()._compute_loss(out, batch) if self.loss_functions else 0.0
        finally:
            self.loss_functions = everything
        for _, info in forces:
            target = batch.forces
            if "forces" in self.normalizers:
                target = self.normalizers["forces"].norm(target)
            total_steps = len(self.train_loader) * self.config["optim"]["max_epochs"]
            loss = loss + denoising.denoising_force_loss(
                out["forces"], batch, target,
                force_coefficient=info["coefficient"],
                noise_coefficient=self.denoising.coefficient_at(self.step / total_steps),
                std=self.denoising.std, loss_fn=info["fn"],
                free_atoms_only=self.output_targets["forces"].get("train_on_free_atoms", False),
                all_atoms=self.denoising.all_atoms,
            )  # fmt: skip
        return loss

    def _compute_metrics(self, out, batch, evaluator, metrics=None):
        if not denoising.is_denoising(batch) or self.denoising is None:
            return super()._compute_metrics(out, batch, evaluator, metrics)
        metrics = {} if metrics is None else metrics
        normalizer = self.normalizers.get("forces")
        found = denoising.denoising_metrics(
            out, batch, (lambda f: normalizer.denorm(f)) if normalizer is not None else (lambda f: f),
            self.denoising.std, self.output_targets["forces"].get("eval_on_free_atoms", False),
        )  # fmt: skip
        for name, (total, numel) in found.items():
            metrics = evaluator.update(
                name, {"metric": total / numel, "total": total, "numel": numel}, metrics
            )
        return metrics

    def _compute_loss(self, out, batch) -> torch.Tensor:
        self._update_loss_coefficients()
        loss = self._host_loss(out, batch)
        for deq in (m for m in self._unwrapped_model.modules() if isinstance(m, DEQBackbone)):
            # the DEQ's declared outputs: stabiliser losses (training only) and solver statistics
            if self.model.training and deq.deq_auxiliary_loss is not None:
                loss = loss + deq.deq_auxiliary_loss
            if deq.deq_stats and self.logger is not None and distutils.is_master():
                split = "train" if self.model.training else "val"
                self.logger.log(
                    {f"deq_{k}": v for k, v in deq.deq_stats.items()}, step=self.step, split=split
                )
        self._rank_and_global_loss = None
        if self.model.training and distutils.initialized() and distutils.get_world_size() > 1:
            # each rank's loss is its share of the global batch's mean (fairchem's DDPLoss)
            global_loss = distutils.all_reduce(loss.detach(), average=True)
            self._rank_and_global_loss = (loss.item(), global_loss.item())
        return loss

    def _log_global_loss(self) -> None:
        """Replace the rank's share of the loss, just added to the running training metrics by
        the host's loop, with the global batch's loss."""
        if self._rank_and_global_loss is None or "loss" not in self.metrics:
            return
        rank_loss, global_loss = self._rank_and_global_loss
        running = self.metrics["loss"]
        running["total"] += global_loss - rank_loss
        running["metric"] = running["total"] / running["numel"]

    def _backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients over ``grad_accumulation_steps`` batches (each batch's loss is
        its own mean, so the update is the mean over batches), then clip, step and update EMA.
        A partial window at the end of an epoch still steps."""
        self._log_global_loss()
        (loss / self.grad_accumulation_steps).backward()
        self._accumulated_batches += 1
        end_of_epoch = self.train_loader is not None and self.step % len(self.train_loader) == 0
        if self._accumulated_batches < self.grad_accumulation_steps and not end_of_epoch:
            return
        if self._accumulated_batches < self.grad_accumulation_steps:  # partial window: rescale
            for param in self.model.parameters():
                if param.grad is not None:
                    param.grad.mul_(self.grad_accumulation_steps / self._accumulated_batches)
        self._accumulated_batches = 0
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=self.clip_grad_norm)
            if self.logger is not None:
                self.logger.log({"grad_norm": grad_norm}, step=self.step, split="train")
        with checkpoint_signals_held():
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema:
                self.ema.update()
            self.completed_step = self.step

    def train(self, disable_eval_tqdm: bool = False) -> None:
        """The host's training loop, then ``checkpoint.pt`` at the final step unless the loop
        has just written it (the host saves only when the step is a multiple of
        ``checkpoint_every``, default ``eval_every``, or after each epoch with -1)."""
        super().train(disable_eval_tqdm=disable_eval_tqdm)
        if self._checkpoint_saved_at != self.completed_step:
            self.save(checkpoint_file="checkpoint.pt", training_state=True)

    @contextlib.contextmanager
    def _raw_weights_kept(self):
        """While the host evaluates with the EMA weights copied into the model (validation,
        prediction, relaxations), keep the training weights, so that a checkpoint saved meanwhile
        (SLURM's pre-emption signal runs the save wherever the program is) holds them. Only in
        training runs (inference, e.g. ASE's calculator, saves no training state)."""
        training = getattr(self, "train_loader", None) is not None
        if (
            getattr(self, "ema", None) is None
            or not training
            or getattr(self, "_raw_weights", None) is not None
        ):
            yield
            return
        # in host memory: read back only by a save during the evaluation
        self._raw_weights = [p.detach().to("cpu", copy=True) for p in self.model.parameters()]
        try:
            yield
        finally:
            self._raw_weights = None

    def validate(self, split: str = "val", disable_tqdm: bool = False):
        with self._raw_weights_kept():
            return super().validate(split=split, disable_tqdm=disable_tqdm)

    def predict(self, *args, **kwargs):
        with self._raw_weights_kept():
            return super().predict(*args, **kwargs)

    def run_relaxations(self, *args, **kwargs):
        with self._raw_weights_kept():
            return super().run_relaxations(*args, **kwargs)

    def load_checkpoint(
        self, checkpoint_path: str, checkpoint: dict | None = None, inference_only: bool = False
    ):
        """The host's loading, then the schedule re-positioned at the restored step: fairchem
        saves before stepping the scheduler, so its state lags the step by one batch.

        The EMA follows the checkpoint whatever the config says: a checkpoint with EMA weights
        predicts and validates with them also under a config without ``optim.ema_decay`` (the
        host drops them and silently uses the training weights), and a config's ``ema_decay``
        still averages when the checkpoint has none (the host switches the EMA off)."""
        if checkpoint is None:
            if not os.path.isfile(checkpoint_path):
                raise FileNotFoundError(f"Checkpoint file not found: {checkpoint_path}")
            logging.info(f"Loading checkpoint from: {checkpoint_path}")
            map_location = torch.device("cpu") if self.cpu else self.device
            checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=False)
        saved_ema = checkpoint.get("ema")
        if saved_ema is not None and getattr(self, "ema", None) is None:
            logging.info(f"Using the checkpoint's EMA weights (decay {saved_ema['decay']}) for evaluation")
            self.ema = ExponentialMovingAverage(self.model.parameters(), saved_ema["decay"])
        super().load_checkpoint(checkpoint_path, checkpoint=checkpoint, inference_only=inference_only)
        if self.ema is None and getattr(self, "ema_decay", None):  # the checkpoint had none: average
            self.ema = ExponentialMovingAverage(self.model.parameters(), self.ema_decay)
        if getattr(self, "scheduler", None) is not None and not inference_only:
            self.scheduler.set_batch(self.step)
            logging.info(f"Resuming training at step {self.step} (epoch {self.epoch:.4f})")
        self.completed_step = self.step
        self.check_gradient_scales()  # the checkpoint's normalizers replace the config's

    def save(self, metrics=None, checkpoint_file: str = "checkpoint.pt", training_state: bool = True):
        """The host's checkpoint at the last completed update (the loop advances ``step`` before
        the batch runs, and a partial accumulation window is not saved: resuming re-runs it),
        written to a temporary file and renamed into place."""
        temporary = f".{checkpoint_file}.{os.getpid()}.tmp"
        step, epoch = self.step, self.epoch
        if training_state and self.train_loader is not None:
            self.step = getattr(self, "completed_step", step)
            self.epoch = self.step / len(self.train_loader)
        raw_weights = getattr(self, "_raw_weights", None) if training_state else None
        in_model = None
        try:
            if raw_weights is not None:  # the model holds the EMA weights: save the training ones
                in_model = [p.detach().clone() for p in self.model.parameters()]
                with torch.no_grad():
                    for param, raw in zip(self.model.parameters(), raw_weights):
                        param.copy_(raw)
            path = super().save(metrics=metrics, checkpoint_file=temporary, training_state=training_state)
        finally:
            if in_model is not None:
                with torch.no_grad():
                    for param, current in zip(self.model.parameters(), in_model):
                        param.copy_(current)
            saved_step = self.step
            self.step, self.epoch = step, epoch
        if training_state and checkpoint_file == "checkpoint.pt":
            self._checkpoint_saved_at = saved_step  # on every rank (only the master writes)
        if path is None:
            return None
        final = Path(path).with_name(checkpoint_file)
        os.replace(path, final)
        if training_state and self.train_loader is not None:
            logging.info(f"Saved {final} at step {self.completed_step}")
        return str(final)
