"""Load predictions and truth from disk and evaluate them with :mod:`histopan.metrics` (``histopan evaluate``).

This is the only evaluation module that touches paths.  Accepted inputs (the same kind on both sides):

* a label image (``.tif`` / ``.tiff`` / ``.png``): one nucleus instance map, 0 = background;
* a folder of label images, paired by file stem (``<dir>/<name>.tif``); every file needs its counterpart;
* a histopan zarr store (zarr v3 group with ``labels/semantic/0`` class ids and ``labels/nuclei/0`` instance
  ids, root attribute ``histopan = {"classes": [...], "complete": true, ...}``), read region by region so a
  whole slide never sits in memory;
* for points: GeoJSON point files (QuPath export) or instance maps (their centroids), single or in folders.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from histopan.checks import check_mpp
from histopan.errors import AnnotationError, DataError, OutputError, StoreError
from histopan.export.geojson import read_points_geojson
from histopan.metrics import (
    NUCLEUS_CLASSES,
    ClassSpec,
    ImageResult,
    JointHistogram,
    PointResult,
    evaluate_histogram,
    parse_classes,
    point_detection,
    summarize,
    summarize_points,
)

log = logging.getLogger(__name__)

LABEL_SUFFIXES = (".tif", ".tiff", ".png")
POINT_SUFFIXES = (".geojson", ".json")

#: Default side of the square regions a store is read in (pixels; rounded to whole chunks).
DEFAULT_REGION_PX = 2048


# ------------------------------------------------------------------------------------------- label images


def read_label_image(path: str | Path) -> np.ndarray:
    """A 2-D integer label image from a TIFF or PNG file (a single-channel RGB-looking PNG is refused)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in LABEL_SUFFIXES:
        raise DataError(
            "not a label image", path=path, value=suffix, fix=f"use one of {', '.join(LABEL_SUFFIXES)}"
        )
    try:
        if suffix == ".png":
            with Image.open(path) as im:
                arr = np.asarray(im)
        else:
            arr = tifffile.imread(path)
    except (OSError, ValueError) as exc:  # tifffile's TiffFileError is a ValueError; PIL's errors are OSErrors
        size = f"{path.stat().st_size} bytes" if path.is_file() else None
        raise DataError(f"cannot read the label image: {exc}", path=path, value=size,
                        fix="write the instance map as a single-channel integer TIFF or PNG") from exc
    arr = np.squeeze(arr)
    if arr.ndim != 2 or arr.dtype.kind not in "iu":
        raise DataError(
            "a label image must be 2-D with integer labels",
            path=path,
            value=(arr.shape, str(arr.dtype)),
            fix="save the instance map as a single-channel uint16/uint32 TIFF",
        )
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        raise DataError("a label image holds negative labels", path=path, value=int(arr.min()),
                        fix="label background 0 and each nucleus 1, 2, 3, ...")
    return arr


