"""Load predictions and truth from disk and evaluate them with :mod:`histopan.metrics` (``histopan evaluate``).

This is the only evaluation module that touches paths.  Accepted inputs (the same kind on both sides):

* a label image (``.tif`` / ``.tiff`` / ``.png``): one nucleus instance map, 0 = background;
* a folder of label images, paired by file stem (``<dir>/<name>.tif``); every file needs its counterpart;
* a histopan zarr store (zarr v3 group with ``labels/semantic/0`` class ids and ``labels/nuclei/0`` instance
  ids, root attribute ``histopan = {"classes": [...], "complete": true, ...}``), read region by region so a
  whole slide never sits in memory;
* for points: GeoJSON point files (QuPath export) or instance maps (their centroids), single or in folders;
* for tissue maps (``--semantic``): a store or label images of class values against label images, with class
  maps that say what the values mean (:func:`evaluate_semantic`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    semantic_confusion,
    semantic_scores,
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


# ------------------------------------------------------------------------------------------- tissue maps
#
# Semantic (tissue map) scores: per-class IoU, precision and recall, pixel accuracy and the confusion matrix
# (histopan.metrics.semantic_confusion / semantic_scores), with classes matched by name.  A class map tells what
# a label image's values mean ("0=background,255=tumour" or a YAML / JSON file); values it does not list are not
# counted.  A store names its own classes; its nucleus pixels count as the tissue class under each nucleus (the
# nucleus table's stuff_class) unless the truth's map names the nucleus class.

#: suffixes of class map files (``--semantic-map``)
MAP_SUFFIXES = (".yaml", ".yml", ".json")
_MAP_FIX = 'write VALUE=CLASS pairs separated by commas, e.g. "0=background,255=tumour", or name a .yaml or .json ' \
           'file holding such a mapping'


@dataclass(frozen=True)
class ClassMap:
    """What the values of a label image mean: ``values`` (sorted, int64) and the class name of each."""

    values: np.ndarray
    names: tuple[str, ...]
    source: str  # the option or the file it came from (for messages)

    def as_json(self) -> dict[str, str]:
        return {str(int(v)): n for v, n in zip(self.values, self.names)}

    def indices(self, labels: np.ndarray, classes: Sequence[str]) -> np.ndarray:
        """int64 array of the shape of ``labels``: the index in ``classes`` of each pixel's class, -1 where the
        value is not in the map."""
        lookup = np.array([classes.index(n) for n in self.names], np.int64)
        flat = np.asarray(labels).reshape(-1).astype(np.int64)
        pos = np.clip(np.searchsorted(self.values, flat), 0, self.values.size - 1)
        return np.where(self.values[pos] == flat, lookup[pos], -1).reshape(np.shape(labels))


def parse_class_map(spec: str | Mapping[object, object], what: str = "--semantic-map") -> ClassMap:
    """A :class:`ClassMap` from ``"VALUE=CLASS,..."``, a path to a YAML / JSON file of ``{value: class}``, or such a
    mapping.  Bad syntax raises :class:`~histopan.errors.DataError` naming ``what`` (or the file), the value and
    the fix."""
    source = what
    if isinstance(spec, Mapping):
        pairs = list(spec.items())
    elif "=" in spec:
        pairs = []
        for item in spec.split(","):
            if not item.strip():
                continue
            value, sep, name = item.partition("=")
            if not sep or "=" in name:
                raise DataError(f"{what}: an entry is not VALUE=CLASS", value=item.strip(), fix=_MAP_FIX)
            pairs.append((value.strip(), name.strip()))
    elif Path(spec).suffix.lower() in MAP_SUFFIXES:
        path = Path(spec)
        source = str(path)
        if not path.is_file():
            raise DataError(f"{what}: no such class map file", path=path, fix=_MAP_FIX)
        import yaml

        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
            raise DataError(f"{what}: cannot read the class map: {exc}", path=path, fix=_MAP_FIX) from exc
        if not isinstance(data, Mapping):
            raise DataError(f"{what}: a class map file must hold a mapping of label values to class names", path=path,
                            value=type(data).__name__, fix=_MAP_FIX)
        pairs = list(data.items())
    else:
        raise DataError(f"{what}: not a class map", value=spec, fix=_MAP_FIX)
    where = None if source == what else source  # the file, named in messages
    values: dict[int, str] = {}
    for value, name in pairs:
        number = None
        if not isinstance(value, (bool, float)):
            try:
                number = int(str(value).strip())
            except ValueError:
                number = None
        if number is None or number < 0:
            raise DataError(f"{what}: a label value must be a whole number >= 0", path=where, value=value,
                            fix=_MAP_FIX)
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{what}: label value {number} has no class name", path=where, value=name, fix=_MAP_FIX)
        if number in values:
            raise DataError(f"{what}: label value {number} is given twice", path=where,
                            value=f"{values[number]}, {name.strip()}", fix="give each label value one class")
        values[number] = name.strip()
    if not values:
        raise DataError(f"{what}: the class map is empty", path=where,
                        value=spec if where is None and isinstance(spec, str) else None, fix=_MAP_FIX)
    order = sorted(values)
    return ClassMap(np.array(order, np.int64), tuple(values[v] for v in order), source)


def _check_names(truth_map: ClassMap, classes: Sequence[str], where: str) -> None:
    unknown = [n for n in dict.fromkeys(truth_map.names) if n not in classes]
    if unknown:
        value = next(int(v) for v, n in zip(truth_map.values, truth_map.names) if n == unknown[0])
        raise DataError(f"{truth_map.source}: class {unknown[0]!r} (label value {value}) is not a class of {where}",
                        value=unknown[0],
                        fix=f"use one of {', '.join(classes)}, or leave value {value} out of the map to ignore it")


def _stuff_under_nuclei(store: Any, thing: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted nucleus ids of a store and the class id of the stuff under each (its table's stuff_class)."""
    ids_by_name = {c.name: c.id for c in store.classes}
    if not store.has_table:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    table = store.read_table(columns=["id", "stuff_class"])
    ids = table["id"].to_numpy(np.int64)
    under = np.array([ids_by_name.get(n, thing) for n in table["stuff_class"]], np.int64)
    order = np.argsort(ids)
    return ids[order], under[order]


