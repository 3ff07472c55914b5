"""The ``densegrpo`` command line (Typer).

User mistakes exit with status 2 and one line that names the problem and the fix; no
traceback (:class:`OneLineErrors`). ``densegrpo train`` stopped by SIGTERM or SIGINT exits
143 or 130 after writing a checkpoint (:mod:`densegrpo.run.preemption`). ``densegrpo COMMAND
--help`` documents every command.

Multi-process runs use the standard launchers, with no code change:
``torchrun --nproc_per_node=K -m densegrpo train CONFIG`` or
``accelerate launch --multi_gpu --num_processes K -m densegrpo train CONFIG``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

try:  # Typer >= 0.22 vendors its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older Typer on plain click
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError
from typer import Abort, Exit
from typer.core import TyperGroup

from densegrpo.contracts.errors import UserError
from densegrpo.run.preemption import Aborted, Preempted


def _exit_on_errors(run: Callable[[], Any]) -> Any:
    """Call ``run()``; a user error, a usage error or a stop by a signal ends the process with
    one line on stderr and its status: 2 for bad input, 128 + the signal's number for a stop."""
    try:
        return run()
    except NoArgsIsHelpError as error:
        typer.echo(error.ctx.get_help() if error.ctx else "densegrpo --help")
        sys.exit(0)
    except UsageError as error:
        command = error.ctx.command_path if error.ctx else "densegrpo"
        typer.echo(f"error: {error.format_message().rstrip('.')}; see `{command} --help`", err=True)
        sys.exit(2)
    except Exit as error:
        sys.exit(error.exit_code)
    except ClickException as error:
        typer.echo(f"error: {error.format_message()}", err=True)
        sys.exit(error.exit_code)
    except Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except UserError as error:
        message = " ".join(str(error).split())
        typer.echo(f"error: {message}", err=True)
        sys.exit(2)
    except (Preempted, Aborted) as stop:
        from densegrpo.method.distributed import launcher_rank

        if launcher_rank() == 0:  # every rank stops; one line is enough
            typer.echo(str(stop), err=True)
        sys.exit(stop.exit_status)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


class OneLineErrors(TyperGroup):
    """The top-level command. It answers user errors with one line and exit status 2 however
    the app is started: the console script, ``python -m densegrpo`` or typer's ``CliRunner``."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, windows_expand_args: bool = True, **extra: Any) -> Any:
        result = _exit_on_errors(lambda: super(OneLineErrors, self).main(
            args, prog_name, complete_var, standalone_mode=False, windows_expand_args=windows_expand_args, **extra
        ))
        if isinstance(result, int) and result:
            sys.exit(result)
        if standalone_mode:
            sys.exit(0)
        return result


app = typer.Typer(
    name="densegrpo",
    cls=OneLineErrors,
    help="GRPO alignment of flow-matching text-to-image models with sparse (Flow-GRPO) and dense (DenseGRPO) rewards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
config_app = typer.Typer(help="Show or validate run configurations.", no_args_is_help=True, rich_markup_mode=None)
bench_app = typer.Typer(help="Benchmarks that compare credit-assignment schemes.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")

KIND_HELP = "One of: policies, samplers, rewards, advantages, calibrators, hooks."
SET_HELP = "Override a config value, e.g. --set train.beta=0.01 --set iterations=5 (repeatable)."


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


@app.command()
def plugins(
    kind: Optional[str] = typer.Option(None, "--kind", "-k", help=KIND_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List every registered component: kind, name, package==version and target."""
    from densegrpo.contracts import registry

    rows = [
        {
            "kind": c.kind,
            "name": c.name,
            "package": f"{c.package}=={c.version}",
            "target": c.target,
            "builtin": c.builtin,
        }
        for c in registry.components(kind)
    ]
    if as_json:
        _echo_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="densegrpo components")
    for column in ("kind", "name", "package", "target"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["kind"], row["name"], row["package"], row["target"])
    Console().print(table)


