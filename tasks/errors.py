"""The two ways tasks/ refuses input: a bad data set folder and a bad episode store.

Both messages name the file and what is wrong with it, so the CLI can print them
as they are, without a traceback.
"""
from __future__ import annotations


class DatasetError(ValueError):
    """A data set folder that cannot be read: wrong layout, missing classes, unreadable images."""


class StoreError(ValueError):
    """An episode store that cannot be trusted: missing, truncated or altered files, mismatches."""
