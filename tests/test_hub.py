"""`--model ORG/NAME`: Hub ids resolved through huggingface_hub's cache, offline.

The model hubs are not reachable here, so each test builds a cache on disk exactly as
huggingface_hub lays one out (`models--ORG--NAME/{blobs,snapshots/<commit>,refs/<ref>}`, snapshot
files as relative symlinks to content-addressed blobs), holding tiny checkpoints, and runs with
`HF_HUB_OFFLINE=1`: nothing is downloaded. The layout is checked against huggingface_hub's own
readers (`scan_cache_dir`, `snapshot_download(local_files_only=True)`) before the CLI uses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import CliJob, assert_one_line_error, head_start, in_background, make_tiny_checkpoint, run_cli

REPO = "blip3v-test/tiny-gttm"
MAIN = hashlib.sha1(b"main commit").hexdigest()  # commits are 40 hex digits
V2 = hashlib.sha1(b"v2 commit").hexdigest()


def add_snapshot(cache: Path, repo_id: str, files_from: Path, commit: str, refs: tuple[str, ...] = ("main",),
                 extra: dict[str, bytes] | None = None) -> Path:
    """Puts `files_from`'s files (plus `extra`) into `cache` as huggingface_hub stores a downloaded
    commit of a model repository, and points each ref at it. Returns the snapshot folder."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    contents = {str(p.relative_to(files_from)): p.read_bytes() for p in sorted(files_from.rglob("*")) if p.is_file()}
    contents.update(extra or {})
    for rel, data in contents.items():
        # A blob is named by the file's ETag on the Hub: sha256 of the content for LFS files (the
        # weights), the git blob sha1 for the small files kept in git.
        if rel.endswith(".safetensors"):
            digest = hashlib.sha256(data).hexdigest()
        else:
            digest = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = storage / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))  # relative, as huggingface_hub's _create_symlink
    for ref in refs:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # the bare hash, no newline
    return snapshot


@head_start("hub_cache")
def _hub_cache(request) -> Path:
    """main: the session's tiny gttm checkpoint (16 video tokens); ref v2: a `tl` model with 2 video
    tokens, so which snapshot answered shows in `video_tokens`. Also the authors' extra files,
    which resolution must not need. Made once, at the session's start (the export below reads it)."""
    root = request.getfixturevalue("tmp_path_factory").mktemp("hub")
    cache = root / "hub-cache"
    add_snapshot(cache, REPO, request.getfixturevalue("tiny_ckpt"), MAIN,
                 extra={"README.md": b"# model card\n", "modeling_xgenmm.py": b"# remote code\n"})
    v2 = make_tiny_checkpoint(root / "tl-2", temporal="tl", num_tokens=2, seed=1)
    add_snapshot(cache, REPO, v2, V2, refs=("v2",))
    return cache


@pytest.fixture(scope="module")
def hub_cache(request) -> Path:
    return _hub_cache(request)


@pytest.fixture(scope="module")
def offline(hub_cache):
    """The fake cache for subprocesses (environment) and for this process (huggingface_hub reads
    its environment once, at import, into `constants`)."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(hub_cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        yield hub_cache


@pytest.fixture(scope="module")
def hub_answer(offline) -> dict:
    """`blip3v ask --model ORG/NAME --json` on the sample clip."""
    return _ask("--model", REPO)


def test_fake_cache_is_what_huggingface_hub_reads(hub_cache):
    from huggingface_hub import scan_cache_dir, snapshot_download

    info = scan_cache_dir(hub_cache)
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    assert (repo.repo_id, repo.repo_type) == (REPO, "model")
    assert {rev.commit_hash: set(rev.refs) for rev in repo.revisions} == {MAIN: {"main"}, V2: {"v2"}}
    got = snapshot_download(REPO, cache_dir=hub_cache, local_files_only=True)
    assert Path(got) == hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / MAIN
    weights = sorted(Path(got).glob("*.safetensors"))
    assert weights and all(p.is_symlink() and p.resolve().parent.name == "blobs" for p in weights)
    assert snapshot_download(REPO, revision="v2", cache_dir=hub_cache, local_files_only=True).endswith(V2)


@pytest.mark.parametrize("text, hub", [
    ("Salesforce/xgen-mm-vid-phi3-mini-r-v1.5-128tokens-8frames", True),
    ("org/name", True), ("runs/demo", True),  # spelled like an id: used as one unless the folder exists
    ("demo", False), ("/abs/org/name", False), ("./org/name", False), ("a/b/c", False),
    ("org/na--me", False), ("org/../x", False), ("org/", False), ("örg/name", False), ("org/name.git", False),
])
def test_what_counts_as_a_hub_id(text, hub):
    from blip3v.model.hub import is_hub_id

    assert is_hub_id(text) is hub


def test_local_directory_wins_over_a_hub_id(offline, tiny_ckpt, tmp_path, monkeypatch):
    from blip3v.errors import InputError
    from blip3v.model.hub import resolve_checkpoint

    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint(REPO).parent.name == "snapshots"
    shutil.copytree(tiny_ckpt, tmp_path / REPO)
    assert resolve_checkpoint(REPO) == Path(REPO)
    with pytest.raises(InputError, match="--revision applies to a Hub model id"):
        resolve_checkpoint(REPO, revision="v2")
    assert resolve_checkpoint(tmp_path / "missing") == tmp_path / "missing"  # the loader says "not found"


def test_revision_selects_a_snapshot(offline):
    from blip3v.errors import CheckpointError
    from blip3v.model.hub import resolve_checkpoint

    assert resolve_checkpoint(REPO).name == MAIN
    assert resolve_checkpoint(REPO, revision="v2").name == V2
    assert resolve_checkpoint(REPO, revision=V2).name == V2  # a commit hash needs no ref
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint(REPO, revision="v3")
    message = str(err.value)
    assert "'v3'" in message and f"hf download {REPO} --revision v3" in message and "\n" not in message


def test_missing_id_offline_says_how_to_download(offline):
    from blip3v.errors import CheckpointError
    from blip3v.model.hub import resolve_checkpoint

    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint("blip3v-test/not-downloaded")
    message = str(err.value)
    assert "\n" not in message
    for part in ("hf download blip3v-test/not-downloaded", "huggingface-cli download", "HF_HUB_OFFLINE=1",
                 str(offline), "local checkpoint directory"):
        assert part in message, (part, message)


def test_hf_home_locates_the_cache(hub_cache, tmp_path):
    """Without HF_HUB_CACHE, huggingface_hub's cache is HF_HOME/hub."""
    home = tmp_path / "hf-home"
    shutil.copytree(hub_cache, home / "hub", symlinks=True)  # snapshot links are relative: they move along
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    code = f"from blip3v.model.hub import resolve_checkpoint; print(resolve_checkpoint({REPO!r}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == home / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / MAIN


