"""Token-budget ablation on the synthetic video-QA task (a small reproduction of the paper's
temporal-encoder study, arXiv 2410.16267 sec. 3): trains each preset for the same number of steps
and evaluates it on held-out clips, printing a markdown table of accuracy per category.

    python benchmarks/ablation.py --steps 600 --lr 2e-3 --val-seed 7 --n 200 [--jobs 2]

Each run is `blip3v train --preset P` then `blip3v eval --json`, so the table is reproducible
from the CLI alone. Results land in runs/ablation/<preset>/ (checkpoints) and runs/ablation/results.json.
RESULTS.md's "Token-budget ablation" table is this script with --steps 400.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PRESETS = ["task-mean-16", "task-tl-16", "task-tl-4", "task-gttm-tl-4", "task-gttm-16", "task-none-128"]


def run(cmd: list[str]) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def one(preset: str, args) -> dict:
    out = Path(args.root) / preset
    train = json.loads(run(["blip3v", "train", "--preset", preset, "--out", str(out), "--steps", str(args.steps),
                            "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--quiet", "--json"]))
    result = json.loads(run(["blip3v", "eval", "--model", str(out), "--data", args.val, "--quiet", "--json"]))
    result.update(preset=preset, steps=train["steps"], train_seconds=train["seconds"])
    print(f"{preset}: {result['accuracy']:.3f}", file=sys.stderr, flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--val-seed", type=int, default=7)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--root", default="runs/ablation")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--presets", default=",".join(PRESETS))
    args = p.parse_args()
    args.val = str(Path(args.root) / f"val-seed{args.val_seed}")
    if not Path(args.val).exists():
        run(["blip3v", "data", "synth", "--out", args.val, "--n", str(args.n), "--seed", str(args.val_seed), "--quiet"])
    presets = args.presets.split(",")
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda pr: one(pr, args), presets))
    Path(args.root, "results.json").write_text(json.dumps(results, indent=2) + "\n")
    cats = sorted({c for r in results for c in r["per_category"]})
    print("| preset | video tokens | overall | " + " | ".join(cats) + " | train s |")
    print("|---" * (len(cats) + 4) + "|")
    for r in results:
        m = r["preset"].rsplit("-", 1)[-1]
        row = " | ".join(f"{r['per_category'][c]:.2f}" for c in cats)
        print(f"| {r['preset']} | {m} | {r['accuracy']:.3f} | {row} | {r['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
