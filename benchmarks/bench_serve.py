"""A bounded load benchmark of `blip3v serve` (not a unit test): 1, 4 and 16 concurrent clients.

    blip3v export --model blip3v/assets/demo-model --out /tmp/demo-engine
    python benchmarks/bench_serve.py --engine /tmp/demo-engine [--requests 200] [--clients 1 4 16] \
        [--clips 8] [--json out.json]

What it does. Writes `--clips` synthetic clips (blip3v.data.synth) into a media root, computes the
greedy answer of every (clip, question) pair in this process with the same engine (a fresh Engine,
`clip.ask`: the session API's path), starts `blip3v serve --engine DIR --port 0 --media-root ...`
in a subprocess, asks every pair once (the cold pass: each clip's first request decodes and encodes
it), then for each client count runs `--requests` requests spread over that many threads, each
thread with its own official `openai` client (max_retries=0, so an error is counted, not retried).
Requests cycle through the pairs; every other one sends its clip as a base64 data: URI instead of
a path, and every fourth one streams. Every answer is compared with the greedy one.

Reported per level: p50 / p95 / max latency (request sent to last byte, client side), the mean
latency the server measured (arrival to last byte, from /metrics), throughput
(requests / wall time), the count of non-2xx answers by status (5xx must be 0), wrong answers
(must be 0), and the clip-cache hits / misses the server's /metrics counted. Exits 1 when a 5xx
or a wrong answer was seen. The client threads run on the same machine as the server: on a small
box they take CPU from it, which the figures include.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

QUESTIONS = ("what colour does the square turn?", "which way does the circle move?", "how many shapes are there?",
             "what shape is the red object?")
MODEL = "blip3v"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def start_server(engine: str, media: Path, max_queue: int, log_dir: Path) -> tuple[subprocess.Popen, str]:
    out, err = open(log_dir / "serve.out", "wb"), open(log_dir / "serve.err", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "blip3v.cli", "serve", "--engine", engine, "--port", "0",
                             "--media-root", str(media), "--max-queue", str(max_queue), "--timeout", "600"],
                            stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    end = time.monotonic() + 300
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {(log_dir / 'serve.err').read_text()[-2000:]}")
        found = re.search(r"(http://[\d.]+:\d+)/v1", (log_dir / "serve.out").read_text())
        if found:
            try:
                metrics(found.group(1))
                return proc, found.group(1)
            except OSError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start within 300 s")


class Client:
    """One thread's requests."""

    def __init__(self, url: str, media: Path):
        import openai

        self.openai = openai
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        self.media = media
        self.encoded: dict[str, str] = {}

    def ask(self, i: int, clip: str, question: str) -> tuple[float, int, str | None]:
        """-> (seconds, HTTP status, answer text)."""
        if i % 2:
            url = self.encoded.get(clip)
            if url is None:
                url = self.encoded[clip] = "data:video/mp4;base64," + base64.b64encode((self.media / clip).read_bytes()).decode()
        else:
            url = clip
        body: Any = {"model": MODEL, "max_tokens": 32, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": question}]}]}
        t0 = time.perf_counter()
        try:
            if i % 4 == 3:
                text = "".join(c.choices[0].delta.content or "" for c in
                               self.client.chat.completions.create(stream=True, **body) if c.choices)
            else:
                text = self.client.chat.completions.create(**body).choices[0].message.content
            return time.perf_counter() - t0, 200, text
        except self.openai.APIStatusError as exc:
            return time.perf_counter() - t0, exc.status_code, None
        except self.openai.APIError:
            return time.perf_counter() - t0, 0, None  # no HTTP answer at all (connection lost)


def run_level(url: str, media: Path, pairs: list[tuple[str, str]], greedy: dict, clients: int, requests: int) -> dict:
    local = threading.local()
    before = metrics(url)

    def one(i: int):
        if not hasattr(local, "client"):
            local.client = Client(url, media)
        clip, question = pairs[i % len(pairs)]
        seconds, status, text = local.client.ask(i, clip, question)
        return seconds, status, text, greedy[(clip, question)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    after = metrics(url)
    ok = [r[0] for r in results if 200 <= r[1] < 300]
    statuses = Counter(r[1] for r in results if not 200 <= r[1] < 300)
    wrong = sum(1 for r in results if 200 <= r[1] < 300 and r[2] != r[3])
    return {"clients": clients, "requests": requests, "ok": len(ok), "wall_s": round(wall, 2),
            "throughput_rps": round(len(ok) / wall, 2), "p50_ms": round(1e3 * percentile(ok, 0.5), 1),
            "p95_ms": round(1e3 * percentile(ok, 0.95), 1), "max_ms": round(1e3 * max(ok), 1),
            "non_2xx": dict(statuses), "5xx": sum(n for s, n in statuses.items() if s >= 500 or s == 0),
            "wrong_answers": wrong,
            "server_mean_ms": round(1e3 * (after["blip3v_request_duration_seconds_sum"]
                                           - before["blip3v_request_duration_seconds_sum"])
                                    / max(1, after["blip3v_request_duration_seconds_count"]
                                          - before["blip3v_request_duration_seconds_count"]), 1),
            "clip_hits": int(after["blip3v_clip_cache_hits_total"] - before["blip3v_clip_cache_hits_total"]),
            "clip_misses": int(after["blip3v_clip_cache_misses_total"] - before["blip3v_clip_cache_misses_total"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", required=True, help="An exported engine directory (blip3v export).")
    parser.add_argument("--requests", type=int, default=200, help="Requests per client count (at least 200).")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="Concurrent clients per level.")
    parser.add_argument("--clips", type=int, default=8, help="Synthetic clips to ask about.")
    parser.add_argument("--seed", type=int, default=1234, help="Seed of the synthetic clips.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here as JSON.")
    args = parser.parse_args(argv)
    if args.requests < 200:
        parser.error("--requests must be at least 200")

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import cpu_name, versions

    from blip3v.data.synth import write_dataset
    from blip3v.runtime.generation import SamplingConfig
    from blip3v.runtime.session import Engine

    load_at_start = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="blip3v-bench-serve-") as tmp:
        tmp_path = Path(tmp)
        data = write_dataset(tmp_path / "data", n=args.clips, seed=args.seed, progress=False)
        media = data / "clips"
        clips = sorted(p.name for p in media.glob("*.mp4"))
        pairs = [(clip, q) for clip in clips for q in QUESTIONS]

        t0 = time.perf_counter()
        engine = Engine.open(engine=args.engine)
        sampling = SamplingConfig(max_new_tokens=32)
        greedy = {(clip, q): engine.clip(media / clip).ask(q, sampling).text for clip, q in pairs}
        print(f"greedy answers of {len(pairs)} pairs in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        del engine

        proc, url = start_server(args.engine, media, max_queue=max(args.clients) + 8, log_dir=tmp_path)
        try:
            cold = run_level(url, media, pairs, greedy, 1, len(pairs))
            cold["clients"] = "1 (cold: each clip's first requests)"
            levels = [cold] + [run_level(url, media, pairs, greedy, c, args.requests) for c in args.clients]
            rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                          if line.startswith("VmRSS:"))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    report = {"engine": args.engine, "pairs": len(pairs), "levels": levels, "server_rss_mib": round(rss_kb / 1024, 1),
              "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "load_average_1m_at_start": load_at_start,
                          "load_average_1m_at_end": round(os.getloadavg()[0], 2)},
              "versions": versions(("blip3v", "onnxruntime", "starlette", "uvicorn", "openai", "numpy"))}
    print("| clients | requests | p50 ms | p95 ms | max ms | server mean ms | req/s | non-2xx | 5xx | wrong "
          "| clip hits / misses |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in levels:
        print(f"| {r['clients']} | {r['requests']} | {r['p50_ms']} | {r['p95_ms']} | {r['max_ms']} | {r['server_mean_ms']} | "
              f"{r['throughput_rps']} | {sum(r['non_2xx'].values())} {r['non_2xx'] or ''} | {r['5xx']} | "
              f"{r['wrong_answers']} | {r['clip_hits']} / {r['clip_misses']} |")
    print(json.dumps({k: v for k, v in report.items() if k != "levels"}))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if any(r["5xx"] or r["wrong_answers"] for r in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
