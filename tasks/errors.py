"""Errors a user can fix: one base, ``UserError``, and the two ways tasks/ refuses input.

Every message names the file, key or value and what is wrong with it, so the CLI
prints it as it is, without a traceback, and exits 2. pipeline/errors.py adds the
pipeline's own kinds (config, checkpoint, export, run, submit, registry) on this base.
"""
from __future__ import annotations


class UserError(ValueError):
    """Input a user can fix: a bad config, store, data set, checkpoint, export, run id, job or model name."""


class DatasetError(UserError):
    """A data set folder that cannot be read: wrong layout, missing classes, unreadable images."""


class StoreError(UserError):
    """An episode store that cannot be trusted: missing, truncated or altered files, mismatches."""
