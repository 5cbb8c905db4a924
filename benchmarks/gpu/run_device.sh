#!/usr/bin/env bash
# GPU figures in ONE command on a lent GPU machine (no network, no TensorRT; PyTorch + CUDA there):
# PyTorch eager fp32/fp16 and ONNX Runtime fp32/fp16/int8 at batch 1..64, per step and end to end
# (python -m promptmad.benchmarks.gpu_bench), then the served ensemble on the GPU where the embedded
# tritonserver can run it. Everything lands in $OUT: gpu_table.md, gpu_results.json, machine.txt,
# served.md, log.txt (+ served_results.json). The exact `run` tool call is in benchmarks/gpu/README.md.
#
#   bash benchmarks/gpu/run_device.sh [--cpu] [--budget S] [--run DIR] [--repo DIR] [--int8-repo DIR]
#                                     [--batches "1 2 4"] [--no-served]
#
# Inputs, when not given: the carried folder .gpu/ (ignored by git): .gpu/run (a trained run: weights,
# config.json, prompt_images), .gpu/repo (an exported python-ort repository), .gpu/int8 (one exported
# with --precision int8), .gpu/wheels/*.whl (missing packages, installed offline) and wheel parts staged
# by earlier calls in /tmp/promptmad-stage (benchmarks/gpu/stage.sh). Without a run the model is a
# random-init default architecture: the same FLOPs and timings, no parity meaning.
# Time guard: the whole script stays inside --budget seconds (default 540); each stage gets what is
# left and the Python part rewrites its table after every measurement, so a cut run leaves partial
# results. --cpu runs the same plumbing on the CPU (CPU provider, tiny batches) to test it.
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
DEVICE=cuda BUDGET=540 RUN="" REPO="" INT8="" BATCHES="" SERVED=1 ARCH=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) DEVICE=cpu ;;
    --budget) BUDGET=$2; shift ;;
    --run) RUN=$2; shift ;;
    --repo) REPO=$2; shift ;;
    --int8-repo) INT8=$2; shift ;;
    --batches) BATCHES=$2; shift ;;
    --arch) ARCH=$2; shift ;;
    --no-served) SERVED=0 ;;
    *) echo "unknown option $1 (see the header of $0)"; exit 2 ;;
  esac
  shift
