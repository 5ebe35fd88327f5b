"""Benchmark of test-time augmentation (`--tta`): what it costs and what it buys.  Writes JSON (default
benchmarks/results/tta.json).

    python benchmarks/bench_tta.py [--model default] [--config models/default/train.yaml] [--threads 2]

Measurements, side by side in one run:
- `histopan segment` on the CMU slide without and with `--tta`, alternating (plain, tta, plain, tta), each
  in its own process: wall time, megapixels per second, nuclei; the TTA / plain wall-time ratio;
- nucleus PQ / SQ / RQ on the validation split of a training config (its `val` images, scored at each
  image's own resolution as in training), from plain maps with the model's `postprocess` thresholds and from
  TTA maps with its `postprocess_tta` (the same thresholds where the model has none), as the pipeline runs them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HISTOPAN_SHARED", REPO.parent / "shared"))


def child_segment(slide: str, out: str, model: str, threads: str, tta: str) -> None:
    """Runs in a child process: one segment run; prints its summary as JSON."""
    import torch

    from histopan.pipeline import SegmentOptions, segment_slide

    torch.set_num_threads(int(threads))
    t = time.perf_counter()
    result = segment_slide(slide, out, SegmentOptions(model=model, overwrite=True, tta=tta == "1"))
    summary = result.to_json()
    summary["wall_s"] = time.perf_counter() - t
    print(json.dumps(summary))


def run_child(slide: Path, out: Path, model: str, threads: int, tta: bool) -> dict:
    cmd = [sys.executable, __file__, "_segment", str(slide), str(out), model, str(threads), "1" if tta else "0"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def validation_pq(model_name: str, config_path: Path, threads: int) -> dict:
    """PQ of the model on the config's validation images, plain and with TTA, each with the thresholds its
    runs use (:func:`histopan.training.retune.validation_maps`: the pipeline's windows, own resolution)."""
    import torch

    from histopan.model.checkpoint import load_model
    from histopan.training.config import read_train_config
    from histopan.training.loop import score_maps
    from histopan.training.retune import validation_maps

    torch.set_num_threads(threads)
    model = load_model(model_name)
    cfg = model.config
    config = read_train_config(config_path)
    out: dict = {"config": str(config_path)}
    for tta in (False, True):
        t = time.perf_counter()
        maps = validation_maps(model, config, tta=tta, device="cpu", tiles=False)
        out["images"] = len(maps.nuclei)
        run_cfg = cfg.for_tta(tta)  # TTA runs post-process with the model's postprocess_tta, where it has one
        scores = score_maps(maps, run_cfg, run_cfg.postprocess, with_aji=False)
        scores["postprocess"] = "postprocess_tta" if run_cfg is not cfg else "postprocess"
        scores["seconds"] = time.perf_counter() - t
        out["tta" if tta else "plain"] = scores
    out["pq_gain"] = out["tta"]["pq"] - out["plain"]["pq"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--config", type=Path, default=REPO / "models" / "default" / "train.yaml",
                        help="training config whose validation split is scored")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "histopan-bench")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tta.json")
    parser.add_argument("--no-segment", action="store_true",
                        help="skip the CMU segment timing (on a CPU, TTA makes it several minutes long)")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)

    import torch

    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                                 "cuda": torch.cuda.is_available(), "threads": args.threads,
                                 "load_start": list(os.getloadavg())}, "model": args.model}
    slide = SHARED / "slides" / "cmu_small_region.svs"
    runs: dict[str, list] = {"plain": [], "tta": []}
    for tta in () if args.no_segment else (False, True, False, True):
        key = "tta" if tta else "plain"
        summary = run_child(slide, args.cache / f"tta_{key}.zarr", args.model, args.threads, tta)
        runs[key].append({k: summary[k] for k in ("wall_s", "megapixels_per_second", "n_nuclei", "n_tissue_tiles")})
        print(f"{key}: {summary['wall_s']:.1f} s, {summary['n_nuclei']} nuclei", file=sys.stderr)
    if not args.no_segment:
        best = {k: min(r["wall_s"] for r in v) for k, v in runs.items()}
        results["segment_cmu"] = {"runs": runs, "best_wall_s": best, "tta_over_plain": best["tta"] / best["plain"]}
        print(f"TTA/plain wall time {results['segment_cmu']['tta_over_plain']:.2f}", file=sys.stderr)
    results["validation"] = validation_pq(args.model, args.config, args.threads)
    print(f"validation PQ {results['validation']['plain']['pq']:.4f} -> {results['validation']['tta']['pq']:.4f}",
          file=sys.stderr)
    results["machine"]["load_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_segment":
        child_segment(*sys.argv[2:])
    else:
        main()
