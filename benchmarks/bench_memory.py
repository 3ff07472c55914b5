"""Measured peak memory of SD3.5-Medium's training and sampling calls, and what fits on an 80 GB GPU (issue 32).

Builds the SD3.5-Medium transformer (``SD3Transformer2DModel``, 2.24 B parameters) and VAE
(``AutoencoderKL``) from their published configs (stabilityai/stable-diffusion-3.5-medium,
``transformer/config.json`` and ``vae/config.json``, copied below) with random weights, no download,
wraps them in the toolkit's own ``sd3`` policy (LoRA r 32 on Flow-GRPO's targets, the recipe's dtype,
autocast, CFG and VAE dtype) and measures the peak memory of one call of each kind the loop makes:

* ``train``: one training micro-batch, through :func:`densegrpo.method.grpo.update_policy` (the
  log-prob forward with gradients, the KL reference pass, the backward, the optimizer step), with
  and without ``gradient_checkpointing``;
* ``forward``: one no-grad model call (a rollout chunk, a dense-completion chunk, an evaluation
  step: all are ``policy.velocity`` on ``chunk`` samples, ``2 x chunk`` rows with CFG);
* ``decode``: one VAE decode chunk (``policy.decode``), in float32 and in bfloat16;
* ``eval``: one evaluation chunk, :func:`densegrpo.run.evaluate.generate` (ODE steps, then the decode).

Prompt encodings are random tensors of the real encoders' shapes (77 CLIP + ``max_sequence_length`` T5
tokens, 4096 wide; pooled 2048): the text encoders run once per distinct prompt, frozen, and their
weights are counted apart. A "sample" is one image: with CFG it is two rows inside the model.

How it measures. Every measurement runs in a fresh process (``--child``). On the CPU: peak resident
memory (Linux ``VmHWM``) of the call minus the resident memory just before it (the loaded weights and
the call's inputs); the peak is reset right before the call (``/proc/self/clear_refs``), and glibc is
told to return every freed block of 64 KiB or more to the system (``MALLOC_MMAP_THRESHOLD_``), so the
resident set follows the live tensors instead of a heap that keeps what was freed. On CUDA:
``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the call (tensors only: the CUDA
context, NCCL buffers and the caching allocator's slack come on top; ``--headroom-gib`` keeps room for them).

At 512 px (64 x 64 latents, 1024 image tokens + 205 text tokens) one full-size forward of one sample with
CFG takes about a minute on 2 CPU cores, and a training micro-batch several, so the CPU run measures the
transformer calls at full width and depth on fewer image tokens (16 x 16 and 32 x 32 latents: 64 and 256
tokens, with the full 205 text tokens) and extrapolates linearly in image tokens to 1024. Linear because
every activation of a transformer block is ``tokens x width`` (the text stream's share is fixed), and
attention's ``tokens^2`` scores are never stored: PyTorch's scaled_dot_product_attention runs its flash
kernel on the CPU (bfloat16 and float32, forward and backward) and flash or memory-efficient kernels on a
GPU in bfloat16, both linear in memory. The decode is measured at 128 and 256 px and extrapolated linearly
in pixels (every feature map is ``pixels x channels``; the mid-block attention uses the same kernels). The
evaluation chunk is measured directly at 512 px on one ODE step (its trajectory's extra 39 steps are
added from their shapes): it checks both extrapolations, since it holds a full-size forward and a 512 px
decode. On CUDA everything is measured at 512 px directly, and at the smaller sizes too, to show how far
the CPU's extrapolation lands from the measurement.

From these numbers it computes each shipped SD3.5-M recipe's (``configs/recipes/*sd35m*.yaml``) per-GPU
peak on ``--gpus`` GPUs of ``--gpu-gib`` GiB: static weights, the iteration's stored tensors (counted from
their shapes), and the largest call, with the recipe's ``train.micro_batch_size`` and
``sampling.chunk_size``, with both unset (today's one-call-for-everything behaviour), and the largest
values of the two that fit.

    python3 benchmarks/bench_memory.py                    # the CPU run, ~10-15 min on 2 cores, 13 processes
    python3 benchmarks/bench_memory.py --device cuda      # on a GPU: every size measured directly, ~3 min
    python3 benchmarks/bench_memory.py --from-json benchmarks/results/memory/memory.json   # tables again
    python3 benchmarks/bench_memory.py --quick --out /tmp/m   # a tiny model, seconds: checks the harness

Writes ``memory.md`` (the tables), ``memory.json`` (every measurement) and ``memory.png`` to ``--out``
(default ``benchmarks/results/memory``; ``memory-cuda.*`` for a CUDA run).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "memory"
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*sd35m*.yaml"))
GIB = 2**30
RESULT = "BENCH_MEMORY_RESULT "
MALLOC_MMAP_THRESHOLD = "65536"
"""Bytes from which glibc serves an allocation with its own mmap and unmaps it on free (setting it also
stops glibc from raising the threshold as it sees large frees), so freed tensors leave the resident set."""

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (diffusers layout).
SD35M_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
}
# stabilityai/stable-diffusion-3.5-medium, vae/config.json (the SD3 VAE: 16 latent channels, factor 8).
SD35M_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "latent_channels": 16, "norm_num_groups": 32, "act_fn": "silu", "sample_size": 1024, "scaling_factor": 1.5305,
    "shift_factor": 0.0609, "force_upcast": True, "use_quant_conv": False, "use_post_quant_conv": False,
}
# --quick: the same layout, tiny (seconds per measurement); for checking the harness, not for numbers.
QUICK_TRANSFORMER: dict[str, Any] = {
    **SD35M_TRANSFORMER, "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 4,
    "joint_attention_dim": 64, "caption_projection_dim": 64, "pooled_projection_dim": 32, "pos_embed_max_size": 32,
    "dual_attention_layers": [0],
}
QUICK_VAE: dict[str, Any] = {**SD35M_VAE, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 8}
# The decode children need only a transformer whose latent fits the VAE: this one costs nothing.
STUB_TRANSFORMER: dict[str, Any] = QUICK_TRANSFORMER

CLIP_TOKENS = 77
"""CLIP-L/G tokens per prompt in SD3's encode_prompt (their tokenizer_max_length); T5 adds max_sequence_length."""


