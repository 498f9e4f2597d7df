"""Config as data: typed dataclass trees loaded from YAML with dotted overrides."""

from jaxtune.config.loader import ConfigError, apply_override, from_dict, load_config, to_dict
from jaxtune.config.schema import JobConfig, ModelSource, TokenizerConfig

__all__ = ["ConfigError", "JobConfig", "ModelSource", "TokenizerConfig", "apply_override", "from_dict",
           "load_config", "to_dict"]