done
# --cpu: the plumbing test (tiny random-init model, batches 1 2) unless told otherwise
if [ "$DEVICE" = cpu ]; then ARCH=${ARCH:-tiny} BATCHES=${BATCHES:-"1 2"}; else ARCH=${ARCH:-default} BATCHES=${BATCHES:-"1 2 4 8 16 32 64"}; fi
OUT=${OUT:-bench_results/gpu_device}
WORK=${WORK:-/tmp/promptmad-gpu}
SITE=$WORK/site
mkdir -p "$OUT" "$WORK"
LOG=$OUT/log.txt
exec > >(tee -a "$LOG") 2>&1
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
say() { printf '[run_device +%ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
[ -z "$RUN" ] && [ -f .gpu/run/config.json ] && RUN=.gpu/run
[ -z "$REPO" ] && [ -d .gpu/repo/visual_encoder ] && REPO=.gpu/repo
[ -z "$INT8" ] && [ -d .gpu/int8/visual_encoder ] && INT8=.gpu/int8

# -- 1. Python and what it lacks (offline: carried wheels and staged parts only) ----------------------
PY=${PYTHON:-python3}
[ "$DEVICE" = cpu ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
if [ -d /tmp/promptmad-stage ]; then   # parts of big wheels carried by earlier calls (stage.sh)
  for first in /tmp/promptmad-stage/*.whl.part-aa; do
    [ -e "$first" ] || continue
    whl=$WORK/wheels/$(basename "${first%.part-aa}"); mkdir -p "$WORK/wheels"
    cat "${first%aa}"* > "$whl" && say "assembled $(basename "$whl") ($(du -m "$whl" | cut -f1) MiB)"
  done
fi
# the served ensemble's own packages (numpy<2 for the Python-backend stub, pytriton, ...) go to a second
# folder that only served.sh puts on its path: the in-process grid keeps the image's numpy 2
SERVED_ONLY='^(numpy|nvidia_pytriton|tritonclient|nvidia_cuda_runtime_cu12|polygraphy)-'
install() {   # $1 = target folder, rest = wheels
  local target=$1; shift
  [ $# -gt 0 ] || return 0
  say "installing offline into $target: $(for w in "$@"; do basename "$w"; done | tr '\n' ' ')"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$@" \
    || say "pip install into $target failed: going on with what the image has"
}
mapfile -t ALL < <(ls .gpu/wheels/*.whl "$WORK"/wheels/*.whl 2>/dev/null)
has() {   # whether the image already has what wheel $1 brings (then it is not installed)
  case "$(basename "$1")" in
    onnxruntime_gpu-*) $PY -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null ;;
    onnxconverter_common-*) $PY -c "import onnxconverter_common" 2>/dev/null ;;
    *) return 1 ;;
  esac
}
mapfile -t CORE < <(for w in "${ALL[@]}"; do basename "$w" | grep -Eqv "$SERVED_ONLY" && ! has "$w" && echo "$w"; done)
mapfile -t SERVED_WHEELS < <(for w in "${ALL[@]}"; do basename "$w" | grep -Eq "$SERVED_ONLY" && echo "$w"; done)
install "$SITE" "${CORE[@]}"
install "$WORK/site-served" "${SERVED_WHEELS[@]}"
[ -d "$SITE" ] && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
export SERVED_PYTHONPATH=$WORK/site-served
# Debian packages carried as .deb (perf_analyzer's libb64), unpacked beside, never into /
for deb in .gpu/debs/*.deb; do
  [ -e "$deb" ] || continue
  dpkg -x "$deb" "$WORK/debs" && export LD_LIBRARY_PATH=$WORK/debs/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
done
# promptmad itself: installed (CPU checkout) or, on a bare image, this checkout as a package of links
if ! $PY -c "import promptmad.benchmarks.gpu_bench" 2>/dev/null; then
  src=$WORK/src/promptmad; rm -rf "$WORK/src"; mkdir -p "$src"
  for f in promptmad/*; do ln -s "$PWD/$f" "$src/"; done
  for pkg in training export client benchmarks model_repository; do ln -s "$PWD/$pkg" "$src/$pkg"; done
  export PYTHONPATH=$WORK/src${PYTHONPATH:+:$PYTHONPATH}
  $PY -c "import promptmad.benchmarks.gpu_bench" || { say "promptmad does not import (see above)"; exit 3; }
fi

# -- 2. machine ---------------------------------------------------------------------------------------
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')  device: $DEVICE  budget: ${BUDGET}s"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 || echo "nvidia-smi: none"
  echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) x $(nproc)"
  $PY - <<'EOF' 2>&1
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for m in ("torch", "onnxruntime", "onnx", "onnxconverter_common", "numpy", "pytriton", "tritonclient"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"), getattr(mod, "__file__", ""))
    except Exception as exc:
        print(m, "missing:", type(exc).__name__, exc)
try:
    import torch
    print("cuda", torch.version.cuda, "available", torch.cuda.is_available(), "cudnn", torch.backends.cudnn.version())
    import onnxruntime as ort
    print("onnxruntime providers", ort.get_available_providers())
except Exception as exc:
    print("versions:", exc)
EOF
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"

# -- 3. in-process grid (keeps SERVED_S for step 4 when that can run) --------------------------------
served_ready() {   # why the served ensemble cannot run on this device ("" = it can)
  [ "$SERVED" = 1 ] || { echo "not asked (--no-served)"; return; }
  [ -n "$RUN$REPO" ] || { echo "needs a carried run (.gpu/run) or repository (.gpu/repo)"; return; }
  PYTHONPATH=$SERVED_PYTHONPATH${PYTHONPATH:+:$PYTHONPATH} $PY - "$DEVICE" <<'EOF' 2>&1 | tail -1
import sys
missing = []
for m in ("pytriton", "tritonclient.grpc"):
    try:
        __import__(m)
    except Exception as exc:
        missing.append(f"{m} ({type(exc).__name__})")
import numpy
if numpy.__version__ >= "2":
    missing.append(f"numpy<2 for the Python-backend stub (have {numpy.__version__})")
import onnxruntime as ort
if sys.argv[1] == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
    missing.append(f"onnxruntime with CUDAExecutionProvider (have {ort.__version__}: {ort.get_available_providers()})")
print("missing: " + ", ".join(missing) if missing else "READY")
EOF
}
WHY_NOT=$(served_ready)
[ "$WHY_NOT" = READY ] && WHY_NOT=""
[ -z "$WHY_NOT" ] || case "$WHY_NOT" in "not asked"*|needs*|missing:*) ;; *) WHY_NOT="the check failed: $WHY_NOT" ;; esac
SERVED_S=0; [ -z "$WHY_NOT" ] && SERVED_S=$(( BUDGET / 3 ))
GRID_S=$(( $(left) - SERVED_S - 10 ))
say "in-process grid: ${GRID_S}s (served ensemble: ${WHY_NOT:-${SERVED_S}s})"
args=(--out "$OUT" --device "$DEVICE" --budget "$GRID_S" --arch "$ARCH" --workdir "$WORK/graphs")
[ -n "$RUN" ] && args+=(--run "$RUN")
[ -n "$REPO" ] && args+=(--repo "$REPO")
[ -n "$INT8" ] && args+=(--int8-repo "$INT8")
# shellcheck disable=SC2206
args+=(--batches $BATCHES)
[ "$DEVICE" = cpu ] && args+=(--warmup 1 --min-iters 3 --min-seconds 0.2 --max-seconds 0.5)
PYTHONUNBUFFERED=1 timeout -k 5 $(( GRID_S + 5 )) $PY -m promptmad.benchmarks.gpu_bench "${args[@]}"
say "in-process grid exit $? ($(left)s left)"

# -- 4. the served ensemble (python-ort steps on the device's provider) --------------------------------
if [ -n "$WHY_NOT" ]; then
  printf 'Served ensemble on this device: not run (%s).\n' "$WHY_NOT" > "$OUT/served.md"
else
  bash benchmarks/gpu/served.sh "$PY" "$DEVICE" "$RUN" "$REPO" "$WORK/served" "$OUT" $(( $(left) - 5 ))
fi
cat "$OUT/served.md"
say "done: $OUT ($(ls "$OUT" | tr '\n' ' '))"
