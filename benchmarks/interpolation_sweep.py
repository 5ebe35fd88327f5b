"""Nucleus PQ against the tissue map along the straight line between a model and its warm start.

For each ``alpha`` the weights are ``start + alpha * (end - start)`` (:mod:`histopan.training.interpolate`);
each network is scored on the training config's held-back images, as a training epoch is: validation nucleus
PQ with the end model's thresholds (and, with ``--tune``, re-tuned on the config's ``tune`` grid), and the
tissue map on the held-back mask-set images (epithelium region IoU, glass IoU, tumour-vs-benign accuracy).
Writes JSON (default benchmarks/results/interpolation.json).

    python benchmarks/interpolation_sweep.py --config models/default/train-stage9.yaml \\
        --start runs/stage6-model --end runs/default-stage9/model --alphas 0 0.5 0.75 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="training config: held-back images and the tune grid")
    ap.add_argument("--start", required=True, help="the model the end model was warm-started from")
    ap.add_argument("--end", nargs="+", required=True, help="one or more warm-started models")
    ap.add_argument("--alphas", nargs="+", type=float, default=[0.0, 0.5, 0.75, 1.0])
    ap.add_argument("--tune", action="store_true", help="also re-tune the thresholds at each alpha")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "interpolation.json"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from histopan.model.checkpoint import load_model
    from histopan.training.config import read_train_config
    from histopan.training.data import TrainingData, load_mask_set, load_nucleus_set, load_tile_set
    from histopan.training.interpolate import interpolated_network
    from histopan.training.loop import _validation_maps, score_maps, tune_postprocess

    cfg = read_train_config(args.config)
    t0 = time.time()
    val_nuclei, val_tiles, val_masks = [], [], []
    for nset in cfg.nuclei:
        val_nuclei += load_nucleus_set(nset, cfg.model.mpp, cfg.crop)[1]
    for tset in cfg.tiles:
        val_tiles += load_tile_set(tset, cfg.model, cfg.crop)[1]
    for mset in cfg.masks:
        val_masks += load_mask_set(mset, cfg.model, cfg.crop)[1]
    data = TrainingData((), (), tuple(val_nuclei), tuple(val_tiles), (), tuple(val_masks))
    print(f"held-back images: {len(val_nuclei)} nucleus, {len(val_tiles)} tile, {len(val_masks)} mask "
          f"({time.time() - t0:.0f} s to load)")
    start = load_model(args.start)
    device = torch.device("cpu")
    results = []
    for spec in args.end:
        end = load_model(spec)
        if end.config.class_names != cfg.model.class_names:
            raise SystemExit(f"{spec}: classes {end.config.class_names} differ from the config's "
                             f"{cfg.model.class_names}; pass the config the model was trained with")
        for alpha in args.alphas:
            t1 = time.time()
            net = interpolated_network(start, end, alpha).to(device)
            maps = _validation_maps(net, data, cfg, device)
            scores = score_maps(maps, cfg.model, end.config.postprocess)
            row = {"end": spec, "alpha": alpha, "pq": scores["pq"], "pq_by_set": scores["pq_by_set"],
                   "tp_fp_fn": [scores["tp"], scores["fp"], scores["fn"]], "aji": scores.get("aji"),
                   "tissue_by_set": scores.get("tissue_by_set"), "tissue_iou": scores.get("tissue", {}).get("iou")}
            if args.tune:
                best, tuned, trials = tune_postprocess(maps, cfg.model, cfg)
                row["pq_tuned"], row["tuned_trials"] = tuned["pq"], len(trials)
            row["seconds"] = round(time.time() - t1, 1)
            results.append(row)
            by = row["tissue_by_set"] or {}
            print(f"{spec} alpha {alpha:.2f}: PQ {row['pq']:.4f}"
                  + (f" (tuned {row['pq_tuned']:.4f})" if args.tune else "")
                  + "".join(f", {k} epithelium IoU {v['region_iou']:.3f} glass {v['glass_iou'] or float('nan'):.3f}"
                            f" tumour/benign {v.get('region_class_accuracy') or float('nan'):.3f}"
                            for k, v in by.items()) + f" [{row['seconds']} s]", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "start": args.start, "results": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
