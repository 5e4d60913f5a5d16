"""One test battery for every model of the plugin (after NequIP's model test mixins).

A test class inherits :class:`ModelBattery` and sets ``config`` to a :class:`BatteryConfig`: the
model class, its (small) constructor arguments, the structures and the per-model tolerances.
Every check runs in float64 on seeded, randomly perturbed weights, on rattled structures
(every atom moved, fixed ones too, and the periodic cells turned by a fixed random rotation;
edges along the crystal axes and on the edge frame's poles have their own tests in
``test_equiformer_v2_conservative.py``).

The checks (``{kind}`` is ``molecule`` -- built with ``molecule_kwargs``, by default
``use_pbc=False`` -- or ``cell`` -- periodic slabs, ``use_pbc=True``):

* ``rotation_{kind}``: energy invariant, forces (and stress) equivariant under random rotations
  of the positions and the cell; ``translation_{kind}``, ``permutation_{kind}``;
* ``batch``: a batch of several structures (slabs, a lone atom, a gas-phase adsorbate far above
  a slab, a molecule) equals each structure run alone, and an atom without neighbours gets exactly
  zero force; ``isolated_atom_alone``: a batch of that one atom (no edge at all) runs;
* ``fd_forces_{kind}``: gradient forces equal central differences of the returned energy; direct
  forces must differ from them (they are not a gradient);
* ``second_order``: in training mode the gradient of a force loss equals a central difference of
  the loss along a random direction in parameter space (double backward for gradient forces),
  and reaches every parameter the energy depends on, except those listed in
  ``force_loss_constant`` (with the reason);
* ``fd_stress``: the stress equals the strain derivative of the energy (``stress=True``, whose
  ``kwargs`` switch it on; other configs must not return a stress);
* ``state_dict``: a fresh instance loading the state dict gives identical outputs;
* ``every_parameter``: a training step (energy + force loss) gives every trainable parameter a
  non-zero gradient (DistributedDataParallel's requirement) except those listed in
  ``no_gradient`` (with the reason);
* ``edge_chunks``: EquiformerV2's attention splits the edges into chunks of about
  ``attention.EDGE_CHUNK_BYTES`` when no gradient is recorded: with a tiny budget (several
  chunks, counted) the outputs under ``no_grad`` equal the normal path's. ``edge_chunks`` names
  why a config does not chunk (then the check asserts that no chunking happened).

Relative errors are ``max |difference| / max |reference|`` over the compared tensor; every
measured value is printed (run with ``-s``). ``tolerances`` maps a check's name to its bound.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from ase import Atoms
from e3nn import o3

from fairchem_equiformers.equiformer_v2 import attention as v2_attention

from .conftest import molecule_in_box, slab_with_adsorbate, to_batch

KINDS = ("molecule", "cell")


# --- structures ------------------------------------------------------------------------------------


def rattled(atoms: Atoms, seed: int, amplitude: float = 0.05) -> Atoms:
    """``atoms`` with every atom (constraints ignored) moved by a normal ``amplitude`` (A)."""
    atoms = atoms.copy()
    atoms.set_constraint()
    atoms.positions += np.random.default_rng(seed).normal(0.0, amplitude, atoms.positions.shape)
    return atoms


def turned(atoms: Atoms, seed: int) -> Atoms:
    """``atoms`` and their cell turned by a seeded random rotation (no cell vector along an axis)."""
    rotation = random_rotations(1, seed)[0].numpy()
    out = atoms.copy()
    out.set_cell(atoms.cell[:] @ rotation.T, scale_atoms=False)
    out.positions = atoms.positions @ rotation.T
    return out


def molecules() -> list[Atoms]:
    """Ethanol and water, rattled, in 40 A boxes (ignored with ``use_pbc=False``)."""
    return [rattled(molecule_in_box("CH3CH2OH"), 1), rattled(molecule_in_box("H2O"), 2)]


def cells() -> list[Atoms]:
    """Two OC20-style slabs (Cu(111)+O, Pt(100)+CO), every atom rattled, cells turned."""
    return [
        turned(rattled(slab_with_adsorbate("Cu", "111", "O", seed=0), 3), 4),
        turned(rattled(slab_with_adsorbate("Pt", "100", "CO", seed=1), 5), 6),
    ]


def batch_extras() -> list[Atoms]:
    """For the batching check: a lone atom, a slab whose adsorbate is 8 A beyond the cutoff (a
    gas-phase atom) and a water molecule, all periodic."""
    lone = Atoms("O", positions=[[10.0, 10.0, 10.0]], cell=np.eye(3) * 20.0, pbc=True)
    far = rattled(slab_with_adsorbate("Cu", "111", "O", seed=3), 7)
    far.positions[-1, 2] += 8.0
    return [lone, turned(far, 8), rattled(molecule_in_box("H2O"), 9)]


def float64_batch(structures: list[Atoms]):
    """The fairchem batch of ``structures`` with their exact float64 positions and cells."""
    batch = to_batch(structures, torch.float64)
    batch.pos = torch.tensor(np.concatenate([a.positions for a in structures]), dtype=torch.float64)
    batch.cell = torch.tensor(np.stack([a.cell[:] for a in structures]), dtype=torch.float64)
    return batch


# --- helpers shared with the per-family tests ----------------------------------------------------


def random_rotations(count: int, seed: int) -> list[torch.Tensor]:
    """``count`` seeded random rotation matrices ``[3, 3]`` (float64); the global RNG is left alone."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return [o3.rand_matrix(dtype=torch.float64) for _ in range(count)]


