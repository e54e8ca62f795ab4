"""Configuration: frozen pydantic models loaded from YAML plus dotted overrides."""

from spear_ray.config.load import (
    ConfigError,
    config_differences,
    config_to_yaml,
    load_config,
    preset_names,
)
from spear_ray.config.schema import (
    AlgoConfig,
    BufferConfig,
    EnvConfig,
    LearnerConfig,
    ModelConfig,
    RolloutConfig,
    SpearConfig,
)

__all__ = [
    "AlgoConfig",
    "BufferConfig",
    "ConfigError",
    "EnvConfig",
    "LearnerConfig",
    "ModelConfig",
    "RolloutConfig",
    "SpearConfig",
    "config_differences",
    "config_to_yaml",
    "load_config",
    "preset_names",
]
