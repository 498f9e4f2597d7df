"""Config as data: typed dataclass trees loaded from YAML with dotted overrides.

The job schemas (`JobConfig`, `TrainJobConfig`, ...) import the sections of every
engine, and engines import the loader, so schema names load lazily here.
"""

from jaxtune.config.loader import ConfigError, apply_override, from_dict, load_config, to_dict

_SCHEMA = ("JobConfig", "ModelSource", "TokenizerConfig", "TrainJobConfig")

__all__ = ["ConfigError", "apply_override", "from_dict", "load_config", "to_dict", *_SCHEMA]


def __getattr__(name):
    if name in _SCHEMA:
        from jaxtune.config import schema

        return getattr(schema, name)
    raise AttributeError(f"module 'jaxtune.config' has no attribute {name!r}")
