"""Quality control of a store: overlays, full-resolution crops, plots and one self-contained HTML report.

:func:`qc_report` writes into ``out_dir``:

- ``overview.png``: the slide thumbnail (the store's RGB overview) with the tissue classes tinted, nucleus
  outlines and a legend;
- ``crop_<k>.png``: full-resolution crops (at the labels' mpp) where nuclei are densest, the H&E beside the
  same crop with tinted classes and nucleus outlines; read from the slide when ``slide`` is given, else
  upsampled from the store's overview;
- ``areas.png`` (area per tissue class), ``nucleus_sizes.png`` (nucleus area distribution, per type when
  the model predicts types), ``density.png`` (nuclei per mm^2 over the slide);
- ``<slide name>.html``: all of the above embedded as base64 PNGs with the run's provenance (store attributes),
  and the tissue area check: the area of the tissue classes (every class but background, nuclei included)
  beside the area of the tissue detector's mask, with a warning (also logged) when they differ by more than
  :data:`TISSUE_AREA_TOLERANCE` (:func:`tissue_area_check`), and the outlier check: objects far larger than
  the slide's median nucleus, or large and elongated or ragged, counted, with a warning when they are many or
  huge (:func:`outlier_check`);
- ``outlier_<k>.png``: crops centred on the largest outlier objects.

Memory stays bounded: the nucleus table is read in record batches, the labels at a pyramid level of at most
:data:`THUMB_MAX` pixels a side, and each crop alone.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import os
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from histopan.checks import check_output
from histopan.classes import BACKGROUND
from histopan.errors import OutputError, SlideError, StoreError
from histopan.store import SlideStore, open_store

log = logging.getLogger(__name__)

THUMB_MAX = 2048  # longest side of the overview, pixels
CROP_UM = 200.0  # side of a crop in microns
TINT_ALPHA = 0.4
OUTLINE = (0, 0, 0)  # nucleus outline colour on the overlays
HIGHLIGHT = (255, 220, 0)  # the outline of the object an outlier crop is about
OUTLINE_MAX_MPP = 1.0  # coarser overviews fill nuclei with the nucleus class colour instead of outlining them
DENSITY_CELL_UM = 100.0
SIZE_BINS_UM2 = np.arange(0, 202, 2.0)
#: the tissue classes' area and the tissue mask's may differ by this fraction of the mask's before QC warns
TISSUE_AREA_TOLERANCE = 0.10
#: outlier objects (:func:`outlier_check`): "huge" above this many times the slide's median nucleus area ...
HUGE_TIMES_MEDIAN = 8.0
#: ... and above this area in um^2 (a slide of small nuclei does not make ordinary ones huge)
HUGE_MIN_UM2 = 150.0
#: "irregular": at least this many times the median area, and elongated or ragged:
IRREGULAR_TIMES_MEDIAN = 2.0
#: elongated: eccentricity at least this (major / minor axis about 5 or more)
ELONGATED_ECCENTRICITY = 0.98
#: ragged: circularity (4 pi area / perimeter^2) below this (a nucleus is 0.5 - 1; strings of keratin lamellae
#: and torn tissue outlined as one object are far below)
RAGGED_CIRCULARITY = 0.25
#: QC warns when the outliers are more than this fraction of the nuclei, or when any object is huge
OUTLIER_WARN_FRACTION = 0.005
OUTLIER_CROPS = 4
OUTLIER_CROP_UM = 80.0


@dataclass
class QcResult:
    """What :func:`qc_report` wrote, and its tissue area check (:func:`tissue_area_check`)."""

    html: Path
    images: dict[str, Path] = field(default_factory=dict)
    crops: list[tuple[float, float, float, float]] = field(default_factory=list)  # level-0 x, y, w, h
    tissue: dict[str, Any] = field(default_factory=dict)
    outliers: dict[str, Any] = field(default_factory=dict)


def _save_figure(fig, path: Path) -> Path:
    """Lay out, save and close a matplotlib figure; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _tint(rgb: np.ndarray, semantic: np.ndarray, colors: dict[int, tuple[int, int, int]]) -> np.ndarray:
    out = rgb.astype(np.float32)
    for cid, color in colors.items():
        m = semantic == cid
        if m.any():
            out[m] = (1 - TINT_ALPHA) * out[m] + TINT_ALPHA * np.asarray(color, np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _outline(rgb: np.ndarray, nuclei: np.ndarray, color: tuple[int, int, int] = OUTLINE) -> np.ndarray:
    from skimage.segmentation import find_boundaries

    out = rgb.copy()
    out[find_boundaries(nuclei, mode="inner")] = color
    return out


def _resize_nearest(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    ys = np.minimum((np.arange(shape[0]) + 0.5) * a.shape[0] / shape[0], a.shape[0] - 1).astype(int)
    xs = np.minimum((np.arange(shape[1]) + 0.5) * a.shape[1] / shape[1], a.shape[1] - 1).astype(int)
    return a[ys][:, xs]


def _level_for(group, shape: tuple[int, int], max_side: int) -> int:
    levels = len(group.attrs["ome"]["multiscales"][0]["datasets"])
    level = 0
    while level < levels - 1 and max(-(-shape[0] // 2**level), -(-shape[1] // 2**level)) > max_side:
        level += 1
    return level


def _stuff_colors(store: SlideStore) -> dict[int, tuple[int, int, int]]:
    return {c.id: c.color for c in store.classes if c.kind == "stuff" and c.id != 0}


def _thing_color(store: SlideStore) -> tuple[int, int, int]:
    return next((c.color for c in store.classes if c.kind == "thing"), (40, 40, 220))


def _legend_handles(store: SlideStore, filled: bool = False):
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=np.asarray(c.color) / 255, edgecolor="0.3", label=c.name)
               for c in store.classes if c.kind == "stuff" and c.id != 0]
    if filled:
        handles.append(Patch(facecolor=np.asarray(_thing_color(store)) / 255, label="nuclei (filled at this scale)"))
    else:
        handles.append(Line2D([], [], color=np.asarray(OUTLINE) / 255, lw=1.5, label="nucleus outline"))
    return handles


def _overview(store: SlideStore, out: Path) -> None:
    import matplotlib.pyplot as plt

    img_level = _level_for(store.group, store.group["0"].shape[1:], THUMB_MAX)
    rgb = np.moveaxis(store.group[str(img_level)][:], 0, -1)
    lab_level = _level_for(store.group["labels/semantic"], store.shape, THUMB_MAX)
    # the finest label level not smaller than the thumbnail, so outlines are drawn from real nuclei
    while lab_level > 0 and store.group[f"labels/semantic/{lab_level}"].shape[0] < rgb.shape[0]:
        lab_level -= 1
    sem = _resize_nearest(store.group[f"labels/semantic/{lab_level}"][:], rgb.shape[:2])
    nuc = _resize_nearest(store.group[f"labels/nuclei/{lab_level}"][:], rgb.shape[:2])
    mpp_img = store.attrs["image_mpp"] * 2**img_level
    over = _tint(rgb, sem, _stuff_colors(store))
    filled = mpp_img > OUTLINE_MAX_MPP
    if filled:  # nuclei are a few pixels here: outlines would hide them, so fill them instead
        over[nuc > 0] = _thing_color(store)
    else:
        over = _outline(over, nuc)
    h, w = over.shape[:2]
    fig_w = 10.0
    fig, ax = plt.subplots(figsize=(fig_w, max(3.0, fig_w * h / w)), dpi=120)
    ax.imshow(over, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"{store.attrs.get('slide', {}).get('name', store.path.name)}: tissue classes and nuclei "
                 f"({mpp_img:.2g} um/px)")
    ax.legend(handles=_legend_handles(store, filled), loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)


def _table_batches(store: SlideStore, columns: list[str]):
    """The nucleus table's ``columns`` (those it has) batch by batch; nothing for a store without a table."""
    if not store.has_table:
        return
    table = store.nucleus_table()
    yield from table.batches([c for c in columns if c in table.columns], batch_size=262144)


def _density_grid(store: SlideStore, slide: dict[str, Any]) -> tuple[np.ndarray, float]:
    cell_px = DENSITY_CELL_UM / float(slide["mpp"])
    shape = (max(1, math.ceil(slide["height"] / cell_px)), max(1, math.ceil(slide["width"] / cell_px)))
    counts = np.zeros(shape, np.int64)
    for batch in _table_batches(store, ["centroid_x", "centroid_y"]):
        cx = batch.column("centroid_x").to_numpy()
        cy = batch.column("centroid_y").to_numpy()
        iy = np.clip((cy / cell_px).astype(int), 0, shape[0] - 1)
        ix = np.clip((cx / cell_px).astype(int), 0, shape[1] - 1)
        np.add.at(counts, (iy, ix), 1)
    return counts / (DENSITY_CELL_UM * 1e-3) ** 2, cell_px


def _crop_sites(density: np.ndarray, cell_px: float, crop_px0: float, width: int, height: int,
                n: int) -> list[tuple[float, float, float, float]]:
    """Level-0 boxes centred on the densest density cells, at least one crop apart."""
    sites: list[tuple[float, float, float, float]] = []
    order = np.argsort(density, axis=None)[::-1]
    for flat in order:
        if len(sites) >= n or density.flat[flat] <= 0:
            break
        iy, ix = np.unravel_index(flat, density.shape)
        cx, cy = (ix + 0.5) * cell_px, (iy + 0.5) * cell_px
        if any(abs(cx - (x + w / 2)) < w and abs(cy - (y + h / 2)) < h for x, y, w, h in sites):
            continue
        w = min(crop_px0, width)
        h = min(crop_px0, height)
        x = float(np.clip(cx - w / 2, 0, width - w))
        y = float(np.clip(cy - h / 2, 0, height - h))
        sites.append((x, y, w, h))
    return sites


def _crop(store: SlideStore, reader, box: tuple[float, float, float, float], ds: float, out: Path,
          index: int, label: str = "", highlight: int | None = None) -> None:
    """One crop figure: H&E beside tinted classes and nucleus outlines; the object ``highlight`` (an id of the
    store's nucleus labels) outlined in :data:`HIGHLIGHT` on both."""
    import matplotlib.pyplot as plt

    x, y, w, h = box
    ly0, lx0 = int(y / ds), int(x / ds)
    ly1 = min(int(math.ceil((y + h) / ds)), store.shape[0])
    lx1 = min(int(math.ceil((x + w) / ds)), store.shape[1])
    sem = store.semantic[ly0:ly1, lx0:lx1]
    nuc = store.nuclei[ly0:ly1, lx0:lx1]
    bx, by, bw, bh = lx0 * ds, ly0 * ds, (lx1 - lx0) * ds, (ly1 - ly0) * ds
    if reader is not None:
        width, height = reader.dimensions
        bw, bh = min(bw, width - bx), min(bh, height - by)
        rgb = reader.read_region(bx, by, bw, bh, out_size=(lx1 - lx0, ly1 - ly0))
        source = "slide"
    else:
        f = store.attrs["image_mpp"] / store.mpp
        img = store.group["0"]
        iy0, ix0 = int(ly0 / f), int(lx0 / f)
        iy1 = min(int(math.ceil(ly1 / f)) + 1, img.shape[1])
        ix1 = min(int(math.ceil(lx1 / f)) + 1, img.shape[2])
        part = np.moveaxis(img[:, iy0:iy1, ix0:ix1], 0, -1)
        ys = np.clip(((np.arange(ly0, ly1) + 0.5) / f - iy0).astype(int), 0, part.shape[0] - 1)
        xs = np.clip(((np.arange(lx0, lx1) + 0.5) / f - ix0).astype(int), 0, part.shape[1] - 1)
        rgb = part[ys][:, xs]
        source = "store overview, upsampled"
    over = _outline(_tint(rgb, sem, _stuff_colors(store)), nuc)
    if highlight is not None:
        target = (nuc == highlight).view(np.uint8)
        rgb, over = _outline(rgb, target, HIGHLIGHT), _outline(over, target, HIGHLIGHT)
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.4), dpi=110)
    for ax, im, title in zip(axes, (rgb, over), ("H&E", "classes + nucleus outlines")):
        ax.imshow(im, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(title)
    n_nuclei = len(np.unique(nuc)) - (1 if (nuc == 0).any() else 0)
    fig.suptitle(f"{label or f'crop {index}'}: level-0 x={bx:.0f}, y={by:.0f}, {bw:.0f} x {bh:.0f} px at "
                 f"{store.mpp:.3g} um/px ({n_nuclei} nuclei; image: {source})")
    fig.legend(handles=_legend_handles(store), loc="lower center", ncol=6, frameon=False)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)


