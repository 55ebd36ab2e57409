#!/usr/bin/env bash
# The training throughput table on a GPU machine without network, from carried wheels.
#   bash bench/device/run.sh WHEEL_DIR [train_throughput.py args...]
# Installs bench/device/wheels.txt from WHEEL_DIR (made by `make device-wheels`) into a temporary
# prefix that only this run puts first on PYTHONPATH (the machine's Python is left as it is), prints
# the versions in use, and runs bench/train_throughput.py; rows go to $OUT/train_throughput.txt when
# OUT is set, as each one finishes.
set -euo pipefail
[ $# -ge 1 ] && [ -d "$1" ] || { echo "usage: $0 WHEEL_DIR [bench args...] (WHEEL_DIR: make device-wheels)" >&2; exit 2; }
WHEELS=$(cd "$1" && pwd); shift
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python3}
PREFIX=$(mktemp -d "${TMPDIR:-/tmp}/openseek-device-XXXXXX")
trap 'rm -rf "$PREFIX"' EXIT
grep -Ev '^\s*(#|$)' "$REPO/bench/device/wheels.txt" > "$PREFIX/wanted.txt"
"$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --find-links "$WHEELS" \
    --target "$PREFIX/site" -r "$PREFIX/wanted.txt"
export PYTHONPATH="$PREFIX/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PY'
import importlib.metadata as md, platform, sys, torch
names = ["torch", "transformers", "accelerate", "datasets", "huggingface-hub", "tokenizers", "numpy", "pyarrow", "liger-kernel"]
def version(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return "absent"
print(f"python {platform.python_version()}; " + ", ".join(f"{n} {version(n)}" for n in names))
print(f"CUDA build {torch.version.cuda}; device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}")
PY
exec "$PY" "$REPO/bench/train_throughput.py" "$@"
