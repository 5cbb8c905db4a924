#!/usr/bin/env bash
# The README's main job, end to end on the embedded default:
#   generated data -> train -> evaluate -> export -> real Triton server -> stream frames -> scores + pictures
# Everything lands under data/, runs/, model_repository/ and out/. Re-running resumes/reuses work.
# Knobs (environment): STEPS (default 500), PORT_BASE (default 8000), CLASSES (default: all).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

STEPS=${STEPS:-500}
PORT_BASE=${PORT_BASE:-8000}
HTTP_PORT=$PORT_BASE; GRPC_PORT=$((PORT_BASE + 1)); METRICS_PORT=$((PORT_BASE + 2))

echo "== 1/6 generate the embedded default dataset (MVTec AD layout) -> data/synth"
[ -f data/synth/dataset.json ] || promptmad data synth --out data/synth

echo "== 2/6 train one model for all classes -> runs/default ($STEPS steps)"
promptmad train --data data/synth --out runs/default --steps "$STEPS"

echo "== 3/6 evaluate -> runs/default/eval"
promptmad evaluate --ckpt runs/default --data data/synth --out runs/default/eval

echo "== 4/6 export ONNX graphs + Triton ensemble -> model_repository/"
promptmad export --ckpt runs/default --out model_repository --data data/synth --runtime python-ort

echo "== 5/6 start the real Triton server on 127.0.0.1:$GRPC_PORT (gRPC) / :$HTTP_PORT (HTTP)"
mkdir -p out
promptmad serve --repo model_repository --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" > out/server.log 2>&1 &
SERVER_PID=$!
trap 'kill -INT $SERVER_PID 2>/dev/null || true; wait $SERVER_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do
  if curl -sf "http://127.0.0.1:$HTTP_PORT/v2/health/ready" >/dev/null; then break; fi
  if ! kill -0 $SERVER_PID 2>/dev/null; then echo "server exited:"; tail -30 out/server.log; exit 1; fi
  sleep 1
done
curl -sf "http://127.0.0.1:$HTTP_PORT/v2/health/ready" >/dev/null || { echo "server not ready"; tail -30 out/server.log; exit 1; }

echo "== 6/6 stream each class's test frames to the server over gRPC -> out/score/<class>/"
for dir in data/synth/*/; do
  cls=$(basename "$dir")
  [ -d "$dir/test" ] || continue
  promptmad score "$dir/test" --class "$cls" --url "127.0.0.1:$GRPC_PORT" --out "out/score/$cls"
done

echo
echo "done. metrics: runs/default/eval/metrics.md   overlays: runs/default/eval/overlays/"
echo "      served scores: out/score/<class>/scores.csv   anomalous frames: out/score/<class>/overlays/"
cat runs/default/eval/metrics.md
