"""kerasrt's compiled Triton kernels carried in artifacts, so that a machine that never
compiled them runs a loaded model at once.

A kerasrt op's CUDA kernel is compiled by Triton on its first call on a machine (about 1.5 s
each on the H100 machine). The AOTInductor packages of an artifact call kerasrt's ops, so a
model loaded on a fresh machine compiled those kernels during its first inference. Now each
op call records the compiled kernel it launched (``note``: its folder in Triton's cache);
``save`` copies those kernels' files from Triton's cache into the artifact and ``restore``
puts them into Triton's cache on the loading machine, where Triton finds them and compiles
nothing. Restoring happens only where the artifact's engine environment (GPU, torch,
Triton versions) is the loading machine's, as for the packages themselves.

Triton keeps, per kernel, a folder named by its cache key (an encoded hash) holding the kernel's metadata (JSON),
its intermediate forms (text) and its GPU binary, and a group index (``__grp__*.json``) of
those files by absolute path; ``restore`` rewrites the index for the new folder. The files
are data: nothing runs when they are restored. A kernel runs only when its op is called,
like the packages' own code.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_USED: dict[str, Path] = {}
"""The Triton kernels kerasrt's ops launched in this process: cache key -> its cache folder
(where Triton put its files then: Inductor points TRITON_CACHE_DIR elsewhere while it
compiles)."""
_KEY = re.compile(r"[A-Za-z0-9_-]{16,128}")
"""A cache folder's name as Triton makes it (an encoded hash: no dots, no separators)."""
_GROUP = "__grp__"


def note(compiled: Any) -> None:
    """Record the Triton kernel an op call launched (what ``JITFunction.run`` returned: its
    files by path, in its cache folder)."""
    files = getattr(compiled, "metadata_group", None)
    if not (isinstance(files, dict) and files):
        return
    folders = {Path(p).parent for p in files.values()}
    if len(folders) == 1 and _KEY.fullmatch((folder := folders.pop()).name):
        _USED[folder.name] = folder


def used() -> list[str]:
    """The recorded kernels' cache keys, sorted."""
    return sorted(_USED)


def cache_folder() -> Path | None:
    """Triton's cache folder for kernels compiled from now on (kerasrt sets TRITON_CACHE_DIR
    at import: ``cache.share_with_triton``)."""
    folder = os.environ.get("TRITON_CACHE_DIR")
    return Path(folder) if folder else None


def _kernel_files(folder: Path) -> list[Path]:
    """The regular files of one cached kernel (no locks, no temporary files)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.is_symlink() and ".tmp" not in p.name and p.name != "lock"
    )


def save(destination: Path) -> list[str]:
    """Copy the kernels kerasrt's ops launched in this process into ``destination`` (one folder
    each); returns the cache keys of those whose files are still complete in Triton's cache."""
    saved = []
    for key, folder in sorted(_USED.items()):
        if not folder.is_dir() or not any(p.name.startswith(_GROUP) for p in folder.iterdir()):
            log.warning("the compiled Triton kernel %s left the cache; the artifact will not carry it", key)
            continue
        target = destination / key
        target.mkdir(parents=True, exist_ok=True)
        for path in _kernel_files(folder):
            shutil.copyfile(path, target / path.name)
        saved.append(key)
    return saved


def restore(source: Path) -> int:
    """Put the kernels an artifact carries (``source``, as ``save`` wrote it) into Triton's
    cache where it has not got them; returns how many were added. Never fails a load: a
    kernel that cannot be restored is compiled at its first call, as before."""
    cache = cache_folder()
    if cache is None or not source.is_dir():
        return 0
    added = 0
    for folder in sorted(source.iterdir()):
        target = cache / folder.name
        if not (folder.is_dir() and _KEY.fullmatch(folder.name)) or target.exists():
            continue
        try:
            added += _restore_one(folder, target)
        except (OSError, ValueError) as exc:
            log.warning(
                "cannot restore the compiled Triton kernel %s (%s); it compiles at first use",
                folder.name,
                exc,
            )
    return added


def _restore_one(folder: Path, target: Path) -> int:
    """Copy one kernel's files into a temporary sibling of ``target``, point its group index
    at their new paths, and move it into place (Triton never sees a half-written kernel)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for path in _kernel_files(folder):
            shutil.copyfile(path, staging / path.name)
        groups = [p for p in staging.iterdir() if p.name.startswith(_GROUP)]
        if not groups:
            raise ValueError("no group index")
        for group in groups:
            children = json.loads(group.read_text())["child_paths"]
            moved = {name: str(target / Path(path).name) for name, path in children.items()}
            if any(not (staging / Path(p).name).is_file() for p in moved.values()):
                raise ValueError(f"{group.name} lists files the artifact does not carry")
            group.write_text(json.dumps({"child_paths": moved}))
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return 1