@config_app.command("show")
def config_show(
    config: Optional[Path] = typer.Argument(None, help="A .yaml or .toml run config; omit for the default toy run."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of YAML."),
    describe: bool = typer.Option(False, "--describe", help="Write each option's description as a YAML comment above it."),
) -> None:
    """Print the resolved configuration (defaults, file, then --set overrides)."""
    from densegrpo.contracts import config as cfg

    resolved = cfg.resolve(config, overrides)
    if describe and not as_json:
        typer.echo(cfg.describe(resolved), nl=False)
        return
    typer.echo(cfg.dump(resolved, "json" if as_json else "yaml"))


@config_app.command("validate")
def config_validate(
    config: Path = typer.Argument(..., help="A .yaml or .toml run config."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Validate a config file, including every component's own options."""
    from densegrpo.contracts import config as cfg

    resolved = cfg.resolve(config, overrides)
    cfg.validate_components(resolved)
    typer.echo(f"{config}: valid")


@app.command()
def train(
    config: Optional[Path] = typer.Argument(None, help="Run config (.yaml/.toml); omit for the default toy DenseGRPO run."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: runs/<timestamp>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder from its latest checkpoint."),
    fallback: bool = typer.Option(
        False, "--fallback",
        help="With --resume: when the latest checkpoint is damaged (checked against its sha256 manifest), continue from the newest intact one instead of stopping.",
    ),
) -> None:
    """Train with GRPO; writes metrics.jsonl, checkpoints, sample grids and a reward curve.

    A run folder has one writer at a time (RUN_DIR/.lock); a second train into it exits 2. On
    --resume every checkpoint file is checked against the sha256 manifest written with it; a
    damaged checkpoint stops the run with one line, unless --fallback is given.

    SIGTERM or SIGINT (a scheduler's preemption, Ctrl-C) ends the iteration under way, writes a
    checkpoint, prints one line and exits 143 (SIGTERM) or 130 (SIGINT); --resume RUN_DIR then
    continues bit-identically. A second signal while stopping stops at once (no new checkpoint).
    Exit status 2: bad input (one line says what to fix).

    One process needs no launcher. For K processes (GPUs: NCCL, CPU: gloo) start the same command
    with a launcher; the global batch (group_size x groups_per_iteration) must divide by K:

    \b
      torchrun --nproc_per_node=K -m densegrpo train CONFIG --out DIR
      accelerate launch --multi_gpu --num_processes K -m densegrpo train CONFIG --out DIR
      # N nodes, run on each:
      torchrun --nnodes=N --nproc_per_node=K --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        -m densegrpo train CONFIG --out DIR

    accelerate's --multi_gpu is its torchrun launcher and also starts CPU processes (its --cpu
    with K > 1 goes through mpirun instead). --set train.data_parallel=fsdp shards weights for
    full fine-tuning (default ddp). See docs/distributed.md.
    """
    from densegrpo.method.distributed import launcher_rank
    from densegrpo.run.train import train_from_cli

    summary = train_from_cli(config, overrides, out, resume, fallback)
    if launcher_rank() == 0:  # under a launcher, rank 0 alone reports
        typer.echo(json.dumps(summary))


@app.command()
def calibrate(
    config: Optional[Path] = typer.Argument(None, help="Run config; omit for the default toy run."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: runs/calibrate-<timestamp>)."),
) -> None:
    """Run reward-aware calibration alone; writes psi per step and round (JSON) and a PNG."""
    from densegrpo.run.hooks.calibration import calibrate_from_cli

    path = calibrate_from_cli(config, overrides, out)
    typer.echo(str(path))


@app.command()
def sample(
    config: Optional[Path] = typer.Argument(None, help="Run config or run folder; omit to use --policy."),
    policy: Optional[str] = typer.Option(None, "--policy", help="Policy name, e.g. toy (instead of a config)."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Prompt text (repeatable)."),
    per_prompt: int = typer.Option(4, "--per-prompt", "-n", min=1, max=64, help="Images per prompt."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="ODE steps (default: the config's eval_steps, 40)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the initial noise."),
    out: Path = typer.Option(Path("grid.png"), "--out", help="Where to write the PNG grid."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Render images for prompts into a PNG grid (ODE sampling)."""
    from densegrpo.cli.sampling import sample_from_cli

    path = sample_from_cli(config, policy, prompt, per_prompt, steps, seed, out, overrides)
    typer.echo(str(path))


@app.command()
def score(
    images: list[Path] = typer.Argument(..., help="Image files (PNG/JPEG)."),
    reward: str = typer.Option(..., "--reward", "-r", help="Reward name, e.g. toy-geneval."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="One prompt for all images, or one per image."),
    metadata: Optional[str] = typer.Option(None, "--metadata", help="GenEval metadata: a JSON object, a JSON list (one per image), or a .json/.jsonl file."),
    reward_config: list[str] = typer.Option([], "--set", help="Reward option, e.g. --set mode=strict (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Score images with a reward model."""
    from densegrpo.cli.scoring import score_from_cli

    results = score_from_cli(images, reward, prompt, metadata, reward_config)
    if as_json:
        _echo_json(results)
    else:
        for row in results:
            typer.echo(f"{row['score']:.4f}\t{row['image']}\t{row['prompt']}")


@app.command("eval")
def evaluate(
    target: Optional[Path] = typer.Argument(None, help="Run config or run folder; omit for the base toy policy."),
    benchmark: str = typer.Option("toy-geneval", "--benchmark", "-b", help="Benchmark name, e.g. toy-geneval."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="ODE steps (default 40)."),
    per_prompt: int = typer.Option(4, "--per-prompt", "-n", min=1, help="Images per prompt."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Use only the first K prompts."),
    seed: int = typer.Option(0, "--seed", help="Seed for the initial noise."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Evaluate a policy (base or trained) on a benchmark; prints overall and per-tag scores."""
    from densegrpo.run.evaluate import evaluate_from_cli, format_report

    report = evaluate_from_cli(target, benchmark, steps, per_prompt, limit, seed, overrides)
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run folder written by `densegrpo train` (finished or still training)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the HTML page (default: RUN_DIR/report.html)."),
) -> None:
    """Print a run's summary table and write one HTML page with its curves, per-step diagnostics and latest sample grids."""
    from densegrpo.cli.report import report_from_cli

    typer.echo(str(report_from_cli(run_dir, out)))


@bench_app.command("sparse-vs-dense")
def bench_sparse_vs_dense(
    config: Optional[Path] = typer.Argument(None, help="A run configuration to compare the arms on (its own policy, rewards and sizes); default: the --world."),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="Seeds per arm (default 5, 10 in the lab world; 1 with --quick)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", min=1, help="GRPO iterations per run (default: the profile's, or CONFIG's own)."),
    reward: list[str] = typer.Option([], "--reward", help="Toy world: reward(s) to run on, repeatable (default: toy-geneval; add --reward toy-clip for the second toy reward)."),
    out: Path = typer.Option(Path("bench-sparse-vs-dense"), "--out", help="Output folder."),
    world: str = typer.Option("toy", "--world", help="Built-in world: toy (the toy text-to-image policy) or lab (the seconds-fast credit-assignment lab)."),
    quick: bool = typer.Option(False, "--quick", help="Smoke profile: 2 iterations (in the toy world also small batches; <= 5 min)."),
    arms: list[str] = typer.Option([], "--arm", help="Run only these arms (repeatable): a built-in arm's name, or your own as LABEL=ADVANTAGE[+CALIBRATOR] (registered names or module:attr; calibrator default uniform)."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Training runs in parallel processes (torch threads are split between them; one GPU each when there are GPUs)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the benchmark in this folder with the settings it was started with; finished runs are not redone."),
    report_only: bool = typer.Option(False, "--report-only", help="Only re-render report.md and the plots from OUT/results.json."),
) -> None:
    """Compare sparse and dense credit assignment; writes report.md, results.json and PNG curves."""
    from densegrpo.bench import rerender, run_sparse_vs_dense

    if report_only:
        typer.echo(str(rerender(out)))
        return
    if resume is not None:
        path = run_sparse_vs_dense(out=resume, workers=jobs, resume=True)
    else:
        path = run_sparse_vs_dense(seeds=seeds or (1 if quick else 10 if world == "lab" and config is None else 5), iterations=iterations, rewards=reward, out=out, quick=quick,
                                   arms=arms, workers=jobs, world=world, config=config)
    typer.echo(str(path))


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app (which ends the process with its exit status, see :class:`OneLineErrors`)."""
    app(args=argv, prog_name="densegrpo")


if __name__ == "__main__":
    main()
