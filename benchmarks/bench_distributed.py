"""Wall time of the same toy GRPO run on 1 process and on K processes (torchrun, gloo, CPU).

Same global batch, same seed: the runs end with the same weights (tests/test_distributed.py
checks that); this script only measures time. On a 2-core machine two processes share two cores,
so the gain is bounded; the point is that the mechanism scales, not the number.

    python3 benchmarks/bench_distributed.py --iterations 3 --procs 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(procs: int, out: Path, sets: list[str], threads: int) -> float:
    if procs == 1:
        command = [sys.executable, "-m", "densegrpo", "train"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m", "densegrpo", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    subprocess.run([*command, *[a for s in sets for a in ("--set", s)], "--out", str(out)], env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--groups", type=int, default=2)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    sets = [
        f"iterations={args.iterations}", "checkpoint_every=0", "logging.progress=false", "logging.sample_prompts=0",
        "logging.eval_prompts=0", "calibrator.name=uniform", f"train.group_size={args.group_size}", f"train.groups_per_iteration={args.groups}",
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for procs in (1, args.procs):
            threads = max(1, cores // procs)
            seconds = run(procs, Path(tmp) / f"p{procs}", sets, threads)
            metrics = [json.loads(x) for x in (Path(tmp) / f"p{procs}" / "metrics.jsonl").read_text().splitlines()]
            rows.append((procs, threads, seconds, sum(m["iteration_s"] for m in metrics) / len(metrics)))
    print(f"| processes | threads each | whole run (s) | mean iteration (s) |  ({cores} cores, batch {args.group_size * args.groups}, {args.iterations} iterations)")
    print("|---|---|---|---|")
    for procs, threads, seconds, iteration in rows:
        print(f"| {procs} | {threads} | {seconds:.1f} | {iteration:.2f} |")
    print(f"speed-up per iteration: {rows[0][3] / rows[1][3]:.2f}x")


if __name__ == "__main__":
    main()
