#!/usr/bin/env bash
# Installs everything promptmad needs into .venv/ at the repository root. Idempotent: a second run
# with an unchanged pyproject.toml returns in a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi

stamp=".venv/.promptmad-installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing promptmad and its dependencies (torch + torchvision are resolved together; ~2-5 min the first time)"
  .venv/bin/python -m pip install -q --upgrade pip "setuptools<81" wheel
  .venv/bin/python -m pip install -q -e ".[test,bench]"
  rm -f .venv/.promptmad-installed-*
  touch "$stamp"
fi

# checkov (tests/test_deploy.py scans deploy/) pins many dependencies (protobuf, ...) that would clash
# with ours: it lives in its own venv, .venv-tools/checkov, and the tests run it as a subprocess.
CHECKOV_VERSION=3.3.30
tools_stamp=".venv-tools/checkov/.installed-checkov-$CHECKOV_VERSION"
if [ ! -f "$tools_stamp" ]; then
  echo "[setup] installing checkov $CHECKOV_VERSION into .venv-tools/checkov (its own venv)"
  [ -x .venv-tools/checkov/bin/python ] || "$PYTHON" -m venv .venv-tools/checkov
  .venv-tools/checkov/bin/python -m pip install -q --upgrade pip
  .venv-tools/checkov/bin/python -m pip install -q "checkov==$CHECKOV_VERSION"
  rm -f .venv-tools/checkov/.installed-checkov-*
  touch "$tools_stamp"
fi

# perf_analyzer (bundled in the tritonclient 2.51.0 wheel) links Debian's libb64.
have_libb64() {
  for d in /usr/lib/x86_64-linux-gnu /lib/x86_64-linux-gnu /usr/lib64 /usr/lib /usr/lib/aarch64-linux-gnu; do
    [ -e "$d/libb64.so.0d" ] && return 0
  done
  { PATH="$PATH:/sbin:/usr/sbin" ldconfig -p 2>/dev/null || true; } | grep -q 'libb64.so.0d'
}
if ! have_libb64; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing libb64-0d for perf_analyzer"
    (apt-get install -y -q libb64-0d >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q libb64-0d >/dev/null; }) \
      || echo "[setup] warning: could not install libb64-0d; 'promptmad bench' needs it (apt-get install libb64-0d)"
  else
    echo "[setup] note: 'promptmad bench' needs Debian's libb64-0d (sudo apt-get install libb64-0d)"
  fi
fi
# Live cameras (`promptmad watch`, tests/test_live_*.py): ffmpeg publishes the test streams, GStreamer
# reads pipeline sources, and Debian's gst-rtsp-server (through the system python3-gi) is the local
# RTSP server of scripts/rtsp_server.py. PyAV (PyPI `av`, a dependency) decodes with its own ffmpeg.
LIVE_DEBS="ffmpeg gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-rtsp gir1.2-gst-rtsp-server-1.0 python3-gi"
missing_debs() {
  for p in $LIVE_DEBS; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"; done
}
if command -v dpkg-query >/dev/null && [ -n "$(missing_debs)" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian packages for live cameras: $(missing_debs | tr '\n' ' ')"
    # shellcheck disable=SC2046
    (apt-get install -y -q --no-install-recommends $(missing_debs) >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $(missing_debs) >/dev/null; }) \
      || echo "[setup] warning: could not install $(missing_debs | tr '\n' ' '); live-camera tests need them"
  else
    echo "[setup] note: live cameras and their tests need Debian's $(missing_debs | tr '\n' ' ') (sudo apt-get install ...)"
  fi
fi
# tests/test_fleet.py evaluates deploy/'s Prometheus rules with a real Prometheus (Debian's package)
# scraping local tritonservers; the package's own service is not needed (the test starts its own).
if ! command -v prometheus >/dev/null && [ ! -x /usr/bin/prometheus ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian's prometheus for the fleet tests"
    (apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends prometheus >/dev/null; }) \
      || echo "[setup] warning: could not install prometheus; tests/test_fleet.py needs it"
  else
    echo "[setup] note: tests/test_fleet.py needs Debian's prometheus (sudo apt-get install prometheus)"
  fi
fi
echo "[setup] ready: .venv/bin/promptmad --help"
