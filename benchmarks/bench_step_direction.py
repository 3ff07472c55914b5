"""Is one accumulated policy gradient an ascent direction of the toy reward, and how far can we step?

    python benchmarks/bench_step_direction.py --same-noise            # 48 groups x 8, steps 0-1
    python benchmarks/bench_step_direction.py --steps 0,1,2,3 --etas 0.001,0.003
    python benchmarks/bench_step_direction.py --same-noise --set policy.config.resolution=32   # the 32 px toy

From the base toy policy it rolls out ``--groups`` prompt groups (in chunks), scores them
densely, and sums the gradient of the GRPO surrogate ``-mean(A_k * ratio_k)`` over the chosen
steps ``k`` for sparse (Flow-GRPO) and dense (DenseGRPO) advantages from the same rollouts.
Then, for each direction and each step size ``eta``, it moves the LoRA weights by
``eta * direction / rms(direction)`` (so ``eta`` is the root-mean-square change per weight)
and scores ``--eval-steps`` ODE samples of every test prompt (``--per-prompt``
images each, the same noise for every candidate, so differences are paired).

Controls, with the same step sizes:

* ``random``: a Gaussian direction on the weights that have a gradient (LoRA B; A has none
  while B = 0). It changes the output far less than a gradient of the same size does,
  because gradients live in the directions the output is most sensitive to.
* ``shuffled``: the dense advantages permuted over the whole batch before the gradient is
  taken. It has the gradient's sensitivity but no reward signal: the honest null.

A direction carries signal when it beats ``shuffled`` at the same ``eta``. The best ``eta``
tells how far a whole training run may move the weights.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=48, help="prompt groups whose gradients are summed")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=8, help="groups per rollout")
    parser.add_argument("--steps", default="0,1", help="comma-separated step indices k whose gradients are summed")
    parser.add_argument("--etas", default="0.003,0.01,0.03", help="comma-separated RMS step sizes")
    parser.add_argument("--noise-level", type=float, default=0.7)
    parser.add_argument("--same-noise", action="store_true", help="share the initial noise within a group")
    parser.add_argument("--per-prompt", type=int, default=2, help="evaluation images per test prompt")
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="extra config override (repeatable)")
    parser.add_argument("--json", type=Path, default=None, help="also write the scores here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from bench_gradient_signal import (  # benchmarks/ is on sys.path when run as a script
        rollout_with_advantages,
        step_gradients,
    )
    from densegrpo.contracts import config as cfg
    from densegrpo.contracts import registry
    from densegrpo.run.evaluate import evaluate_policy
    from densegrpo.run.state import Run

    config = cfg.resolve(None, [
        "calibrator.name=uniform", f"calibrator.config.noise_level={args.noise_level}",
        f"train.group_size={args.group_size}", f"train.groups_per_iteration={args.chunk}", *args.set,
    ])
    steps = [int(k) for k in args.steps.split(",")]
    etas = [float(e) for e in args.etas.split(",")]
    estimators = {name: registry.load("advantages", name) for name in ("sparse", "dense")}
    started = time.perf_counter()
    with TemporaryDirectory() as run_dir:
        trainer = Run(config, Path(run_dir))
        params = trainer.policy.trainable_parameters()
        directions = {name: torch.zeros(sum(p.numel() for p in params)) for name in (*estimators, "shuffled")}
        shuffle = torch.Generator().manual_seed(1)
        for chunk in range(args.groups // args.chunk):
            iteration = 2000 + chunk  # away from the iterations of a default run
            batch, scored, advantages = rollout_with_advantages(trainer, iteration, args.chunk, args.group_size, args.same_noise, estimators)
            advantages["shuffled"] = advantages["dense"][torch.randperm(len(batch.prompts), generator=shuffle)]
            for name, per_step in step_gradients(trainer, scored, advantages, steps).items():
                directions[name] += per_step.sum(dim=0)
            print(f"chunk {chunk}: {len(batch.prompts)} samples, reward {float(scored.terminal.mean()):.3f}, "
                  f"{time.perf_counter() - started:.0f} s", flush=True)

        has_gradient = directions["dense"] != 0
        directions["random"] = torch.randn(directions["dense"].shape, generator=torch.Generator().manual_seed(0)) * has_gradient
        cosine = float(torch.nn.functional.cosine_similarity(directions["dense"], directions["sparse"], dim=0))
        print(f"cosine(dense, sparse) = {cosine:+.3f}")

        base = [p.detach().clone() for p in params]

        def evaluate() -> float:
            report = evaluate_policy(trainer.policy, "toy-geneval", steps=args.eval_steps, per_prompt=args.per_prompt)
            return round(report["overall"]["partial"], 4)

        scores: dict[str, float] = {"base": evaluate()}
        print(f"base: {scores['base']}", flush=True)
        for name in ("sparse", "dense", "random", "shuffled"):
            unit = -directions[name] / directions[name].pow(2).mean().sqrt()  # descend the loss, RMS 1 per weight
            for eta in etas:
                with torch.no_grad():
                    offset = 0
                    for p, b in zip(params, base):
                        p.copy_(b + eta * unit[offset:offset + p.numel()].view_as(p))
                        offset += p.numel()
                scores[f"{name}@{eta:g}"] = evaluate()
                print(f"{name} eta {eta:g}: {scores[f'{name}@{eta:g}']}  ({time.perf_counter() - started:.0f} s)", flush=True)
            with torch.no_grad():
                for p, b in zip(params, base):
                    p.copy_(b)

    samples = (args.groups // args.chunk) * args.chunk * args.group_size
    print(f"\n{samples} samples, steps {steps}, same noise {args.same_noise}; eval: 81 test prompts x {args.per_prompt}, {args.eval_steps} ODE steps")
    print("| direction | " + " | ".join(f"eta {e:g}" for e in etas) + " |")
    print("|---" * (len(etas) + 1) + "|")
    for name in ("dense", "sparse", "shuffled", "random"):
        print(f"| {name} | " + " | ".join(f"{scores[f'{name}@{e:g}'] - scores['base']:+.4f}" for e in etas) + " |")
    print(f"(change of the partial toy-GenEval score from the base {scores['base']})")
    if args.json:
        args.json.write_text(json.dumps({"cosine_dense_sparse": cosine, "scores": scores}, indent=2))


if __name__ == "__main__":
    main()
