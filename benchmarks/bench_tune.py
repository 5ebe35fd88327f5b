"""Benchmark of the threshold search (`fit_thresholds`, `histopan tune --points`) on one thread and on several.
Writes JSON (default benchmarks/results/tune.json).

    python benchmarks/bench_tune.py [--model crc-nucleus-types]
        [--config workflows/finetune-sparse/crc-nucleus-types-detection.yaml] [--workers 2] [--trials 24]

The model's maps of the config's held-back point images are computed once, as `histopan tune --points`
computes them (not timed).  Then the first
``--trials`` settings of the config's `tune` grid are searched with `grid_search` on one thread and on
``--workers`` threads, alternating (1, N, 1, N, ...; ``--repeats`` rounds, best time kept).  The JSON gives
the seconds per trial, the speed-up (one-thread seconds / N-thread seconds) and whether both searches gave
the same trials and the same best thresholds (they must).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="crc-nucleus-types")
    ap.add_argument("--config", type=Path,
                    default=REPO / "workflows/finetune-sparse/crc-nucleus-types-detection.yaml")
    ap.add_argument("--workers", type=int, default=2, help="threads of the parallel search")
    ap.add_argument("--trials", type=int, default=24, help="settings of the grid searched (its first ones)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/tune.json")
    args = ap.parse_args()

    import torch

    from histopan.config import from_dict, to_dict
    from histopan.model.checkpoint import load_model
    from histopan.training.config import TuneConfig, read_finetune_config
    from histopan.training.finetune import score_points
    from histopan.training.loop import grid_search
    from histopan.training.retune import point_maps

    torch.set_num_threads(args.workers)
    model = load_model(args.model)
    config = read_finetune_config(args.config)
    items, maps = point_maps(model, config, device="cpu")  # what `histopan tune --points` searches on
    # the grid cut to its first --trials settings: one value list per axis, as TuneConfig takes them
    settings = list(itertools.product(*(getattr(config.tune, a) for a in TuneConfig.AXES)))[:args.trials]
    grid_values = {a: sorted({s[i] for s in settings}) for i, a in enumerate(TuneConfig.AXES)}
    grid = from_dict(TuneConfig, grid_values)

    def score(pp):
        return score_points(items, maps, dataclasses.replace(model.config, postprocess=pp),
                            config.test.radius_um)["detection"]["f1"]

    base_value = score(model.config.postprocess)
    times: dict[int, list[float]] = {1: [], args.workers: []}
    results = {}
    for _ in range(args.repeats):
        for workers in (1, args.workers):
            t = time.perf_counter()
            results[workers] = grid_search(grid, model.config.postprocess, score, "detection_f1",
                                           base_value=base_value, workers=workers)
            times[workers].append(time.perf_counter() - t)
    one, many = min(times[1]), min(times[args.workers])
    n_trials = len(results[1][1])
    out = {
        "model": str(model.path), "config": str(args.config), "heldback_images": len(items),
        "points": int(sum(len(it[2]) for it in items)), "trials": n_trials, "grid": to_dict(grid),
        "workers": args.workers, "seconds": {"1": times[1], str(args.workers): times[args.workers]},
        "seconds_per_trial": {"1": one / n_trials, str(args.workers): many / n_trials},
        "speedup": one / many,
        "same_result": results[1] == results[args.workers],
        "best": to_dict(results[1][0]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_avg_1min": os.getloadavg()[0]},
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"{n_trials} trials on {len(items)} images: 1 thread {one:.1f} s, {args.workers} threads {many:.1f} s, "
          f"speed-up {out['speedup']:.2f}, same result: {out['same_result']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
