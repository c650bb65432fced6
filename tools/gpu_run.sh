#!/usr/bin/env bash
# On the lent GPU machine (issue 19): install what its Python lacks from build/gpu-wheels (made by
# tools/gpu_wheels.sh and carried with the command), then run bench/gpu_check.py with the arguments given.
# The JSON goes to $OUT (the machine's output folder). Rehearsed on this project's CPU machines in a venv
# holding only torch and numpy (docs/tensorrt.md).
set -uo pipefail
cd "$(dirname "$0")/.."
SITE=build/gpu-site
PYTHON=${PYTHON:-python3}
[ -f build/gpu-wheels/modules.json ] || { echo "error: no build/gpu-wheels/modules.json: run tools/gpu_wheels.sh on" \
  "the development machine and carry build/gpu-wheels with the command" >&2; exit 2; }
mkdir -p "$SITE"
missing=$("$PYTHON" - <<'PYEOF'
import importlib.util, json
from pathlib import Path
for wheel, module in json.loads(Path("build/gpu-wheels/modules.json").read_text()).items():
    if importlib.util.find_spec(module) is None:
        print(Path("build/gpu-wheels") / wheel)
PYEOF
)
echo "installing $(echo "$missing" | grep -c . ) wheels the machine lacks"
[ -z "$missing" ] || "$PYTHON" -m pip install -q --no-index --no-deps --target "$SITE" $missing
PYTHONPATH="$SITE:." "$PYTHON" bench/gpu_check.py "$@"
