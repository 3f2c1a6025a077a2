"""The errors a user fixes in the config or the data (their message names the key or file and the
fix). A module of their own so that any stage can raise them without importing the checks."""


class ConfigError(ValueError):
    """A config value that cannot work."""


class DataError(ValueError):
    """Data that cannot give a meaningful result (empty splits, too many unreadable files)."""