def rotated(batch, rotation: torch.Tensor):
    """A copy of ``batch`` with positions and cells turned by ``rotation`` ``[3, 3]``."""
    out = copy.deepcopy(batch)
    out.pos = batch.pos @ rotation.T
    out.cell = batch.cell @ rotation.T
    return out


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|``."""
    return float((actual - expected).abs().max() / expected.abs().max())


def symmetry_errors(model, batch, rotations: int = 2, seed: int = 7) -> dict[str, float]:
    """Worst relative errors of energy invariance and force (and stress) equivariance over seeded
    random rotations of ``batch``."""
    base = model(copy.deepcopy(batch))
    errors = dict.fromkeys([k for k in ("energy", "forces", "stress") if k in base], 0.0)
    for rotation in random_rotations(rotations, seed):
        out = model(rotated(batch, rotation))
        expected = {"energy": base["energy"]}
        if "forces" in base:
            expected["forces"] = base["forces"] @ rotation.T
        if "stress" in base:
            expected["stress"] = (rotation @ base["stress"].view(-1, 3, 3) @ rotation.T).view(-1, 9)
        for key in errors:
            errors[key] = max(errors[key], relative_error(out[key].detach(), expected[key].detach()))
    return errors


# --- the configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BatteryConfig:
    """What a model's battery needs.

    ``model_class``: the model's class (or a function building it from the keyword arguments);
    ``registered_name``: the model's name in fairchem's registry (default: the class's);
    ``kwargs``: the constructor's arguments (small model; ``use_pbc`` is set per kind);
    ``molecule_kwargs``: added for the molecules (default non-periodic);
    ``perturbation``: weights get ``perturbation * N(0, 1)`` added (away from symmetric inits);
    ``tolerances``: check name -> bound on its relative error (see the module docstring);
    ``fd_step``: central-difference step (A) of the force check;
    ``min_stress``: the largest stress component must exceed it (eV/A^3: not trivially zero);
    ``stress``: whether ``kwargs`` make the model regress a stress (a model that gains stress
    support is added by one config with ``regress_stress=True`` in ``kwargs`` and ``stress=True``);
    ``training_kwargs``: added for the second-order check (a DEQ needs its exact training gradient);
    ``force_loss_constant`` / ``no_gradient``: parameter name -> why it gets no gradient there;
    ``edge_chunks``: ``None`` when the model chunks edges under ``no_grad``, else why it does not;
    ``known_defects``: check name -> the defect that makes it fail (a strict xfail: it must fail
    until the defect is fixed); so far only ``isolated_atom_alone``."""

    model_class: type
    kwargs: dict
    tolerances: dict[str, float]
    molecule_kwargs: dict = field(default_factory=lambda: {"use_pbc": False})
    perturbation: float = 0.1
    seed: int = 0
    fd_step: float = 1e-5
    stress: bool = False
    training_kwargs: dict = field(default_factory=dict)
    force_loss_constant: dict[str, str] = field(default_factory=dict)
    no_gradient: dict[str, str] = field(default_factory=dict)
    edge_chunks: str | None = None
    known_defects: dict[str, str] = field(default_factory=dict)
    min_stress: float = 1e-6
    registered_name: str | None = None
    direct_forces: bool | None = None  # default: kwargs' direct_forces, else the model's default
    molecules: Callable[[], list[Atoms]] = molecules
    cells: Callable[[], list[Atoms]] = cells

    @property
    def name(self) -> str:
        return self.registered_name or f"fairchem_equiformers.{self.model_class.__name__}"

    @property
    def gradient_forces(self) -> bool:
        if self.direct_forces is not None:
            return not self.direct_forces
        return not self.kwargs.get("direct_forces", self.model_class.__name__.endswith("EquiformerV2"))


# --- the battery -------------------------------------------------------------------------------------


class ModelBattery:
    """Inherit and set ``config``; every ``test_*`` below then runs on that model."""

    config: BatteryConfig

    def build(self, kind: str = "cell", seed: int | None = None, perturb: bool = True, **extra):
        config = self.config
        kwargs = {**config.kwargs, "use_pbc": True}
        if kind == "molecule":
            kwargs.update(config.molecule_kwargs)
        torch.manual_seed(config.seed if seed is None else seed)
        model = config.model_class(**kwargs, **extra).double().eval()
        if perturb:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(config.perturbation * torch.randn_like(p))
        return model

    def structures(self, kind: str) -> list[Atoms]:
        return self.config.molecules() if kind == "molecule" else self.config.cells()

    def check(self, name: str, value: float, kind: str = "") -> None:
        """Print the measurement and compare it with the config's tolerance for ``name``."""
        tolerance = self.config.tolerances[name]
        print(f"\nMEASURED {type(self).__name__} {name} {kind}: {value:.2e} (tolerance {tolerance:.0e})")
        assert value <= tolerance, f"{name} ({kind}): {value:.2e} > {tolerance:.0e}"

    # 1. symmetry ----------------------------------------------------------------------------------

    @pytest.mark.parametrize("kind", KINDS)
    def test_rotation(self, kind):
        model = self.build(kind)
        errors = symmetry_errors(model, float64_batch(self.structures(kind)), rotations=3)
        for key, value in errors.items():
            self.check(f"rotation_{key}", value, kind)

    @pytest.mark.parametrize("kind", KINDS)
    def test_translation(self, kind):
        model = self.build(kind)
        batch = float64_batch(self.structures(kind))
        base = model(copy.deepcopy(batch))
        shifted = copy.deepcopy(batch)
        shifted.pos = shifted.pos + torch.tensor([0.7, -1.3, 2.1], dtype=torch.float64)
        out = model(shifted)
        for key in base:
            self.check(f"translation_{key}", relative_error(out[key].detach(), base[key].detach()), kind)

    @pytest.mark.parametrize("kind", KINDS)
    def test_permutation(self, kind):
        model = self.build(kind)
        structures = self.structures(kind)
        base = model(float64_batch(structures))
        perm = np.random.default_rng(0).permutation(len(structures[1]))
        permuted = [structures[0], structures[1][perm], *structures[2:]]
        out = model(float64_batch(permuted))
        start, stop = len(structures[0]), len(structures[0]) + len(perm)
        expected = {k: v.detach().clone() for k, v in base.items()}
        if "forces" in base:
            expected["forces"][start:stop] = expected["forces"][start:stop][torch.as_tensor(perm)]
        for key in base:
            self.check(f"permutation_{key}", relative_error(out[key].detach(), expected[key]), kind)

    # 2. batching ----------------------------------------------------------------------------------

    def test_isolated_atom_alone(self, request):
        """A batch of one atom without neighbours (no edge at all)."""
        reason = self.config.known_defects.get("isolated_atom_alone")
        if reason:
            request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
        out = self.build("cell")(float64_batch(batch_extras()[:1]))
        assert all(torch.isfinite(v).all() for v in out.values())
        assert torch.equal(out["forces"], torch.zeros(1, 3, dtype=torch.float64))  # exactly

    def test_batch_equals_structures_one_by_one(self):
        model = self.build("cell")
        structures = [*self.config.cells(), *batch_extras()]
        together = model(float64_batch(structures))
        assert all(torch.isfinite(v).all() for v in together.values())
        errors = dict.fromkeys(together, 0.0)
        start = 0
        for i, atoms in enumerate(structures):
            if len(atoms) == 1:  # no neighbour: exactly no force
                assert torch.equal(together["forces"][start], torch.zeros(3, dtype=torch.float64))
            if len(atoms) == 1 and "isolated_atom_alone" in self.config.known_defects:
                start += 1  # alone it fails: test_isolated_atom_alone
                continue
            alone = model(float64_batch([atoms]))
            rows = {"energy": slice(i, i + 1), "stress": slice(i, i + 1)}
            for key in together:
                part = together[key][rows.get(key, slice(start, start + len(atoms)))].detach()
                if part.abs().max() > 0:
                    errors[key] = max(errors[key], relative_error(part, alone[key].detach()))
                else:
                    assert torch.equal(part, alone[key].detach())
            start += len(atoms)
        for key, value in errors.items():
            self.check(f"batch_{key}", value)

    # 3. forces against finite differences ---------------------------------------------------------

    @pytest.mark.parametrize("kind", KINDS)
    def test_forces_against_finite_differences(self, kind):
        model = self.build(kind)
        batch = float64_batch(self.structures(kind))
        forces = model(copy.deepcopy(batch))["forces"].detach()
        step = self.config.fd_step
        generator = torch.Generator().manual_seed(0)
        directions = [torch.randn(batch.pos.shape, dtype=torch.float64, generator=generator)]
        split = int(batch.natoms[0])
        for atom, axis in [(0, 0), (split - 1, 2), (split, 1), (len(batch.pos) - 1, 0)]:
            directions.append(torch.zeros_like(batch.pos))
            directions[-1][atom, axis] = 1.0
        if not self.config.gradient_forces:
            directions = directions[:1]

        def energy(pos) -> float:
            moved = copy.deepcopy(batch)
            moved.pos = pos
            return float(model(moved)["energy"].sum())

        worst = 0.0
        for direction in directions:
            numeric = -(energy(batch.pos + step * direction) - energy(batch.pos - step * direction)) / (
                2 * step
            )
            worst = max(worst, abs(float((forces * direction).sum()) - numeric) / float(forces.abs().max()))
        if self.config.gradient_forces:
            self.check("fd_forces", worst, kind)
        else:  # direct forces are not the energy's gradient
            print(f"\nMEASURED {type(self).__name__} direct forces vs -dE/dpos ({kind}): {worst:.2e}")
            assert worst > 1e-3

    # 4. second derivatives -------------------------------------------------------------------------

    def test_force_loss_gradient_matches_finite_differences(self):
        """Training mode, molecules: d(force loss)/d(parameters), by (double) backward, against a
        central difference of the loss along a random unit direction in parameter space."""
        model = self.build("molecule", **self.config.training_kwargs).train()
        batch = float64_batch(self.structures("molecule"))
        targets = torch.randn(
            batch.pos.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
        )
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}

        def force_loss() -> torch.Tensor:
            return (model(copy.deepcopy(batch))["forces"] - targets).pow(2).sum()

        def nonzero_gradients() -> set[str]:
            names = {n for n, p in params.items() if p.grad is not None and p.grad.abs().max() > 0}
            model.zero_grad(set_to_none=True)
            return names

        model(copy.deepcopy(batch))["energy"].sum().backward()
        shape_energy = nonzero_gradients()
        force_loss().backward()
        gradient = {
            n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in params.items()
        }
        trained_by_forces = nonzero_gradients()
        if self.config.gradient_forces:  # every parameter shaping the energy shapes its gradient
            expected = shape_energy - set(self.config.force_loss_constant)
            assert trained_by_forces == expected, (trained_by_forces ^ expected, trained_by_forces - expected)
            assert set(self.config.force_loss_constant) <= shape_energy
        else:  # the force head and the trunk under it
            assert trained_by_forces and not trained_by_forces <= shape_energy

        generator = torch.Generator().manual_seed(2)
        direction = {
            n: torch.randn(p.shape, dtype=torch.float64, generator=generator) for n, p in params.items()
        }
        norm = torch.sqrt(sum(d.pow(2).sum() for d in direction.values()))
        direction = {n: d / norm for n, d in direction.items()}
        analytic = float(sum((gradient[n] * direction[n]).sum() for n in params))
        step, losses = 1e-4, []
        for sign in (1, -1):
            with torch.no_grad():
                for n, p in params.items():
                    p.add_(sign * step * direction[n])
            losses.append(float(force_loss()))
            with torch.no_grad():
                for n, p in params.items():
                    p.sub_(sign * step * direction[n])
        numeric = (losses[0] - losses[1]) / (2 * step)
        assert abs(analytic) > 1e-3
        self.check("second_order", abs(analytic - numeric) / abs(analytic))

    # 5. stress -----------------------------------------------------------------------------------

    def test_stress_against_strain_derivative(self):
        model = self.build("cell")
        batch = float64_batch(self.structures("cell"))
        out = model(copy.deepcopy(batch))
        if not self.config.stress:
            assert "stress" not in out  # the config says so: a model gaining stress gets a config
            return
        stress = out["stress"].detach().view(-1, 3, 3)
        volume = torch.linalg.det(batch.cell).abs()
        step = self.config.fd_step

        def energies(strain) -> torch.Tensor:
            moved = copy.deepcopy(batch)
            moved.pos = batch.pos + batch.pos @ strain
            moved.cell = batch.cell + batch.cell @ strain
            return model(moved)["energy"].detach()

        worst = 0.0
        for i in range(3):
            for j in range(i, 3):
                strain = torch.zeros(3, 3, dtype=torch.float64)
                strain[i, j] += step / 2
                strain[j, i] += step / 2
                derivative = (energies(strain) - energies(-strain)) / (2 * step) / volume
                worst = max(worst, float((stress[:, i, j] - derivative).abs().max() / stress.abs().max()))
        print(f"\n{type(self).__name__}: largest stress {float(stress.abs().max()):.2e} eV/A^3")
        assert stress.abs().max() > self.config.min_stress  # not trivially zero
        self.check("stress_symmetry", relative_error(stress.transpose(1, 2), stress))
        self.check("fd_stress", worst)

    # 6. state dict ---------------------------------------------------------------------------------

    def test_state_dict_round_trip(self):
        model = self.build("cell")
        fresh = self.build("cell", seed=self.config.seed + 1, perturb=False)
        fresh.load_state_dict(model.state_dict())
        batch = float64_batch(self.structures("cell"))
        expected, out = model(copy.deepcopy(batch)), fresh(copy.deepcopy(batch))
        assert out.keys() == expected.keys()
        for key in out:
            assert torch.equal(out[key], expected[key]), key

    # 7. every parameter trained ------------------------------------------------------------------

    def test_every_parameter_gets_a_gradient(self):
        model = self.build("cell").train()
        batch = float64_batch(self.structures("cell"))
        out = model(copy.deepcopy(batch))
        loss = out["energy"].pow(2).mean() + out["forces"].pow(2).mean()
        if "stress" in out:
            loss = loss + out["stress"].pow(2).mean()
        loss.backward()
        missing = {
            name
            for name, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not p.grad.abs().max() > 0)
        }
        print(f"\n{type(self).__name__}: no gradient for {sorted(missing)}")
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        assert missing == set(self.config.no_gradient)

    # 8. edge chunks under no_grad ------------------------------------------------------------------

    def test_no_grad_edge_chunks_equal_the_grad_path(self, monkeypatch):
        model = self.build("cell")
        batch = float64_batch(self.structures("cell"))
        expected = model(copy.deepcopy(batch))
        original, taken = v2_attention.row_blocks, []

        def counting(*args):
            blocks = original(*args)
            if not torch.is_grad_enabled():
                taken.append(len(blocks))
            return blocks

        monkeypatch.setattr(v2_attention, "row_blocks", counting)
        monkeypatch.setattr(v2_attention, "EDGE_CHUNK_BYTES", 64 << 10)
        with torch.no_grad():
            out = model(copy.deepcopy(batch))
        chunked = [n for n in taken if n > 1]
        print(
            f"\n{type(self).__name__}: {len(chunked)} chunked attention calls, up to {max(taken, default=0)}"
        )
        if self.config.edge_chunks is None:
            assert chunked, "no attention call was split into chunks"
        else:  # the reason given in the config: no chunking happened
            assert not chunked, self.config.edge_chunks
        for key in expected:
            self.check(f"edge_chunks_{key}", relative_error(out[key].detach(), expected[key].detach()))
