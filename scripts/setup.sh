#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: system packages (apt), a virtual environment in .venv,
# and this project with its test/demo extras. Re-runs are cheap (a stamp file skips pip).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

# System packages (FFCV needs libturbojpeg + OpenCV headers + pkg-config), installed only if missing.
APT_PKGS=$(grep -v '^#' scripts/apt-packages.txt | xargs || true)
if [ -n "$APT_PKGS" ] && command -v apt-get >/dev/null 2>&1; then
  missing=""
  for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    echo "setup: installing system packages:$missing"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    # Without root or a package mirror, carry on: only FFCV (and the demo's Fashion-MNIST) need these;
    # scripts/test.sh still refuses to run without FFCV.
    if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
           $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null; }; then
      echo "setup: warning: could not install$missing; FFCV and the demo's dataset need them, the rest works" >&2
    fi
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
stamp="$VENV/.mdcache-setup-$(cat pyproject.toml scripts/setup.sh scripts/apt-packages.txt scripts/pip-optional.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python packages into $VENV (first run takes a few minutes)"
  # torch 2.14.1 + torchvision 0.29.1 is the pair that imports together here (see docs/install.md).
  "$VENV/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1"
  "$VENV/bin/pip" install -q -e ".[test,demo]"
  # Optional extras (e.g. ffcv, which compiles against the apt packages above): a failure is a warning.
  for pkg in $(grep -v '^#' scripts/pip-optional.txt | xargs); do
    "$VENV/bin/pip" install -q "$pkg" || echo "setup: warning: optional package $pkg did not install"
  done
  rm -f "$VENV"/.mdcache-setup-*
  touch "$stamp"
fi
