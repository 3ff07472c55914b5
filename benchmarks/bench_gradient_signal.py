"""How much signal is in one iteration's policy gradient on the toy world?

    python benchmarks/bench_gradient_signal.py                       # 4 batches of 8 groups x 8
    python benchmarks/bench_gradient_signal.py --batches 6 --groups 16 --same-noise
    python benchmarks/bench_gradient_signal.py --set policy.config.resolution=32   # the 32 px toy

For ``--batches`` independent batches (fresh prompts and noise, the default toy run's sampler,
reward and noise level), it rolls out, scores densely, and takes the gradient of the GRPO
surrogate ``-mean(A_k * ratio_k)`` with respect to the LoRA weights separately for every step
``k``, with sparse (Flow-GRPO) and dense (DenseGRPO) advantages from the same rollout. It prints:

* the mean gradient norm per step (late, low-noise steps have large ``1/std`` scores);
* the cosine between the gradients of independent batches, per step and summed over step ranges;
* the cosine of the summed gradients under the peers' per-step controls, to first order (at the
  rollout's own weights, where every ratio is 1): RatioNorm scales step ``k``'s gradient by its
  transition std ``s_k`` (the gradient of ``exp(s_k (log_ratio - E_old))`` at ratio 1, the centring
  term's gradient being 0 there), GRPO-Guard's weights with RatioNorm by ``s_k / (-dt_k)``, and
  TempFlow-GRPO's weights by ``s_k / mean(s)``, the same direction as RatioNorm's.

Two gradients that estimate the same true gradient agree (cosine > 0) once the signal beats
the sampling noise; cosines scattered around 0 mean one batch's update is mostly noise. This is
the number that decides how many samples an update needs before the main job can show a gain.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import torch


@dataclass
class Rolled:
    """One scored rollout: ``traj`` and its terminal rewards ``terminal (N,)``."""

    traj: Any
    terminal: torch.Tensor


def rollout_with_advantages(run, iteration: int, groups: int, group_size: int, same_noise: bool, estimators: dict) -> tuple:
    """A fresh batch of ``groups x group_size`` training prompts at ``iteration``, rolled out with
    the run's sampler and noise level, scored densely, and its advantages ``(N, T)`` for each
    of ``estimators``: ``(batch, Rolled, {name: advantages})``."""
    from densegrpo.method.grpo import rollout
    from densegrpo.method.noise import generator_for
    from densegrpo.method.rewarding import ScoringPlan, score
    from densegrpo.run.batches import TRAIN_STREAM

    noise_level = run.parts.calibrator.noise_level(run.sigmas)
    batch = run.batches.draw(iteration, TRAIN_STREAM, groups, group_size, same_noise)
    traj = rollout(run.policy, run.parts.sampler, batch, run.sigmas, noise_level, generator_for(run.config.seed, TRAIN_STREAM, iteration))
    every_state = ScoringPlan(dense=True, completion="t", estimator_dense=True)
    scores = score(run.policy, traj, run.scorer(batch), every_state, run.world, group_size, 1.0)
    clip = run.config.train.advantage_clip
    advantages = {name: e(scores.for_estimator).float().clamp(-clip, clip) for name, e in estimators.items()}
    return batch, Rolled(traj, scores.terminal), advantages


def step_gradients(trainer, scored, advantages: dict[str, torch.Tensor], steps: list[int] | None = None) -> dict[str, torch.Tensor]:
    """``{estimator: (len(steps), P)}``: the surrogate's gradient for each step ``k`` of ``steps``
    (default: every step) separately, flattened over the trainable weights."""
    params = trainer.policy.trainable_parameters()
    per: dict[str, list[torch.Tensor]] = {name: [] for name in advantages}
    for k in (range(scored.traj.num_steps) if steps is None else steps):
        log_prob, _ = trainer.parts.sampler.log_prob(trainer.policy, scored.traj, k)
        ratio = torch.exp(log_prob - scored.traj.log_probs[:, k])
        for name, adv in advantages.items():
            grads = torch.autograd.grad(-(adv[:, k] * ratio).mean(), params, retain_graph=True)
            per[name].append(torch.cat([g.flatten() for g in grads]))
    return {name: torch.stack(rows) for name, rows in per.items()}


def control_weights(sigmas: torch.Tensor, step_std: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{control: (T,) weights}``: the first-order factor each per-step control puts on step
    ``k``'s gradient (module docstring); ``sigmas (T+1,)``, ``step_std (T,)``."""
    from densegrpo.method.step_weighting import step_weights

    every = torch.ones_like(step_std, dtype=torch.bool)
    return {
        "plain": torch.ones_like(step_std),
        "ratio-norm": step_std,
        "grpo-guard (ratio-norm + 1/(-dt))": step_std * step_weights(sigmas, step_std, every, "grpo-guard"),
        "tempflow": step_weights(sigmas, step_std, every, "tempflow"),
    }


