"""The ``histopan`` command.

Subcommands only parse arguments, call the library API and report.  Each subcommand is a pair of
functions registered in :data:`_COMMANDS`: ``_<name>_args(parser)`` adds its arguments and
``_<name>_run(args) -> int`` runs it and returns the exit code.  Errors a user can cause are
:class:`~histopan.errors.HistopanError`; they are printed as one clear line and exit with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import typing
from collections.abc import Callable, Sequence

from histopan import __version__
from histopan.checks import check_output
from histopan.errors import ConfigError, HistopanError

log = logging.getLogger("histopan")


def _finite_float(text: str, zero_ok: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and (value >= 0 if zero_ok else value > 0)):
        raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if zero_ok else '>'} 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    return _finite_float(text, zero_ok=False)


def _nonnegative_float(text: str) -> float:
    return _finite_float(text, zero_ok=True)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


# --------------------------------------------------------------------------------------------- commands
# Each subcommand: _<name>_args(parser) and _<name>_run(args) -> int, then an entry in _COMMANDS.


def _evaluate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, help="predicted label image / folder / histopan store / points")
    parser.add_argument("--truth", required=True, help="truth of the same kind (folders are paired by file stem)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--points", action="store_true", help="point detection: GeoJSON points or instance centroids")
    mode.add_argument("--semantic", action="store_true",
                      help="tissue maps: per-class IoU, pixel accuracy and confusion matrix of a store or class label "
                           "images against class label images (implied by --semantic-map and --pred-map)")
    parser.add_argument("--semantic-map", metavar="MAP", default=None,
                        help='what the truth\'s label values mean: "VALUE=CLASS,..." (e.g. "0=background,255=tumour") '
                             "or a .yaml / .json file of value: class; also for label-image predictions unless "
                             "--pred-map; values it does not list are not counted (default with a store: the "
                             "store's tissue class ids)")
    parser.add_argument("--pred-map", metavar="MAP", default=None,
                        help="what the values of label-image predictions mean, when not as --semantic-map")
    parser.add_argument("--radius-um", type=_positive_float, default=3.0, help="point matching radius in microns")
    parser.add_argument("--mpp", type=_positive_float, default=None,
                        help="microns per pixel for --points (default: meta.json beside the truth)")
    parser.add_argument("--aggregate", choices=["dataset", "per-image"], default="dataset",
                        help="dataset: sum counts over images, then divide; per-image: mean over images")
    parser.add_argument("--iou-threshold", type=float, default=0.5,
                        help="match IoU threshold (below 0.5: Hungarian matching)")
    parser.add_argument("--json", default=None, help="write the results as JSON to this file")


def _evaluate_run(args: argparse.Namespace) -> int:
    from histopan import evaluation

    out = None if args.json is None else check_output(args.json, suffixes=(".json",))  # before the work
    semantic = args.semantic or args.semantic_map is not None or args.pred_map is not None
    if args.points and semantic:
        raise ConfigError("--points scores nuclei, --semantic-map and --pred-map tissue maps", value="--points",
                          fix="leave out --points to score tissue maps, or the maps to score points")
    if args.points:
        summary = evaluation.evaluate_points(args.pred, args.truth, args.radius_um, args.mpp, args.aggregate)
    elif semantic:
        summary = evaluation.evaluate_semantic(args.pred, args.truth, args.semantic_map, args.pred_map, args.aggregate)
    else:
        summary = evaluation.evaluate(args.pred, args.truth, args.aggregate, args.iou_threshold)
    print(evaluation.format_table(summary))
    if out is not None:
        evaluation.write_summary(summary, out)
        log.info("wrote %s", out)
    return 0


THUMBNAIL_PX = 1024  # long side of `histopan info --thumbnail`


def _info_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slide", help="slide file (svs, ndpi, mrxs, scn, bif, dcm, tiff, ome.tiff, png, jpg)")
    parser.add_argument("--mpp", type=float, default=None,
                        help="microns per level-0 pixel; overrides the slide metadata (e.g. 0.25 at 40x)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    parser.add_argument("--thumbnail", default=None, metavar="OUT.png",
                        help="write a PNG thumbnail with the detected tissue outlined")


def _info_run(args: argparse.Namespace) -> int:
    import json

    from PIL import Image

    from histopan.slide import MPP_FIX, open_slide
    from histopan.slide.tissue import read_thumbnail, tissue_mask

    thumb = None if args.thumbnail is None else check_output(args.thumbnail, suffixes=(".png",))
    with open_slide(args.slide, mpp=args.mpp) as reader:
        info = reader.describe()
        mask = tissue_mask(reader)
    info["tissue_fraction"] = mask.fraction
    info["tissue_mask_downsample"] = mask.downsample
    if thumb is not None:
        with open_slide(args.slide, mpp=args.mpp) as reader:
            # in blocks, or sampled for a huge slide without a pyramid (bounded work)
            image, _ = read_thumbnail(reader, max(1.0, max(reader.dimensions) / THUMBNAIL_PX))
        thickness = max(1, round(max(image.shape[:2]) / 400))
        Image.fromarray(mask.overlay((0, 200, 0), thickness, image=image)).save(thumb, format="PNG")
        info["thumbnail"] = str(thumb)
        log.info("wrote %s", thumb)
    if args.json:
        print(json.dumps(info, indent=2, allow_nan=False))
        return 0
    mpp = "unknown (pass --mpp, e.g. --mpp 0.25 for 40x, 0.5 for 20x)" if info["mpp"] is None else (
        f"{info['mpp']:.4g} um/px ({info['mpp_source']})")
    power = info["objective_power"]
    lines = [
        f"slide:            {info['path']}",
        f"backend/vendor:   {info['backend']} / {info['vendor'] or 'unknown'}",
        f"identity:         {info['identity']}",
        f"dimensions:       {info['dimensions'][0]} x {info['dimensions'][1]} px",
        f"mpp:              {mpp}",
        f"objective power:  {'unknown' if power is None else f'{power:g}x'}",
        f"levels:           {info['level_count']}",
    ]
    for i, ((w, h), ds) in enumerate(zip(info["level_dimensions"], info["level_downsamples"])):
        lines.append(f"  level {i}: {w} x {h} px, downsample {ds:.4g}")
    lines.append(f"associated:       {', '.join(info['associated_images']) or 'none'}")
    lines.append(f"tissue fraction:  {100 * info['tissue_fraction']:.1f} %")
    if info["greyscale"]:
        lines.append("colour:           greyscale (histopan segment needs the RGB slide)")
    if thumb is not None:
        lines.append(f"thumbnail:        {thumb}")
    print("\n".join(lines))
    if info["mpp"] is None:
        log.warning("%s has no microns per pixel; tissue was found with pixel-based settings. Fix: %s",
                    args.slide, MPP_FIX)
    if info["greyscale"]:
        log.warning("%s is greyscale; histopan segment needs the colour (RGB) slide", args.slide)
    return 0



def _train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config YAML (see models/default/train.yaml)")
    parser.add_argument("--out", default=None,
                        help="run folder (checkpoints, metrics.jsonl, curves.png, model/); required unless --pack-data")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint (a finished run: re-tune and export)")
    parser.add_argument("--export", default=None, metavar="FOLDER",
                        help="also copy the finished model folder here (e.g. models/default)")
    parser.add_argument("--pack-data", default=None, metavar="DIR",
                        help="only read the config's data sets and pack them into DIR (to train elsewhere with --data)")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="train from a pack written by --pack-data instead of the config's data folders")
    parser.add_argument("--train-only", action="store_true",
                        help="stop after the last epoch; a later --resume tunes and exports (e.g. on another machine)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. for log files)")


def _tune_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model name (e.g. default) or model folder")
    parser.add_argument("--config", required=True,
                        help="training config YAML whose validation images ('val' lists) and 'tune' grid are used "
                             "(with --points: a fine-tuning config, whose held-back point annotations are used)")
    parser.add_argument("--points", action="store_true",
                        help="--config is a fine-tuning config: tune for point detection F1 on its held-back points")
    parser.add_argument("--tta", action="store_true",
                        help="tune on test-time-augmented maps; --out stores the result as the model's "
                             "postprocess_tta, which runs with --tta use")
    parser.add_argument("--out", default=None, metavar="FOLDER",
                        help="write the re-tuned model folder here (same weights; may be the model's own folder); "
                             "without it only the scores are shown")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")


def _tune_run(args: argparse.Namespace) -> int:
    from histopan.config import load_yaml
    from histopan.training.config import read_finetune_config, read_train_config
    from histopan.training.retune import retune

    keys = set(load_yaml(args.config))
    if not args.points and keys & {"annotations", "slides", "base"}:
        raise ConfigError("this is a fine-tuning config; histopan tune reads it only with --points", path=args.config,
                          value=sorted(keys & {"annotations", "slides", "base"}),
                          fix="add --points to tune for point detection F1 on its held-back annotations")
    if args.points and keys & {"nuclei", "extends"}:  # fine-tuning configs have neither
        raise ConfigError("--points needs a fine-tuning config, and this is a training config", path=args.config,
                          value=sorted(keys & {"nuclei", "extends"}),
                          fix="drop --points to tune for nucleus PQ on its 'val' images")
    config = read_finetune_config(args.config) if args.points else read_train_config(args.config)
    command = " ".join(["histopan tune", args.model, "--config", args.config] + (["--points"] if args.points else [])
                       + (["--tta"] if args.tta else []) + (["--out", args.out] if args.out else []))
    result = retune(args.model, config, tta=args.tta, device=args.device, out=args.out, command=command,
                    config_path=args.config)
    a = result.after
    if result.metric == "pq":
        detail = f"SQ {a['sq']:.4f}, RQ {a['rq']:.4f}, AJI {a.get('aji', float('nan')):.4f}"
        what = "validation nucleus PQ"
    else:
        d = a["detection"]
        detail = f"precision {d['precision']:.4f}, recall {d['recall']:.4f}"
        what = "held-back point detection F1"
    print(f"{what} {result.value(result.before):.4f} with the model's thresholds -> {result.value(a):.4f} tuned "
          f"({detail}; {len(result.trials)} trials{', TTA maps' if result.tta else ''})")
    print("tuned postprocess: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(result.postprocess).items()))
    if result.out is not None:
        print(f"wrote {result.out}")
    return 0


def _interpolate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("start", help="the model END was warm-started from (a name such as default, or a folder)")
    parser.add_argument("end", help="the warm-started model (its classes, thresholds and training record are kept)")
    parser.add_argument("--alpha", type=float, required=True,
                        help="weights = START + alpha * (END - START): 0 is START, 1 is END")
    parser.add_argument("--out", required=True, metavar="FOLDER", help="write the interpolated model folder here")


def _interpolate_run(args: argparse.Namespace) -> int:
    from histopan.training.interpolate import interpolate_models

    command = f"histopan interpolate {args.start} {args.end} --alpha {args.alpha} --out {args.out}"
    out = interpolate_models(args.start, args.end, args.alpha, args.out, command=command)
    print(f"wrote {out} (alpha {args.alpha})")
    return 0


def _train_run(args: argparse.Namespace) -> int:
    from histopan.training.config import read_train_config
    from histopan.training.loop import train

    if args.pack_data and (args.out or args.data or args.resume):
        raise ConfigError("--pack-data only packs the data; it takes no --out, --data or --resume",
                          value=args.pack_data, fix="pack first, then train with --data DIR --out RUN")
    if not args.pack_data and not args.out:
        raise ConfigError("histopan train needs --out RUN_DIR", fix="add --out runs/NAME (or --pack-data DIR)")
    config = read_train_config(args.config)
    if args.export:
        from histopan.training.engine import check_new_folder

        check_new_folder(args.export, "--export")  # before training, not after
    if args.pack_data:
        from histopan.training.data import load_training_data
        from histopan.training.packed import pack_training_data

        folder = pack_training_data(config, load_training_data(config), args.pack_data)
        print(f"packed the training data of {args.config} into {folder}")
        return 0
    data = None
    if args.data:
        from histopan.training.packed import load_packed

        data = load_packed(args.data, config)
    command = " ".join(["histopan train", args.config, "--out", args.out] + (["--data", args.data] if args.data else [])
                       + (["--resume"] if args.resume else []))
    result = train(config, args.out, resume=args.resume, progress=not (args.no_progress or args.quiet),
                   command=command, data=data, export=not args.train_only)
    if result is None:
        print(f"trained {args.out}; tune and export it with: histopan train {args.config} --out {args.out} --resume")
        return 0
    print(f"model: {result.model_dir}  validation nucleus PQ {result.scores['pq']:.4f} "
          f"(SQ {result.scores['sq']:.4f}, RQ {result.scores['rq']:.4f}, AJI {result.scores.get('aji', float('nan')):.4f})"
          f"  best epoch {result.best_epoch}")
    if args.export:
        _copy_model(result.model_dir, args.export)
    return 0


def _finetune_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="fine-tuning config YAML (see workflows/finetune-sparse/finetune.yaml)")
    parser.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, scores.json, model/)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--export", default=None, metavar="FOLDER",
                        help="also copy the finished model folder here (e.g. models/NAME)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. for log files)")


def _finetune_run(args: argparse.Namespace) -> int:
    from histopan.training.config import read_finetune_config
    from histopan.training.finetune import finetune, score_table

    config = read_finetune_config(args.config)
    if args.export:
        from histopan.training.engine import check_new_folder

        check_new_folder(args.export, "--export")  # before training, not after
    command = " ".join(["histopan finetune", args.config, "--out", args.out] + (["--resume"] if args.resume else []))
    try:
        result = finetune(config, args.out, resume=args.resume, progress=not (args.no_progress or args.quiet),
                          command=command)
    except ConfigError as e:
        if e.path is not None:
            raise
        # a setting the data cannot serve (e.g. early stopping on scores nothing held back can give): name the file
        raise ConfigError(e.reason, path=args.config, value=e.value, fix=e.fix) from e
    print(score_table(result.before, result.after))
    print(f"model: {result.model_dir}  best epoch {result.best_epoch}")
    if args.export:
        _copy_model(result.model_dir, args.export)
    return 0


def _copy_model(src, dest_dir: str) -> None:
    import shutil
    from pathlib import Path

    from histopan.errors import OutputError

    dest = Path(dest_dir)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for item in sorted(Path(src).iterdir()):
            shutil.copy2(item, dest / item.name)
    except OSError as exc:
        raise OutputError(f"copying the model failed: {exc.strerror or exc}", path=dest,
                          fix=f"copy the folder {src} yourself, or choose an --export folder you can write to") from exc
    print(f"copied {src} -> {dest}")


def _segment_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slide", help="slide file (svs, ndpi, mrxs, tiff, ...) or a PNG/TIFF tile (needs --mpp)")
    parser.add_argument("-o", "--out", required=True, metavar="OUT.zarr", help="output store (an OME-Zarr folder)")
    parser.add_argument("--model", default="default", help="model name (in models/) or model folder")
    parser.add_argument("--mpp", type=_positive_float, default=None,
                        help="microns per level-0 pixel; overrides the slide metadata")
    parser.add_argument("--device", default=None, help="torch device: cuda, cuda:1, cpu (default: cuda if present)")
    parser.add_argument("--tile", type=_positive_int, default=None, help="tile core size in pixels at the model's mpp")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="tiles per network batch (default: fit the device: 1 on a CPU, about 2 GB of memory "
                             "at the default model; on a GPU as many as half its free memory holds, at most 16)")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average the network over 8 flips / rotations (8x inference)")
    parser.add_argument("--workers", type=_positive_int, default=2, help="threads for reading and post-processing")
    parser.add_argument("--min-tissue", type=float, default=0.01,
                        help="skip tiles with less tissue than this fraction, unless a piece of tissue reaches into "
                             "them from a processed tile; tissue classes only on the detected tissue (0 = process "
                             "every tile, no tissue detection: the model decides everywhere)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store")
    parser.add_argument("--json", metavar="SUMMARY.json", default=None, help="also write the run summary as JSON")


def _segment_run(args: argparse.Namespace) -> int:
    from histopan.outputs import output_lock
    from histopan.preflight import check_segment

    out = check_output(args.out, folder=True, suffixes=(".zarr",))
    with output_lock(out):  # held from the first check to the swap of the finished store
        # paths, output state, mpp and the model folder, before torch is imported (well under 2 s)
        check_segment(args.slide, out, model=args.model, mpp=args.mpp, overwrite=args.overwrite)
        return _segment(args)


def _segment(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from tqdm import tqdm

    from histopan.pipeline import SegmentOptions, segment_slide

    options = SegmentOptions(model=args.model, mpp=args.mpp, device=args.device, tile=args.tile,
                             batch_size=args.batch_size, workers=args.workers, overwrite=args.overwrite,
                             min_tissue=args.min_tissue, tta=args.tta)
    bar = None

    def progress(event: str, data: dict) -> None:
        nonlocal bar
        if event == "start":
            bar = tqdm(total=data["n_tiles"], unit="tile", desc="segment", disable=args.quiet, dynamic_ncols=True)
        elif event == "tiles_done" and bar is not None:
            bar.n = data["done"]
            bar.set_postfix(nuclei=data["nuclei"], refresh=False)
            bar.refresh()
        elif event == "done" and bar is not None:
            bar.close()

    try:
        result = segment_slide(args.slide, args.out, options, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    summary = result.to_json()
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    stuff = ", ".join(f"{name} {area:.3f}" for name, area in result.stuff_area_mm2.items() if area > 0)
    lines = [
        f"store:       {result.store}",
        f"nuclei:      {result.n_nuclei}" + (f" ({result.n_cut} larger than the halo, flagged)" if result.n_cut else ""),
        f"tiles:       {result.n_tissue_tiles} with tissue of {result.n_tiles}"
        + (f" ({result.resumed_tiles} from an earlier run)" if result.resumed_tiles else ""),
        f"areas (mm2): {stuff or 'none'}",
        *([f"tissue mask: {result.tissue_mask_mm2:.3f} mm2 (tissue classes only within it and a small margin; "
            "background over glass)"]
          if result.tissue_mask_mm2 is not None else []),
        f"time:        {result.seconds:.1f} s, {result.megapixels_per_second:.2f} megapixels/s",
    ]
    print("\n".join(lines))
    return 0


def _bbox(text: str | None) -> tuple[float, float, float, float] | None:
    from histopan.errors import ConfigError

    if text is None:
        return None
    parts = text.replace(" ", "").split(",")
    try:
        values = tuple(float(v) for v in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise ConfigError("--bbox must be four numbers x,y,w,h in level-0 pixels", value=text,
                          fix="pass e.g. --bbox 1000,2000,4096,4096")
    return values  # type: ignore[return-value]


def _export_args(parser: argparse.ArgumentParser) -> None:
    formats = parser.add_subparsers(dest="format", metavar="FORMAT")
    formats.required = True
    qp = formats.add_parser("qupath", help="QuPath GeoJSON: nuclei as detections (or cells), tissue regions as "
                                           "annotations", description="Write a store as QuPath GeoJSON.")
    qp.add_argument("store", help="a store written by 'histopan segment' (OUT.zarr)")
    qp.add_argument("-o", "--out", required=True, metavar="OUT.geojson[.gz]", help="output file (.gz: compressed)")
    qp.add_argument("--bbox", default=None, metavar="x,y,w,h",
                    help="only this level-0 pixel box (nuclei by centroid, regions clipped)")
    qp.add_argument("--classes", nargs="+", default=None, metavar="NAME",
                    help="only these tissue classes / nucleus types (the nucleus class name keeps every nucleus)")
    qp.add_argument("--cells", action="store_true",
                    help="export nuclei as QuPath cells (nucleus grown by --cell-expansion um, no overlaps)")
    qp.add_argument("--cell-expansion", type=_nonnegative_float, default=3.0, metavar="UM",
                    help="cell expansion in microns")
    qp.add_argument("--no-regions", action="store_true", help="nuclei only, no tissue region annotations")
    qp.add_argument("--partial", action="store_true", help="accept an incomplete store (export what is there)")
    qp.add_argument("--workers", type=int, default=None, metavar="N",
                    help="processes tracing and encoding nuclei (default: min(4, CPU count), one per 50,000 "
                         "nuclei at most; the file is byte-identical for any N)")


def _export_run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from histopan.export.qupath import ExportOptions, export_qupath

    options = ExportOptions(bbox=_bbox(args.bbox), classes=None if args.classes is None else tuple(args.classes),
                            cells=args.cells, cell_expansion_um=args.cell_expansion, regions=not args.no_regions,
                            partial=args.partial)
    bar = tqdm(total=0, unit="nucleus", desc="export", disable=args.quiet, dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        result = export_qupath(args.store, args.out, options, progress=progress, workers=args.workers)
    finally:
        bar.close()
    level = "" if result.stuff_level is None else f" (traced on labels/semantic level {result.stuff_level})"
    print(f"wrote {result.path}: {result.n_nuclei} nuclei, {result.n_regions} tissue regions{level}, "
          f"{result.bytes / 2**20:.1f} MiB in {result.seconds:.1f} s")
    return 0


def _qc_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="a store written by 'histopan segment' (OUT.zarr)")
    parser.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--slide", default=None,
                        help="the segmented slide: full-resolution crops are read from it (default: the store's "
                             "low-resolution RGB overview)")
    parser.add_argument("--crops", type=_positive_int, default=4, help="number of full-resolution crops")
    parser.add_argument("--partial", action="store_true", help="accept an incomplete store")


def _qc_run(args: argparse.Namespace) -> int:
    from histopan.export.qc import qc_report

    result = qc_report(args.store, args.out, slide=args.slide, n_crops=args.crops, partial=args.partial)
    print(f"wrote {result.html} ({len(result.images)} images)")
    check = result.tissue
    if check.get("ratio") is not None:
        verdict = "WARNING, see the report" if check["warning"] else f"within {check['tolerance']:.0%}"
        print(f"tissue classes {check['labelled_mm2']:.3f} mm2 (nuclei included), tissue mask {check['mask_mm2']:.3f} "
              f"mm2: {check['ratio']:.0%} ({verdict})")
    return 0


def _batch_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slides", metavar="SLIDES",
                        help="a folder of slides, a quoted glob ('in/*.svs') or a CSV manifest (columns path, "
                             "optional mpp and name)")
    parser.add_argument("-o", "--out", required=True, metavar="OUTDIR",
                        help="output folder: OUTDIR/<name>.zarr per slide, batch_report.csv and .json")
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="join an existing Dask cluster (tcp://host:8786) instead of starting a local one")
    parser.add_argument("--workers", type=_positive_int, default=None,
                        help="local CPU worker processes (default: one per core, less one per GPU)")
    parser.add_argument("--gpus", type=int, default=0, help="local GPU workers, one per GPU (resource GPU=1)")
    parser.add_argument("--threads-per-worker", type=_positive_int, default=1, help="threads per local CPU worker")
    parser.add_argument("--model", default="default", help="model name (in models/) or model folder")
    parser.add_argument("--device", default=None,
                        help="torch device on the inference workers (default: cuda if present)")
    parser.add_argument("--tile", type=_positive_int, default=None, help="tile core size in pixels at the model's mpp")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="tiles per network batch, one task chain (default: 8 with GPUs or --scheduler, else 2: "
                             "about 2.5 GB per CPU worker)")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average the network over 8 flips / rotations (8x inference)")
    parser.add_argument("--min-tissue", type=float, default=0.01,
                        help="skip tiles with less tissue than this fraction, unless a piece of tissue reaches into "
                             "them from a processed tile; tissue classes only on the detected tissue (0 = process "
                             "every tile, no tissue detection: the model decides everywhere)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing stores (complete ones included)")
    parser.add_argument("--dashboard-address", default="127.0.0.1:8787",
                        help="local cluster's dashboard address; without a host (e.g. :0) it listens on localhost "
                             "only; name a host (0.0.0.0:8787) to open it to the network")


def _batch_run(args: argparse.Namespace) -> int:
    from histopan.preflight import check_batch

    check_batch(args.out, model=args.model)  # before torch is imported (well under 2 s)

    from tqdm import tqdm

    from histopan.batch import BatchOptions, find_slides, run_batch, write_report
    from histopan.pipeline import SegmentOptions

    outdir = check_output(args.out, folder=True)
    jobs = find_slides(args.slides, outdir)
    options = BatchOptions(
        segment=SegmentOptions(model=args.model, device=args.device, tile=args.tile, batch_size=args.batch_size,
                               overwrite=args.overwrite, min_tissue=args.min_tissue, tta=args.tta),
        scheduler=args.scheduler, workers=args.workers, gpus=args.gpus, threads_per_worker=args.threads_per_worker,
        dashboard_address=args.dashboard_address)
    outdir.mkdir(exist_ok=True)
    overall = tqdm(total=len(jobs), unit="slide", desc="slides", disable=args.quiet, dynamic_ncols=True)
    bars: dict[int, tqdm] = {}

    def progress(event: str, data: dict) -> None:
        if event == "cluster":
            where = args.scheduler or "local cluster"
            link = f", dashboard {data['dashboard']}" if data["dashboard"] else ""
            tqdm.write(f"{where}: {data['workers']} workers, {data['threads']} threads, {data['gpus']:g} GPUs{link}")
        elif event == "slide_start":
            bars[data["index"]] = tqdm(total=data["tiles"], initial=data["done"], unit="tile", desc=data["name"][:24],
                                       leave=False, disable=args.quiet, dynamic_ncols=True)
        elif event == "slide_tiles" and data["index"] in bars:
            bar = bars[data["index"]]
            bar.n = data["done"]
            bar.set_postfix(nuclei=data["nuclei"], refresh=False)
            bar.refresh()
        elif event == "slide_end":
            bar = bars.pop(data["index"], None)
            if bar is not None:
                bar.close()
            report = data["report"]
            detail = report.error if report.status == "failed" else f"{report.n_nuclei} nuclei"
            tqdm.write(f"{data['name']}: {report.status.replace('_', ' ')} ({detail})")
            overall.update(1)

    try:
        result = run_batch(jobs, options, progress=progress)
    finally:
        for bar in bars.values():
            bar.close()
        overall.close()
    csv_path, json_path = write_report(result, outdir)
    counts = result.counts()
    print(f"{counts['done']} done, {counts['already_complete']} already complete, {counts['failed']} failed "
          f"in {result.seconds:.1f} s; report: {csv_path} and {json_path}")
    return 1 if result.n_failed else 0


_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "evaluate": ("score predictions against truth: PQ / SQ / RQ, AJI, Dice, point F1, tissue-map IoU", _evaluate_args,
                 _evaluate_run),
    "train": ("train a model from a training config (checkpoints, validation PQ, tuned thresholds)", _train_args,
              _train_run),
    "tune": ("re-tune a model's post-processing thresholds without training: nucleus PQ on a training config's "
             "validation images, or point F1 on a fine-tuning config's held-back points (--points); --out writes "
             "the re-tuned model", _tune_args, _tune_run),
    "interpolate": ("a model between a warm-started model and the model it started from (weights START + "
                    "alpha * (END - START)): trades what the run learnt against what the start model knew",
                    _interpolate_args, _interpolate_run),
    "finetune": ("fine-tune a model on sparse annotations (QuPath GeoJSON points / outlines / regions, tile-class "
                 "folders): masked losses, new classes or types, early stopping, before / after figures",
                 _finetune_args, _finetune_run),
    "segment": ("panoptic segmentation of a slide into an OME-Zarr store (tissue classes + nuclei)", _segment_args,
                _segment_run),
    "info": ("show a slide's levels, size, mpp, vendor and tissue fraction", _info_args, _info_run),
    "export": ("export a store for other tools: 'export qupath' writes QuPath GeoJSON", _export_args, _export_run),
    "qc": ("quality-control report of a store: overlays, crops, plots and provenance in one HTML file", _qc_args,
           _qc_run),
    "batch": ("segment many slides on a Dask cluster (local or --scheduler): GPU workers, resumable, failures "
              "isolated, batch report", _batch_args, _batch_run),
}


# ----------------------------------------------------------------------------------------------- main


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line, like every other error (exit code 2 as before)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}. Fix: see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="histopan",
        description="Panoptic segmentation of H&E whole-slide images: tissue classes and nucleus instances.",
    )
    parser.add_argument("--version", action="version", version=f"histopan {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_text, add_args, _run) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose >= 2 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("histopan")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # tifffile logs what it skips in a damaged file (e.g. "invalid offset to first page") through Python's
    # last-resort handler; histopan's own error names the file and the fix, so those show only with -vv.
    logging.getLogger("tifffile").setLevel(logging.DEBUG if verbose >= 2 else logging.CRITICAL)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    _help, _add, run = _COMMANDS[args.command]
    try:
        return run(args)
    except HistopanError as exc:
        print(f"histopan {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"histopan {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
