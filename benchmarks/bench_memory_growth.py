"""Peak memory of one dense GRPO iteration as the per-rank batch grows 4x (issue 32).

A mid-size random SD3 built in code (:class:`MidSD3`: 3 joint blocks 384 wide, 16 latent channels,
32 x 32 latents = 256 image tokens decoded to 256 px by a small VAE, CFG 4.5, LoRA r 32 on Flow-GRPO's
targets) runs one DenseGRPO iteration (3 SDE steps, every state completed with n = t ODE steps and
scored, two optimizer steps) through the real loop: a ``RunConfig`` from ``--set`` overrides, then
:class:`densegrpo.run.state.Run` and :func:`densegrpo.run.train.train_step`. The policy and the reward
(:class:`Brightness`, free, so the memory is the policy's) are this module's, by ``module:attr``.

Per-rank batches ``B`` and ``4 B``, each twice: with ``train.micro_batch_size`` and ``sampling.chunk_size``
fixed, and with both unset (today's behaviour: every call on the whole batch). Every run is a fresh
process; it reports the peak above the memory just before the iteration (weights, optimizer, prompts:
what does not depend on the batch), as ``bench_memory.PeakMeter`` measures it (CPU: peak RSS, reset
before the iteration, with glibc returning freed blocks; CUDA: ``max_memory_allocated``), and the whole
process's peak RSS. What still grows at fixed settings is what the iteration must hold for every
sample (trajectories, dense estimates, prompt rows, rewards): a few MB a sample here.

Target: at fixed settings, peak(4 B) <= 1.25 x peak(B); exit status 1 when missed.

    python3 benchmarks/bench_memory_growth.py                     # B = 4 and 16, micro 1, chunk 2, CPU: ~5 min
    python3 benchmarks/bench_memory_growth.py --device cuda       # the same on a GPU

Writes ``growth.md``, ``growth.json`` and ``growth.png`` to ``--out`` (default
``benchmarks/results/memory``; ``growth-cuda.*`` for a CUDA run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from bench_memory import DEFAULT_OUT, MALLOC_MMAP_THRESHOLD, PeakMeter  # noqa: E402
from densegrpo.components.policies.sd3 import SD3Policy, tiny_clip_text  # noqa: E402
from pydantic import BaseModel, ConfigDict  # noqa: E402
from torch import Tensor  # noqa: E402

RESULT = "BENCH_MEMORY_GROWTH_RESULT "
GROWTH_LIMIT = 0.25
MIB = 2**20


def mid_sd3_components(seed: int = 0) -> dict[str, Any]:
    """Random mid-size SD3 components: the transformer of SD3.5's layout at 384 wide, 3 blocks (the first
    with SD3.5's second, image-only attention), 16 latent channels, patch 2; a 4-level VAE (factor 8);
    CLIP-L/G stand-ins 32 wide (joint_attention_dim 64) with 16-token tokenizers and no T5 (its zeros take
    the CLIP length: 32 text tokens), so the 256 image tokens dominate as at 512 px."""
    from densegrpo.contracts.tokenizers import clip_tokenizer
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=64,
            num_attention_heads=6, joint_attention_dim=64, caption_projection_dim=384, pooled_projection_dim=64,
            pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
        ).eval()
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 16, 32, 32), layers_per_block=1, latent_channels=16, norm_num_groups=8,
            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305,
        ).eval()
        text_encoder, text_encoder_2 = tiny_clip_text(seed + 2), tiny_clip_text(seed + 3)
    tokenizer = clip_tokenizer(16)
    return {
        "transformer": transformer, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer, "tokenizer_2": tokenizer, "text_encoder_3": None, "tokenizer_3": None,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }


class MidSD3(SD3Policy):
    """``sd3`` on :func:`mid_sd3_components` (``bench_memory_growth:MidSD3``): 256 px, 32 x 32 latents."""

    class Config(SD3Policy.Config):
        model: str | None = None
        resolution: int = 256
        max_sequence_length: int = 8

    def __init__(self, config: Config | None = None):
        super().__init__(config or self.Config(), components=mid_sd3_components(seed=0))


class Brightness:
    """Mean brightness of each image (``bench_memory_growth:Brightness``): free, so the memory measured is the policy's."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, config: Config | None = None):
        self.config = config or self.Config()

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[Any]) -> Tensor:
        """``images (N,3,H,W)`` float32 in [0,1] -> ``(N,)`` float32."""
        return images.float().mean(dim=(1, 2, 3))


