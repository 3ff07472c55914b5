"""The public module for plugin authors: everything a third-party policy, sampler, reward, estimator,
calibrator or hook needs, in one import.

    from densegrpo.api import Cond, RewardBatch, UserError, load_pretrained

It holds:

* the five protocols and the data they exchange (:mod:`densegrpo.contracts.protocols`: shapes are
  part of the contract), and :func:`conform`, which the run applies to every component;
* the errors a component raises (:class:`UserError` for one-line user-facing failures);
* the registry's functions (``load``, ``available``, ``register`` ...) for components that wrap
  others and for tests;
* the hub helpers that load weights offline-first (:mod:`densegrpo.contracts.hub`);
* the shared building blocks of the built-in components: the diffusers flow-transformer adapter and
  its LoRA options (policies), CLIP preprocessing (rewards), the offline CLIP tokenizer, sharded
  (FSDP) parameter helpers, and GenEval's rules;
* the contract-test helpers: tiny policies and a reward built in code (:mod:`densegrpo.contracts.testing`);
  the contract test itself (``tests/test_contract.py``) runs over every installed component.

Everything else in ``densegrpo`` is internal and may move between releases; import from here.
Nothing inside the package imports this module (the built-ins use the layers it re-exports).
"""

from __future__ import annotations

from densegrpo.components.policies.adapter import (
    DiffusersPolicyConfig,
    FlowModelParts,
    FlowPolicyConfig,
    FlowTransformerPolicy,
    TinyRandomPolicy,
    hub_load,
)
from densegrpo.components.policies.lora import FLOW_GRPO_LORA_TARGETS, LoRAConfig
from densegrpo.components.policies.sd3 import sd3_transformer_forward
from densegrpo.components.rewards.clip_preprocess import Preprocess, check_inputs
from densegrpo.contracts import registry
from densegrpo.contracts.config import ComponentSpec, RewardSpec
from densegrpo.contracts.errors import (
    CheckpointError,
    ConfigError,
    DuplicateComponentError,
    PluginImportError,
    UnknownComponentError,
    UserError,
)
from densegrpo.contracts.hub import (
    CheckpointLoadError,
    Dtype,
    WeightsNotFoundError,
    cached_file,
    hub_file,
    hub_offline,
    hub_reachable,
    is_local,
    is_repo_id,
    load_pretrained,
    load_state_dict,
    one_line,
    resolve_device,
    resolve_dtype,
)
from densegrpo.contracts.kinds import KINDS
from densegrpo.contracts.protocols import (
    AdvantageEstimator,
    CalibrationStats,
    Cond,
    DenseRewards,
    ExplorationCalibrator,
    Policy,
    RewardBatch,
    RewardModel,
    RewardNeeds,
    Sampler,
    Trajectory,
    conform,
    gaussian_expected_log_ratio,
)
from densegrpo.contracts.registry import (
    available,
    components,
    load,
    load_class,
    register,
    unregister,
)
from densegrpo.contracts.sharding import copy_into, full_tensor
from densegrpo.contracts.testing import (
    CountingPolicy,
    GaussianFlowPolicy,
    mean_brightness_reward,
)
from densegrpo.contracts.tokenizers import (
    CLIP_VOCAB_SIZE,
    check_tokenizer_size,
    clip_tokenizer,
)
from densegrpo.worlds import geneval_rules

__all__ = [
    "AdvantageEstimator",
    "CLIP_VOCAB_SIZE",
    "CalibrationStats",
    "CheckpointError",
    "CheckpointLoadError",
    "ComponentSpec",
    "Cond",
    "ConfigError",
    "CountingPolicy",
    "DenseRewards",
    "DiffusersPolicyConfig",
    "Dtype",
    "DuplicateComponentError",
    "ExplorationCalibrator",
    "FLOW_GRPO_LORA_TARGETS",
    "FlowModelParts",
    "FlowPolicyConfig",
    "FlowTransformerPolicy",
    "GaussianFlowPolicy",
    "KINDS",
    "LoRAConfig",
    "PluginImportError",
    "Policy",
    "Preprocess",
    "RewardBatch",
    "RewardModel",
    "RewardNeeds",
    "RewardSpec",
    "Sampler",
    "TinyRandomPolicy",
    "Trajectory",
    "UnknownComponentError",
    "UserError",
    "WeightsNotFoundError",
    "available",
    "cached_file",
    "check_inputs",
    "check_tokenizer_size",
    "clip_tokenizer",
    "components",
    "conform",
    "copy_into",
    "full_tensor",
    "gaussian_expected_log_ratio",
    "geneval_rules",
    "hub_file",
    "hub_load",
    "hub_offline",
    "hub_reachable",
    "is_local",
    "is_repo_id",
    "load",
    "load_class",
    "load_pretrained",
    "load_state_dict",
    "mean_brightness_reward",
    "one_line",
    "register",
    "registry",
    "resolve_device",
    "resolve_dtype",
    "sd3_transformer_forward",
    "unregister",
]
