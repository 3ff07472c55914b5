"""Monitor rewards (``logging.monitor_rewards``): rewards scored on the evaluation's images and
never trained on, paired with the base policy's images, and the reward-hacking warning.

Reward hacking shows as a trained reward that keeps rising while what it stood for falls
(grids and blur under an aesthetic reward: Flow-GRPO issues #92 and #233). A monitor is a
second reward that watches the same ODE images as ``eval_reward``; :func:`hacking` flags an
evaluation where the trained reward's paired gain is above ``+K`` standard errors while a
monitor's is below ``-K``.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from densegrpo.contracts.config import RewardSpec
from densegrpo.contracts.protocols import conform
from densegrpo.method.grpo import nanmean
from densegrpo.method.reward_scorer import WeightedReward, score_one
from densegrpo.run.build import build_rewards
from densegrpo.run.evaluate import load_scores, paired_gain, save_scores

MONITOR_BASE = "eval_monitor_base.json"
"""Per-image monitor scores of the untrained policy, by monitor label, kept for a resumed run."""
HACKING_KEY = "reward_hacking"
"""Metric of an evaluation that warned: the labels of the monitors that fell."""


class RewardHackingWarning(UserWarning):
    """The trained reward rose while a monitor reward fell, each beyond its standard error."""


def monitor_labels(specs: list[RewardSpec]) -> list[str]:
    """One metric-safe label per monitor: the reward's name (``module:attr`` -> ``attr``) with
    every other character than letters and digits as ``_``; a repeated name gets ``_2``, ``_3``."""
    labels: list[str] = []
    for spec in specs:
        base = re.sub(r"[^0-9A-Za-z]+", "_", spec.name.rsplit(":", 1)[-1]).strip("_").lower() or "reward"
        label, count = base, 1
        while label in labels:
            count += 1
            label = f"{base}_{count}"
        labels.append(label)
    return labels


@dataclass
class Monitors:
    """The run's monitor rewards, by label, and the base policy's scores of each."""

    rewards: dict[str, WeightedReward]
    base: dict[str, Tensor]

    @classmethod
    def build(cls, specs: list[RewardSpec]) -> "Monitors":
        rewards = build_rewards(specs)
        for reward in rewards:
            conform("rewards", reward.model)
        return cls(dict(zip(monitor_labels(specs), rewards)), {})

    def __bool__(self) -> bool:
        return bool(self.rewards)

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any] | None]) -> dict[str, Tensor]:
        """``(M,)`` float32 scores of every monitor for the evaluation ``images (M,3,H,W)``."""
        return {label: score_one(reward, images, prompts, metadata) for label, reward in self.rewards.items()}

    def record(self, scores: dict[str, Tensor]) -> dict[str, float]:
        """``monitor_<label>_reward`` and, against the base, ``_gain`` +- ``_gain_se`` (paired image by image)."""
        out: dict[str, float] = {}
        for label, values in scores.items():
            out[f"monitor_{label}_reward"] = nanmean(values)
            base = self.base.get(label)
            if base is not None and base.shape == values.shape:
                paired = paired_gain(base, values)
                out[f"monitor_{label}_gain"] = paired.gain
                out[f"monitor_{label}_gain_se"] = paired.se
        return out

    def base_record(self) -> dict[str, float]:
        """``monitor_<label>_reward_base`` of every monitor whose base scores are known."""
        return {f"monitor_{label}_reward_base": nanmean(base) for label, base in self.base.items()}

    def save_base(self, run_dir: Path) -> None:
        """Write the base scores (NaN as null) to ``run_dir/eval_monitor_base.json``, atomically."""
        save_scores(Path(run_dir) / MONITOR_BASE, self.base)

    def load_base(self, run_dir: Path) -> None:
        """Read back what :meth:`save_base` wrote; a monitor added on resume has no base (no gain)."""
        saved = load_scores(Path(run_dir) / MONITOR_BASE)
        if saved is not None:
            self.base = {label: values for label, values in saved.items() if label in self.rewards}


def logged_monitors(rows: list[dict[str, Any]]) -> list[str]:
    """Labels of the monitors (``monitor_<label>_reward``) metrics ``rows`` log, in first-seen order."""
    labels: list[str] = []
    for row in rows:
        for key in row:
            if key.startswith("monitor_") and key.endswith("_reward") and key[8:-7] not in labels:
                labels.append(key[8:-7])
    return labels


def monitor_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """For ``summary.json``: each monitor's base, final reward and final paired gain, and the
    iterations whose evaluation warned of reward hacking (empty without monitors)."""
    labels = logged_monitors(rows)
    if not labels:
        return {}
    out: dict[str, Any] = {}
    for label in labels:
        prefix = f"monitor_{label}"
        final = [r for r in rows if f"{prefix}_reward" in r][-1]
        out[f"{prefix}_reward_base"] = next((r[f"{prefix}_reward_base"] for r in rows if f"{prefix}_reward_base" in r), None)
        out[f"{prefix}_reward_final"] = final[f"{prefix}_reward"]
        out[f"{prefix}_gain_final"] = final.get(f"{prefix}_gain")
        out[f"{prefix}_gain_se_final"] = final.get(f"{prefix}_gain_se")
    out["reward_hacking_iterations"] = [r["iteration"] for r in rows if r.get(HACKING_KEY)]
    return out


def hacking(record: dict[str, Any], labels: list[str], k: float = 1.0) -> list[str]:
    """The monitors of ``labels`` that fell while the trained reward rose in one evaluation's
    ``record``: ``eval_gain > k * eval_gain_se`` and ``monitor_<label>_gain < -k * its _gain_se``."""
    gain, se = record.get("eval_gain"), record.get("eval_gain_se")
    if gain is None or se is None or not (math.isfinite(gain) and math.isfinite(se)) or gain <= k * se:
        return []
    fell = []
    for label in labels:
        m_gain, m_se = record.get(f"monitor_{label}_gain"), record.get(f"monitor_{label}_gain_se")
        if m_gain is not None and m_se is not None and math.isfinite(m_gain) and math.isfinite(m_se) and m_gain < -k * m_se:
            fell.append(label)
    return fell


def warn_hacking(record: dict[str, Any], fell: list[str]) -> None:
    """One :class:`RewardHackingWarning` naming the iteration, the trained gain and each fallen monitor."""
    falls = ", ".join(f"{label} {record[f'monitor_{label}_gain']:+.4f} ± {record[f'monitor_{label}_gain_se']:.4f}" for label in fell)
    warnings.warn(
        f"iteration {record['iteration']}: possible reward hacking: the trained reward rose (eval_gain "
        f"{record['eval_gain']:+.4f} ± {record['eval_gain_se']:.4f}) while monitor reward(s) fell: {falls}; look at "
        "the sample grids, and consider a larger train.beta (KL to the base) or an earlier checkpoint",
        RewardHackingWarning,
        stacklevel=2,
    )

