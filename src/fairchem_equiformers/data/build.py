"""The EMT dataset build: adsorbate/slab systems (``emt``) through the common pipeline
(``pipeline``), with IS2RE/IS2RS records in ``is2re/{train,val,test}`` beside the S2EF frames.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .adsorbates import ADSORBATES, GAS_MOLECULES, atomic_references, gas_energies
from .emt import SystemFrames, draw_spec, generate_system, system_rng
from .errors import DataBuildError
from .lmdb_writer import SplitWriters
from .oc20_format import is2re_data, s2ef_data
from .output import staged_output
from .pipeline import DEFAULT_TEST_FRACTION, DEFAULT_VAL_FRACTION, BuildReport, finish_dataset
from .references import fit_references
from .slabs import METALS, relaxed_clean_slab
from .splits import assign_splits, present_splits

DEFAULT_NUM_SYSTEMS = 200
DEFAULT_MAX_FORCE = 20.0  # eV/A


def check_choices(given: Iterable[str], allowed: Iterable[str], what: str) -> list[str]:
    """``given`` as a list, or ``DataBuildError`` naming the unknown entries and the allowed ones."""
    given, allowed = list(given), list(allowed)
    unknown = [name for name in given if name not in allowed]
    if unknown or not given:
        listed = ", ".join(unknown) or "(none given)"
        raise DataBuildError(f"unknown {what}(s) for EMT: {listed}; choose from {', '.join(allowed)}")
    return given


@contextmanager
def worker_map(workers: int) -> Iterator[Callable[[Callable, Iterable], Iterator]]:
    """An ordered, lazy ``map``: the builtin for one worker, a process pool's ``imap`` otherwise."""
    if workers == 1:
        yield map
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        yield partial(pool.imap, chunksize=1)


def build_emt_dataset(
    out: Path,
    *,
    seed: int = 0,
    num_systems: int = DEFAULT_NUM_SYSTEMS,
    metals: Iterable[str] = METALS,
    adsorbates: Iterable[str] = tuple(ADSORBATES),
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    max_force: float = DEFAULT_MAX_FORCE,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    first_sid: int = 0,
) -> BuildReport:
    """Generate ``num_systems`` EMT adsorbate/slab systems (``emt`` module) and write the dataset.

    Systems are written with ids ``first_sid ..``; give separately built test sets disjoint ranges
    so that their ids stay unique in one submission (the content does not depend on it).

    Systems, not frames, are split, so no system has frames in two splits. The content depends
    only on the arguments other than ``workers``/``progress``: the same seed gives the same bytes in
    every file but ``dataset.yml`` (which names ``out``).
    """
    metals = check_choices(metals, METALS, "metal")
    adsorbates = check_choices(adsorbates, ADSORBATES, "adsorbate")
    if num_systems < 1 or workers < 1 or max_force <= 0 or first_sid < 0:
        raise DataBuildError(
            "--num-systems and --workers must be at least 1, --max-force positive and --first-sid >= 0"
        )
    split_of = assign_splits(num_systems, val_fraction, test_fraction, seed)
    splits = present_splits(split_of)
    parameters = {
        "source": "emt",
        "seed": seed,
        "num_systems": num_systems,
        "metals": metals,
        "adsorbates": adsorbates,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "max_force_eV_per_A": max_force,
        "first_sid": first_sid,
    }
    with staged_output(out, overwrite) as stage:
        gas = gas_energies()
        references = atomic_references(gas)
        slab_keys = sorted(
            {draw_spec(sid, system_rng(seed, sid), metals, adsorbates).slab for sid in range(num_systems)},
            key=repr,
        )
        report = BuildReport(out=out, counts={}, files={})
        with worker_map(workers) as pmap:  # workers fork before any LMDB is open
            relaxed = pmap(relaxed_clean_slab, slab_keys)
            bar = tqdm(relaxed, total=len(slab_keys), desc="clean slabs", disable=not progress)
            clean_slabs = dict(zip(slab_keys, bar))
            generate = partial(
                generate_system,
                seed=seed,
                metals=metals,
                adsorbates=adsorbates,
                clean_slabs=clean_slabs,
                references=references,
                max_force=max_force,
            )
            with SplitWriters(stage, "s2ef", splits) as s2ef, SplitWriters(stage, "is2re", splits) as is2re:
                systems = pmap(generate, range(num_systems))
                for result in tqdm(systems, total=num_systems, desc="EMT systems", disable=not progress):
                    _write_system(result, split_of[result.spec.sid], s2ef, is2re, report, first_sid)
        report.counts = {**s2ef.counts, **is2re.counts}
        manifest = {
            **parameters,
            "dropped_frames": report.dropped_frames,
            "is2re_excluded_systems": report.is2re_excluded,
            "energy": _emt_energy_description(gas, references),
        }
        report.files = finish_dataset(
            stage, out, splits, report.counts, manifest, partial(fit_references, seed=seed)
        )
    return report


def _emt_energy_description(gas: dict[str, float], references: dict[str, float]) -> dict[str, Any]:
    """The manifest's account of the EMT energies: definition, gas energies and atomic references (eV)."""
    return {
        "y": "adsorption energy (eV): E(system) - E(relaxed clean slab) - sum E_ref(adsorbate atoms)",
        "atomic_references": "H: E(H2)/2, O: E(H2O)-E(H2), C: E(CO)-E(H2O)+E(H2), N: E(N2)/2",
        "gas_energies_eV": {name: gas[name] for name in GAS_MOLECULES},
        "atomic_references_eV": references,
        "calculator": "ase.calculators.emt.EMT",
    }


def _write_system(
    result: SystemFrames,
    split: str,
    s2ef: SplitWriters,
    is2re: SplitWriters,
    report: BuildReport,
    first_sid: int,
) -> None:
    """Write one system's S2EF frames and IS2RE record (if usable) to ``split``; update the counts."""
    sid = first_sid + result.spec.sid
    for fid, frame in enumerate(result.frames):
        s2ef.add(split, s2ef_data(frame.atoms, frame.energy, frame.forces, sid=sid, fid=fid))
    report.dropped_frames += result.dropped
    if result.is2re_ok:
        initial, relaxed = result.initial, result.relaxed
        is2re.add(split, is2re_data(initial.atoms, relaxed.atoms, initial.energy, relaxed.energy, sid=sid))
    else:
        report.is2re_excluded += 1
