"""Errors a user can act on. The CLI prints them without a traceback."""


class LeviathanError(Exception):
    """Base class: the message names the offending key, file or value."""


class ConfigError(LeviathanError):
    """A config key is unknown, mistyped or impossible; the message gives its dotted path."""


class DataError(LeviathanError):
    """An input file or prepared dataset is missing, empty, undecodable or inconsistent."""


class CheckpointError(LeviathanError):
    """A checkpoint is missing, truncated, corrupt or from another model."""


class RunDirError(LeviathanError):
    """The run folder is in use by another training, or holds a run that is not this one."""


class StorageError(LeviathanError):
    """A file cannot be written: the disk is full, or the folder is missing or read-only."""


class TrainingError(LeviathanError):
    """Training cannot go on (the loss diverged); the last checkpoint is kept."""


class Interrupted(LeviathanError):
    """The user stopped the run (Ctrl-C) and a checkpoint was written: exit status 130."""