@dataclass(frozen=True)
class Model:
    """The transformer and VAE a run measures and the latent side that is 512 px."""

    name: str
    transformer: dict[str, Any]
    vae: dict[str, Any]
    target_latent: int


MODELS = {
    "sd3.5-medium": Model("sd3.5-medium", SD35M_TRANSFORMER, SD35M_VAE, 64),
    "quick": Model("quick", QUICK_TRANSFORMER, QUICK_VAE, 16),
}

# Text encoders of SD3 (counted on the meta device, never run): the published configs of
# openai/clip-vit-large-patch14, laion/CLIP-ViT-bigG-14-laion2B-39B-b160k and google/t5-v1_1-xxl.
CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768}
CLIP_G = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
          "num_attention_heads": 20, "max_position_embeddings": 77, "projection_dim": 1280}
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "feed_forward_proj": "gated-gelu"}

REWARD_WEIGHTS = {
    # published sizes, not measured here; activations of the reward models are not counted either
    "pickscore": (0.99e9, "PickScore_v1 = CLIP ViT-H/14, ~0.99 B parameters"),
    "geneval": (0.50e9, "Mask2Former Swin-S (~69 M) + CLIP ViT-L/14 (~428 M)"),
    "ocr": (0.0, "PP-OCRv5 runs on onnxruntime's CPU provider"),
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
EVAL_CHUNK_UNSET = 64
"""Rows per call of :func:`densegrpo.run.evaluate.generate` when ``sampling.chunk_size`` is unset."""
DENSE_CHUNK_UNSET = 256
"""The dense-reward engine's rows per model call and per decode when ``sampling.chunk_size`` is unset."""


# ---------------------------------------------------------------------------------------------- measuring
class PeakMeter:
    """Peak memory of one call above what was live when it started.

    CPU: the process's peak resident set (``VmHWM``), reset by writing 5 to ``/proc/self/clear_refs``
    right before the call, minus the resident set then (``VmRSS``). CUDA: ``max_memory_allocated`` after
    ``reset_peak_memory_stats``, minus ``memory_allocated`` before the call.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError as error:  # not Linux, or a kernel without it: the peak would include the build
            raise SystemExit(f"cannot reset the peak resident set ({error}); the CPU measurement needs Linux /proc") from None
        self.base = proc_status("VmRSS")

    def stop(self) -> int:
        """Bytes above the start's at the peak."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return proc_status("VmHWM") - self.base


def proc_status(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


@contextlib.contextmanager
def skipped_init() -> Iterator[None]:
    """Build modules without their random init (``Linear`` and ``Conv2d`` weights are ``torch.empty``):
    a kaiming draw of 2.24 B bfloat16 weights takes ~25 s on 2 cores; :func:`fill_random` then writes them."""
    saved = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Conv2d)}
    for cls in saved:
        cls.reset_parameters = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        for cls, method in saved.items():
            cls.reset_parameters = method  # type: ignore[method-assign]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create floating tensors in ``dtype``: the weights are born bfloat16, never a float32 copy twice as large."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def fill_random(module: nn.Module, seed: int) -> None:
    """Write every parameter from a tiled pool of N(0, 0.02) values (values do not change memory; each
    page is written, so the weights are resident as loaded ones are)."""
    generator = torch.Generator().manual_seed(seed)
    pool_cpu = torch.randn(1 << 22, generator=generator) * 0.02
    pools: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
    with torch.no_grad():
        for param in module.parameters():
            key = (param.device, param.dtype)
            if key not in pools:
                pools[key] = pool_cpu.to(param.device, param.dtype)
            pool, flat = pools[key], param.view(-1)
            for start in range(0, flat.numel(), pool.numel()):
                count = min(pool.numel(), flat.numel() - start)
                flat[start:start + count].copy_(pool[:count])


def cuda_autocast_rules_on_cpu() -> None:
    """Give ``layer_norm`` CUDA's autocast rule on the CPU too.

    CUDA's autocast runs ``layer_norm`` in float32 (its inputs cast up, its output float32: it is on the
    float32 list of torch's autocast op reference); the CPU's runs it in bfloat16. SD3's blocks normalise
    each stream twice, and the normalised activations are saved for the backward, so on the CPU they
    would be saved at half a GPU's size. Every other op SD3 runs under autocast (linear, matmul, conv,
    scaled_dot_product_attention: bfloat16; RMSNorm: float32 by diffusers' own casts) already gets the
    same dtype on both."""
    original = torch.nn.functional.layer_norm

    def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):  # noqa: A002 (torch's names)
        if torch.is_autocast_enabled("cpu") and input.dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", enabled=False):
                return original(input.float(), normalized_shape, None if weight is None else weight.float(),
                                None if bias is None else bias.float(), eps)
        return original(input, normalized_shape, weight, bias, eps)

    torch.nn.functional.layer_norm = layer_norm


