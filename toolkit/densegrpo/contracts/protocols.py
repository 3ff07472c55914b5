"""The five protocols of densegrpo and the data they exchange.

Shapes are part of the contract (see DESIGN.md). Legend:

* ``N``: samples in a batch; prompt groups are contiguous (``G`` samples each).
* ``T``: sampling steps; a trajectory has ``T + 1`` states.
* ``(C, h, w)``: one latent (pixels for the toy policy, VAE latents for SD3/FLUX).
* ``(H, W)``: decoded image size.

Video. A video policy (``wan``) has latents with a frame axis, ``latent_shape = (C, F, h, w)``
(``F`` latent frames), so every ``(N, ..., C, h, w)`` below reads ``(N, ..., C, F, h, w)``:
``Trajectory.latents (N, T+1, C, F, h, w)``, ``velocity`` and ``means`` likewise. The step maths
is elementwise and every per-sample mean (``log_probs``, the KL) runs over all non-batch
dimensions, so samplers and the dense engine need nothing else. Its ``decode`` returns videos
``(N, F_out, 3, H, W)`` float32 in [0, 1], frames in time order (the layout of diffusers'
``WanPipeline(output_type="pt")`` and of Flow-GRPO's video rewards), and rewards receive them in
that layout; :class:`densegrpo.components.rewards.video_frames.VideoFramesReward` (``video-frames``) turns
any image reward into a video reward. Image policies and image rewards are unchanged.

Time indexing. Tensors along a trajectory use the *step index* ``k = 0 .. T``:
``latents[:, k]`` lives at ``sigmas[k]``; ``k = 0`` is pure noise (``sigma = 1``) and
``k = T`` the clean sample (``sigma = 0``). Step ``k`` is the move ``latents[:, k] ->
latents[:, k + 1]``. The papers count the other way (``t = T - k`` remaining steps);
:class:`DenseRewards` keeps the papers' order because method.md writes it so, and
converts with :meth:`DenseRewards.by_step_index`.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, ClassVar, Iterable, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from densegrpo.contracts.errors import UserError
from densegrpo.contracts.kinds import KINDS


@dataclass
class Cond:
    """Encoded prompts, as a policy's ``encode`` returns them.

    Attributes:
        prompt_embeds: ``(N, L, D)`` token embeddings, the policy's dtype.
        pooled_embeds: ``(N, P)`` pooled embedding, or ``None`` for models without one.
        prompts: the ``N`` prompt strings, kept for rewards and logging.
        extra: model-specific tensors with a leading ``N`` dimension (for example FLUX's
            text ids); :meth:`select` slices them like the others.
        negative: the unconditional conditioning of classifier-free guidance, a ``Cond`` of
            its own (``prompt_embeds (N, L, D)``, ``pooled_embeds (N, P)`` or ``None``,
            ``extra``) whose row ``i`` pairs with row ``i`` here; ``None`` when guidance is off.
    """

    prompt_embeds: Tensor
    pooled_embeds: Tensor | None = None
    prompts: list[str] = field(default_factory=list)
    extra: dict[str, Tensor] = field(default_factory=dict)
    negative: Cond | None = None

    def __len__(self) -> int:
        return int(self.prompt_embeds.shape[0])

    def select(self, index: Tensor | slice | Sequence[int]) -> "Cond":
        """Rows ``index`` of every tensor (and prompt), ``negative`` included; used to batch model calls."""
        if isinstance(index, slice):
            rows = list(range(len(self)))[index]
        else:
            rows = [int(i) for i in (index.tolist() if isinstance(index, Tensor) else index)]
        pick = torch.as_tensor(rows, dtype=torch.long)

        def take(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.index_select(0, pick.to(t.device))

        return Cond(
            prompt_embeds=take(self.prompt_embeds),
            pooled_embeds=take(self.pooled_embeds),
            prompts=[self.prompts[i] for i in rows] if self.prompts else [],
            extra={k: take(v) for k, v in self.extra.items()},
            negative=None if self.negative is None else self.negative.select(rows),
        )

    def repeat(self, times: int) -> "Cond":
        """Stack ``times`` copies along the batch, copy-major: ``[c0..cN-1, c0..cN-1, ...]``."""
        rows = list(range(len(self))) * times
        return self.select(rows)


@dataclass
class Trajectory:
    """A batch of sampled trajectories, everything the loss and the dense engine need.

    Attributes:
        latents: ``(N, T+1, C, h, w)`` float32; ``latents[:, 0]`` is the initial noise,
            ``latents[:, T]`` the final sample.
        log_probs: ``(N, T)`` float32, ``log p(latents[:, k+1] | latents[:, k])`` averaged
            (not summed) over ``C*h*w``; ``0`` where the step is deterministic.
        means: ``(N, T, C, h, w)`` float32, the mean of each transition.
        velocities: ``(N, T, C, h, w)`` float32, ``v_theta(latents[:, k], sigmas[k])``.
        sigmas: ``(T+1,)`` float32, from 1 down to 0.
        noise_level: ``(T,)`` float32, the per-step noise level ``a_k`` used.
        step_std: ``(T,)`` float32, the transition std of each step (``0`` for ODE steps).
        trained_steps: ``(N, T)`` bool, the steps that carry a log-prob and enter the loss.
        cond: the encoded prompts, needed to recompute velocities.
        std_t: ``(T,)`` float32, the SDE noise coefficient ``std_t`` of each step without the
            step's ``sqrt(-dt)``, which Flow-GRPO's KL divides by (``train.kl: flow-grpo``,
            method.md section 2): ``a sqrt(sigma / (1 - sigma)) = step_std / sqrt(-dt)`` for
            flow-sde, ``sigma_next sin(a pi / 2) = step_std`` for cps; ``0`` for ODE steps.
            ``None`` when built: derived as ``step_std / sqrt(sigmas[k] - sigmas[k+1])``, the
            flow-SDE relation; a sampler whose ``std_t`` differs passes it.
    """

    latents: Tensor
    log_probs: Tensor
    means: Tensor
    velocities: Tensor
    sigmas: Tensor
    noise_level: Tensor
    step_std: Tensor
    trained_steps: Tensor
    cond: Cond
    std_t: Tensor | None = None

    PER_SAMPLE: ClassVar[tuple[str, ...]] = ("latents", "log_probs", "means", "velocities", "trained_steps")
    """The fields with a leading ``N`` axis (:meth:`select`, :meth:`concat`); the others but ``cond`` are the schedule."""

    def __post_init__(self) -> None:
        if self.std_t is None:
            step_size = (self.sigmas[:-1] - self.sigmas[1:]).to(self.step_std)
            stochastic = self.step_std > 0
            # the grid decreases strictly, so step_size > 0 wherever a step is stochastic
            self.std_t = torch.where(stochastic, self.step_std / step_size.clamp_min(1e-30).sqrt(), torch.zeros_like(self.step_std))

    @property
    def num_samples(self) -> int:
        return int(self.latents.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.latents.shape[1]) - 1

    @property
    def final(self) -> Tensor:
        """``(N, C, h, w)``: the sampled clean latents."""
        return self.latents[:, -1]

    def select(self, index: Sequence[int] | Tensor) -> "Trajectory":
        """Rows ``index`` of every per-sample tensor."""
        rows = [int(i) for i in (index.tolist() if isinstance(index, Tensor) else index)]
        pick = torch.as_tensor(rows, dtype=torch.long, device=self.latents.device)
        changes: dict[str, Any] = {
            f.name: getattr(self, f.name).index_select(0, pick)
            for f in fields(self)
            if f.name in self.PER_SAMPLE
        }
        changes["cond"] = self.cond.select(rows)
        return replace(self, **changes)

    @classmethod
    def concat(cls, parts: Iterable["Trajectory"], cond: Cond) -> "Trajectory":
        """The trajectories ``parts`` stacked along the batch, for the ``N = len(cond)`` rows of ``cond``
        (``parts`` hold its rows in order; the result's ``cond`` is ``cond`` itself, not a copy).

        ``parts`` is consumed one at a time and each part's rows are copied into tensors allocated
        once for all ``N`` rows, so with a generator only one part is alive beside the result
        (``torch.cat`` of a list would hold every part and the result together). Every part must
        share the first one's schedule (``sigmas``, ``noise_level``, ``step_std``, ``std_t``):
        rows sampled on different schedules are not one batch.
        """
        num_samples = len(cond)
        result: Trajectory | None = None
        filled = 0
        for part in parts:
            if result is None:
                # the first part's schedule, with N-row tensors in place of its rows (filled below)
                empty = {name: getattr(part, name).new_empty((num_samples, *getattr(part, name).shape[1:]))
                         for name in cls.PER_SAMPLE}
                result = replace(part, **empty, cond=cond)
            changed = [name for name in ("sigmas", "noise_level", "step_std", "std_t")
                       if not torch.equal(getattr(part, name), getattr(result, name))]
            if changed:
                raise UserError(
                    f"the chunks of one rollout were sampled with different {', '.join(changed)}; a sampler that "
                    "draws its schedule per call needs the rollout's generator, or sample at once (sampling.chunk_size: null)"
                )
            count = part.num_samples
            if filled + count > num_samples:
                raise ValueError(f"the parts hold more than the {num_samples} rows of cond; pass one part per chunk of its rows.")
            for name in cls.PER_SAMPLE:
                getattr(result, name)[filled:filled + count].copy_(getattr(part, name))
            filled += count
        if result is None or filled != num_samples:
            raise ValueError(f"the parts hold {filled} rows but cond has {num_samples}; pass one part per chunk of its rows.")
        return result


@dataclass
class DenseRewards:
    """Step-wise rewards ``R_t = R(ODE_n(x_t))`` from the dense-reward engine.

    Attributes:
        rewards: ``(N, T+1)`` float32 in the papers' order: ``rewards[:, t]`` is ``R_t``
            with ``t`` steps left, so ``rewards[:, 0] = R_0`` is the terminal reward and
            ``rewards[:, T]`` the reward of the pure-ODE sample from the same noise.
        nfe: velocity evaluations spent on completions (not counting the rollout).
        reward_calls: images scored.
    """

    rewards: Tensor
    nfe: int = 0
    reward_calls: int = 0

    @property
    def terminal(self) -> Tensor:
        """``(N,)``: ``R_0``, the reward of the sampled image."""
        return self.rewards[:, 0]

    def by_step_index(self) -> Tensor:
        """``(N, T+1)``: the same rewards aligned with ``Trajectory.latents`` (k = T - t)."""
        return self.rewards.flip(1)

    def gains(self) -> Tensor:
        """``(N, T)``: ``dR`` of step ``k`` (the move ``x_k -> x_{k+1}``), i.e. ``R_{t-1} - R_t``."""
        aligned = self.by_step_index()
        return aligned[:, 1:] - aligned[:, :-1]


@dataclass
class RewardNeeds:
    """What an advantage estimator asks the loop to compute.

    Attributes:
        dense: ``False``: only the terminal reward ``R(x_0)``. ``True``: ``R_t`` for every
            state via the dense-reward engine.
        completion: ODE steps ``n`` used to complete ``x_t``: ``"t"`` (all remaining steps,
            the paper's default), an integer ``k`` (``min(k, t)`` steps) or ``"t/C"``
            (``ceil(t / C)`` steps, e.g. ``"t/2"``).
        step_local: ``True`` when the advantage of step ``k`` reads only the rewards of the
            step's own two states (``R_t`` and ``R_{t-1}``, as DenseGRPO's gain). The loop
            then scores only the states of trained steps (plus the final sample) and leaves
            the others NaN; with ``False`` (a reward-to-go, say) every state is scored.
        per_reward: ``True`` when the estimator reads each reward model's scores apart (a last
            axis ``R`` on :class:`RewardBatch`, unweighted) instead of their weighted sum,
            e.g. :class:`densegrpo.method.per_reward.PerRewardAdvantage`.
    """

    dense: bool = False
    completion: int | str = "t"
    step_local: bool = False
    per_reward: bool = False


@dataclass
class RewardBatch:
    """Rewards handed to an advantage estimator.

    Attributes:
        terminal: ``(N,)`` float32, ``R(x_0)``; NaN means "not applicable". ``(N, R)``, one
            column per reward model, for an estimator whose ``needs.per_reward`` is true.
        dense: ``(N, T+1)`` float32 in the papers' order (see :class:`DenseRewards`), or
            ``None`` for sparse estimators; ``(N, T+1, R)`` with ``needs.per_reward``.
        num_steps: ``T``.
        group_size: ``G``; groups are contiguous rows ``[g*G, (g+1)*G)``.
    """

    terminal: Tensor
    dense: Tensor | None
    num_steps: int
    group_size: int


@dataclass
class CalibrationStats:
    """Dense statistics a calibrator learns from.

    Attributes:
        gains: ``(N, T)`` float32, ``dR`` per sample and step index ``k`` (NaN allowed).
        sigmas: ``(T+1,)`` the grid the gains were measured on.
        noise_level: ``(T,)`` the noise levels used to sample them.
    """

    gains: Tensor
    sigmas: Tensor
    noise_level: Tensor


@runtime_checkable
class Policy(Protocol):
    """A flow-matching generator ``v_theta(x, sigma, c)`` with a decoder and LoRA.

    Optional, for training on several processes (torchrun / accelerate launch)::

        def data_parallel(self, wrap: Callable[[nn.Module], nn.Module]) -> None

    The policy calls ``wrap(module)`` once with an ``nn.Module`` that owns the trainable weights
    and whose ``forward(x, sigma, cond)`` returns the velocity, and afterwards runs its forward
    passes with gradients through the returned module (DDP), or every forward pass that uses
    those weights (FSDP shards them; see :class:`densegrpo.method.distributed.DataParallel`). Its
    ``trainable_state_dict`` / ``load_trainable_state_dict`` then see sharded ``DTensor``
    parameters under FSDP: use :func:`densegrpo.api.full_tensor` and
    :func:`~densegrpo.api.copy_into`. A policy without the method trains in one
    process only; a multi-process run stops with an error that says so.

    Optional, for guidance that differs in the loss (see :data:`OPTIONAL_MEMBERS`)::

        def loss_forward(self, cfg_grad: Literal["conditional", "both"] = "conditional") -> AbstractContextManager[None]

    The loop makes the GRPO loss's forward passes (the log-prob recomputation and the KL
    reference pass) inside this context, with ``cfg_grad=train.cfg_grad``, so a policy can, for
    example, skip classifier-free guidance there (Flow-GRPO's ``train.cfg=False``), or, with
    guidance, let gradients flow through the conditional prediction only: ``"conditional"``
    is ``v = v_neg.detach() + g (v_pos - v_neg.detach())`` (Flow-GRPO's train_sd3.py detaches
    the unconditional prediction), ``"both"`` leaves ``v_neg`` attached. A policy without
    guidance in the loss ignores ``cfg_grad``. Default: a context that changes nothing.
    """

    latent_shape: tuple[int, ...]
    """``(C, h, w)`` of one latent, or ``(C, F, h, w)`` for a video policy."""

    device: torch.device
    """Where the model runs; rollouts put their tensors here."""

    def encode(self, prompts: list[str]) -> Cond:
        """Encode ``N`` prompts (cached for repeats)."""
        ...

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """``x (N, *latent_shape)``, ``sigma (N,)`` in [0, 1] -> velocity of the same shape (CFG applied)."""
        ...

    def decode(self, x0: Tensor) -> Tensor:
        """Clean latents ``(N,C,h,w)`` -> images float32 ``(N,3,H,W)`` in [0, 1]; a video policy's
        ``(N,C,F,h,w)`` -> videos float32 ``(N,F_out,3,H,W)`` in [0, 1]."""
        ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters GRPO updates (LoRA weights, or all for full fine-tuning)."""
        ...

    def reference(self) -> AbstractContextManager["Policy"]:
        """Context in which the policy acts as the frozen base model (LoRA disabled)."""
        ...

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The trainable weights by name (saved as safetensors in checkpoints)."""
        ...

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore weights saved by :meth:`trainable_state_dict`."""
        ...


@runtime_checkable
class Sampler(Protocol):
    """One stochastic (or deterministic) discretisation of the flow ODE/SDE.

    Optional (see :data:`OPTIONAL_MEMBERS`): ``noise_level_range: tuple[float, float]``, the
    closed range ``(low, high)`` of noise levels ``rollout`` accepts (cps: ``(0.0, 1.0)``);
    the run clamps the calibrator to it. Default: ``(0.0, inf)``.

    Optional, for GRPO-Guard's RatioNorm (``train.ratio_norm``, :mod:`densegrpo.method.ratio_norm`)::

        def expected_log_ratio(self, mean: Tensor, old_mean: Tensor, step_std: float) -> Tensor

    ``E[log p_theta(x' | x) - log p_old(x' | x)]`` over the old transition's draws ``x'``, for a
    step whose mean moved from ``old_mean (N,C,h,w)`` (the rollout's) to ``mean (N,C,h,w)`` (the
    current weights') with transition std ``step_std``, averaged like ``log_probs`` -> ``(N,)``.
    Default: the isotropic Gaussian's ``-mean((mean - old_mean)^2) / (2 step_std^2)``; a sampler
    whose noise lives in a subspace (coarse-sde) gives the subspace's.
    """

    def rollout(
        self,
        policy: Policy,
        cond: Cond,
        noise: Tensor,
        sigmas: Tensor,
        noise_level: Tensor,
        *,
        step_noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Trajectory:
        """Sample from ``noise (N,C,h,w)`` along ``sigmas (T+1,)`` with ``noise_level (T,)``.

        ``step_noise (N,T,C,h,w)`` fixes the per-step Gaussian draws (for world-size
        invariant runs); otherwise they come from ``generator``.
        """
        ...

    def log_prob(self, policy: Policy, traj: Trajectory, step: int) -> tuple[Tensor, Tensor]:
        """Recompute step ``k``'s ``(log_prob (N,), mean (N,C,h,w))`` with gradients."""
        ...


@runtime_checkable
class RewardModel(Protocol):
    """Scores images (or videos, for a video policy); NaN means "not applicable"."""

    def __call__(
        self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any] | None]
    ) -> Tensor:
        """``images (N,3,H,W)`` float32 in [0,1] (videos: ``(N,F,3,H,W)``) -> rewards ``(N,)`` float32."""
        ...


