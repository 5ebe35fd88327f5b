"""Is one model's validation nucleus PQ different from another's, beyond the noise of the split?

Both models' maps come from the pipeline's tile + halo windows (as ``histopan tune`` scores them), each
post-processed with its own plain thresholds.  Per validation image the PQ counts (TP, FP, FN, IoU sum) are
kept; a paired bootstrap over images (the same resampled images for both models) gives a confidence interval
of the PQ difference.  Nucleus-level churn is counted too: true nuclei matched (IoU > 0.5) by one model and
not by the other.  Writes JSON (default benchmarks/results/compare_pq.json).

    python benchmarks/compare_pq.py runs/stage6-model models/default --config models/default/tune-prob.yaml
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def _matched(truth: np.ndarray, pred: np.ndarray) -> set[int]:
    """Truth ids matched by a predicted object with IoU > 0.5."""
    t, p = truth.ravel(), pred.ravel()
    both = (t > 0) & (p > 0)
    pairs, inter = np.unique(np.stack([t[both], p[both]]), axis=1, return_counts=True)
    t_area = np.bincount(t, minlength=int(t.max()) + 1)
    p_area = np.bincount(p, minlength=int(p.max()) + 1)
    iou = inter / (t_area[pairs[0]] + p_area[pairs[1]] - inter)
    return {int(i) for i in pairs[0][iou > 0.5]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="reference model (e.g. the shipped one)")
    ap.add_argument("b", help="model compared with it")
    ap.add_argument("--config", default=str(REPO / "models" / "default" / "tune-prob.yaml"),
                    help="training config whose validation images are scored")
    ap.add_argument("--boot", type=int, default=10000, help="bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "compare_pq.json"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from histopan.metrics import binary_pq
    from histopan.model.checkpoint import load_model
    from histopan.postprocess import postprocess_tile
    from histopan.training.config import read_train_config
    from histopan.training.retune import validation_maps

    cfg = read_train_config(args.config)
    counts, matched, names = {}, {}, None
    for key, spec in (("a", args.a), ("b", args.b)):
        model = load_model(spec)
        maps = validation_maps(model, cfg, tiles=False)
        rows, sets = [], []
        for sample, m in maps.nuclei:
            inst = postprocess_tile(m, sample.source_mpp, model.config.postprocess, model.config.classes).instances
            s = binary_pq(sample.native_labels, inst)
            rows.append((s.tp, s.fp, s.fn, s.iou_sum))
            sets.append(_matched(sample.native_labels.astype(np.int64), inst.astype(np.int64)))
        names = [f"{s.dataset}/{s.name}" for s, _ in maps.nuclei]
        counts[key], matched[key] = np.asarray(rows, np.float64), sets

    def pq(c: np.ndarray) -> float:
        tp, fp, fn, iou = c.sum(axis=0) if c.ndim == 2 else c
        return float(iou / (tp + 0.5 * fp + 0.5 * fn))

    rng = np.random.default_rng(args.seed)
    n = len(names)
    idx = rng.integers(0, n, size=(args.boot, n))
    diffs = np.array([pq(counts["b"][i]) - pq(counts["a"][i]) for i in idx])
    lost = sum(len(x - y) for x, y in zip(matched["a"], matched["b"], strict=True))
    won = sum(len(y - x) for x, y in zip(matched["a"], matched["b"], strict=True))
    result = {
        "a": args.a, "b": args.b, "config": args.config, "images": n,
        "pq_a": pq(counts["a"]), "pq_b": pq(counts["b"]), "difference": pq(counts["b"]) - pq(counts["a"]),
        "bootstrap": {"resamples": args.boot, "ci95": [float(np.percentile(diffs, 2.5)),
                                                       float(np.percentile(diffs, 97.5))],
                      "sd": float(diffs.std()), "share_b_below_a": float((diffs < 0).mean())},
        "true_nuclei": int(sum(int(c[0] + c[2]) for c in counts["a"])),
        "matched_by_a_only": lost, "matched_by_b_only": won,
        "per_image": {name: {"a": list(map(float, ca)), "b": list(map(float, cb))}
                      for name, ca, cb in zip(names, counts["a"], counts["b"], strict=True)},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    b = result["bootstrap"]
    print(f"PQ {result['pq_a']:.4f} ({args.a}) -> {result['pq_b']:.4f} ({args.b}): difference "
          f"{result['difference']:+.4f}, 95% CI [{b['ci95'][0]:+.4f}, {b['ci95'][1]:+.4f}] (paired bootstrap over "
          f"{n} images); true nuclei matched by one only: {lost} by a, {won} by b (of {result['true_nuclei']})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
