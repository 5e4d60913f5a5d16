"""Learning-rate schedules given in epochs and stepped every training batch.

Config (``optim`` section), as in the released EquiformerV2 recipes::

    scheduler: LambdaLR
    scheduler_params:
      lambda_type: cosine        # cosine | multistep | constant
      warmup_epochs: 0.1         # linear warmup from warmup_factor * lr to lr
      warmup_factor: 0.2
      lr_min_factor: 0.01        # cosine: floor, as a fraction of lr_initial
      decay_epochs: [10, 20]     # multistep: epochs where the lr is multiplied by decay_rate
      decay_rate: 0.1

Every key containing ``epochs`` is converted to batches with the train loader's length (no
rounding, so a warmup shorter than one batch is fine), without touching the user's config.
The cosine spans the whole run (``max_epochs``), warmup included, as in the released trainer.
With gradient accumulation the schedule is unchanged as a function of the epoch; each
optimizer step uses the value at its batch. ``scheduler: "Null"`` keeps ``lr_initial``.
"""

from __future__ import annotations

import math
from bisect import bisect

import torch

LAMBDA_KEYS = {
    "cosine": {"warmup_epochs", "warmup_factor", "lr_min_factor"},
    "multistep": {"warmup_epochs", "warmup_factor", "decay_epochs", "decay_rate"},
    "constant": {"warmup_epochs", "warmup_factor"},
}


class WarmupSchedule:
    """Multiplier of the initial lr at a given batch: linear warmup, then ``decay(batch)``."""

    def __init__(self, warmup_batches: float = 0.0, warmup_factor: float = 1.0) -> None:
        self.warmup_batches = float(warmup_batches)
        self.warmup_factor = float(warmup_factor)

    def __call__(self, batch: int) -> float:
        if 0 < self.warmup_batches and batch <= self.warmup_batches:
            alpha = batch / self.warmup_batches
            return self.warmup_factor * (1.0 - alpha) + alpha
        return self.decay(batch)

    def decay(self, batch: int) -> float:
        return 1.0


class CosineSchedule(WarmupSchedule):
    def __init__(self, total_batches: float, lr_min_factor: float, **warmup) -> None:
        super().__init__(**warmup)
        self.total_batches = float(total_batches)
        self.lr_min_factor = float(lr_min_factor)

    def decay(self, batch: int) -> float:
        if batch >= self.total_batches:
            return self.lr_min_factor
        cosine = 0.5 * (1 + math.cos(math.pi * batch / self.total_batches))
        return self.lr_min_factor + (1 - self.lr_min_factor) * cosine


class MultistepSchedule(WarmupSchedule):
    def __init__(self, decay_batches: list[float], decay_rate: float, **warmup) -> None:
        super().__init__(**warmup)
        self.decay_batches = [float(b) for b in decay_batches]
        self.decay_rate = float(decay_rate)

    def decay(self, batch: int) -> float:
        return self.decay_rate ** bisect(self.decay_batches, batch)


class LRScheduler:
    """What fairchem's trainers expect of ``trainer.scheduler``: ``step()``, ``get_lr()``,
    ``scheduler_type`` and the torch scheduler in ``scheduler`` (saved in checkpoints)."""

    def __init__(self, optimizer: torch.optim.Optimizer, optim_config: dict, batches_per_epoch: int) -> None:
        self.optimizer = optimizer
        self.scheduler_type = optim_config.get("scheduler", "Null")
        params = dict(optim_config.get("scheduler_params", {}))
        if self.scheduler_type == "Null":
            self.lr_lambda = WarmupSchedule()
        elif self.scheduler_type == "LambdaLR":
            self.lr_lambda = build_lr_lambda(params, optim_config["max_epochs"], batches_per_epoch)
        else:
            raise ValueError(
                f"optim.scheduler={self.scheduler_type!r}: this trainer supports 'LambdaLR' "
                "(lambda_type cosine, multistep or constant) and 'Null'"
            )
        # a real torch scheduler in every case, so checkpoints always carry its state
        self.scheduler_type = "LambdaLR"
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_lambda)

    def step(self, metrics=None, epoch=None) -> None:
        self.scheduler.step()

    def set_batch(self, batch: int) -> None:
        """Position the schedule at ``batch`` (the learning rate for the batch after it)."""
        self.scheduler.last_epoch = batch
        for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base_lr * self.lr_lambda(batch)

    def get_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def build_lr_lambda(params: dict, max_epochs: float, batches_per_epoch: int) -> WarmupSchedule:
    """The multiplier function for ``scheduler_params``; epochs become batches."""
    lambda_type = params.pop("lambda_type", None)
    if lambda_type not in LAMBDA_KEYS:
        raise ValueError(
            f"scheduler_params.lambda_type must be one of {sorted(LAMBDA_KEYS)}, got {lambda_type!r}"
        )
    unknown = set(params) - LAMBDA_KEYS[lambda_type]
    if unknown:
        raise ValueError(
            f"scheduler_params has keys {sorted(unknown)} that lambda_type {lambda_type!r} does not use; "
            f"allowed: {sorted(LAMBDA_KEYS[lambda_type])}"
        )

    def batches(epochs):
        if isinstance(epochs, (list, tuple)):
            return [e * batches_per_epoch for e in epochs]
        return epochs * batches_per_epoch

    warmup = {
        "warmup_batches": batches(params.get("warmup_epochs", 0.0)),
        "warmup_factor": params.get("warmup_factor", 1.0),
    }
    if lambda_type == "cosine":
        return CosineSchedule(batches(max_epochs), params.get("lr_min_factor", 0.0), **warmup)
    if lambda_type == "multistep":
        return MultistepSchedule(batches(params["decay_epochs"]), params["decay_rate"], **warmup)
    return WarmupSchedule(**warmup)
