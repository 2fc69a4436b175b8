"""No file the project reads is ever unpickled (issue 18 item 5).

A pickle payload whose `__reduce__` creates a marker file is planted in every file the project
reads: trainer state (the old `trainer_state.pt` and both new files), checkpoint config, index,
shards and tokenizer files (and stray `.bin`/`.pt` files beside them), engine manifest, tokenizer,
embedding table (a `.npy` object array: pickle inside a valid npy header), graphs, calibration and
dataset inputs, videos. The real readers run (the CLI in subprocesses where it is cheap: the engine
path imports no torch; `train` once), and each either refuses the file with one error line or does
not read it; the marker never appears. A first test shows the payload is live: unpickled, it runs.
An AST scan keeps unpickling calls out of the shipped code.

TensorRT plans and timing caches are read only by TensorRT's own deserializer (not pickle) and are
not exercised here (no TensorRT on CPU machines).

    python -m pytest tests/test_no_pickle.py -q
"""

from __future__ import annotations

import ast
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from blip3v.errors import Blip3vError
from conftest import ROOT, assert_one_line_error, run_cli

SAMPLE = ROOT / "blip3v" / "assets" / "sample.mp4"


class Payload:
    """Unpickling this opens (creates) `marker` for writing: code run by the file's reader."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def payload(marker: Path, text: bool = False) -> bytes:
    """Protocol 0 is ASCII: it gets through a text reader to its parser; 5 is the binary form."""
    return pickle.dumps(Payload(marker), protocol=0 if text else 5)


@pytest.fixture()
def marker(tmp_path) -> Path:
    path = tmp_path / "MARKER-code-ran"
    yield path
    assert not path.exists(), "a planted pickle payload ran"


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert isinstance(exc, Blip3vError) and len(text.splitlines()) == 1, (type(exc), text)
    return text


def test_the_payload_is_live(tmp_path):
    """Control: the planted bytes do run code when unpickled (text and binary forms), and the old
    trainer-state reader, torch.load(weights_only=False), ran them."""
    import torch

    for i, text in enumerate((True, False)):
        target = tmp_path / f"ran-{i}"
        pickle.loads(payload(target, text))
        assert target.exists()
    legacy = tmp_path / "trainer_state.pt"
    legacy.write_bytes(payload(tmp_path / "ran-torch"))
    with pytest.raises(RuntimeError):  # ... after running it: the payload is torch's first unpickled object
        torch.load(legacy, weights_only=False)
    assert (tmp_path / "ran-torch").exists()


# ----------------------------------------------------------------------------- shipped code


UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("cPickle", "load"),
              ("torch", "load"), ("joblib", "load"), ("dill", "load"), ("dill", "loads"), ("cloudpickle", "load"),
              ("cloudpickle", "loads"), ("marshal", "load"), ("marshal", "loads"), ("shelve", "open"),
              ("pd", "read_pickle"), ("pandas", "read_pickle"), ("jit", "load")}
CODE_FOLDERS = ("blip3v", "model", "runtime", "export", "calibration", "data", "kernels", "benchmarks")


def test_no_unpickling_call_in_the_code():
    """Every call of the form pickle.load / torch.load / joblib.load / ... and every
    `allow_pickle=True` in the shipped code (docstrings and comments do not count)."""
    found = []
    for folder in CODE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                if isinstance(func, ast.Attribute):
                    owner = func.value.attr if isinstance(func.value, ast.Attribute) else getattr(func.value, "id", "")
                    if (owner, func.attr) in UNPICKLERS:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {owner}.{func.attr}")
                for kw in node.keywords:
                    if kw.arg in ("allow_pickle", "weights_only") and not (
                            isinstance(kw.value, ast.Constant) and kw.value.value is (kw.arg == "weights_only")):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {kw.arg}=...")
    assert found == []


# ----------------------------------------------------------------------------- trainer state


def test_train_refuses_an_old_pickled_trainer_state(tmp_path, marker):
    """The issue's case: `blip3v train` resuming a folder whose trainer_state.pt is a payload."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "trainer_state.pt").write_bytes(payload(marker))
    proc = run_cli("train", "--out", str(run), "--steps", "1", "--batch-size", "1", "--quiet")
    assert_one_line_error(proc, "trainer_state.pt", "old pickle format", "another --out")


@pytest.fixture(scope="module")
def trainer_state_dir(tmp_path_factory) -> Path:
    import torch

    from blip3v.model.trainer_state import TrainerState, save_trainer_state

    directory = tmp_path_factory.mktemp("state")
    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(layer.parameters())
    layer(torch.ones(1, 3)).sum().backward()
    opt.step()
    save_trainer_state(directory, TrainerState(step=1, elapsed=0.5, preset="demo", train_config={},
                                               optimizer=opt.state_dict(), rng={"rng.torch": torch.get_rng_state()}))
    return directory