@runtime_checkable
class AdvantageEstimator(Protocol):
    """Turns rewards into per-step advantages ``(N, T)``.

    ``needs`` is read once, before training: it decides what the loop scores (terminal or
    dense rewards, which states, one reward axis or the weighted sum). Optional:
    ``last_stats: dict[str, float]``, numbers about the last call that the loop logs
    (``zero_std_ratio`` among them; see :data:`OPTIONAL_MEMBERS`).
    """

    needs: RewardNeeds

    def __call__(self, rewards: RewardBatch) -> Tensor:
        """-> advantages ``(N, T)`` float32, aligned with step index ``k``."""
        ...


@runtime_checkable
class ExplorationCalibrator(Protocol):
    """Chooses the SDE noise level of every step.

    Optional members, with the defaults of a fixed schedule (see :data:`OPTIONAL_MEMBERS`):
    ``calibration_rounds`` (rounds before training), ``samples_per_round``, ``converged``,
    ``uniform_level`` (the level a uniform schedule would use, drawn in plots),
    ``state_dict()`` / ``load_state_dict(state)`` (what a checkpoint keeps),
    ``limit_noise_level(low, high)`` (the sampler's ``noise_level_range``, passed once by the
    run before anything is sampled: the levels chosen afterwards must lie in it).
    """

    def noise_level(self, sigmas: Tensor) -> Tensor:
        """``sigmas (T+1,)`` -> noise level ``(T,)`` float32."""
        ...

    def update(self, stats: CalibrationStats) -> None:
        """Learn from dense-reward statistics (a no-op for fixed schedules)."""
        ...


