"""Errors a user can fix; the CLI prints their message (naming file, key and value) and exits non-zero.

Kept in a module of its own, free of heavy imports, so the CLI can catch them
without loading torch or MLflow first.
"""


class CheckpointError(ValueError):
    """A checkpoint that is missing, altered or of another format; names the file."""


class ExportError(ValueError):
    """An export directory that cannot be loaded; names the file and the problem."""


class RunError(ValueError):
    """A run id that cannot be read back (unknown, or without checkpoints); names the run."""


class TrackingError(RuntimeError):
    """MLflow refused a write, or stayed unreachable past ``tracking.outage_timeout_s``; names the run."""


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite gradients in a row); a checkpoint was written."""
