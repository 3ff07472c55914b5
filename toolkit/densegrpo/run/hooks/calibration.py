"""Reward-aware calibration (DenseGRPO Algorithm 1): rounds before training, and online
updates from the iterations the run plans as calibrating (``calibration.online_every``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from tqdm.auto import tqdm

from densegrpo.contracts import config as cfg
from densegrpo.contracts.errors import UserError
from densegrpo.method.grpo import dense_gain_stats, rollout
from densegrpo.method.noise import generator_for
from densegrpo.method.rewarding import CALIBRATION_PLAN, score
from densegrpo.run import plots
from densegrpo.run.batches import CALIBRATION_STREAM
from densegrpo.run.runs import default_run_dir

if TYPE_CHECKING:
    from densegrpo.run.state import Run

HISTORY = "calibration.jsonl"


def calibrate(run: "Run", log: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """The calibrator's rounds: ``samples_per_round`` fresh-prompt SDE rollouts each, their dense
    gains, one ``update``; stops early once the calibrator has ``converged``. Adds the rounds'
    NFE to ``run.totals["nfe_calibration"]``; returns one entry per round."""
    calibrator = run.parts.calibrator
    samples = calibrator.samples_per_round or run.global_batch
    samples -= samples % run.world.world_size
    history = []
    for round_index in range(calibrator.calibration_rounds):
        noise_level = calibrator.noise_level(run.sigmas)
        batch = run.batches.draw(round_index, CALIBRATION_STREAM, groups=samples, group_size=1, same_noise=False)
        generator = generator_for(run.config.seed, CALIBRATION_STREAM, round_index)
        chunk_size = run.config.sampling.chunk_size
        traj = rollout(run.policy, run.parts.sampler, batch, run.sigmas, noise_level, generator, chunk_size=chunk_size)
        scores = score(run.policy, traj, run.scorer(batch), CALIBRATION_PLAN, run.world, 1, 1.0, chunk_size=chunk_size)
        run.totals["nfe_calibration"] += int(run.world.sum(traj.num_samples * traj.num_steps)) + scores.nfe_calibration
        calibrator.update(scores.calibration_stats(run.sigmas, noise_level))
        entry = {
            "round": round_index,
            "noise_level_used": [round(float(v), 6) for v in noise_level],
            "noise_level_next": [round(float(v), 6) for v in calibrator.noise_level(run.sigmas)],
            "reward_mean": float(np.nanmean(scores.terminal.numpy())),
            **dense_gain_stats(scores.dense),
        }
        history.append(entry)
        if log is not None:
            log(entry)
        if calibrator.converged:
            break
    return history


class CalibrationHook:
    """Runs the calibration rounds before a fresh run's first iteration (``calibration.before_training``),
    writing ``calibration.jsonl`` and ``calibration.png``; afterwards feeds the calibrator the
    gains of every calibrating iteration."""

    def before_training(self, run: "Run") -> None:
        calibrator = run.parts.calibrator
        if run.iteration or not run.config.calibration.before_training or calibrator.calibration_rounds == 0:
            return
        path = run.run_dir / HISTORY
        if run.world.is_main and path.exists():
            path.unlink()

        def log(entry: dict[str, Any]) -> None:
            if run.world.is_main:
                with open(path, "a", encoding="utf-8") as stream:
                    stream.write(json.dumps(entry) + "\n")

        started = time.perf_counter()
        history = calibrate(run, log)
        run.totals["wall_s"] += time.perf_counter() - started
        if run.world.is_main and history:
            plots.plot_calibration(history, run.run_dir / "calibration.png", uniform=calibrator.uniform_level)

    def after_iteration(self, run: "Run", record: dict[str, Any]) -> None:
        result = run.result
        if result is not None and run.calibrating(record["iteration"]):
            run.parts.calibrator.update(result.scores.calibration_stats(run.sigmas, result.noise_level))

    def after_training(self, run: "Run", summary: dict[str, Any]) -> None:
        pass


def calibrate_from_cli(config_path: Path | None, overrides: list[str], out: Path | None) -> Path:
    """``densegrpo calibrate``: the rounds alone; writes ``calibration.json`` and ``calibration.png``."""
    from densegrpo.run.state import Run

    config = cfg.resolve(config_path, overrides)
    run_dir = Path(out) if out else default_run_dir("calibrate-")
    run_dir.mkdir(parents=True, exist_ok=True)
    run = Run(config, run_dir)
    calibrator = run.parts.calibrator
    rounds = calibrator.calibration_rounds
    if rounds == 0:
        raise UserError(f"calibrator '{config.calibrator.name}' has no calibration rounds; use --set calibrator.name=reward-aware")
    progress = tqdm(total=rounds, desc="calibration", unit="round", disable=not config.logging.progress)

    def log(entry: dict[str, Any]) -> None:
        progress.update(1)
        progress.set_postfix(psi_mean=f"{np.mean(entry['noise_level_next']):.3f}")

    history = calibrate(run, log)
    progress.close()
    result = {
        "sigmas": [float(s) for s in run.sigmas],
        "rounds": history,
        "psi": history[-1]["noise_level_next"] if history else None,
        "converged": bool(calibrator.converged),
        "nfe": run.totals["nfe_calibration"],
    }
    path = run_dir / "calibration.json"
    path.write_text(json.dumps(result, indent=2), encoding="utf-8")
    plots.plot_calibration(history, run_dir / "calibration.png", uniform=calibrator.uniform_level)
    return path
