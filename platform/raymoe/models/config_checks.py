"""Validation of model (and adapter) config values, for `__post_init__` checks.

`raymoe.config` re-exports both names, so a run config's loader reports model errors the same way
as its own (one `ConfigError` class), while `raymoe.models` needs neither YAML nor the loader.
"""


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names the key."""


def require(condition: bool, message: str) -> None:
    """Raises ConfigError(message) unless `condition`; for `__post_init__` checks."""
    if not condition:
        raise ConfigError(message)
