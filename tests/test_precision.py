"""``precision: bf16``: the transformer blocks and direct heads of EquiformerV2 and EquiformerV3
under bf16 autocast (the package's kernels included), with float32 energies, sums and outputs;
within bf16 rounding of the same weights in fp32; training learns. (Speed:
``benchmarks/bench_equiformer_v2.py --precision bf16``; trained models and MD:
``benchmarks/bench_precision.py``.)"""

from __future__ import annotations

import pytest
import torch
from ase.build import bulk

from fairchem_equiformers import DEQEquiformerV2, EquiformerV2, EquiformerV3
from fairchem_equiformers.equiformer_v3.attention import envelope_softmax
from fairchem_equiformers.primitives import EdgeRotation, S2Grid, SphericalLayout, graph_softmax, grid_mlp
from fairchem_equiformers.primitives._so2 import SO2OrderLinear

from .conftest import TINY_V2, TINY_V3, slab_with_adsorbate, to_batch
from .test_deq import emt_learning

MODELS = {"EquiformerV2": (EquiformerV2, TINY_V2, "direct_forces"),
          "EquiformerV3": (EquiformerV3, TINY_V3, "direct_prediction")}  # fmt: skip
# bf16 against fp32, relative to the largest |E| and |F| of the batch, measured 2026-12-06:
# V2 direct 9.9e-4 / 1.1e-2, gradient 1.1e-3 / 1.3e-2; V3 direct 1.6e-3 / 4.6e-3, gradient 7.1e-4 / 1.5e-3
BOUNDS = (5e-3, 3e-2)


def twins(name: str, direct: bool, **keys):
    """The model in fp32 and in bf16 with the same (perturbed) weights."""
    cls, tiny, direct_key = MODELS[name]
    config = {**tiny, direct_key: direct, **keys}
    torch.manual_seed(0)
    fp32 = cls(**config).eval()
    with torch.no_grad():  # away from the symmetric initialisation
        for p in fp32.parameters():
            p.add_(0.02 * torch.randn_like(p))
    bf16 = cls(**config, precision="bf16").eval()
    bf16.load_state_dict(fp32.state_dict())
    return fp32, bf16


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "gradient"])
@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_is_fp32_within_bf16_rounding(name, direct):
    """Same weights: float32 outputs, within bf16 rounding of fp32; the blocks' linear layers
    really ran in bf16 (a hook sees their outputs)."""
    fp32, bf16 = twins(name, direct)
    dtypes = set()
    hooks = [m.register_forward_hook(lambda m, a, out: dtypes.add(out.dtype))
             for m in bf16.blocks.modules() if isinstance(m, torch.nn.Linear)]  # fmt: skip
    slabs = [slab_with_adsorbate("Cu", "111", "O", seed=0), slab_with_adsorbate("Pt", "100", "CO", seed=1)]
    batch = to_batch(slabs)
    expected, out = fp32(batch), bf16(batch)
    for hook in hooks:
        hook.remove()
    errors = [float((out[k] - expected[k]).abs().max() / expected[k].abs().max()) for k in out]
    print(f"\nMEASURED {name} {'direct' if direct else 'gradient'} bf16 vs fp32: energy {errors[0]:.1e}, "
          f"forces {errors[1]:.1e}")  # fmt: skip
    assert dtypes == {torch.bfloat16}
    assert out["energy"].dtype == out["forces"].dtype == torch.float32
    assert errors[0] < BOUNDS[0] and errors[1] < BOUNDS[1]
    assert errors[0] > 1e-5  # bf16 did change the arithmetic


def test_bf16_energy_is_summed_in_float32():
    """A 500-atom cell with per-atom energies of about -3 eV: they are summed in float32, so the
    bf16 energy per atom stays within bf16 rounding of one atom's energy. (A bf16 sum would round
    the -1,500 eV total to steps of 8 eV: up to 8e-3 eV per atom.)"""
    fp32, bf16 = twins("EquiformerV2", direct=True, regress_forces=False)
    with torch.no_grad():  # per-atom energies of about -3 eV (the head's sum is divided by avg_num_nodes)
        for model in (fp32, bf16):
            model.energy_block.so3_linear_2.bias.sub_(3.0 * model.avg_num_nodes)
    copper = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((5, 5, 5))  # 500 atoms
    copper.rattle(0.05, seed=0)
    batch = to_batch([copper])
    with torch.no_grad():
        per_atom = [float(m(batch)["energy"]) / len(copper) for m in (fp32, bf16)]
    print(f"\nMEASURED energy per atom fp32 {per_atom[0]:.6f}, bf16 {per_atom[1]:.6f}")
    # measured 2026-12-06: 1.4e-5 eV apart per atom
    assert abs(per_atom[0] + 3) < 0.1 and abs(per_atom[1] - per_atom[0]) < 2e-3


