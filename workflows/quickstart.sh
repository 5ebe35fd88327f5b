#!/usr/bin/env bash
# Quick start: set up histopan and run the main job on a real slide, the public CMU-1-Small-Region
# (Aperio SVS, 0.499 um/px), with the default model; then a QC report and a QuPath export of the result.
#
#   bash workflows/quickstart.sh [OUTDIR]
#
# Results go to OUTDIR (default: ./histopan-quickstart).  Rerunning replaces them.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-histopan-quickstart}

bash "$repo/workflows/setup.sh" >/dev/null
slide=$("$repo/.venv/bin/python" "$repo/workflows/get_sample_slide.py")
mkdir -p "$out"
hp="$repo/.venv/bin/histopan"

"$hp" info "$slide" --thumbnail "$out/thumbnail.png"
"$hp" segment "$slide" -o "$out/CMU-1-Small-Region.zarr" --overwrite --json "$out/segment-summary.json"
"$hp" qc "$out/CMU-1-Small-Region.zarr" --slide "$slide" -o "$out/qc"
"$hp" export qupath "$out/CMU-1-Small-Region.zarr" -o "$out/CMU-1-Small-Region.geojson.gz"

echo
echo "Done. In $out/:"
echo "  CMU-1-Small-Region.zarr          the OME-Zarr store (labels, nucleus table, provenance)"
echo "  qc/                              the QC report (open the .html in a browser)"
echo "  CMU-1-Small-Region.geojson.gz    nuclei and tissue regions for QuPath"
echo
echo "View the store: $repo/.venv/bin/ome_zarr info $out/CMU-1-Small-Region.zarr   (its images and labels)"
echo "  or in napari (not installed here, it needs a desktop): pip install 'napari[all]' napari-ome-zarr, then"
echo "  napari --plugin napari-ome-zarr $out/CMU-1-Small-Region.zarr"
echo "Run the tests in the same environment: $repo/.venv/bin/python -m pytest -q"
