"""EquiformerV2 with DeNS (fairchem 1.10's hydra ``equiformer_v2_dens_backbone`` with the
``eqV2_DeNS_scalar_head`` and ``eqV2_DeNS_vector_head``): the EquiformerV2 model plus the force
encoding added to the input embeddings (``force_embedding``) and a denoising head
(``denoising_pos_block``, a graph attention like the direct force head) whose output is the
noisy atoms' ``forces`` in a DeNS batch (see ``heads/denoising.py``).

The force encoding masks its input, not its output, so its degree-0 bias reaches every atom of
every batch, ordinary ones included: the same weights give other outputs than ``EquiformerV2``.
Parameter names are the released EquiformerV2's plus ``force_embedding.*`` and
``denoising_pos_block.*``; fairchem's hydra DeNS layout loads strictly (``checkpoint.py``)."""

from __future__ import annotations

import torch
from fairchem.core.common.registry import registry

from fairchem_equiformers.heads.denoising import ForceEncoding, denoising_inputs, mix_denoised

from .heads import EquiformerV2ForceHead
from .model import EquiformerV2

# DeNS keys of fairchem's backbone and the only value each may take here (the released recipe)
DENS_KEYS = {"use_force_encoding": True, "use_noise_schedule_sigma_encoding": False}


@registry.register_model("fairchem_equiformers.EquiformerV2DeNS")
class EquiformerV2DeNS(EquiformerV2):
    """EquiformerV2 trained with DeNS (``optim.use_denoising_pos`` of ``ForcesTrainer``); takes
    the keys of ``EquiformerV2`` and fairchem's DeNS keys ``use_force_encoding`` (only ``True``)
    and ``use_noise_schedule_sigma_encoding`` (only ``False``). Direct forces only, as in
    fairchem: ``direct_forces=False`` and ``regress_stress=True`` are errors. In an ordinary
    batch the denoising head runs only in training (so that every parameter gets a gradient in
    every batch, as DDP needs)."""

    def __init__(self, **model_keys) -> None:
        for key, allowed in DENS_KEYS.items():
            value = model_keys.pop(key, allowed)
            if value != allowed:
                raise ValueError(f"{key}={value!r} is not supported by EquiformerV2DeNS; allowed: {allowed}")
        if not model_keys.get("direct_forces", True):
            raise ValueError(
                "direct_forces=False is not supported by EquiformerV2DeNS: fairchem's DeNS EquiformerV2 "
                "predicts forces and noise with heads (direct_forces: true)"
            )
        if model_keys.get("regress_stress", False):
            raise ValueError(
                "regress_stress=True is not supported by EquiformerV2DeNS: the stress needs "
                "direct_forces=False, which DeNS EquiformerV2 does not have"
            )
        super().__init__(**model_keys)

    def add_heads(self) -> None:
        super().add_heads()
        channels = self.sphere_embedding.embedding_dim
        self.force_embedding = ForceEncoding(self.layout.lmax, channels, bias_on_every_atom=True)
        self.denoising_pos_block = EquiformerV2ForceHead(self) if self.regress_forces else None

    def embed(self, data):
        x, state = super().embed(data)  # [N, K, C]
        return x + self.force_embedding(denoising_inputs(data)), state

    def predict(self, data, emb: dict) -> dict[str, torch.Tensor]:
        outputs = super().predict(data, emb)
        inputs = denoising_inputs(data)
        if self.denoising_pos_block is None or not (inputs.active or self.training):
            return outputs
        return mix_denoised(outputs, self.denoising_pos_block(data, emb)["forces"], inputs)
