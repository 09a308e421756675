"""kerasrt's per-machine cache: small JSON files of measured facts (kernel tactics, whether
compiled engine packages load here), under $KERASRT_CACHE_DIR or ~/.cache/kerasrt.

A cache is an optimization: an unreadable file is ignored with a warning, an unwritable
folder never fails a build."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """$KERASRT_CACHE_DIR, else ~/.cache/kerasrt."""
    return Path(os.environ.get("KERASRT_CACHE_DIR") or Path.home() / ".cache" / "kerasrt")


def read_json(name: str) -> Any | None:
    """The cached document ``name``, or None when missing or unreadable (warned)."""
    path = cache_dir() / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring the unreadable cache file %s (%s)", path, exc)
        return None


def write_json(name: str, data: Any) -> None:
    """Replace the cached document ``name`` atomically (never half-written)."""
    folder = cache_dir()
    path = folder / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write the cache file %s (%s)", path, exc)
