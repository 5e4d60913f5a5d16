"""Labelled OC20-like frames from ASE's EMT calculator: one adsorbate on one slab per system.

Each system (metal, facet, size, adsorbate, site; drawn from ``numpy.random.default_rng([seed,
sid])``, so a system depends only on the seed and its id) gives S2EF frames from

1. a BFGS relaxation (``fmax`` 0.05 eV/A, at most ``RELAX_MAX_STEPS`` steps) of the adsorbate
   placed near its site on the relaxed clean slab (every ``RELAX_STRIDE``-th step and the last),
2. Langevin MD from the relaxed structure (``MD_STEPS`` steps of 1 fs at 300-900 K, a frame every
   ``MD_INTERVAL`` steps),
3. ``NUM_RATTLED`` copies of the relaxed structure with Gaussian noise on the free atoms,

and one IS2RE/IS2RS record (initial structure, relaxed structure and both energies) when the
relaxation converged. Energies are adsorption energies (``adsorbates`` module docstring); frames
with an atom whose force norm exceeds ``max_force`` (EMT is unphysical for atoms too close) are
dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from ase import Atoms, units
from ase.build import add_adsorbate
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.optimize import BFGS

from .adsorbates import adsorbate_atoms, reference_energy
from .frames import Frame
from .slabs import FACETS, RELAX_FMAX, SITES, SIZES, SlabKey, site_height

RELAX_MAX_STEPS = 80
RELAX_STRIDE = 2
MD_STEPS = 40
MD_INTERVAL = 5
MD_TEMPERATURE_K = (300.0, 900.0)
MD_FRICTION = 0.02 / units.fs
NUM_RATTLED = 4
RATTLE_SIGMA = (0.05, 0.15)  # A
PLACEMENT_JITTER = 0.2  # A, lateral and vertical, of the adsorbate's starting position
INITIAL_RATTLE = 0.02  # A, on the free atoms of the starting structure


@dataclass(frozen=True)
class SystemSpec:
    """One adsorbate/slab system: its id, clean slab, adsorbate name and ASE site name."""

    sid: int
    slab: SlabKey
    adsorbate: str
    site: str


@dataclass
class SystemFrames:
    """What one system yields: kept S2EF frames, the relaxation's end points, and counts."""

    spec: SystemSpec
    frames: list[Frame] = field(default_factory=list)
    initial: Frame | None = None
    relaxed: Frame | None = None
    converged: bool = False
    dropped: int = 0

    @property
    def is2re_ok(self) -> bool:
        """Relaxation converged and its starting frame passed the force filter."""
        return self.converged and self.initial is not None and self.relaxed is not None


def system_rng(seed: int, sid: int) -> np.random.Generator:
    """The random generator of system ``sid`` (used for its spec, placement, MD and rattling)."""
    return np.random.default_rng([seed, sid])


def draw_spec(sid: int, rng: np.random.Generator, metals: list[str], adsorbates: list[str]) -> SystemSpec:
    """Draw metal, facet, size, adsorbate and site uniformly (the first draws of ``rng``)."""
    metal = str(rng.choice(metals))
    facet = str(rng.choice(sorted(FACETS)))
    size = SIZES[int(rng.integers(len(SIZES)))]
    adsorbate = str(rng.choice(adsorbates))
    site = str(rng.choice(SITES[facet]))
    return SystemSpec(sid=sid, slab=SlabKey(metal, facet, size), adsorbate=adsorbate, site=site)


def place_adsorbate(spec: SystemSpec, clean_slab: Atoms, rng: np.random.Generator) -> Atoms:
    """Starting structure: the adsorbate near ``spec.site`` of the relaxed clean slab, tags 0/1/2."""
    atoms = clean_slab.copy()
    adsorbate = adsorbate_atoms(spec.adsorbate, rng)
    height = site_height(spec.slab.facet, spec.site) + rng.uniform(-PLACEMENT_JITTER, PLACEMENT_JITTER)
    add_adsorbate(atoms, adsorbate, height, position=spec.site)
    ads = slice(len(clean_slab), len(atoms))
    atoms.positions[ads, :2] += rng.uniform(-PLACEMENT_JITTER, PLACEMENT_JITTER, size=2)
    atoms.set_tags(np.concatenate([clean_slab.get_tags(), np.full(len(adsorbate), 2)]))
    fixed = atoms.get_tags() == 0
    atoms.set_constraint(FixAtoms(mask=fixed))
    atoms.positions[~fixed] += rng.normal(0.0, INITIAL_RATTLE, size=(int((~fixed).sum()), 3))
    return atoms


