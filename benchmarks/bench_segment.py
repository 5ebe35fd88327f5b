"""Benchmark of `histopan segment`: end-to-end speed with a stage breakdown, pipeline overhead, post-processing
throughput, and peak memory against slide size.  Writes JSON (default benchmarks/results/segment.json).

    python benchmarks/bench_segment.py [--model default] [--size 20000] [--rss-sizes 10000 40000]

Measurements (each slide run in its own process, so peak RSS is that run's own):
- end to end on the CMU slide and on a generated SVS-flavoured slide of --size px at 0.25 um/px, with the
  default model on the CPU: megapixels per second (tissue tiles x tile^2 / wall time) and the pipeline's
  own stage timings (read, model, post-process in worker-thread seconds, stitch + write, table + pyramids);
- pipeline overhead = 1 - (the network alone on the same tile windows, same batches / total wall time);
- post-processing megapixels per second on one core (the engine's record_tile on precomputed maps);
- peak RSS on generated slides of --rss-sizes, run with a small real network at 1 um/px (random weights:
  memory scaling is a property of the pipeline, and a cheap network keeps a 40k slide within minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HISTOPAN_SHARED", REPO.parent / "shared"))


def _peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM; unlike ru_maxrss it does not carry over the parent's across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load() -> list[float]:
    return list(os.getloadavg())


def generated(cache: Path, size: int) -> Path:
    from histopan.testing import write_test_slide

    path = cache / f"generated_{size}.svs"
    if not path.exists():
        t = time.perf_counter()
        write_test_slide(path, size, size, mpp=0.25, flavour="svs", seed=11, truth=False)
        print(f"wrote {path} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return path


def small_model(cache: Path) -> Path:
    """A real but cheap network (random weights) at 1 um/px, for the memory-scaling runs."""
    import torch

    from histopan.model.checkpoint import save_model
    from histopan.model.config import ArchitectureConfig, ModelConfig
    from histopan.model.network import build_network

    folder = cache / "small-model"
    if not (folder / "weights.safetensors").exists():
        torch.manual_seed(0)
        cfg = ModelConfig(name="bench-small", mpp=1.0,
                          architecture=ArchitectureConfig(encoder="mobilenet_v2", decoder_channels=(32, 16, 16, 8, 8)))
        save_model(folder, build_network(cfg), cfg)
    return folder


def run_child(slide: Path, model: str, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "_segment", str(slide), str(out), model, *extra]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def child_segment(slide: str, out: str, model: str, *extra: str) -> None:
    """Runs in a child process: one segment run; prints its summary and peak RSS as JSON."""
    import torch

    from histopan.pipeline import SegmentOptions, segment_slide

    torch.set_num_threads(os.cpu_count() or 1)
    opts = {"model": model, "overwrite": True}
    if "--all-tiles" in extra:
        opts["min_tissue"] = 0.0
    t = time.perf_counter()
    result = segment_slide(slide, out, SegmentOptions(**opts))
    wall = time.perf_counter() - t
    summary = result.to_json()
    summary["wall_s"] = wall
    summary["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(summary))


def model_only(slide: Path, model_name: str, out: Path) -> dict:
    """The network alone on exactly the tiles and batches of the run that wrote ``out``; post-processing alone."""
    import numpy as np

    from histopan.inference import TileInferencer
    from histopan.model.checkpoint import load_model
    from histopan.engine import record_tile
    from histopan.slide import open_slide
    from histopan.stitching import IdScheme
    from histopan.store import open_store
    from histopan.tiling import TileGrid, tile_stack

    store = open_store(out)
    run = store.attrs["run"]
    tiles = run["tiles"]
    key = run["key"]
    model = load_model(model_name)
    cfg = model.config
    batch = run["options"]["batch_size"]
    with open_slide(slide) as reader:
        grid = TileGrid.for_slide(reader, key["mpp"], key["tile"], key["halo"])
        inferencer = TileInferencer(model, batch_size=batch)
        model_s, post_s, post_px = 0.0, 0.0, 0
        ids = IdScheme.for_grid(len(grid), (key["tile"] + 2 * key["halo"]) ** 2,
                                max(cfg.postprocess.min_area_um2 / key["mpp"] ** 2, 1.0))
        for start in range(0, len(tiles), batch):
            chunk = tiles[start:start + batch]
            windows = tile_stack(reader, grid, chunk).compute(scheduler="threads")
            t = time.perf_counter()
            maps = inferencer.predict(windows)
            model_s += time.perf_counter() - t
            if start < 4 * batch:  # post-processing throughput on one core, on the first few batches
                for m, i in zip(maps, chunk):
                    _, seconds = record_tile(m, grid, int(i), cfg, ids)
                    post_s += seconds
                    post_px += int(np.prod(m.shape))
    return {"model_only_s": model_s, "postprocess_mp_per_s_one_core": post_px / 1e6 / post_s if post_s else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--size", type=int, default=20000, help="generated slide side (px at 0.25 um/px)")
    parser.add_argument("--rss-sizes", type=int, nargs="*", default=[10000, 40000])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "histopan-bench")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "segment.json")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)

    import torch

    from histopan.model.checkpoint import load_model

    mpp = load_model(args.model).config.mpp
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "torch": torch.__version__, "cuda": torch.cuda.is_available(),
                                 "load_start": _load()},
                     "model": args.model, "end_to_end": {}, "rss": {}}
    slides = {"cmu_small_region": SHARED / "slides" / "cmu_small_region.svs"}
    if args.size:
        slides[f"generated_{args.size}"] = generated(args.cache, args.size)
    for name, slide in slides.items():
        out = args.cache / f"{name}.zarr"
        summary = run_child(slide, args.model, out, [])
        extra = model_only(slide, args.model, out)
        summary.update(extra)
        summary["pipeline_overhead"] = 1.0 - extra["model_only_s"] / summary["wall_s"]
        # issue 29's GPU figure, on whatever device ran: wall seconds per mm^2 of the tiles segmented
        tile_mm2 = summary["megapixels"] * mpp ** 2
        summary["seconds_per_mm2"] = summary["wall_s"] / tile_mm2 if tile_mm2 > 0 else None
        results["end_to_end"][name] = summary
        print(f"{name}: {summary['megapixels_per_second']:.2f} MP/s, overhead {summary['pipeline_overhead']:.1%}, "
              f"timings {summary['timings']}", file=sys.stderr)

    small = small_model(args.cache)
    for size in args.rss_sizes:
        slide = generated(args.cache, size)
        summary = run_child(slide, str(small), args.cache / f"rss_{size}.zarr", ["--all-tiles"])
        results["rss"][str(size)] = {"peak_rss_mb": summary["peak_rss_mb"], "wall_s": summary["wall_s"],
                                     "tiles": summary["n_tissue_tiles"], "megapixels": summary["megapixels"]}
        print(f"rss {size}: {summary['peak_rss_mb']:.0f} MB over {summary['n_tissue_tiles']} tiles", file=sys.stderr)
    if len(args.rss_sizes) >= 2:
        lo, hi = (results["rss"][str(s)]["peak_rss_mb"] for s in (min(args.rss_sizes), max(args.rss_sizes)))
        results["rss_ratio_largest_vs_smallest"] = hi / lo
    results["machine"]["load_end"] = _load()
    results["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_segment":
        child_segment(*sys.argv[2:])
    else:
        main()
