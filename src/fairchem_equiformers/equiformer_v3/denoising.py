"""EquiformerV3 with DeNS (the official ``equiformer_v3_dens``): the EquiformerV3 model plus the
force encoding added to the input embeddings (``force_embedding``) and a denoising head
(``dens_block``, a graph attention like the direct force head) whose output is the noisy atoms'
``forces`` in a DeNS batch (see ``heads/denoising.py``). Parameter names are the official
checkpoints'; an ordinary batch gives the EquiformerV3 outputs of the same weights (the force
encoding is zero there)."""

from __future__ import annotations

import torch
from fairchem.core.common.registry import registry

from fairchem_equiformers.heads.denoising import ForceEncoding, denoising_inputs, mix_denoised

from .heads import EquiformerV3ForceHead
from .model import EquiformerV3


@registry.register_model("fairchem_equiformers.EquiformerV3DeNS")
class EquiformerV3DeNS(EquiformerV3):
    """EquiformerV3 trained with DeNS (``optim.use_denoising_pos`` of ``ForcesTrainer``); takes the
    keys of ``EquiformerV3`` (the official ``equiformer_v3_dens`` has the same). Direct and
    gradient mode: in a gradient model the noisy atoms' forces are the denoising head's (the
    other atoms' are ``-dE/dpos``). In an ordinary batch the denoising head runs only in training
    (so that every parameter gets a gradient in every batch, as DDP needs)."""

    def add_heads(self) -> None:
        super().add_heads()
        self.force_embedding = ForceEncoding(self.layout.lmax, self.num_channels, bias_on_every_atom=False)
        self.dens_block = EquiformerV3ForceHead(self) if self.regress_forces else None

    def embed(self, data, inputs=None):
        x, state = super().embed(data, inputs)  # [N, K, C]
        return x + self.force_embedding(denoising_inputs(data)), state

    def predict(self, data, emb: dict) -> dict[str, torch.Tensor]:
        outputs = super().predict(data, emb)
        inputs = denoising_inputs(data)
        if self.dens_block is None or not (inputs.active or self.training):
            return outputs
        return mix_denoised(outputs, self.dens_block(data, emb)["forces"], inputs)