@pytest.mark.parametrize("planted", ["trainer_state.json", "trainer_state.safetensors", "both"])
def test_new_trainer_state_files_never_unpickle(trainer_state_dir, tmp_path, marker, planted):
    from blip3v.model.trainer_state import load_trainer_state

    state = Path(shutil.copytree(trainer_state_dir, tmp_path / "s"))
    if planted in ("trainer_state.json", "both"):
        (state / "trainer_state.json").write_bytes(payload(marker, text=True))
    if planted in ("trainer_state.safetensors", "both"):
        (state / "trainer_state.safetensors").write_bytes(payload(marker))
        if planted != "both":  # the JSON vouches for the planted bytes: the safetensors parser decides
            meta = json.loads((state / "trainer_state.json").read_text())
            import hashlib

            meta["tensors"]["sha256"] = hashlib.sha256((state / "trainer_state.safetensors").read_bytes()).hexdigest()
            (state / "trainer_state.json").write_text(json.dumps(meta))
    (state / "trainer_state.pt").write_bytes(payload(marker))  # beside the new files: ignored
    with pytest.raises(Blip3vError) as err:
        load_trainer_state(state)
    assert planted.split(".")[0] in one_line(err.value) or "trainer_state" in str(err.value)


# ----------------------------------------------------------------------------- checkpoints


