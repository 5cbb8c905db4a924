#!/usr/bin/env bash
# Benchmark the `tensorrt` runtime repository on an NVIDIA GPU with the NGC containers of Triton 24.10
# (= Triton 2.51, the version promptmad targets). Needs Docker + the NVIDIA container toolkit and a
# driver that runs CUDA 12.6 containers (>= 560, or 535/550 on data-centre GPUs with forward compat).
# Run from the repository root, on an otherwise idle machine:
#
#   bash benchmarks/gpu/run_tensorrt.sh runs/default data/synth
#
# Steps (each prints what it does; see benchmarks/gpu/README.md for what to record):
#   1. a tools container (nvcr.io/nvidia/tensorrt:24.10-py3: TensorRT 10.5, the TensorRT of
#      tritonserver:24.10) installs promptmad and builds the engines ON THIS GPU
#      (`promptmad export --runtime tensorrt`, FP16 strongly typed, profile batch 1..MAX_BATCH);
#   2. tritonserver:24.10-py3 serves the repository (host network, host IPC for shared memory);
#   3. perf_analyzer from tritonserver:24.10-py3-sdk sweeps the grid on real frames (its --input-data
#      files written by `promptmad bench --write-input-data`): frame sizes x request batch sizes x
#      concurrency, gRPC, count_windows, GPU metrics; then batch-1 sweeps with system and CUDA shared memory;
#   4. `promptmad bench` (tools container) for PyTorch eager on the GPU vs the served ensemble,
#      and each composing model alone;
#   4b. with INT8=1: INT8 engines (`promptmad export --runtime tensorrt --precision int8`), served and
#      swept at the model's size ($OUT/int8/perf_*.csv, grid_int8.md);
#   5. machine, versions, server memory and a grid summary (grid.md) into $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."

RUN=${1:-runs/default}
DATA=${2:-data/synth}
OUT=${OUT:-bench_results/gpu}
REPO=${REPO:-model_repository_trt}
MAX_BATCH=${MAX_BATCH:-16}
SIZES=${SIZES:-"224 640"}                 # square frame sizes sent (the model's own size + a camera-like one)
BATCHES=${BATCHES:-"1 4 8 16"}            # images per request (perf_analyzer -b), each <= MAX_BATCH
REQUESTS=${REQUESTS:-200}                 # --measurement-request-count (count_windows)
STABILITY=${STABILITY:-10}                # -s: % spread of the last 3 windows (GPUs are steadier than a shared CPU)
GPU=${GPU:-0}                             # which GPU (docker --gpus device=...)
INT8=${INT8:-0}                           # 1: also INT8 engines from the QDQ graphs (--precision int8), swept at the model's size
TAG=24.10
SERVER_IMAGE=nvcr.io/nvidia/tritonserver:${TAG}-py3
SDK_IMAGE=nvcr.io/nvidia/tritonserver:${TAG}-py3-sdk
TOOLS_IMAGE=${TOOLS_IMAGE:-nvcr.io/nvidia/tensorrt:${TAG}-py3}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cu126}   # a torch built for the containers' CUDA 12.6
GPUS="--gpus device=${GPU}"

say() { printf '\n[run_tensorrt] %s\n' "$*"; }
[ -d "$RUN" ] || { echo "run directory $RUN not found (train one: promptmad train --out $RUN)"; exit 2; }
[ -d "$DATA" ] || { echo "dataset $DATA not found (promptmad data synth --out $DATA, or your MVTec-layout folder)"; exit 2; }
command -v docker >/dev/null || { echo "docker not found"; exit 2; }
mkdir -p "$OUT"

