#!/usr/bin/env bash
# sdxl-ptq-bench: MLPerf-style SDXL benchmark harness for quantized models.
#
#   ./run.sh                 bootstrap .venv if needed, then the default benchmark: the trained testbed,
#                            FP32 and w8a8 (calibrated on 8 prompts) under LoadGen, Offline performance +
#                            accuracy on 32 captions each, and the study table of the two
#   ./run.sh test [ARGS]     the test suite (pytest ARGS; slow scale tests: ./run.sh test -m slow)
#   ./run.sh COMMAND [ARGS]  any harness command: run, ... (./run.sh --help lists them)
set -euo pipefail
cd "$(dirname "$0")"

VENV=${SDXL_BENCH_VENV:-.venv}
# torch/torchvision are pinned here, not in setup.cfg's ranges: this pair is the one known to work
# together on these machines (a CUDA build that also runs on the CPU).
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"

pick_python() {
  for candidate in ${PYTHON:-} python3.11 python3.12 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] < (3, 14))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "run.sh: needs Python 3.10-3.13 (set PYTHON=/path/to/python3)" >&2; return 1
}

ensure_venv() {
  local want stamp="$VENV/.sdxl-bench-stamp"
  want=$(cat setup.cfg pyproject.toml <(echo "$TORCH_PINS") | sha256sum | cut -d' ' -f1)
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys' 2>/dev/null &&
     [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  echo "run.sh: setting up $VENV (first time: torch is several GB, allow some minutes)..." >&2
  if ! { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys' 2>/dev/null; }; then
    rm -rf "$VENV"
    "$(pick_python)" -m venv "$VENV"
  fi
  rm -f "$stamp"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q $TORCH_PINS
  "$VENV/bin/python" -m pip install -q -e ".[test,qnn]"
  echo "$want" > "$stamp"
}

ensure_venv
PY="$VENV/bin/python"
case "${1:-}" in
  "")
    exec "$PY" -m harness study --profile testbed --recipes fp32,w8a8 --backends torch --mode both \
      --max-samples 32 --num-prompts 8
    ;;
  test)
    shift
    exec "$PY" -m pytest "$@"
    ;;
  help)
    shift
    exec "$PY" -m harness --help
    ;;
  *)
    exec "$PY" -m harness "$@"
    ;;
esac
