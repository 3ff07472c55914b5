"""The contract every registered component must pass, parametrised over the registry.

A new plugin is tested by installing it: it appears in ``registry.components()`` and
runs through the checks of its kind. Components that need weights unavailable offline
provide a classmethod ``contract_instance()`` that builds a tiny instance (declared in
``densegrpo.contracts.protocols.OPTIONAL_MEMBERS``'s docstring and CONTRIBUTING.md); others are built
from their default ``Config``. Components of another world say what they are fed
(``contract_prompts()``, ``contract_batch()``; same docstring). Every component must also pass ``protocols.conform``: the
required members of its kind are there, and the optional ones it defines have the declared
meaning (checked per kind below).
"""

from __future__ import annotations

import json
import math

import pydantic
import pytest
import torch
from densegrpo.contracts import registry
from densegrpo.contracts.protocols import (
    OPTIONAL_MEMBERS,
    REQUIRED_MEMBERS,
    AdvantageEstimator,
    CalibrationStats,
    Cond,
    ExplorationCalibrator,
    Policy,
    RewardBatch,
    RewardModel,
    RewardNeeds,
    Sampler,
    Trajectory,
    conform,
)
from densegrpo.contracts.testing import GaussianFlowPolicy
from densegrpo.method.sigmas import make_sigmas

COMPONENTS = [pytest.param(c.kind, c.name, id=f"{c.kind}:{c.name}") for c in registry.components()]
TOY_METADATA = [
    {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
    {"tag": "counting", "include": [{"class": "square", "count": 2}], "prompt": "a photo of two squares"},
]


def instance(kind: str, name: str):
    """A conformed instance: ``contract_instance()`` where the class declares it, else the default Config."""
    cls = registry.load_class(kind, name)
    built = cls.contract_instance() if "contract_instance" in dir(cls) else registry.load(kind, name)
    return conform(kind, built)


@pytest.mark.parametrize("kind, name", COMPONENTS)
def test_component_has_every_required_member_and_typed_optional_ones(kind, name):
    component = instance(kind, name)
    for member in REQUIRED_MEMBERS[kind]:
        assert hasattr(component, member), f"{name} lacks the required member {member}"
    for member in OPTIONAL_MEMBERS[kind]:
        assert hasattr(component, member.name)  # conform filled in the defaults
    if kind == "calibrators":
        assert isinstance(component.calibration_rounds, int) and component.calibration_rounds >= 0
        assert component.samples_per_round is None or (isinstance(component.samples_per_round, int) and component.samples_per_round > 0)
        assert isinstance(component.converged, bool)
        assert component.uniform_level is None or isinstance(component.uniform_level, float)
        json.dumps(component.state_dict())  # checkpoints keep it in state.json
        component.load_state_dict(component.state_dict())
        component.limit_noise_level(0.0, 1.0)  # every default level lies in cps's range
        assert (component.noise_level(make_sigmas(5, 3.0)) <= 1.0).all()
    if kind == "samplers":
        low, high = component.noise_level_range
        assert isinstance(low, float) and isinstance(high, float) and 0.0 <= low <= high
        # RatioNorm's centring (train.ratio_norm): per sample, zero for an unmoved mean, below zero for a moved one
        moved = component.expected_log_ratio(torch.full((2, 3, 4, 4), 0.1), torch.zeros(2, 3, 4, 4), 0.5)
        unmoved = component.expected_log_ratio(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), 0.5)
        assert moved.shape == (2,) and bool((moved < 0).all()) and bool((unmoved == 0).all())
    if kind == "advantages":
        assert isinstance(component.needs, RewardNeeds) and isinstance(component.last_stats, dict)
    if kind == "policies":
        assert component.data_parallel is None or callable(component.data_parallel)
        for cfg_grad in ("conditional", "both"):  # the loop passes train.cfg_grad
            with component.loss_forward(cfg_grad=cfg_grad):
                pass


def test_conform_fills_declared_defaults_and_names_missing_members():
    class FixedLevel:
        def noise_level(self, sigmas):
            return torch.full((len(sigmas) - 1,), 0.5)

        def update(self, stats):
            pass

    calibrator = conform("calibrators", FixedLevel())
    assert calibrator.calibration_rounds == 0 and calibrator.samples_per_round is None and calibrator.converged is False
    assert calibrator.state_dict() is None and calibrator.load_state_dict({"any": 1}) is None
    assert calibrator.limit_noise_level(0.0, 1.0) is None

    class Bare:
        def rollout(self, *args, **kwargs):
            pass

        def log_prob(self, policy, traj, step):
            pass

    assert conform("samplers", Bare()).noise_level_range == (0.0, math.inf)
    policy = conform("policies", GaussianFlowPolicy(latent_shape=(3, 4, 4)))
    with policy.loss_forward(cfg_grad="both"):
        pass
    with pytest.raises(TypeError, match="lacks update"):
        conform("calibrators", type("NoUpdate", (), {"noise_level": lambda self, sigmas: None})())


@pytest.mark.parametrize("kind, name", COMPONENTS)
def test_class_has_documented_pydantic_config(kind, name):
    cls = registry.load_class(kind, name)
    assert issubclass(cls.Config, pydantic.BaseModel), f"{name}.Config must be a pydantic model"
    undocumented = [field for field, info in cls.Config.model_fields.items() if not info.description]
    assert undocumented == [], f"{name}.Config fields without description: {undocumented}"
    assert cls.__doc__, f"{name} needs a docstring"


