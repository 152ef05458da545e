"""User-facing errors. Each message names the file or setting at fault and what to do about it."""


class SelfsupError(Exception):
    """Base class: the CLI prints these as one clear message and exits non-zero, no traceback."""


class ConfigError(SelfsupError):
    """A setting is unknown, of the wrong type or impossible."""


class DataError(SelfsupError):
    """A data source is missing, empty, unreadable or holds nothing usable."""


class CheckpointError(SelfsupError):
    """A checkpoint is missing, broken, or belongs to another config, method or version."""


class CollapseError(SelfsupError):
    """The collapse monitors saw a collapsed representation for several checks in a row."""


class NumericalError(SelfsupError):
    """A loss became NaN or Inf."""
