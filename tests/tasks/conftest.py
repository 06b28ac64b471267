"""Data set fixtures: the real Omniglot table (loaded once per session) and small generated data sets."""
from __future__ import annotations

from pathlib import Path

import pytest

from tasks.families import omniglot
from tasks.families.omniglot import OmniglotTask
from tasks.images import ImageTable
from tests.helpers import write_omniglot


@pytest.fixture(scope="session")
def small_omniglot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data root of a small Omniglot in torchvision's layout (do not modify; copy it to damage it)."""
    return write_omniglot(tmp_path_factory.mktemp("data"), "torchvision")


@pytest.fixture(scope="session")
def omniglot_table() -> ImageTable:
    """The real Omniglot (../shared/data/omniglot) decoded once per session (~10 s)."""
    return omniglot.load(OmniglotTask())


