"""The credit-assignment lab as a benchmark world (``densegrpo bench sparse-vs-dense --world lab``).

The ``lab`` policy (:mod:`densegrpo.worlds.lab.policy`) and reward (:mod:`densegrpo.worlds.lab.reward`)
make a run of 20 iterations of 64 samples take a few seconds on two CPU cores, so the claims
can be decided with ten or more seeds in minutes. Its three dials, the latent dimension ``d``,
the number of sampling steps ``T`` and the stage at which the reward is decided, are the
arguments of :func:`lab_overrides`; ``benchmarks/bench_lab_sweep.py`` moves them one at a time.
"""

from __future__ import annotations

LAB_DIM = 32
LAB_STEPS = 16
LAB_STAGE = 1
LAB_ITERATIONS = 20


def lab_overrides(dim: int = LAB_DIM, steps: int = LAB_STEPS, stage: int = LAB_STAGE, iterations: int = LAB_ITERATIONS) -> list[str]:
    """``--set`` overrides of the default run config that make it the lab world.

    ``dim``: latent dimension d; ``steps``: sampling steps T (rollouts, evaluation and the
    dense engine's ODE completions alike, on a uniform schedule: with SD3's shift the last
    step would start at t = 0.25, above the detail stage's decision time 0.11); ``stage``: the
    level the reward asks about (0 coarse ... 2 detail).
    """
    return [
        "policy.name=lab",
        f"policy.config.dim={dim}",
        "rewards.0.name=lab",
        f"rewards.0.config.stage={stage}",
        "prompts.train=lab-train",
        "prompts.test=lab-test",
        f"iterations={iterations}",
        f"sampling.num_steps={steps}",
        f"sampling.eval_steps={steps}",
        "sampling.shift=1.0",
        "train.group_size=16",
        "train.groups_per_iteration=4",
        # the residual is a few thousand weights trained whole; at the toy's 1e-3 it moves too little in 20 iterations
        "train.learning_rate=0.003",
        "calibrator.config.max_rounds=2",
        "calibrator.config.samples_per_round=32",
        "logging.sample_every=0",
        "logging.sample_prompts=0",
        "logging.eval_prompts=64",
        "logging.eval_images_per_prompt=4",
        "logging.train_eval_images_per_prompt=0",
    ]


LAB_OVERRIDES = lab_overrides()
"""The lab world at its default dials: d = 32, T = 16, reward decided at the middle stage."""


__all__ = ["LAB_DIM", "LAB_ITERATIONS", "LAB_OVERRIDES", "LAB_STAGE", "LAB_STEPS", "lab_overrides"]
