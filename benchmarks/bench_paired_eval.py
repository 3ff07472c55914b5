"""Did training raise the toy-GenEval score beyond evaluation noise? A paired comparison.

    python benchmarks/bench_paired_eval.py runs/toy-densegrpo --per-prompt 8 --seed 2
    python benchmarks/bench_paired_eval.py runs/a,runs/b --per-prompt 4 --seed 1
    python benchmarks/bench_paired_eval.py runs/toy-densegrpo --prompts train --per-prompt 32 --seed 1

Every image of the base policy and of each trained run (its latest checkpoint) comes from the
same initial noise, prompt by prompt, so the per-image differences are paired. The script prints
the mean difference of the partial score with its standard error (std / sqrt(images)) and how many
images got better or worse. Use a ``--seed`` other than the training run's own evaluation seed
(0) for a held-out estimate: a learning rate or checkpoint chosen by looking at ``eval_reward`` is
biased on that noise.

The base is the run's own config with no trained weights: the same policy, first reward and sampling.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", help="comma-separated run folders")
    parser.add_argument("--per-prompt", type=int, default=4, help="images per test prompt")
    parser.add_argument("--seed", type=int, default=1, help="noise seed of the evaluation images")
    parser.add_argument("--steps", type=int, default=None, help="ODE steps (default: the run's eval_steps)")
    parser.add_argument("--prompts", default=None, help="prompt set to score: 'train' (the run's prompts.train), "
                        "'test' or unset (its prompts.test), or any set load_prompts reads")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from densegrpo.contracts import registry
    from densegrpo.run.evaluate import generate, load_prompt_records, paired_gain
    from densegrpo.run.runs import config_or_run, load_policy

    for run in args.runs.split(","):
        config, run_dir = config_or_run(Path(run), [])
        source = {"train": config.prompts.train, "test": config.prompts.test, None: config.prompts.test}.get(args.prompts, args.prompts)
        records = [r for r in load_prompt_records(source) for _ in range(args.per_prompt)]
        prompts = [r["prompt"] for r in records]
        metadata = [r if "include" in r else None for r in records]
        steps = args.steps or config.sampling.eval_steps
        spec = config.rewards[0]
        reward = registry.load("rewards", spec.name, spec.config)

        def scores(policy) -> torch.Tensor:
            images = generate(policy, prompts, steps, config.sampling.shift, args.seed)
            return reward(images, prompts, metadata).float()

        base = scores(load_policy(config))
        trained = scores(load_policy(config, run_dir))
        valid = ~(torch.isnan(base) | torch.isnan(trained))
        paired = paired_gain(base, trained)
        print(
            f"{run}: base {float(base[valid].mean()):.4f}, trained {float(trained[valid].mean()):.4f}, "
            f"difference {paired.gain:+.4f} +- {paired.se:.4f} (standard error, {paired.images} paired images, "
            f"{steps} ODE steps, seed {args.seed}); better {paired.better}, worse {paired.worse}",
            flush=True,
        )


if __name__ == "__main__":
    main()
