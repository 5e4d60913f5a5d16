"""``fairchem-equiformers-data``: build the embedded EMT dataset or convert the user's own data.

    fairchem-equiformers-data emt --out data/emt [--seed 0] [--num-systems 200] [--workers 2]
    fairchem-equiformers-data convert --input 'runs/*.extxyz' --out data/mine [--test-input test.xyz]
        [--split-by file|frame|info:KEY] [--isolated-atoms e0s.xyz] [--skip-bad-frames]
    fairchem-equiformers-data md17 --molecule aspirin --out data/md17/aspirin [--num-frames 2000]
    fairchem-equiformers-data qm9 --out data/qm9 [--conformers 3000] [--rattle 0.05]

All print where each output went and the number of entries per split. Problems with the input or
the output folder are reported as one ``error:`` line (exit status 1), without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .adsorbates import ADSORBATES
from .build import DEFAULT_MAX_FORCE, DEFAULT_NUM_SYSTEMS, build_emt_dataset
from .convert import convert_user_data
from .errors import DataBuildError
from .molecules import MD17_MOLECULES, build_md17_dataset
from .pipeline import DEFAULT_TEST_FRACTION, DEFAULT_VAL_FRACTION, BuildReport
from .qm9 import DEFAULT_CONFORMERS, DEFAULT_RATTLE, build_qm9_dataset
from .slabs import METALS


def _names(text: str) -> list[str]:
    """A comma-separated list, e.g. ``"Cu,Pt"``."""
    return [name.strip() for name in text.split(",") if name.strip()]


def _available_cpus() -> int:
    """CPUs this process may run on (the default number of EMT worker processes)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _add_common(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """Options shared by the subcommands that split (``defaults=False``: fractions default to None)."""
    parser.add_argument("--out", type=Path, required=True, help="output folder (must not exist)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (systems and splits)")
    parser.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION if defaults else None)
    parser.add_argument("--test-fraction", type=float, default=DEFAULT_TEST_FRACTION if defaults else None)
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it is a dataset written by this tool"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with the ``emt``, ``convert``, ``md17`` and ``qm9`` subcommands."""
    parser = argparse.ArgumentParser(
        prog="fairchem-equiformers-data",
        description="Write OC20-style LMDB datasets, fitted normalizers and linear references for fairchem.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    emt = commands.add_parser("emt", help="generate adsorbate/slab data with ASE's EMT calculator")
    _add_common(emt)
    emt.add_argument("--num-systems", type=int, default=DEFAULT_NUM_SYSTEMS, help="adsorbate/slab systems")
    emt.add_argument("--first-sid", type=int, default=0, help="id of the first system (disjoint test sets)")
    emt.add_argument("--metals", type=_names, default=list(METALS), help=f"comma list of {','.join(METALS)}")
    emt.add_argument(
        "--adsorbates", type=_names, default=list(ADSORBATES), help=f"comma list of {','.join(ADSORBATES)}"
    )
    emt.add_argument(
        "--max-force", type=float, default=DEFAULT_MAX_FORCE, help="drop frames with a larger force (eV/A)"
    )
    emt.add_argument(
        "--workers", type=int, default=_available_cpus(), help="processes (the data does not depend on it)"
    )

    convert = commands.add_parser(
        "convert",
        help="convert labelled files ASE reads (extxyz, db, traj, OUTCAR, ...)",
        description="Fractions are of the training files' groups (default 0.1 each, 0 for a split given "
        "by its own files); groups are whole input files unless --split-by says otherwise.",
    )
    _add_common(convert, defaults=False)
    convert.add_argument("--input", nargs="+", required=True, help="training files or globs (quote globs)")
    convert.add_argument("--val-input", nargs="+", default=[], help="validation files (not split further)")
    convert.add_argument("--test-input", nargs="+", default=[], help="test files (not split further)")
    convert.add_argument(
        "--split-by",
        default="file",
        help="file (default: whole input files), info:KEY (frames sharing atoms.info[KEY], e.g. a trajectory "
        "id) or frame (frames at random: frames of one MD run land in several splits)",
    )
    convert.add_argument(
        "--isolated-atoms", type=Path, help="single-atom frames with energies: the element reference (E0s)"
    )
    convert.add_argument("--energy-key", help="read energies from atoms.info[KEY] instead of the calculator")
    convert.add_argument("--forces-key", help="read forces from atoms.arrays[KEY] instead of the calculator")
    convert.add_argument("--stress-key", help="read the stress (eV/A^3, ASE's sign) from atoms.info[KEY]")
    convert.add_argument(
        "--skip-bad-frames", action="store_true", help="leave out bad frames (listed) instead of stopping"
    )

    md17 = commands.add_parser("md17", help="MD17-style GFN2-xTB (tblite) trajectories of one small molecule")
    md17.add_argument("--out", type=Path, required=True, help="output folder (must not exist)")
    md17.add_argument("--molecule", required=True, choices=MD17_MOLECULES)
    md17.add_argument("--seed", type=int, default=0, help="random seed (velocities, thermostat, split)")
    md17.add_argument("--num-frames", type=int, default=2000, help="frames of the trajectory")
    md17.add_argument("--train-size", type=int, default=950, help="random frames for training")
    md17.add_argument("--val-size", type=int, default=50, help="random frames for validation (rest: test)")
    md17.add_argument("--temperature", type=float, default=500.0, help="K")
    md17.add_argument("--stride", type=int, default=10, help="MD steps of 0.5 fs between frames")
    md17.add_argument(
        "--overwrite", action="store_true", help="replace --out if it is a dataset written by this tool"
    )

    qm9 = commands.add_parser(
        "qm9", help="QM9-style properties (GFN2-xTB, tblite) of perturbed small C/H/N/O/F molecules"
    )
    _add_common(qm9)
    qm9.add_argument("--conformers", type=int, default=DEFAULT_CONFORMERS, help="conformers to label")
    qm9.add_argument(
        "--rattle", type=float, default=DEFAULT_RATTLE, help="Gaussian displacement per coordinate (A)"
    )
    return parser


def run(args: argparse.Namespace) -> BuildReport:
    """Dispatch the parsed arguments to the build."""
    if args.command == "md17":
        return build_md17_dataset(
            args.out,
            molecule_name=args.molecule,
            num_frames=args.num_frames,
            train_size=args.train_size,
            val_size=args.val_size,
            seed=args.seed,
            temperature=args.temperature,
            stride=args.stride,
            overwrite=args.overwrite,
        )
    if args.command == "qm9":
        return build_qm9_dataset(
            args.out,
            num_conformers=args.conformers,
            seed=args.seed,
            rattle=args.rattle,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            overwrite=args.overwrite,
        )
    common = {
        "seed": args.seed,
        "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction,
        "overwrite": args.overwrite,
    }
    if args.command == "emt":
        return build_emt_dataset(
            args.out,
            num_systems=args.num_systems,
            metals=args.metals,
            adsorbates=args.adsorbates,
            max_force=args.max_force,
            workers=args.workers,
            first_sid=args.first_sid,
            **common,
        )
    return convert_user_data(
        args.input,
        args.out,
        val_inputs=args.val_input,
        test_inputs=args.test_input,
        split_by=args.split_by,
        isolated_atoms=args.isolated_atoms,
        energy_key=args.energy_key,
        forces_key=args.forces_key,
        stress_key=args.stress_key,
        skip_bad_frames=args.skip_bad_frames,
        **common,
    )


def print_report(report: BuildReport, max_force: float | None) -> None:
    """Print the entries per split and where each output went."""
    print(f"dataset written to {report.out}")
    for line in report.notes:
        print(f"  {line}")
    for name, count in report.counts.items():
        unit = {"is2re": "systems", "properties": "conformers"}.get(name.split("/")[0], "frames")
        print(f"  {name:<12} {count:>7} {unit:<8} {report.out / name}")
    if max_force is not None:
        print(f"  dropped {report.dropped_frames} frame(s) with a force above {max_force} eV/A")
        print(f"  {report.is2re_excluded} system(s) not in is2re (relaxation unconverged or start dropped)")
    for name, path in report.files.items():
        print(f"  {name:<19} {path}")
    for stage, seconds in report.seconds.items():
        print(f"  {stage} took {seconds:.1f} s")
    if "normalizers" not in report.files:
        print("  no train split: no element_references.pt/normalizers.pt (use the training dataset's)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except DataBuildError as error:
        print(f"fairchem-equiformers-data: error: {error}", file=sys.stderr)
        return 1
    print_report(report, args.max_force if args.command == "emt" else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
