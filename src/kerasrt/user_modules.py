"""Python code a user names on the command line (custom Keras classes, a calibration data
generator): a ``.py`` file's path or an importable module name, loaded as a module."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

from kerasrt.errors import KerasRTError


def load_module(spec: str, what: str, error: type[KerasRTError] = KerasRTError) -> ModuleType:
    """The module ``spec`` names; ``error`` (naming ``what`` the module is for) when the file
    does not exist or the module does not import."""
    try:
        if spec.endswith(".py"):
            path = Path(spec)
            if not path.exists():
                raise error(f"{what} file {path} does not exist")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            return module
        return importlib.import_module(spec)
    except ImportError as exc:
        raise error(f"cannot import {what} module {spec!r}: {exc}") from None
