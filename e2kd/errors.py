"""Exceptions raised by e2kd. Each carries a one-line message that names the fix."""


class E2KDError(Exception):
    """Base class of every error e2kd raises on bad input."""


class ConfigError(E2KDError):
    """A configuration file or override is missing, malformed or invalid."""


class PluginError(E2KDError):
    """A plugin is unknown, misdeclared, or registered twice."""


class ModelError(E2KDError):
    """A model cannot be used as asked (missing layer, bad checkpoint, ...)."""


class WeightsNotCached(ModelError):
    """Named weights are not in the local cache and could not (or may not) be downloaded."""


class DataError(E2KDError):
    """A dataset folder, file or image is missing, malformed or unreadable."""


class TrainingError(E2KDError):
    """Training cannot go on (e.g. the loss became NaN or infinite)."""


class CacheError(E2KDError):
    """A frozen-teacher cache is missing, stale (made for another setting) or corrupt."""


class StaleCacheError(CacheError):
    """A frozen-teacher cache was made for another teacher, explainer, dataset or preprocessing."""