def _stuff_areas(store: SlideStore) -> dict[str, float]:
    summary = store.attrs.get("summary", {}).get("stuff_area_mm2")
    if isinstance(summary, dict) and summary:
        return {k: float(v) for k, v in summary.items()}
    counts = np.zeros(256, np.int64)
    sem = store.semantic
    chunk = int(store.attrs.get("chunk", 1024))
    for y in range(0, sem.shape[0], chunk):
        counts += np.bincount(sem[y:y + chunk, :].ravel(), minlength=256)
    return {c.name: float(counts[c.id]) * (store.mpp * 1e-3) ** 2 for c in store.classes}


def tissue_area_check(store: SlideStore, reader: Any = None) -> dict[str, Any]:
    """The tissue classes' area against the tissue mask's, in mm^2.

    ``classes_mm2``: every stuff class but background; ``nuclei_mm2``: the nucleus class (nuclei lie in tissue;
    leaving them out would understate the tissue by their share, 14 % on the quick start's slide);
    ``labelled_mm2``: both; ``mask_mm2``: the tissue detector's mask as the run kept it, else (a run with
    ``--min-tissue 0``, or an older store) computed from ``reader`` when given, else None.  ``ratio`` is
    labelled / mask and ``warning`` a sentence when they differ by more than :data:`TISSUE_AREA_TOLERANCE` (also
    logged), else None.
    """
    areas = _stuff_areas(store)
    stuff = [c.name for c in store.classes if c.kind == "stuff" and c.name != BACKGROUND]
    things = [c.name for c in store.classes if c.kind == "thing"]
    classes = float(sum(areas.get(n, 0.0) for n in stuff))
    nuclei = float(sum(areas.get(n, 0.0) for n in things))
    mask = store.attrs.get("tissue", {}).get("mask_area_mm2")
    source = "the run's tissue mask"
    if mask is None and reader is not None:
        from histopan.slide.tissue import tissue_mask

        slide = store.attrs["slide"]  # the mask covers the slide exactly; its pixel size is the run's
        mask = tissue_mask(reader).fraction * slide["width"] * slide["height"] * float(slide["mpp"]) ** 2 * 1e-6
        source = "the tissue mask of the slide, detected for this report"
    out: dict[str, Any] = {"classes_mm2": classes, "nuclei_mm2": nuclei, "labelled_mm2": classes + nuclei,
                           "per_class_mm2": {n: float(areas.get(n, 0.0)) for n in stuff},
                           "mask_mm2": None if mask is None else float(mask), "mask_source": None, "ratio": None,
                           "tolerance": TISSUE_AREA_TOLERANCE, "warning": None}
    if mask is None:
        return out
    out["mask_source"] = source
    labelled = classes + nuclei
    ratio = labelled / mask if mask > 0 else (math.inf if labelled > 0 else 1.0)
    out["ratio"] = ratio
    if abs(ratio - 1.0) > TISSUE_AREA_TOLERANCE:
        more = "more" if ratio > 1 else "less"
        out["warning"] = (f"the tissue classes cover {labelled:.3f} mm² ({classes:.3f} mm² of tissue classes and "
                          f"{nuclei:.3f} mm² of nuclei), {abs(ratio - 1):.0%} {more} than the tissue mask's "
                          f"{mask:.3f} mm²: check the overview for tissue classes painted over glass or tissue "
                          f"left as background")
        log.warning("%s: %s", store.path, out["warning"])
    return out