def overrides(batch: int, micro_batch_size: int | None, chunk_size: int | None, device: str, group_size: int = 4) -> list[str]:
    """``--set`` overrides of one dense iteration at a per-rank ``batch`` (one process)."""
    null = lambda value: "null" if value is None else str(value)  # noqa: E731
    return [
        f"device={device}",
        "policy.name=bench_memory_growth:MidSD3",
        "rewards.0.name=bench_memory_growth:Brightness",
        "advantage.name=dense",
        "calibrator.name=uniform",
        "calibration.before_training=false",
        "sampling.num_steps=3",
        f"train.group_size={group_size}",
        f"train.groups_per_iteration={batch // group_size}",
        f"train.minibatch_size={batch // 2}",  # two optimizer steps per iteration, as the recipes
        f"train.micro_batch_size={null(micro_batch_size)}",
        f"sampling.chunk_size={null(chunk_size)}",
        "iterations=1",
        "checkpoint_every=0",
        "logging.eval_prompts=0",
        "logging.sample_prompts=0",
        "logging.train_eval_images_per_prompt=0",
        "logging.progress=false",
    ]


def child(spec: dict[str, Any]) -> None:
    """One iteration of ``spec`` in this process; prints one result line."""
    from densegrpo.contracts import config as cfg
    from densegrpo.method.distributed import World
    from densegrpo.run.state import Run
    from densegrpo.run.train import train_step

    torch.set_num_threads(spec["threads"])
    config = cfg.resolve(None, overrides(spec["batch"], spec["micro_batch_size"], spec["chunk_size"], spec["device"]))
    with tempfile.TemporaryDirectory() as folder:
        run = Run(config, Path(folder), World())
        meter = PeakMeter(run.policy.device)
        meter.start()
        started = time.perf_counter()
        record = train_step(run)
        peak = meter.stop()
    print(RESULT + json.dumps({
        "spec": spec, "peak_bytes": peak, "base_bytes": meter.base, "seconds": round(time.perf_counter() - started, 2),
        "process_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "reward_mean": record["reward_mean"], "nfe": record["nfe_rollout"] + record["nfe_dense"] + record["nfe_train"],
    }), flush=True)


