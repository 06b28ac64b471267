"""The pipeline's errors: what a user can fix (``UserError`` kinds) and why a run stopped.

Kept in a module of its own, free of heavy imports, so the CLI can catch them
without loading torch or MLflow first. Every ``UserError`` (these and tasks/errors.py's
``DatasetError`` and ``StoreError``) is printed as one paragraph, exit status 2.
"""
from tasks.errors import UserError


class ConfigError(UserError):
    """A config file or override that cannot be used; the message names key, value and file."""


class CheckpointError(UserError):
    """A checkpoint that is missing, altered or of another format; names the file."""


class ExportError(UserError):
    """An export directory that cannot be loaded; names the file and the problem."""


class RunError(UserError):
    """A run id that cannot be read back (unknown, or without checkpoints); names the run."""


class SubmitError(UserError):
    """A job that cannot be submitted or failed on the cluster; names the config, address or job."""


class RegistryError(UserError):
    """A model that cannot be registered (no logged model, a bad name); names the run and the name."""


class TrackingError(RuntimeError):
    """MLflow refused a write, or stayed unreachable past ``tracking.outage_timeout_s``; names the run."""


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite gradients in a row); a checkpoint was written."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``ray job stop``, a scheduler, ``timeout``) stopped training; handled as Ctrl-C (final checkpoint)."""