def _median_area(store: SlideStore) -> tuple[float, int]:
    """The median nucleus area (um^2, to 0.1 %: from a log-spaced histogram, so memory stays bounded however
    many nuclei the slide has) and the number of nuclei."""
    edges = np.geomspace(1e-3, 1e7, 23026)  # 0.1 % wide bins
    counts = np.zeros(edges.size + 1, np.int64)
    for batch in _table_batches(store, ["area_um2"]):
        area = batch.column("area_um2").to_numpy(zero_copy_only=False)
        counts += np.bincount(np.searchsorted(edges, area), minlength=counts.size)
    n = int(counts.sum())
    if n == 0:
        return math.nan, 0
    k = int(np.searchsorted(np.cumsum(counts), (n + 1) / 2))
    lo = edges[k - 1] if k > 0 else 0.0
    hi = edges[k] if k < edges.size else edges[-1]
    return float(math.sqrt(lo * hi) if lo > 0 else hi), n


def outlier_check(store: SlideStore, examples: int = 50) -> dict[str, Any]:
    """Objects that are unlikely to be single nuclei, from the nucleus table's shape columns.

    Thresholds are relative to the slide's own median nucleus area (``median_area_um2``):

    - ``huge``: more than :data:`HUGE_TIMES_MEDIAN` times the median and :data:`HUGE_MIN_UM2`;
    - ``irregular``: at least :data:`IRREGULAR_TIMES_MEDIAN` times the median, and elongated (eccentricity at
      least :data:`ELONGATED_ECCENTRICITY`) or ragged (circularity below :data:`RAGGED_CIRCULARITY`), and not huge.

    Such objects are mostly artefacts outlined as nuclei (keratin lamellae, folds, torn edges, ink) or merged
    nuclei; some are real (giant tumour cells).  ``examples`` lists the largest outliers (id, level-0
    centroid, area, eccentricity, circularity, reason), at most ``examples`` of them; ``warning`` is a sentence
    (also logged) when any object is huge or the outliers exceed :data:`OUTLIER_WARN_FRACTION` of the
    nuclei, else None.  Object colour is not checked: the table has no colour column.
    """
    median, n = _median_area(store)
    out: dict[str, Any] = {"n_nuclei": n, "median_area_um2": None if n == 0 else median, "huge": 0,
                           "irregular": 0, "examples": [], "warning": None,
                           "thresholds": {"huge_um2": None, "irregular_um2": None,
                                          "eccentricity": ELONGATED_ECCENTRICITY, "circularity": RAGGED_CIRCULARITY}}
    if n == 0:
        return out
    huge_um2 = max(HUGE_TIMES_MEDIAN * median, HUGE_MIN_UM2)
    irregular_um2 = IRREGULAR_TIMES_MEDIAN * median
    out["thresholds"].update(huge_um2=huge_um2, irregular_um2=irregular_um2)
    columns = ["id", "centroid_x", "centroid_y", "area_um2", "eccentricity", "circularity"]
    kept: list[dict[str, Any]] = []
    store.nucleus_table().require(columns)  # the store contract's columns
    for batch in _table_batches(store, columns):
        cols = {c: batch.column(c).to_numpy(zero_copy_only=False) for c in columns}
        area = cols["area_um2"]
        huge = area > huge_um2
        shape = (cols["eccentricity"] >= ELONGATED_ECCENTRICITY) | (cols["circularity"] < RAGGED_CIRCULARITY)
        irregular = ~huge & (area >= irregular_um2) & shape
        out["huge"] += int(huge.sum())
        out["irregular"] += int(irregular.sum())
        for i in np.flatnonzero(huge | irregular):
            kept.append({"id": int(cols["id"][i]), "x": float(cols["centroid_x"][i]), "y": float(cols["centroid_y"][i]),
                         "area_um2": float(area[i]), "eccentricity": float(cols["eccentricity"][i]),
                         "circularity": float(cols["circularity"][i]), "reason": "huge" if huge[i] else "irregular"})
        kept = sorted(kept, key=lambda r: -r["area_um2"])[:examples]
    out["examples"] = kept
    total = out["huge"] + out["irregular"]
    if out["huge"] or total > OUTLIER_WARN_FRACTION * n:
        out["warning"] = (f"{total} of {n} objects are outliers ({out['huge']} huge: above {huge_um2:.0f} µm², "
                          f"{out['irregular']} irregular: elongated or ragged and above {irregular_um2:.0f} µm²); they "
                          f"are often artefacts outlined as nuclei (keratin, folds, ink) or merged nuclei: see the "
                          f"outlier crops")
        log.warning("%s: %s", store.path, out["warning"])
    return out


