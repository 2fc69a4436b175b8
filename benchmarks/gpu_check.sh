#!/usr/bin/env bash
# The GPU figures of issue 23 in one prepared run, on a machine with a CUDA GPU, PyTorch and Triton,
# from the repository root (this project need not be installed: python3 -m runs it from the tree).
#
#   benchmarks/gpu_check.sh OUT_DIR [STEP...]
#
# Steps (default: all, in this order, the least needed last; name some to rerun only those):
#   env      GPU, driver, versions (PyAV carried as a wheel in .whl/ is installed to /tmp/site first)
#   tests    tests/test_kernels.py, test_fast_decode.py, test_gpu_paths.py on the GPU
#   visual   the released visual path (8 frames, fp16): eager vs CUDA graph, the gTTM's reference vs
#            fast path, the FLOP floor (python3 -m blip3v.model.visual_graph)
#   warmup   two processes' warm-up on the demo model with one fresh cache folder (cold, then the
#            kernels loaded from disk); with PyAV, `blip3v ask --device cuda` (its warm-up line)
#   decode   bench decode, full-depth Phi-3-mini (random weights) fp16 + INT4: blip3v's static-KV +
#            CUDA-graph decoder against transformers' static cache + torch.compile (and ONNX
#            Runtime's CUDA provider where onnxruntime-gpu is installed), eager as a reference, floors
#   budget   bench budget, released sizes, 32 decoder layers: stages incl. the video decode on the
#            host, the visual call eager / as one CUDA graph, first run apart (needs PyAV)
#   kernels  each kernel's check() + micro-benchmark (python3 -m blip3v.kernels.NAME)
#
# Writes OUT_DIR/summary.json (every step's rc, seconds and JSON result), summary.md (the tables as
# RESULTS.md sections: paste into benchmarks/RESULTS.md), logs.txt (every step's log). At most 4 files:
# the device tool brings back 8. A step that no longer fits before DEADLINE_S (default 540 s, under
# the tool's 600 s per call) is skipped and marked so; rerun it by name in a second call.
#
# On the lent machine (no registry, no PyAV, no onnxruntime-gpu; see .library/device/H200.md), with
# PyAV carried (35 MiB; the tree is ~4 MiB of the 64 MiB a call carries):
#   here:   echo /.whl/ >> .git/info/exclude
#           python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#               --platform manylinux_2_28_x86_64 -d .whl av==18.1.0
#   device: run(command="DEADLINE_S=560 bash benchmarks/gpu_check.sh $OUT", carry=[".whl"], timeout_s=590)
#           then, only for steps summary.md marks failed or out of time, the same with those step names
#           (plus env) on the still-warm machine.
# Expected about 8 minutes in all (an estimate from the H100 run of 2026-11-24, not measured for this
# script: tests ~1.5, visual ~0.5, warm-up ~1, decode ~3 (transformers' first compile of 32 layers is
# most of it), budget ~1, kernels ~1). onnxruntime-gpu (a 244 MiB wheel) cannot travel in one call:
# its rows stay out, with a note.
set -u
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [STEP...]}
shift
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(env tests visual warmup decode budget kernels)
mkdir -p "$out"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
deadline=$(( $(date +%s) + ${DEADLINE_S:-540} ))
work=$(mktemp -d)
logs="$out/logs.txt"
: > "$logs"

# run_step NAME EXPECTED_S LIMIT_S COMMAND...: the command's stdout to $work/NAME.out (JSON where it
# prints JSON), stderr and stdout tails to logs.txt, and a record of rc and seconds in
# $work/steps.jsonl. Skipped when less than EXPECTED_S is left before the deadline; killed after
# LIMIT_S or at the deadline, whichever comes first.
run_step() {
    local name=$1 expected=$2 limit=$3
    shift 3
    local left=$(( deadline - $(date +%s) - 15 ))
    if [ "$left" -lt "$expected" ]; then
        echo "== $name: skipped, ${left}s left before DEADLINE_S and it takes about ${expected}s" | tee -a "$logs"
        printf '{"step": "%s", "rc": null, "skipped": "out of time"}\n' "$name" >> "$work/steps.jsonl"
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    local t0=$(date +%s)
    echo "== $name (up to ${limit}s): $*" >> "$logs"
    timeout -k 10 "$limit" "$@" > "$work/$name.out" 2> "$work/$name.err"
    local rc=$?
    local secs=$(( $(date +%s) - t0 ))
    tail -c 20000 "$work/$name.err" >> "$logs"
    tail -c 4000 "$work/$name.out" >> "$logs"
    echo "== $name: rc $rc in ${secs}s" | tee -a "$logs"
    printf '{"step": "%s", "rc": %d, "seconds": %d}\n' "$name" "$rc" "$secs" >> "$work/steps.jsonl"
}

have_av() { python3 -c "import av" 2>/dev/null; }

# what the machine has, as JSON: the GPU as nvidia-smi and torch see it, the versions that matter here
env_py='
import importlib.metadata as md, json, subprocess, torch
v = {}
for p in ("torch", "triton", "transformers", "onnxruntime", "onnxruntime-gpu", "av", "numpy"):
    try:
        v[p] = md.version(p)
    except md.PackageNotFoundError:
        v[p] = None
try:
    import onnxruntime as ort
    v["ort_providers"] = ort.get_available_providers()
except ImportError:
    v["ort_providers"] = []
