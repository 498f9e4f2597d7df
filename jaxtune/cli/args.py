"""The command line's shared argument form: ``[CONFIG.yaml] key=value ...``."""

from __future__ import annotations

from jaxtune.config import ConfigError


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """[CONFIG.yaml] key=value ... -> (config path or None, overrides)."""
    config = None
    overrides = []
    for a in args:
        if "=" in a:
            overrides.append(a)
        elif config is None:
            config = a
        else:
            raise ConfigError(f"unexpected argument {a!r}: give one config file and key=value overrides")
    return config, overrides
