"""Benchmark of histopan.metrics: PQ throughput on 1024 x 1024 map pairs and peak memory of store evaluation.

Writes ``benchmarks/results/metrics.json``.  Run with one thread on one core:

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python benchmarks/bench_metrics.py

Throughput: synthetic pairs of instance maps with about 400 round nuclei each (the prediction is the truth with
jittered centres and radii), timed for :func:`binary_pq` and for :func:`panoptic_quality` with class maps.
Memory: a truth and a prediction store of growing size (tiled copies of such maps, 1024 chunks) are evaluated
region by region in a fresh process each; its peak resident memory is reported against the map size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from skimage.draw import disk

from histopan.metrics import ClassSpec, binary_pq, panoptic_quality

RESULTS = Path(__file__).resolve().parent / "results" / "metrics.json"
CLASSES = (
    ClassSpec("background", (128, 128, 128), "stuff", id=0),
    ClassSpec("stroma", (128, 128, 128), "stuff", id=1),
    ClassSpec("tumour_nucleus", (128, 128, 128), "thing", id=2),
    ClassSpec("lymphocyte", (128, 128, 128), "thing", id=3),
)


def nuclei_pair(size: int = 1024, n: int = 400, seed: int = 0) -> tuple[np.ndarray, ...]:
    """(truth_sem, truth_inst, pred_sem, pred_inst) with about ``n`` nuclei each."""
    rng = np.random.default_rng(seed)
    maps = []
    centres = rng.uniform(10, size - 10, (n, 2))
    radii = rng.uniform(4, 12, n)
    types = rng.integers(2, 4, n)
    for jitter in (0.0, 2.0):
        inst = np.zeros((size, size), np.uint32)
        sem = np.zeros((size, size), np.uint8)
        sem[:, size // 2 :] = 1
        for i in range(n):
            c = centres[i] + rng.normal(0, jitter, 2)
            r = max(2.0, radii[i] + rng.normal(0, jitter / 2))
            rr, cc = disk(tuple(c), r, shape=inst.shape)
            inst[rr, cc] = i + 1 + (0 if jitter == 0 else 7)
            sem[rr, cc] = types[i]
        maps += [sem, inst]
    return tuple(maps)


def throughput(repeats: int = 10) -> dict[str, float]:
    ts, ti, ps, pi = nuclei_pair()
    mp = ti.size / 1e6
    out = {}
    for name, fn in (
        ("binary_pq", lambda: binary_pq(ti, pi)),
        ("panoptic_quality", lambda: panoptic_quality(ts, ti, ps, pi, CLASSES)),
    ):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[f"{name}_mp_per_s"] = round(mp / float(np.median(times)), 2)
        out[f"{name}_ms_per_1024x1024"] = round(1000 * float(np.median(times)), 2)
    out["nuclei_truth"] = int(len(np.unique(ti)) - 1)
    out["nuclei_pred"] = int(len(np.unique(pi)) - 1)
    return out


_CHILD = r"""
import resource, sys, json, time
from histopan.evaluation import evaluate_stores
t0 = time.perf_counter()
r = evaluate_stores(sys.argv[1], sys.argv[2])
dt = time.perf_counter() - t0
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": dt, "tp": r.per_class[2].tp + r.per_class[3].tp}))
"""


def write_store(path: Path, sem: np.ndarray, inst: np.ndarray, reps: int) -> None:
    import zarr

    root = zarr.open_group(str(path), mode="w")
    root.attrs["histopan"] = {
        "classes": [{"id": c.id, "name": c.name, "color": [0, 0, 0], "kind": c.kind} for c in CLASSES],
        "complete": True,
    }
    h, w = sem.shape
    s = root.create_array("labels/semantic/0", shape=(h * reps, w * reps), chunks=(1024, 1024), dtype="uint8")
    i = root.create_array("labels/nuclei/0", shape=(h * reps, w * reps), chunks=(1024, 1024), dtype="uint32")
    for y in range(reps):
        for x in range(reps):
            k = y * reps + x
            s[y * h : (y + 1) * h, x * w : (x + 1) * w] = sem
            i[y * h : (y + 1) * h, x * w : (x + 1) * w] = np.where(inst > 0, inst + k * 1000, 0)


def store_memory(reps_list: tuple[int, ...] = (1, 2, 4, 8)) -> list[dict[str, float]]:
    ts, ti, ps, pi = nuclei_pair()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for reps in reps_list:
            tdir, pdir = Path(tmp) / f"t{reps}.zarr", Path(tmp) / f"p{reps}.zarr"
            write_store(tdir, ts, ti, reps)
            write_store(pdir, ps, pi, reps)
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            res = subprocess.run(
                [sys.executable, "-c", _CHILD, str(pdir), str(tdir)], capture_output=True, text=True, env=env
            )
            if res.returncode != 0:
                raise RuntimeError(res.stderr)
            info = json.loads(res.stdout.strip().splitlines()[-1])
            side = 1024 * reps
            rows.append({
                "side_px": side,
                "megapixels": round(side * side / 1e6, 1),
                "peak_rss_mb": round(info["peak_rss_mb"], 1),
                "seconds": round(info["seconds"], 2),
                "mp_per_s": round(side * side / 1e6 / info["seconds"], 2),
            })
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    result = {"throughput": throughput(), "store_region_eval": store_memory(), "cpu_count": os.cpu_count()}
    print(json.dumps(result["throughput"]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
