"""ONNX out and in. Export: the optimized graph written with the onnx library, run in
onnxruntime and compared with kerasrt's own output (FP32 to float rounding; FP16 to its
rounding; INT8 Q/DQ graphs to one quantization step), and refusals that name what cannot be
exported. Import: kerasrt's own exports and a ``torch.onnx.export`` model converted and
compared with onnxruntime, at FP32 and INT8, through an artifact."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import onnx
import pytest
from keras import layers as L

import kerasrt
from kerasrt.demo import DATA_PATH, MODEL_PATH
from kerasrt.export.onnx import ExportError, check_with_onnxruntime, export_onnx
from kerasrt_testing import application, randomize

DIGITS = np.load(DATA_PATH)["x"].astype("float32")
RESNET = Path(__file__).parent / "data" / "digits_resnet.keras"


def op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def everything_model() -> keras.Model:
    """Conv + BN + ReLU6, depthwise with asymmetric padding, upsampling, concat, a residual
    add, layer norm, multi-head attention, GELU dense layers, pooling, softmax."""
    inp = keras.Input((8, 8, 3))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(16, 3, padding="same")(inp)))
    y = L.DepthwiseConv2D(3, strides=2, padding="same")(L.ZeroPadding2D(((0, 1), (0, 1)))(x))
    y = L.UpSampling2D(2, interpolation="bilinear")(L.Cropping2D(((0, 1), (0, 1)))(y))
    x = L.Concatenate()([x, y])
    x = L.Add()([x, L.Conv2D(32, 1)(x)])
    x = L.MaxPooling2D()(x)
    t = L.LayerNormalization()(L.Reshape((16, 32))(x))
    t = L.Add()([t, L.MultiHeadAttention(2, 8)(t, t)])
    t = L.Dense(64, activation="gelu")(t)
    pooled = L.GlobalAveragePooling1D()(t)
    return randomize(
        keras.Model(inp, L.Dense(5, activation="softmax")(L.Dense(16, activation="silu")(pooled)))
    )


@pytest.mark.parametrize(
    ("make", "shape"),
    [(everything_model, (2, 8, 8, 3)), (lambda: application("MobileNetV3Small", 32), (2, 32, 32, 3))],
    ids=["everything", "MobileNetV3Small"],
)
def test_fp32_export_matches_kerasrt_in_onnxruntime(make, shape, tmp_path: Path) -> None:
    model = kerasrt.Converter(make(), input_shapes=[shape], device="cpu").convert()
    path = export_onnx(model, tmp_path / "model.onnx")
    assert check_with_onnxruntime(path, model) < 1e-5
    assert "Conv" in op_types(path)
    assert "BatchNormalization" not in op_types(path)  # folded into the convolutions


def test_fp16_and_int8_exports_keep_their_types_and_qdq_pairs(tmp_path: Path) -> None:
    fp16 = kerasrt.Converter(MODEL_PATH, precision_mode="FP16", batch_size=8, device="cpu").convert()
    path = export_onnx(fp16, tmp_path / "fp16.onnx")
    assert check_with_onnxruntime(path, fp16) < 5e-3
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16  # staged input
    int8 = kerasrt.Converter(MODEL_PATH, precision_mode="INT8", batch_size=8, device="cpu")
    int8 = int8.convert(calibration_input_fn=[DIGITS[:64]])
    path = export_onnx(int8, tmp_path / "int8.onnx")
    assert check_with_onnxruntime(path, int8) < 3e-2  # a rounding flip is one INT8 step
    kinds = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert kinds.count("QuantizeLinear") == 4 and kinds.count("DequantizeLinear") == 8
    weights = [t for t in onnx.load(str(path)).graph.initializer if t.name.endswith(".weight_q")]
    assert len(weights) == 4 and all(t.data_type == onnx.TensorProto.INT8 for t in weights)  # as stored


def test_a_keras_fallback_cannot_be_exported_and_nothing_is_written(tmp_path: Path) -> None:
    inp = keras.Input((4,))
    model = keras.Model(inp, L.Dense(3)(L.Lambda(lambda t: t * 2.0, name="doubler")(inp)))
    optimized = kerasrt.Converter(model, keep_in_keras=["doubler"], device="cpu").convert()
    with pytest.raises(ExportError, match=r"keras_layer.*doubler"):
        export_onnx(optimized, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_and_checks_an_artifact(tmp_path: Path) -> None:
    converter = kerasrt.Converter(MODEL_PATH, batch_size=4, device="cpu")
    converter.convert()
    artifact = converter.save(tmp_path / "art")
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    command = [sys.executable, "-m", "kerasrt", "export", str(artifact), "--onnx", str(tmp_path / "m.onnx")]
    done = subprocess.run([*command, "--input-shape", "3,8,8,1"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "onnxruntime vs kerasrt" in done.stdout
    assert [d.dim_value for d in onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim] == [
        3, 8, 8, 1,
    ]  # fmt: skip
    bad = subprocess.run(
        [*command[:-1], str(tmp_path / "x.onnx"), "--input-shape", "3,9,9,1"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2 and "error" in bad.stderr and not (tmp_path / "x.onnx").exists()


# -- ONNX in ---------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["digits_resnet", "everything"])
def test_an_exported_model_imports_back_and_matches_onnxruntime(which: str, tmp_path: Path) -> None:
    """Every op kerasrt's export writes (attention, layer norm, resize, pads, Q/DQ-free FP32)
    imports back."""
    import onnxruntime as ort

    if which == "everything":
        original = kerasrt.Converter(everything_model(), input_shapes=[(2, 8, 8, 3)], device="cpu").convert()
        x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    else:
        original = kerasrt.Converter(RESNET, batch_size=8, device="cpu").convert()
        x = DIGITS[:8]
    path = export_onnx(original, tmp_path / "model.onnx")
    imported = kerasrt.Converter(path, device="cpu").convert()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(imported(x), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert "conv_fused" in {n.op for n in imported.primary_graph().nodes}  # optimized again


def test_a_torch_onnx_export_converts_to_int8_and_serves_from_an_artifact(tmp_path: Path) -> None:
    import onnxruntime as ort
    import torch

    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.Hardswish(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(32, 10),
    ).eval()  # fmt: skip
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "net.onnx"
    torch.onnx.export(
        net, (x,), str(path), dynamo=False, input_names=["image"], dynamic_axes={"image": {0: "batch"}}
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"image": x.numpy()})[0]
    converter = kerasrt.Converter(path, batch_size=4, device="cpu")
    np.testing.assert_allclose(
        converter.convert()(x.numpy()), expected, rtol=0, atol=1e-5 * np.abs(expected).max()
    )
    quantized = kerasrt.Converter(path, batch_size=4, precision_mode="INT8", device="cpu")
    quantized.convert(calibration_input_fn=lambda: [torch.randn(4, 3, 16, 16).numpy() for _ in range(4)])
    loaded = kerasrt.load(quantized.save(tmp_path / "int8"))
    got = loaded(x.numpy())
    assert np.abs(got - expected).max() <= 0.1 * np.abs(expected).max()  # INT8's error
    assert (
        set(loaded.sources[0].meta["calibration"]["amax"])
        and not (tmp_path / "int8" / "keras_model.keras").exists()
    )


def test_bad_onnx_input_gets_a_clear_error(tmp_path: Path) -> None:
    from kerasrt.errors import ConversionError, ModelLoadError

    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        kerasrt.Converter(corrupt).convert()
    node = onnx.helper.make_node("Det", ["x"], ["y"])
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )  # fmt: skip
    unsupported = tmp_path / "det.onnx"
    onnx.save(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(unsupported)
    )
    with pytest.raises(ConversionError, match=r"cannot import: \['Det'\]"):
        kerasrt.Converter(unsupported).convert()
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    done = subprocess.run(
        [sys.executable, "-m", "kerasrt", "convert", str(corrupt), "-o", str(tmp_path / "out")],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert (
        done.returncode == 2 and "not a valid ONNX model" in done.stderr and not (tmp_path / "out").exists()
    )
