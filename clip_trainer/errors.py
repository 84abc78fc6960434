"""The error a configuration or data mistake raises, apart from the argument classes so that every module (the
file-pattern checks the arguments call among them) can raise it without importing them."""


class ConfigError(ValueError):
    """A mistake in the run's configuration or data. The command line prints its message alone, with no traceback."""


class SaveError(RuntimeError):
    """Writing into `output_dir` failed (disk full, read-only); the message says what was kept and how to go on."""


class PublishError(RuntimeError):
    """Exporting or publishing failed after the model was saved locally; the message says where it is."""