def test_loader_files_are_what_the_loader_needs(tiny_ckpt, tmp_path):
    """The allow-list keeps every file a saved checkpoint has (it loads from those alone) and none
    of the released repositories' other files."""
    from huggingface_hub.utils import filter_repo_objects

    from blip3v.model.checkpoint import load_checkpoint, load_tokenizer
    from blip3v.model.hub import LOADER_FILES

    saved = sorted(p.name for p in tiny_ckpt.iterdir())
    others = ["README.md", "modeling_xgenmm.py", "image_processing_blip_3.py", "pytorch_model.bin",
              "test_samples/clip.mp4", ".gitattributes"]
    released = ["tokenizer.model", "special_tokens_map.json", "added_tokens.json"]
    kept = list(filter_repo_objects(saved + others + released, allow_patterns=list(LOADER_FILES)))
    assert sorted(kept) == sorted(saved + released)
    only = tmp_path / "only"
    only.mkdir()
    for name in kept:
        if (tiny_ckpt / name).exists():
            shutil.copy(tiny_ckpt / name, only / name)
    assert load_checkpoint(only).config.num_video_tokens == 16
    assert load_tokenizer(only) is not None


def test_open_host_checks_revision_before_loading():
    from blip3v.errors import InputError
    from blip3v.runtime.backends import open_host

    with pytest.raises(InputError, match="give --model ORG/NAME"):
        open_host(None, None, revision="v2")


def _ask(*args: str) -> dict:
    from blip3v.assets import SAMPLE_CLIP

    proc = run_cli("ask", SAMPLE_CLIP, "what happens?", *args, "--json", "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_cli_ask_from_a_hub_id(offline, hub_answer, tiny_ckpt):
    """The Hub id answers as the same checkpoint given as a directory; --revision picks the other."""
    with ThreadPoolExecutor(2) as pool:  # two independent CLI runs, side by side on the two cores
        from_dir, v2 = pool.map(lambda args: _ask(*args), [("--model", str(tiny_ckpt)),
                                                           ("--model", REPO, "--revision", "v2")])
    assert (hub_answer["answer"], hub_answer["video_tokens"]) == (from_dir["answer"], from_dir["video_tokens"])
    assert hub_answer["video_tokens"] == 16
    assert v2["video_tokens"] == 2


@head_start("hub_export")
def _hub_export_job(request) -> tuple[Path, CliJob]:
    """`blip3v export --model ORG/NAME --out DIR --json` in the cache's offline environment (as
    `offline` sets it), started with the session: (DIR, the run)."""
    cache = _hub_cache(request)
    out = request.getfixturevalue("tmp_path_factory").mktemp("hub-engine") / "engine"
    job = CliJob("export", "--model", REPO, "--out", out, "--json",
                 env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    return out, in_background(job)


@pytest.fixture(scope="module")
def hub_export(offline, request) -> tuple[Path, dict]:
    """(DIR, the printed manifest) of the export above."""
    out, job = _hub_export_job(request)
    proc = job.result()
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout)


def test_cli_export_from_a_hub_id(hub_export, hub_answer):
    out, manifest = hub_export
    assert manifest["export"]["source"] == f"{REPO}@{MAIN}"
    assert manifest["model"]["num_video_tokens"] == 16
    assert json.loads((out / "manifest.json").read_text())["export"]["source"] == f"{REPO}@{MAIN}"
    # The engine answers as the checkpoint it came from (default --device: auto, cpu here).
    assert _ask("--engine", str(out))["answer"] == hub_answer["answer"]


def test_device_auto_is_cuda_only_where_the_backend_has_it(offline, hub_export):
    import onnxruntime as ort
    import torch

    from blip3v.runtime.backends import open_host

    ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    assert open_host(engine=hub_export[0], device="auto").device == ("cuda" if ort_cuda else "cpu")
    torch_host = open_host(REPO, device="auto", dtype="fp32", decoder="reference")
    assert torch_host.device == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("command", [
    ("ask", "CLIP", "what happens?", "--model", "blip3v-test/not-downloaded"),
    ("export", "--model", "blip3v-test/not-downloaded", "--out", "OUT"),
])
def test_cli_missing_hub_id_is_one_line(offline, tmp_path, command):
    from blip3v.assets import SAMPLE_CLIP

    args = [{"CLIP": str(SAMPLE_CLIP), "OUT": str(tmp_path / "e")}.get(a, a) for a in command]
    assert_one_line_error(run_cli(*args), "hf download blip3v-test/not-downloaded", "HF_HUB_OFFLINE=1")
    assert not (tmp_path / "e").exists()
