"""Energy conservation in NVE molecular dynamics for every model with gradient forces, with its
default inference settings (DEQs: the precise solve and the implicit gradient), float64.

Velocity Verlet over 10 fs, at 0.5 and 0.25 fs, on a rattled Cu(111) slab with an O atom at
50 K (bottom layer fixed), through an ASE calculator; weights nudged off their symmetric
initialisation as in the model battery. The untrained models' energy scales differ by orders
of magnitude, so each model's energy is multiplied by the constant that makes its largest
initial force 1 eV/A: ``c E`` is conserved exactly when the forces are ``-dE/dpos``, and every
model then moves the atoms alike. The cutoff (3.95 A) lies in a gap of the slab's pair
distances and the run asserts no pair crosses it: the families without a cutoff envelope
(EquiformerV2, Equiformer V1) have an energy that jumps there."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import units
from ase.build import add_adsorbate, fcc111
from ase.constraints import FixAtoms
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet
from ase.neighborlist import neighbor_list
from fairchem.core.common.registry import registry

import fairchem_equiformers  # noqa: F401  (registers the models)

from .conftest import TINY_V2
from .test_deq import TINY_DEQ
from .test_deq_v1 import TINY_DEQ_V1
from .test_e2former import TINY as TINY_E2FORMER
from .test_equiformer_v1 import TINY_V1
from .test_equiformer_v2_conservative import NVE_CUTOFF, ModelCalculator


class ScaledCalculator(ModelCalculator):
    """``scale`` times the model's energy and forces."""

    def __init__(self, model: torch.nn.Module, scale: float) -> None:
        super().__init__(model)
        self.scale = scale

    def calculate(self, *args, **kwargs) -> None:
        super().calculate(*args, **kwargs)
        self.results = {key: self.scale * value for key, value in self.results.items()}


PERIODIC = {"use_pbc": True, "max_radius": NVE_CUTOFF, "max_num_elements": 90}
MODELS = {
    "EquiformerV2": {**TINY_V2, **PERIODIC, "direct_forces": False},
    "EquiformerV1": {**TINY_V1, **PERIODIC},
    "E2Former": {**TINY_E2FORMER, **PERIODIC},
    "DEQEquiformerV2": {**TINY_DEQ, **PERIODIC, "direct_forces": False},
    "DEQEquiformerV1": {**TINY_DEQ_V1, **PERIODIC},
    "DEQ": {
        "backbone": {"model": "fairchem_equiformers.E2Former", **TINY_E2FORMER, **PERIODIC, "num_layers": 1}
    },
}
# max |E_total(t) - E_total(0)| per atom over 10 fs at 0.25 fs, eV (measured 2026-12-05, float64,
# in brackets): about 3x the measurement. Above INTEGRATOR_REGIME (eV per atom at 0.5 fs) the error
# is velocity Verlet's and halving the step cuts it ~4x; below it the runs sit on a floor of about
# 1.3e-7 eV per atom that does not depend on the step (E2Former and the DEQ over it).
DRIFT_BOUND = {
    "EquiformerV2": 2e-6,  # (6.9e-7)
    "EquiformerV1": 4e-6,  # (1.4e-6)
    "E2Former": 5e-7,  # (1.4e-7)
    "DEQEquiformerV2": 5e-6,  # (1.5e-6)
    "DEQEquiformerV1": 6e-7,  # (1.8e-7)
    "DEQ": 5e-7,  # (1.3e-7)
}
INTEGRATOR_REGIME = 1e-6


def nve_drift(name: str, timestep_fs: float, steps: int) -> tuple[float, float]:
    """Max |E_total(t) - E_total(0)| per atom (eV) of a velocity Verlet run, and the energy scale."""
    torch.manual_seed(0)
    model = registry.get_model_class(f"fairchem_equiformers.{name}")(**MODELS[name]).double().eval()
    with torch.no_grad():  # away from the symmetric initial norms (as the battery's models)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    atoms = fcc111("Cu", size=(2, 2, 3), vacuum=7.0)
    add_adsorbate(atoms, "O", height=2.0, position="ontop")
    atoms.set_constraint(FixAtoms(indices=list(range(4))))
    atoms.pbc = True
    atoms.rattle(0.02, seed=0)
    MaxwellBoltzmannDistribution(atoms, temperature_K=50, rng=np.random.default_rng(0))
    atoms.calc = ModelCalculator(model)
    scale = 1.0 / float(np.abs(atoms.get_forces()).max())
    atoms.calc = ScaledCalculator(model, scale)
    pairs = len(neighbor_list("i", atoms, NVE_CUTOFF))
    totals = []

    def record() -> None:
        assert len(neighbor_list("i", atoms, NVE_CUTOFF)) == pairs, "a pair crossed the cutoff"
        totals.append(atoms.get_total_energy())

    dynamics = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    dynamics.attach(record, interval=1)
    record()
    dynamics.run(steps)
    totals = np.array(totals)
    return float(np.abs(totals - totals[0]).max() / len(atoms)), scale


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_gradient_force_model_conserves_energy_in_nve(name):
    """The energy error is velocity Verlet's: bounded, and about 4x smaller at half the step
    (second order). Forces that were not the gradient of the energy would leave a drift that
    does not shrink with the step."""
    coarse, scale = nve_drift(name, timestep_fs=0.5, steps=20)
    fine, _ = nve_drift(name, timestep_fs=0.25, steps=40)
    print(f"{name}: energy x{scale:.1e}; NVE 10 fs, max |E_total - E_total(0)| per atom "
          f"{coarse:.1e} eV at 0.5 fs, {fine:.1e} eV at 0.25 fs (ratio {coarse / fine:.1f})")  # fmt: skip
    assert fine < DRIFT_BOUND[name]
    if coarse > INTEGRATOR_REGIME:
        assert coarse / fine > 3.0
