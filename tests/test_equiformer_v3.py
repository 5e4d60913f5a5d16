"""EquiformerV3 learns: the embedded EMT slabs (direct and gradient forces) better than the mean
predictor on held-out slabs. (Parity with the official code: test_equiformer_v3_parity.py; float64
symmetry, central differences and stress: the model battery; real DFT data: test_real_data.py.)"""

from __future__ import annotations

import pytest
import torch

from fairchem_equiformers import EquiformerV3

from .conftest import TINY_V3
from .test_deq import emt_learning

# measured (energy MAE / mean predictor's, force MAE / mean predictor's), 100 steps, 2026-12-06
# direct 0.78, 0.45; gradient 0.58, 0.54
REQUIRED = {True: (0.9, 0.55), False: (0.7, 0.65)}


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "gradient"])
def test_learns_emt_slabs_better_than_the_mean_predictor(direct):
    torch.manual_seed(0)
    model = EquiformerV3(**{**TINY_V3, "direct_prediction": direct, "avg_num_nodes": 20.0})
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    energy_mae, force_mae, mean_energy, mean_force = emt_learning(model, 100, optimizer)
    ratios = (energy_mae / mean_energy, force_mae / mean_force)
    print(f"\nMEASURED EquiformerV3 {'direct' if direct else 'gradient'}: energy MAE {energy_mae:.3f} eV, "
          f"forces {force_mae:.3f} eV/A; mean predictor {mean_energy:.3f}, {mean_force:.3f}; "
          f"ratios {ratios}")  # fmt: skip
    assert ratios[0] < REQUIRED[direct][0] and ratios[1] < REQUIRED[direct][1]


def test_gradient_fine_tune_starts_from_a_direct_checkpoint(emt_database, tmp_path, caplog):
    """The official recipe through the trainer: ``optim.load_pretrained_weights`` puts a direct
    checkpoint's weights (DDP prefixes and all) into a gradient model, its direct heads dropped
    with a warning; a checkpoint key the model lacks is an error naming it."""
    import logging

    from .conftest import cli_config
    from .test_training import make_trainer

    model = {**TINY_V3, "max_num_elements": 90}
    torch.manual_seed(1)
    direct = EquiformerV3(**model, regress_stress=True)
    path = tmp_path / "direct.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in direct.state_dict().items()}}, path)
    gradient = {"name": "fairchem_equiformers.EquiformerV3", **model, "direct_prediction": False}
    config = cli_config(emt_database, gradient,
                        load_pretrained_weights=str(path))  # fmt: skip
    config["trainer"] = "fairchem_equiformers.ForcesTrainer"
    with caplog.at_level(logging.WARNING), make_trainer(tmp_path, config, "finetune") as trainer:
        loaded = trainer._unwrapped_model.state_dict()
    assert "direct heads" in caplog.text
    assert not any(k.startswith(("force_block", "stress_block")) for k in loaded)
    expected = direct.state_dict()
    assert loaded.keys() <= expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in loaded)

    torch.save({"state_dict": {**direct.state_dict(), "blocks.9.ga.alpha_dot": torch.zeros(2, 4)}}, path)
    with pytest.raises(KeyError, match="blocks.9.ga.alpha_dot"), make_trainer(tmp_path, config, "bad"):
        pass


def test_torch_compile_traces_the_block_stack_without_graph_breaks():
    """torch.compile's tracer (``torch._dynamo.explain``) breaks the graph only before the blocks:
    at the neighbour search and the edge-frame setup, never inside the blocks or the heads.
    (Compiling end to end is not there yet: inductor in torch 2.4 fails on this model.)"""
    from .test_equiformer_v3_parity import BASE, batch

    torch.manual_seed(0)
    model = EquiformerV3(**{**BASE, "regress_stress": True}).eval()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(batch("bulk"))
    torch._dynamo.reset()
    frames = {frame.filename.rsplit("/", 2)[-2] + "/" + frame.filename.rsplit("/", 1)[-1]
              for reason in explanation.break_reasons for frame in reason.user_stack}  # fmt: skip
    print(f"\nMEASURED graph breaks {explanation.graph_break_count}, in frames {sorted(frames)}")
    # measured 2026-12-06: 12 breaks, all in backbone.embed -> the neighbour search / EdgeRotation
    assert frames == {"equiformer_v3/backbone.py", "primitives/_rotation.py", "primitives/_wigner.py"}