def _store_level(store: Any, shape: tuple[int, int], truth_path: Path) -> int:
    group = store.group["labels/semantic"]
    levels = len(group.attrs["ome"]["multiscales"][0]["datasets"])
    shapes = [tuple(group[str(k)].shape) for k in range(levels)]
    if tuple(shape) in shapes:
        return shapes.index(tuple(shape))
    h, w = shapes[0]
    raise DataError("the truth's size matches no level of the store's labels", path=truth_path,
                    value={"truth": f"{shape[1]} x {shape[0]} px",
                           "store levels": [f"{b} x {a}" for a, b in shapes]},
                    fix=f"write the truth at the store's label resolution ({w} x {h} px at {store.mpp:.4g} um/px) "
                        "or at one of its pyramid levels (each half the one before)")


@dataclass
class SemanticResult:
    """The confusion matrix of one image (rows truth, columns prediction, over ``classes``) and the pixels left
    out because the truth's or the prediction's value is not in its class map."""

    name: str
    classes: tuple[str, ...]
    confusion: np.ndarray
    ignored_truth: int = 0
    ignored_pred: int = 0


def _confusion(truth_idx: np.ndarray, pred_idx: np.ndarray, n: int) -> tuple[np.ndarray, int, int]:
    ignored_truth = int((truth_idx < 0).sum())
    unknown_pred = (pred_idx < 0) & (truth_idx >= 0)
    conf = semantic_confusion(truth_idx, np.where(pred_idx < 0, 0, pred_idx), n, ignore=pred_idx < 0)
    return conf, ignored_truth, int(unknown_pred.sum())


def evaluate_semantic_store(pred: str | Path, truth: str | Path, truth_map: ClassMap | None = None,
                            region_px: int = DEFAULT_REGION_PX) -> SemanticResult:
    """The tissue map of a store (``pred``) against one truth label image of the same slide, at the store's label
    resolution or a level of its pyramid (read region by region).  ``truth_map`` (default: the store's class ids)
    says what the truth's values mean."""
    from histopan import store as store_mod

    truth = Path(truth)
    st = store_mod.open_store(pred)
    store_classes = st.classes
    thing = next((c for c in store_classes if c.kind == "thing"), None)
    if truth_map is None:  # the truth holds the store's tissue class ids
        truth_map = parse_class_map({c.id: c.name for c in store_classes if c.kind == "stuff"}, "the store's classes")
    names = [c.name for c in store_classes]
    _check_names(truth_map, names, f"the prediction {Path(pred).name} ({', '.join(names)})")
    keep_thing = thing is not None and thing.name in truth_map.names
    classes = tuple(n for c, n in zip(store_classes, names) if c.kind == "stuff" or keep_thing)
    store_map = parse_class_map({c.id: c.name for c in store_classes if c.name in classes}, "the store's classes")
    t = read_label_image(truth)
    level = _store_level(st, t.shape, truth)
    semantic = st.group[f"labels/semantic/{level}"]
    nuclei = st.group[f"labels/nuclei/{level}"]
    ids, under = _stuff_under_nuclei(st, thing.id if thing is not None else -1)
    n = len(classes)
    total = np.zeros((n, n), np.int64)
    ignored_truth = ignored_pred = 0
    for ys, xs in regions(semantic.shape, semantic.chunks, region_px):
        sem = semantic[ys, xs].astype(np.int64)
        if thing is not None and not keep_thing and ids.size:
            nuc = nuclei[ys, xs].astype(np.int64)
            at = (sem == thing.id) & (nuc > 0)
            pos = np.clip(np.searchsorted(ids, nuc[at]), 0, ids.size - 1)
            sem[at] = np.where(ids[pos] == nuc[at], under[pos], thing.id)
        conf, it, ip = _confusion(truth_map.indices(t[ys, xs], list(classes)), store_map.indices(sem, list(classes)), n)
        total += conf
        ignored_truth += it
        ignored_pred += ip
    return SemanticResult(truth.name, classes, total, ignored_truth, ignored_pred)


