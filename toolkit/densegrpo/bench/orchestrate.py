"""Running every (reward, arm, seed) as a training run, in this process or in worker processes,
and writing ``results.json``, ``report.md`` and the plots of ``OUT/``."""

from __future__ import annotations

import json
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from densegrpo import config as cfg
from densegrpo.bench.arms import ARMS, DEFAULT_REWARDS, PROFILES, Profile, arm_config, uniform_level
from densegrpo.bench.costs import COST_ARM, measure_costs
from densegrpo.bench.report import PSI_ARM, plot_curves, plot_psi, render_report
from densegrpo.bench.stats import summarise, summarise_run
from densegrpo.errors import UserError

Task = tuple[str, dict[str, Any], int]  # (run folder, run config as JSON, torch threads)


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The metrics rows of a run folder, one per iteration."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]


def write_json(path: Path, data: Any) -> None:
    """Write through a temporary file, so an interrupted benchmark leaves the last complete results."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    tmp.replace(path)


def run_one(task: Task) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One training run (in this process or a worker): returns its metrics rows and summary."""
    from densegrpo.train import run_training

    run_dir, data, threads = Path(task[0]), task[1], task[2]
    torch.set_num_threads(threads)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    summary = run_training(cfg.validate(data), run_dir)
    return read_rows(run_dir), summary


def render(results: dict[str, Any], out: Path) -> Path:
    """Plots and ``report.md`` of ``results``; the psi plot's uniform level is the psi arm's
    (its calibrator's options do not depend on the reward or the seed)."""
    rewards = list(results["runs"])
    config = arm_config(PSI_ARM, DEFAULT_REWARDS[0], 0, PROFILES[results["profile"]], results["iterations"])
    level = uniform_level(config)
    plot_curves(results, out)
    plot_psi(out, rewards, level)
    (out / "report.md").write_text(render_report(results), encoding="utf-8")
    return out / "report.md"


def rerender(out: Path) -> Path:
    """Recompute the summary and rewrite report.md and the plots from ``out/results.json``."""
    out = Path(out)
    path = out / "results.json"
    if not path.exists():
        raise UserError(f"'{path}' does not exist; run the benchmark into --out {out} first")
    results = json.loads(path.read_text(encoding="utf-8"))
    results["summary"] = summarise(results)
    write_json(path, results)
    return render(results, out)


def header(profile_name: str, iterations: int, seeds: int, arms: list[str], workers: int, threads: int) -> dict[str, Any]:
    """The fields of ``results.json`` that describe how the benchmark was run."""
    profile = PROFILES[profile_name]
    invoked = sys.argv and "bench" in sys.argv
    return {
        "command": "densegrpo " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if invoked else "densegrpo bench sparse-vs-dense",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.python_version()}, torch {torch.__version__}",
        "profile": profile_name,
        "iterations": iterations,
        "seeds": seeds,
        "group_size": profile.group_size,
        "groups_per_iteration": profile.groups,
        "arms": {a: ARMS[a].description for a in arms},
        "runs": {},
        "costs": {},
        "jobs": workers,
        "torch_threads_per_run": threads,
    }


def run_all(tasks: list[Task], workers: int) -> Iterator[tuple[list[dict[str, Any]], dict[str, Any]]]:
    """The rows and summary of every task, in order; ``workers > 1`` runs them in spawned processes."""
    if workers == 1:
        yield from (run_one(task) for task in tasks)
        return
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        yield from pool.imap(run_one, tasks)
    except BaseException:  # a failed run or Ctrl-C: do not wait for the remaining runs
        pool.terminate()
        pool.join()
        raise
    pool.close()
    pool.join()


def run_sparse_vs_dense(
    seeds: int = 3,
    iterations: int | None = None,
    rewards: list[str] | None = None,
    out: Path = Path("bench-sparse-vs-dense"),
    quick: bool = False,
    arms: list[str] | None = None,
    workers: int = 1,
) -> Path:
    """Train every arm on every reward for ``seeds`` seeds, measure the costs, and write
    ``out/results.json`` (after every run), the plots and ``out/report.md`` (returned)."""
    if workers < 1:
        raise UserError("--jobs must be at least 1")
    threads = max(1, torch.get_num_threads() // workers)
    profile_name = "quick" if quick else "default"
    profile: Profile = PROFILES[profile_name]
    iterations = iterations or profile.iterations
    rewards = list(rewards or DEFAULT_REWARDS)
    arms = list(arms or ARMS)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise UserError(f"unknown arm(s) {', '.join(unknown)}; available: {', '.join(ARMS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = header(profile_name, iterations, seeds, arms, workers, threads)
    jobs = [(reward, arm, seed) for reward in rewards for arm in arms for seed in range(seeds)]
    tasks = [(str(out / "runs" / r / a / f"seed{s}"), arm_config(a, r, s, profile, iterations).model_dump(mode="json"), threads) for r, a, s in jobs]
    progress = tqdm(total=len(jobs), desc="bench", unit="run", dynamic_ncols=True)
    for (reward, arm, seed), (rows, summary) in zip(jobs, run_all(tasks, workers), strict=True):
        progress.update(1)
        progress.set_postfix_str(f"{reward} {arm} seed {seed}")
        results["runs"].setdefault(reward, {}).setdefault(arm, []).append(summarise_run(rows, summary))
        write_json(out / "results.json", results)
    progress.close()
    for reward in rewards:
        results["costs"][reward] = measure_costs(arm_config(COST_ARM, reward, 0, profile, iterations))
    results["summary"] = summarise(results)
    results["bench_wall_s"] = time.perf_counter() - started
    write_json(out / "results.json", results)
    return render(results, out)