@pytest.mark.parametrize("kind, name", [p for p in COMPONENTS if p.values[0] == "policies"])
def test_policy_contract(kind, name):
    policy = instance(kind, name)
    assert isinstance(policy, Policy)
    shape = tuple(policy.latent_shape)
    assert len(shape) in (3, 4), f"latent_shape must be (C, h, w) or (C, F, h, w), got {shape}"
    cls = registry.load_class(kind, name)
    prompts = cls.contract_prompts() if "contract_prompts" in dir(cls) else ["a photo of a red circle", "a photo of two squares"]
    cond = policy.encode(prompts)
    assert isinstance(cond, Cond) and len(cond) == 2
    x = torch.randn(2, *shape, device=policy.device)
    sigma = torch.tensor([0.9, 0.3], device=policy.device)
    with torch.no_grad():
        v = policy.velocity(x, sigma, cond)
        images = policy.decode(x)
    assert v.shape == (2, *shape) and v.dtype == torch.float32 and torch.isfinite(v).all()
    if len(shape) == 3:  # images (N, 3, H, W)
        assert images.dtype == torch.float32 and images.shape[:2] == (2, 3) and images.ndim == 4
    else:  # videos (N, F, 3, H, W)
        assert images.dtype == torch.float32 and images.ndim == 5 and images.shape[0] == 2 and images.shape[2] == 3
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    params = policy.trainable_parameters()
    assert params and all(p.requires_grad for p in params)
    with torch.no_grad(), policy.reference():
        v_ref = policy.velocity(x, sigma, cond)
    assert v_ref.shape == v.shape
    state = {k: t.clone() for k, t in policy.trainable_state_dict().items()}
    assert state
    policy.load_trainable_state_dict(state)


@pytest.mark.parametrize("kind, name", [p for p in COMPONENTS if p.values[0] == "samplers"])
def test_sampler_contract(kind, name):
    sampler = instance(kind, name)
    assert isinstance(sampler, Sampler)
    policy = GaussianFlowPolicy(latent_shape=(3, 4, 4))
    T, N = 4, 3
    sigmas = make_sigmas(T, 3.0)
    cond = policy.encode(["a", "b", "c"])
    noise = torch.randn(N, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    traj = sampler.rollout(policy, cond, noise, sigmas, torch.full((T,), 0.7), generator=torch.Generator().manual_seed(1))
    assert isinstance(traj, Trajectory)
    assert traj.latents.shape == (N, T + 1, 3, 4, 4) and traj.latents.dtype == torch.float32
    assert traj.log_probs.shape == (N, T) and traj.means.shape == (N, T, 3, 4, 4)
    assert traj.velocities.shape == (N, T, 3, 4, 4) and traj.trained_steps.shape == (N, T)
    assert traj.sigmas.shape == (T + 1,) and traj.noise_level.shape == (T,) and traj.step_std.shape == (T,)
    assert traj.std_t.shape == (T,) and bool(((traj.std_t > 0) == (traj.step_std > 0)).all())
    assert torch.equal(traj.latents[:, 0], noise)
    for k in range(T):
        if not bool(traj.trained_steps[:, k].any()):
            continue
        log_prob, mean = sampler.log_prob(policy, traj, k)
        assert log_prob.shape == (N,) and mean.shape == (N, 3, 4, 4)
        assert log_prob.requires_grad, "log_prob must carry gradients for the loss"
        assert torch.equal(log_prob.detach(), traj.log_probs[:, k]), "ratio must be exactly 1 with unchanged weights"


@pytest.mark.parametrize("kind, name", [p for p in COMPONENTS if p.values[0] == "rewards"])
def test_reward_contract(kind, name):
    reward = instance(kind, name)
    assert isinstance(reward, RewardModel)
    cls = registry.load_class(kind, name)
    if "contract_batch" in dir(cls):
        images, prompts, metadata = cls.contract_batch()
    else:
        images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        prompts, metadata = [m["prompt"] for m in TOY_METADATA], TOY_METADATA
    scores = reward(images, prompts, metadata)
    assert isinstance(scores, torch.Tensor) and scores.shape == (2,) and scores.dtype == torch.float32
    assert not torch.isinf(scores).any()


@pytest.mark.parametrize("kind, name", [p for p in COMPONENTS if p.values[0] == "advantages"])
def test_advantage_contract(kind, name):
    estimator = instance(kind, name)
    assert isinstance(estimator, AdvantageEstimator)
    N, T, G = 8, 4, 4
    generator = torch.Generator().manual_seed(0)
    batch = RewardBatch(
        terminal=torch.rand(N, generator=generator),
        dense=torch.rand(N, T + 1, generator=generator) if estimator.needs.dense else None,
        num_steps=T,
        group_size=G,
    )
    advantages = estimator(batch)
    assert advantages.shape == (N, T) and advantages.dtype == torch.float32 and torch.isfinite(advantages).all()


@pytest.mark.parametrize("kind, name", [p for p in COMPONENTS if p.values[0] == "calibrators"])
def test_calibrator_contract(kind, name):
    calibrator = instance(kind, name)
    assert isinstance(calibrator, ExplorationCalibrator)
    sigmas = make_sigmas(5, 3.0)
    level = calibrator.noise_level(sigmas)
    assert level.shape == (5,) and level.dtype == torch.float32 and (level >= 0).all()
    gains = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
    calibrator.update(CalibrationStats(gains=gains, sigmas=sigmas, noise_level=level))
    after = calibrator.noise_level(sigmas)
    assert after.shape == (5,) and torch.isfinite(after).all()