def _files_by_stem(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix.lower() in suffixes:
            if f.stem in found:
                raise DataError(
                    "two files share one name stem", path=f, value=found[f.stem].name, fix="keep one per image"
                )
            found[f.stem] = f
    if not found:
        raise DataError("no input files in the folder", path=folder, fix=f"expected files ending {list(suffixes)}")
    return found


def pair_files(
    pred: Path, truth: Path, pred_suffixes: Sequence[str], truth_suffixes: Sequence[str]
) -> list[tuple[str, Path, Path]]:
    """``(name, pred file, truth file)`` for two files or two folders paired by stem; unpaired files are errors."""
    if pred.is_dir() != truth.is_dir():
        raise DataError(
            "compare a folder with a folder or a file with a file",
            path=pred,
            value=str(truth),
            fix="pass two folders of label files, two files or two stores",
        )
    if not pred.is_dir():
        return [(truth.stem, pred, truth)]
    p = _files_by_stem(pred, pred_suffixes)
    t = _files_by_stem(truth, truth_suffixes)
    missing_pred = sorted(set(t) - set(p))
    missing_truth = sorted(set(p) - set(t))
    if missing_pred:
        raise DataError(
            "truth files have no prediction", path=pred, value=missing_pred[:10], fix="predict every truth image"
        )
    if missing_truth:
        raise DataError(
            "predictions have no truth file", path=truth, value=missing_truth[:10], fix="remove or annotate them"
        )
    return [(name, p[name], t[name]) for name in sorted(t)]


def evaluate_label_files(
    pred: Path, truth: Path, iou_threshold: float = 0.5
) -> list[ImageResult]:
    """Binary nucleus scores for instance-map files or folders (one nucleus class)."""
    results = []
    for name, pf, tf in pair_files(pred, truth, LABEL_SUFFIXES, LABEL_SUFFIXES):
        p_arr = read_label_image(pf)
        t_arr = read_label_image(tf)
        if p_arr.shape != t_arr.shape:
            raise DataError(
                "prediction and truth differ in size",
                path=pf,
                value={"pred": p_arr.shape, "truth": t_arr.shape, "truth_file": str(tf)},
                fix="predict at the resolution of the truth labels",
            )
        hist = JointHistogram()
        hist.add(t_arr, p_arr)
        results.append(evaluate_histogram(hist, NUCLEUS_CLASSES, None, iou_threshold, name))
        log.debug("evaluated %s", name)
    return results


# ------------------------------------------------------------------------------------------------ stores


def is_store(path: Path) -> bool:
    """True for a directory that is a zarr v3 group (has ``zarr.json``)."""
    return path.is_dir() and (path / "zarr.json").is_file()


@dataclass(frozen=True)
class StoreLabels:
    """The label arrays and classes of an opened histopan store (arrays are lazy zarr arrays)."""

    path: Path
    semantic: object
    nuclei: object
    classes: tuple[ClassSpec, ...]
    void_label: int | None


def open_store(path: str | Path) -> StoreLabels:
    """Open a complete histopan store for reading labels (see :func:`histopan.store.open_store`)."""
    from histopan import store as store_mod

    store = store_mod.open_store(path)
    semantic, nuclei = store.semantic, store.nuclei
    if semantic.shape != nuclei.shape:
        raise StoreError("the semantic and nucleus label arrays differ in shape", path=path,
                         value=(semantic.shape, nuclei.shape), fix="rewrite the store with 'histopan segment'")
    void = store.attrs.get("void_label")
    return StoreLabels(Path(path), semantic, nuclei, parse_classes(store.attrs["classes"]),
                       None if void is None else int(void))


def regions(shape: tuple[int, int], chunks: tuple[int, int], region_px: int) -> Iterator[tuple[slice, slice]]:
    """Row-major regions covering ``shape``, each a whole number of chunks and about ``region_px`` on a side."""
    ry = max(1, region_px // chunks[0]) * chunks[0]
    rx = max(1, region_px // chunks[1]) * chunks[1]
    for y in range(0, shape[0], ry):
        for x in range(0, shape[1], rx):
            yield slice(y, min(y + ry, shape[0])), slice(x, min(x + rx, shape[1]))


def store_histogram(pred: StoreLabels, truth: StoreLabels, region_px: int = DEFAULT_REGION_PX) -> JointHistogram:
    """Joint histogram of two stores, accumulated region by region (exact: counts over regions add up)."""
    if pred.nuclei.shape != truth.nuclei.shape:  # type: ignore[attr-defined]
        raise DataError(
            "prediction and truth stores differ in size",
            path=pred.path,
            value={"pred": pred.nuclei.shape, "truth": truth.nuclei.shape},  # type: ignore[attr-defined]
            fix="evaluate a prediction of the same slide at the same level",
        )
    hist = JointHistogram()
    chunks = truth.nuclei.chunks  # type: ignore[attr-defined]
    for ys, xs in regions(truth.nuclei.shape, chunks, region_px):  # type: ignore[attr-defined]
        hist.add(
            truth.nuclei[ys, xs],  # type: ignore[index]
            pred.nuclei[ys, xs],  # type: ignore[index]
            truth.semantic[ys, xs],  # type: ignore[index]
            pred.semantic[ys, xs],  # type: ignore[index]
        )
    return hist


def _same_classes(pred: StoreLabels, truth: StoreLabels) -> None:
    key = lambda cs: [(c.id, c.name, c.kind) for c in cs]  # noqa: E731
    if key(pred.classes) != key(truth.classes):
        raise DataError(
            "the prediction and truth stores describe different classes",
            path=pred.path,
            value={"pred": key(pred.classes), "truth": key(truth.classes)},
            fix="evaluate stores that share one class list (ids, names and kinds)",
        )
    if pred.void_label is not None and pred.void_label != truth.void_label:
        raise DataError(
            "the stores use different void labels", path=pred.path, value=(pred.void_label, truth.void_label)
        )


def evaluate_stores(
    pred: str | Path,
    truth: str | Path,
    iou_threshold: float = 0.5,
    region_px: int = DEFAULT_REGION_PX,
) -> ImageResult:
    """Panoptic scores of a predicted store against a truth store (one slide), read region by region."""
    p = open_store(pred)
    t = open_store(truth)
    _same_classes(p, t)
    hist = store_histogram(p, t, region_px)
    return evaluate_histogram(hist, t.classes, t.void_label, iou_threshold, name=Path(truth).name)


# --------------------------------------------------------------------------------------------- segments


def evaluate(
    pred: str | Path,
    truth: str | Path,
    aggregate: str = "dataset",
    iou_threshold: float = 0.5,
    region_px: int = DEFAULT_REGION_PX,
) -> dict[str, object]:
    """Evaluate label files, folders or stores; the JSON-ready summary of :func:`histopan.metrics.summarize`."""
    pred, truth = Path(pred), Path(truth)
    for p in (pred, truth):
        if not p.exists():
            raise DataError("input not found", path=p, fix="check the path")
    if is_store(pred) or is_store(truth):
        if not (is_store(pred) and is_store(truth)):
            raise DataError(
                "compare a store with a store",
                path=pred if not is_store(pred) else truth,
                fix="pass two histopan stores, or two folders of label images",
            )
        results = [evaluate_stores(pred, truth, iou_threshold, region_px)]
    else:
        results = evaluate_label_files(pred, truth, iou_threshold)
    return summarize(results, aggregate)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ points


def instance_centroids(inst: np.ndarray) -> np.ndarray:
    """Centroids ``(n, 2)`` as x, y of each instance (ids in increasing order), in image coordinates whose
    origin is the top-left corner of the top-left pixel (a pixel's centre is at +0.5, as in QuPath)."""
    flat = inst.reshape(-1).astype(np.int64)
    n = int(flat.max()) + 1 if flat.size else 1
    area = np.bincount(flat, minlength=n)
    rows, cols = np.indices(inst.shape)
    sy = np.bincount(flat, weights=rows.reshape(-1), minlength=n)
    sx = np.bincount(flat, weights=cols.reshape(-1), minlength=n)
    ids = np.flatnonzero(area)
    ids = ids[ids > 0]
    return np.stack([sx[ids] / area[ids] + 0.5, sy[ids] / area[ids] + 0.5], axis=1)


#: Largest point coordinate accepted (pixels): beyond it a point lies outside any image (and squared
#: distances of such coordinates overflow the matching).
MAX_POINT_COORD = float(2**31)


def _read_points(path: Path) -> tuple[np.ndarray, list[str | None] | None]:
    if path.suffix.lower() in POINT_SUFFIXES:
        xy, names = read_points_geojson(path)
        far = np.abs(xy) > MAX_POINT_COORD
        if far.any():
            i = int(np.argmax(far.any(axis=1)))
            raise AnnotationError(f"point {i} lies outside any image (a coordinate beyond 2**31 pixels)", path=path,
                                  value=f"{xy[i, 0]:g}, {xy[i, 1]:g}",
                                  fix="fix or remove that point (coordinates are full-resolution pixels of the image)")
        return xy, names
    return instance_centroids(read_label_image(path)), None


def find_mpp(truth: Path) -> float | None:
    """The ``mpp`` of ``meta.json`` in the truth folder or its parent (the shared data layout), if any."""
    base = truth if truth.is_dir() else truth.parent
    for folder in (base, base.parent):
        meta = folder / "meta.json"
        if meta.is_file():
            try:
                value = json.loads(meta.read_text(encoding="utf-8")).get("mpp")
            except (OSError, json.JSONDecodeError) as exc:
                raise DataError("cannot read meta.json", path=meta, value=str(exc)) from exc
            if value is not None:
                return check_mpp(value, what="the mpp of meta.json", path=meta, error=DataError,
                                 fix="write a positive number of microns per pixel, e.g. \"mpp\": 0.5")
    return None


def evaluate_points(
    pred: str | Path,
    truth: str | Path,
    radius_um: float = 3.0,
    mpp: float | None = None,
    aggregate: str = "dataset",
) -> dict[str, object]:
    """Point detection (and typed F1) of point files / instance maps; radius in microns at ``mpp``.

    Without ``mpp``, the ``mpp`` of a ``meta.json`` beside the truth folder is used.
    """
    pred, truth = Path(pred), Path(truth)
    for p in (pred, truth):
        if not p.exists():
            raise DataError("input not found", path=p, fix="check the path")
    if mpp is None:
        mpp = find_mpp(truth)
        if mpp is None:
            raise DataError(
                "the pixel size is unknown, so the radius in microns cannot be converted",
                path=truth,
                fix="pass --mpp (microns per pixel of the annotated images)",
            )
        log.info("using mpp %.4g from meta.json beside %s", mpp, truth)
    mpp = check_mpp(mpp, path=truth, error=DataError, fix="pass --mpp (microns per pixel of the annotated images)")
    if not (radius_um > 0 and math.isfinite(radius_um)):
        raise DataError("the matching radius must be a finite number > 0", value=radius_um, fix="pass e.g. --radius-um 3")
    radius_px = radius_um / mpp
    suffixes = (*POINT_SUFFIXES, *LABEL_SUFFIXES)
    results: list[PointResult] = []
    for name, pf, tf in pair_files(pred, truth, suffixes, suffixes):
        t_xy, t_cls = _read_points(tf)
        p_xy, p_cls = _read_points(pf)
        typed = t_cls is not None and p_cls is not None and any(c is not None for c in p_cls)
        results.append(
            point_detection(
                t_xy, p_xy, radius_px, t_cls if typed else None, p_cls if typed else None, name=name
            )
        )
    out = summarize_points(results, aggregate)  # type: ignore[arg-type]
    out.update({"radius_um": radius_um, "mpp": mpp, "radius_px": radius_px})
    return out


# ------------------------------------------------------------------------------------------------ report


def _finite_or_none(x: object) -> object:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    return x


def write_summary(summary: Mapping[str, object], out: str | Path) -> Path:
    """Write ``summary`` as strict JSON (an undefined score, NaN, as null) to ``out``: under a temporary name
    beside it, renamed when complete, so a file with the final name is always whole.  A failed write (a full
    disk) leaves nothing behind and raises :class:`~histopan.errors.OutputError`."""
    import os

    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    text = json.dumps(_finite_or_none(summary), indent=2, allow_nan=False) + "\n"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"writing the results failed: {exc.strerror or exc}", path=out,
                          fix="free some space in the output folder (or choose another), then run again") from exc
    return out


def _fmt(x: object) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4f}"
    return str(x)


def format_table(summary: Mapping[str, object]) -> str:
    """A plain-text table of a summary from :func:`evaluate` or :func:`evaluate_points`."""
    classes: Mapping[str, Mapping[str, object]] = summary.get("classes") or {}  # type: ignore[assignment]
    points = "precision" in summary["all"]  # type: ignore[operator]
    if points:
        head = ["", "precision", "recall", "f1", "tp", "fp", "fn"]
        rows = [["all", *(summary["all"][k] for k in head[1:])]]  # type: ignore[index]
        rows += [[n, "", "", c["f1"], c["tp"], c["fp_class"] + c["fp_det"], c["fn_class"] + c["fn_det"]]
                 for n, c in classes.items()]
    else:
        head = ["", "pq", "sq", "rq", "tp", "fp", "fn"]
        rows = [[n, *(c[k] for k in head[1:])] for n, c in classes.items()]
        for key in ("things", "stuff", "all"):
            rows.append([key, *(summary[key][k] for k in head[1:])])  # type: ignore[index]
    cells = [head] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "-" * len(lines[0]))
    tail = [f"aggregate: {summary['aggregate']}, images: {len(summary['images'])}"]  # type: ignore[arg-type]
    for key in ("aji", "aji_plus", "dice", "type_accuracy"):
        if key in summary:
            tail.append(f"{key}: {_fmt(summary[key])}")
    return "\n".join(lines + [", ".join(tail)])
