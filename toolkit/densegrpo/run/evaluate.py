"""Evaluation: ODE samples on test prompts, scored overall and per GenEval tag."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from densegrpo.contracts import registry
from densegrpo.contracts.errors import UserError
from densegrpo.method.distributed import World
from densegrpo.method.noise import draw_noise
from densegrpo.method.sigmas import make_sigmas

EVAL_STREAM = 7  # noise stream reserved for evaluation and sample grids


@dataclass(frozen=True)
class Benchmark:
    """A named evaluation: prompts plus a reward scored in one or more modes."""

    prompts: str
    reward: str
    modes: tuple[str, ...] = ()


BENCHMARKS: dict[str, Benchmark] = {
    "toy-geneval": Benchmark(prompts="toy-test", reward="toy-geneval", modes=("partial", "strict", "correct")),
    "toy-clip": Benchmark(prompts="toy-test", reward="toy-clip"),
    "geneval": Benchmark(prompts="toy-test", reward="geneval", modes=("partial", "strict", "correct")),
}


def load_prompt_records(source: str) -> list[dict[str, Any]]:
    """Prompt records ``{"prompt", "tag"?, "include"?, ...}`` from a name or a file."""
    from densegrpo.worlds.toy.prompts import load_prompts

    return load_prompts(source)


EVAL_CHUNK = 64
"""Rows per model call and per decode of :func:`generate` when ``sampling.chunk_size`` is not set."""


@torch.no_grad()
def generate(policy: Any, prompts: list[str], steps: int, shift: float, seed: int, start_index: int = 0,
             chunk_size: int | None = None) -> Tensor:
    """ODE samples for ``prompts`` with fixed per-index noise: images ``(N,3,H,W)`` float32 in [0,1], on the CPU.

    Image ``i`` starts from the noise of index ``start_index + i`` (stream :data:`EVAL_STREAM`), so a
    rank that generates rows ``[a, b)`` of an evaluation passes ``start_index=a`` and gets the very
    images one process would. The rows run ``chunk_size`` at a time (``None``: :data:`EVAL_CHUNK`):
    each chunk is one batch of every model call (``(chunk, C, h, w)`` latents; twice the rows inside
    the model with CFG) and one decode, and only its images, moved to the CPU, are kept.
    """
    sampler = registry.load("samplers", "ode")
    sigmas = make_sigmas(steps, shift)
    rows = EVAL_CHUNK if chunk_size is None else chunk_size
    images = []
    for start in range(0, len(prompts), rows):
        chunk = prompts[start : start + rows]
        indices = list(range(start_index + start, start_index + start + len(chunk)))
        noise, _ = draw_noise(seed, 0, indices, tuple(policy.latent_shape), 0, stream=EVAL_STREAM)
        cond = policy.encode(chunk)
        traj = sampler.rollout(policy, cond, noise.to(policy.device), sigmas.to(policy.device), torch.zeros(steps, device=policy.device))
        images.append(policy.decode(traj.final).float().cpu())
    return torch.cat(images)


def evaluate_policy(
    policy: Any,
    benchmark: str = "toy-geneval",
    steps: int = 40,
    shift: float = 3.0,
    per_prompt: int = 4,
    limit: int | None = None,
    seed: int = 0,
    prompts_source: str | None = None,
    chunk_size: int | None = None,
    world: World | None = None,
) -> dict[str, Any]:
    """Score ODE samples of the benchmark's prompts; returns overall and per-tag means.

    ``chunk_size``: rows per model call and decode (:func:`generate`). With a ``world`` of several
    processes each rank generates and scores its :meth:`~densegrpo.method.distributed.World.split`
    share of the ``prompts * per_prompt`` images, and the scores are gathered in order, so every rank
    returns the one-process report.
    """
    if benchmark not in BENCHMARKS:
        names = ", ".join(sorted(BENCHMARKS))
        raise UserError(f"unknown benchmark '{benchmark}'; available: {names}")
    world = world or World()
    spec = BENCHMARKS[benchmark]
    records = load_prompt_records(prompts_source or spec.prompts)[: limit or None]
    expanded = [r for r in records for _ in range(per_prompt)]
    share = world.split(len(expanded))
    mine = expanded[share]
    images = generate(policy, [r["prompt"] for r in mine], steps, shift, seed, share.start, chunk_size) if mine else None
    modes = spec.modes or ("score",)
    scores: dict[str, Tensor] = {}
    for mode in modes:
        options = {} if mode == "score" else {"mode": mode}
        reward = registry.load("rewards", spec.reward, options)
        local = reward(images, [r["prompt"] for r in mine], [r if "include" in r else None for r in mine]).float().cpu() if mine else torch.empty(0)
        scores[mode] = world.gather_split(local, len(expanded))
    per_tag: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for i, record in enumerate(expanded):
        for mode in modes:
            per_tag[record.get("tag", "all")][mode].append(float(scores[mode][i]))
    return {
        "benchmark": benchmark,
        "images": len(expanded),
        "prompts": len(records),
        "steps": steps,
        "overall": {mode: _nanmean(scores[mode]) for mode in modes},
        "per_tag": {tag: {m: _nanmean(torch.tensor(v)) for m, v in values.items()} for tag, values in sorted(per_tag.items())},
    }


@dataclass(frozen=True)
class PairedGain:
    """Mean per-image change of a score against a base scored on the same noise.

    Attributes:
        gain: mean of ``current - base`` over the images both scored (not NaN).
        se: its standard error, ``std(current - base) / sqrt(images)`` (NaN below 2 images).
        images: images in the comparison.
        better: images whose score went up.
        worse: images whose score went down.
    """

    gain: float
    se: float
    images: int
    better: int
    worse: int


def save_scores(path: Path, scores: Tensor | dict[str, Tensor]) -> None:
    """Write per-image scores (one tensor, or one per label) to ``path`` as ``{"scores": ...}``,
    NaN as null, atomically: a crash mid-write leaves the previous file."""
    def plain(values: Tensor) -> list[float | None]:
        return [None if math.isnan(v) else v for v in values.double().tolist()]

    data = {label: plain(values) for label, values in scores.items()} if isinstance(scores, dict) else plain(scores)
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"scores": data}), encoding="utf-8")
    os.replace(tmp, path)


def load_scores(path: Path) -> Tensor | dict[str, Tensor] | None:
    """What :func:`save_scores` wrote (float32, null as NaN), or ``None`` when ``path`` does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    def tensor(values: list[float | None]) -> Tensor:
        return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)

    saved = json.loads(path.read_text(encoding="utf-8"))["scores"]
    return {label: tensor(values) for label, values in saved.items()} if isinstance(saved, dict) else tensor(saved)


