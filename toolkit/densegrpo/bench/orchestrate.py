"""Running every (reward, arm, seed) as a training run, in this process or in worker processes,
and writing ``results.json``, ``report.md`` and the plots of ``OUT/``."""

from __future__ import annotations

import json
import platform
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from tqdm.auto import tqdm

from densegrpo.bench.arms import (
    ARMS,
    DEFAULT_REWARDS,
    PROFILES,
    WORLDS,
    parse_arm,
    reward_key,
    uniform_level,
    world_config,
)
from densegrpo.bench.costs import COST_ARM, measure_costs
from densegrpo.bench.report import PSI_ARM, plot_curves, plot_psi, render_report
from densegrpo.bench.stats import summarise, summarise_run
from densegrpo.contracts import config as cfg
from densegrpo.contracts.errors import UserError

Task = tuple[str, dict[str, Any], int]  # (run folder, run config as JSON, torch threads)


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The metrics rows of a run folder, one per iteration."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]


def write_json(path: Path, data: Any) -> None:
    """Write through a temporary file, so an interrupted benchmark leaves the last complete results."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    tmp.replace(path)


def finished_run(run_dir: Path, iterations: int) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """The rows and summary of a run folder that finished all ``iterations``, else ``None``."""
    summary_path = run_dir / "summary.json"
    if not (summary_path.exists() and (run_dir / "metrics.jsonl").exists()):
        return None
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    rows = read_rows(run_dir)
    if summary.get("stopped_by") or len(rows) != iterations:
        return None
    return rows, summary


def run_one(task: Task) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One training run (in this process or a worker): returns its metrics rows and summary.
    A folder that already holds the finished run is read, not trained again; an unfinished
    one is trained afresh."""
    from densegrpo.run.train import run_training

    run_dir, data, threads = Path(task[0]), task[1], task[2]
    config = cfg.validate(data)
    done = finished_run(run_dir, config.iterations)
    if done is not None:
        return done
    torch.set_num_threads(threads)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    summary = run_training(config, run_dir)
    return read_rows(run_dir), summary


def render(results: dict[str, Any], out: Path) -> Path:
    """Plots and ``report.md`` of ``results``."""
    plot_curves(results, out)
    plot_psi(out, list(results["runs"]), results["uniform_level"])
    (out / "report.md").write_text(render_report(results), encoding="utf-8")
    return out / "report.md"


def rerender(out: Path) -> Path:
    """Recompute the summary and rewrite report.md and the plots from ``out/results.json``."""
    out = Path(out)
    results = read_results(out)
    results["summary"] = summarise(results)
    write_json(out / "results.json", results)
    return render(results, out)


def read_results(out: Path) -> dict[str, Any]:
    path = Path(out) / "results.json"
    if not path.exists():
        raise UserError(f"'{path}' does not exist; run the benchmark into --out {out} first")
    return json.loads(path.read_text(encoding="utf-8"))


def run_or_resume(folder: Path, overrides: list[str], arms: list[str], seeds: int, workers: int = 1) -> dict[str, list[dict[str, Any]]]:
    """One benchmark of ``arms`` on the default run config with ``overrides``, for scripts that
    run many: the config is written to ``folder/config.yaml`` and the benchmark to
    ``folder/bench``, which is continued where it stopped when it was started before. Returns its
    runs ``{arm: [one run per seed, in seed order]}`` (a single reward)."""
    bench = folder / "bench"
    if (bench / "results.json").exists():
        run_sparse_vs_dense(out=bench, resume=True, costs=False)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "config.yaml"
        path.write_text(yaml.safe_dump(cfg.resolve(None, overrides).model_dump(mode="json"), sort_keys=False), encoding="utf-8")
        run_sparse_vs_dense(seeds=seeds, arms=arms, out=bench, config=path, costs=False, workers=workers)
    (runs,) = read_results(bench)["runs"].values()
    return runs


def header(plan: dict[str, Any], arms: list[str], workers: int, threads: int) -> dict[str, Any]:
    """The fields of ``results.json`` that describe how the benchmark was run; ``plan`` is
    what ``--resume`` needs to rebuild the same runs."""
    profile = PROFILES[plan["profile"]]
    invoked = sys.argv and "bench" in sys.argv
    return {
        "command": "densegrpo " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if invoked else "densegrpo bench sparse-vs-dense",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.python_version()}, torch {torch.__version__}",
        "plan": plan,
        "profile": plan["profile"],
        "world": plan["config"] or plan["world"],
        "iterations": plan["iterations"],
        "seeds": plan["seeds"],
        "group_size": profile.group_size,
        "groups_per_iteration": profile.groups,
        "arms": {label: arm.description for label, arm in map(parse_arm, arms)},
        "runs": {},
        "costs": {},
        "jobs": workers,
        "torch_threads_per_run": threads,
    }


def _assign_device(counter: Any, devices: int) -> None:
    """Pool initializer: worker ``k`` sees only GPU ``k mod devices`` (before CUDA starts in it)."""
    import os

    with counter.get_lock():
        index = counter.value
        counter.value += 1
    os.environ["CUDA_VISIBLE_DEVICES"] = str(index % devices)


def run_all(tasks: list[Task], workers: int) -> Iterator[tuple[list[dict[str, Any]], dict[str, Any]]]:
    """The rows and summary of every task, in order; ``workers > 1`` runs them in spawned
    processes, each on its own GPU when there are GPUs (round robin)."""
    if workers == 1:
        yield from (run_one(task) for task in tasks)
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    initializer = (_assign_device, (context.Value("i", 0), devices)) if devices else (None, ())
    pool = context.Pool(workers, initializer=initializer[0], initargs=initializer[1])
    try:
        yield from pool.imap(run_one, tasks)
    except BaseException:  # a failed run or Ctrl-C: do not wait for the remaining runs
        pool.terminate()
        pool.join()
        raise
    pool.close()
    pool.join()


