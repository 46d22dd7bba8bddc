"""Run configuration: YAML files plus ``key=value`` overrides, validated into typed objects.

Every value is checked before any work starts. An unknown key, a wrong type or an
impossible combination is a :class:`ConfigError` whose message names the key and says what
would be valid. The defaults are the built-in Flow-DPPO run on the digits task.

Each section lives in the module of its name (``sampler``, ``objective``, ``train``, ...),
the whole run's :class:`Config` in ``run``, reading and writing in ``loader``; everything
is importable from here (README.md in this folder).
"""

from __future__ import annotations

from flowdppo.config.algorithm import (
    KERNEL_OF_PRESET,
    KERNELS,
    OBJECTIVES,
    PAPER_ALGORITHMS,
    parse_algorithm,
)
from flowdppo.config.base import ConfigError
from flowdppo.config.base import _Section as _Section
from flowdppo.config.data import DataConfig
from flowdppo.config.errors import _explain as _explain
from flowdppo.config.errors import _section_model as _section_model
from flowdppo.config.errors import _suggest as _suggest
from flowdppo.config.loader import _BOMS as _BOMS
from flowdppo.config.loader import _merge as _merge
from flowdppo.config.loader import _set_path as _set_path
from flowdppo.config.loader import _source_of as _source_of
from flowdppo.config.loader import (
    config_from_dict,
    dump_config,
    explain_config,
    load_config,
    parse_overrides,
    read_yaml,
)
from flowdppo.config.log import LogConfig
from flowdppo.config.model import DIFFUSERS_KINDS, MODEL_KINDS, ModelConfig
from flowdppo.config.nft import NftConfig
from flowdppo.config.objective import _TRUST as _TRUST
from flowdppo.config.objective import (
    OBJECTIVE_OPTION_OWNERS,
    ObjectiveConfig,
    drop_foreign_options,
)
from flowdppo.config.reward import RewardConfig, WeightSchedule, reward_weights
from flowdppo.config.run import Config, Continuation, ref_kl_plan
from flowdppo.config.sampler import SamplerConfig, sde_window_bounds
from flowdppo.config.train import TRAIN_OPTION_OWNERS, EmaConfig, TrainConfig
from flowdppo.config.trust_region import (
    CPS_CLIP_RANGE_PER_STEP,
    CPS_RECIPE,
    DPPO_CPS_THRESHOLD_PER_STEP,
    TRUST_REGION_KEYS,
    check_trust_region_forms,
    describe_trust_region,
    per_step_factor,
    resolve_trust_region,
)

__all__ = [
    "CPS_CLIP_RANGE_PER_STEP",
    "CPS_RECIPE",
    "DIFFUSERS_KINDS",
    "DPPO_CPS_THRESHOLD_PER_STEP",
    "KERNELS",
    "KERNEL_OF_PRESET",
    "MODEL_KINDS",
    "OBJECTIVES",
    "OBJECTIVE_OPTION_OWNERS",
    "PAPER_ALGORITHMS",
    "TRAIN_OPTION_OWNERS",
    "TRUST_REGION_KEYS",
    "Config",
    "ConfigError",
    "Continuation",
    "DataConfig",
    "EmaConfig",
    "LogConfig",
    "ModelConfig",
    "NftConfig",
    "ObjectiveConfig",
    "RewardConfig",
    "SamplerConfig",
    "TrainConfig",
    "WeightSchedule",
    "check_trust_region_forms",
    "config_from_dict",
    "describe_trust_region",
    "drop_foreign_options",
    "dump_config",
    "explain_config",
    "load_config",
    "parse_algorithm",
    "parse_overrides",
    "per_step_factor",
    "read_yaml",
    "ref_kl_plan",
    "resolve_trust_region",
    "reward_weights",
    "sde_window_bounds",
]
