"""The few exception types users see. Each message says what went wrong, where, and how to fix it."""


class PrefalignError(Exception):
    """Base class for every error prefalign raises on purpose."""


class ConfigError(PrefalignError, ValueError):
    """A config key is unknown, has the wrong type, or holds a value that cannot work."""


class DataError(PrefalignError, ValueError):
    """Input data is unreadable or malformed; the message names file, row and column."""


class ModelError(PrefalignError, ValueError):
    """A model or tokenizer cannot be loaded or does not fit the job."""


class TrainingError(PrefalignError, RuntimeError):
    """Training cannot go on (for example the loss became NaN); the last good checkpoint is kept."""


class OutputError(PrefalignError, OSError):
    """A file or folder cannot be written (a read-only folder, a full disk, ...); the message names the path
    and what to do."""
