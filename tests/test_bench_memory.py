"""The memory benchmarks' own machinery (benchmarks/bench_memory.py, bench_memory_growth.py), on the CPU.

Independent truths: a tensor of known size allocated in a fresh process (the peak meter must read its
bytes, not an earlier, larger peak of the same process), closed-form lines (the extrapolation must
return them exactly), and the run configuration's own validation (the growth runs' overrides).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
MIB = 2**20


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_memory

    return bench_memory


METER_CHILD = """
import json, sys
sys.path.insert(0, {benchmarks!r})
import torch
from bench_memory import PeakMeter

meter = PeakMeter(torch.device("cpu"))
earlier = torch.ones(200 * 2**18)  # 200 MiB: this process's peak so far, then freed
del earlier
meter.start()
call = torch.ones(64 * 2**18)  # the measured call holds 64 MiB at its peak
peak = meter.stop()
del call
meter.start()
small = [torch.ones(2**18) for _ in range(24)]  # 24 blocks of 1 MiB
print(json.dumps([peak, meter.stop()]))
"""


def test_cpu_peak_meter_reads_the_call_not_the_process(bench):
    """The peak of a fresh process's call above what was live before it: 64 MiB, then 24 x 1 MiB, each
    within 4 MiB, although the process peaked at 200 MiB before either call (a plain ru_maxrss would say 200)."""
    code = METER_CHILD.format(benchmarks=str(BENCHMARKS))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": bench.MALLOC_MMAP_THRESHOLD}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    first, second = json.loads(done.stdout.strip().splitlines()[-1])
    # within 4 MiB either way: resident pages can also fall below what was allocated, when the machine's
    # proactive reclaim pages out a little of a process that waits under load (seen: 23.1 MiB for 24)
    assert 60 * MIB <= first <= 68 * MIB
    assert 20 * MIB <= second <= 28 * MIB


def test_line_fit_and_per_sample_extrapolation_recover_a_closed_form(bench):
    """Measurements made from ``bytes = lora_grads + samples * (a * tokens + b)`` (train) and ``c + samples
    * (a' * pixels)`` (decode): the per-sample model at 512 px must be the closed form's value at 1024 tokens."""
    a, b, lora = 3.0e6, 5.0e8, 1_000_000
    train = lambda latent, samples: 4 * lora + samples * (a * bench.image_tokens(latent) + b)
    forward = lambda latent, samples: 7.0e7 + samples * 2.0e6 * bench.image_tokens(latent)
    decode = lambda latent, samples: samples * 40.0 * (8 * latent) ** 2

    def result(phase, latent, samples, value, **spec):
        return {"spec": {"phase": phase, "latent": latent, "samples": samples, "checkpointing": False,
                         "vae_dtype": "float32", **spec}, "peak_bytes": value}

    results = [result("train", s, 1, train(s, 1)) for s in (16, 32)]
    results += [result("forward", 16, 1, forward(16, 1)), result("forward", 16, 2, forward(16, 2)),
                result("forward", 32, 1, forward(32, 1))]
    results += [result("decode", s, 1, decode(s, 1)) for s in (16, 32)]
    models = bench.per_sample_models(results, target_latent=64, lora_parameters=lora)
    assert models["train"].constant == pytest.approx(4 * lora)
    assert models["train"].per_sample == pytest.approx(a * 1024 + b)
    assert models["forward"].constant == pytest.approx(7.0e7)
    assert models["forward"].per_sample == pytest.approx(2.0e6 * 1024)
    assert models["decode-float32"].per_sample == pytest.approx(40.0 * 512**2)
    assert bench.line_fit([(1, 5), (3, 11), (2, 8)]) == pytest.approx((2.0, 3.0))
    # the largest count that fits a room: floor((room - constant) / per sample), and one more does not fit
    model = bench.PerSample(constant=10.0, per_sample=3.0, how="")
    assert model.largest(25.0) == 5 and model.at(5) <= 25.0 < model.at(6)


def test_recipe_sizing_fits_its_largest_settings_and_not_one_more(bench):
    """For every shipped SD3.5-M recipe: the largest micro_batch_size found fits the budget (static +
    stored + that micro-batch's call) and one more sample does not, unless it is the whole minibatch."""
    recipes = bench.load_recipes(bench.RECIPES)
    assert len(recipes) == 6
    models = {
        "train": bench.PerSample(1e8, 6e9, ""), "train-ckpt": bench.PerSample(1e8, 1.5e9, ""),
        "forward": bench.PerSample(0.0, 4e8, ""), "decode-float32": bench.PerSample(0.0, 8e8, ""),
        "decode-bfloat16": bench.PerSample(0.0, 4e8, ""), "eval": bench.PerSample(0.0, 9e8, ""),
    }
    counts = {"transformer": 2_243_171_520, "lora": 18_874_368, "vae": 83_819_683, "clip-l": 123_650_304,
              "clip-g": 694_659_840, "t5": 4_762_310_656}
    budget = 72 * bench.GIB
    for row in bench.recipe_rows(recipes, models, counts, gpus=8, budget=budget, target_latent=64, measured_eval_steps=1):
        base = sum(row["static"].values()) + sum(row["storage"].values())
        train = models["train-ckpt" if row["gradient_checkpointing"] else "train"]
        m = row["largest_micro_batch"]
        assert base + train.at(m) <= budget
        assert m == row["per_rank_minibatch"] or base + train.at(m + 1) > budget
        assert row["per_rank_samples"] == 144 and row["unset_peak"] >= row["peak"] - 1


def test_growth_runs_are_valid_run_configs_of_the_asked_batch(monkeypatch):
    """bench_memory_growth's overrides resolve to a RunConfig with a per-rank batch of B, the fixed
    micro-batch and chunk (or none), its own policy and reward by module:attr, one iteration."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from bench_memory_growth import overrides
    from densegrpo.contracts import config as cfg

    for batch, micro, chunk in ((4, 1, 2), (16, 1, 2), (16, None, None)):
        config = cfg.resolve(None, overrides(batch, micro, chunk, "cpu"))
        assert config.train.group_size * config.train.groups_per_iteration == batch
        assert (config.train.micro_batch_size, config.sampling.chunk_size) == (micro, chunk)
        assert config.train.minibatch_size == batch // 2 and config.iterations == 1
        assert config.policy.name == "bench_memory_growth:MidSD3" and config.advantage.name == "dense"
