#!/usr/bin/env bash
# Set up the one Python environment for histopan in ./.venv and install this checkout into it (editable),
# with the test/development extra, so the quick start, the test suite and the benchmarks all use it.
#
#   bash workflows/setup.sh          # the environment (runtime + test extra)
#   bash workflows/setup.sh dev      # the same environment (kept for older instructions)
#
# The environment is cached under ~/.cache/histopan (override with HISTOPAN_CACHE), keyed on pyproject.toml
# and the Python version only, so `workflows/quickstart.sh`, `.ci/run`, a second checkout or a CI rerun all
# reuse one environment (one copy of torch); ./.venv is a link to it.  A real ./.venv directory made by hand
# is used as it is.  Only the package registries are contacted (pip); nothing is downloaded at run time.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
extra=${1:-}
python=${PYTHON:-python3}

case "$extra" in
  ""|dev) ;;
  *) echo "usage: bash workflows/setup.sh [dev]  (unknown argument '$extra')" >&2; exit 2 ;;
esac

if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "histopan needs Python >= 3.11; $python is $("$python" --version 2>&1). Set PYTHON=python3.11 (or newer)." >&2
  exit 1
fi

spec="$repo[dev]"
# Every editable install makes setuptools print a "!!" block (BuildBackendWarning "Editable installation.
# Please be careful with folders in your working directory with the same name as your package ..."), even
# under pip -q; it says nothing about this install, so that one warning is filtered out.
export PYTHONWARNINGS="${PYTHONWARNINGS:+$PYTHONWARNINGS,}ignore:Editable installation"

if [ -d "$repo/.venv" ] && [ ! -L "$repo/.venv" ]; then
  venv="$repo/.venv"
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q -e "$spec"
else
  key=$( { cat "$repo/pyproject.toml"; "$python" --version; } | sha256sum | cut -c1-16)
  cache=${HISTOPAN_CACHE:-$HOME/.cache/histopan}
  venv="$cache/venv-$key"
  if [ ! -f "$venv/.histopan-complete" ]; then
    echo "Creating the environment in $venv (first time: a few minutes, torch is large)..." >&2
    rm -rf "$venv"
    mkdir -p "$cache"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -e "$spec"
    touch "$venv/.histopan-complete"
  else
    # Reuse the cached dependencies; only point the editable install at this checkout.
    "$venv/bin/python" -m pip install -q --no-deps -e "$repo"
  fi
  ln -sfn "$venv" "$repo/.venv"
fi
"$repo/.venv/bin/python" -c 'import histopan, torch, segmentation_models_pytorch, openslide, zarr, pytest, ome_zarr' \
  || { echo "The environment in $venv is broken; delete it and run this script again." >&2; exit 1; }
echo "$repo/.venv"
