"""Import a model in a child process on Keras's torch backend.

Used when the calling process runs Keras on another backend (JAX, TensorFlow): the child
loads the model file, builds the IR graph and writes it as JSON plus safetensors.
Usage: python -m kerasrt.frontend.worker REQUEST.json
"""

from __future__ import annotations

import json
import os
import sys


def main(request_path: str) -> int:
    os.environ["KERAS_BACKEND"] = "torch"
    from safetensors.torch import save_file

    from kerasrt.errors import KerasRTError
    from kerasrt.frontend import keras_adapter as ka
    from kerasrt.frontend.importer import InputSpec, import_model
    from kerasrt.ir.serialize import graph_to_json

    with open(request_path) as fh:
        request = json.load(fh)
    sys.path[:0] = [p for p in request.get("sys_path", []) if p not in sys.path]
    try:
        model = ka.load_model(request["model"], ka.import_classes(request.get("classes", [])))
        specs = [InputSpec(s["name"], tuple(s["shape"]), s["dtype"]) for s in request["specs"]]
        graph = import_model(model, specs, request.get("keep", []), hints=request.get("hints") or None)
    except KerasRTError as exc:
        with open(os.path.join(request["out"], "error.json"), "w") as fh:
            json.dump({"type": type(exc).__name__, "message": str(exc)}, fh)
        return 1
    data, tensors = graph_to_json(graph)
    with open(os.path.join(request["out"], "graph.json"), "w") as fh:
        json.dump(data, fh)
    save_file(tensors, os.path.join(request["out"], "weights.safetensors"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
