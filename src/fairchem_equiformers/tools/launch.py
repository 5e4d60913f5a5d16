"""``fairchem-equiformers``: fairchem's CLI, with SLURM working on CPU-only partitions.

It takes exactly the ``fairchem`` command's arguments and runs fairchem's own ``main``, with
three differences:

* **Local multi-rank runs** (``--num-gpus N`` without ``--submit``): fairchem's elastic launch
  meets its ranks at torch's fixed rendezvous port 29400, so while anything else on the machine
  listens there (another local multi-rank run, another job's ``torchrun``) its agent joins that
  stranger's store and waits forever. Here the rendezvous store listens on a port the system
  picks for this run alone.

For ``--submit``:

* **CPU-only partitions** (``--submit --cpu``): fairchem requests ``--gpus-per-node`` equal to
  ``--num-gpus`` (an invalid GRES request on a node without GPUs) and, inside the job, always
  initialises NCCL. Here the request says ``gpus_per_node: 0``, and each SLURM task joins a gloo
  process group through fairchem's own environment-variable path (rank and address taken from
  the SLURM variables). Without ``--cpu`` the GPU path is fairchem's, unchanged.
* **Sweeps** (``--sweep-yml``): fairchem 1.10's grid expansion uses ``collections.MutableMapping``,
  gone since Python 3.10; an equivalent expansion is used instead.

Jobs stay preemptible: the runner is fairchem's ``Checkpointable`` runner, so the signal SLURM
sends before the time limit (or a preemption) saves ``checkpoint.pt`` and requeues the job,
which resumes from it at the same step.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import subprocess
import sys
from collections.abc import Mapping

import yaml
from fairchem.core import _cli
from fairchem.core.common.flags import flags
from torch.distributed.launcher.api import LaunchConfig


class ClusterRunner(_cli.Runner):
    """fairchem's SLURM runner; on CPU-only jobs it sets up gloo from the SLURM environment."""

    def __call__(self, config: dict) -> None:
        if config.get("cpu") and "SLURM_PROCID" in os.environ:
            config = gloo_from_slurm(config)
        super().__call__(config)

    def checkpoint(self, *args, **kwargs):
        """fairchem's checkpoint-and-requeue, resubmitting this runner (not fairchem's)."""
        submission = super().checkpoint(*args, **kwargs)
        submission.function = type(self)()
        return submission


def gloo_from_slurm(config: dict) -> dict:
    """The config and environment for fairchem's ``env://`` process-group path with gloo, from
    the variables SLURM sets in each task (one task per rank)."""
    world_size = int(os.environ["SLURM_NTASKS"])
    if world_size != config["world_size"]:
        raise RuntimeError(
            f"SLURM started {world_size} tasks but the run expects {config['world_size']} ranks "
            "(--num-nodes x --num-gpus); CPU jobs need one task per rank"
        )
    node_list = os.environ["SLURM_JOB_NODELIST"]
    hosts = subprocess.check_output(["scontrol", "show", "hostnames", node_list], text=True).split()
    os.environ["MASTER_ADDR"] = hosts[0]
    # one port per job, shared by its tasks, so jobs on the same node do not collide
    os.environ["MASTER_PORT"] = str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["LOCAL_RANK"] = os.environ["SLURM_LOCALID"]
    return {**config, "submit": False, "distributed_backend": "gloo"}


def sweep_configs(base_config: dict, sweep_file: str) -> list[dict]:
    """One config per point of the grid in ``sweep_file`` (nested mappings of value lists), with
    ``_run<i>`` appended to the identifier: fairchem's ``create_grid``, for Python >= 3.10."""
    with open(sweep_file) as handle:
        sweeps = yaml.safe_load(handle)

    def flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], list]:
        flat = {}
        for key, value in tree.items():
            if isinstance(value, Mapping):
                flat |= flatten(value, (*prefix, key))
            elif isinstance(value, list):
                flat[(*prefix, key)] = value
            else:
                raise ValueError(
                    f"sweep {'.'.join((*prefix, key))}: expected a list of values, got {value!r}"
                )
        return flat

    grid = flatten(sweeps)
    configs = []
    for i, values in enumerate(itertools.product(*grid.values())):
        config = copy.deepcopy(base_config)
        for path, value in zip(grid, values):
            node = config
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
        config["identifier"] = f"{config['identifier']}_run{i}"
        configs.append(config)
    return configs


def launch_config_on_a_free_port(**fields) -> LaunchConfig:
    """fairchem's local ``LaunchConfig`` with the rendezvous store on a port of its own (port 0:
    the system picks a free one when the store binds; only this run's agent ever connects to it,
    its ranks meet at the address the agent hands them)."""
    return LaunchConfig(**{**fields, "rdzv_endpoint": "localhost:0"})


def main(argv: list[str] | None = None) -> None:
    parser = flags.get_parser()
    args, overrides = parser.parse_known_args(argv)
    if not args.submit:
        _cli.LaunchConfig = launch_config_on_a_free_port
    else:
        _cli.Runner = ClusterRunner
        _cli.create_grid = sweep_configs
        if args.cpu:
            overrides = [*overrides, "--slurm.gpus_per_node=0"]
            logging.info("CPU job: no GPU request; ranks join a gloo process group")
    _cli.main(args, overrides)


if __name__ == "__main__":
    sys.exit(main())
