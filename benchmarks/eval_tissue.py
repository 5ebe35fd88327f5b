"""Tissue maps on the held-back mask-set images (EBHI-Seg cases, GlaS patients): per-class IoU, epithelium
(gland) region IoU, glass IoU and tumour-vs-benign accuracy, for one or more models, each predicted up to three ways (``--modes``):

- ``whole``: each image predicted in one piece (all the context the image has: 224 px at ~0.9 um/px for
  EBHI-Seg, about 480 x 320 um for GlaS);
- ``whole+rules``: predicted whole, then the pipeline's tissue rules as ``predict_tile`` and ``segment`` apply
  them (:func:`histopan.postprocess.tissue_classes`: outside the tissue detector's region is background, small
  regions are absorbed);
- ``tiles-256``: cut into independent 256 px windows at 0.5 um/px (128 um, the training crop), as a slide
  tile without halo would see it.

The split and the truth are the training config's (glass and white lumina -> background, see
``histopan.training.loop.tissue_scores``).  Predictions of models with other class lists are mapped by class name
(a model without ``benign_epithelium`` can only say tumour for epithelium).  Writes JSON
(default benchmarks/results/tissue.json).

    python benchmarks/eval_tissue.py --config models/default/train-stage7.yaml --models default runs/stage6-model
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "models" / "default" / "train-stage7.yaml"))
    ap.add_argument("--models", nargs="+", default=["default"])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "tissue.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["whole", "whole+rules", "tiles-256"],
                    choices=["whole", "whole+rules", "tiles-256"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from histopan.model.checkpoint import load_model
    from histopan.training.config import read_train_config
    from histopan.training.data import load_mask_set
    from histopan.postprocess import tissue_classes
    from histopan.predict import _tissue_region
    from histopan.training.loop import image_maps, tissue_labels, tissue_scores

    cfg = read_train_config(args.config)
    samples = []
    for mset in cfg.masks:
        samples += load_mask_set(mset, cfg.model, cfg.crop)[1]
    names = list(cfg.model.class_names)
    device = torch.device("cpu")
    results: dict[str, dict] = {}
    for spec in args.models:
        loaded = load_model(spec)
        model = loaded.config
        network = loaded.network.to(device).eval()
        to_cfg = np.array([names.index(n) if n in names else 255 for n in model.class_names], np.uint8)
        per_mode = {}
        for mode in args.modes:
            t0 = time.time()
            preds = []
            for s in samples:
                if mode == "whole":
                    lab = tissue_labels(image_maps(network, s.image, model, device), model)
                elif mode == "whole+rules":  # what predict_tile / segment paint: glass rule, small regions absorbed
                    maps = image_maps(network, s.image, model, device)
                    region = _tissue_region(s.image, cfg.model.mpp, s.image.shape[:2])
                    lab = tissue_classes(maps.semantic, model.classes, model.postprocess.min_stuff_area_um2,
                                         cfg.model.mpp, tissue=region)
                else:  # independent 256 px windows of the image, reflected out to whole windows
                    h, w = s.image.shape[:2]
                    H, W = -(-h // 256) * 256, -(-w // 256) * 256
                    img = np.pad(s.image, ((0, H - h), (0, W - w), (0, 0)), mode="reflect")
                    lab = np.zeros((H, W), np.uint8)
                    for y in range(0, H, 256):
                        for x in range(0, W, 256):
                            maps = image_maps(network, img[y:y + 256, x:x + 256], model, device)
                            lab[y:y + 256, x:x + 256] = tissue_labels(maps, model)
                    lab = lab[:h, :w]
                preds.append((s, to_cfg[lab]))
            scores = tissue_scores(tuple(preds), cfg.model)
            scores["seconds"] = round(time.time() - t0, 1)
            per_mode[mode] = scores
            by = scores["tissue_by_set"]
            print(f"{spec} {mode}: " + ", ".join(
                f"{k} epithelium IoU {v['region_iou']:.3f} glass IoU {v['glass_iou'] or float('nan'):.3f}"
                f" tumour/benign acc {v.get('region_class_accuracy', float('nan')):.3f}" for k, v in by.items())
                + f"; per-class IoU {json.dumps({k: round(v, 3) if v is not None else None for k, v in scores['tissue']['iou'].items()})}",
                flush=True)
        results[spec] = {"weights_sha256": loaded.weights_sha256, "classes": list(model.class_names), **per_mode}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": str(Path(args.config).resolve().relative_to(REPO)),
                               "images": {k: sum(1 for s in samples if s.dataset == k)
                                          for k in dict.fromkeys(s.dataset for s in samples)},
                               "resolution_um_per_px": cfg.model.mpp, "models": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