def measure(specs: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MALLOC_MMAP_THRESHOLD, "PYTHONUNBUFFERED": "1"}
    results = []
    for index, spec in enumerate(specs, 1):
        label = f"B={spec['batch']} micro={spec['micro_batch_size']} chunk={spec['chunk_size']}"
        print(f"[{index}/{len(specs)}] {label} ...", flush=True)
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                              text=True, timeout=timeout)
        lines = [json.loads(line[len(RESULT):]) for line in done.stdout.splitlines() if line.startswith(RESULT)]
        if done.returncode or len(lines) != 1:
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise SystemExit(f"run failed ({label}), exit {done.returncode}:\n{tail}")
        result = lines[0]
        print(f"    peak {result['peak_bytes'] / MIB:.1f} MiB above {result['base_bytes'] / MIB:.0f} MiB; process peak "
              f"{result['process_peak_bytes'] / MIB:.0f} MiB; {result['seconds']:.0f} s", flush=True)
        results.append(result)
    return results


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per setting: the peaks at ``B`` and ``4 B`` and their growth."""
    rows = []
    settings = {(r["spec"]["micro_batch_size"], r["spec"]["chunk_size"]) for r in results}
    for micro, chunk in sorted(settings, key=lambda s: (s[0] is None, s)):
        runs = sorted((r for r in results if (r["spec"]["micro_batch_size"], r["spec"]["chunk_size"]) == (micro, chunk)),
                      key=lambda r: r["spec"]["batch"])
        small, large = runs[0], runs[-1]
        rows.append({
            "micro_batch_size": micro, "chunk_size": chunk, "batches": [small["spec"]["batch"], large["spec"]["batch"]],
            "peak_bytes": [small["peak_bytes"], large["peak_bytes"]],
            "process_peak_bytes": [small["process_peak_bytes"], large["process_peak_bytes"]],
            "seconds": [small["seconds"], large["seconds"]],
            "growth": large["peak_bytes"] / small["peak_bytes"] - 1,
            "process_growth": large["process_peak_bytes"] / small["process_peak_bytes"] - 1,
        })
    return rows


def markdown(data: dict[str, Any]) -> str:
    meta = data["meta"]
    lines = [
        f"# Peak memory of one dense iteration against the per-rank batch ({meta['device_name']})",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Measured {meta['date']}, torch {meta['torch']}, {meta['threads']} CPU threads. Mid-size random SD3 "
        "(`bench_memory_growth:MidSD3`: 3 joint blocks 384 wide, 256 image + 32 text tokens, CFG 4.5, LoRA r 32, "
        f"{meta['dtype']}), one DenseGRPO iteration (3 SDE steps, n = t completions, 2 optimizer steps) through "
        "`Run` + `train_step`, one process per row. Peak: above the memory just before the iteration "
        f"({meta['method']}); process: the whole process's peak RSS.",
        "",
        "| micro_batch_size | chunk_size | peak at B (MiB) | peak at 4B (MiB) | growth | process peak B / 4B (MiB) | seconds B / 4B |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in data["rows"]:
        b, b4 = row["batches"]
        lines.append(
            f"| {row['micro_batch_size'] or 'unset'} | {row['chunk_size'] or 'unset'} | {row['peak_bytes'][0] / MIB:.1f} (B={b}) | "
            f"{row['peak_bytes'][1] / MIB:.1f} (4B={b4}) | {100 * row['growth']:+.0f}% | "
            f"{row['process_peak_bytes'][0] / MIB:.0f} / {row['process_peak_bytes'][1] / MIB:.0f} | "
            f"{row['seconds'][0]:.0f} / {row['seconds'][1]:.0f} |"
        )
    verdict = data["fixed_growth"]
    lines += ["", f"At fixed settings the peak grows {100 * verdict:+.1f}% for a 4x batch: "
              f"{'within' if verdict <= GROWTH_LIMIT else '**over**'} the {100 * GROWTH_LIMIT:.0f}% target."]
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    for row in data["rows"]:
        label = (f"micro_batch_size {row['micro_batch_size']}, chunk_size {row['chunk_size']}"
                 if row["micro_batch_size"] or row["chunk_size"] else "unset (one call per batch)")
        axis.plot(row["batches"], [v / MIB for v in row["peak_bytes"]], "o-", label=f"{label}: {100 * row['growth']:+.0f}%")
    axis.set_xlabel("per-rank batch (samples)")
    axis.set_ylabel("peak above the loaded run (MiB)")
    axis.set_title("one dense iteration, mid-size SD3")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4, help="the smaller per-rank batch B (a multiple of 4); 4 B is the larger")
    parser.add_argument("--micro-batch-size", type=int, default=1, help="train.micro_batch_size of the fixed runs")
    parser.add_argument("--chunk-size", type=int, default=2, help="sampling.chunk_size of the fixed runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--out", type=Path, default=None, help=f"folder for growth.md/.json/.png (default {DEFAULT_OUT})")
    parser.add_argument("--from-json", type=Path, help="write the table and plot again from a saved growth.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        return write(data, args.out or args.from_json.parent)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch finds no CUDA GPU here; run on the CPU (--device cpu)")
    if args.batch % 4:
        raise SystemExit(f"--batch {args.batch} must be a multiple of 4 (groups of 4 samples)")
    specs = [
        {"batch": batch, "micro_batch_size": micro, "chunk_size": chunk, "device": args.device, "threads": args.threads}
        for micro, chunk in ((args.micro_batch_size, args.chunk_size), (None, None))
        for batch in (args.batch, 4 * args.batch)
    ]
    started = time.perf_counter()
    results = measure(specs, args.timeout)
    rows = summarise(results)
    fixed = next(r for r in rows if r["micro_batch_size"] is not None)
    meta = {
        "command": "python3 benchmarks/bench_memory_growth.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": args.threads, "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "CPU", "dtype": "float32",
        "method": "CUDA max_memory_allocated" if args.device == "cuda" else "peak RSS, VmHWM reset before the iteration",
        "seconds": round(time.perf_counter() - started, 1),
    }
    data = {"meta": meta, "results": results, "rows": rows, "fixed_growth": fixed["growth"], "limit": GROWTH_LIMIT}
    return write(data, args.out or DEFAULT_OUT)


def write(data: dict[str, Any], out: Path) -> int:
    """growth.md, .json and .png (``growth-cuda.*`` for a CUDA run) in ``out``; 1 when the target is missed."""
    out.mkdir(parents=True, exist_ok=True)
    stem = "growth" if data["meta"]["device"] == "cpu" else "growth-cuda"
    text = markdown(data)
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    plot(data, out / f"{stem}.png")
    print(text)
    print(f"wrote {out / stem}.md, .json and .png")
    return 0 if data["fixed_growth"] <= GROWTH_LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
