"""Every exception clip-trainer raises on purpose, in one place: what the command prints as one line (and with which
exit status), and what a library user catches. Standard library only, so that every module can import it."""


class ConfigError(ValueError):
    """A mistake in the run's configuration or data. The command line prints its message alone, with no traceback."""


class SaveError(RuntimeError):
    """Writing into `output_dir` failed (disk full, read-only); the message says what was kept and how to go on."""


class PublishError(RuntimeError):
    """Exporting or publishing failed after the model was saved locally; the message says where it is."""


class InvalidValueError(ConfigError):
    """A [`ConfigError`] about one option's value; `key` names the option, so that the command line can tell where
    the value came from (a config file or a flag)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class BadSampleError(ValueError):
    """
    A sample that cannot be used: a missing, empty, truncated, oversized or non-image file, or a missing caption.

    The collator catches this (and only this) to skip the sample, so anything that signals a bug in our code must
    raise something else.

    Args:
        reason (`str`):
            Short human-readable cause, for example `"image file not found: /data/x.jpg"`, `"truncated image"` or
            `"empty caption"`. It is also the exception message.
    """

    def __init__(self, reason: str):
        # A single positional argument keeps the exception picklable and lets torch's worker `ExceptionWrapper`
        # re-create it from a message string in the main process.
        super().__init__(reason)
        self.reason = reason


class UnsupportedImageProcessorError(ValueError):
    """The image processor asks for a step that [`ImagePreprocessor`] does not implement."""


class NonFiniteTrainingError(RuntimeError):
    """Training stopped because the loss or the gradients stayed NaN or inf for too many optimizer steps in a row, or
    because no step had a usable sample for as long (`fix` says which, and what to do)."""


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal after saving a checkpoint; `resume_from_checkpoint=true` continues it."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.signal_number = signal_number


class ONNXExportError(RuntimeError):
    """The exported graphs do not reproduce the PyTorch model, or could not be written."""


class OpenCLIPConversionError(ValueError):
    """The open_clip model, tokenizer or preprocessing cannot be mapped onto `CLIPModel`/`CLIPProcessor` exactly."""


class ShardCutError(Exception):
    """A tar shard could not be read to its end (`samples`: the samples read before the cut). Raised and handled
    inside the shard reader, which logs the shard and goes on."""

    def __init__(self, samples: int, error: Exception) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.samples = samples


class CaptionValueError(ValueError):
    """A caption member (or json key) that holds neither text nor a list of texts; its message says what it holds."""
