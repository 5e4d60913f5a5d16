"""Deterministic train/val/test assignment of items (EMT systems or user frames)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .errors import DataBuildError

SPLITS = ("train", "val", "test")


def split_sizes(num_items: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """Number of items per split: a non-zero fraction gets at least one item, train the rest.

    Fractions summing to 1 leave no train split (a held-out set only: ``--val-fraction 0
    --test-fraction 1``); below 1, train keeps at least one item. Raises ``DataBuildError`` for
    fractions outside [0, 1], a sum above 1, or too few items.
    """
    for name, fraction in (("val", val_fraction), ("test", test_fraction)):
        if not 0.0 <= fraction <= 1.0:
            raise DataBuildError(f"--{name}-fraction must be in [0, 1], got {fraction}")
    total = val_fraction + test_fraction
    if total > 1.0 + 1e-9:
        raise DataBuildError(f"--val-fraction + --test-fraction must not exceed 1, got {total:g}")
    wanted = [name for name, fraction in (("val", val_fraction), ("test", test_fraction)) if fraction > 0]
    no_train = total >= 1.0 - 1e-9
    needed = len(wanted) + (0 if no_train else 1)
    if num_items < needed:
        raise DataBuildError(f"{num_items} item(s) cannot fill the requested splits: need at least {needed}")
    sizes = {"val": round(val_fraction * num_items), "test": round(test_fraction * num_items)}
    sizes = {name: max(1, size) if name in wanted else 0 for name, size in sizes.items()}
    capacity = num_items if no_train else num_items - 1
    while sum(sizes.values()) > capacity:  # rounding up took train's last item or more than all
        sizes[max(wanted, key=lambda name: sizes[name])] -= 1
    if no_train:  # rounding down left items over
        sizes[wanted[-1]] += num_items - sum(sizes.values())
    sizes["train"] = num_items - sizes["val"] - sizes["test"]
    return {name: sizes[name] for name in SPLITS}


def assign_splits(num_items: int, val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """Split name for each item index 0..num_items-1, from a seeded permutation (``assign_sizes``
    with ``split_sizes``).

    The same (num_items, fractions, seed) always gives the same assignment.
    """
    return assign_sizes(split_sizes(num_items, val_fraction, test_fraction), seed)


def assign_sizes(sizes: Mapping[str, int], seed: int) -> list[str]:
    """Split name for each item index 0..N-1 (N the sum of ``sizes``): the first ``sizes["train"]``
    items of a seeded permutation go to train, the next ``sizes["val"]`` to val, the rest to test.

    The same (sizes, seed) always gives the same assignment.
    """
    num_items = sum(sizes[name] for name in SPLITS)
    order = np.random.default_rng([seed, 0x5EED]).permutation(num_items)
    names = np.repeat(np.array(SPLITS), [sizes[name] for name in SPLITS])
    assignment = np.empty(num_items, dtype=object)
    assignment[order] = names
    return [str(name) for name in assignment]


def present_splits(assignment: list[str]) -> list[str]:
    """The splits that received items, in train/val/test order."""
    return [split for split in SPLITS if split in assignment]