def label(atoms: Atoms, offset: float) -> Frame:
    """EMT single point of ``atoms`` (its calculator, or a new EMT); energy minus ``offset`` (eV)."""
    if atoms.calc is None:
        atoms.calc = EMT()
    energy = float(atoms.get_potential_energy()) - offset
    forces = np.array(atoms.get_forces(apply_constraint=False))
    snapshot = atoms.copy()  # keeps tags and FixAtoms, drops the calculator
    return Frame(atoms=snapshot, energy=energy, forces=forces)


def relax(atoms: Atoms, offset: float) -> tuple[list[Frame], bool]:
    """BFGS relaxation; returns a frame per step (the start included) and whether it converged."""
    atoms.calc = EMT()
    frames = []
    for _ in BFGS(atoms, logfile=None).irun(fmax=RELAX_FMAX, steps=RELAX_MAX_STEPS):
        frames.append(label(atoms, offset))
    free_forces = atoms.get_forces()  # fixed atoms' forces are zeroed by the constraint
    return frames, bool(np.linalg.norm(free_forces, axis=1).max() < RELAX_FMAX)


def molecular_dynamics(relaxed: Atoms, offset: float, rng: np.random.Generator) -> list[Frame]:
    """Langevin MD from ``relaxed``; a frame every ``MD_INTERVAL`` steps (the start excluded)."""
    atoms = relaxed.copy()
    atoms.calc = EMT()
    temperature = rng.uniform(*MD_TEMPERATURE_K)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    dynamics = Langevin(atoms, 1.0 * units.fs, temperature_K=temperature, friction=MD_FRICTION, rng=rng)
    frames = []
    for _ in range(MD_STEPS // MD_INTERVAL):
        dynamics.run(MD_INTERVAL)
        frames.append(label(atoms, offset))
    return frames


def rattled(relaxed: Atoms, offset: float, rng: np.random.Generator) -> list[Frame]:
    """``NUM_RATTLED`` copies of ``relaxed`` with N(0, sigma) noise (sigma drawn per copy) on free atoms."""
    free = relaxed.get_tags() != 0
    frames = []
    for _ in range(NUM_RATTLED):
        atoms = relaxed.copy()
        sigma = rng.uniform(*RATTLE_SIGMA)
        atoms.positions[free] += rng.normal(0.0, sigma, size=(int(free.sum()), 3))
        frames.append(label(atoms, offset))
    return frames


def simulate_system(
    spec: SystemSpec,
    rng: np.random.Generator,
    clean_slab: Atoms,
    clean_energy: float,
    references: dict[str, float],
    max_force: float,
) -> SystemFrames:
    """All frames of one system, energies referenced to ``clean_energy`` and the gas ``references``.

    ``clean_slab``/``clean_energy`` (eV) are the relaxed clean slab of ``spec.slab``;
    ``references`` maps H/O/C/N to their atomic reference energies (eV).
    """
    atoms = place_adsorbate(spec, clean_slab, rng)
    adsorbate_symbols = atoms.get_chemical_symbols()[len(clean_slab) :]
    offset = clean_energy + reference_energy(adsorbate_symbols, references)
    trajectory, converged = relax(atoms, offset)
    relaxed = trajectory[-1]
    kept_relax = trajectory[::RELAX_STRIDE] + ([relaxed] if (len(trajectory) - 1) % RELAX_STRIDE else [])
    md_frames = molecular_dynamics(relaxed.atoms, offset, rng)
    candidates = kept_relax + md_frames + rattled(relaxed.atoms, offset, rng)
    result = SystemFrames(spec=spec, converged=converged)
    for frame in candidates:
        if frame.max_force_norm() > max_force:
            result.dropped += 1
        else:
            result.frames.append(frame)
    if trajectory[0].max_force_norm() <= max_force:
        result.initial, result.relaxed = trajectory[0], relaxed
    return result


def generate_system(
    sid: int,
    seed: int,
    metals: list[str],
    adsorbates: list[str],
    clean_slabs: dict[SlabKey, tuple[Atoms, float]],
    references: dict[str, float],
    max_force: float,
) -> SystemFrames:
    """System ``sid`` of the build with ``seed``: draws its spec, then simulates it.

    ``clean_slabs`` maps each slab key to the relaxed clean slab and its energy (eV) and must hold
    the key this system draws; the result depends only on the arguments (safe in worker processes).
    """
    rng = system_rng(seed, sid)
    spec = draw_spec(sid, rng, metals, adsorbates)
    clean_slab, clean_energy = clean_slabs[spec.slab]
    return simulate_system(spec, rng, clean_slab, clean_energy, references, max_force)