def _outlier_boxes(check: dict[str, Any], slide: dict[str, Any],
                   n: int) -> list[tuple[tuple[float, float, float, float], dict[str, Any]]]:
    """Level-0 boxes of :data:`OUTLIER_CROP_UM` centred on the largest outliers, one crop apart, each with its
    outlier (a row of the check's ``examples``)."""
    side = OUTLIER_CROP_UM / float(slide["mpp"])
    width, height = int(slide["width"]), int(slide["height"])
    w, h = min(side, width), min(side, height)
    boxes: list[tuple[tuple[float, float, float, float], dict[str, Any]]] = []
    for row in check["examples"]:
        if len(boxes) >= n:
            break
        if any(abs(row["x"] - (x + bw / 2)) < bw and abs(row["y"] - (y + bh / 2)) < bh for (x, y, bw, bh), _ in boxes):
            continue
        box = (float(np.clip(row["x"] - w / 2, 0, width - w)), float(np.clip(row["y"] - h / 2, 0, height - h)), w, h)
        boxes.append((box, row))
    return boxes


def _plots(store: SlideStore, density: np.ndarray, cell_um: float, out_dir: Path) -> dict[str, Path]:
    import matplotlib.pyplot as plt

    paths: dict[str, Path] = {}
    stuff = [c for c in store.classes if c.kind == "stuff" and c.id != 0]
    areas = _stuff_areas(store)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    names = [c.name for c in stuff]
    values = [areas.get(n, 0.0) for n in names]
    bars = ax.bar(names, values, color=[np.asarray(c.color) / 255 for c in stuff], edgecolor="0.3")
    ax.bar_label(bars, fmt="%.3g")
    ax.set_ylabel("area (mm²)")
    ax.set_title("area per tissue class")
    paths["areas"] = _save_figure(fig, out_dir / "areas.png")

    hist: dict[str, np.ndarray] = {}
    over = 0
    for batch in _table_batches(store, ["area_um2", "type"]):
        area = batch.column("area_um2").to_numpy(zero_copy_only=False)
        over += int((area >= SIZE_BINS_UM2[-1]).sum())
        if "type" in batch.schema.names:
            types = np.array(batch.column("type").to_pylist(), dtype=object)
        else:
            types = np.full(area.size, None, dtype=object)
        for t in {None if v is None else str(v) for v in types.tolist()}:
            sel = types == t if t is not None else np.array([v is None for v in types.tolist()])
            key = t or "nucleus"
            hist[key] = hist.get(key, 0) + np.histogram(area[sel], SIZE_BINS_UM2)[0]
    type_colors = {t["name"]: np.asarray(t["color"]) / 255
                   for t in store.attrs.get("run", {}).get("model", {}).get("config", {}).get("nucleus_types", [])}
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    centers = (SIZE_BINS_UM2[:-1] + SIZE_BINS_UM2[1:]) / 2
    bottom = np.zeros(centers.size)
    for key in sorted(hist):
        ax.bar(centers, hist[key], width=np.diff(SIZE_BINS_UM2), bottom=bottom, label=key,
               color=type_colors.get(key), edgecolor="none")
        bottom += hist[key]
    ax.set_xlabel("nucleus area (µm²)")
    ax.set_ylabel("nuclei")
    total = int(bottom.sum()) + over
    ax.set_title(f"nucleus size distribution ({total} nuclei" + (f", {over} above the range)" if over else ")"))
    if hist:
        ax.legend(frameon=False)
    paths["nucleus_sizes"] = _save_figure(fig, out_dir / "nucleus_sizes.png")

    fig, ax = plt.subplots(figsize=(6.4, 5), dpi=110)
    cell_mm = cell_um * 1e-3
    extent = (0, density.shape[1] * cell_mm, density.shape[0] * cell_mm, 0)
    im = ax.imshow(density, cmap="magma", interpolation="nearest", extent=extent)
    fig.colorbar(im, ax=ax, label="nuclei / mm²", shrink=0.8)
    ax.set_title(f"nucleus density ({cell_um:g} µm cells)")
    ax.set_xlabel("x (mm)")
    ax.set_ylabel("y (mm)")
    paths["density"] = _save_figure(fig, out_dir / "density.png")
    return paths


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _tissue_html(check: dict[str, Any]) -> tuple[list[tuple[str, str]], str]:
    """Rows for the report's table and a warning paragraph (empty when none) of a :func:`tissue_area_check`."""
    parts = ", ".join(f"{n} {a:.3f}" for n, a in check["per_class_mm2"].items() if a > 0) or "none"
    rows = [("tissue classes", f"{check['labelled_mm2']:.3f} mm² ({parts}; nuclei {check['nuclei_mm2']:.3f})")]
    if check["mask_mm2"] is None:
        rows.append(("tissue mask", "not recorded (a run with --min-tissue 0, or an older store): pass --slide to "
                                    "compute it"))
        return rows, ""
    rows.append(("tissue mask", f"{check['mask_mm2']:.3f} mm² ({check['mask_source']})"))
    verdict = "warning" if check["warning"] else f"within {check['tolerance']:.0%}"
    rows.append(("tissue area check", f"tissue classes / tissue mask = {check['ratio']:.0%} ({verdict})"))
    warning = f'<p class="warning">Warning: {html.escape(check["warning"])}.</p>' if check["warning"] else ""
    return rows, warning


