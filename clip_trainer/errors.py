"""The error a configuration or data mistake raises, apart from the argument classes so that every module (the
file-pattern checks the arguments call among them) can raise it without importing them."""


class ConfigError(ValueError):
    """A mistake in the run's configuration or data. The command line prints its message alone, with no traceback."""
