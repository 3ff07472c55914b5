"""``densegrpo sample``: render prompts into a PNG grid."""

from __future__ import annotations

from pathlib import Path

from densegrpo.contracts.errors import UserError
from densegrpo.run.evaluate import generate
from densegrpo.run.images import check_output_file, make_grid, save_png


def sample_from_cli(
    target: Path | None,
    policy_name: str | None,
    prompts: list[str],
    per_prompt: int,
    steps: int | None,
    seed: int,
    out: Path,
    overrides: list[str],
) -> Path:
    from densegrpo.run.runs import config_or_run, load_policy

    if not prompts:
        raise UserError("no prompt given; pass at least one --prompt TEXT")
    check_output_file(out)
    if policy_name is not None:
        overrides = [f"policy.name={policy_name}", *overrides]
    config, run_dir = config_or_run(target, overrides)
    policy = load_policy(config, run_dir)
    expanded = [p for p in prompts for _ in range(per_prompt)]
    images = generate(policy, expanded, steps or config.sampling.eval_steps, config.sampling.shift, seed)
    return save_png(make_grid(images, expanded, columns=per_prompt), out)
