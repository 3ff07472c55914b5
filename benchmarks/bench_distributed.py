"""Wall time of the same toy GRPO run on 1 process and on K processes (torchrun, gloo, CPU).

Same global batch, same seed: the runs take the same optimizer steps (tests/test_distributed.py
checks that); this script only measures time. Each process gets ``cores // K`` threads, or
``--threads`` for every run (1 isolates the gain from processes from that of threads). The
1-process and K-process runs alternate ``--repeats`` times so that a change in machine load hits
both; the load average before and after is printed because on a shared machine it matters.

    python3 benchmarks/bench_distributed.py --iterations 3 --procs 2 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(procs: int, out: Path, sets: list[str], threads: int) -> float:
    """Seconds for one ``densegrpo train`` with ``procs`` processes (the whole command, start-up included)."""
    if procs == 1:
        command = [sys.executable, "-m", "densegrpo", "train"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m", "densegrpo", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("WORLD_SIZE", None)
    started = time.perf_counter()
    done = subprocess.run([*command, *[a for s in sets for a in ("--set", s)], "--out", str(out)], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{procs}-process run failed:\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="Alternating 1-process / K-process pairs.")
    parser.add_argument("--threads", type=int, default=0, help="OMP threads per process for every run (0: cores // processes).")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="Extra config override (repeatable).")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    sets = [
        f"iterations={args.iterations}", "checkpoint_every=0", "logging.progress=false", "logging.sample_prompts=0",
        "logging.eval_prompts=0", "calibrator.name=uniform", f"train.group_size={args.group_size}", f"train.groups_per_iteration={args.groups}",
        *args.extra,
    ]
    load_before = os.getloadavg()[0]
    results: dict[int, list[tuple[float, float]]] = {1: [], args.procs: []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for procs in (1, args.procs):
                threads = args.threads or max(1, cores // procs)
                out = Path(tmp) / f"p{procs}-{repeat}"
                seconds = run(procs, out, sets, threads)
                metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
                results[procs].append((seconds, statistics.mean(m["iteration_s"] for m in metrics)))
    load_after = os.getloadavg()[0]
    batch = args.group_size * args.groups
    print(f"{cores} cores, load average {load_before:.2f} before / {load_after:.2f} after; global batch {batch}, {args.iterations} iterations, {args.repeats} repeat(s)")
    print("| processes | threads each | whole run (s) | mean iteration (s) |")
    print("|---|---|---|---|")
    for procs, rows in results.items():
        threads = args.threads or max(1, cores // procs)
        runs = ", ".join(f"{s:.1f}" for s, _ in rows)
        iterations = ", ".join(f"{i:.2f}" for _, i in rows)
        print(f"| {procs} | {threads} | {runs} | {iterations} |")
    one = statistics.median(i for _, i in results[1])
    many = statistics.median(i for _, i in results[args.procs])
    print(f"speed-up per iteration (median): {one / many:.2f}x")


if __name__ == "__main__":
    main()
