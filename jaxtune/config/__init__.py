"""Config as data: typed dataclass trees loaded from YAML with dotted overrides (`loader`).

The job schemas (`TrainJobConfig`, `JobConfig`, `ModelSource`, `TokenizerConfig`) are the job
layer's: `jaxtune.job`.
"""

from jaxtune.config.loader import ConfigError, apply_override, from_dict, load_config, to_dict
from jaxtune.utils.moved import moved_names

__all__ = ["ConfigError", "apply_override", "from_dict", "load_config", "to_dict"]
__getattr__ = moved_names(__name__, {name: f"jaxtune.job.{name}" for name in
                                     ("JobConfig", "ModelSource", "TokenizerConfig", "TrainJobConfig")})