CHECKPOINT_FILES = ["config.json", "model.safetensors.index.json", "SHARD", "tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize("planted", CHECKPOINT_FILES)
def test_checkpoint_files_never_unpickle(tiny_ckpt, tmp_path, marker, planted):
    from blip3v.model.checkpoint import load_checkpoint, load_tokenizer

    ckpt = Path(shutil.copytree(tiny_ckpt, tmp_path / "ckpt"))
    name = next(p.name for p in sorted(ckpt.glob("model-*.safetensors"))) if planted == "SHARD" else planted
    text = name.endswith(".json")
    (ckpt / name).write_bytes(payload(marker, text=text))
    with pytest.raises(Blip3vError) as err:
        load_checkpoint(ckpt) if not name.startswith("tokenizer") else load_tokenizer(ckpt)
    one_line(err.value)


def test_stray_pickles_beside_a_checkpoint_are_never_opened(tiny_ckpt, tmp_path, marker):
    """Files other loaders would torch.load (pytorch_model.bin, training_args.bin, optimizer.pt, ...)
    are not read; a folder with only pytorch_model.bin is refused, not unpickled."""
    from blip3v.model.checkpoint import load_checkpoint, load_tokenizer

    ckpt = Path(shutil.copytree(tiny_ckpt, tmp_path / "ckpt"))
    strays = ["pytorch_model.bin", "training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth",
              "trainer_state.pt", "embeddings.npy"]
    for name in strays:
        (ckpt / name).write_bytes(payload(marker))
    load_checkpoint(ckpt)
    load_tokenizer(ckpt)
    for p in ckpt.glob("model*.safetensors*"):
        p.unlink()
    with pytest.raises(Blip3vError) as err:
        load_checkpoint(ckpt)
    one_line(err.value)


def test_tokenizer_config_cannot_pull_in_code(tiny_ckpt, tmp_path, marker):
    """Not pickle but the same harm: a tokenizer_config.json naming custom code (`auto_map`) in the
    checkpoint folder must not import it. (transformers asks on a terminal; with no terminal, as
    here, it refuses. load_tokenizer should pass trust_remote_code=False so it never asks.)"""
    from blip3v.model.checkpoint import load_tokenizer

    ckpt = Path(shutil.copytree(tiny_ckpt, tmp_path / "ckpt"))
    (ckpt / "evil_tok.py").write_text(f"open({str(marker)!r}, 'w')\n"
                                      "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]})
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(Blip3vError) as err:
        load_tokenizer(ckpt)
    one_line(err.value)


# ----------------------------------------------------------------------------- engines


def _engine_without_graphs(directory: Path) -> Path:
    """A real tokenizer.json and embedding table under a checked manifest, with valid stand-in ONNX
    graphs, so each reader along the engine path is reached in turn."""
    import onnx
    from onnx import TensorProto, helper

    from blip3v.model.tokenizer import stop_token_ids
    from blip3v.model.train import task_config, task_tokenizer
    from blip3v.runtime.manifest import file_entries, write_manifest
    from test_manifest import base_raw

    tok = task_tokenizer()
    cfg = task_config(tok, "gttm", 4)
    directory.mkdir(parents=True)
    tok.save_pretrained(str(directory / ".tok"))
    shutil.move(directory / ".tok" / "tokenizer.json", directory / "tokenizer.json")
    shutil.rmtree(directory / ".tok")
    text = cfg.text_config
    rows, hidden = cfg.additional_vocab_start + cfg.num_additional_tokens, int(text["hidden_size"])
    np.save(directory / "embed_tokens.npy", np.random.default_rng(0).normal(size=(rows, hidden)).astype(np.float32))
    for name, (i, o) in {"visual.onnx": ("pixel_values", "video_tokens"),
                         "decoder.onnx": ("inputs_embeds", "logits")}.items():
        graph = helper.make_graph([helper.make_node("Identity", [i], [o])], name,
                                  [helper.make_tensor_value_info(i, TensorProto.FLOAT, None)],
                                  [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)])
        onnx.save(helper.make_model(graph), str(directory / name))
    raw = base_raw()
    heads = int(text["num_attention_heads"])
    raw["model"].update(num_frames=cfg.num_frames, image_size=cfg.image_size, num_video_tokens=cfg.num_video_tokens,
                        hidden_size=hidden, num_logits=cfg.num_logits, num_attention_heads=heads,
                        num_key_value_heads=int(text["num_key_value_heads"]), head_dim=hidden // heads)
    raw["embeddings"].update(rows=rows, dim=hidden)
    raw["prompt"].update(template=cfg.prompt_template, system=cfg.system_prompt)
    raw["special_token_ids"] = dict(cfg.special_token_ids)
    raw["stop_token_ids"] = list(stop_token_ids(cfg))
    raw["files"] = file_entries(directory, ["visual.onnx", "decoder.onnx", "embed_tokens.npy", "tokenizer.json"])
    write_manifest(directory, raw)
    return directory


@pytest.fixture(scope="module")
def engine_base(tmp_path_factory) -> Path:
    return _engine_without_graphs(tmp_path_factory.mktemp("eng") / "engine")


def _plant_in_engine(engine: Path, name: str, marker: Path) -> None:
    """Replaces `name` with a payload and re-records its hash, so the hash checks pass and the
    file's own reader decides."""
    from blip3v.runtime.manifest import MANIFEST_NAME, file_entries, write_manifest

    if name == MANIFEST_NAME:
        (engine / name).write_bytes(payload(marker, text=True))
        return
    if name == "embed_tokens.npy":  # pickle inside a valid npy header: an object array
        np.save(engine / name, np.array([Payload(marker), 1], dtype=object), allow_pickle=True)
    else:
        (engine / name).write_bytes(payload(marker, text=name.endswith(".json")))
    raw = json.loads((engine / MANIFEST_NAME).read_text())
    raw["files"].update(file_entries(engine, [name]))
    write_manifest(engine, raw)


@pytest.mark.parametrize("planted", ["manifest.json", "tokenizer.json", "embed_tokens.npy", "visual.onnx",
                                     "decoder.onnx"])
def test_engine_files_never_unpickle(engine_base, tmp_path, marker, planted):
    engine = Path(shutil.copytree(engine_base, tmp_path / "engine"))
    _plant_in_engine(engine, planted, marker)
    proc = run_cli("ask", str(SAMPLE), "what happens?", "--engine", str(engine))
    assert_one_line_error(proc, planted)


def test_the_engine_without_planted_files_gets_past_its_readers(engine_base):
    """Control for the test above: untouched, the stand-in engine is refused only for its graphs'
    tensors (every file before them was read and accepted), so each planted file was really reached."""
    proc = run_cli("ask", str(SAMPLE), "what happens?", "--engine", str(engine_base))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "manifest.json" not in proc.stderr and "tokenizer" not in proc.stderr and "embed_tokens" not in proc.stderr


# ----------------------------------------------------------------------------- data and videos


def test_videos_datasets_and_calibration_inputs_never_unpickle(tmp_path, marker):
    from blip3v.calibration.data import CalibrationSet
    from blip3v.data.synth import read_dataset
    from blip3v.runtime.video import load_clip

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(payload(marker))
    with pytest.raises(Blip3vError) as err:
        load_clip(clip, 4, 32)
    assert "clip.mp4" in one_line(err.value)

    calib = tmp_path / "calib"
    calib.mkdir()
    shutil.copy(clip, calib / "a.mp4")
    with pytest.raises(Blip3vError) as err:
        CalibrationSet.from_folder(calib, 4, 32, samples=1)
    assert "a.mp4" in one_line(err.value)
    shutil.copy(SAMPLE, calib / "a.mp4")  # a real video, and a payload where its question is looked up
    (calib / "qa.jsonl").write_bytes(payload(marker, text=True))
    with pytest.raises(Blip3vError) as err:
        CalibrationSet.from_folder(calib, 4, 32, samples=1)
    assert "qa.jsonl" in one_line(err.value)

    data = tmp_path / "data"
    data.mkdir()
    (data / "qa.jsonl").write_bytes(payload(marker, text=True))
    with pytest.raises(Blip3vError) as err:
        read_dataset(data)
    assert "qa.jsonl" in one_line(err.value)
