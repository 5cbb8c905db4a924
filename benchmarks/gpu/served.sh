#!/usr/bin/env bash
# The served ensemble on the device's ONNX Runtime provider (step 4 of run_device.sh, which checks
# the prerequisites first): a python-ort repository (the carried one, else exported from the run),
# its engine steps pointed at the provider (gpu_providers.py), a small synthetic dataset of the run's
# classes, then `promptmad bench` (embedded tritonserver + perf_analyzer, PyTorch eager on the same
# device at batch 1) inside the seconds given. Writes OUT/served.md and OUT/served_results.json.
#
#   bash benchmarks/gpu/served.sh PYTHON DEVICE RUN REPO WORKDIR OUT SECONDS
set -uo pipefail
PY=$1 DEVICE=$2 RUN=$3 REPO=$4 W=$5 OUT=$6 SECONDS_LEFT=$7
START=$(date +%s)
left() { echo $(( SECONDS_LEFT - ($(date +%s) - START) )); }
say() { printf '[served +%ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
fail() { printf 'Served ensemble on this device: not measured (%s; see log.txt).\n' "$*" > "$OUT/served.md"; say "$*"; exit 0; }
PM=(-c 'import sys; from promptmad.cli import main; sys.exit(main())')   # `promptmad` of this Python
rm -rf "$W"; mkdir -p "$W"
NOTE=""
export PYTHONPATH=${SERVED_PYTHONPATH:+$SERVED_PYTHONPATH:}${PYTHONPATH:-}   # numpy<2, pytriton, ... (run_device.sh)

if [ "$DEVICE" = cuda ]; then PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider CONC=1:16:3; else PROVIDERS=CPUExecutionProvider CONC=1:2:1; fi
if [ -n "$REPO" ]; then
  cp -r "$REPO" "$W/repo" || fail "cannot copy $REPO"
else
  say "exporting $RUN (python-ort, max batch 16)"
  skip=(); $PY -c "import polygraphy" 2>/dev/null || skip=(--skip-parity)   # parity needs polygraphy
  [ -n "${skip[*]}" ] && NOTE="no parity check at export (polygraphy missing): timings only"
  if ! timeout $(( $(left) / 4 )) "$PY" "${PM[@]}" export --ckpt "$RUN" --out "$W/repo" --runtime python-ort --max-batch 16 "${skip[@]}"; then
    # a parity failure must not cost the timing figures: export again without it, and say so in served.md
    NOTE="the export's PyTorch-vs-ONNX parity check failed (see log.txt); exported again with --skip-parity: timings only"
    say "$NOTE"
    timeout $(( $(left) / 4 )) "$PY" "${PM[@]}" export --ckpt "$RUN" --out "$W/repo" --runtime python-ort --max-batch 16 \
      --skip-parity || fail "export of $RUN failed"
  fi
fi
$PY -m promptmad.benchmarks.gpu_providers "$W/repo" "$PROVIDERS" || fail "could not set providers $PROVIDERS"
CLASSES=$($PY -c "import json,sys; print(' '.join(json.load(open(sys.argv[1]))['classes']))" "$W/repo/manifest.json")
"$PY" "${PM[@]}" data synth --out "$W/data" --classes $CLASSES --n-train 1 --n-test-good 3 --n-test-defect 3 >/dev/null \
  || fail "the synthetic dataset of classes '$CLASSES' could not be written (served classes must be synth classes)"
run_arg=(); [ -n "$RUN" ] && run_arg=(--run "$RUN")
say "promptmad bench on $PROVIDERS, concurrency $CONC ($(left)s left)"
timeout -k 10 $(( $(left) - 10 )) "$PY" "${PM[@]}" bench --repo "$W/repo" "${run_arg[@]}" --data "$W/data" --out "$W/bench" --torch-device "$DEVICE" \
  --concurrency "$CONC" --image-size 224 --frames 12 --baseline-seconds 4 --no-per-model --no-roofline --no-shared-memory
rc=$?
[ -f "$W/bench/results.md" ] || fail "promptmad bench exit $rc, no results.md"
{ echo "Served ensemble, python-ort steps on $PROVIDERS (promptmad bench exit $rc)${NOTE:+; $NOTE}:"; echo; cat "$W/bench/results.md"; } > "$OUT/served.md"
cp "$W/bench/results.json" "$OUT/served_results.json" 2>/dev/null
say "served results in $OUT/served.md"