cleanup() { docker rm -f promptmad-trt promptmad-tools >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup

# -- 1. tools container: promptmad + TensorRT 10.5, build the engines on this GPU ----------------
say "tools container ($TOOLS_IMAGE): installing promptmad"
docker run -d --name promptmad-tools $GPUS --net=host --ipc=host -v "$PWD":/work -w /work "$TOOLS_IMAGE" sleep infinity >/dev/null
tools() { docker exec -e PYTHONUNBUFFERED=1 promptmad-tools bash -c "$*"; }
tools "apt-get update -qq && apt-get install -y -qq libb64-0d >/dev/null"   # perf_analyzer of the tritonclient wheel
tools "pip install -q torch torchvision --index-url $TORCH_INDEX && pip install -q -e '.[bench]'"
TRT_BUILD=$(tools "python3 -c 'import tensorrt; print(tensorrt.__version__)'" | tail -1)
TRT_SERVE=$(docker run --rm "$SERVER_IMAGE" bash -c 'ls /usr/lib/x86_64-linux-gnu/libnvinfer.so.* | sed -n "s/.*libnvinfer.so.//p" | sort -V | tail -1')
say "TensorRT: build $TRT_BUILD, server $TRT_SERVE"
case "$TRT_BUILD" in "$TRT_SERVE"*) ;; *)
  echo "TensorRT versions differ: an engine only loads in the TensorRT that built it. Set TOOLS_IMAGE to a container with TensorRT $TRT_SERVE."
  exit 3 ;;
esac
say "building engines into $REPO (promptmad export --runtime tensorrt --max-batch $MAX_BATCH)"
tools "promptmad export --ckpt $RUN --out $REPO --runtime tensorrt --data $DATA --max-batch $MAX_BATCH" | tee "$OUT/export.log"

# -- 2. serve ------------------------------------------------------------------------------------
serve() {   # serve repository $1 (stopping the one served before)
  docker rm -f promptmad-trt >/dev/null 2>&1 || true
  say "serving $1 with $SERVER_IMAGE"
  # the Python-backend steps (preprocess, prompt_bank, postprocess) need numpy<2 and Pillow in the server's Python
  docker run -d --name promptmad-trt $GPUS --net=host --ipc=host --shm-size=2g -v "$PWD/$1":/models "$SERVER_IMAGE" \
    bash -c "pip install -q 'numpy<2' pillow && exec tritonserver --model-repository=/models --strict-readiness=true" >/dev/null
  for i in $(seq 1 180); do
    curl -sf localhost:8000/v2/health/ready >/dev/null && break
    if [ "$i" = 180 ] || [ -z "$(docker ps -q -f name=promptmad-trt)" ]; then
      docker logs promptmad-trt 2>&1 | tail -40; echo "server not ready"; exit 4
    fi
    sleep 2
  done
  say "server ready"
}
serve "$REPO"

# -- 3. perf_analyzer grid (SDK container) ---------------------------------------------------------
pa() { docker run --rm $GPUS --net=host --ipc=host -v "$PWD":/work -w /work "$SDK_IMAGE" perf_analyzer "$@"; }
input_data() {   # real test frames at $1 x $1 for every served model: `promptmad bench --write-input-data`
  say "input data: 64 real test frames at ${1}x${1} (promptmad bench --write-input-data)"
  tools "promptmad bench --url localhost:8001 --repo $REPO --data $DATA --image-size $1 --frames 64 \
    --write-input-data $OUT/input_$1.json" > "$OUT/input_$1.log"
}
grid() {   # $1 = folder under $OUT ("" or "int8/"), $2 = frame sizes: batch x concurrency sweeps of the ensemble
  mkdir -p "$OUT/$1"
  for S in $2; do
    [ -f "$OUT/input_$S.json" ] || input_data "$S"
    for B in $BATCHES; do
      ranges="1:8:1"; [ "$B" = 1 ] && ranges="1:8:1 16:64:16"
      for R in $ranges; do
        tag="$1perf_s${S}_b${B}_c${R//:/-}"
        say "grid ${1:-fp16/}: frames ${S}x${S}, batch $B, concurrency $R"
        pa -m promptmad -u localhost:8001 -i grpc -b "$B" --input-data "$OUT/input_$S.json" --concurrency-range "$R" \
           --measurement-mode count_windows --measurement-request-count "$REQUESTS" -s "$STABILITY" --percentile 95 \
           --collect-metrics --metrics-url localhost:8002/metrics --verbose-csv -f "$OUT/$tag.csv" \
           > "$OUT/$tag.log" 2>&1 || echo "  (failed: see $OUT/$tag.log)"
      done
    done
  done
}
grid "" "$SIZES"
for S in $SIZES; do
  for SHM in system cuda; do
    tag="s${S}_b1_c1-8-1_shm-$SHM"
    say "shared memory $SHM: frames ${S}x${S}, batch 1, concurrency 1:8:1"
    pa -m promptmad -u localhost:8001 -i grpc -b 1 --input-data "$OUT/input_$S.json" --concurrency-range 1:8:1 \
       --measurement-mode count_windows --measurement-request-count "$REQUESTS" -s "$STABILITY" --percentile 95 \
       --shared-memory "$SHM" --output-shared-memory-size $((S * S * 4 + 65536)) --verbose-csv -f "$OUT/perf_$tag.csv" \
       > "$OUT/perf_$tag.log" 2>&1 || echo "  (failed: see $OUT/perf_$tag.log)"
  done
