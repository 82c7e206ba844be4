"""The exceptions fedtrust raises on bad input: one tree, one-line messages.

The CLI catches `FedtrustError` only and prints its message; any other exception is a bug and
shows its traceback. Each subclass also derives from the builtin a caller would expect
(`ValueError` for a bad value, `RuntimeError` for a failed run), so `except ValueError` keeps
working.
"""

from __future__ import annotations


class FedtrustError(Exception):
    """Base of every error fedtrust raises on purpose (bad input, an impossible request)."""


class ConfigError(FedtrustError, ValueError):
    """A configuration value is unknown, ill-typed or out of range (names file, key, value)."""


class DataError(FedtrustError, ValueError):
    """A data file or dataset is missing, malformed or lacks a column (names file, line)."""


class ModelError(FedtrustError, ValueError):
    """A model folder or hub id is not the kind of model the command needs."""


class RunFolderError(FedtrustError, ValueError):
    """A run folder is missing, incomplete or belongs to another config."""


class FederationError(FedtrustError, RuntimeError):
    """The federation cannot go on: devices did not check in, or every device failed."""


class FairnessError(FedtrustError, ValueError):
    """A fairness audit cannot run on the given model or data."""


class PrivacyError(FedtrustError):
    """Base class of every error raised by fedtrust.privacy."""