def _outlier_html(check: dict[str, Any]) -> tuple[list[tuple[str, str]], str]:
    """Rows for the report's table and a warning paragraph (empty when none) of an :func:`outlier_check`."""
    if not check.get("n_nuclei"):
        return [], ""
    t = check["thresholds"]
    rows = [("outlier objects", f"{check['huge']} huge (above {t['huge_um2']:.0f} µm²), {check['irregular']} irregular "
                                f"(above {t['irregular_um2']:.0f} µm² and eccentricity >= {t['eccentricity']:g} or "
                                f"circularity < {t['circularity']:g}); median nucleus {check['median_area_um2']:.1f} µm²")]
    warning = f'<p class="warning">Warning: {html.escape(check["warning"])}.</p>' if check["warning"] else ""
    return rows, warning


def _html(store: SlideStore, images: dict[str, Path], crops: list[Path], name: str,
          tissue: dict[str, Any] | None = None, outliers: dict[str, Any] | None = None,
          outlier_crops: list[Path] | None = None) -> str:
    attrs = store.attrs
    slide = attrs.get("slide", {})
    model = attrs.get("run", {}).get("model", {})
    summary = attrs.get("summary", {})
    rows = [
        ("store", str(store.path)), ("complete", str(store.complete)),
        ("slide", f"{slide.get('path', '?')} (identity {slide.get('identity', '?')})"),
        ("slide size", f"{slide.get('width', '?')} x {slide.get('height', '?')} px at {slide.get('mpp', '?')} um/px"),
        ("labels", f"{store.shape[1]} x {store.shape[0]} px at {store.mpp:.4g} um/px"),
        ("model", f"{model.get('name', '?')} (weights sha256 {str(model.get('weights_sha256', '?'))[:16]}...)"),
        ("histopan", str(attrs.get("histopan_version", "?"))),
        ("nuclei", str(summary.get("n_nuclei", "?"))),
    ]
    tissue_rows, warning = _tissue_html(tissue) if tissue is not None else ([], "")
    rows += tissue_rows
    outlier_rows, outlier_warning = _outlier_html(outliers) if outliers is not None else ([], "")
    rows += outlier_rows
    warning += outlier_warning
    table = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)

    def img(path: Path, alt: str) -> str:
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{_b64(path)}">'

    def figures(paths: list[Path], none: str) -> str:
        return "\n".join(f"<figure>{img(p, p.stem)}<figcaption>{html.escape(p.stem)}</figcaption></figure>"
                         for p in paths) or f"<p>{none}</p>"

    crops_html = figures(crops, "No nuclei: no crops.")
    outlier_html = figures(outlier_crops or [], "No outlier objects.")
    provenance = json.dumps({k: v for k, v in attrs.items() if k != "classes"}, indent=2, default=str)
    classes = ", ".join(f"{c.name} ({c.kind}, rgb{tuple(c.color)})" for c in store.classes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>histopan QC: {html.escape(name)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1400px; }}
