"""Where the experiments' data lives: ``$GENLORA_DATA``, else ``../shared/data``."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV_VAR = "GENLORA_DATA"
"""Environment variable naming the root of the local data directory."""

_REPO_ROOT = Path(__file__).resolve().parents[2]


def default_data_dir() -> Path | None:
    """Returns the local data root, or None when none is configured or present.

    The root is ``$GENLORA_DATA`` when that variable is set (whether or not the
    directory exists, so that a wrong setting fails loudly later), else
    ``../shared/data`` next to the repository root when that directory exists.
    """
    configured = os.environ.get(DATA_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    sibling = _REPO_ROOT.parent / "shared" / "data"
    return sibling if sibling.is_dir() else None