def evaluate_semantic_files(pred: Path, truth: Path, truth_map: ClassMap,
                            pred_map: ClassMap | None = None) -> list[SemanticResult]:
    """Tissue maps in label-image files or folders (paired by stem): ``truth_map`` says what the truth's values
    mean, ``pred_map`` the prediction's (default: the same)."""
    pred_map = pred_map or truth_map
    classes = tuple(dict.fromkeys(pred_map.names))
    if pred_map is not truth_map:
        _check_names(truth_map, classes, f"the prediction's map {pred_map.source} ({', '.join(classes)})")
    results = []
    for name, pf, tf in pair_files(pred, truth, LABEL_SUFFIXES, LABEL_SUFFIXES):
        p_arr, t_arr = read_label_image(pf), read_label_image(tf)
        if p_arr.shape != t_arr.shape:
            raise DataError("prediction and truth differ in size", path=pf,
                            value={"pred": p_arr.shape, "truth": t_arr.shape, "truth_file": str(tf)},
                            fix="predict at the resolution of the truth labels")
        conf, it, ip = _confusion(truth_map.indices(t_arr, list(classes)), pred_map.indices(p_arr, list(classes)),
                                  len(classes))
        results.append(SemanticResult(name, classes, conf, it, ip))
    return results


def summarize_semantic(results: Sequence[SemanticResult], aggregate: str = "dataset") -> dict[str, object]:
    """Scores of tissue maps (JSON-ready, undefined values as None): ``classes`` (per class IoU, precision,
    recall, truth and predicted pixels), ``mean_iou``, ``pixel_accuracy``, ``pixels``, the summed ``confusion``
    (rows truth, columns prediction), the pixels ``ignored`` (values not in a class map) and ``images``.  With
    ``aggregate="dataset"`` the confusion matrices are summed before scoring; with ``"per-image"`` the scores are
    the mean over images (of those where a score is defined)."""
    if aggregate not in ("dataset", "per-image"):
        raise DataError("unknown aggregation", value=aggregate, fix="use dataset or per-image")
    if not results:
        raise DataError("nothing to evaluate: no images", fix="give at least one pair of label maps")
    names = list(results[0].classes)
    total = sum((r.confusion for r in results), np.zeros((len(names), len(names)), np.int64))
    whole = semantic_scores(total, names)
    per_image = [semantic_scores(r.confusion, names) for r in results]
    if aggregate == "dataset":
        classes = whole["per_class"]
        mean_iou, accuracy = whole["mean_iou"], whole["pixel_accuracy"]
    else:
        def mean(values: Iterable[object]) -> float | None:
            defined = [float(v) for v in values if v is not None]  # type: ignore[arg-type]
            return float(np.mean(defined)) if defined else None

        classes = {n: {**whole["per_class"][n],  # type: ignore[index]
                       **{k: mean(s["per_class"][n][k] for s in per_image)  # type: ignore[index]
                          for k in ("iou", "precision", "recall")}} for n in names}
        mean_iou = mean(s["mean_iou"] for s in per_image)
        accuracy = mean(s["pixel_accuracy"] for s in per_image)
    return {
        "aggregate": aggregate, "mode": "semantic", "classes": classes, "mean_iou": mean_iou,
        "pixel_accuracy": accuracy, "pixels": whole["pixels"],
        "confusion": {"rows": "truth", "columns": "prediction", "classes": names, "matrix": whole["confusion"]},
        "ignored": {"truth_pixels": sum(r.ignored_truth for r in results),
                    "pred_pixels": sum(r.ignored_pred for r in results)},
        "images": [{"name": r.name, "mean_iou": s["mean_iou"], "pixel_accuracy": s["pixel_accuracy"],
                    "pixels": s["pixels"], "iou": s["iou"], "ignored_truth_pixels": r.ignored_truth,
                    "ignored_pred_pixels": r.ignored_pred} for r, s in zip(results, per_image)],
    }


