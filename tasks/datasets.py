"""Where data sets live: ``task.data_root``, else $METAPIPE_DATA, else ../shared/data next to the repository."""
from __future__ import annotations

import os
from pathlib import Path

from tasks.errors import DatasetError

_SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def data_root(configured: str | None) -> Path:
    """The folder holding the data sets (one sub-folder per data set)."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("METAPIPE_DATA"):
        return Path(os.environ["METAPIPE_DATA"]).expanduser()
    if _SHARED.is_dir():
        return _SHARED
    raise DatasetError(
        "no data root: set task.data_root in the config or the METAPIPE_DATA environment variable"
        f" (the default {_SHARED} does not exist)"
    )
