"""``fairchem-equiformers-submission``: check the prediction files of a dataset's test splits and
write the EvalAI submission file; a failed check prints one ``error:`` line and exits with 1.

    fairchem-equiformers-submission s2ef --id P --ood-ads P --ood-cat P --ood-both P --out-path S.npz
"""

from __future__ import annotations

import argparse
import sys
import warnings

from .check import read_expected_counts
from .read import collect_predictions
from .spec import ALL_SPLITS, DATASET_SPLITS, TASKS, SubmissionError, SubmissionWarning
from .write import format_summary, write_submission


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    parser = argparse.ArgumentParser(
        prog="fairchem-equiformers-submission",
        description="Check fairchem prediction files of the OC20/OC22 test splits and merge them into one "
        "EvalAI submission npz ({split}_ids, {split}_energy, {split}_forces, {split}_pos, "
        "{split}_chunk_idx).",
    )
    parser.add_argument("task", type=str.lower, choices=TASKS, help="which EvalAI task")
    parser.add_argument(
        "--dataset", type=str.lower, choices=tuple(DATASET_SPLITS), default="oc20", help="default: oc20"
    )
    for split in ALL_SPLITS:
        datasets = [name.upper() for name, names in DATASET_SPLITS.items() if split in names]
        parser.add_argument(
            f"--{split.replace('_', '-')}",
            dest=split,
            metavar="PATH",
            help=f"predictions of the {split} split ({', '.join(datasets)})",
        )
    parser.add_argument("--out-path", required=True, metavar="PATH", help="submission file to write (.npz)")
    parser.add_argument(
        "--expected-counts",
        metavar="JSON",
        help='JSON file mapping split -> number of systems, or -> {"systems": n, "atoms": m}',
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 on success, 1 on a failed check)."""
    args = build_parser().parse_args(argv)
    split_paths = {split: getattr(args, split) for split in ALL_SPLITS}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SubmissionWarning)
        try:
            expected = read_expected_counts(args.expected_counts) if args.expected_counts else None
            splits = collect_predictions(
                args.task, split_paths, dataset=args.dataset, expected_counts=expected
            )
            out_path = write_submission(splits, args.out_path)
        except SubmissionError as err:
            print_warnings(caught)
            print(f"error: {err}", file=sys.stderr)
            return 1
    print_warnings(caught)
    print(format_summary(args.task, args.dataset, splits, out_path.resolve()))
    return 0


def print_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Print the caught warnings to stderr: ours as ``warning: <message>`` lines, others in full."""
    for warning in caught:
        if issubclass(warning.category, SubmissionWarning):
            print(f"warning: {warning.message}", file=sys.stderr)
        else:
            text = warnings.formatwarning(warning.message, warning.category, warning.filename, warning.lineno)
            print(text, end="", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
