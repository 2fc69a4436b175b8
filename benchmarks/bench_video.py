"""Video stage timing: `load_clip` (what `blip3v ask --json` reports as `timings_ms.decode_video`).

Each run is a fresh process that imports the video module and times one `load_clip` call, as one
`blip3v ask` does; the median over `--runs` is printed per clip (wall clock, and the process's CPU
time over all its threads, which a shared machine's load does not inflate), with the parts the
module reports (`video_open`, `video_index`, `video_seek`, `video_decode`, `video_convert`).

    python benchmarks/bench_video.py --make /tmp/clips            # the clips of RESULTS.md
    python benchmarks/bench_video.py --clips /tmp/clips [--runs 5] [--before /tmp/video_before.py]

`--before` also times another copy of runtime/video.py (e.g. `git show HEAD:runtime/video.py >
/tmp/video_before.py`), its runs alternating with this module's so both see the same load.
Extra `load_clip` keyword arguments go through `--kw name=value` (e.g. `--kw scaler=ffmpeg`), and
settings of the video module through `--set NAME=JSON` (e.g. `--set GOP_WORKERS=1` for one decoder,
`--set 'GOP_THREAD_TYPE="AUTO"'`), for this module's runs only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "blip3v" / "assets" / "sample.mp4"
DEMO_CONFIG = ROOT / "blip3v" / "assets" / "demo-model" / "config.json"

# The clips of issue 24 (file name -> ffmpeg arguments after `ffmpeg -y`), sampled at 8 frames of
# 384 px, the real model's input. The mkv is the mp4 remuxed, so both hold the same stream.
CLIPS = {
    "hd60.mp4": "-f lavfi -i testsrc2=size=1920x1080:rate=60 -t 10 -c:v libx264 -preset ultrafast",
    "long.mp4": "-f lavfi -i testsrc2=size=854x480:rate=25 -t 600 -c:v libx264 -preset ultrafast -g 250",
    "long.mkv": "-i {dir}/long.mp4 -c copy",
}
BIG_FRAMES, BIG_SIZE = 8, 384

CHILD = """
import json, sys, time
spec = json.loads(sys.argv[1])
if spec["module"]:
    import importlib.util
    loader = importlib.util.spec_from_file_location("video_under_test", spec["module"])
    video = sys.modules["video_under_test"] = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(video)
else:
    from blip3v.runtime import video
for name, value in spec.get("set", {}).items():  # module settings, e.g. GOP_WORKERS=1
    setattr(video, name, value)
parts = {}
kwargs = dict(spec["kw"])
if spec["timings"]:
    kwargs["timings"] = parts
t0, c0 = time.perf_counter(), time.process_time()
video.load_clip(spec["path"], spec["frames"], spec["size"], spec["mean"], spec["std"], **kwargs)
parts["total"] = (time.perf_counter() - t0) * 1e3
parts["cpu"] = (time.process_time() - c0) * 1e3  # all threads: the work done, whatever the load
print(json.dumps(parts))
"""


def demo_settings() -> tuple[int, int, list[float], list[float]]:
    cfg = json.loads(DEMO_CONFIG.read_text())
    video = cfg["video_config"]
    return video["num_frames"], cfg["vision_encoder_config"]["image_size"], video["image_mean"], video["image_std"]


def make_clips(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, args in CLIPS.items():
        target = directory / name
        if target.exists():
            continue
        cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
               *args.format(dir=directory).split(), str(target)]
        print(" ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)


def run_once(spec: dict) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if out.returncode != 0:
        sys.exit(f"{spec['path']}: {out.stderr.strip()}")
    return json.loads(out.stdout)


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def time_clip(path: Path, frames: int, size: int, mean, std, args) -> tuple[dict, dict | None]:
    """Median of each reported part over `args.runs` fresh processes, for this module and, with
    --before, for that copy (runs alternating)."""
    spec = {"path": str(path), "frames": frames, "size": size, "mean": mean, "std": std, "module": None,
            "kw": dict(kv.split("=", 1) for kv in args.kw), "timings": True,
            "set": {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}}
    before = dict(spec, module=args.before, kw={}, timings=False, set={}) if args.before else None
    now_runs, before_runs = [], []
    for _ in range(args.runs):
        now_runs.append(run_once(spec))
        if before:
            before_runs.append(run_once(before))
    return medians(now_runs), (medians(before_runs) if before else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make", type=Path, help="write the benchmark clips into this folder and stop")
    parser.add_argument("--clips", type=Path, help="folder holding the clips --make writes")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--before", help="also time this copy of runtime/video.py, alternating runs")
    parser.add_argument("--kw", action="append", default=[], help="extra load_clip keyword, name=value")
    parser.add_argument("--set", action="append", default=[],
                        help="a setting of the video module, NAME=JSON (e.g. GOP_WORKERS=1), for this module only")
    args = parser.parse_args()
    if args.make:
        make_clips(args.make)
        return

    frames, size, mean, std = demo_settings()
    table = [("sample.mp4", SAMPLE, frames, size, mean, std)]
    if args.clips:
        table += [(name, args.clips / name, BIG_FRAMES, BIG_SIZE, [0.5] * 3, [0.5] * 3) for name in CLIPS]
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| clip | T x S | before: wall / cpu ms | now: wall / cpu ms | parts now (ms) |")
    print("|---|---|---|---|---|")
    for name, path, t, s, m, sd in table:
        now, before = time_clip(path, t, s, m, sd, args)
        parts = ", ".join(f"{k[len('video_'):]} {v:.1f}" for k, v in now.items() if k.startswith("video_"))
        then = f"{before['total']:.1f} / {before['cpu']:.1f}" if before else "-"
        print(f"| {name} | {t} x {s} | {then} | {now['total']:.1f} / {now['cpu']:.1f} | {parts} |", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
