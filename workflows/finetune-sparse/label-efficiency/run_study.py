"""Label-efficiency study: nucleus PQ after sparse fine-tuning with 5 %, 10 %, 25 % and 100 % of the nuclei.

    python workflows/finetune-sparse/label-efficiency/run_study.py --base runs/le_base/model --work runs/label-efficiency

1. The base model must never have seen MoNuSeg: train it with ``base_train.yaml`` beside this script
   (``histopan train .../base_train.yaml --out runs/le_base``: gbm40, tcga_zhang and the tissue tiles only).
2. monuseg_train is split by whole image: the 7 images the default model holds back (one per organ) are the
   test set, scored with dense labels at 0.25 um/px; the other 23 are the annotated pool.
3. For each fraction, a random subset of every training image's nuclei (nested: the 5 % are inside the 10 %,
   ...) is written as QuPath GeoJSON polygons (class "Nucleus"), exactly what a lab would export after
   outlining a few nuclei.  Every other pixel is unlabelled, not background.
4. ``histopan finetune`` runs once per fraction with the same budget, seed and held-back split (15 % of the
   annotated images, for early stopping); the test PQ before (the base model) and after is collected.

Writes ``<work>/results.json`` and, beside this script, ``results.json``, ``label-efficiency.png`` and the
table in ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
SHARED = Path(os.environ.get("HISTOPAN_SHARED", REPO.parent / "shared"))
MONUSEG = SHARED / "data" / "monuseg_train"
#: one whole image per organ, the default model's validation split (models/default/train.yaml)
TEST = ["TCGA-A7-A13E-01Z-00-DX1", "TCGA-B0-5698-01Z-00-DX1", "TCGA-18-5592-01Z-00-DX1", "TCGA-G9-6336-01Z-00-DX1",
        "TCGA-DK-A2I6-01A-01-TS1", "TCGA-NH-A8F7-01A-01-TS1", "TCGA-21-5784-01Z-00-DX1"]


def sparse_geojson(labels: np.ndarray, fraction: float, seed: int, index: int) -> dict:
    """A FeatureCollection of polygons of a random ``fraction`` of the nuclei of an instance map (nested
    across fractions: the same permutation of the nuclei, cut at ``ceil(fraction * n)``)."""
    from histopan.export.contours import outer_rings, trace_rings

    ids = np.unique(labels)
    ids = ids[ids > 0]
    order = np.random.default_rng([seed, index]).permutation(ids)
    keep = np.sort(order[: int(np.ceil(fraction * ids.size))])
    rings = outer_rings(trace_rings(labels, keep))
    feats = []
    for i in range(len(rings)):
        ring = rings.ring(i)
        coords = np.vstack([ring, ring[:1]]).round(2).tolist()
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [coords]},
                      "properties": {"objectType": "annotation",
                                     "classification": {"name": "Nucleus", "color": [40, 40, 220]}}})
    return {"type": "FeatureCollection", "features": feats}


def write_run(work: Path, fraction: float, base: Path, train: list[str], args: argparse.Namespace) -> tuple[Path, int]:
    """GeoJSON of one fraction and its fine-tuning config; returns (config path, nuclei annotated)."""
    tag = f"f{round(fraction * 100):03d}"
    folder = work / tag
    geo = folder / "geojson"
    geo.mkdir(parents=True, exist_ok=True)
    n = 0
    for index, name in enumerate(train):
        labels = tifffile.imread(MONUSEG / "labels" / f"{name}.tif").astype(np.int32)
        doc = sparse_geojson(labels, fraction, args.seed, index)
        n += len(doc["features"])
        (geo / f"{name}.geojson").write_text(json.dumps(doc), encoding="utf-8")
    config = {
        "name": f"label-efficiency-{tag}",
        "base": str(base),
        "description": f"Sparse fine-tuning on {fraction:.0%} of the monuseg_train nuclei (label-efficiency study).",
        "annotations": [{"images": str(MONUSEG / "images"), "geojson": str(geo), "classes": {"Nucleus": "nucleus"},
                         "exclude": TEST}],
        "test": {"nuclei": [{"path": str(MONUSEG), "exclude": train}]},
        "trainable": "all", "epochs": args.epochs, "steps_per_epoch": args.steps, "lr": args.lr,
        "warmup_steps": 20, "patience": 3, "batch_size": 8, "crop": 256, "threads": args.threads, "seed": args.seed,
    }
    path = folder / "finetune.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path, n


def plot(rows: list[dict], base_pq: float, out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = [100 * r["fraction"] for r in rows]
    ax.plot(x, [r["pq"] for r in rows], marker="o", label="after sparse fine-tuning")
    ax.axhline(base_pq, color="grey", ls="--", label="base model (no MoNuSeg label)")
    full = next(r["pq"] for r in rows if r["fraction"] == 1.0)
    ax.axhspan(full - 0.03, full, color="tab:green", alpha=0.15, label="within 0.03 of 100 %")
    ax.set_xscale("log")
    ax.set_xticks(x, [f"{v:g} %" for v in x])
    ax.set_xlabel("nuclei annotated (sparse polygons, rest unlabelled)")
    ax.set_ylabel("nucleus PQ, 7 held-back MoNuSeg images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="base model folder (trained without MoNuSeg)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "label-efficiency")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.10, 0.25, 1.0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    args = parser.parse_args(argv)
    args.work = args.work.resolve()
    if 1.0 not in args.fractions:
        parser.error("--fractions must include 1.0 (the reference)")
    names = sorted(p.stem for p in (MONUSEG / "images").glob("*.png"))
    train = [n for n in names if n not in TEST]
    args.work.mkdir(parents=True, exist_ok=True)
    jobs = [(f, *write_run(args.work, f, args.base.resolve(), train, args)) for f in sorted(args.fractions)]
    histopan = Path(sys.executable).with_name("histopan")
    pending, running, t0 = list(jobs), [], time.time()
    while pending or running:
        while pending and len(running) < args.parallel:
            f, cfg, n = pending.pop(0)
            run = cfg.parent / "run"
            resume = ["--resume"] if (run / "checkpoints" / "last" / "state.json").exists() else []
            if (run / "model" / "weights.safetensors").exists():
                continue
            log = open(cfg.parent / "finetune.log", "w", encoding="utf-8")
            cmd = [str(histopan), "finetune", str(cfg), "--out", str(run), "--no-progress", *resume]
            running.append((f, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
            print(f"started {f:.0%}: {' '.join(cmd)}", flush=True)
        time.sleep(5)
        for item in list(running):
            f, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                if proc.returncode:
                    print(f"fraction {f:.0%} failed (exit {proc.returncode}); see {log.name}", file=sys.stderr)
                    return 1
                print(f"finished {f:.0%} after {time.time() - t0:.0f} s", flush=True)
    rows, base_pq = [], None
    for f, cfg, n in jobs:
        scores = json.loads((cfg.parent / "run" / "scores.json").read_text(encoding="utf-8"))
        model = yaml.safe_load((cfg.parent / "run" / "model" / "model.yaml").read_text(encoding="utf-8"))
        before, after = scores["before"]["test"]["nuclei"], scores["after"]["test"]["nuclei"]
        base_pq = before["pq"]
        rows.append({"fraction": f, "nuclei_annotated": n, "pq": after["pq"], "sq": after["sq"], "rq": after["rq"],
                     "aji": after["aji"], "best_epoch": model["training"]["best_epoch"],
                     "steps": model["training"]["steps"], "train_minutes": model["training"]["train_minutes"]})
    full = next(r for r in rows if r["fraction"] == 1.0)
    for r in rows:
        r["pq_gap_to_100"] = full["pq"] - r["pq"]
    result = {"base": str(args.base), "base_test_pq": base_pq, "test_images": TEST, "train_images": len(train),
              "epochs": args.epochs, "steps_per_epoch": args.steps, "lr": args.lr, "seed": args.seed, "runs": rows,
              "goal": "25 % of the labels within 0.03 PQ of 100 %",
              "goal_met": bool(next(r for r in rows if r["fraction"] == 0.25)["pq_gap_to_100"] <= 0.03)
              if 0.25 in args.fractions else None}
    (args.work / "results.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    (HERE / "results.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    plot(rows, base_pq, HERE / "label-efficiency.png")
    lines = ["| nuclei annotated | polygons | PQ | SQ | RQ | AJI | PQ gap to 100 % | best epoch |", "|---|---|---|---|---|---|---|---|",
             f"| 0 % (base model) | 0 | {base_pq:.3f} | | | | {full['pq'] - base_pq:.3f} | |"]
    for r in rows:
        lines.append(f"| {r['fraction']:.0%} | {r['nuclei_annotated']} | {r['pq']:.3f} | {r['sq']:.3f} | {r['rq']:.3f} "
                     f"| {r['aji']:.3f} | {r['pq_gap_to_100']:.3f} | {r['best_epoch']} |")
    (HERE / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
