#!/usr/bin/env bash
# Prepares, on a machine with PyPI, what run_device.sh needs on a GPU machine that reaches nothing:
# the carried folder .gpu/ (ignored through .git/info/exclude) and, for what exceeds one call's 64 MiB,
# wheel parts for staging calls. Prints the `run` tool calls. See benchmarks/gpu/README.md.
#
#   bash benchmarks/gpu/stage.sh [--run DIR] [--int8-repo DIR] [--ort-gpu] [--served]
#
#   --run DIR        a trained run: config.json, model.safetensors, prompt_images -> .gpu/run (~32 MiB for
#                    the default architecture; trainer_state.pt is left behind)
#   --int8-repo DIR  the engine steps' QDQ graphs of a `promptmad export --precision int8` repository -> .gpu/int8
#   --ort-gpu        onnxruntime-gpu (CUDA 13 build, ~244 MiB) as parts of <= PART_MIB for staging calls
#   --served         also nvidia-pytriton, tritonclient 2.51 (perf_analyzer), numpy<2 (the Python-backend stub),
#                    nvidia-cuda-runtime-cu12, polygraphy, and the libb64 .deb, for the served ensemble
# Always: onnxconverter-common (fp16 graphs) -> .gpu/wheels.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN="" INT8="" ORT=0 SERVED=0
while [ $# -gt 0 ]; do
  case "$1" in
    --run) RUN=$2; shift ;;
    --int8-repo) INT8=$2; shift ;;
    --ort-gpu) ORT=1 ;;
    --served) SERVED=1 ;;
    *) echo "unknown option $1 (see the header of $0)"; exit 2 ;;
  esac
  shift
done
PART_MIB=${PART_MIB:-61}                 # a staging call carries <= this (+ the ~2 MiB working tree; 64 MiB in all)
ORT_GPU=${ORT_GPU:-onnxruntime-gpu==1.31.1}   # CUDA 13 + cuDNN 9 (cu13): the libraries the device image has
PIP=${PIP:-.venv/bin/python -m pip}
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux1_x86_64 --platform manylinux_2_35_x86_64)
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/stage
dl() { $PIP download -q --no-deps "${PLATFORM[@]}" -d "$1" "${@:2}"; }

dl .gpu/wheels onnxconverter-common==1.16.0
if [ -n "$RUN" ]; then
  mkdir -p .gpu/run && cp -r "$RUN/config.json" "$RUN/model.safetensors" "$RUN/prompt_images" .gpu/run/
fi
if [ -n "$INT8" ]; then
  mkdir -p .gpu/int8 && cp "$INT8/manifest.json" .gpu/int8/   # its checkpoint digest: is it the carried run's?
  for s in visual_encoder reconstructor segmentor; do
    [ -f "$INT8/$s/1/model.onnx" ] && mkdir -p ".gpu/int8/$s/1" && cp "$INT8/$s/1/model.onnx" ".gpu/int8/$s/1/"
  done
fi
big=$(mktemp -d)
[ "$ORT" = 1 ] && dl "$big" "$ORT_GPU"
if [ "$SERVED" = 1 ]; then
  dl "$big" nvidia-pytriton==0.7.0 tritonclient==2.51.0 numpy==1.26.4 nvidia-cuda-runtime-cu12==12.9.79 polygraphy==0.53.6
  mkdir -p .gpu/debs && (cd .gpu/debs && apt-get download libb64-0d >/dev/null 2>&1) || echo "libb64-0d .deb not fetched (apt-get download)"
fi
# parts of <= PART_MIB, packed into as few staging calls as fit, one folder per call
n=0 used=$((PART_MIB + 1))
for whl in "$big"/*.whl; do
  [ -e "$whl" ] || continue
  (cd "$big" && split -b "${PART_MIB}M" "$(basename "$whl")" "$(basename "$whl").part-")
  rm "$whl"
done
for part in "$big"/*.part-*; do
  [ -e "$part" ] || continue
  mib=$(( ($(stat -c %s "$part") + 1048575) / 1048576 ))
  if [ $((used + mib)) -gt "$PART_MIB" ]; then n=$((n + 1)) used=0; mkdir -p ".gpu/stage/$n"; fi
  mv "$part" ".gpu/stage/$n/" && used=$((used + mib))
done
rm -rf "$big"

echo "carried folder .gpu: $(du -sh .gpu | cut -f1); main call carries $(du -shc .gpu/run .gpu/int8 .gpu/wheels .gpu/debs 2>/dev/null | tail -1 | cut -f1)"
for i in $(seq 1 "$n"); do
  echo "staging call $i/$n ($(du -sh ".gpu/stage/$i" | cut -f1)): run(command=\"mkdir -p /tmp/promptmad-stage && cp .gpu/stage/$i/* /tmp/promptmad-stage/ && ls /tmp/promptmad-stage\", carry=[\".gpu/stage/$i\"], timeout_s=60)"
done
echo "main call: see benchmarks/gpu/README.md (carry .gpu/run .gpu/wheels .gpu/int8 .gpu/debs)"