def build_transformer(config: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """A random ``SD3Transformer2DModel`` of ``config``, built on ``device`` in ``dtype`` (buffers too, as
    ``from_pretrained(torch_dtype=...)`` leaves them)."""
    from diffusers import SD3Transformer2DModel

    with torch.device(device), default_dtype(dtype), skipped_init():
        model = SD3Transformer2DModel(**config)
    fill_random(model, seed)
    return model.to(device, dtype).eval()


def build_vae(config: dict[str, Any], device: torch.device, seed: int) -> nn.Module:
    """A random ``AutoencoderKL`` of ``config`` in float32 (the policy casts it to its ``vae_dtype``)."""
    from diffusers import AutoencoderKL

    with torch.device(device), skipped_init():
        vae = AutoencoderKL(**config)
    fill_random(vae, seed)
    return vae.eval()


def recipe_shaped_policy_class() -> type:
    """``RecipeShapedSD3``, defined on first use so that importing this module does not import diffusers."""
    from densegrpo.components.policies.adapter import PromptCache
    from densegrpo.components.policies.sd3 import SD3Policy
    from densegrpo.contracts.protocols import Cond

    class RecipeShapedSD3(SD3Policy):
        """``sd3`` whose prompt encodings are random tensors of the real encoders' shapes:
        ``prompt_embeds (1, 77 + max_sequence_length, joint_attention_dim)`` and ``pooled_embeds (1,
        pooled_projection_dim)`` per prompt, in the policy's dtype, through the policy's own prompt cache
        (CPU, moved to the device per call). Everything else is :class:`SD3Policy` as the recipes build it."""

        def __init__(self, config: Any, components: dict[str, Any]):
            super().__init__(config, components=components)
            width = int(components["transformer"].config.joint_attention_dim)
            pooled = int(components["transformer"].config.pooled_projection_dim)
            tokens = CLIP_TOKENS + config.max_sequence_length

            def random_encoding(prompts: list[str]) -> Cond:
                generator = torch.Generator().manual_seed(zlib.crc32(prompts[0].encode()))
                return Cond(
                    prompt_embeds=torch.randn(1, tokens, width, generator=generator).to(self.dtype),
                    pooled_embeds=torch.randn(1, pooled, generator=generator).to(self.dtype),
                    prompts=list(prompts),
                )

            self.shaped_prompts = PromptCache(random_encoding, config.prompt_cache_size, self.device)

        def encode(self, prompts: list[str]) -> Cond:
            return self.shaped_prompts(list(prompts), self.config.negative_prompt if self.guidance_on else None)

    return RecipeShapedSD3


def build_policy(spec: dict[str, Any]) -> Any:
    """The ``sd3`` policy a measurement runs: the model's transformer (a stub for a decode alone) and VAE,
    the recipe's policy options, ``resolution = 8 x latent``."""
    from densegrpo.components.policies.sd3 import tiny_clip_text
    from densegrpo.contracts.tokenizers import clip_tokenizer
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = MODELS[spec["model"]]
    device = torch.device(spec["device"])
    options = dict(spec["policy"])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[options.get("dtype", "float32")]
    transformer_config = STUB_TRANSFORMER if spec["phase"] == "decode" else model.transformer
    tokenizer = clip_tokenizer(77)
    components = {
        "transformer": build_transformer(transformer_config, device, dtype, seed=0),
        "vae": build_vae(model.vae, device, seed=1),
        # never run (encode is replaced): only the pipeline object that the policy builds needs them
        "text_encoder": tiny_clip_text(2), "text_encoder_2": tiny_clip_text(3),
        "tokenizer": tokenizer, "tokenizer_2": tokenizer, "text_encoder_3": None, "tokenizer_3": None,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }
    options.update(
        model=None, device=str(device), resolution=8 * spec["latent"], text_encoder_device="cpu",
        gradient_checkpointing=spec.get("checkpointing", False), vae_dtype=spec.get("vae_dtype") or options.get("vae_dtype"),
    )
    cls = recipe_shaped_policy_class()
    torch.manual_seed(0)  # peft draws LoRA-A from the global generator
    return cls(cls.Config(**options), components)


def prompts_for(count: int) -> list[str]:
    return [f"prompt {i}" for i in range(count)]


def measure_train(policy: Any, spec: dict[str, Any], meter: PeakMeter) -> dict[str, Any]:
    """One training micro-batch of ``samples`` samples through ``update_policy``: one trained step
    (step 0 of a 10-step grid; every step costs the same), one forward with gradients, the KL reference
    pass, the backward, the gradient clip and the AdamW step. AdamW's states exist already (one warm-up
    step with zero gradients), as in any step after the first; the LoRA gradients are allocated inside."""
    from densegrpo.components.samplers.flow_sde import FlowSDESampler, flow_sde_step_std, flow_sde_std_t
    from densegrpo.contracts.config import TrainConfig
    from densegrpo.contracts.protocols import Trajectory
    from densegrpo.method.distributed import DataParallel, World
    from densegrpo.method.grpo import Learner, update_policy
    from densegrpo.method.sigmas import make_sigmas

    samples, steps, device = spec["samples"], 10, policy.device
    sigmas = make_sigmas(steps, 3.0)
    noise_level = torch.full((steps,), 0.7)
    shape = (samples, *policy.latent_shape)
    generator = torch.Generator().manual_seed(0)
    trained = torch.zeros(samples, steps, dtype=torch.bool)
    trained[:, 0] = True
    traj = Trajectory(
        latents=torch.randn(samples, steps + 1, *shape[1:], generator=generator).to(device),
        log_probs=torch.zeros(samples, steps, device=device),
        means=torch.randn(samples, steps, *shape[1:], generator=generator).to(device),
        velocities=torch.randn(samples, steps, *shape[1:], generator=generator).to(device),
        sigmas=sigmas.to(device),
        noise_level=noise_level.to(device),
        step_std=flow_sde_step_std(sigmas, noise_level).to(device),
        trained_steps=trained.to(device),
        cond=policy.encode(prompts_for(samples)),
        std_t=flow_sde_std_t(sigmas, noise_level).to(device),
    )
    train = TrainConfig(**{**spec["train"], "minibatch_size": 0, "micro_batch_size": None, "shuffle_minibatches": False})
    parameters = policy.trainable_parameters()
    optimizer = torch.optim.AdamW(parameters, lr=train.learning_rate, betas=tuple(train.adam_betas), weight_decay=train.weight_decay)
    for param in parameters:  # AdamW's states, as after the first step
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    learner = Learner(policy, FlowSDESampler(), None, optimizer, DataParallel(World()), train, sigmas)  # type: ignore[arg-type]
    advantages = torch.ones(samples, steps)
    meter.start()
    update_policy(learner, traj, advantages)
    return {"peak_bytes": meter.stop(), "lora_parameters": sum(p.numel() for p in parameters)}


def measure_forward(policy: Any, spec: dict[str, Any], meter: PeakMeter) -> dict[str, Any]:
    """One no-grad ``policy.velocity`` call on ``samples`` samples (a rollout, dense or evaluation chunk)."""
    samples = spec["samples"]
    x = torch.randn(samples, *policy.latent_shape, generator=torch.Generator().manual_seed(0)).to(policy.device)
    sigma = torch.full((samples,), 0.5, device=policy.device)
    cond = policy.encode(prompts_for(samples))
    meter.start()
    with torch.no_grad():
        policy.velocity(x, sigma, cond)
    return {"peak_bytes": meter.stop()}


def measure_decode(policy: Any, spec: dict[str, Any], meter: PeakMeter) -> dict[str, Any]:
    """One ``policy.decode`` of ``samples`` latents to ``(samples, 3, 8 latent, 8 latent)`` images."""
    x0 = torch.randn(spec["samples"], *policy.latent_shape, generator=torch.Generator().manual_seed(0)).to(policy.device)
    meter.start()
    policy.decode(x0)
    return {"peak_bytes": meter.stop()}


def measure_eval(policy: Any, spec: dict[str, Any], meter: PeakMeter) -> dict[str, Any]:
    """One evaluation chunk: ``generate`` of ``samples`` prompts in one chunk, ``eval_steps`` ODE steps."""
    from densegrpo.run.evaluate import generate

    prompts = prompts_for(spec["samples"])
    policy.encode(prompts)  # the encodings are cached, as after the first evaluation
    meter.start()
    generate(policy, prompts, spec["eval_steps"], 3.0, seed=0, chunk_size=spec["samples"])
    return {"peak_bytes": meter.stop()}


MEASURES = {"train": measure_train, "forward": measure_forward, "decode": measure_decode, "eval": measure_eval}


def child(specs: list[dict[str, Any]]) -> None:
    """Run ``specs`` in this process, one policy built per :func:`build_key` (the previous one freed
    first), and print one result line each."""
    torch.set_num_threads(specs[0]["threads"])
    if specs[0]["device"] == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the recipes' tf32: true
        torch.backends.cudnn.allow_tf32 = True
    else:
        cuda_autocast_rules_on_cpu()
    policy, key, built, counts = None, None, 0.0, {}
    for spec in specs:
        if build_key(spec) != key:
            policy = None
            gc.collect()
            if spec["device"] == "cuda":
                torch.cuda.empty_cache()
            started = time.perf_counter()
            policy, key = build_policy(spec), build_key(spec)
            built = time.perf_counter() - started
            counts = {
                "transformer_parameters": sum(p.numel() for p in policy.transformer.parameters() if not p.requires_grad),
                "vae_parameters": sum(p.numel() for p in policy.pipeline.vae.parameters()),
            }
        meter = PeakMeter(policy.device)
        started = time.perf_counter()
        result = MEASURES[spec["phase"]](policy, spec, meter)
        result.update(spec=spec, seconds=round(time.perf_counter() - started, 2), build_seconds=round(built, 2),
                      base_bytes=meter.base, process_peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      **counts)
        if spec["device"] == "cuda":
            result["device_name"] = torch.cuda.get_device_name(policy.device)
        print(RESULT + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------- the plan
def load_recipes(paths: list[Path]) -> dict[str, Any]:
    """``{name: RunConfig}`` of the recipes (validated; their components are not loaded)."""
    from densegrpo.contracts import config as cfg

    return {path.stem: cfg.resolve(path) for path in paths}


def measured_policy_options(recipes: dict[str, Any]) -> dict[str, Any]:
    """The policy options the measurements use: the recipes', which must agree on everything that
    changes memory (dtype, autocast, CFG, LoRA, T5 length)."""
    keys = ("dtype", "autocast", "guidance_scale", "negative_prompt", "cfg_during_training", "lora", "max_sequence_length")
    options = [{k: r.policy.config.get(k) for k in keys if k in r.policy.config} for r in recipes.values()]
    if any(o != options[0] for o in options):
        raise SystemExit("the SD3.5-M recipes differ in " + ", ".join(sorted({k for o in options for k in o if o[k] != options[0].get(k)}))
                         + "; measure them one at a time (--recipes)")
    return options[0]


def plan(device: str, quick: bool, policy: dict[str, Any], train: dict[str, Any], recipe_vae: str, eval_steps: int,
         threads: int) -> list[dict[str, Any]]:
    """The measurements of a run: every dict is one call to measure."""
    model = MODELS["quick" if quick else "sd3.5-medium"]
    target = model.target_latent
    small = (target // 4, target // 2)
    base = {"model": model.name, "device": device, "policy": policy, "train": train, "threads": threads,
            "checkpointing": False, "vae_dtype": recipe_vae, "eval_steps": 1}
    specs: list[dict[str, Any]] = []
    cuda = device == "cuda"
    latents = (*small, target) if cuda else small
    for latent in latents:
        for samples in ((1, 2) if cuda else (1,)):
            for checkpointing in (False, True):
                specs.append({**base, "phase": "train", "latent": latent, "samples": samples, "checkpointing": checkpointing})
        for samples in ((1, 2, 4) if cuda else ((1, 2) if latent == small[0] else (1,))):
            specs.append({**base, "phase": "forward", "latent": latent, "samples": samples})
    for vae in ("float32", "bfloat16"):
        for latent in latents:
            for samples in ((1, 2, 4) if cuda and latent == target else (1,)):
                specs.append({**base, "phase": "decode", "latent": latent, "samples": samples, "vae_dtype": vae})
    for samples in ((1, 4) if cuda else (1,)):
        specs.append({**base, "phase": "eval", "latent": target, "samples": samples, "eval_steps": eval_steps if cuda else 1})
    return specs


def build_key(spec: dict[str, Any]) -> str:
    """Measurements that can share one built policy."""
    transformer = "stub" if spec["phase"] == "decode" else spec["model"]
    return json.dumps([transformer, spec["latent"], spec["checkpointing"], spec["vae_dtype"]])


def run_children(specs: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
    """On the CPU every measurement in a fresh process, one at a time (a process's heap and peak cannot be
    trusted twice); on CUDA all in one process (``max_memory_allocated`` can), grouped by shared build."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MALLOC_MMAP_THRESHOLD, "PYTHONUNBUFFERED": "1"}
    if specs and specs[0]["device"] == "cuda":
        groups = [sorted(specs, key=build_key)]
    else:
        groups = [[spec] for spec in specs]
    results = []
    for index, group in enumerate(groups, 1):
        names = ", ".join(describe(s) for s in group) if len(group) < 4 else f"{len(group)} measurements"
        print(f"[{index}/{len(groups)}] {names} ...", flush=True)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(group)], env=env, capture_output=True,
                              text=True, timeout=timeout)
        lines = [json.loads(line[len(RESULT):]) for line in done.stdout.splitlines() if line.startswith(RESULT)]
        if done.returncode or len(lines) != len(group):
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise SystemExit(f"measurement failed ({names}), exit {done.returncode}:\n{tail}")
        for line in lines:
            print(f"    {describe(line['spec'])}: {line['peak_bytes'] / GIB:.3f} GiB above {line['base_bytes'] / GIB:.2f} GiB "
                  f"({line['seconds']:.0f} s)", flush=True)
        print(f"    process: {time.perf_counter() - started:.0f} s", flush=True)
        results.extend(lines)
    return results


def describe(spec: dict[str, Any]) -> str:
    extra = {"train": " ckpt" if spec["checkpointing"] else "", "decode": f" {spec['vae_dtype']}",
             "eval": f" {spec['eval_steps']} step(s)", "forward": ""}[spec["phase"]]
    return f"{spec['phase']}{extra} {spec['samples']}x{8 * spec['latent']}px"


# ---------------------------------------------------------------------------------------------- analysis
def image_tokens(latent: int, patch: int = 2) -> int:
    return (latent // patch) ** 2


def line_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``(intercept, slope)`` of ``y = a + b x`` through ``points`` (two or more distinct x)."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if n < 2 or spread == 0:
        raise ValueError("a line needs points at two or more distinct x")
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    return mean_y - slope * mean_x, slope


@dataclass
class PerSample:
    """``bytes(samples) = constant + samples x per_sample`` of one kind of call at 512 px, and how it was found."""

    constant: float
    per_sample: float
    how: str

    def at(self, samples: int) -> float:
        return self.constant + samples * self.per_sample

    def largest(self, room: float) -> int:
        """The most samples whose call fits in ``room`` bytes (0 when not even one does)."""
        return max(0, math.floor((room - self.constant) / self.per_sample)) if self.per_sample > 0 else 10**9


def per_sample_models(results: list[dict[str, Any]], target_latent: int, lora_parameters: int) -> dict[str, PerSample]:
    """One :class:`PerSample` per kind of call (``train``, ``train-ckpt``, ``forward``, ``decode-float32``,
    ``decode-bfloat16``, ``eval``) at the target latent, from the measurements:

    * measured at the target with two sample counts: their line;
    * else the one-sample points at smaller sizes, fitted by a line in image tokens (pixels for the decode)
      and read at the target, minus a constant that does not grow with samples: the LoRA gradients
      (4 bytes a LoRA weight) for training, the constant of a two-count pair measured at a smaller size
      for the others (0 without one).
    """
    kinds: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        s = r["spec"]
        kind = {"train": "train-ckpt" if s["checkpointing"] else "train", "decode": f"decode-{s['vae_dtype']}"}.get(s["phase"], s["phase"])
        kinds.setdefault(kind, []).append(r)
    models: dict[str, PerSample] = {}
    for kind, rows in kinds.items():
        at_target = {r["spec"]["samples"]: r["peak_bytes"] for r in rows if r["spec"]["latent"] == target_latent}
        if len(at_target) >= 2:
            (a, b) = sorted(at_target)[:2]
            per = (at_target[b] - at_target[a]) / (b - a)
            models[kind] = PerSample(at_target[a] - a * per, per, f"measured at 512 px, {a} and {b} samples")
            continue
        pairs: dict[int, dict[int, int]] = {}
        for r in rows:
            pairs.setdefault(r["spec"]["latent"], {})[r["spec"]["samples"]] = r["peak_bytes"]
        constant = 0.0
        how_constant = "no constant"
        if kind.startswith("train"):
            constant, how_constant = 4.0 * lora_parameters, "minus the LoRA gradients"
        else:
            for latent, counts in sorted(pairs.items()):
                if 1 in counts and 2 in counts:
                    constant = float(2 * counts[1] - counts[2])
                    how_constant = f"minus the constant of 1 and 2 samples at {8 * latent} px"
        if 1 in at_target:
            models[kind] = PerSample(constant, at_target[1] - constant, f"measured at 512 px, 1 sample, {how_constant}")
            continue
        pixels = kind.startswith("decode")
        size = (lambda latent: (8 * latent) ** 2) if pixels else image_tokens
        points = [(size(latent), counts[1]) for latent, counts in pairs.items() if 1 in counts]
        intercept, slope = line_fit(points)
        value = intercept + slope * size(target_latent)
        unit = "pixels" if pixels else "image tokens"
        sizes = " and ".join(f"{8 * latent} px" for latent in sorted(pairs))
        models[kind] = PerSample(constant, value - constant, f"linear in {unit} from {sizes}, {how_constant}")
    return models


def fit_check(results: list[dict[str, Any]], target_latent: int) -> list[dict[str, Any]]:
    """Where the target was measured too (CUDA): the CPU's extrapolation from the smaller sizes beside it."""
    rows = []
    groups: dict[str, dict[int, int]] = {}
    for r in results:
        s = r["spec"]
        if s["samples"] != 1 or s["phase"] == "eval":
            continue
        kind = describe(s).split(" 1x")[0]
        groups.setdefault(kind, {})[s["latent"]] = r["peak_bytes"]
    for kind, by_latent in groups.items():
        smaller = [latent for latent in by_latent if latent < target_latent]
        if target_latent not in by_latent or len(smaller) < 2:
            continue
        size = (lambda latent: (8 * latent) ** 2) if kind.startswith("decode") else image_tokens
        intercept, slope = line_fit([(size(latent), by_latent[latent]) for latent in smaller])
        predicted = intercept + slope * size(target_latent)
        rows.append({"call": kind, "extrapolated": predicted, "measured": by_latent[target_latent],
                     "error": predicted / by_latent[target_latent] - 1})
    return rows


def count_parameters(kind: str) -> int:
    """Parameters of a text encoder, counted on the meta device from its published config."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        if kind == "t5":
            model: nn.Module = T5EncoderModel(T5Config(**T5_XXL))
        else:
            model = CLIPTextModelWithProjection(CLIPTextConfig(**(CLIP_L if kind == "clip-l" else CLIP_G)))
    return sum(p.numel() for p in model.parameters())


def recipe_rows(recipes: dict[str, Any], models: dict[str, PerSample], counts: dict[str, int], gpus: int,
                budget: float, target_latent: int, measured_eval_steps: int) -> list[dict[str, Any]]:
    """Per-GPU peak of each recipe on ``gpus`` GPUs with ``budget`` bytes for tensors: as set, unset, and the
    largest ``micro_batch_size`` / ``chunk_size`` that fit. The evaluation chunk was measured on
    ``measured_eval_steps`` ODE steps; the recipe's other steps add their trajectory (latents, means and
    velocities of each step, float32, twice: the sampler's lists and the stacked copy)."""
    rows = []
    latent_values = 16 * target_latent * target_latent  # C h w of one latent
    for name, config in recipes.items():
        policy, sampling, train = config.policy.config, config.sampling, config.train
        dense = config.advantage.name != "sparse"
        steps = sampling.num_steps
        n = train.group_size * train.groups_per_iteration // gpus
        minibatch = (train.minibatch_size or train.group_size * train.groups_per_iteration) // gpus
        dtype_bytes = DTYPE_BYTES[policy.get("dtype", "float32")]
        vae_dtype = policy.get("vae_dtype") or policy.get("dtype", "float32")
        checkpointing = bool(policy.get("gradient_checkpointing", False))
        text_on_gpu = (policy.get("text_encoder_device") or policy.get("device", config.device)) != "cpu"
        text_parameters = counts["clip-l"] + counts["clip-g"] + (0 if policy.get("drop_t5") else counts["t5"])
        reward = config.rewards[0].name
        reward_bytes = REWARD_WEIGHTS.get(reward, (0.0, ""))[0] * DTYPE_BYTES.get(config.rewards[0].config.get("dtype", "float32"), 4)
        static = {
            "transformer": counts["transformer"] * dtype_bytes,
            "LoRA (fp32 weights, grads, AdamW)": counts["lora"] * 16,
            "VAE": counts["vae"] * DTYPE_BYTES[vae_dtype],
            "text encoders": text_parameters * dtype_bytes if text_on_gpu else 0,
            "reward model (published size)": reward_bytes,
        }
        tokens = CLIP_TOKENS + policy.get("max_sequence_length", 256)
        prompt_bytes = 2 * (tokens * SD35M_TRANSFORMER["joint_attention_dim"] + SD35M_TRANSFORMER["pooled_projection_dim"]) * dtype_bytes
        storage = {
            # latents (T+1), means (T), velocities (T), float32, every sample of the rank; its prompt and negative rows
            "trajectories": n * (3 * steps + 1) * latent_values * 4,
            "prompt embeddings": n * prompt_bytes,
            # clean estimates (T+1) and the completions under way (T), float32
            "dense engine": n * (2 * steps + 1) * latent_values * 4 if dense else 0,
        }
        base = sum(static.values()) + sum(storage.values())
        eval_extra = 2 * 3 * max(0, sampling.eval_steps - measured_eval_steps) * latent_values * 4
        train_model = models["train-ckpt" if checkpointing else "train"]
        decode_model = models[f"decode-{vae_dtype}"]

        def phases(micro: int, chunk: int | None) -> dict[str, float]:
            rollout = n if chunk is None else min(chunk, n)
            dense_rows = DENSE_CHUNK_UNSET if chunk is None else chunk
            decode_rows = (DENSE_CHUNK_UNSET if dense else n) if chunk is None else min(chunk, n)
            eval_rows = EVAL_CHUNK_UNSET if chunk is None else chunk
            calls = {
                f"rollout chunk ({rollout})": models["forward"].at(rollout),
                f"decode chunk ({decode_rows})": decode_model.at(decode_rows),
                f"training micro-batch ({micro})": train_model.at(micro),
                f"evaluation chunk ({eval_rows})": models["eval"].at(eval_rows) + eval_rows * eval_extra,
            }
            if dense:
                calls[f"dense chunk ({dense_rows})"] = models["forward"].at(dense_rows)
            return calls

        def peak(micro: int, chunk: int | None) -> tuple[float, str]:
            calls = phases(micro, chunk)
            largest = max(calls, key=calls.__getitem__)
            return base + calls[largest], largest

        micro = train.micro_batch_size or minibatch
        chunk = sampling.chunk_size
        as_set, as_set_call = peak(micro, chunk)
        unset, unset_call = peak(minibatch, None)
        room = budget - base
        per_chunk = max(models["forward"].per_sample, decode_model.per_sample,
                        models["eval"].per_sample + eval_extra)
        largest_chunk = max(0, math.floor((room - max(models["forward"].constant, decode_model.constant, models["eval"].constant)) / per_chunk))
        rows.append({
            "recipe": name, "per_rank_samples": n, "per_rank_minibatch": minibatch, "micro_batch_size": train.micro_batch_size,
            "chunk_size": chunk, "gradient_checkpointing": checkpointing, "vae_dtype": vae_dtype, "text_encoders_on_gpu": text_on_gpu,
            "static": static, "storage": storage, "peak": as_set, "peak_call": as_set_call, "fits": as_set <= budget,
            "unset_peak": unset, "unset_call": unset_call,
            "largest_micro_batch": min(train_model.largest(room), minibatch),
            "largest_micro_batch_other": min(models["train" if checkpointing else "train-ckpt"].largest(room), minibatch),
            "largest_chunk": largest_chunk,
        })
    return rows


# ---------------------------------------------------------------------------------------------- report
def gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def markdown(data: dict[str, Any]) -> str:
    results, models, rows, checks = data["results"], data["models"], data["recipes"], data["fit_check"]
    meta = data["meta"]
    lines = [
        f"# Peak memory of SD3.5-Medium's calls ({meta['model']}, {meta['device_name']})",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Measured {meta['date']} with torch {meta['torch']}, diffusers {meta['diffusers']}, peft {meta['peft']}, "
        f"{meta['threads']} CPU threads; {meta['method']}. Random weights from the published configs (no download). "
        f"Policy options (the recipes'): `{json.dumps(meta['policy'])}`. A sample is one image, two rows inside the "
        f"model with CFG. Text: {meta['text_tokens']} tokens (77 CLIP + {meta['text_tokens'] - 77} T5), 4096 wide.",
        "",
        "## Measured: peak above the loaded weights and the call's inputs",
        "",
        "| call | samples | size | image tokens | peak (GiB) | weights + inputs before (GiB) | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r["spec"]
        tokens = "" if s["phase"] == "decode" else str(image_tokens(s["latent"]))
        lines.append(f"| {describe(s).rsplit(' ', 1)[0]} | {s['samples']} | {8 * s['latent']} px | {tokens} | "
                     f"{gib(r['peak_bytes'])} | {gib(r['base_bytes'])} | {r['seconds']:.0f} |")
    lines += [
        "",
        f"## Per sample at {8 * meta['target_latent']} px ({image_tokens(meta['target_latent'])} image tokens)",
        "",
        "`bytes(k samples) = constant + k x per sample`; the evaluation chunk as measured (one ODE step; the "
        "recipe table adds the other steps' trajectory from its shape).",
        "",
        "| call | constant (GiB) | per sample (GiB) | how |",
        "|---|---:|---:|---|",
    ]
    for kind, model in models.items():
        lines.append(f"| {kind} | {gib(model['constant'])} | {gib(model['per_sample'])} | {model['how']} |")
    if checks:
        lines += ["", "## The CPU's extrapolation against the measurement at 512 px", "",
                  "| call (1 sample) | extrapolated from 128 and 256 px (GiB) | measured at 512 px (GiB) | error |",
                  "|---|---:|---:|---:|"]
        for c in checks:
            lines.append(f"| {c['call']} | {gib(c['extrapolated'])} | {gib(c['measured'])} | {100 * c['error']:+.1f}% |")
    meta_budget = data["budget"]
    lines += [
        "",
        f"## Per-GPU peak of the shipped recipes on {meta_budget['gpus']} x {meta_budget['gpu_gib']:.0f} GiB",
        "",
        f"Budget for tensors: {meta_budget['gpu_gib']:.0f} GiB minus {meta_budget['headroom_gib']:.0f} GiB for the CUDA "
        f"context, NCCL buffers and the caching allocator's slack = {meta_budget['budget_gib']:.0f} GiB. Peak = static "
        "weights + the iteration's stored tensors (every rank's trajectories, prompt rows and dense estimates, counted "
        "from their shapes and held through every call: an upper bound) + the largest call. Reward models' "
        "activations are not counted. 'unset': `train.micro_batch_size` and `sampling.chunk_size` null (the "
        "per-rank minibatch in one forward, a rollout and a sparse decode of the whole per-rank batch, the dense "
        f"engine's {DENSE_CHUNK_UNSET}, the evaluation's {EVAL_CHUNK_UNSET}).",
        "",
        "| recipe | samples / minibatch per GPU | micro_batch_size | chunk_size | ckpt | VAE | static (GiB) | stored (GiB) "
        "| peak as set (GiB) | largest call | fits | peak unset (GiB) | largest micro_batch_size that fits (ckpt / other) "
        "| largest chunk_size that fits |",
        "|---|---:|---:|---:|---|---|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['recipe']} | {row['per_rank_samples']} / {row['per_rank_minibatch']} | {row['micro_batch_size']} | "
            f"{row['chunk_size']} | {'on' if row['gradient_checkpointing'] else 'off'} | {row['vae_dtype']} | "
            f"{gib(sum(row['static'].values()))} | {gib(sum(row['storage'].values()))} | {gib(row['peak'])} | "
            f"{row['peak_call']} | {'yes' if row['fits'] else '**no**'} | {gib(row['unset_peak'])} ({row['unset_call']}) | "
            f"{row['largest_micro_batch']} / {row['largest_micro_batch_other']} | {row['largest_chunk']} |"
        )
    if rows:
        lines += ["", "Static weights of the first recipe (GiB): " + ", ".join(
            f"{k} {gib(v)}" for k, v in rows[0]["static"].items()) + "; stored tensors: " + ", ".join(
            f"{k} {gib(v)}" for k, v in rows[0]["storage"].items()) + ". Text encoders count only where the recipe "
            "keeps them on the GPU (`text_encoder_device`)."]
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, rows, target = data["results"], data["recipes"], data["meta"]["target_latent"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5.6))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        s = r["spec"]
        if s["samples"] == 1 and s["phase"] in ("train", "forward"):
            series.setdefault(describe(s).split(" 1x")[0], []).append((image_tokens(s["latent"]), r["peak_bytes"] / GIB))
    for label, points in series.items():
        points.sort()
        xs, ys = zip(*points)
        line = left.plot(xs, ys, "o-", label=label)[0]
        if xs[-1] < image_tokens(target) and len(xs) >= 2:
            intercept, slope = line_fit(list(points))
            left.plot([xs[-1], image_tokens(target)], [ys[-1], intercept + slope * image_tokens(target)], "--",
                      color=line.get_color())
    left.set_xlabel("image tokens (1024 = 512 px)")
    left.set_ylabel("peak above weights (GiB)")
    left.set_title("one sample (2 rows with CFG): measured, dashed = extrapolated")
    if series:
        left.legend(fontsize=8)
    left.grid(alpha=0.3)
    if rows:
        budget = data["budget"]
        top = 1.4 * budget["gpu_gib"]
        names = [r["recipe"].replace("-sd35m-", "\n") for r in rows]
        static = [sum(r["static"].values()) / GIB for r in rows]
        stored = [sum(r["storage"].values()) / GIB for r in rows]
        call = [(r["peak"] - sum(r["static"].values()) - sum(r["storage"].values())) / GIB for r in rows]
        xs = list(range(len(rows)))
        right.bar(xs, static, label="static weights")
        right.bar(xs, stored, bottom=static, label="stored tensors")
        right.bar(xs, call, bottom=[a + b for a, b in zip(static, stored)], label="largest call, settings as in the recipe")
        for x, r in zip(xs, rows):
            right.text(x, min(r["peak"] / GIB + 1, 0.93 * top), f"{r['peak'] / GIB:.0f}", ha="center", va="bottom", fontsize=7)
            if abs(r["unset_peak"] - r["peak"]) > GIB:
                right.scatter([x], [min(r["unset_peak"] / GIB, top)], marker="x", color="black", zorder=3)
        right.scatter([], [], marker="x", color="black", label="settings unset (at the top: beyond it)")
        right.axhline(budget["gpu_gib"], color="black", linestyle="-", linewidth=0.8, label=f"GPU ({budget['gpu_gib']:.0f} GiB)")
        right.axhline(budget["budget_gib"], color="red", linestyle=":", label="budget for tensors")
        right.set_ylim(0, top)
        right.set_xticks(xs)
        right.set_xticklabels(names, fontsize=7)
        right.set_ylabel("per-GPU peak (GiB)")
        right.set_title(f"recipes on {budget['gpus']} GPUs (numbers: peak as set, GiB)")
        right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def analyse(results: list[dict[str, Any]], meta: dict[str, Any], recipes: dict[str, Any], gpus: int, gpu_gib: float,
            headroom_gib: float) -> dict[str, Any]:
    target = meta["target_latent"]
    lora = next((r["lora_parameters"] for r in results if "lora_parameters" in r), 0)
    models = per_sample_models(results, target, lora)
    full = [r for r in results if r["spec"]["phase"] != "decode"]
    counts = {
        "transformer": full[0]["transformer_parameters"] if full else 0, "lora": lora,
        "vae": results[0]["vae_parameters"], **meta["text_parameters"],
    }
    budget = (gpu_gib - headroom_gib) * GIB
    eval_steps = next(r["spec"]["eval_steps"] for r in results if r["spec"]["phase"] == "eval")
    rows = recipe_rows(recipes, models, counts, gpus, budget, target, eval_steps) if meta["model"] == "sd3.5-medium" else []
    return {
        "meta": meta, "results": results, "counts": counts,
        "models": {k: {"constant": v.constant, "per_sample": v.per_sample, "how": v.how} for k, v in models.items()},
        "fit_check": fit_check(results, target), "recipes": rows,
        "budget": {"gpus": gpus, "gpu_gib": gpu_gib, "headroom_gib": headroom_gib, "budget_gib": gpu_gib - headroom_gib},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a tiny model at tiny sizes: seconds, checks the harness only")
    parser.add_argument("--out", type=Path, default=None, help=f"folder for memory.md/.json/.png (default {DEFAULT_OUT})")
    parser.add_argument("--recipes", type=Path, nargs="*", default=RECIPES, help="recipes to size (default: configs/recipes/*sd35m*.yaml)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the recipes run on (default 8)")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    parser.add_argument("--headroom-gib", type=float, default=8.0, help="kept free for the CUDA context, NCCL and allocator slack (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per measurement (default 2)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per measurement process")
    parser.add_argument("--policy-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override a policy option the recipes set for the measurements, e.g. autocast=true (YAML values)")
    parser.add_argument("--only", nargs="*", choices=sorted(MEASURES), help="measure only these calls (debugging)")
    parser.add_argument("--from-json", type=Path, help="recompute the tables and plot from a saved memory.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return
    recipes = load_recipes(list(args.recipes))
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        results, meta = saved["results"], saved["meta"]
        now = measured_policy_options(recipes)
        changed = sorted(k for k in {*now, *meta["policy"]} if now.get(k) != meta["policy"].get(k))
        if changed:
            print(f"warning: the recipes' {', '.join(changed)} differ from the measured policy options "
                  f"{json.dumps(meta['policy'])}; measure again for exact numbers", file=sys.stderr)
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch finds no CUDA GPU here; run on the CPU (--device cpu)")
        policy = measured_policy_options(recipes)
        for item in args.policy_set:
            key, _, value = item.partition("=")
            policy[key] = yaml.safe_load(value)
        first = next(iter(recipes.values()))
        train = {k: v for k, v in first.train.model_dump().items()}
        recipe_vae = policy.get("vae_dtype") or first.policy.config.get("vae_dtype") or policy.get("dtype", "float32")
        specs = plan(args.device, args.quick, policy, train, recipe_vae, first.sampling.eval_steps, args.threads)
        if args.only:
            specs = [s for s in specs if s["phase"] in args.only]
        started = time.perf_counter()
        results = run_children(specs, args.timeout)
        import diffusers
        import peft

        model = MODELS["quick" if args.quick else "sd3.5-medium"]
        meta = {
            "model": model.name, "target_latent": model.target_latent, "device": args.device,
            "device_name": results[0].get("device_name") or f"CPU ({platform.processor() or platform.machine()})",
            "command": "python3 benchmarks/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "peft": peft.__version__, "threads": args.threads, "policy": policy,
            "text_tokens": CLIP_TOKENS + policy.get("max_sequence_length", 256),
            "method": "CUDA max_memory_allocated above memory_allocated, fresh process per build" if args.device == "cuda"
            else "peak RSS (VmHWM reset before the call) above RSS before it, fresh process per measurement",
            "seconds": round(time.perf_counter() - started, 1),
            "text_parameters": {k: count_parameters(k) for k in ("clip-l", "clip-g", "t5")},
        }
    data = analyse(results, meta, recipes, args.gpus, args.gpu_gib, args.headroom_gib)
    out = args.out or DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    stem = "memory" if meta["device"] == "cpu" else "memory-cuda"
    text = markdown(data)
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    plot(data, out / f"{stem}.png")
    print(text)
    print(f"wrote {out / stem}.md, .json and .png")


if __name__ == "__main__":
    main()
