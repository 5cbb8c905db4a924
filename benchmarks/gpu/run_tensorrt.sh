#!/usr/bin/env bash
# Benchmark the `tensorrt` runtime repository on a GPU machine with Docker and the NVIDIA container
# toolkit. Triton 24.10 = 2.51, the version promptmad targets. Run from the repository root:
#   bash benchmarks/gpu/run_tensorrt.sh runs/default data/synth
set -euo pipefail
RUN=${1:-runs/default}
DATA=${2:-data/synth}
OUT=${OUT:-bench_results/gpu}
IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
SDK=nvcr.io/nvidia/tritonserver:24.10-py3-sdk
mkdir -p "$OUT"

# 1. Build the engines on this GPU, inside the container (TensorRT 10.5 ships there).
docker run --gpus all --rm -v "$PWD":/work -w /work "$IMAGE" bash -c "
  pip install -q -e . && promptmad export --ckpt $RUN --out model_repository_trt --runtime tensorrt --data $DATA --max-batch 16"

# 2. Serve it.
docker run --gpus all -d --rm --name promptmad-trt -p8000:8000 -p8001:8001 -p8002:8002 \
  -v "$PWD/model_repository_trt":/models "$IMAGE" tritonserver --model-repository=/models
trap 'docker stop promptmad-trt >/dev/null 2>&1 || true' EXIT
until curl -sf localhost:8000/v2/health/ready >/dev/null; do sleep 2; done

# 3. Input data from real frames (same JSON as the CPU benchmark), then the grid:
#    batch 1 requests at concurrency 1..64, plus batch 4/8/16 requests at concurrency 1..16.
docker run --rm -v "$PWD":/work -w /work "$IMAGE" bash -c "pip install -q -e . && python -c \"
from promptmad.benchmarks.compare import load_frames
from promptmad.benchmarks.perf_analyzer import build_input_data
from promptmad.training.checkpoint import read_run_info
info = read_run_info('$RUN')
frames, names = load_frames('$DATA', n=64)
build_input_data(frames, [info.classes.index(n) for n in names], __import__('pathlib').Path('$OUT/input.json'))\""
for b in 1 4 8 16; do
  range="1:64:2"; [ "$b" -gt 1 ] && range="1:16:1"
  docker run --rm --net=host -v "$PWD":/work -w /work "$SDK" perf_analyzer -m promptmad -u localhost:8001 -i grpc \
    -b "$b" --input-data "$OUT/input.json" --concurrency-range "$range" --measurement-mode count_windows \
    --measurement-request-count 200 -f "$OUT/perf_b$b.csv" --collect-metrics --verbose-csv || true
done
curl -s localhost:8002/metrics > "$OUT/metrics.txt"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv > "$OUT/gpu.csv"
echo "Record in benchmarks/README.md: GPU (gpu.csv), TensorRT version (model_repository_trt/manifest.json),"
echo "best FPS and its p99 per batch size (perf_b*.csv), GPU memory used, and the FP16 parity errors from the manifest."
