"""Where EquiformerV2's time goes: a per-operator profile (torch.profiler, self CPU time) of
fairchem 1.10's implementation and of the plugin's, same weights, same batch.

    python benchmarks/profile_equiformer_v2.py --model 31M --structures 1 --mode train
"""

from __future__ import annotations

import argparse

import torch
from bench_equiformer_v2 import PRESETS, RELEASED, run_step, slabs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(PRESETS), default="31M")
    parser.add_argument("--structures", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", choices=["inference", "train"], default="train")
    parser.add_argument("--impl", choices=["reference", "ours", "both"], default="both")
    parser.add_argument("--rows", type=int, default=15, help="operators listed per implementation")
    args = parser.parse_args()

    from fairchem.core.datasets import data_list_collater
    from fairchem.core.models.equiformer_v2.equiformer_v2_deprecated import EquiformerV2 as Reference
    from fairchem.core.preprocessing import AtomsToGraphs

    from fairchem_equiformers import EquiformerV2

    torch.set_num_threads(args.threads)
    config = {**RELEASED, **PRESETS[args.model]}
    torch.manual_seed(0)
    reference = Reference(**config)
    ours = EquiformerV2(**config)
    ours.load_state_dict(reference.state_dict())
    converter = AtomsToGraphs(r_edges=False, r_pbc=True)
    batch = data_list_collater([converter.convert(a) for a in slabs(args.structures)])

    impls = {"reference": reference, "ours": ours}
    names = list(impls) if args.impl == "both" else [args.impl]
    for name in names:
        run_step(impls[name], batch, args.mode)  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            run_step(impls[name], batch, args.mode)
        events = profile.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e6
        print(f"\n{name}, {args.mode}: {total:.2f} s self CPU time in operators")
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40))


if __name__ == "__main__":
    main()
