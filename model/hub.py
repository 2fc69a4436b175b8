"""`--model ORG/NAME`: a Hugging Face Hub model id resolved to a checkpoint directory.

A released checkpoint (e.g. `Salesforce/xgen-mm-vid-phi3-mini-r-v1.5-128tokens-8frames`) is fetched by
`huggingface_hub.snapshot_download` into the Hub's own cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
~/.cache/huggingface/hub), so a model downloaded once with `hf download` is found again, and
`HF_HUB_OFFLINE=1` keeps every look-up on the local disk. Only the files the loader reads are
fetched (`LOADER_FILES`): the released repositories also hold the authors' remote code and samples.

Rules, in order:
- an existing local path always wins, even when it is spelled like a Hub id (`runs/demo`);
- `ORG/NAME` (one slash, Hub characters) is a Hub id, with `revision` a branch, tag or commit;
- anything else is left as a path, and the checkpoint loader says it is not found.
A Hub id that cannot be resolved is one `CheckpointError` line saying how to download it.
Nothing here imports torch: the resolver is shared by the PyTorch backend and `blip3v export`.

    python -c "from blip3v.model.hub import resolve_checkpoint; print(resolve_checkpoint('ORG/NAME'))"
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from blip3v.errors import CheckpointError, InputError

# What `load_checkpoint` / `load_tokenizer` read (see model/checkpoint.py): config.json, the
# safetensors shards and their index, and the tokenizer (SentencePiece `tokenizer.model` and
# `tokenizer_config.json` in the release; `tokenizer.json` where a fast tokenizer is saved).
LOADER_FILES = (
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)

# huggingface_hub's own rule (utils/_validators.py, REPO_ID_REGEX) narrowed to ORG/NAME: a bare NAME
# is far more often a mistyped local folder than one of the few namespace-less Hub models.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}", re.ASCII)


def is_hub_id(text: str) -> bool:
    """Whether `text` is spelled like a Hub model id `ORG/NAME` (it may also name a local path)."""
    return bool(_HUB_ID.fullmatch(text)) and "--" not in text and ".." not in text \
        and not text.endswith((".", "-", ".git"))


def resolve_checkpoint(model: str | os.PathLike, revision: str | None = None) -> Path:
    """A local checkpoint directory for `model`: the path itself, or the cached Hub snapshot."""
    if revision is not None and not revision.strip():
        raise InputError("--revision is empty: give a branch, tag or commit of the Hub model")
    text = os.fspath(model)
    local = isinstance(model, os.PathLike) or Path(text).exists()
    if local or not is_hub_id(text):
        if revision is not None:
            what = "is a local path" if local else "is not spelled ORG/NAME"
            raise InputError(f"--revision applies to a Hub model id (ORG/NAME); {text} {what}")
        return Path(text)
    return _snapshot(text, revision)


def checkpoint_source(model: str | os.PathLike, directory: Path) -> str:
    """How an engine's manifest names where its weights came from: `ORG/NAME@commit` for a Hub
    snapshot (its folder is named by the commit), else the directory."""
    text = os.fspath(model)
    if Path(text) != directory and directory.parent.name == "snapshots":
        return f"{text}@{directory.name}"
    return str(directory)


def _snapshot(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import constants, errors, snapshot_download
        from huggingface_hub.errors import (
            HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
        )
    except ImportError:  # the torch-free runtime install runs engines only
        raise InputError(f"--model {repo_id} is a Hub id, which needs huggingface_hub: "
                         "pip install 'blip3v[torch]'") from None
    # huggingface_hub 2.x checks a cached snapshot against its cached file listing; older ones cannot.
    IncompleteSnapshotError = getattr(errors, "IncompleteSnapshotError", _NeverRaised)

    at = f" at revision {revision!r}" if revision else ""
    fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    how = (f"download it on a machine with internet with `{fetch}` (older huggingface_hub: "
           f"`huggingface-cli download {repo_id}`) into that cache, or pass a local checkpoint directory")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(LOADER_FILES)))
    except IncompleteSnapshotError:  # before LocalEntryNotFoundError, its base class
        raise CheckpointError(f"{repo_id}{at}: the cached snapshot in {constants.HF_HUB_CACHE} is incomplete; "
                              f"complete it with `{fetch}`") from None
    except LocalEntryNotFoundError:
        why = "while offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "and the Hub could not be reached"
        raise CheckpointError(f"{repo_id}: no local directory of that name, and the Hub model{at} is not in the "
                              f"Hugging Face cache {constants.HF_HUB_CACHE} {why}; {how}") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo_id}: revision {revision!r} not found on the Hub") from None
    except RepositoryNotFoundError:  # also private and gated repositories without a token
        raise CheckpointError(f"{repo_id}: no local directory of that name and no such model on the Hub "
                              "(private or gated models need `hf auth login`)") from None
    except HfHubHTTPError as exc:
        raise CheckpointError(f"{repo_id}: the Hub answered {_first_line(exc)}") from None
    except ValueError as exc:  # huggingface_hub's HFValidationError for a malformed id or revision
        raise InputError(f"--model {repo_id}: {_first_line(exc)}") from None
    except OSError as exc:  # disk full or an unwritable cache while downloading
        raise CheckpointError(f"{repo_id}: cannot write the Hugging Face cache {constants.HF_HUB_CACHE} "
                              f"({_first_line(exc)})") from None


class _NeverRaised(Exception):
    pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
