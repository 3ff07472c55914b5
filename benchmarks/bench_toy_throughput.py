"""Training throughput of the toy worlds: samples per second of GRPO iterations, sparse and dense.

    python benchmarks/bench_toy_throughput.py                 # latent toy vs the 16 px pixel toy, 2 threads
    python benchmarks/bench_toy_throughput.py --iterations 5 --threads 1

For each world (``toy-latent``, the default main job's policy, and ``toy`` at 16 px, the main
job's policy until the latent toy) and each credit assignment (``sparse``: Flow-GRPO, terminal
reward only; ``dense``: DenseGRPO with n = t, every step's clean estimate scored), it builds the
run from the default config with only the policy and the advantage changed, runs one warm-up
iteration and then ``--iterations`` timed ones (rollout, rewards, advantages and the update:
the metrics' ``iteration_s``), and prints samples per second and each arm's ratio to the pixel
toy's dense rate. Each world runs at its main job's batch (``MAIN_JOB_GROUPS`` groups of 8) unless
``--groups`` is given. The arms run one after the other in one process, so they see the same
machine; the ratio is what to read on a shared machine, the absolute rates move from day to day.
"""

from __future__ import annotations

import argparse
import json
import time
from tempfile import TemporaryDirectory

import torch

WORLDS = {
    "toy-latent": {"policy": {"name": "toy-latent", "config": {}}},
    "toy-16px": {"policy": {"name": "toy", "config": {"resolution": 16}}},
}
MAIN_JOB_GROUPS = {"toy-latent": 32, "toy-16px": 8}
"""Prompt groups (of 8 samples) per iteration in each world's main job: each world runs at the batch it is used with."""
ADVANTAGES = ("sparse", "dense")


def measure(world: str, advantage: str, iterations: int, groups: int, group_size: int) -> dict:
    from densegrpo.contracts import config as cfg
    from densegrpo.run.state import Run
    from densegrpo.run.train import train_step

    overrides = {**WORLDS[world], "advantage": {"name": advantage, "config": {}},
                 "calibration": {"before_training": False}, "logging": {"progress": False}}
    overrides["train"] = {"groups_per_iteration": groups, "group_size": group_size}
    config = cfg.RunConfig.model_validate({**cfg.default_config().model_dump(), **overrides})
    with TemporaryDirectory() as folder:
        run = Run(config, folder)
        train_step(run)  # warm-up: prompt cache, allocator, first-call kernels
        seconds = [train_step(run)["iteration_s"] for _ in range(iterations)]
    samples = groups * group_size
    return {"world": world, "advantage": advantage, "samples_per_iteration": samples,
            "iteration_s": round(sum(seconds) / len(seconds), 3), "samples_per_s": round(samples * len(seconds) / sum(seconds), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per arm (after one warm-up)")
    parser.add_argument("--groups", type=int, default=0, help="prompt groups per iteration (0: each world's main-job batch)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worlds", nargs="+", default=list(WORLDS), choices=list(WORLDS))
    parser.add_argument("--latent-model", default=None, help="toy-latent weights folder (default: the shipped ones)")
    args = parser.parse_args()
    if args.latent_model:
        WORLDS["toy-latent"]["policy"]["config"]["model"] = args.latent_model
    torch.set_num_threads(args.threads)
    rows = []
    for world in args.worlds:
        for advantage in ADVANTAGES:
            start = time.time()
            groups = args.groups or MAIN_JOB_GROUPS[world]
            rows.append(measure(world, advantage, args.iterations, groups, args.group_size))
            print(json.dumps({**rows[-1], "arm_wall_s": round(time.time() - start, 1)}), flush=True)
    reference = next((r["samples_per_s"] for r in rows if r["world"] == "toy-16px" and r["advantage"] == "dense"), None)
    print(f"\n{'world':<12} {'advantage':<9} {'samples/iter':>12} {'s/iter':>8} {'samples/s':>10} {'vs toy-16px dense':>18}")
    for r in rows:
        ratio = f"{r['samples_per_s'] / reference:.1f}x" if reference else "-"
        print(f"{r['world']:<12} {r['advantage']:<9} {r['samples_per_iteration']:>12} {r['iteration_s']:>8.2f} "
              f"{r['samples_per_s']:>10.1f} {ratio:>18}")


if __name__ == "__main__":
    main()