query = "name,driver_version,memory.total,clocks.max.sm,clocks.max.mem"
try:
    v["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                                     capture_output=True, text=True).stdout.strip()
except OSError:
    v["nvidia_smi"] = None
v["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
v["cuda"] = torch.version.cuda
print(json.dumps(v))
'

if ls .whl/*.whl > /dev/null 2>&1 && ! have_av; then  # carried wheels (PyAV): see the header
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl >> "$logs" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

for step in "${steps[@]}"; do
    case $step in
    env)
        run_step env 10 60 python3 -c "$env_py"
        ;;
    tests)
        run_step tests 90 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_fast_decode.py \
            tests/test_gpu_paths.py
        ;;
    kernels)
        run_step kernels 60 120 bash -c 'for k in int4_matmul decode_attention rmsnorm token_learner; do
            echo "== $k"; python3 -m "blip3v.kernels.$k" || exit 1; done'
        ;;
    visual)
        run_step visual 40 120 python3 -m blip3v.model.visual_graph --frames 8 --repeats 20
        ;;
    warmup)
        cache=$(mktemp -d)  # one fresh folder for both processes: the first compiles, the second loads
        run_step warmup_cold 40 90 env XDG_CACHE_HOME="$cache" python3 -m blip3v.runtime.warmup --device cuda
        run_step warmup_warm 20 90 env XDG_CACHE_HOME="$cache" python3 -m blip3v.runtime.warmup --device cuda
        if have_av; then
            run_step ask 20 90 env XDG_CACHE_HOME="$cache" python3 -m blip3v.cli ask blip3v/assets/sample.mp4 \
                "what colour does the triangle turn?" --device cuda --json
        else
            echo "== ask: skipped, no PyAV here (carry it: see the header)" | tee -a "$logs"
            printf '{"step": "ask", "rc": null, "skipped": "no PyAV"}\n' >> "$work/steps.jsonl"
        fi
        rm -rf "$cache"
        ;;
    decode)
        run_step decode 200 330 python3 -m blip3v.cli bench decode --device cuda --backend torch,onnxruntime --layers 32 \
            --precision fp16,int4 --prompt-tokens 128 --new-tokens 128 --repeats 3 --profile --quiet \
            --results "$work/RESULTS-gpu.md" --json
        ;;
    budget)
        if have_av; then
            run_step budget 80 200 python3 -m blip3v.cli bench budget --model real --layers 32 --device cuda \
                --budgets 32,128 --repeats 3 --quiet --results "$work/RESULTS-gpu.md" --json
        else
            echo "== budget: skipped, no PyAV here (it decodes the sample clip; carry it: see the header)" | tee -a "$logs"
            printf '{"step": "budget", "rc": null, "skipped": "no PyAV"}\n' >> "$work/steps.jsonl"
        fi
        ;;
    *)
        echo "unknown step $step (env tests visual warmup decode budget kernels)" | tee -a "$logs"
        ;;
    esac
done

# summary.json: each step's record plus its stdout parsed as JSON where it is JSON (else its tail)
python3 - "$work" "$out" <<'EOF'
import json, pathlib, sys
work, out = map(pathlib.Path, sys.argv[1:])
steps = []
for line in (work / "steps.jsonl").read_text().splitlines() if (work / "steps.jsonl").exists() else []:
    record = json.loads(line)
    path = work / f"{record['step']}.out"
    if path.exists():
        text = path.read_text(errors="replace")
        try:
            record["result"] = json.loads(text)
        except json.JSONDecodeError:
            record["tail"] = text[-3000:]
    err = work / f"{record['step']}.err"
    if err.exists() and (record.get("rc") or record["step"] == "ask"):  # ask: its warm-up line is on stderr
        record["stderr_tail"] = err.read_text(errors="replace")[-3000:]
    steps.append(record)
(out / "summary.json").write_text(json.dumps({"steps": steps}, indent=2))
md = ["# gpu_check.sh summary", "", "| step | rc | seconds |", "|---|---|---|"]
md += [f"| {s['step']} | {s.get('rc') if s.get('rc') is not None else s.get('skipped')} | {s.get('seconds', '-')} |"
       for s in steps]
by = {s["step"]: s.get("result") for s in steps}
if isinstance(by.get("visual"), dict):
    v = by["visual"]
    md += ["", f"## Visual path, {v['frames']} frames, fp16, {v['gpu']}", "", "| variant | ms |", "|---|---|"]
    md += [f"| {k} | {x:.2f} |" for k, x in v["ms"].items()]
    md += ["", f"FLOP floor {v['floor_ms']:.2f} ms ({v['flops'] / 1e12:.2f} TFLOP at "
           f"{v['ceilings']['matmul_fp16_tflop_per_s']:.0f} TFLOP/s measured); max abs diff: "
           + ", ".join(f"{k} {x:.2e}" for k, x in v["max_abs_diff"].items())]
for name in ("warmup_cold", "warmup_warm"):
    if isinstance(by.get(name), dict):
        md += ["", f"- {name}: {by[name]['line']} (cached files before/after: {by[name]['cached_files_before']} / "
               f"{by[name]['cached_files_after']})"]
results = work / "RESULTS-gpu.md"
if results.exists():
    md += ["", results.read_text()]
(out / "summary.md").write_text("\n".join(md) + "\n")
EOF
rm -rf "$work"
echo "wrote $out/summary.json, $out/summary.md, $out/logs.txt"
