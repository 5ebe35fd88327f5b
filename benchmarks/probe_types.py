"""Probe of a typed model: do its features hold more nucleus-type information than its type head uses?
Writes JSON (default benchmarks/results/type-probe.json).

    python benchmarks/probe_types.py [--model crc-nucleus-types]
        [--config workflows/finetune-sparse/crc-nucleus-types-detection.yaml] [--threads 2]

The network runs once on every image of a fine-tuning config: its training images, its held-back images
(`val`) and its test point sets (`test.points`), at the model's mpp.  At every typed point it records
- the type the model gives it (the pipeline's figure: type probabilities averaged over a 2 um disc,
  `histopan.training.finetune.types_at_points`), and
- features sampled at the point (bilinear): the last decoder block's 3 x 3 neighbourhood (exactly what the
  final convolution sees), every decoder block, and every encoder stage.

On each feature set it trains probes on the training points to convergence: a linear classifier (a type head
with all the time it needs) and a one-hidden-layer MLP (a bigger head), with the type loss weights of
fine-tuning (inverse frequency to the power 0.5).  The epoch with the best held-back weighted F1 is scored on
the test points.  If no probe beats the model's own head on the test points, a bigger head or longer head
training would not help: the features themselves are the limit, and the next step is a stronger network.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def sample_at(features, xy, shape):
    """Features (1, C, h, w) covering a network input of ``shape`` (H, W), sampled bilinearly at the input's
    pixel points ``xy`` (x, y) -> (n, C)."""
    import torch
    import torch.nn.functional as F

    h, w = shape
    g = torch.as_tensor(np.asarray(xy, dtype=np.float32))
    grid = torch.stack([(g[:, 0] + 0.5) / w * 2 - 1, (g[:, 1] + 0.5) / h * 2 - 1], -1)[None, None]
    return F.grid_sample(features, grid, mode="bilinear", align_corners=False)[0, :, 0].T


def collect(network, items, model) -> dict[str, np.ndarray]:
    """Labels, the model's own type at each typed point, and the probe feature sets of ``items``."""
    import torch

    from histopan.model.network import INPUT_MULTIPLE, split_outputs
    from histopan.training.finetune import POINT_TYPE_RADIUS_UM, types_at_points
    from histopan.inference import forward_padded

    seen: dict[str, object] = {}
    hooks = [network.encoder.register_forward_hook(lambda _m, _i, out: seen.__setitem__("encoder", out))]
    hooks += [block.register_forward_hook(lambda _m, _i, out, k=k: seen.__setitem__(f"decoder{k}", out))
              for k, block in enumerate(network.decoder.blocks)]
    rows: dict[str, list[np.ndarray]] = {"label": [], "head": [], "last3x3": [], "decoder": [], "encoder": []}
    try:
        for _name, image, xy, names in items:
            typed = [i for i, n in enumerate(names) if n is not None]
            if not typed:
                continue
            pts = np.asarray(xy, dtype=np.float64)[typed]
            h, w = image.shape[:2]
            padded = (h + (-h) % INPUT_MULTIPLE, w + (-w) % INPUT_MULTIPLE)
            # points in the padded frame's normalised coordinates: the unpadded image is its top-left part
            with torch.no_grad():
                out = forward_padded(network, image, model, torch.device("cpu"))
                types = torch.softmax(split_outputs(out, model)["types"], dim=1)[0].numpy()
                last = seen[f"decoder{len(network.decoder.blocks) - 1}"]
                shifts = [torch.roll(last, (dy, dx), (2, 3)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
                rows["last3x3"].append(torch.cat([sample_at(s, pts, padded) for s in shifts], 1).numpy())
                rows["decoder"].append(torch.cat([sample_at(seen[f"decoder{k}"], pts, padded)
                                                  for k in range(len(network.decoder.blocks))], 1).numpy())
                stages = [f for f in seen["encoder"] if f.shape[1] > 3]  # stage 0 is the input itself
                rows["encoder"].append(torch.cat([sample_at(f, pts, padded) for f in stages], 1).numpy())
            rows["head"].append(types_at_points(types, pts, POINT_TYPE_RADIUS_UM / model.mpp))
            rows["label"].append(np.array([model.type_names.index(names[i]) for i in typed]))
    finally:
        for hook in hooks:
            hook.remove()
    if not rows["label"]:
        raise SystemExit("no typed points in these images: the probe needs points with a nucleus type")
    return {k: np.concatenate(v) for k, v in rows.items()}


def scores(labels: np.ndarray, pred: np.ndarray, names) -> dict:
    from histopan.metrics import classification_f1

    return classification_f1([names[i] for i in labels], [names[i] for i in pred])


def probe(sets: dict, feature: str, hidden: int, names, epochs: int, seed: int) -> dict:
    """Train a probe on ``sets['train'][feature]``; the held-back-best epoch's test scores."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    x_train = torch.as_tensor(sets["train"][feature], dtype=torch.float32)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6

    def norm(part):
        return (torch.as_tensor(sets[part][feature], dtype=torch.float32) - mean) / std

    x_train, x_val, x_test = norm("train"), norm("val"), norm("test")
    y_train = torch.as_tensor(sets["train"]["label"], dtype=torch.long)
    count = torch.bincount(y_train, minlength=len(names)).clamp(min=1).float()
    weight = (count.sum() / count) ** 0.5
    weight = weight / weight.mean()
    dim, k = x_train.shape[1], len(names)
    net = torch.nn.Linear(dim, k) if not hidden else torch.nn.Sequential(
        torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(hidden, k))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    best: dict = {"val_weighted_f1": -1.0}
    for epoch in range(1, epochs + 1):
        net.train()
        order = torch.randperm(len(x_train))
        for i in range(0, len(order), 256):
            j = order[i:i + 256]
            loss = F.cross_entropy(net(x_train[j]), y_train[j], weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % 5 == 0:
            net.eval()
            with torch.no_grad():
                val = scores(sets["val"]["label"], net(x_val).argmax(1).numpy(), names)
                if val["weighted_f1"] > best["val_weighted_f1"]:
                    test = scores(sets["test"]["label"], net(x_test).argmax(1).numpy(), names)
                    best = {"val_weighted_f1": val["weighted_f1"], "epoch": epoch, "test": test}
    return {"feature": feature, "dims": dim, "hidden": hidden, **best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="crc-nucleus-types")
    ap.add_argument("--config", type=Path,
                    default=REPO / "workflows/finetune-sparse/crc-nucleus-types-detection.yaml")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=200, help="probe training epochs (scored every 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/type-probe.json")
    args = ap.parse_args()

    import torch

    from histopan.model.checkpoint import load_model
    from histopan.training.config import read_finetune_config
    from histopan.training.finetune import load_test_data, point_items
    from histopan.training.sparse_data import load_finetune_data

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    if not model.config.has_types:
        raise SystemExit(f"model {args.model!r} has no nucleus-type head: nothing to probe")
    if model.config.architecture.arch != "unet":
        raise SystemExit(f"model {args.model!r} is a {model.config.architecture.arch!r}: the probe reads the decoder "
                         "blocks of a plain U-Net ('unet') only")
    config = read_finetune_config(args.config)
    data = load_finetune_data(config, model.config)
    test_items = load_test_data(config, model.config).points
    if not test_items:
        raise SystemExit(f"{args.config} has no test.points set to score the probes on")
    names = model.config.type_names
    t0 = time.perf_counter()
    network = model.network.eval()
    sets = {"train": collect(network, point_items(data.train), model.config),
            "val": collect(network, point_items(data.val), model.config),
            "test": collect(network, test_items, model.config)}
    extract_s = time.perf_counter() - t0
    head = {part: scores(sets[part]["label"], sets[part]["head"], names) for part in ("val", "test")}
    probes = []
    for feature in ("last3x3", "decoder", "encoder"):
        for hidden in (0, 256):
            result = probe(sets, feature, hidden, names, args.epochs, args.seed)
            probes.append(result)
            print(f"{feature:8s} {'linear' if not hidden else f'mlp{hidden}':7s} held-back wF1 "
                  f"{result['val_weighted_f1']:.3f}  test wF1 {result['test']['weighted_f1']:.3f}  "
                  f"acc {result['test']['accuracy']:.3f}", flush=True)
    best = max(probes, key=lambda r: r["test"]["weighted_f1"])
    out = {
        "model": str(model.path), "weights_sha256": model.weights_sha256, "config": str(args.config),
        "points": {part: int(len(sets[part]["label"])) for part in sets},
        "head": head, "probes": probes,
        "best_probe_minus_head_test_weighted_f1": best["test"]["weighted_f1"] - head["test"]["weighted_f1"],
        "extract_s": extract_s, "threads": args.threads,
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"model's own head: held-back wF1 {head['val']['weighted_f1']:.3f}  test wF1 "
          f"{head['test']['weighted_f1']:.3f}  acc {head['test']['accuracy']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