def test_kernels_run_bf16_and_hand_float32_gradients():
    """Under bf16 autocast the fused kernels (gather + rotation, complex SO(2) linear, grid MLP)
    return bf16 and give float32 inputs float32 gradients, within bf16 rounding of float32; the
    gathered gradient sums 64 edges per node in float32."""
    torch.manual_seed(0)
    layout = SphericalLayout(lmax=4, mmax=2)
    num_nodes, num_edges, channels = 8, 512, 16
    x = torch.randn(num_nodes, layout.num_coefficients, channels, requires_grad=True)
    edge_index = torch.randint(num_nodes, (2, num_edges))
    rotation = EdgeRotation.from_edge_vectors(torch.randn(num_edges, 3), layout)
    so2 = SO2OrderLinear(num_degrees=3, in_channels=channels, out_channels=channels)
    grid = S2Grid(layout, (18, 16), edge_layout=False)
    linear = [torch.nn.Linear(channels, channels, bias=False) for _ in range(3)]
    mlp = torch.nn.Sequential(linear[0], torch.nn.SiLU(), linear[1], torch.nn.SiLU(), linear[2])

    def run(autocast: bool):
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            groups = rotation.gather_to_edge(x, edge_index)
            m1 = groups[1].reshape(num_edges * 2, 2, -1)[:, :, : 3 * channels]
            y = so2(m1).float().square().mean() + grid_mlp(grid, mlp, x).float().square().mean()
            dtypes = {groups[0].dtype, so2(m1).dtype, grid_mlp(grid, mlp, x).dtype}
        y.backward()
        return y.detach(), x.grad.clone(), dtypes

    y32, g32, dtypes32 = run(False)
    y16, g16, dtypes16 = run(True)
    errors = float((y16 - y32).abs() / y32.abs()), float((g16 - g32).abs().max() / g32.abs().max())
    print(f"\nMEASURED kernels bf16 vs fp32: value {errors[0]:.1e}, gradient {errors[1]:.1e}")
    assert dtypes32 == {torch.float32} and dtypes16 == {torch.bfloat16}
    assert g16.dtype == torch.float32
    # measured 2026-12-06: value 1.2e-4, gradient 1.9e-3
    assert errors[0] < 1e-3 and errors[1] < 1e-2


def test_softmax_over_edges_runs_in_float32():
    """bf16 logits (what an autocast einsum gives) are normalised over each node's 300 edges in
    float32: each node's weights sum to 1 within float32 rounding (a bf16 sum is off by about
    1e-3), and the weights equal float32's on the same logits."""
    torch.manual_seed(0)
    num_nodes, num_edges = 4, 1200
    target = torch.arange(num_nodes).repeat_interleave(num_edges // num_nodes)
    logits = torch.randn(num_edges, 2).bfloat16()  # [E, H]
    envelope = torch.rand(num_edges, 1)
    for softmax, args in (
        (graph_softmax, (target, num_nodes)),
        (envelope_softmax, (target, num_nodes, None, 0.0, None, 0.0, False)),
    ):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            alpha = softmax(logits, *args)
        expected = softmax(logits.float(), *args)
        node_sums = torch.zeros(num_nodes, 2).index_add_(0, target, alpha.float())
        assert alpha.dtype == torch.float32
        assert (node_sums - 1).abs().max() < 1e-5 and (alpha - expected).abs().max() < 1e-7
    with torch.autocast("cpu", dtype=torch.bfloat16):
        alpha = envelope_softmax(logits, target, num_nodes, envelope, 0.0, None, 0.0, False)
    expected = envelope_softmax(logits.float(), target, num_nodes, envelope, 0.0, None, 0.0, False)
    assert alpha.dtype == torch.float32 and (alpha - expected).abs().max() < 1e-7


def test_bf16_attention_sums_edges_in_float32():
    """EquiformerV3's attention sums the weighted messages over edges in float32 under bf16: its
    output projection receives float32 (a bf16 sum over a node's neighbours would lose digits)."""
    _, bf16 = twins("EquiformerV3", direct=True)
    dtypes = []
    hooks = [block.ga.proj.register_forward_pre_hook(lambda m, args: dtypes.append(args[0].dtype))
             for block in bf16.blocks]  # fmt: skip
    with torch.no_grad():
        bf16(to_batch([slab_with_adsorbate("Cu", "111", "O", seed=0)]))
    for hook in hooks:
        hook.remove()
    assert dtypes and set(dtypes) == {torch.float32}


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_model_learns_like_fp32(name):
    """100 steps on the EMT slabs: bf16 learns the forces about as well as fp32."""
    cls, tiny, _ = MODELS[name]
    ratios = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = cls(**{**tiny, "avg_num_nodes": 20.0}, precision=precision)
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
        energy_mae, force_mae, mean_energy, mean_force = emt_learning(model, 100, optimizer)
        ratios[precision] = (energy_mae / mean_energy, force_mae / mean_force)
    print(f"\nMEASURED {name} (energy, force MAE) / mean predictor's: {ratios}")
    # measured 2026-12-06: force ratios V2 0.584 (fp32) / 0.610 (bf16), V3 0.449 / 0.479
    assert ratios["bf16"][1] < 0.7 and ratios["bf16"][1] < 1.15 * ratios["fp32"][1]


def test_precision_names_the_key():
    with pytest.raises(ValueError, match="precision: 'fp16' is not one of fp32, bf16"):
        EquiformerV2(**TINY_V2, precision="fp16")
    with pytest.raises(ValueError, match="precision='bf16': a DEQ's fixed-point solve runs in float32"):
        DEQEquiformerV2(**TINY_V2, precision="bf16")