@dataclass(frozen=True)
class OptionalMember:
    """A member the loop reads from a component that may leave it out.

    Attributes:
        name: the attribute's name.
        default: ``default(component)`` returns the value (or bound function) used when the
            component has no such attribute.
        doc: what the loop does with it.
    """

    name: str
    default: Callable[[Any], Any]
    doc: str


def _no_state(component: Any) -> Callable[[], None]:
    return lambda: None


def _ignore_state(component: Any) -> Callable[[Any], None]:
    return lambda state: None


def _plain_loss_forward(component: Any) -> Callable[..., AbstractContextManager[None]]:
    def loss_forward(cfg_grad: str = "conditional") -> AbstractContextManager[None]:
        return nullcontext()

    return loss_forward


def _ignore_limit(component: Any) -> Callable[[float, float], None]:
    return lambda low, high: None


def gaussian_expected_log_ratio(mean: Tensor, old_mean: Tensor, step_std: float) -> Tensor:
    """``E_{x' ~ N(old_mean, s^2 I)}[log N(x'; mean, s^2 I) - log N(x'; old_mean, s^2 I)]`` per
    dimension, ``-mean((mean - old_mean)^2) / (2 s^2)`` over every non-batch dim.

    ``mean, old_mean (N, C, h, w)``, ``step_std`` the transition std ``s > 0`` -> ``(N,)`` float32,
    differentiable in ``mean``. The negative of GRPO-Guard's ``ratio_mean_bias``.
    """
    square = (mean.float() - old_mean.float()).square().flatten(1).mean(dim=1)
    return square * (-0.5 / step_std**2)



