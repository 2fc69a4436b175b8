"""ONNX plumbing the quantizers share: CPU sessions on models in memory or on disk, reading
intermediate tensors during calibration runs, saving past protobuf's 2 GB limit, and keeping ONNX
Runtime's quantization tools from writing to the command's output."""

from __future__ import annotations

import io
import logging
import os
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


def on_disk(model: onnx.ModelProto) -> set[str]:
    """Files holding weights of `model` that were not read in (onnx.load(..., load_external_data=False))."""
    from onnx.external_data_helper import uses_external_data

    return {entry.value for t in model.graph.initializer if uses_external_data(t) and not t.HasField("raw_data")
            for entry in t.external_data if entry.key == "location"}


def session(model: onnx.ModelProto | str | Path, threads: int = 0, base_dir: str | Path | None = None):
    """A CPU session on a model in memory or on disk. A model whose weights are still on disk (in
    `base_dir`, as onnx.load(..., load_external_data=False) leaves them) is written as its graph
    alone into a temporary file beside them, so its weights are never held twice. Other models past
    protobuf's 2 GB limit go through a temporary file with external weights: saving moves each
    weight out of `model` into the file and they are read back once the session holds them.

    Python's protobuf (upb) keeps every bytes value a message ever held until the message itself
    is freed, so a weight replaced or cleared in place still takes its memory: keeping the 2 GB+
    decoders' weights on disk until they are changed is what keeps memory near one copy."""
    import onnxruntime as ort
    from onnx.external_data_helper import load_external_data_for_model

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not isinstance(model, onnx.ModelProto):
        return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    files = on_disk(model)
    if files and base_dir is None:
        raise ValueError("the model's weights are on disk: give base_dir")
    if files and fits_in_proto(model):
        # The graph goes beside its weight files for the moment the session reads it: ONNX Runtime
        # refuses external data outside the model's folder, symbolic links included.
        fd, name = tempfile.mkstemp(prefix=".blip3v-graph-", suffix=".onnx", dir=base_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(model.SerializeToString())
            return ort.InferenceSession(name, options, providers=["CPUExecutionProvider"])
        finally:
            os.unlink(name)
    if files:
        load_external_data_for_model(model, str(base_dir))
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
                visit: Callable[[str, np.ndarray], None], base_dir: str | Path | None = None) -> None:
    """Runs every feed through `model` with the intermediate tensors `names` also returned and
    calls visit(name, array) for each, one feed at a time (memory stays that of one run). The
    extra outputs are added to `model` only while its session is made (no copy of the weights)."""
    have = {o.name for o in model.graph.output}
    added = [n for n in dict.fromkeys(names) if n not in have]
    for name in added:
        model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    try:
        sess = session(model, base_dir=base_dir)
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
