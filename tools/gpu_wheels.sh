#!/usr/bin/env bash
# Wheels for the lent GPU machine (issue 19; docs/tensorrt.md, "On a lent GPU").
#
# That machine has CUDA PyTorch and Python 3.12 but none of diffusers, transformers, LoadGen, open_clip,
# ...; it reaches no network, and what travels with a command is at most 64 MiB. This downloads into
# build/gpu-wheels/ (git-ignored; the run's `carry`) the wheels of what bench/gpu_check.py and a LoadGen
# run of the tiny profile import beyond torch and numpy, at the versions this .venv runs, without their
# dependencies (the list is the closure, found by running them in a venv holding only torch and numpy),
# plus the torchvision matching the machine's torch; and modules.json (wheel -> module to probe), so that
# tools/gpu_run.sh installs only what the machine lacks. numba is left out (CPU image conversion only)
# and scipy (FID only). Prints the total, which must stay under the carry limit.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${GPU_WHEELS:-build/gpu-wheels}
PYVER=${GPU_PYTHON:-3.12}                   # the machine's Python (3.11 only to rehearse here)
TORCHVISION=${GPU_TORCHVISION:-0.26.0}      # matching its torch 2.11
PACKAGES="diffusers transformers tokenizers safetensors huggingface_hub mlcommons-loadgen regex pandas psutil
nvidia-ml-py tqdm pyyaml pillow python-dateutil ijson open_clip_torch ftfy wcwidth filelock packaging requests
urllib3 idna certifi charset-normalizer httpx2 httpcore2 h11 anyio truststore kernels typing_extensions jinja2
markupsafe fsspec"
pins=("torchvision==$TORCHVISION")
for name in $PACKAGES; do
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) || continue
  pins+=("$name==$version")
done
rm -rf "$OUT" && mkdir -p "$OUT"
"$PY" -m pip download -q --only-binary=:all: --no-deps --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$OUT" "${pins[@]}"
"$PY" - "$OUT" <<'PYEOF'
import importlib.metadata as m, json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
norm = lambda name: re.sub(r"[-_.]+", "_", name).lower()
owners = {}  # normalised distribution -> its importable top-level modules
for module, dists in m.packages_distributions().items():
    for dist in dists:
        if not module.startswith("_"):
            owners.setdefault(norm(dist), []).append(module)
names = {}
for wheel in out.glob("*.whl"):
    dist = norm(re.split(r"-\d", wheel.name)[0])
    names[wheel.name] = sorted(owners.get(dist, [dist]), key=len)[0]
(out / "modules.json").write_text(json.dumps(names, indent=1, sort_keys=True) + "\n")
PYEOF
total=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
echo "$(ls "$OUT"/*.whl | wc -l) wheels, $((total / 1048576)) MiB in $OUT (the carry limit is 64 MiB)"
[ "$total" -le $((62 * 1048576)) ] || { echo "too large to carry" >&2; exit 1; }
