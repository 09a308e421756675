"""A stand-in for one of kerasrt's Triton kernel modules (``CONFIGS``, ``launch``) that
records each launch in a file, for the compile-worker tests (workers import it by name)."""

from __future__ import annotations

import os

import torch

CONFIGS = [(16,), (32,), (64,)]


def launch(config: tuple[int], x: torch.Tensor, flag: str, record: str) -> None:
    if config[0] == 64:
        raise ValueError("this config does not compile")  # the worker goes on with the rest
    with open(record, "a") as f:
        f.write(f"{os.getpid()} {config[0]} {list(x.shape)} {list(x.stride())} {x.dtype} {flag}\n")
