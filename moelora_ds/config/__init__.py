"""The training configuration: typed sections, YAML/JSON loading, `--section.key=value` overrides, validation.

Every field is typed, defaulted and documented in `sections`; `load_config` is the one place a run's configuration
is read and checked, before any rank loads a model.
"""

from moelora_ds.config.loading import load_config, parse_overrides, read_config_file
from moelora_ds.config.sections import (
    DEFAULT_GGUF_PACKAGE,
    REPO_ROOT,
    ConfigError,
    DataConfig,
    HealthConfig,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    SchedulerConfig,
    TrainLoopConfig,
)
from moelora_ds.config.validation import advisories, config_to_dict, validate

__all__ = ["DEFAULT_GGUF_PACKAGE", "REPO_ROOT", "ConfigError", "DataConfig", "HealthConfig", "ModelConfig",
           "OptimizerConfig", "RunConfig", "SchedulerConfig", "TrainLoopConfig", "advisories", "config_to_dict",
           "load_config", "parse_overrides", "read_config_file", "validate"]
