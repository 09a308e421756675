"""Test session setup: Keras on its torch backend, passes verified, float32 references."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("KERASRT_CHECK_PASSES", "1")  # verify(graph) after every optimizer pass

import kerasrt_testing  # noqa: F401  (sets Keras's CUDA math to IEEE float32)