img {{ max-width: 100%; border: 1px solid #ccc; }}
table {{ border-collapse: collapse; }} th, td {{ text-align: left; padding: 2px 10px; border-bottom: 1px solid #eee; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 1em; }} .plots img {{ max-width: 32%; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 80%; }}
.warning {{ background: #fff3cd; border: 1px solid #e0b000; padding: 0.5em 1em; }}
</style></head><body>
<h1>histopan QC: {html.escape(name)}</h1>
{warning}
<table>{table}</table>
<p>Classes: {html.escape(classes)}</p>
<h2>Overview</h2>
{img(images['overview'], 'overview')}
<h2>Plots</h2>
<div class="plots">{img(images['areas'], 'areas')}{img(images['nucleus_sizes'], 'nucleus sizes')}{img(images['density'], 'density')}</div>
<h2>Full-resolution crops</h2>
{crops_html}
<h2>Outlier objects (largest first)</h2>
{outlier_html}
<h2>Provenance (store attributes)</h2>
<pre>{html.escape(provenance)}</pre>
</body></html>
"""


def qc_report(store_path: str | PathLike[str], out_dir: str | PathLike[str], *,
              slide: str | PathLike[str] | None = None, n_crops: int = 4, partial: bool = False) -> QcResult:
    """Write the QC images and the HTML report of one store into ``out_dir`` (see the module docstring).

    Raises :class:`~histopan.errors.StoreError` for a missing or incomplete store (unless ``partial``),
    :class:`~histopan.errors.SlideError` when ``slide`` is not the slide the store was made from, and
    :class:`~histopan.errors.OutputError` when ``out_dir`` cannot be created or written.
    """
    import matplotlib

    matplotlib.use("Agg")
    store = open_store(store_path, partial=partial)
    attrs = store.attrs
    slide_attrs = attrs.get("slide")
    if not isinstance(slide_attrs, dict) or "mpp" not in slide_attrs:
        raise StoreError("the store has no slide attributes (mpp, size)", path=store.path,
                         fix="run qc on a store written by 'histopan segment' of this histopan version")
    ds = float(attrs.get("downsample") or store.mpp / float(slide_attrs["mpp"]))
    outliers = outlier_check(store)  # reads the table only: a table without the contract's columns stops here
    reader = None
    if slide is not None:
        from histopan.slide import open_slide

        reader = open_slide(slide)
        if reader.identity != slide_attrs.get("identity"):
            reader.close()
            raise SlideError("this is not the slide the store was made from (identities differ)", path=slide,
                             value=reader.identity,
                             fix=f"pass the slide {slide_attrs.get('path', '?')} (identity {slide_attrs.get('identity')})"
                                 " or leave out --slide")
    try:
        out = check_output(out_dir, folder=True, create=True)
    except OutputError:
        if reader is not None:
            reader.close()
        raise
    name = Path(str(slide_attrs.get("name") or store.path.stem)).stem
    report = out / f"{name}.html"
    tmp = out / f".{report.name}.part"
    written: list[Path] = []
    try:
        images: dict[str, Path] = {"overview": out / "overview.png"}
        written.append(images["overview"])  # before writing: a half-written file is removed too
        _overview(store, images["overview"])
        density, cell_px = _density_grid(store, slide_attrs)
        crop_px0 = CROP_UM / float(slide_attrs["mpp"])
        sites = _crop_sites(density, cell_px, crop_px0, int(slide_attrs["width"]), int(slide_attrs["height"]),
                            n_crops)
        crop_paths = []
        for k, box in enumerate(sites, start=1):
            p = out / f"crop_{k}.png"
            written.append(p)
            _crop(store, reader, box, ds, p, k)
            crop_paths.append(p)
        plot_paths = _plots(store, density, DENSITY_CELL_UM, out)
        written.extend(plot_paths.values())
        images.update(plot_paths)
        for p in crop_paths:
            images[p.stem] = p
        outlier_paths = []
        for k, (box, row) in enumerate(_outlier_boxes(outliers, slide_attrs, OUTLIER_CROPS), start=1):
            p = out / f"outlier_{k}.png"
            written.append(p)
            _crop(store, reader, box, ds, p, k, label=f"outlier {k} ({row['reason']}, {row['area_um2']:.0f} µm², "
                                                     f"outlined in yellow)", highlight=row["id"])
            outlier_paths.append(p)
            images[p.stem] = p
        tissue = tissue_area_check(store, reader)
        tmp.write_text(_html(store, images, crop_paths, name, tissue, outliers, outlier_paths), encoding="utf-8")
        os.replace(tmp, report)
    except OSError as exc:
        for p in (*written, tmp):
            p.unlink(missing_ok=True)
        raise OutputError(f"writing the QC report failed: {exc.strerror or exc}", path=out,
                          fix="free some space in the output folder (or choose another), then run qc again") from exc
    finally:
        if reader is not None:
            reader.close()
    return QcResult(report, images, sites, tissue, outliers)