def folder_name(key: str) -> str:
    """``key`` as a portable folder name (a ``module:Class`` reward's colon is not)."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", key)


def plan_runs(plan: dict[str, Any], out: Path, threads: int) -> tuple[list[tuple[str, str, int]], list[Task], dict[str, cfg.RunConfig]]:
    """Every ``(reward, arm, seed)`` of ``plan`` with its task, and per reward the config the
    costs are measured on (:data:`COST_ARM`'s, seed 0)."""
    profile = PROFILES[plan["profile"]]
    config = Path(plan["config"]) if plan["config"] else None
    jobs, tasks, firsts = [], [], {}
    rewards = plan["rewards"] if plan["world"] == "toy" and config is None else [None]
    for reward in rewards:
        for arm in plan["arms"]:
            for seed in range(plan["seeds"]):
                run_config = world_config(plan["world"], config, arm, reward, seed, profile, plan["iterations"])
                key = reward or reward_key(run_config)
                if key not in firsts:
                    firsts[key] = world_config(plan["world"], config, COST_ARM, reward, 0, profile, plan["iterations"])
                label = parse_arm(arm)[0]
                jobs.append((key, label, seed))
                tasks.append((str(out / "runs" / folder_name(key) / label / f"seed{seed}"), run_config.model_dump(mode="json"), threads))
    return jobs, tasks, firsts


def run_sparse_vs_dense(
    seeds: int = 3,
    iterations: int | None = None,
    rewards: list[str] | None = None,
    out: Path = Path("bench-sparse-vs-dense"),
    quick: bool = False,
    arms: list[str] | None = None,
    workers: int = 1,
    world: str = "toy",
    config: Path | None = None,
    resume: bool = False,
    costs: bool = True,
) -> Path:
    """Train every arm on every reward for ``seeds`` seeds, measure the costs, and write
    ``out/results.json`` (after every run), the plots and ``out/report.md`` (returned).

    Each run is an ordinary run folder ``out/runs/REWARD/ARM/seedK``. ``world``: ``toy`` or
    ``lab``; ``config``: a user's run configuration instead (its own sizes and rewards; a
    third-party policy or reward works as in ``densegrpo train``). ``resume``: continue the
    benchmark in ``out`` with the plan it was started with; finished runs are read, not redone.
    """
    if workers < 1:
        raise UserError("--jobs must be at least 1")
    out = Path(out)
    threads = max(1, torch.get_num_threads() // workers)
    if resume:
        plan = read_results(out).get("plan")
        if plan is None:
            raise UserError(f"'{out / 'results.json'}' was written by an older densegrpo without a plan; rerun the benchmark")
    else:
        if world not in WORLDS:
            raise UserError(f"unknown world '{world}'; available: {', '.join(WORLDS)}, or pass a CONFIG file")
        if config is not None and not Path(config).is_file():
            raise UserError(f"config '{config}' does not exist; pass a .yaml or .toml run configuration")
        arms = list(arms or ARMS)
        labels = [parse_arm(a)[0] for a in arms]  # a bad arm is a UserError here, before any run
        if len(set(labels)) != len(labels):
            raise UserError(f"arms {', '.join(labels)} repeat a label; give every arm its own")
        profile_name = "quick" if quick else "default"
        plan = {"world": world, "config": str(config) if config else None, "profile": profile_name, "seeds": seeds,
                "iterations": iterations or (PROFILES[profile_name].iterations if quick or (world == "toy" and config is None) else None),
                "rewards": list(rewards or DEFAULT_REWARDS), "arms": arms}
        if (out / "results.json").exists() and any((out / "runs").glob("*/*/seed*/summary.json")):
            raise UserError(f"'{out}' already holds a benchmark; pass --resume {out} to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    jobs, tasks, firsts = plan_runs(plan, out, threads)
    results = header(plan, plan["arms"], workers, threads)
    if plan["iterations"] is None:
        results["iterations"] = next(iter(firsts.values())).iterations
    first = next(iter(firsts.values()))
    results["group_size"], results["groups_per_iteration"] = first.train.group_size, first.train.groups_per_iteration
    results["eval_steps"] = first.sampling.eval_steps
    results["uniform_level"] = uniform_level(world_config(plan["world"], Path(plan["config"]) if plan["config"] else None, PSI_ARM,
                                                          plan["rewards"][0], 0, PROFILES[plan["profile"]], plan["iterations"]))
    write_json(out / "results.json", results)
    progress = tqdm(total=len(jobs), desc="bench", unit="run", dynamic_ncols=True)
    for (reward, arm, seed), (rows, summary) in zip(jobs, run_all(tasks, workers), strict=True):
        progress.update(1)
        progress.set_postfix_str(f"{reward} {arm} seed {seed}")
        results["runs"].setdefault(reward, {}).setdefault(arm, []).append(summarise_run(rows, summary, seed))
        write_json(out / "results.json", results)
    progress.close()
    if costs:
        for reward, run_config in firsts.items():
            results["costs"][reward] = measure_costs(run_config)
    results["summary"] = summarise(results)
    results["bench_wall_s"] = time.perf_counter() - started
    write_json(out / "results.json", results)
    return render(results, out)
