"""The package's ``graph_softmax`` against torch_geometric's ``softmax`` (same outputs), forward and
forward + backward, on attention-sized inputs; prints times and ratios.

    python benchmarks/bench_graph_softmax.py [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
from torch_geometric.utils import softmax as pyg_softmax

from fairchem_equiformers.primitives import graph_softmax


def timed(fn, repeats: int, backward: bool) -> float:
    def run() -> None:
        out = fn()
        if backward:
            out.sum().backward()

    for _ in range(3):
        run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    for edges, nodes, heads in [(20_000, 1_000, 8), (200_000, 8_000, 8)]:
        logits = torch.randn(edges, heads, requires_grad=True)
        target = torch.randint(0, nodes, (edges,)).sort().values
        ours = partial(graph_softmax, logits, target, nodes)
        theirs = partial(pyg_softmax, logits, target, num_nodes=nodes)
        difference = float((ours() - theirs()).abs().max())
        print(f"E={edges:,} H={heads}: max difference {difference:.1e}")
        for label, backward in [("forward", False), ("forward+backward", True)]:
            t_ours, t_theirs = timed(ours, 10, backward), timed(theirs, 10, backward)
            print(f"  {label}: ours {t_ours * 1e3:.2f} ms, torch_geometric {t_theirs * 1e3:.2f} ms "
                  f"(torch_geometric / ours {t_theirs / t_ours:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