def mean_pairwise_cosine(vectors: list[torch.Tensor]) -> tuple[float, list[float]]:
    values = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(vectors, 2)]
    return sum(values) / len(values), values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--noise-level", type=float, default=0.7)
    parser.add_argument("--same-noise", action="store_true", help="share the initial noise within a group")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--set", action="append", default=[], help="extra config override, e.g. policy.config.resolution=32 (repeatable)")
    args = parser.parse_args()
    if args.batches < 2:
        parser.error("--batches must be at least 2 to compare gradients")
    torch.set_num_threads(args.threads)

    from densegrpo.contracts import config as cfg
    from densegrpo.contracts import registry
    from densegrpo.run.state import Run

    config = cfg.resolve(
        None,
        [
            "calibrator.name=uniform",
            f"calibrator.config.noise_level={args.noise_level}",
            f"train.group_size={args.group_size}",
            f"train.groups_per_iteration={args.groups}",
            *args.set,
        ],
    )
    estimators = {name: registry.load("advantages", name) for name in ("sparse", "dense")}
    gradients: dict[str, list[torch.Tensor]] = {name: [] for name in estimators}
    step_std = None
    with TemporaryDirectory() as run_dir:
        trainer = Run(config, Path(run_dir))
        for b in range(args.batches):
            started = time.perf_counter()
            iteration = 1000 + b  # away from the iterations of a default run
            batch, scored, advantages = rollout_with_advantages(trainer, iteration, args.groups, args.group_size, args.same_noise, estimators)
            step_std = scored.traj.step_std.detach().float().cpu()
            for name, grads in step_gradients(trainer, scored, advantages).items():
                gradients[name].append(grads)
            print(f"batch {b}: {len(batch.prompts)} samples, reward {float(scored.terminal.mean()):.3f}, {time.perf_counter() - started:.0f} s", flush=True)

    T = config.sampling.num_steps
    ranges = [(0, T), (0, 3), (0, 5), (3, T), (5, T)]
    report: dict[str, dict] = {}
    print(f"\n{args.batches} batches of {args.groups} groups x {args.group_size}, noise level {args.noise_level}, same noise {args.same_noise}")
    for name, batches in gradients.items():
        stacked = torch.stack(batches)  # (B, T, P)
        norms = stacked.norm(dim=2).mean(0)
        per_step = [mean_pairwise_cosine([g[k] for g in batches])[0] for k in range(T)]
        summed = {f"steps {lo}-{hi - 1}": mean_pairwise_cosine([g[lo:hi].sum(0) for g in batches]) for lo, hi in ranges}
        weights = control_weights(trainer.sigmas.detach().float().cpu(), step_std)
        controlled = {control: mean_pairwise_cosine([(w[:, None] * g).sum(0) for g in batches]) for control, w in weights.items()}
        report[name] = {"norm_per_step": norms.tolist(), "cosine_per_step": per_step, "cosine_summed": summed,
                        "cosine_summed_under_control": controlled}
        print(f"\n{name}")
        print("| step | " + " | ".join(str(k) for k in range(T)) + " |")
        print("|---" * (T + 1) + "|")
        print("| grad norm | " + " | ".join(f"{float(v):.1e}" for v in norms) + " |")
        print("| cosine | " + " | ".join(f"{v:+.2f}" for v in per_step) + " |")
        for label, (mean, values) in summed.items():
            print(f"{label}: mean cosine {mean:+.3f}  pairs {[round(v, 2) for v in values]}")
        for control, (mean, values) in controlled.items():
            print(f"all steps, {control} weights: mean cosine {mean:+.3f}  pairs {[round(v, 2) for v in values]}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