def paired_gain(base: Tensor, current: Tensor) -> PairedGain:
    """Compare per-image scores ``current (M,)`` with ``base (M,)`` from the same initial noise.

    Pairing removes the spread between images (a hard prompt is hard for both), so the
    standard error is that of the per-image differences, far below an unpaired one.
    """
    if base.shape != current.shape:
        raise ValueError(f"paired scores must have one shape, got {tuple(base.shape)} and {tuple(current.shape)}")
    base, current = base.double().flatten(), current.double().flatten()
    valid = ~(torch.isnan(base) | torch.isnan(current))
    diff = (current - base)[valid]
    images = int(diff.numel())
    gain = float(diff.mean()) if images else math.nan
    se = float(diff.std()) / math.sqrt(images) if images >= 2 else math.nan
    return PairedGain(gain, se, images, int((diff > 0).sum()), int((diff < 0).sum()))


def _nanmean(values: Tensor) -> float:
    valid = values[~torch.isnan(values)]
    return float(valid.mean()) if valid.numel() else float("nan")


def format_report(report: dict[str, Any]) -> str:
    modes = list(report["overall"])
    width = max([len("overall")] + [len(t) for t in report["per_tag"]])
    lines = [f"{report['benchmark']}: {report['prompts']} prompts x {report['images'] // max(report['prompts'], 1)} images, {report['steps']} ODE steps"]
    lines.append(f"{'tag':<{width}}  " + "  ".join(f"{m:>8}" for m in modes))
    for tag, values in report["per_tag"].items():
        lines.append(f"{tag:<{width}}  " + "  ".join(f"{values[m]:8.3f}" for m in modes))
    lines.append(f"{'overall':<{width}}  " + "  ".join(f"{report['overall'][m]:8.3f}" for m in modes))
    return "\n".join(lines)


def evaluate_from_cli(target: Path | None, benchmark: str, steps: int | None, per_prompt: int, limit: int | None, seed: int, overrides: list[str]) -> dict[str, Any]:
    from densegrpo.run.runs import config_or_run, load_policy

    if benchmark not in BENCHMARKS:
        raise UserError(f"unknown benchmark '{benchmark}'; available: {', '.join(sorted(BENCHMARKS))}")
    config, run_dir = config_or_run(target, overrides)
    policy = load_policy(config, run_dir)
    prompts_source = config.prompts.test if config.prompts.test != "toy-test" else None
    return evaluate_policy(
        policy, benchmark, steps or config.sampling.eval_steps, config.sampling.shift, per_prompt, limit, seed, prompts_source,
        chunk_size=config.sampling.chunk_size,
    )
