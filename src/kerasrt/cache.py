"""kerasrt's per-machine cache: small JSON files of measured facts (kernel tactics, whether
compiled engine packages load here) and Triton's compiled kernels, under $KERASRT_CACHE_DIR or
~/.cache/kerasrt.

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


def share_with_triton() -> None:
    """Keep Triton's compiled kernels in kerasrt's cache folder (``triton/``), unless the user
    set TRITON_CACHE_DIR. Inductor moves Triton's cache into its own folder the first time it
    compiles a kernel in a process, so kerasrt's kernels compiled by a converting process
    (which runs Inductor) landed where a process that only loads an artifact never looks, and
    its first inference recompiled them (2.2 s for ResNet50's, H200). Set before Inductor
    runs, the one folder serves every process; Inductor keeps a folder that is already set."""
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache_dir() / "triton"))
