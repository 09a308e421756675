"""Every architecture in ``keras.applications`` converts whole and matches Keras.

Each model is built with ``weights=None`` at the smallest input size Keras accepts for it
(32x32; 75x75 for InceptionV3 / InceptionResNetV2, 71x71 for Xception; NASNet takes 32
when given an explicit input shape), with logits out (``classifier_activation=None``),
batch 2. Inputs are fresh random images: N(0, 1) draws from ``np.random.default_rng``
mapped to pixels 127.5 +- 50 and passed through the architecture's own
``preprocess_input``, so every model sees inputs on the scale it expects (EfficientNet,
EfficientNetV2, ConvNeXt and MobileNetV3 rescale pixels themselves: plain N(0, 1) inputs
would reach them squashed 255-fold). ``kerasrt_testing.randomize_weights`` gives every bias, norm
scale/offset and ConvNeXt layer scale random values and calibrates the BatchNormalization
statistics on a 16-image batch (see its docstring), so that no lowering can hide behind
identity batch norms or zero biases, and the logits really depend on the input. Asserted:

* the Keras logits are finite and the two images' logits differ by more than 1e-3 of the
  logit scale (else the comparison below proves nothing; they differ by 1e-2 (VGG19,
  EfficientNetB7) to 1.0);
* the converted graph has no ``keras_layer`` fallback node (every layer lowered to IR ops);
* the output shape equals Keras's;
* ``max|kerasrt - keras| <= 1e-4 * max|keras| + 1e-5``: a float32 tolerance relative to the
  largest logit, with Keras's own ``model(x, training=False)`` as the reference. No model
  needs a looser one: the worst, ResNet152, is at 2.5e-5 (kerasrt folds batch norms into
  convolutions, so the sums round differently; Keras itself is 1e-5 off float64 there).

ResNet50, MobileNetV3Small, EfficientNetB0 and ConvNeXtTiny also go through
``Converter.save`` / ``kerasrt.load``; the loaded model must give bit-identical outputs.

NASNetMobile refuses to build on the torch backend, so ``kerasrt_testing.application``
builds it through the generic ``NASNet`` constructor with ``NASNetMobile``'s arguments.

The expensive models are marked ``slow``. The whole file takes 4-6 minutes with
``pytest -n 2`` on 2 CPU cores, nearly all of it tracing the models' layers.
"""

from __future__ import annotations

import gc
import importlib

import keras
import numpy as np
import pytest
import torch

import kerasrt
from kerasrt_testing import application, randomize_weights

# name -> smallest accepted input side (default 32)
MIN_SIZE = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}
# the expensive ones (many parameters or many layers to trace), most expensive first: they
# run first, so that ``-n 2`` ends on short tests instead of a long tail
SLOW = (
    "NASNetLarge",
    "EfficientNetV2L",
    "DenseNet201",
    "DenseNet169",
    "ConvNeXtXLarge",
    "EfficientNetB7",
    "NASNetMobile",
    "ResNet152V2",
    "ResNet152",
    "InceptionResNetV2",
    "ConvNeXtLarge",
    "EfficientNetB6",
    "EfficientNetB5",
    "EfficientNetV2M",
    "ConvNeXtBase",
)
ROUND_TRIP = {"ResNet50", "MobileNetV3Small", "EfficientNetB0", "ConvNeXtTiny"}
ARCHITECTURES = sorted(n for n in dir(keras.applications) if n[:1].isupper())


def _params():
    for name in [n for n in SLOW if n in ARCHITECTURES] + [n for n in ARCHITECTURES if n not in SLOW]:
        marks = [pytest.mark.slow] if name in SLOW else []
        yield pytest.param(name, MIN_SIZE.get(name, 32), id=name, marks=marks)


def _preprocess(name: str):
    """The architecture's own ``preprocess_input`` (from the module that defines it)."""
    return importlib.import_module(getattr(keras.applications, name).__module__).preprocess_input


def _images(name: str, rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``n`` random images, N(0, 1) draws mapped to pixels 127.5 +- 50, preprocessed."""
    pixels = 127.5 + 50.0 * rng.standard_normal((n, size, size, 3)).astype("float32")
    return np.asarray(keras.ops.convert_to_numpy(_preprocess(name)(pixels)), dtype="float32")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The inputs are tiny and conversion is tracing-bound: intra-op threads only cost
    (and under ``-n 2`` oversubscribe the cores: about 2.5x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_keras():
    keras.backend.clear_session()
    yield
    gc.collect()
    keras.backend.clear_session()


def test_architecture_list_is_covered():
    """A new keras.applications architecture must get a size entry here if it needs one."""
    assert len(ARCHITECTURES) >= 40
    assert set(MIN_SIZE) | set(SLOW) | ROUND_TRIP <= set(ARCHITECTURES)


@pytest.mark.parametrize(("name", "size"), list(_params()))
def test_application_converts_and_matches(name, size, tmp_path, fresh_keras):
    seed = ARCHITECTURES.index(name)
    keras.utils.set_random_seed(seed)  # the kernels' initializers: reproducible runs
    rng = np.random.default_rng(seed + 1000)
    model = application(name, size)
    x = _images(name, rng, 2, size)
    randomize_weights(model, seed, calibration=np.concatenate([x, _images(name, rng, 14, size)]))
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    scale = float(np.max(np.abs(expected)))
    assert np.all(np.isfinite(expected)), "the randomized Keras model itself overflows"
    # the comparison has teeth only where the logits depend on the input
    assert np.max(np.abs(expected[0] - expected[1])) > 1e-3 * scale, "the logits ignore the input"

    conv = kerasrt.Converter(model, batch_size=2)
    optimized = conv.convert()
    fallbacks = {
        n.attrs["layer"]: n.attrs["reason"] for n in optimized.primary_graph().nodes if n.op == "keras_layer"
    }
    assert not fallbacks, f"{name}: layers fell back to Keras: {fallbacks}"

    got = optimized(x)
    assert got.shape == expected.shape
    err = float(np.max(np.abs(got - expected)))
    assert err <= 1e-4 * scale + 1e-5, f"{name}: max abs error {err:.3g} (max |logit| {scale:.3g})"

    if name in ROUND_TRIP:
        path = conv.save(tmp_path / "a")
        loaded = kerasrt.load(path)
        np.testing.assert_array_equal(loaded(x), got)
        del loaded
    del conv, optimized, model