OPTIONAL_MEMBERS: dict[str, tuple[OptionalMember, ...]] = {
    "policies": (
        OptionalMember("data_parallel", lambda c: None, "data_parallel(wrap): train on several processes; "
                       "None: one process only (see Policy)."),
        OptionalMember("loss_forward", _plain_loss_forward, "loss_forward(cfg_grad): context of the loss's forward "
                       "passes, cfg_grad = train.cfg_grad ('conditional': detach the unconditional CFG branch, 'both') "
                       "(see Policy); default: changes nothing."),
    ),
    "samplers": (
        OptionalMember("noise_level_range", lambda c: (0.0, math.inf), "tuple[float, float]: the closed range of "
                       "noise levels rollout accepts; the run clamps the calibrator to it; default: (0.0, inf)."),
        OptionalMember("expected_log_ratio", lambda c: gaussian_expected_log_ratio, "expected_log_ratio(mean, old_mean, "
                       "step_std) -> (N,): the mean log-ratio of a step whose mean moved, under the old transition; "
                       "RatioNorm (train.ratio_norm) subtracts it; default: the isotropic Gaussian's "
                       "-mean((mean - old_mean)^2) / (2 step_std^2) (see Sampler)."),
    ),
    "rewards": (),
    "advantages": (
        OptionalMember("last_stats", lambda c: {}, "dict[str, float] about the last call, logged each iteration "
                       "(zero_std_ratio replaces the loop's own count of zero-std groups); default: {}."),
    ),
    "calibrators": (
        OptionalMember("calibration_rounds", lambda c: 0, "int: rounds run before training (DenseGRPO Alg. 1); "
                       "0: a fixed schedule, no rounds."),
        OptionalMember("samples_per_round", lambda c: None, "int | None: trajectories per round (each with a fresh "
                       "prompt); None: the training batch size."),
        OptionalMember("converged", lambda c: False, "bool: read after each round; True ends calibration early."),
        OptionalMember("uniform_level", lambda c: None, "float | None: the uniform noise level drawn beside psi in "
                       "calibration plots."),
        OptionalMember("state_dict", _no_state, "state_dict() -> JSON-safe state kept in checkpoints; default: None."),
        OptionalMember("load_state_dict", _ignore_state, "load_state_dict(state): restore it on resume; default: "
                       "ignore."),
        OptionalMember("limit_noise_level", _ignore_limit, "limit_noise_level(low, high): the sampler's "
                       "noise_level_range, called once by the run; later levels must lie in it; default: ignore."),
    ),
    "hooks": (
        OptionalMember("before_training", lambda c: lambda run: None, "before_training(run): once, before the "
                       "first iteration of this process (see densegrpo.hooks)."),
        OptionalMember("after_iteration", lambda c: lambda run, record: None, "after_iteration(run, record): after "
                       "each iteration; may add keys to the metrics record."),
        OptionalMember("after_training", lambda c: lambda run, summary: None, "after_training(run, summary): once, "
                       "at the end of this process, also after a stop by a signal (summary['stopped_by']); may add "
                       "keys to the summary."),
    ),
}
"""What the loop may read beyond each protocol's required members, by kind, with defaults.

Every kind may also define a classmethod ``contract_instance()`` that builds a tiny instance
for the contract test (tests/test_contract.py), for components whose default ``Config``
needs weights that are not available offline; default: ``cls(cls.Config())``. A component of a
world other than images of toy scenes (the ``lab`` world reads prompts ``"pattern k"`` and images
``(N, 3, 1, d)``) says what the contract test feeds it: a policy by the classmethod
``contract_prompts()`` (two prompts; default two toy-scene prompts), a reward by the classmethod
``contract_batch()`` (``(images, prompts, metadata)`` for two samples; default two random
``(3, 64, 64)`` images with toy-GenEval metadata)."""

