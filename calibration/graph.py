"""ONNX plumbing the quantizers share: CPU sessions on models in memory or on disk, reading
intermediate tensors during calibration runs, saving past protobuf's 2 GB limit, and keeping ONNX
Runtime's quantization tools from writing to the command's output."""

from __future__ import annotations

import io
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

PROTO_LIMIT = 2**31 - 2**26  # protobuf's 2 GB cap, with room for the graph itself


def fits_in_proto(model: onnx.ModelProto) -> bool:
    """Whether `model` serialises as one protobuf (ByteSize itself refuses past 2 GB)."""
    try:
        return model.ByteSize() < PROTO_LIMIT
    except Exception:  # google.protobuf.message.EncodeError
        return False


def session(model: onnx.ModelProto | str | Path, threads: int = 0):
    """A CPU session on a model in memory or on disk. Models past protobuf's 2 GB limit (Phi-3-mini
    width decoders) go through a temporary file with external weights, without a second copy of
    them in memory: saving moves each weight out of `model` into the file, and once the session
    holds them they are read back, so `model` is as it was."""
    import onnxruntime as ort
    from onnx.external_data_helper import load_external_data_for_model

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not isinstance(model, onnx.ModelProto):
        return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    if fits_in_proto(model):
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="blip3v-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data")
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        finally:
            load_external_data_for_model(model, tmp)


def run_collect(model: onnx.ModelProto, names: list[str], feeds: Iterable[dict[str, np.ndarray]],
                visit: Callable[[str, np.ndarray], None]) -> None:
    """Runs every feed through `model` with the intermediate tensors `names` also returned and
    calls visit(name, array) for each, one feed at a time (memory stays that of one run). The
    extra outputs are added to `model` only while its session is made (no copy of the weights)."""
    have = {o.name for o in model.graph.output}
    added = [n for n in dict.fromkeys(names) if n not in have]
    for name in added:
        model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    try:
        sess = session(model)
    finally:
        del model.graph.output[len(model.graph.output) - len(added):]
    for feed in feeds:
        for name, value in zip(names, sess.run(names, feed)):
            visit(name, value)


@contextmanager
def quiet_ort() -> Iterator[None]:
    """ORT's quantizers log advice and per-node steps through `logging` and their calibrators
    print() their progress; the command's own progress bar and --json output must stay clean."""
    logging.disable(logging.WARNING)
    try:
        with redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """One self-contained file (weights inside) when under 2 GB, else weights beside it in `.data`."""
    path = Path(path)
    if fits_in_proto(model):
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")
