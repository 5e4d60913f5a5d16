"""Conservative forces (-dE/dpos) and stress ((1/V) dE/d strain) of the plugin's EquiformerV2
(``direct_forces=False``, ``regress_stress=True``): finite differences in float64 at edges along
the frame's poles, energy conservation in NVE molecular dynamics, training, and loading released
(direct-force) weights. Finite differences and rotations of rattled structures: the shared battery
(test_model_battery.py)."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from ase import units
from ase.build import add_adsorbate, fcc100, fcc111
from ase.calculators.calculator import Calculator, all_changes
from ase.constraints import FixAtoms
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet
from ase.neighborlist import neighbor_list

from fairchem_equiformers import EquiformerV2
from fairchem_equiformers.primitives import _rotation as rotation_module
from fairchem_equiformers.primitives import build_graph
from fairchem_equiformers.primitives._wigner import FRAME_POLE, frame_tilt

from .conftest import TINY_V2, to_batch
from .test_equiformer_v2_parity import BASE, CONFIGS, build_pair
from .test_equiformer_v2_properties import GATE, model_for

CONSERVATIVE = {**TINY_V2, "direct_forces": False}
GATE_WITH_STRESS = {**GATE, "direct_forces": False, "regress_stress": True}
STEP = 1e-6  # central differences: truncation ~STEP^2, round-off ~1e-16 / STEP
# Measured: the error stops falling at 2e-7..1e-6 of the largest force for steps below 1e-6
# (an unexplained floor, not round-off, which would grow as the step shrinks).
FORCE_TOLERANCE = 2e-6
STRESS_TOLERANCE = 1e-6


def energy_only(model: EquiformerV2, config: dict) -> EquiformerV2:
    """The same energy function without the derivative outputs (for finite differences)."""
    plain = EquiformerV2(
        **{**config, "direct_forces": True, "regress_forces": False, "regress_stress": False}
    )
    plain.load_state_dict(model.state_dict())
    return plain.to(torch.float64).eval()


def energies(model, batch, pos=None, strain=None) -> torch.Tensor:
    """Energies ``[B]`` at displaced positions and/or under a (3x3) strain of every graph."""
    batch = copy.deepcopy(batch)
    if pos is not None:
        batch.pos = pos
    if strain is not None:
        batch.pos = batch.pos + batch.pos @ strain
        batch.cell = batch.cell + batch.cell @ strain
    with torch.no_grad():
        return model(batch)["energy"]


def force_fd_error(model, plain, batch, components) -> float:
    """Worst error of the forces against central differences of the energy (one random
    displacement of all atoms, then single components), relative to the largest force."""
    forces = model(copy.deepcopy(batch))["forces"]
    generator = torch.Generator().manual_seed(0)
    directions = [torch.randn(batch.pos.shape, dtype=torch.float64, generator=generator)]
    for atom, axis in components:
        directions.append(torch.zeros_like(batch.pos))
        directions[-1][atom, axis] = 1.0
    worst = 0.0
    for direction in directions:
        plus = energies(plain, batch, pos=batch.pos + STEP * direction).sum()
        minus = energies(plain, batch, pos=batch.pos - STEP * direction).sum()
        expected = -(plus - minus) / (2 * STEP)
        worst = max(worst, abs(float((forces * direction).sum() - expected)) / float(forces.abs().max()))
    return worst


def stress_fd_error(model, plain, batch) -> tuple[float, torch.Tensor]:
    """Worst error of the stress ``[B, 3, 3]`` against central differences of the energy under
    symmetric strains, relative to the largest stress component; and the stress."""
    stress = model(copy.deepcopy(batch))["stress"].view(-1, 3, 3)
    volume = torch.linalg.det(batch.cell).abs()
    worst = 0.0
    for i in range(3):
        for j in range(i, 3):
            strain = torch.zeros(3, 3, dtype=torch.float64)
            strain[i, j] += STEP / 2
            strain[j, i] += STEP / 2
            derivative = (energies(plain, batch, strain=strain) - energies(plain, batch, strain=-strain)) / (
                2 * STEP
            )
            error = (stress[:, i, j] - derivative / volume).abs().max() / stress.abs().max()
            worst = max(worst, float(error))
    return worst, stress


def slab_with_pole_edges() -> tuple:
    """An unrattled fcc(100) slab turned so that its y axis lies along the frame's pole
    (``FRAME_POLE``): neighbours along y in each layer and, within a 5.5 A cutoff, each atom's
    periodic image one cell along y -- edges on the pole to float64 round-off."""
    atoms = fcc100("Cu", size=(2, 2, 3), vacuum=7.0)
    add_adsorbate(atoms, "O", height=1.9, position="hollow")
    atoms.pbc = True
    batch = to_batch([atoms], torch.float64)
    turn = frame_tilt()  # rows: y -> FRAME_POLE for row vectors (v @ Q = Q^T v)
    batch.pos = torch.tensor(atoms.positions) @ turn  # exact: through float32 they are 1e-8 rad off
    batch.cell = (torch.tensor(atoms.cell[:]) @ turn)[None]
    return batch, {**GATE_WITH_STRESS, "max_radius": 5.5}


def test_edges_along_the_pole_get_the_exact_gradient_float64():
    """With gate activations the model is exactly invariant to the frame's spin, so its energy
    is smooth through the poles and finite differences are exact there too."""
    batch, config = slab_with_pole_edges()
    model = model_for(config)
    edge_vec = build_graph(model, batch, batch.pos).edge_vec
    unit = edge_vec / edge_vec.norm(dim=-1, keepdim=True)
    pole = torch.tensor(FRAME_POLE, dtype=torch.float64)
    num_poles = int(((unit @ pole).abs() > 1 - 1e-15).sum())
    assert num_poles >= 16
    plain = energy_only(model, config)
    force_error = force_fd_error(model, plain, batch, [(4, 0), (8, 2), (12, 0)])
    stress_error, _ = stress_fd_error(model, plain, batch)
    print(f"{num_poles} pole edges: force error {force_error:.1e}, stress error {stress_error:.1e}")
    assert force_error < FORCE_TOLERANCE and stress_error < STRESS_TOLERANCE


def test_without_the_pole_gradient_the_check_above_fails(monkeypatch):
    """The pole test can fail: drop the pole correction and the derivatives are wrong."""
    monkeypatch.setattr(rotation_module, "with_pole_gradients", lambda blocks, edge_vec: blocks)
    batch, config = slab_with_pole_edges()
    model = model_for(config)
    plain = energy_only(model, config)
    force_error = force_fd_error(model, plain, batch, [])
    stress_error, _ = stress_fd_error(model, plain, batch)
    print(f"without pole gradients: force error {force_error:.1e}, stress error {stress_error:.1e}")
    assert force_error > 100 * FORCE_TOLERANCE and stress_error > 10 * STRESS_TOLERANCE


def test_gradients_along_the_pole_are_finite_with_s2_grids():
    batch, config = slab_with_pole_edges()
    model = model_for(
        {**config, "use_gate_act": False, "use_grid_mlp": True, "lmax_list": [2], "mmax_list": [1]}
    )
    model.train()
    out = model(batch)
    (out["forces"].pow(2).sum() + out["stress"].pow(2).sum()).backward()
    assert torch.isfinite(out["forces"]).all() and torch.isfinite(out["stress"]).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


class ModelCalculator(Calculator):
    """The smallest ASE calculator around a float64 model."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, model: EquiformerV2) -> None:
        super().__init__()
        self.model = model

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        out = self.model(to_batch([self.atoms], torch.float64))
        self.results = {"energy": float(out["energy"][0]), "forces": out["forces"].detach().numpy()}


