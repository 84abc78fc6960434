"""The package version, in one place (the model card and the package both read it)."""

__version__ = "0.3.0"
