"""INT8/FP8 post-training quantization on the CPU: Q/DQ numerics against a float reference,
the calibrators on known distributions, placement rules, the accuracy-aware search, the
calibration table through save/load, bad calibration data, and the accuracy of the embedded
digits CNN (a trained model on real data)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import torch
from keras import layers as L

import kerasrt
from kerasrt.demo import DATA_PATH, MODEL_PATH
from kerasrt.errors import ConversionError
from kerasrt.ir.ops import KERNEL, dequantize, quantize
from kerasrt.quantization.calibrate import CalibrationError
from kerasrt.quantization.calibrators import CALIBRATORS, RangeObserver, calibrate_amax, weight_scales
from kerasrt_testing import random_input, randomize
from kernel_testing import TableTuner


def batches_of(x: np.ndarray, size: int = 16):
    return lambda: (x[i : i + size] for i in range(0, len(x), size))


def sites_of(model: kerasrt.OptimizedModel) -> dict[str, dict]:
    return {s["key"]: s for s in model.primary_graph().meta["quantization"]["sites"]}


# -- Q/DQ numerics ---------------------------------------------------------------------------
def test_int8_round_trip_error_is_half_a_step_inside_the_range_and_saturates_outside() -> None:
    x = torch.randn(10_000, dtype=torch.float64).float() * 3
    scale = torch.tensor(2.5 / 127)
    q = quantize(x, scale)
    assert q.dtype == torch.int8
    back = dequantize(q, scale)
    inside = x.abs() <= 2.5
    assert float((back - x)[inside].abs().max()) <= float(scale) / 2 + 1e-7
    assert torch.equal(q[x > 2.6], torch.full_like(q[x > 2.6], 127))
    assert torch.equal(q[x < -2.6], torch.full_like(q[x < -2.6], -128))


def test_per_channel_scales_apply_along_their_axis() -> None:
    w = torch.randn(4, 6) * torch.tensor([1.0, 10.0, 100.0, 0.0])[:, None]
    scales = weight_scales(w, 0, "int8")
    assert torch.allclose(scales[:3], w.abs().amax(dim=1)[:3] / 127)
    assert float(scales[3]) == 1.0  # an all-zero channel
    q = quantize(w, scales, axis=0)
    assert int(q[:3].abs().amax(dim=1).min()) == 127  # each channel uses the whole range
    error = (dequantize(q, scales, axis=0) - w).abs()
    assert bool((error <= scales[:, None] / 2 + 1e-6).all())


def test_fp8_round_trip_has_e4m3_relative_error_and_saturates_at_448() -> None:
    x = torch.exp(torch.linspace(-4, 5, 2001)) * torch.sign(torch.randn(2001))
    scale = torch.tensor(60.0 / 448)
    q = quantize(x, scale, dtype="float8_e4m3fn")
    assert q.dtype == torch.float8_e4m3fn
    back = dequantize(q, scale)
    normal = (x.abs() / scale >= 2**-6) & (x.abs() <= 60)
    relative = ((back - x).abs() / x.abs())[normal]
    assert float(relative.max()) <= 2**-4 + 1e-6  # 3 mantissa bits: half a step is 1/16
    assert float(back.abs().max()) == pytest.approx(60.0)


# -- calibrators -----------------------------------------------------------------------------
def observed(data: torch.Tensor, chunks: int = 4) -> RangeObserver:
    observer = RangeObserver()
    for part in data.chunk(chunks):
        observer.update(part)
    return observer


@pytest.fixture(scope="module")
def gaussian() -> torch.Tensor:
    return torch.randn(400_000, generator=torch.Generator().manual_seed(0))


def test_observer_grows_its_range_without_losing_counts() -> None:
    data = torch.cat([torch.rand(1000), torch.rand(1000) * 10, torch.rand(1000) * 100])
    observer = observed(data, 3)  # each chunk beyond the range so far
    assert observer.amax == pytest.approx(float(data.max()))
    assert observer.hist.sum() + observer.zeros == data.numel()
    assert observer.edge > observer.amax


def test_max_and_percentile_match_the_data(gaussian: torch.Tensor) -> None:
    observer = observed(gaussian)
    assert calibrate_amax(observer, "max", "int8") == pytest.approx(float(gaussian.abs().max()))
    expected = float(torch.quantile(gaussian.abs()[:200_000], 0.9999))
    assert calibrate_amax(observer, "percentile", "int8") == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    # least-squares 8-bit clipping of a unit Gaussian is near 4 sigma, of a unit Laplace near 9.9
    # (Banner et al., "Post-training 4-bit quantization", table 1)
    [("gaussian", 3.5, 4.5), ("laplace", 8.5, 11.0)],
)
def test_mse_finds_the_known_optimal_clipping(name: str, low: float, high: float) -> None:
    generator = torch.Generator().manual_seed(1)
    data = torch.randn(400_000, generator=generator)
    if name == "laplace":
        u = torch.rand(400_000, generator=generator) - 0.5
        data = -torch.sign(u) * torch.log1p(-2 * u.abs())
    assert low <= calibrate_amax(observed(data), "mse", "int8") <= high


def test_entropy_clips_a_long_tail_and_ignores_relu_zeros(gaussian: torch.Tensor) -> None:
    full = observed(gaussian.abs())
    amax = calibrate_amax(full, "entropy", "int8")
    assert 3.0 <= amax < full.amax
    relu = observed(torch.relu(gaussian))  # half exact zeros: the same range
    assert calibrate_amax(relu, "entropy", "int8") == pytest.approx(amax, rel=0.1)


def test_entropy_does_not_clip_few_distinct_values() -> None:
    pixels = torch.randint(0, 17, (50_000,)).float() / 16  # the digits' pixel levels
    assert calibrate_amax(observed(pixels), "entropy", "int8") == 1.0


def test_every_calibrator_keeps_a_uniform_range_and_rejects_nan() -> None:
    data = torch.rand(100_000, generator=torch.Generator().manual_seed(2)) * 2 - 1
    observer = observed(data)
    for name in CALIBRATORS:
        assert calibrate_amax(observer, name, "int8") == pytest.approx(1.0, rel=0.02), name
    with pytest.raises(ValueError, match="NaN"):
        observer.update(torch.tensor([1.0, float("nan")]))


# -- placement -------------------------------------------------------------------------------
def placement_model() -> keras.Model:
    inp = keras.Input((8, 8, 4))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inp)
    x = L.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
    x = L.Conv2D(8, 1, groups=2, name="grouped")(x)
    x = L.Reshape((64, 8))(x)
    scores = L.Dot(axes=2, name="scores")([x, x])
    x = L.Dense(6, name="dense")(L.GlobalAveragePooling1D()(scores))
    return randomize(keras.Model(inp, x))


def test_placement_quantizes_convolutions_and_dense_layers_and_says_why_not_the_rest() -> None:
    model = placement_model()
    x = random_input((32, 8, 8, 4), seed=3)
    optimized = kerasrt.Converter(model, precision_mode="INT8", input_shapes=[(8, 8, 8, 4)]).convert(
        calibration_input_fn=batches_of(x, 8)
    )
    sites = sites_of(optimized)
    assert {k: s["quantized"] for k, s in sites.items()} == {
        "conv#0": True,
        "depthwise#0": False,
        "grouped#0": False,
        "scores#0": False,
        "dense#0": True,
    }
    assert "depthwise" in sites["depthwise#0"]["reason"] and "memory" in sites["depthwise#0"]["reason"]
    assert "groups" in sites["grouped#0"]["reason"]
    assert "two activations" in sites["scores#0"]["reason"]
    graph = optimized.primary_graph()
    stored = [v for v in graph.constants.values() if v.dtype == "int8"]
    assert sorted(tuple(v.shape) for v in stored) == [
        (8, 4, 3, 3),
        (64, 6),
    ]  # conv (O,I,kh,kw), dense (in,out)
    assert sum(n.op == "quantize" for n in graph.nodes) == 2


def dense_chain(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)  # the kernels too: the same model in every process
    inp = keras.Input((16,))
    x = L.Dense(32, activation="relu", name="first")(inp)
    x = L.Dense(32, activation="relu", name="second")(x)
    return randomize(keras.Model(inp, L.Dense(10, name="last")(x)), seed)


def test_int8_dense_chain_is_within_the_quantization_error_bound() -> None:
    """One dense layer, calibrated with max: each output's error is bounded by the input's and
    the weight's half steps (plus FP16's rounding of the result)."""
    inp = keras.Input((64,))
    model = randomize(keras.Model(inp, L.Dense(12, name="d")(inp)))
    x = random_input((64, 64), seed=4)
    optimized = kerasrt.Converter(model, precision_mode="INT8", calibrator="max", batch_size=64).convert(
        calibration_input_fn=lambda: [x]
    )
    got = optimized(x)
    w, b = (np.asarray(v, dtype=np.float64) for v in model.get_layer("d").get_weights())
    ref = x.astype(np.float64) @ w + b
    sx = np.abs(x).max() / 127
    sw = np.abs(w).max(axis=0) / 127
    bound = (np.abs(x) @ np.ones_like(w)) * sw / 2 + sx / 2 * np.abs(w).sum(axis=0) + 64 * sx * sw / 4
    bound += 2e-3 * np.abs(ref).max()  # the FP16 product and bias
    assert np.all(np.abs(got - ref) <= bound)
    assert np.abs(got - ref).max() > 1e-4  # it is quantized, not float


# -- the accuracy-aware search ---------------------------------------------------------------
def test_accuracy_search_keeps_the_layer_made_sensitive() -> None:
    """'second' reads a tensor with one huge feature: a per-tensor INT8 scale leaves its other
    features a step or two, so quantizing it changes the classes; the search must keep it (and
    need not keep the others)."""
    model = dense_chain()
    first = model.get_layer("first")
    w, b = first.get_weights()
    w[:, 0] *= 400.0  # feature 0 of first's output dominates the range 'second' reads
    second_w, second_b = model.get_layer("second").get_weights()
    second_w[0, :] /= 400.0  # ... and matters no more than the others
    first.set_weights([w, b])
    model.get_layer("second").set_weights([second_w, second_b])
    x = random_input((128, 16), seed=5)
    plain = kerasrt.Converter(model, precision_mode="INT8", calibrator="max", batch_size=32).convert(
        calibration_input_fn=batches_of(x, 32)
    )
    reference = model.predict(x, verbose=0).argmax(-1)
    assert (plain.predict(x, batch_size=32).argmax(-1) == reference).mean() < 0.9
    messages: list[str] = []
    searched = kerasrt.Converter(
        model,
        precision_mode="INT8",
        calibrator="max",
        batch_size=32,
        max_accuracy_drop=0.05,
        progress=messages.append,
    ).convert(calibration_input_fn=batches_of(x, 32))
    sites = sites_of(searched)
    assert not sites["second#0"]["quantized"] and "accuracy search" in sites["second#0"]["reason"]
    assert sites["first#0"]["quantized"] and sites["last#0"]["quantized"]
    assert (searched.predict(x, batch_size=32).argmax(-1) == reference).mean() >= 0.95 - 1e-9
    ranking = searched.sources[0].meta["calibration"]["search"]["ranking"]
    assert ranking[0]["site"] == "second#0" and ranking[0]["recovered"] > 0.5
    assert any(m.startswith("accuracy search: ranking layer") for m in messages)
    assert any(m.startswith("calibrating: batch 4/4") for m in messages)


def test_accuracy_search_with_a_user_metric_meets_the_budget() -> None:
    data = np.load(DATA_PATH)
    x, y = data["x"].astype("float32"), data["y"]
    calls = []

    def accuracy(model: kerasrt.OptimizedModel) -> float:
        calls.append(model)
        return float((model.predict(x[120:], batch_size=60).argmax(-1) == y[120:]).mean())

    converter = kerasrt.Converter(MODEL_PATH, precision_mode="INT8", batch_size=40, max_accuracy_drop=0.0)
    optimized = converter.convert(calibration_input_fn=batches_of(x[:120], 40), eval_fn=accuracy)
    search = optimized.sources[0].meta["calibration"]["search"]
    assert search["drop"] <= 0.0 and search["metric"] == "eval_fn"
    assert len(calls) == search["evaluations"] >= 2
    text = converter.summary(print_fn=None)
    assert "accuracy search (eval_fn)" in text and "quantization INT8" in text


# -- the calibration table in the artifact ---------------------------------------------------
def test_calibration_table_round_trips_and_serves_a_new_batch_without_keras(tmp_path: Path) -> None:
    model = dense_chain(1)
    x = random_input((64, 16), seed=6)
    converter = kerasrt.Converter(model, precision_mode="FP8", batch_size=16)
    optimized = converter.convert(calibration_input_fn=batches_of(x, 16))
    table = optimized.sources[0].meta["calibration"]
    assert table["dtype"] == "float8_e4m3fn" and set(table["amax"]) == {"first#0", "second#0", "last#0"}
    path = converter.save(tmp_path / "fp8")
    assert not (path / "keras_model.keras").exists()
    loaded = kerasrt.load(path)
    assert loaded.sources[0].meta["calibration"]["amax"] == table["amax"]
    np.testing.assert_array_equal(loaded(x[:16]), optimized(x[:16]))
    np.testing.assert_array_equal(loaded(x[:5]), optimized(x[:16])[:5])  # a new shape, no recalibration
    assert loaded.settings.precision_mode == "FP8" and loaded.settings.calibrator == "max"


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "message"),
    [
        (lambda: iter(()), "no batches"),
        (lambda: [np.zeros((4, 15), "float32")], "batch 0.*shape"),
        (lambda: [np.ones((4, 16), "float32"), np.full((4, 16), np.nan, "float32")], "batch 1.*NaN or Inf"),
        (lambda: [np.ones((4, 16), "int64")], "batch 0.*float32"),
        (lambda: 42, "must be a function that yields"),
    ],
)
def test_bad_calibration_data_gets_a_clear_error(data, message: str) -> None:
    converter = kerasrt.Converter(dense_chain(), precision_mode="INT8")
    with pytest.raises(CalibrationError, match=message):
        converter.convert(calibration_input_fn=data)


def test_quantization_settings_errors() -> None:
    model = dense_chain()
    with pytest.raises(ConversionError, match="needs calibration data"):
        kerasrt.Converter(model, precision_mode="INT8").convert()
    with pytest.raises(ConversionError, match="is for precision_mode INT8 or FP8, not FP16"):
        kerasrt.Converter(model, precision_mode="FP16").convert(calibration_input_fn=lambda: [])
    with pytest.raises(ConversionError, match="give max_accuracy_drop"):
        kerasrt.Converter(model, precision_mode="INT8").convert(lambda: [], eval_fn=lambda m: 1.0)
    with pytest.raises(ConversionError, match="entropy calibrator is INT8"):
        kerasrt.Converter(model, precision_mode="FP8", calibrator="entropy")
    with pytest.raises(ConversionError, match="calibrator must be one of"):
        kerasrt.Converter(model, precision_mode="INT8", calibrator="kl")
    with pytest.raises(ConversionError, match="for precision_mode INT8 or FP8"):
        kerasrt.Converter(model, precision_mode="FP16", max_accuracy_drop=0.01)


def test_a_model_with_nothing_to_quantize_is_refused() -> None:
    inp = keras.Input((8, 8, 4))
    model = keras.Model(inp, L.DepthwiseConv2D(3)(L.ReLU()(inp)))
    with pytest.raises(CalibrationError, match=r"nothing to quantize.*depthwise"):
        kerasrt.Converter(model, precision_mode="INT8").convert(
            calibration_input_fn=lambda: [random_input((1, 8, 8, 4))]
        )


# -- a trained model on real data ------------------------------------------------------------
RESNET_PATH = Path(__file__).parent / "data" / "digits_resnet.keras"


@pytest.mark.parametrize("path", [MODEL_PATH, RESNET_PATH], ids=["digits_cnn", "digits_resnet"])
def test_trained_models_lose_at_most_half_a_point_of_accuracy(path: Path) -> None:
    """Models trained on scikit-learn's digits (the embedded CNN; a ResNet with residual
    blocks and projection shortcuts on them upscaled to 32x32, ``tools/train_digits_resnet.py``),
    calibrated with each precision's default calibrator on 120 held-out images and tested on
    the other 240 (``bench/quantization.py`` prints every calibrator's row)."""
    data = np.load(DATA_PATH)
    x, y = data["x"].astype("float32"), data["y"]
    keras_model = keras.saving.load_model(path)
    test_x, test_y = x[120:], y[120:]
    fp32 = (np.asarray(keras_model.predict(test_x, verbose=0)).argmax(-1) == test_y).mean()
    assert fp32 >= 0.98  # a trained model
    for mode in ("INT8", "FP8"):
        optimized = kerasrt.Converter(path, precision_mode=mode, batch_size=40).convert(
            calibration_input_fn=batches_of(x[:120], 40)
        )
        quantized = (optimized.predict(test_x, batch_size=40).argmax(-1) == test_y).mean()
        assert fp32 - quantized <= 0.005, (mode, fp32, quantized)
        assert all(s["quantized"] for s in sites_of(optimized).values())


def test_cli_converts_int8_with_npz_calibration_data(tmp_path: Path) -> None:
    data = np.load(DATA_PATH)
    np.savez(tmp_path / "calib.npz", pixels=data["x"][:64].astype("float32"))
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    run = [sys.executable, "-m", "kerasrt", "convert", str(MODEL_PATH), "-o", str(tmp_path / "out")]
    done = subprocess.run(
        [*run, "--precision", "INT8", "--calibration-data", str(tmp_path / "calib.npz"), "--batch-size", "32"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "quantization INT8 (int8): 4 of 4" in done.stdout
    missing = subprocess.run(
        [*run[:-1], str(tmp_path / "o2"), "--precision", "INT8"], capture_output=True, text=True, env=env
    )
    assert missing.returncode == 2 and "needs --calibration-data" in missing.stderr
    assert not (tmp_path / "o2").exists()


# -- the quantized GEMM kernel family --------------------------------------------------------
@pytest.mark.parametrize("mode", ["INT8", "FP8"])
def test_quantized_gemm_family_folds_the_dequantizes_and_matches_the_qdq_graph(
    mode: str, tmp_path, monkeypatch
) -> None:
    """Chosen by the tactics (a table of timings here), the family runs each dense layer on
    its quantized operands (the op's CPU reference: torch._int_mm / torch._scaled_mm) and
    gives the Q/DQ graph's values up to FP16 rounding (one layer: a second would quantize an
    input that the two ways rounded differently, a step apart at some boundary)."""
    monkeypatch.setenv("KERASRT_CACHE_DIR", str(tmp_path / "cache"))
    inp = keras.Input((48,))
    model = randomize(keras.Model(inp, L.Dense(32, activation="gelu", name="first")(inp)))
    data = random_input((64, 48), seed=7)
    calibration = batches_of(data, 32)
    plain = kerasrt.Converter(model, precision_mode=mode, batch_size=32, conv_kernels="inductor").convert(
        calibration
    )
    tuner = TableTuner({"quantized_gemm": 0.5, "linear_gemm": 0.9, "inductor": 1.0})
    folded = kerasrt.Converter(model, precision_mode=mode, batch_size=32, conv_kernels="cudnn", tuner=tuner)
    folded = folded.convert(calibration)
    graph = folded.primary_graph()
    chosen = {n.layer: n.attrs[KERNEL]["kernel"] for n in graph.nodes if KERNEL in n.attrs}
    assert chosen == {"first": "quantized_gemm"}
    expected = plain(data[:32])
    got = folded(data[:32])
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3 * np.abs(expected).max())
    assert np.abs(got - expected).max() > 0  # the folded product, not the Q/DQ graph's


def test_quantized_gemm_is_not_eligible_where_cublaslt_refuses_the_sizes() -> None:
    from kerasrt.kernels import quantized_gemm

    inp = keras.Input((40,))  # K = 40: not a multiple of 16
    model = randomize(keras.Model(inp, L.Dense(32)(inp)))
    data = random_input((32, 40), seed=8)
    optimized = kerasrt.Converter(model, precision_mode="INT8", batch_size=32).convert(batches_of(data, 32))
    linear = next(n for n in optimized.primary_graph().nodes if n.op == "linear")
    assert not quantized_gemm.FAMILY.eligible(linear, None)
    small = kerasrt.Converter(dense_chain(), precision_mode="INT8", batch_size=8)
    graph = small.convert(batches_of(random_input((16, 16)), 8)).primary_graph()
    assert not any(quantized_gemm.FAMILY.eligible(n, None) for n in graph.nodes if n.op == "linear")  # 8 rows


def test_quantized_gemm_runs_1x1_convolutions_on_channels_last_images(tmp_path, monkeypatch) -> None:
    """A ResNet bottleneck's 1x1 convolutions (with BN folded, ReLU and the residual add
    fused) on the quantized GEMM: the Q/DQ graph's values; the 3x3 convolution is no GEMM."""
    monkeypatch.setenv("KERASRT_CACHE_DIR", str(tmp_path / "cache"))
    inp = keras.Input((6, 6, 32))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 1, name="reduce")(inp)))
    x = L.Conv2D(16, 3, padding="same", activation="relu", name="spatial")(x)
    x = L.ReLU()(L.Add()([inp, L.BatchNormalization()(L.Conv2D(32, 1, name="expand")(x))]))
    model = randomize(keras.Model(inp, x))
    data = random_input((4, 6, 6, 32), seed=9)
    plain = kerasrt.Converter(model, precision_mode="INT8", batch_size=4, conv_kernels="inductor")
    plain = plain.convert(lambda: [data])
    tuner = TableTuner({"quantized_gemm": 0.5, "inductor": 1.0})
    folded = kerasrt.Converter(model, precision_mode="INT8", batch_size=4, conv_kernels="cudnn", tuner=tuner)
    folded = folded.convert(lambda: [data])
    graph = folded.primary_graph()
    chosen = {n.layer: n.attrs[KERNEL]["kernel"] for n in graph.nodes if KERNEL in n.attrs}
    assert chosen["reduce"] == chosen["expand"] == "quantized_gemm"
    assert chosen.get("spatial") != "quantized_gemm"
    expected = plain(data)
    np.testing.assert_allclose(folded(data), expected, rtol=0, atol=2e-2 * np.abs(expected).max())
