"""Benchmark of the inference stage alone: network + probabilities, per tile geometry.  Writes JSON (default
benchmarks/results/network-<cpu|gpu>.json).

    python benchmarks/bench_network.py [--model default] [--device auto] [--geometries 512:96,768:160]
                                       [--batch-size 8] [--batches 10] [--rounds 3] [--tta]

`histopan segment` pays for a tile's halo: the network sees core + 2 x halo pixels per side and keeps the
core.  This measures what a geometry costs per core pixel with `histopan.inference.TileInferencer` (the
pipeline's inference stage: normalisation, padding, network, softmax / sigmoid, maps back to host memory as
float32), on the device that `segment` would use: CUDA with bf16/fp16 autocast and channels_last, or the CPU.
Geometries are measured in rounds, each round every geometry once (order rotated), and the fastest round of
each is kept.  The inputs are uniform random RGB tiles (the network's cost does not depend on the content).
Reported per geometry: seconds per batch, core megapixels per second, core mm^2 per second at the model's mpp,
and the ratio to the first geometry.  `--tta` adds the model's own geometry with test-time augmentation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_geometries(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        try:
            tile, halo = (int(v) for v in part.split(":"))
        except ValueError:
            sys.exit(f"bench_network: --geometries wants TILE:HALO pairs such as 512:96,768:160, got {part!r}")
        out.append((tile, halo))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--geometries", default=None, help="TILE:HALO,... (default: 512:96 and the model's own)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=10, help="timed batches per geometry and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tta", action="store_true", help="also time the model's geometry with --tta")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import numpy as np
    import torch

    from histopan.inference import TileInferencer, resolve_device
    from histopan.model.checkpoint import load_model

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model = load_model(args.model)
    cfg = model.config
    geometries = parse_geometries(args.geometries) if args.geometries else [(512, 96), (cfg.tile, cfg.halo)]
    cases = [(t, h, False) for t, h in dict.fromkeys(geometries)]
    if args.tta:
        cases.append((cfg.tile, cfg.halo, True))
    plain = TileInferencer(model, device=device, batch_size=args.batch_size)
    tta = TileInferencer(model, device=device, batch_size=args.batch_size, tta=True) if args.tta else None
    rng = np.random.default_rng(0)
    inputs = {(t, h): rng.integers(0, 256, (args.batch_size, t + 2 * h, t + 2 * h, 3), dtype=np.uint8)
              for t, h, _ in cases}

    def one_pass(case) -> float:
        t, h, use_tta = case
        inferencer = tta if use_tta else plain
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.batches):
            inferencer.predict(inputs[(t, h)])
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.batches

    for case in cases:  # warm-up: cuDNN algorithm choice, allocator, lazy imports
        t, h, use_tta = case
        (tta if use_tta else plain).predict(inputs[(t, h)])
    best: dict = {}
    for r in range(args.rounds):
        order = cases[r % len(cases):] + cases[:r % len(cases)]
        for case in order:
            seconds = one_pass(case)
            best[case] = min(best.get(case, float("inf")), seconds)
            print(f"round {r + 1}: tile {case[0]} halo {case[1]}{' tta' if case[2] else ''}: {seconds:.4f} s/batch",
                  file=sys.stderr)

    results = []
    for case in cases:
        t, h, use_tta = case
        core_mp = args.batch_size * t * t / 1e6
        results.append({"tile": t, "halo": h, "tta": use_tta, "window_px": t + 2 * h,
                        "seconds_per_batch": best[case], "core_megapixels_per_second": core_mp / best[case],
                        "core_mm2_per_second": core_mp * 1e6 * (cfg.mpp / 1000) ** 2 / best[case]})
    base = results[0]["core_megapixels_per_second"]
    for r in results:
        r["speed_vs_first"] = r["core_megapixels_per_second"] / base
        r["pixels_per_core_pixel"] = (r["window_px"] / r["tile"]) ** 2
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "device": str(device), "threads": args.threads}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
        machine["amp"] = "float16 autocast, channels_last" if plain.amp else "off"
        machine["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    out = {"machine": machine, "model": args.model, "model_tile": cfg.tile, "model_halo": cfg.halo,
           "mpp": cfg.mpp, "batch_size": args.batch_size, "batches": args.batches, "rounds": args.rounds,
           "results": results}
    path = args.out or REPO / "benchmarks" / "results" / f"network-{'gpu' if device.type == 'cuda' else 'cpu'}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2), encoding="utf-8")
    for r in results:
        print(f"tile {r['tile']} halo {r['halo']}{' tta' if r['tta'] else ''}: {r['core_megapixels_per_second']:.2f} "
              f"core MP/s ({r['core_mm2_per_second']:.3f} mm^2/s), x{r['speed_vs_first']:.2f} of the first",
              file=sys.stderr)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
