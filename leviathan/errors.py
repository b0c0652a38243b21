"""Errors a user can act on. The CLI prints them without a traceback."""


class LeviathanError(Exception):
    """Base class: the message names the offending key, file or value."""


class ConfigError(LeviathanError):
    """A config key is unknown, mistyped or impossible; the message gives its dotted path."""


class DataError(LeviathanError):
    """An input file or prepared dataset is missing, empty, undecodable or inconsistent."""


class CheckpointError(LeviathanError):
    """A checkpoint is missing, truncated, corrupt or from another model."""
