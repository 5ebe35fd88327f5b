"""Benchmark: QuPath GeoJSON export of a generated store with about a million nuclei.

    .venv/bin/python benchmarks/bench_export.py [--nuclei 1000000] [--workers 1 2] [--work /tmp/histopan-bench-export]

Builds (once, then reused) a store with :func:`histopan.testing_store.build_test_store`, then runs
:func:`histopan.export.qupath.export_qupath` in a fresh child process per output format (plain and
``.gz``) and worker count, and measures nuclei per second (wall clock of the whole export, table reading,
worker start-up and region tracing included) and peak resident memory: the sum over the child and its
worker processes, sampled every 50 ms with psutil (``peak_rss_bytes``), beside the largest single
process's ``ru_maxrss``.  The load average before and after each run is recorded (other work on the
machine slows the export down).  The outputs of all worker counts must be byte-identical (sha256).
Targets: >= 50,000 nuclei/s, < 1 GB.  Writes ``benchmarks/results/export.json``.
"""

from __future__ import annotations

import argparse
import hashlib
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


def _child(store: str, out: str, cells: bool, workers: int) -> None:
    from histopan.export.qupath import ExportOptions, export_qupath

    result = export_qupath(store, out, ExportOptions(cells=cells), workers=workers)
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime  # the workers have been joined
    # (ru_maxrss of a spawned worker starts at its parent's peak, so memory is sampled from outside)
    print(json.dumps({**result.to_json(), "cpu_seconds": cpu, "nuclei_per_cpu_second": result.n_nuclei / cpu}))


def _run_sampled(cmd: list[str]) -> tuple[subprocess.CompletedProcess, int, int]:
    """Run ``cmd``; also return the peak of the summed RSS of it and its descendants and the peak RSS of
    ``cmd`` itself (sampled every 50 ms)."""
    import psutil

    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        root = psutil.Process(proc.pid)
        peak = peak_main = 0
        while proc.poll() is None:
            try:
                main = root.memory_info().rss
                total = main + sum(p.memory_info().rss for p in root.children(recursive=True))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # a process ended while we looked: sample again
            peak, peak_main = max(peak, total), max(peak_main, main)
            time.sleep(0.05)
        stdout, stderr = proc.communicate()
    done = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed ({proc.returncode}):\n{stderr}")
    return done, peak, peak_main


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nuclei", type=int, default=1_000_000, help="approximate number of nuclei")
    parser.add_argument("--work", default="/tmp/histopan-bench-export", help="folder for the store and outputs")
    parser.add_argument("--json", default=str(HERE / "results" / "export.json"))
    parser.add_argument("--cells", action="store_true", help="also time --cells (slower: cell expansion)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    parser.add_argument("--child", nargs=4, metavar=("STORE", "OUT", "CELLS", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.child[2] == "1", int(args.child[3]))
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
        hashes = set()
        for workers in args.workers:
            out = work / fname
            cmd = [sys.executable, __file__, "--child", str(store_path), str(out), "1" if cells else "0", str(workers)]
            load_before = os.getloadavg()
            t = time.perf_counter()
            proc, peak, peak_main = _run_sampled(cmd)
            wall = time.perf_counter() - t
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            hashes.add(_sha256(out))
            res.update(variant=name, workers=workers, process_wall_seconds=wall, peak_rss_bytes=peak, peak_rss_main_bytes=peak_main,
                       load_average_before=load_before, load_average_after=os.getloadavg())
            runs.append(res)
            print(f"{name:6s} workers={workers} {res['n_nuclei']} nuclei in {res['seconds']:.1f} s = "
                  f"{res['nuclei_per_second']:,.0f} nuclei/s ({res['nuclei_per_cpu_second']:,.0f} per CPU s), peak RSS {peak / 2**20:.0f} MiB (all processes), "
                  f"{res['bytes'] / 2**20:.0f} MiB written, load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}")
        if len(hashes) != 1:
            raise SystemExit(f"{name}: the outputs differ between worker counts {args.workers}")
        for res in runs:
            if res["variant"] == name:
                res["sha256"] = hashes.copy().pop()
    report = {
        "benchmark": "export_qupath",
        "store": {"path": str(store_path), "shape": list(store.shape), "mpp": store.mpp, "n_nuclei": n_table,
                  "downsample": store.attrs["downsample"], "build_seconds": build_seconds},
        "targets": {"nuclei_per_second": 50000, "peak_rss_bytes": 2**30},
        "runs": runs,
        "outputs_identical_across_workers": True,  # checked above (sha256 per variant)
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
