"""ONNX graph plumbing the quantizers share: finding weight-carrying nodes, reading intermediate
tensors during calibration runs, and adding initializers and nodes under fresh names."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper


@dataclass
class WeightNode:
    """A MatMul / Gemm / Conv whose second input is a float initializer. `out_axis`: the weight's
    output-channel axis (MatMul (K, N) -> 1; Gemm transB -> 0, else 1; Conv (O, I, kh, kw) -> 0)."""

    index: int
    name: str
    op: str
    activation: str
    weight: str
    out_axis: int


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def weight_nodes(model: onnx.ModelProto, ops: Iterable[str]) -> list[WeightNode]:
    inits = initializers(model)
    wanted = set(ops)
    out = []
    for i, node in enumerate(model.graph.node):
        if node.op_type not in wanted or len(node.input) < 2:
            continue
        w = inits.get(node.input[1])
        if w is None or node.input[0] in inits or w.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        if node.op_type == "MatMul":
            if len(w.dims) != 2:
                continue
            axis = 1
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = 0 if trans_b else 1
        else:
            axis = 0
        out.append(WeightNode(i, node.name or f"{node.op_type}_{i}", node.op_type, node.input[0], node.input[1], axis))
    return out


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` that also returns the intermediate tensors `names` (float, shape left open)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    have = {o.name for o in copy.graph.output}
    for name in dict.fromkeys(names):
        if name not in have:
            copy.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return copy


PROTO_LIMIT = 2**31 - 2**26  # protobuf's 2 GB cap, with room for the graph itself


def fits_in_proto(model: onnx.ModelProto) -> bool:
    """Whether `model` serialises as one protobuf (ByteSize itself refuses past 2 GB)."""
    try:
        return model.ByteSize() < PROTO_LIMIT
    except Exception:  # google.protobuf.message.EncodeError
        return False


def session(model: onnx.ModelProto | str | Path, threads: int = 0):
    """A CPU session on a model in memory or on disk. Models past protobuf's 2 GB limit (Phi-3-mini
    width decoders) go through a temporary file with external weights."""
    import tempfile

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not isinstance(model, onnx.ModelProto):
        return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    if fits_in_proto(model):
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="blip3v-onnx-") as tmp:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # save_model with external data moves the weights out of the proto it is given
        path = Path(tmp) / "model.onnx"
        onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_collect(model: onnx.ModelProto, names: list[str], feeds: Iterable[dict[str, np.ndarray]],
                visit: Callable[[str, np.ndarray], None]) -> None:
    """Runs every feed through `model` with `names` exposed and calls visit(name, array) for each."""
    sess = session(with_outputs(model, names))
    for feed in feeds:
        for name, value in zip(names, sess.run(names, feed)):
            visit(name, value)


class Namer:
    """Fresh tensor / node names that never collide with the graph's."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.taken = ({t.name for t in g.initializer} | {n.name for n in g.node}
                      | {o for n in g.node for o in n.output} | {i.name for i in g.input})

    def __call__(self, base: str) -> str:
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name


def add_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> str:
    model.graph.initializer.append(numpy_helper.from_array(array, name))
    return name


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def ensure_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    for op in model.opset_import:
        if op.domain == domain:
            op.version = max(op.version, version)
            return
    model.opset_import.append(helper.make_opsetid(domain, version))


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """One self-contained file (weights inside) when under 2 GB, else weights beside it in `.data`."""
    path = Path(path)
    if fits_in_proto(model):
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")


def batched(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
