"""Peak resident memory of a command, step by step: the stage columns of RESULTS' "Peak memory".

    python benchmarks/rss_steps.py -- blip3v bench decode --layers 4 --precision fp32,int4 --json

Runs the command, passes its stdout through, reads its stderr (echoed as it comes) and samples the
resident memory of the command and its children every `--every` seconds. Each sample is booked
under the last line the command printed on stderr (its current step), and the largest sample per
step is printed at the end, with the overall peak. Sampling misses spikes shorter than the
interval; `/usr/bin/time -v`'s maximum resident set size is the exact overall figure.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path


def tree_rss_bytes(pid: int) -> int:
    """RSS of `pid` and every descendant, from /proc (Linux)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * 4096
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue  # the process ended between two reads
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=float, default=1.0, help="Seconds between samples.")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run.")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, bufsize=1)
    step = ["(start)"]
    peaks: dict[str, int] = {}

    def read_stderr() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            sys.stderr.write(line)
            text = line.replace("\r", "\n").strip().splitlines()
            if text and text[-1].strip():
                step[0] = text[-1].strip()[:72]

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    while proc.poll() is None:
        rss = tree_rss_bytes(proc.pid)
        peaks[step[0]] = max(peaks.get(step[0], 0), rss)
        time.sleep(args.every)
    reader.join(timeout=5)
    print(f"\npeak resident memory by step (GiB, sampled every {args.every:g} s):", file=sys.stderr)
    for name, rss in peaks.items():
        print(f"  {rss / 2**30:6.2f}  {name}", file=sys.stderr)
    print(f"  {max(peaks.values(), default=0) / 2**30:6.2f}  overall (sampled)", file=sys.stderr)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