NVE_CUTOFF = 3.95  # in the gap between pair distances 3.61 and 4.34 A of the slab below


def nve_total_energies(direct_forces: bool, timestep_fs: float, steps: int) -> tuple[np.ndarray, int]:
    """Velocity Verlet on a Cu(111) slab with an O atom (bottom layer fixed) at 50 K.

    EquiformerV2 has no cutoff envelope: its energy jumps when a pair crosses the cutoff, so the
    run asserts that none does. Returns the total energy after each step and the atom count."""
    torch.manual_seed(0)
    model = EquiformerV2(**{**TINY_V2, "max_radius": NVE_CUTOFF, "direct_forces": direct_forces})
    model = model.to(torch.float64).eval()
    atoms = fcc111("Cu", size=(2, 2, 3), vacuum=7.0)
    add_adsorbate(atoms, "O", height=2.0, position="ontop")
    atoms.set_constraint(FixAtoms(indices=list(range(4))))
    atoms.pbc = True
    MaxwellBoltzmannDistribution(atoms, temperature_K=50, rng=np.random.default_rng(0))
    atoms.calc = ModelCalculator(model)
    pairs = len(neighbor_list("i", atoms, NVE_CUTOFF))
    totals = []

    def record() -> None:
        assert len(neighbor_list("i", atoms, NVE_CUTOFF)) == pairs, "a pair crossed the cutoff"
        totals.append(atoms.get_total_energy())

    dynamics = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    dynamics.attach(record, interval=1)
    record()
    dynamics.run(steps)
    return np.array(totals), len(atoms)