done

# -- 4. PyTorch eager on the GPU vs the served ensemble, composing models alone ---------------------
say "promptmad bench: PyTorch eager (cuda) vs the served ensemble, composing models alone"
tools "promptmad bench --url localhost:8001 --run $RUN --data $DATA --out $OUT/bench --torch-device cuda \
  --repo $REPO --concurrency 1:16:3 --image-size ${SIZES%% *}" || echo "  (promptmad bench failed; the grid above is still valid)"

# -- 4b. INT8 engines (INT8=1): the QDQ graphs of `promptmad export --precision int8` as explicitly quantized
#        TensorRT engines, served and swept at the model's size like the fp16 ones (into $OUT/int8/, grid_int8.md) ----
if [ "$INT8" = 1 ]; then
  say "building INT8 engines into ${REPO}_int8 (promptmad export --runtime tensorrt --precision int8)"
  if tools "promptmad export --ckpt $RUN --out ${REPO}_int8 --runtime tensorrt --precision int8 --data $DATA --max-batch $MAX_BATCH" \
       | tee "$OUT/export_int8.log"; then
    serve "${REPO}_int8"
    grid int8/ "${SIZES%% *}"
    cp "${REPO}_int8/manifest.json" "$OUT/manifest_int8.json"
    serve "$REPO"   # step 5 records the fp16 server
  else
    echo "  (INT8 export failed: see $OUT/export_int8.log; the fp16 figures above are still valid)"
  fi
fi

# -- 5. what to record -------------------------------------------------------------------------------
say "recording machine, versions and memory"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  echo; nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv
  echo; echo "server VmHWM (kB) per process in the container:"
  docker exec promptmad-trt sh -c 'grep -H VmHWM /proc/[0-9]*/status' || true
  echo; echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) x $(nproc)"
  echo "images: $(docker image inspect --format '{{index .RepoDigests 0}}' "$SERVER_IMAGE" "$SDK_IMAGE" "$TOOLS_IMAGE" | tr '\n' ' ')"
  echo "TensorRT: $TRT_BUILD"
} > "$OUT/machine.txt" 2>&1
cp "$REPO/manifest.json" "$OUT/manifest.json"
curl -s localhost:8002/metrics > "$OUT/metrics.txt" || true
docker logs promptmad-trt > "$OUT/tritonserver.log" 2>&1 || true
tools "python3 -m promptmad.benchmarks.grid $OUT" | tee "$OUT/grid.md"
[ "$INT8" = 1 ] && [ -d "$OUT/int8" ] && tools "python3 -m promptmad.benchmarks.grid $OUT/int8" | tee "$OUT/grid_int8.md"
say "done: $OUT/grid.md, machine.txt, bench/results.md; fill the GPU table of benchmarks/README.md from them"
