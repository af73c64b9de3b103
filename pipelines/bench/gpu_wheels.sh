#!/usr/bin/env bash
# Wheels a GPU machine without network needs beside its own PyTorch image, for the GPU check:
#   bash pipelines/bench/gpu_wheels.sh [--python-version 3.12] [--dest .whl]
# Downloads (no dependencies resolved: the list is explicit) the versions this checkout's .venv runs, as
# manylinux x86_64 wheels for that Python, into DEST (git-ignored), and prints their size. On the GPU machine,
# pipelines/bench/gpu_check.sh installs whatever DEST holds into /tmp/site before it starts.
# The machine's image is expected to hold torch, torchvision, numpy, pillow, pytest, pytest-timeout, pyyaml,
# huggingface_hub, regex, tqdm, safetensors, matplotlib, scikit-image, fsspec, shellingham, markdown-it-py and
# pygments (docs/benchmarks.md, "Running it on a machine without network").
set -euo pipefail
cd "$(dirname "$0")/../.."
PYV=3.12 DEST=.whl
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYV=$2; shift 2;;
    --dest) DEST=$2; shift 2;;
    *) echo "usage: $0 [--python-version 3.12] [--dest .whl]" >&2; exit 2;;
  esac
done
PKGS="open_clip_torch ftfy wcwidth timm webdataset braceexpand zarr donfig google-crc32c numcodecs typer click rich
      pydantic pydantic_core annotated-types typing-inspection annotated-doc typing_extensions"
VENV=${PYTHON:-.venv/bin/python}
mkdir -p "$DEST"
grep -qxF "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude
for p in $PKGS; do
  v=$("$VENV" -m pip show "$p" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$v" ] || { echo "gpu_wheels: $p is not installed in $VENV (run the README's set-up first)" >&2; exit 1; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "$p==$v" 2>&1 | grep -v "^WARNING: Location" || true
  ls "$DEST" | grep -qi "^$(echo "$p" | tr '-' '_')-$v" || { echo "gpu_wheels: no wheel of $p==$v for Python $PYV" >&2; exit 1; }
done
du -sh "$DEST"