def test_energy_is_conserved_in_nve_md():
    totals, natoms = nve_total_energies(direct_forces=False, timestep_fs=0.5, steps=200)
    drift = np.abs(totals - totals[0]).max() / natoms
    print(f"NVE 200 x 0.5 fs, conservative forces: max |E_total - E_total(0)| per atom {drift:.1e} eV")
    assert drift < 3e-5


@pytest.mark.slow
def test_nve_energy_error_is_the_integrators():
    """Halving the time step cuts the energy error about 4x (velocity Verlet is second order),
    while direct forces (not a gradient) break conservation by orders of magnitude more."""
    coarse, natoms = nve_total_energies(direct_forces=False, timestep_fs=0.5, steps=200)
    fine, _ = nve_total_energies(direct_forces=False, timestep_fs=0.25, steps=400)
    direct, _ = nve_total_energies(direct_forces=True, timestep_fs=0.5, steps=200)
    errors = [np.abs(t - t[0]).max() / natoms for t in (coarse, fine, direct)]
    print(
        f"NVE energy error per atom: 0.5 fs {errors[0]:.1e}, 0.25 fs {errors[1]:.1e}, direct {errors[2]:.1e}"
    )
    assert 3.5 < errors[0] / errors[1] < 6.0
    assert errors[2] > 100 * errors[0]


def test_training_step_lowers_the_force_loss(slab_batch):
    """Force losses train the energy model (double backward): one SGD step lowers the loss. (Which
    parameters the force loss reaches, and that its gradient is exact: the battery's second-order
    check, test_model_battery.py, on this configuration.)"""
    torch.manual_seed(0)
    model = EquiformerV2(**CONSERVATIVE).train()
    assert model.force_block is None
    targets = torch.randn(len(slab_batch.pos), 3, generator=torch.Generator().manual_seed(1))

    def force_loss():
        return (model(copy.deepcopy(slab_batch))["forces"] - targets).norm(dim=-1).mean()

    loss = force_loss()
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.05).step()
    after = force_loss()
    print(f"force loss {float(loss):.4f} -> {float(after):.4f} after one SGD step")
    assert float(after) < float(loss) - 1e-4


def test_forces_under_no_grad_and_the_callers_positions(slab_batch):
    """fairchem predicts under no_grad: conservative forces are still computed, without a
    graph in eval mode, and the caller's positions are left as they were."""
    model = model_for(CONSERVATIVE, torch.float32)
    batch = copy.deepcopy(slab_batch)
    with torch.no_grad():
        quiet = model(batch)
    assert not batch.pos.requires_grad
    loud = model(batch)
    assert not loud["forces"].requires_grad
    torch.testing.assert_close(quiet["forces"], loud["forces"], rtol=0, atol=0)


