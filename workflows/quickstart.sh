#!/usr/bin/env bash
# Quick start: set up histopan and run the main job on a real slide (the public CMU-1-Small-Region).
#
#   bash workflows/quickstart.sh [OUTDIR]
#
# Results go to OUTDIR (default: ./histopan-quickstart).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-histopan-quickstart}

bash "$repo/workflows/setup.sh" >/dev/null
slide=$("$repo/.venv/bin/python" "$repo/workflows/get_sample_slide.py")
mkdir -p "$out"

"$repo/.venv/bin/histopan" info "$slide" --thumbnail "$out/thumbnail.png"
echo "Thumbnail with the detected tissue outline: $out/thumbnail.png"
