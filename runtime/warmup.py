"""Warm-up on a GPU: compiled kernels kept on disk between runs, and the first call's cost measured.

A process's first request on CUDA pays for things later requests do not: Triton compiling the
kernels of blip3v.kernels, inductor compiling a torch.compile'd step, cuBLAS/cuDNN picking their
algorithms, the decode step's CUDA-graph capture. The compilers cache what they build on disk,
but by default Triton under ~/.triton and inductor under /tmp (cleared at reboot);
`configure_compile_caches` points both at one blip3v folder, `~/.cache/blip3v` (or
`$XDG_CACHE_HOME/blip3v`), unless the user set the variable, so a second run loads the kernels
instead of compiling them. It must run before the first compilation of the process: Triton and
inductor read the variables when they first compile; inductor's FX graph cache flag when its
config module is imported (set on the module if that has happened already).

`warm_up(engine)` runs one short request on a blank clip through the path a question takes
(blip3v.runtime.session's Clip: visual encoder, prefill, decode steps) twice, and says how long the
first took and the second: their difference is the one-off cost, which `blip3v ask --device cuda`
reports on stderr before answering. The blank clip is not put in the engine's clip cache.

torch-free: nothing here imports torch (the engine's host does, when it runs on it).

    python -m blip3v.runtime.warmup [--model DIR] [--device cuda]
        # one process's warm-up as JSON; run it twice to see the second process load the kernels
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# variable -> sub-folder of the blip3v cache folder
CACHE_DIRS = {"TRITON_CACHE_DIR": "triton", "TORCHINDUCTOR_CACHE_DIR": "inductor"}
FX_GRAPH_CACHE = "TORCHINDUCTOR_FX_GRAPH_CACHE"  # inductor's own switch of its on-disk graph cache
WARMUP_QUESTION = "what happens?"


def cache_root(environ: MutableMapping[str, str] | None = None) -> Path:
    """`$XDG_CACHE_HOME/blip3v`, else `$HOME/.cache/blip3v`."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CACHE_HOME") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".cache")
    return Path(base) / "blip3v"


def configure_compile_caches(environ: MutableMapping[str, str] | None = None) -> dict[str, dict[str, str]]:
    """Points Triton's and inductor's caches at the blip3v cache folder, leaving any the user set,
    and turns inductor's FX graph cache on unless the user set its switch -> {variable: {"path" or
    "value", "source": "user" | "blip3v"}}. A folder that cannot be made is left to the compiler's
    default (source "default") rather than failing the run over a cache."""
    environ = os.environ if environ is None else environ
    root = cache_root(environ)
    out: dict[str, dict[str, str]] = {}
    for var, sub in CACHE_DIRS.items():
        if environ.get(var):
            out[var] = {"path": environ[var], "source": "user"}
            continue
        path = root / sub
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError:
            out[var] = {"path": "", "source": "default"}
            continue
        environ[var] = str(path)
        out[var] = {"path": str(path), "source": "blip3v"}
    if environ.get(FX_GRAPH_CACHE):
        out[FX_GRAPH_CACHE] = {"value": environ[FX_GRAPH_CACHE], "source": "user"}
    else:
        environ[FX_GRAPH_CACHE] = "1"
        config = sys.modules.get("torch._inductor.config")
        if config is not None and environ is os.environ:  # imported already: the variable was read
            config.fx_graph_cache = True
        out[FX_GRAPH_CACHE] = {"value": "1", "source": "blip3v"}
    return out


@dataclass
class WarmUp:
    """Seconds of the first blank request of a process and of the one after it (steady state)."""

    first_s: float
    second_s: float

    @property
    def one_off_s(self) -> float:
        """What the first request paid once: compilation, algorithm choice, graph capture."""
        return max(0.0, self.first_s - self.second_s)


def warm_up(engine: Any, new_tokens: int = 2) -> WarmUp:
    """One blank-clip request (zero pixels, a short question, `new_tokens` greedy tokens) through
    `engine`'s question path, run twice and timed. The KV storage and graphs it leaves behind are
    the ones a request of the same shape reuses (blip3v.model.fast_decode keeps them)."""
    import numpy as np

    from blip3v.runtime.generation import SamplingConfig
    from blip3v.runtime.session import Clip

    host = engine.host
    pixels = np.zeros((1, host.num_frames, 3, host.image_size, host.image_size), np.float32)  # (1, T, 3, S, S)
    sampling = SamplingConfig(max_new_tokens=new_tokens)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        clip = Clip(engine, "warm-up", host.encode_video(pixels), {})  # not remembered by the engine
        clip.ask(WARMUP_QUESTION, sampling)
        times.append(time.perf_counter() - t0)
        del clip  # its cache storage goes back to the decoder for the next request
    return WarmUp(times[0], times[1])


def describe(warm: WarmUp, caches: dict[str, dict[str, str]]) -> str:
    """The stderr line of `blip3v ask --device cuda`."""
    where = sorted({c["path"] for c in caches.values() if c.get("path")})
    kept = f"; compiled kernels cached in {', '.join(where)}" if where else ""
    return (f"warm-up: {warm.first_s + warm.second_s:.2f} s (a blank request {warm.first_s:.2f} s, then "
            f"{warm.second_s:.2f} s: {warm.one_off_s:.2f} s of compilation and set-up{kept})")


def cached_files(caches: dict[str, dict[str, str]]) -> dict[str, int]:
    """Files under each cache folder (what a later process can load instead of compiling)."""
    return {var: sum(len(files) for _, _, files in os.walk(c["path"])) for var, c in caches.items() if c.get("path")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="One process's warm-up on an engine, as JSON.")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the shipped demo model)")
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"), help="where the model runs (default cuda)")
    args = p.parse_args(argv)
    caches = configure_compile_caches() if args.device == "cuda" else {}  # before anything compiles
    from blip3v.errors import Blip3vError
    from blip3v.runtime.session import Engine

    t0 = time.perf_counter()
    try:
        engine = Engine.open(model=args.model, device=args.device)
        opened = time.perf_counter() - t0
        before = cached_files(caches)
        warm = warm_up(engine)
    except Blip3vError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"open_s": opened, "first_s": warm.first_s, "second_s": warm.second_s, "one_off_s": warm.one_off_s,
                      "caches": caches, "cached_files_before": before, "cached_files_after": cached_files(caches),
                      "line": describe(warm, caches)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