def evaluate_semantic(pred: str | Path, truth: str | Path, truth_map: str | Mapping[object, object] | None = None,
                      pred_map: str | Mapping[object, object] | None = None, aggregate: str = "dataset",
                      region_px: int = DEFAULT_REGION_PX) -> dict[str, object]:
    """Score tissue maps (``histopan evaluate --semantic``): a store or label images (``pred``) against label
    images (``truth``), classes matched by name.  ``truth_map`` (see :func:`parse_class_map`) says what the
    truth's values mean (for a store: by default its class ids), and of label-image predictions too unless
    ``pred_map`` is given; values a map does not list are not counted.  Returns :func:`summarize_semantic` with
    the maps used."""
    pred, truth = Path(pred), Path(truth)
    for p in (pred, truth):
        if not p.exists():
            raise DataError("input not found", path=p, fix="check the path")
    t_map = None if truth_map is None else parse_class_map(truth_map, "--semantic-map")
    p_map = None if pred_map is None else parse_class_map(pred_map, "--pred-map")
    if is_store(truth):
        raise DataError("the truth of a tissue map must be label images (PNG or TIFF)", path=truth,
                        fix="pass a label image, or a folder of them, as --truth")
    if is_store(pred):
        if truth.is_dir():
            raise DataError("a store holds one slide: compare it with one truth label image, not a folder",
                            path=truth, fix="pass the slide's truth label image as --truth")
        if p_map is not None:
            raise DataError("--pred-map is for label-image predictions; a store names its own classes", path=pred,
                            fix="leave out --pred-map")
        results = [evaluate_semantic_store(pred, truth, t_map, region_px)]
        maps: dict[str, object] = {"truth": t_map.as_json() if t_map else "the store's tissue class ids",
                                   "pred": "the store's classes"}
    else:
        if t_map is None:
            raise DataError("label images need a class map: what do their values mean?", path=truth,
                            fix='pass --semantic-map, e.g. --semantic-map "0=background,1=stroma,255=tumour"')
        results = evaluate_semantic_files(pred, truth, t_map, p_map)
        maps = {"truth": t_map.as_json(), "pred": (p_map or t_map).as_json()}
    out = summarize_semantic(results, aggregate)
    out["class_maps"] = maps
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


def _columns(cells: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def _format_semantic(summary: Mapping[str, object]) -> str:
    classes: Mapping[str, Mapping[str, object]] = summary["classes"]  # type: ignore[assignment]
    head = ["", "iou", "precision", "recall", "truth px", "pred px"]
    keys = ("iou", "precision", "recall", "truth_pixels", "pred_pixels")
    lines = _columns([head] + [[n, *(_fmt(c[k]) for k in keys)] for n, c in classes.items()])
    confusion: Mapping[str, object] = summary["confusion"]  # type: ignore[assignment]
    names: list[str] = confusion["classes"]  # type: ignore[assignment]
    matrix: list[list[int]] = confusion["matrix"]  # type: ignore[assignment]
    ignored: Mapping[str, int] = summary["ignored"]  # type: ignore[assignment]
    lines.append(f"aggregate: {summary['aggregate']}, images: {len(summary['images'])}, "  # type: ignore[arg-type]
                 f"mean_iou: {_fmt(summary['mean_iou'])}, pixel_accuracy: {_fmt(summary['pixel_accuracy'])}, "
                 f"pixels: {summary['pixels']} (not counted: {ignored['truth_pixels']} of the truth's, "
                 f"{ignored['pred_pixels']} of the prediction's, values outside the class maps)")
    lines.append("")
    lines.append("confusion matrix (pixels; rows: truth, columns: prediction)")
    lines += _columns([["truth \\ pred", *names]] + [[n, *map(str, row)] for n, row in zip(names, matrix)])
    return "\n".join(lines)


def format_table(summary: Mapping[str, object]) -> str:
    """A plain-text table of a summary from :func:`evaluate`, :func:`evaluate_points` or
    :func:`evaluate_semantic`."""
    if summary.get("mode") == "semantic":
        return _format_semantic(summary)
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
