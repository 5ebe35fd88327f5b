"""Benchmark: reading every tissue tile of a slide at 0.5 mpp, histopan's dask reader vs plain OpenSlide.

For each slide (the CMU-1-Small-Region SVS and a generated 40k x 40k Aperio-flavoured slide) the target mpp
is first snapped to a pyramid level's own pixel size within 1 % (``reader.snap_mpp``, as the pipeline does:
0.499 um/px on CMU, 0.5 on the generated slide), then the tissue tiles of a ``TileGrid`` at that mpp are read

- ``openslide``: a plain loop of ``openslide.OpenSlide.read_region`` on the same level-0 boxes, at the
  pyramid level a reader would pick, converted to an RGB numpy array (the baseline);
- ``histopan-loop``: a plain loop of histopan's ``reader.read_region`` on the same boxes (no dask), which
  separates the reader's own cost from dask's;
- ``dask-1``: ``histopan.tiling.tile_stack`` computed with ``histopan.tiling.compute_local`` and one
  worker (dask's synchronous scheduler, as the pipeline reads with one worker);
- ``dask-2``: the same with two workers (dask's threaded scheduler, two threads);
- ``distributed-2``: the same on a ``distributed.LocalCluster`` of two single-threaded worker processes.

Every tile is consumed where it is read (its pixel sum, one ``map_blocks`` over the whole stack, computed
in one call), so nothing piles up in memory.  Each measurement runs in its own subprocess, which also gives
its peak RSS; tissue detection and process start-up are not timed, graph building is.  The modes run
interleaved (all modes once, then again, ``--repeats`` rounds) and the best time per mode is kept, so a
change in machine load hits every mode alike; the load average is recorded at the start, the end and with
every measurement.  The generated slides go to a cache folder (``--cache``, default
``$HISTOPAN_BENCH_CACHE`` or ``~/.cache/histopan/bench``), never into the repository, and are reused.

    .venv/bin/python benchmarks/bench_read.py                 # writes benchmarks/results/read.json
    .venv/bin/python benchmarks/bench_read.py --size 12000    # quicker, smaller generated slide
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_CMU = REPO.parent / "shared" / "slides" / "cmu_small_region.svs"
MODES = ("openslide", "histopan-loop", "dask-1", "dask-2", "distributed-2")


# ------------------------------------------------------------------------------ one measurement (child)


def _tissue_tiles(path: str, mpp: float, tile: int):
    from histopan.slide import open_slide
    from histopan.slide.tissue import select_tiles, tissue_mask
    from histopan.tiling import TileGrid

    reader = open_slide(path)
    grid = TileGrid.for_slide(reader, reader.snap_mpp(mpp), tile, 0)
    keep = select_tiles(tissue_mask(reader), grid.boxes("core"), min_fraction=0.05)
    return reader, grid, keep


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux ``VmHWM``, via ``/proc/self/clear_refs``); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _proc_status_mb(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` in MB (``VmRSS``, or ``VmHWM``: peak RSS since the start or
    since :func:`_reset_peak_rss`), or None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _tile_sums(block: np.ndarray) -> np.ndarray:
    """Pixel sum of each tile of a (n, h, w, 3) block, as an (n, 1, 1, 1) block (no copy of the pixels)."""
    return block.sum(axis=(1, 2, 3), dtype=np.int64, keepdims=True)


def measure(path: str, mode: str, mpp: float, tile: int) -> dict:
    """Read the tissue tiles of ``path`` once in ``mode``; returns seconds, tile count, checksum, peak RSS."""
    reader, grid, keep = _tissue_tiles(path, mpp, tile)
    n = len(keep)
    tiles = [grid[int(i)] for i in keep]
    boxes = [t.read_level0 for t in tiles]
    # tile_stack pads border tiles to the full window with white (255); the loops add the same padding to
    # their checksum so that every mode's checksum must agree
    padding = 255 * 3 * sum(t.window.w * t.window.h - t.read.w * t.read.h for t in tiles)
    # peak RSS of the whole process includes tissue detection; the read phase's own peak is measured apart
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the reset below clears it
    reset = _reset_peak_rss()
    rss_before = _proc_status_mb("VmRSS")
    if mode == "openslide":
        import openslide

        slide = openslide.OpenSlide(path)
        level = slide.get_best_level_for_downsample(grid.downsample * 1.01)
        lds = slide.level_downsamples[level]
        start = time.perf_counter()
        sums = []
        for x, y, w, h in boxes:
            size = (max(1, round(w / lds)), max(1, round(h / lds)))
            rgb = np.asarray(slide.read_region((round(x), round(y)), level, size).convert("RGB"))
            sums.append(int(rgb.sum(dtype=np.int64)))
        seconds = time.perf_counter() - start
        checksum = int(np.sum(sums)) + padding
    elif mode == "histopan-loop":
        sizes = [(t.read.w, t.read.h) for t in tiles]
        start = time.perf_counter()
        sums = []
        for (x, y, w, h), size in zip(boxes, sizes):
            rgb = reader.read_region(x, y, w, h, mpp=grid.mpp, out_size=size)
            sums.append(int(rgb.sum(dtype=np.int64)))
        seconds = time.perf_counter() - start
        checksum = int(np.sum(sums)) + padding
    else:
        import dask
        import dask.array  # noqa: F401 - imported before the clock starts, as in a running pipeline

        from histopan.tiling import tile_stack

        def graph():
            arr = tile_stack(reader, grid, tiles=keep)
            return arr.map_blocks(_tile_sums, chunks=(arr.chunks[0], (1,), (1,), (1,)), dtype=np.int64)

        if mode in ("dask-1", "dask-2"):
            from histopan.tiling import compute_local

            # warm-up on a trivial graph (lazy imports, the thread pool), as in a running pipeline
            compute_local(dask.array.ones(2, chunks=1).sum(), int(mode[-1]))
            start = time.perf_counter()
            result = compute_local(graph(), int(mode[-1]))  # what the engine's read_batch calls
            seconds = time.perf_counter() - start
        elif mode == "distributed-2":
            import distributed

            with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                          dashboard_address=None, silence_logs=40) as cluster, \
                    distributed.Client(cluster) as client:
                client.run(lambda: None)  # workers up: cluster start-up is not timed
                client.compute(dask.array.ones(2, chunks=1).sum()).result()
                start = time.perf_counter()
                result = client.compute(graph()).result()
                seconds = time.perf_counter() - start
        else:
            raise SystemExit(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        checksum = int(np.sum(result))
    result = {
        "mode": mode, "seconds": seconds, "tiles": n, "tiles_per_s": n / seconds if seconds else None,
        "ms_per_tile": 1e3 * seconds / n if n else None, "checksum": checksum,
        "peak_rss_mb": max(peak_before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "rss_before_read_mb": rss_before,
        "read_peak_rss_mb": _proc_status_mb("VmHWM") if reset else None,
        "load_avg_1min": os.getloadavg()[0], "mpp": grid.mpp,
        "level0_dimensions": list(reader.dimensions), "target_size": [grid.width, grid.height],
        "grid_tiles": len(grid),
    }
    if result["read_peak_rss_mb"] is not None and rss_before is not None:
        result["read_rss_increase_mb"] = result["read_peak_rss_mb"] - rss_before
    else:
        result["read_rss_increase_mb"] = None
    return result


def _run_child(path: Path, mode: str, mpp: float, tile: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_measure", str(path), mode, str(mpp), str(tile)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------- orchestration


def _generated(cache: Path, side: int, seed: int = 0) -> Path:
    from histopan.errors import HistopanError
    from histopan.testing import load_test_slide, write_test_slide

    path = cache / f"synthetic_{side}.svs"
    if path.exists():
        try:
            ts = load_test_slide(path)
            if (ts.width, ts.height, ts.spec.seed, ts.flavour) == (side, side, seed, "svs"):
                return path
        except HistopanError as exc:  # a stale or unreadable cache entry is rewritten, and said so
            print(f"rewriting cached {path}: {exc}", file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    write_test_slide(path, side, side, mpp=0.25, flavour="svs", seed=seed, truth=False, overwrite=True)
    print(f"generated {path} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return path


def bench_slide(path: Path, name: str, mpp: float, tile: int, repeats: int) -> dict:
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for rnd in range(repeats):  # interleaved and rotated, so drifting machine load hits every mode alike
        for mode in MODES[rnd % len(MODES):] + MODES[:rnd % len(MODES)]:
            r = _run_child(path, mode, mpp, tile)
            runs[mode].append(r)
            print(f"{name:>18} {mode:>14}: {r['tiles']} tiles in {r['seconds']:.2f} s "
                  f"({r['ms_per_tile']:.2f} ms/tile), peak RSS {r['peak_rss_mb']:.0f} MB, "
                  f"load {r['load_avg_1min']:.2f}", file=sys.stderr)
    best = {m: min(rs, key=lambda r: r["seconds"]) for m, rs in runs.items()}
    base = best["openslide"]["seconds"]
    return {
        "slide": name, "path": str(path), "mpp_requested": mpp, "mpp": best["openslide"]["mpp"],
        "tile": tile, "tiles": best["openslide"]["tiles"],
        "level0_dimensions": best["openslide"]["level0_dimensions"],
        "seconds": {m: b["seconds"] for m, b in best.items()},
        "ms_per_tile": {m: b["ms_per_tile"] for m, b in best.items()},
        "all_seconds": {m: [r["seconds"] for r in rs] for m, rs in runs.items()},
        "load_avg_1min": {m: [r["load_avg_1min"] for r in rs] for m, rs in runs.items()},
        "tiles_per_s": {m: b["tiles_per_s"] for m, b in best.items()},
        "speed_ratio_vs_openslide": {m: base / b["seconds"] for m, b in best.items() if m != "openslide"},
        "checksums_equal": len({r["checksum"] for rs in runs.values() for r in rs}) == 1,
        "peak_rss_mb": {m: b["peak_rss_mb"] for m, b in best.items()},
        "read_peak_rss_mb": {m: b["read_peak_rss_mb"] for m, b in best.items()},
    }


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "_measure":
        path, mode, mpp, tile = argv[1], argv[2], float(argv[3]), int(argv[4])
        print(json.dumps(measure(path, mode, mpp, tile)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cmu", type=Path, default=DEFAULT_CMU, help="the CMU-1-Small-Region SVS")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "HISTOPAN_BENCH_CACHE", Path.home() / ".cache" / "histopan" / "bench")))
    ap.add_argument("--size", type=int, default=40_000, help="side of the big generated slide (px)")
    ap.add_argument("--small-size", type=int, default=10_000, help="side of the small generated slide (px)")
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best time per mode is kept")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "read.json")
    args = ap.parse_args(argv)

    import dask
    import openslide

    import histopan

    big = _generated(args.cache, args.size)
    small = _generated(args.cache, args.small_size)
    load_at_start = list(os.getloadavg())
    slides = [bench_slide(args.cmu, "cmu_small_region", args.mpp, args.tile, args.repeats),
              bench_slide(big, f"synthetic_{args.size}", args.mpp, args.tile, args.repeats)]
    # peak memory against slide size: the dask reader with two threads on 10k and 40k slides, interleaved,
    # median of --repeats runs each
    memory_runs: dict[str, list[dict]] = {str(args.small_size): [], str(args.size): []}
    for _ in range(args.repeats):
        for side, path in ((args.small_size, small), (args.size, big)):
            memory_runs[str(side)].append(_run_child(path, "dask-2", args.mpp, args.tile))
    memory = {}
    for side, rs in memory_runs.items():
        memory[side] = {
            "peak_rss_mb": float(np.median([r["peak_rss_mb"] for r in rs])),
            "read_peak_rss_mb": (float(np.median([r["read_peak_rss_mb"] for r in rs]))
                                 if all(r["read_peak_rss_mb"] is not None for r in rs) else None),
            "all_peak_rss_mb": [r["peak_rss_mb"] for r in rs],
            "all_read_peak_rss_mb": [r["read_peak_rss_mb"] for r in rs],
            "read_rss_increase_mb": (float(np.median([r["read_rss_increase_mb"] for r in rs]))
                                     if all(r["read_rss_increase_mb"] is not None for r in rs) else None),
            "tiles": rs[0]["tiles"], "seconds": [r["seconds"] for r in rs],
        }
    one = min(s["speed_ratio_vs_openslide"]["dask-1"] for s in slides)
    two = min(max(s["speed_ratio_vs_openslide"]["dask-2"], s["speed_ratio_vs_openslide"]["distributed-2"])
              for s in slides)
    rss = [m["peak_rss_mb"] for m in memory.values()]
    read_inc = [m["read_rss_increase_mb"] for m in memory.values()]
    result = {
        "benchmark": "read tissue tiles at target mpp: histopan dask reader vs plain openslide loop",
        "histopan": histopan.__version__, "python": platform.python_version(),
        "openslide": openslide.__library_version__, "dask": dask.__version__,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_at_start": load_at_start,
                    "load_avg_at_end": list(os.getloadavg())},
        "slides": slides,
        "peak_rss_by_slide_side": memory,
        "targets": {
            "one_thread_ratio_min": 0.9, "one_thread_ratio": one, "one_thread_ok": one >= 0.9,
            "two_workers_ratio_min": 1.5, "two_workers_ratio": two, "two_workers_ok": two >= 1.5,
            "machine_idle_at_start": load_at_start[0] < 0.5,
            "two_workers_note": "two workers can only approach 2x when both CPUs are free: compare with the "
                                "load averages in 'machine' and per measurement",
            "peak_rss_growth_40k_vs_10k": rss[1] / rss[0],
            "peak_rss_independent_of_size": rss[1] <= 1.25 * rss[0],
            "read_rss_increase_mb": dict(zip(memory, read_inc)),
            "read_rss_increase_independent_of_size": (read_inc[1] <= 1.25 * read_inc[0]
                                                      if None not in read_inc else None),
            "peak_rss_note": "peak_rss_* is the whole measuring process, tissue detection included (it leaves "
                             "the 40k process larger before any tile is read); read_rss_increase_mb is how far "
                             "RSS rises above its level at the start of the timed read",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result["targets"], indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
