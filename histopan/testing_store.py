"""Real histopan stores with known content, for tests and benchmarks (no model involved).

:func:`build_test_store` writes a complete (or deliberately incomplete) store through the public store API
(:func:`histopan.store.create_store`, ``write_labels``, ``write_table``, ``build_pyramids``, ``finalize``)
with the attributes the segment pipeline writes (``slide``, ``downsample``, the run's model config with
nucleus types).  It renders the label map chunk by chunk, vectorised, so a store with a million nuclei is
built in a few minutes with bounded memory.

Content, fully determined by the arguments:

- stuff classes from a smooth random field at 1/16 resolution (glass = ``background`` where the field is low,
  then stroma / tumour / necrosis);
- one candidate nucleus per square cell of ``spacing_um``; a candidate inside tissue is kept with a
  probability that depends on the stuff class.  Each nucleus is a rotated ellipse with a three-lobed radial
  ripple (so some outlines are slightly concave), confined to its own cell: neighbours may touch but never
  overlap, and nuclei cross chunk borders.  Nucleus ids are ``cell index + 1`` (sparse, as in real stores).
- the nucleus table has the store contract's columns.  Area, centroid, bounding box and eccentricity (from
  the second moments, as :func:`skimage.measure.regionprops` defines it) are exact for the painted pixels;
  the perimeter is the pixel-edge length times pi/4 and the solidity is a proxy (area over the area of the
  moment ellipse, capped at 1), adequate for a fixture but not what the pipeline measures.
- an RGB overview at ``image_mpp``: H&E-like colours averaged from the labels, or, with ``slide=``, the real
  slide read at that resolution (the labels then stay synthetic).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from os import PathLike

import numpy as np

from histopan.classes import ClassSpec
from histopan.store import SlideStore, create_store

CLASSES = (
    ClassSpec("background", (255, 255, 255), "stuff", id=0),
    ClassSpec("stroma", (240, 160, 200), "stuff", id=1),
    ClassSpec("necrosis", (120, 120, 40), "stuff", id=2),
    ClassSpec("tumour", (200, 40, 40), "stuff", id=3),
    ClassSpec("nucleus", (40, 40, 220), "thing", id=4),
)
NUCLEUS_TYPES = ({"name": "epithelial", "color": [220, 60, 60]},
                 {"name": "fibroblast", "color": [0, 160, 0]},
                 {"name": "inflammatory", "color": [250, 200, 0]})
_KEEP = np.array([0.0, 0.55, 0.25, 0.9])  # probability of a nucleus per cell, by stuff class
_TYPE_P = np.array([[1, 0, 0], [0.05, 0.6, 0.35], [0.1, 0.2, 0.7], [0.85, 0.05, 0.1]])  # type given stuff
_HE = np.array([[245, 245, 245], [235, 165, 200], [215, 185, 205], [205, 130, 180], [95, 55, 150]], np.float32)
_FIELD = 16  # stuff field resolution (label px per field px)


@dataclass(frozen=True)
class _Layout:
    shape: tuple[int, int]
    spacing: int  # cell size in label px
    stuff_field: np.ndarray  # (H/16, W/16) uint8 class ids
    keep: np.ndarray  # (rows, cols) bool
    cx: np.ndarray  # nucleus centre in label px (float64), per cell
    cy: np.ndarray
    a: np.ndarray  # semi-axes in label px
    b: np.ndarray
    cos_t: np.ndarray
    sin_t: np.ndarray
    cos_p: np.ndarray  # ripple phase
    sin_p: np.ndarray

    @property
    def grid(self) -> tuple[int, int]:
        return self.keep.shape  # type: ignore[return-value]


def _layout(shape: tuple[int, int], spacing: int, seed: int) -> _Layout:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    h, w = shape
    fh, fw = -(-h // _FIELD), -(-w // _FIELD)
    smooth = max(2.0, min(fh, fw) / 6)
    tissue = ndimage.gaussian_filter(rng.standard_normal((fh, fw)), smooth, mode="wrap")
    kinds = ndimage.gaussian_filter(rng.standard_normal((3, fh, fw)), (0, smooth / 2, smooth / 2), mode="wrap")
    field = (1 + np.argmax(kinds * np.array([1.0, 0.6, 1.0])[:, None, None], axis=0)).astype(np.uint8)
    field[tissue < np.quantile(tissue, 0.2)] = 0
    rows, cols = h // spacing, w // spacing
    cell_y = (np.arange(rows)[:, None] + 0.5) * spacing
    cell_x = (np.arange(cols)[None, :] + 0.5) * spacing
    stuff_at = field[np.minimum((cell_y // _FIELD).astype(int), fh - 1),
                     np.minimum((cell_x // _FIELD).astype(int), fw - 1)]
    keep = rng.random((rows, cols)) < _KEEP[stuff_at]
    s = float(spacing)
    a = rng.uniform(0.24, 0.37, (rows, cols)) * s
    b = a * rng.uniform(0.6, 1.0, (rows, cols))
    theta = rng.uniform(0, np.pi, (rows, cols))
    psi = rng.uniform(0, 2 * np.pi, (rows, cols))
    jitter = 0.05 * s
    cy = cell_y + rng.uniform(-jitter, jitter, (rows, cols))
    cx = cell_x + rng.uniform(-jitter, jitter, (rows, cols))
    return _Layout(shape, spacing, field, keep, cx, cy, a, b, np.cos(theta), np.sin(theta), np.cos(psi),
                   np.sin(psi))


def _render(lay: _Layout, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus ids (uint32) and stuff classes (uint8) of the label-px window [y0, y0+h) x [x0, x0+w).

    Pixels outside the store's shape are background (both maps 0)."""
    yy = np.arange(y0, y0 + h)[:, None]
    xx = np.arange(x0, x0 + w)[None, :]
    rows, cols = lay.grid
    r = yy // lay.spacing
    c = xx // lay.spacing
    valid = (r >= 0) & (r < rows) & (c >= 0) & (c < cols)
    rc = np.clip(r, 0, rows - 1)
    cc = np.clip(c, 0, cols - 1)
    rb, cb = np.broadcast_arrays(rc, cc)
    dx = (xx + 0.5) - lay.cx[rb, cb]
    dy = (yy + 0.5) - lay.cy[rb, cb]
    ct, st = lay.cos_t[rb, cb], lay.sin_t[rb, cb]
    u = (dx * ct + dy * st) / lay.a[rb, cb]
    v = (-dx * st + dy * ct) / lay.b[rb, cb]
    rho2 = u * u + v * v
    rho = np.sqrt(rho2) + 1e-12
    cphi, sphi = u / rho, v / rho
    c3 = 4 * cphi**3 - 3 * cphi
    s3 = 3 * sphi - 4 * sphi**3
    ripple = 1.0 + 0.12 * (c3 * lay.cos_p[rb, cb] - s3 * lay.sin_p[rb, cb])
    inside = (rho < ripple) & lay.keep[rb, cb] & valid
    inshape = (yy >= 0) & (yy < lay.shape[0]) & (xx >= 0) & (xx < lay.shape[1])
    inside &= inshape
    nuclei = np.where(inside, (rb * cols + cb + 1).astype(np.uint32), np.uint32(0))
    fy = np.clip(yy // _FIELD, 0, lay.stuff_field.shape[0] - 1)
    fx = np.clip(xx // _FIELD, 0, lay.stuff_field.shape[1] - 1)
    stuff = np.where(inshape, lay.stuff_field[fy, fx], np.uint8(0)).astype(np.uint8)
    return nuclei, stuff


class _Accumulator:
    """Per-cell sums over painted pixels, accumulated chunk by chunk (exact, bounded memory)."""

    def __init__(self, n_cells: int) -> None:
        self.n = np.zeros(n_cells, np.float64)
        self.sx = np.zeros(n_cells)
        self.sy = np.zeros(n_cells)
        self.sxx = np.zeros(n_cells)
        self.syy = np.zeros(n_cells)
        self.sxy = np.zeros(n_cells)
        self.edges = np.zeros(n_cells)
        self.x0 = np.full(n_cells, np.iinfo(np.int64).max)
        self.y0 = np.full(n_cells, np.iinfo(np.int64).max)
        self.x1 = np.full(n_cells, -1, np.int64)
        self.y1 = np.full(n_cells, -1, np.int64)

    def add(self, padded: np.ndarray, y0: int, x0: int) -> None:
        core = padded[1:-1, 1:-1]
        ys, xs = np.nonzero(core)
        cell = core[ys, xs].astype(np.int64) - 1
        gy, gx = ys + y0, xs + x0
        size = self.n.size
        self.n += np.bincount(cell, minlength=size)
        fx, fy = gx.astype(np.float64), gy.astype(np.float64)
        self.sx += np.bincount(cell, fx, size)
        self.sy += np.bincount(cell, fy, size)
        self.sxx += np.bincount(cell, fx * fx, size)
        self.syy += np.bincount(cell, fy * fy, size)
        self.sxy += np.bincount(cell, fx * fy, size)
        np.minimum.at(self.x0, cell, gx)
        np.minimum.at(self.y0, cell, gy)
        np.maximum.at(self.x1, cell, gx)
        np.maximum.at(self.y1, cell, gy)
        # pixel edges to a different label, counted for the core pixel's label
        for shifted in (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]):
            m = (core != 0) & (core != shifted)
            self.edges += np.bincount(core[m].astype(np.int64) - 1, minlength=size)


def build_test_store(
    path: str | PathLike[str],
    *,
    shape: tuple[int, int] = (768, 1024),
    mpp: float = 0.5,
    slide_mpp: float = 0.25,
    chunk: int = 256,
    spacing_um: float = 10.0,
    seed: int = 0,
    with_types: bool = True,
    complete: bool = True,
    slide: str | PathLike[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SlideStore:
    """Write a store with synthetic labels at ``path`` and return it (see the module docstring).

    ``shape`` is the label map size in label pixels at ``mpp``; the slide is ``shape * mpp / slide_mpp``
    level-0 pixels at ``slide_mpp``.  With ``slide`` (a real slide file), the slide's identity, size and mpp
    are recorded instead, ``shape`` is derived from them and the RGB overview is read from the slide.
    ``complete=False`` stops before ``finalize`` (an interrupted run: pyramids and table written, not marked
    complete).  ``progress(done, total)`` is called after each label chunk row.
    """
    reader = None
    if slide is not None:
        from histopan.slide import open_slide

        reader = open_slide(slide)
        slide_mpp = reader.require_mpp()
        w0, h0 = reader.dimensions
        ds = mpp / slide_mpp
        shape = (int(math.ceil(h0 / ds)), int(math.ceil(w0 / ds)))
        identity, slide_path, slide_name = reader.identity, str(reader.path), reader.path.name
        width0, height0 = int(w0), int(h0)
    else:
        ds = mpp / slide_mpp
        identity = hashlib.sha256(f"histopan-test-slide:{shape}:{mpp}:{slide_mpp}:{seed}".encode()).hexdigest()[:32]
        slide_name = f"synthetic-{seed}.svs"
        slide_path = f"/synthetic/{slide_name}"
        width0, height0 = int(round(shape[1] * ds)), int(round(shape[0] * ds))
    try:
        spacing = max(8, int(round(spacing_um / mpp)))
        lay = _layout(shape, spacing, seed)
        image_mpp = max(mpp * 4, 2.0)
        factor = image_mpp / mpp
        image_shape = (max(1, int(shape[0] / factor)), max(1, int(shape[1] / factor)))
        types = list(NUCLEUS_TYPES) if with_types else []
        run = {"key": {"slide": identity, "seed": seed},
               "model": {"name": "synthetic", "path": "histopan.testing_store", "weights_sha256": "0" * 64,
                         "config": {"name": "synthetic", "mpp": mpp,
                                    "classes": [c.to_json() for c in CLASSES],
                                    "nucleus_types": types}},
               "options": {"generator": "histopan.testing_store.build_test_store", "seed": seed,
                           "spacing_um": spacing_um}}
        store = create_store(path, shape=shape, mpp=mpp, chunk=chunk, classes=CLASSES, image_shape=image_shape,
                             image_mpp=image_mpp, name=slide_name, run=run)
        store.update_attrs(slide={"identity": identity, "path": slide_path, "name": slide_name, "mpp": slide_mpp,
                                   "width": width0, "height": height0, "vendor": "synthetic",
                                   "objective_power": 10.0 / slide_mpp},
                            downsample=ds)
        rows, cols = lay.grid
        acc = _Accumulator(rows * cols)
        h, w = shape
        n_rows = -(-h // chunk)
        stuff_px = np.zeros(len(CLASSES), np.int64)
        for i, y in enumerate(range(0, h, chunk)):
            for x in range(0, w, chunk):
                ch, cw = min(chunk, h - y), min(chunk, w - x)
                padded, stuff = _render(lay, y - 1, x - 1, ch + 2, cw + 2)
                acc.add(padded, y, x)
                nuclei = padded[1:-1, 1:-1]
                semantic = stuff[1:-1, 1:-1].copy()
                semantic[nuclei > 0] = 4
                store.write_labels(y, x, semantic, nuclei)
                stuff_px += np.bincount(semantic.ravel(), minlength=len(CLASSES))
            if progress is not None:
                progress(i + 1, n_rows)
        _write_image(store, lay, reader, factor, image_mpp)
        table = _table(lay, acc, mpp, ds, slide_mpp, with_types, seed)
        store.write_table(table)
        store.build_pyramids()
        if complete:
            area_mm2 = {c.name: float(stuff_px[c.id]) * (mpp * 1e-3) ** 2 for c in CLASSES}
            store.finalize(n_nuclei=int(len(table)), stuff_area_mm2=area_mm2, generator="build_test_store")
        return store
    finally:
        if reader is not None:
            reader.close()


def _write_image(store: SlideStore, lay: _Layout, reader, factor: float, image_mpp: float, block: int = 512) -> None:
    arr = store.group["0"]
    _, ih, iw = arr.shape
    if reader is not None:
        w0, h0 = reader.dimensions
        ds0 = image_mpp / reader.require_mpp()
        for y in range(0, ih, block):
            for x in range(0, iw, block):
                bh, bw = min(block, ih - y), min(block, iw - x)
                lw, lh = min(bw * ds0, w0 - x * ds0), min(bh * ds0, h0 - y * ds0)
                store.write_image_level0(y, x, reader.read_region(x * ds0, y * ds0, lw, lh, mpp=image_mpp,
                                                                  out_size=(bw, bh)))
        return
    f = int(round(factor))
    for y in range(0, ih, block):
        for x in range(0, iw, block):
            bh, bw = min(block, ih - y), min(block, iw - x)
            nuclei, stuff = _render(lay, y * f, x * f, bh * f, bw * f)
            cls = np.where(nuclei > 0, 4, stuff)
            rgb = _HE[cls]
            rgb = rgb.reshape(bh, f, bw, f, 3).mean(axis=(1, 3))
            store.write_image_level0(y, x, np.clip(np.round(rgb), 0, 255).astype(np.uint8))


def _table(lay: _Layout, acc: _Accumulator, mpp: float, ds: float, slide_mpp: float, with_types: bool,
           seed: int):
    import pandas as pd

    cells = np.flatnonzero(acc.n > 0)
    n = acc.n[cells]
    cx = acc.sx[cells] / n
    cy = acc.sy[cells] / n
    mu20 = acc.sxx[cells] / n - cx * cx
    mu02 = acc.syy[cells] / n - cy * cy
    mu11 = acc.sxy[cells] / n - cx * cy
    half = (mu20 + mu02) / 2
    root = np.sqrt(np.maximum(((mu20 - mu02) / 2) ** 2 + mu11**2, 0))
    l1, l2 = half + root, np.maximum(half - root, 0)
    ecc = np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / np.where(l1 > 0, l1, 1), 0, 1)), 0.0)
    area_um2 = n * mpp * mpp
    perim_um = acc.edges[cells] * (np.pi / 4) * mpp
    circ = np.minimum(4 * np.pi * area_um2 / perim_um**2, 1.0)
    ellipse_px = np.pi * 4 * np.sqrt(l1 * l2)  # pi * a * b with a, b = 2 sqrt(eigenvalue)
    solidity = np.clip(np.where(ellipse_px > 0, n / np.maximum(ellipse_px, 1e-9), 1.0), 0, 1)
    rng = np.random.default_rng(seed + 1)
    cols = lay.grid[1]
    r, c = cells // cols, cells % cols
    stuff = lay.stuff_field[np.minimum((lay.cy[r, c] // _FIELD).astype(int), lay.stuff_field.shape[0] - 1),
                            np.minimum((lay.cx[r, c] // _FIELD).astype(int), lay.stuff_field.shape[1] - 1)]
    names = np.array([cl.name for cl in CLASSES], dtype=object)
    x0_level0 = (cx + 0.5) * ds
    y0_level0 = (cy + 0.5) * ds
    if with_types:
        cum = np.cumsum(_TYPE_P[stuff], axis=1)
        t = (rng.random(cells.size)[:, None] > cum).sum(axis=1)
        type_col = np.array([tt["name"] for tt in NUCLEUS_TYPES], dtype=object)[np.minimum(t, 2)]
        type_prob = rng.uniform(0.5, 0.99, cells.size)
    else:
        type_col = np.full(cells.size, None, dtype=object)
        type_prob = np.full(cells.size, np.nan)
    return pd.DataFrame({
        "id": (cells + 1).astype(np.uint32), "centroid_x": x0_level0, "centroid_y": y0_level0,
        "centroid_x_um": x0_level0 * slide_mpp, "centroid_y_um": y0_level0 * slide_mpp,
        "area_um2": area_um2, "perimeter_um": perim_um, "eccentricity": ecc, "solidity": solidity,
        "circularity": circ, "nucleus_prob": rng.uniform(0.6, 0.99, cells.size), "type": type_col,
        "type_prob": type_prob, "stuff_class": names[stuff],
        "bbox_x": acc.x0[cells], "bbox_y": acc.y0[cells],
        "bbox_w": acc.x1[cells] - acc.x0[cells] + 1, "bbox_h": acc.y1[cells] - acc.y0[cells] + 1,
        "cut": np.zeros(cells.size, bool),
    })
