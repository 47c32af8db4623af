"""Typed run configuration: the sections (sections.py: frozen dataclasses, a default and a comment per field)
and their loading from YAML and ``section.field=value`` overrides (loading.py)."""

from opdistill.config.loading import (
    config_keys,
    describe,
    from_dict,
    load_config,
    reference_markdown,
    replace,
    save_config,
    to_dict,
)
from opdistill.config.sections import (
    ColdStartConfig,
    Config,
    DataConfig,
    EnvConfig,
    LoraConfig,
    ModelSpec,
    ObjectiveConfig,
    OpsdConfig,
    OptimConfig,
    RolloutConfig,
    TrainConfig,
    TrdConfig,
    WeightingConfig,
    parse_preset,
)

__all__ = [
    "ColdStartConfig",
    "Config",
    "DataConfig",
    "EnvConfig",
    "LoraConfig",
    "ModelSpec",
    "ObjectiveConfig",
    "OpsdConfig",
    "OptimConfig",
    "RolloutConfig",
    "TrainConfig",
    "TrdConfig",
    "WeightingConfig",
    "config_keys",
    "describe",
    "from_dict",
    "load_config",
    "parse_preset",
    "reference_markdown",
    "replace",
    "save_config",
    "to_dict",
]
