"""Benchmark: QuPath GeoJSON export of a generated store with about a million nuclei.

    .venv/bin/python benchmarks/bench_export.py [--nuclei 1000000] [--work /tmp/histopan-bench-export]

Builds (once, then reused) a store with :func:`histopan.testing_store.build_test_store`, then runs
:func:`histopan.export.qupath.export_qupath` in a fresh child process per output format (plain and
``.gz``) and measures nuclei per second (wall clock of the whole export, table reading and region tracing
included) and the child's peak resident memory (``ru_maxrss``).  Targets: >= 50,000 nuclei/s, < 1 GB.
Writes ``benchmarks/results/export.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _child(store: str, out: str, cells: bool) -> None:
    from histopan.export.qupath import ExportOptions, export_qupath

    result = export_qupath(store, out, ExportOptions(cells=cells))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({**result.to_json(), "peak_rss_bytes": peak}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nuclei", type=int, default=1_000_000, help="approximate number of nuclei")
    parser.add_argument("--work", default="/tmp/histopan-bench-export", help="folder for the store and outputs")
    parser.add_argument("--json", default=str(HERE / "results" / "export.json"))
    parser.add_argument("--cells", action="store_true", help="also time --cells (slower: cell expansion)")
    parser.add_argument("--child", nargs=3, metavar=("STORE", "OUT", "CELLS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.child[2] == "1")
        return 0

    from histopan.store import open_store
    from histopan.testing_store import build_test_store

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    # ~0.49 nuclei per 20 x 20 label-px cell (10 um at 0.5 um/px) in this generator
    side = int(math.sqrt(args.nuclei / 0.49) * 20)
    store_path = work / f"store-{args.nuclei}.zarr"
    build_seconds = None
    if not (store_path / "zarr.json").is_file() or not open_store(store_path, partial=True).complete:
        t = time.perf_counter()
        build_test_store(store_path, shape=(side, side), mpp=0.5, slide_mpp=0.2527, chunk=1024, seed=1,
                         progress=lambda d, n: print(f"\rbuilding store: chunk row {d}/{n}", end="", flush=True))
        build_seconds = time.perf_counter() - t
        print()
    store = open_store(store_path)
    n_table = int(store.attrs["summary"]["n_nuclei"])
    runs = []
    variants = [("plain", "out.geojson", False), ("gzip", "out.geojson.gz", False)]
    if args.cells:
        variants.append(("cells", "cells.geojson", True))
    for name, fname, cells in variants:
        out = work / fname
        cmd = [sys.executable, __file__, "--child", str(store_path), str(out), "1" if cells else "0"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - t
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res.update(variant=name, process_wall_seconds=wall)
        runs.append(res)
        print(f"{name:6s} {res['n_nuclei']} nuclei in {res['seconds']:.1f} s = {res['nuclei_per_second']:,.0f} "
              f"nuclei/s, peak RSS {res['peak_rss_bytes'] / 2**20:.0f} MiB, {res['bytes'] / 2**20:.0f} MiB written")
    report = {
        "benchmark": "export_qupath",
        "store": {"path": str(store_path), "shape": list(store.shape), "mpp": store.mpp, "n_nuclei": n_table,
                  "downsample": store.attrs["downsample"], "build_seconds": build_seconds},
        "targets": {"nuclei_per_second": 50000, "peak_rss_bytes": 2**30},
        "runs": runs,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "load_average": os.getloadavg()},
    }
    out_json = Path(args.json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