REQUIRED_MEMBERS: dict[str, tuple[str, ...]] = {
    "policies": ("latent_shape", "device", "encode", "velocity", "decode", "trainable_parameters", "reference",
                 "trainable_state_dict", "load_trainable_state_dict"),
    "samplers": ("rollout", "log_prob"),
    "rewards": ("__call__",),
    "advantages": ("needs", "__call__"),
    "calibrators": ("noise_level", "update"),
    "hooks": (),
}
"""The members each protocol requires, by kind (the protocol classes above document them)."""


def conform(kind: str, component: Any) -> Any:
    """Check ``component`` against the protocol of ``kind`` and give it the declared defaults.

    Raises ``TypeError`` naming a missing required member; sets every missing optional
    member of :data:`OPTIONAL_MEMBERS` to its default, so the loop reads all of them directly.
    Returns ``component`` itself.
    """
    missing = [name for name in REQUIRED_MEMBERS[kind] if not hasattr(component, name)]
    if missing:
        raise TypeError(
            f"{type(component).__name__} is not a {_singular(kind)}: it lacks "
            f"{', '.join(missing)} (see densegrpo/contracts/protocols.py)"
        )
    for member in OPTIONAL_MEMBERS[kind]:
        if not hasattr(component, member.name):
            setattr(component, member.name, member.default(component))
    return component


def _singular(kind: str) -> str:
    return "policy" if kind == "policies" else kind[:-1]


__all__ = [
    "KINDS",
    "OPTIONAL_MEMBERS",
    "REQUIRED_MEMBERS",
    "OptionalMember",
    "conform",
    "AdvantageEstimator",
    "CalibrationStats",
    "Cond",
    "DenseRewards",
    "ExplorationCalibrator",
    "Policy",
    "RewardBatch",
    "RewardModel",
    "RewardNeeds",
    "Sampler",
    "Trajectory",
]
