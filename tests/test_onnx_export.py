"""ONNX export: the optimized graph written with the onnx library, run in onnxruntime and
compared with kerasrt's own output (FP32 to float rounding; FP16 to its rounding; INT8 Q/DQ
graphs to one quantization step), and refusals that name what cannot be exported."""

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
