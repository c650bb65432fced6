#!/usr/bin/env bash
# sdxl-ptq-bench: MLPerf-style SDXL benchmark harness for quantized models.
#
#   ./run.sh                 bootstrap .venv if needed, then the default benchmark: the trained testbed,
#                            FP32 and w8a8 (calibrated on 8 prompts) under LoadGen, Offline performance +
#                            accuracy on 32 captions each, and the study table of the two
#   ./run.sh test [ARGS]     the test suite (pytest ARGS; slow scale tests: ./run.sh test -m slow)
#   ./run.sh COMMAND [ARGS]  any harness command: run, ... (./run.sh --help lists them)
#   ./run.sh --rebuild-venv  build a fresh .venv (the old one is removed only once the new install succeeded)
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

venv_starts() { [ -x "$1/bin/python" ] && "$1/bin/python" -c 'import sys' 2>/dev/null; }

install_into() {  # $1: a venv whose Python starts; installs the pinned torch and this project into it
  "$1/bin/python" -m pip install -q --upgrade pip &&
  # shellcheck disable=SC2086
  "$1/bin/python" -m pip install -q $TORCH_PINS &&
  "$1/bin/python" -m pip install -q -e ".[test,qnn,ray]"
}

# A venv is never deleted implicitly: on an offline machine a multi-GB one cannot be rebuilt. One whose
# Python does not start (a moved or upgraded base interpreter, another user's) is reported with the fix;
# --rebuild-venv builds a fresh one and removes the old one only once the new install succeeded.
rebuild_venv() {
  local old="$VENV.old-$$"
  echo "run.sh: building a fresh $VENV (torch is several GB, allow some minutes)..." >&2
  if [ -e "$VENV" ]; then mv "$VENV" "$old"; fi
  if "$(pick_python)" -m venv "$VENV" && install_into "$VENV"; then
    echo "$1" > "$VENV/.sdxl-bench-stamp"
    rm -rf "$old"
  else
    echo "run.sh: building $VENV failed; the previous one is back in place" >&2
    rm -rf "$VENV"
    if [ -e "$old" ]; then mv "$old" "$VENV"; fi
    return 1
  fi
}

ensure_venv() {
  local want stamp="$VENV/.sdxl-bench-stamp"
  want=$(cat setup.cfg pyproject.toml <(echo "$TORCH_PINS") | sha256sum | cut -d' ' -f1)
  if [ "${1:-}" = rebuild ] || [ ! -e "$VENV" ]; then
    rebuild_venv "$want"; return
  fi
  if ! venv_starts "$VENV"; then
    echo "run.sh: $VENV exists but its Python does not start ($VENV/bin/python: moved or upgraded base" \
         "interpreter?); rebuild it with: ./run.sh --rebuild-venv   (SDXL_BENCH_VENV=DIR uses another one)" >&2
    exit 2
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "run.sh: updating $VENV (setup.cfg, pyproject.toml or the torch pins changed)..." >&2
    rm -f "$stamp"
    install_into "$VENV"
    echo "$want" > "$stamp"
  fi
}

if [ "${1:-}" = --rebuild-venv ]; then
  ensure_venv rebuild
  exit 0
fi
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