def test_released_weights_load_without_the_force_head(caplog, slab_batch):
    """A released (direct-force) checkpoint starts a conservative model: its force head is
    skipped with a warning and the energy is the released model's."""
    config = {**BASE, **CONFIGS["L4M3_3layers_gate_ln_linref"]}
    reference, direct = build_pair(config)
    released = {"module.module." + k: v for k, v in reference.state_dict().items()}
    conservative = EquiformerV2(**config, direct_forces=False)
    with caplog.at_level(logging.WARNING):
        conservative.load_state_dict(released)
    assert "force head" in caplog.text and "direct_forces=False" in caplog.text
    force_head = {k for k in direct.state_dict() if k.startswith("force_block.")}
    assert force_head and set(conservative.state_dict()) == set(direct.state_dict()) - force_head
    assert conservative.num_params < direct.num_params
    direct.eval(), conservative.eval()
    torch.testing.assert_close(
        conservative(copy.deepcopy(slab_batch))["energy"], direct(copy.deepcopy(slab_batch))["energy"]
    )
    with pytest.raises(RuntimeError, match="Missing key.*force_block"):
        EquiformerV2(**config).load_state_dict(conservative.state_dict())


@pytest.mark.parametrize(
    "options,message",
    [
        ({"regress_stress": True}, "regress_stress=True needs direct_forces=False"),
        ({"regress_stress": True, "direct_forces": False, "use_pbc": False}, "use_pbc=False"),
        ({"regress_stress": True, "direct_forces": False, "regress_forces": False}, "regress_forces=False"),
    ],
)
def test_stress_needs_conservative_forces_and_a_cell(options, message):
    with pytest.raises(ValueError, match=message):
        EquiformerV2(**{**TINY_V2, **options})


def z_force_error_of_bottom_atoms(slab_structures) -> float:
    """The fixed (unrattled) bottom-layer atoms 0 and 1 of the Cu(111)+O slab are 2.553 A apart
    along x, with edges between them exactly along y through the periodic image (to float32
    round-off, 1e-8 rad): their z forces against central differences (float64, h = 1e-4), the
    default S2-grid activations (whose energy depends on the frame's spin about the edge)."""
    torch.manual_seed(0)
    config = {**CONSERVATIVE, "num_layers": 1, "num_distance_basis": 32, "max_neighbors": 100}
    model = EquiformerV2(**config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = to_batch(slab_structures[:1], torch.float64)
    forces = model(copy.deepcopy(batch))["forces"].detach()

    def energy(pos):
        moved = copy.deepcopy(batch)
        moved.pos = pos
        return float(model(moved)["energy"].sum())

    h, worst = 1e-4, 0.0
    for atom in (0, 1):
        plus, minus = batch.pos.clone(), batch.pos.clone()
        plus[atom, 2] += h
        minus[atom, 2] -= h
        numeric = -(energy(plus) - energy(minus)) / (2 * h)
        worst = max(worst, abs(numeric - float(forces[atom, 2])) / float(forces.abs().max()))
    print(f"z forces of atoms 0 and 1 vs central differences: relative error {worst:.2e}")
    return worst


def test_forces_of_atoms_with_edges_along_a_crystal_axis(slab_structures):
    """Edges along the y axis (every cubic cell and slab has them) are far from the frame's
    poles, so the energy is smooth there; measured 3.7e-8."""
    assert z_force_error_of_bottom_atoms(slab_structures) < 2e-7


def test_with_the_poles_on_the_y_axis_the_check_above_fails(slab_structures, monkeypatch):
    """The check can fail: with the Euler frame's poles on the y axis (no tilt) those edges sit
    1e-8 rad from a pole, where the frame spins once about the edge within 1e-8 A; the S2-grid
    energy follows the spin by its grid error, and -dE/dpos is not the slope of the energy
    (measured 0.71 relative)."""
    identity = torch.eye(3, dtype=torch.float64)
    monkeypatch.setattr(rotation_module, "frame_tilt", lambda: identity)
    monkeypatch.setattr(rotation_module, "tilt_wigner", lambda l: torch.eye(2 * l + 1, dtype=torch.float64))
    assert z_force_error_of_bottom_atoms(slab_structures) > 0.3
