"""Sparse annotations (QuPath objects) -> per-pixel training targets with everything else ignored.

Pure functions of geometries and image shapes; nothing here opens a file.  What each kind of annotation
supervises (sizes in microns, converted with the model's mpp):

- **nucleus polygon** (an annotation whose class maps to the nucleus class or a nucleus type, or any
  detection / cell object): its pixels are "nucleus", a ring of ``ring_um`` around it is "not a nucleus";
  inside polygon + ring the nucleus mask, the centre heatmap (a Gaussian at the polygon's centroid) and the
  boundary map are known; a typed polygon trains the type head on its pixels;
- **nucleus point** (Point / MultiPoint): a disc of ``point_core_um`` is "nucleus"; the centre heatmap is
  known within ``3 * centre_sigma_um`` of the point; a typed point trains the type head on a disc of
  ``type_radius_um``; the boundary is not supervised; with ``complete_points`` (every nucleus of the image
  has a point) the centre heatmap is known on the whole image, 0 away from the points, and every pixel
  farther than ``point_extent_um`` from all points (and outside nucleus polygons) is "not a nucleus" (of a
  region's class inside a region, any stuff class elsewhere), with no boundary;
- **region** (a polygon, or a line / brush stroke buffered to ``line_width_um``, whose class maps to a stuff
  class): its pixels are "that class or a nucleus" (the stuff class applies to the tissue between nuclei,
  see :func:`~histopan.training.losses.stuff_given_tissue_ce`); the background class means "no nucleus".

Every other pixel trains nothing (label set 0, masks False).  Nucleus annotations win over regions; a ring
inside a region is that region's class.  Coordinates follow QuPath: pixel ``(row r, col c)`` covers
``[c, c+1) x [r, r+1)`` of the image it was drawn on, and a pixel is inside a polygon when its centre is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import polygon as draw_polygon

from histopan.errors import AnnotationError
from histopan.training.config import AnnotationGeometry
from histopan.training.targets import boundary_map, class_bits

__all__ = [
    "AnnotationGeometry",
    "ClassMapping",
    "SparseTargets",
    "Target",
    "annotation_counts",
    "check_extent",
    "rasterize_annotations",
    "resolve_classes",
]

#: objectTypes that are nuclei whatever their class (QuPath detections and cells)
NUCLEUS_OBJECT_TYPES = ("detection", "cell")


@dataclass(frozen=True)
class Target:
    """What an annotation class means for the model: ``kind`` is ``"nucleus"`` (with an optional nucleus
    type index) or ``"stuff"`` (with the stuff class index)."""

    kind: str
    index: int | None = None


@dataclass(frozen=True)
class ClassMapping:
    """Annotation class name -> :class:`Target` (``None``: the class is ignored); unclassified objects are
    nuclei (points, detections, cells) or an error (annotation polygons and lines: a region needs a class)."""

    targets: Mapping[str, Target | None]

    def target(self, name: str | None) -> Target | None:
        return self.targets[name] if name is not None else None


def resolve_classes(mapping: Mapping[str, str | None], class_names: Sequence[str], stuff_names: Sequence[str],
                    nucleus_name: str, type_names: Sequence[str], seen: Sequence[str], source: Path | str
                    ) -> ClassMapping:
    """Build the :class:`ClassMapping` of a data set.

    ``mapping`` maps annotation class names to a stuff class, the nucleus class or a nucleus type of the
    model (``null``: ignore the class).  A class name seen in the annotations but not in ``mapping`` maps to
    the model class or type of the same name; any other name is an error listing the choices.
    """
    targets: dict[str, Target | None] = {}
    choices = [*stuff_names, nucleus_name, *type_names]

    def to_target(name: str, value: str) -> Target:
        if value == nucleus_name:
            return Target("nucleus", None)
        if value in type_names:
            return Target("nucleus", list(type_names).index(value))
        if value in stuff_names:
            return Target("stuff", list(class_names).index(value))
        raise AnnotationError(f"annotation class {name!r} maps to {value!r}, which the model does not have",
                              path=source, value=value,
                              fix=f"map it to one of {choices} (or null to ignore it), or add the class under "
                                  "'add_classes' / 'nucleus_types'")

    for name, value in mapping.items():
        targets[name] = None if value is None else to_target(name, value)
    unknown = sorted({n for n in seen if n not in targets and n not in choices})
    if unknown:
        raise AnnotationError("the annotations use classes that the config does not map", path=source,
                              value=unknown,
                              fix=f"map each under 'classes' to one of {choices}, or to null to ignore it")
    for name in seen:
        if name not in targets:
            targets[name] = to_target(name, name)
    return ClassMapping(targets)


def check_extent(annotations: Sequence, width: float, height: float, source: Path | str, what: str,
                 tolerance: float = 1.0) -> None:
    """Every annotation must lie within ``width`` x ``height`` pixels (+- ``tolerance``) of its image."""
    for i, a in enumerate(annotations):
        x0, y0, x1, y1 = a.geometry.bounds
        if x0 < -tolerance or y0 < -tolerance or x1 > width + tolerance or y1 > height + tolerance:
            raise AnnotationError(
                f"annotation {i} ({a.geometry.geom_type}, class {a.class_name!r}) lies outside {what} "
                f"({width:g} x {height:g} px): its bounds are x {x0:.1f}..{x1:.1f}, y {y0:.1f}..{y1:.1f}",
                path=source,
                fix="pair the GeoJSON with the image it was drawn on (coordinates are full-resolution pixels "
                    "of that image, origin top-left)",
            )


@dataclass(frozen=True)
class SparseTargets:
    """Per-pixel targets of one image at the model's mpp (all (H, W)); masks say where each is known.

    ``label_bits`` allowed-class bit sets (0 = no semantic loss, see :mod:`.targets`); ``nucleus``,
    ``centre``, ``boundary`` float32 targets with ``nucleus_valid``, ``centre_valid``, ``boundary_valid``;
    ``types`` int16 nucleus-type index (-1 = not supervised).
    """

    label_bits: np.ndarray
    nucleus: np.ndarray
    nucleus_valid: np.ndarray
    centre: np.ndarray
    centre_valid: np.ndarray
    boundary: np.ndarray
    boundary_valid: np.ndarray
    types: np.ndarray

    def layers(self) -> list[np.ndarray]:
        return [self.label_bits, self.nucleus, self.nucleus_valid, self.centre, self.centre_valid, self.boundary,
                self.boundary_valid, self.types]

    @classmethod
    def from_layers(cls, layers: Sequence[np.ndarray]) -> SparseTargets:
        return cls(*layers)

    @property
    def labelled_pixels(self) -> int:
        return int(((self.label_bits != 0) | self.centre_valid | (self.types >= 0)).sum())


def _fill(mask: np.ndarray, geom, scale: float, offset: tuple[float, float] = (0.0, 0.0)) -> None:
    """Set the pixels of ``mask`` whose centres lie in polygon(s) ``geom`` (coordinates times ``scale``)."""
    import shapely

    h, w = mask.shape
    for part in shapely.get_parts(geom):
        if part.geom_type != "Polygon" or part.is_empty:
            continue
        ext = np.asarray(part.exterior.coords) * scale
        rr, cc = draw_polygon(ext[:, 1] - 0.5 - offset[1], ext[:, 0] - 0.5 - offset[0], (h, w))
        if rr.size == 0:  # smaller than a pixel: its nearest pixel
            cx, cy = ext[:, 0].mean() - offset[0], ext[:, 1].mean() - offset[1]
            r, c = int(np.floor(cy)), int(np.floor(cx))
            if 0 <= r < h and 0 <= c < w:
                mask[r, c] = True
            continue
        inner = np.zeros_like(mask)
        inner[rr, cc] = True
        for ring in part.interiors:
            hole = np.asarray(ring.coords) * scale
            hr, hc = draw_polygon(hole[:, 1] - 0.5 - offset[1], hole[:, 0] - 0.5 - offset[0], (h, w))
            inner[hr, hc] = False
        mask |= inner


def _disc(radius_px: float) -> np.ndarray:
    r = int(np.ceil(radius_px))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (yy * yy + xx * xx) <= radius_px * radius_px + 1e-9


def _stamp(out: np.ndarray, cy: float, cx: float, values: np.ndarray, reduce: str, fill: int | None = None) -> None:
    """Write a centred (2r+1)^2 stamp into ``out`` around pixel (cy, cx), clipped at the borders: the maximum
    (``"max"``), the logical or (``"or"``), or ``fill`` where the boolean stamp is true (``"fill"``)."""
    h, w = out.shape
    r = values.shape[0] // 2
    iy, ix = int(np.floor(cy)), int(np.floor(cx))
    y0, y1, x0, x1 = iy - r, iy + r + 1, ix - r, ix + r + 1
    sy0, sx0 = max(0, -y0), max(0, -x0)
    y0c, x0c, y1c, x1c = max(0, y0), max(0, x0), min(h, y1), min(w, x1)
    if y0c >= y1c or x0c >= x1c:
        return
    block = values[sy0:sy0 + (y1c - y0c), sx0:sx0 + (x1c - x0c)]
    view = out[y0c:y1c, x0c:x1c]
    if reduce == "max":
        np.maximum(view, block, out=view)
    elif reduce == "or":
        view |= block
    elif reduce == "fill":
        view[block] = fill
    else:
        raise ValueError(f"unknown reduce {reduce!r}")


def annotation_counts(annotations: Sequence, mapping: ClassMapping) -> dict[str, int]:
    """How many nucleus points, nucleus polygons and regions a list of annotations holds (ignored left out)."""
    counts = {"points": 0, "polygons": 0, "regions": 0}
    for a in annotations:
        kind = _kind(a, mapping, Path("."), 0)
        if kind is not None:
            counts[kind[0]] += 1
    return counts


def _kind(a, mapping: ClassMapping, source: Path | str, i: int) -> tuple[str, Target] | None:
    """("points" | "polygons" | "regions", target) of one annotation, or None if its class is ignored."""
    gtype = a.geometry.geom_type
    if a.class_name is not None and mapping.targets.get(a.class_name, "missing") is None:
        return None
    target = mapping.target(a.class_name)
    if gtype in ("Point", "MultiPoint"):
        if target is not None and target.kind != "nucleus":
            raise AnnotationError(
                f"annotation {i} is a point with the stuff class {a.class_name!r}; points mark nuclei",
                path=source, fix="draw the region as a polygon or brush stroke, or map the class to a nucleus type")
        return "points", target or Target("nucleus")
    if gtype in ("LineString", "MultiLineString"):
        if target is None or target.kind != "stuff":
            raise AnnotationError(
                f"annotation {i} is a line (brush stroke) with class {a.class_name!r}; lines mark regions of a "
                "tissue class", path=source, fix="classify the stroke with a tissue class (mapped to a stuff class)")
        return "regions", target
    if gtype in ("Polygon", "MultiPolygon"):
        if target is None:
            if a.object_type in NUCLEUS_OBJECT_TYPES:
                return "polygons", Target("nucleus")
            raise AnnotationError(
                f"annotation {i} is an unclassified polygon annotation: histopan cannot tell a nucleus outline "
                "from a tissue region", path=source,
                fix="classify it in QuPath (a nucleus type or a tissue class), or export nuclei as detections")
        return ("polygons" if target.kind == "nucleus" else "regions"), target
    raise AnnotationError(f"annotation {i} has a geometry type training cannot use", path=source, value=gtype,
                          fix="use points, polygons or lines")


def rasterize_annotations(annotations: Sequence, shape: tuple[int, int], scale: float, mpp: float,
                          mapping: ClassMapping, nucleus_index: int, stuff_indices: Sequence[int],
                          geometry: AnnotationGeometry = AnnotationGeometry(),
                          offset: tuple[float, float] = (0.0, 0.0), source: Path | str = "",
                          background_index: int = 0, image: np.ndarray | None = None,
                          complete_points: bool = False) -> SparseTargets:
    """Sparse targets of ``annotations`` on an image of ``shape`` pixels at ``mpp`` (the model's).

    Annotation coordinates are multiplied by ``scale`` (annotation pixels -> image pixels) and shifted by
    ``-offset`` (image pixels).  ``image`` (float RGB 0..1 or uint8), when given, marks bare glass inside
    regions as "no nucleus" (see :func:`histopan.training.data.glass_mask`).
    """
    import shapely

    from histopan.training.data import glass_mask

    h, w = shape
    bits = np.zeros(shape, np.int64)
    nucleus = np.zeros(shape, np.float32)
    nucleus_valid = np.zeros(shape, bool)
    centre = np.zeros(shape, np.float32)
    centre_valid = np.zeros(shape, bool)
    boundary = np.zeros(shape, np.float32)
    boundary_valid = np.zeros(shape, bool)
    types = np.full(shape, -1, np.int16)
    polygon_known = np.zeros(shape, bool)

    stuff_all = class_bits(list(stuff_indices))
    nucleus_bit = class_bits([nucleus_index])
    sigma = geometry.centre_sigma_um / mpp
    g_r = int(np.ceil(3 * sigma))
    yy, xx = np.mgrid[-g_r:g_r + 1, -g_r:g_r + 1].astype(np.float32)
    centre_support = (yy * yy + xx * xx) <= (3 * sigma) ** 2

    regions, polys, points = [], [], []
    for i, a in enumerate(annotations):
        kind = _kind(a, mapping, source, i)
        if kind is None:
            continue
        {"regions": regions, "polygons": polys, "points": points}[kind[0]].append((a, kind[1]))

    # 1. regions: "this class or a nucleus" (background: "no nucleus" at all)
    region_class = np.full(shape, -1, np.int32)
    for a, target in regions:
        geom = a.geometry
        if geom.geom_type in ("LineString", "MultiLineString"):
            geom = shapely.buffer(geom, geometry.line_width_um / 2 / mpp / scale)
        m = np.zeros(shape, bool)
        _fill(m, geom, scale, offset)
        region_class[m] = target.index
    in_region = region_class >= 0
    region_bit = np.int64(1) << np.maximum(region_class, 0).astype(np.int64)
    # "not a nucleus": a region's own class inside a region, any stuff class elsewhere
    not_nucleus_bits = np.where(in_region, region_bit, stuff_all)
    if in_region.any():
        bits[in_region] = region_bit[in_region] | nucleus_bit
        no_nucleus = in_region & (region_class == background_index)
        if image is not None:
            img = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image
            no_nucleus |= in_region & glass_mask(img)
        bits[no_nucleus] = region_bit[no_nucleus]
        nucleus_valid |= no_nucleus
        centre_valid |= no_nucleus
        boundary_valid |= no_nucleus

    # 2. nucleus polygons: instance supervision inside and in a ring around them
    if polys:
        instances = np.zeros(shape, np.int32)
        for k, (a, target) in enumerate(polys, start=1):
            geom = a.nucleus_geometry if a.nucleus_geometry is not None else a.geometry
            m = np.zeros(shape, bool)
            _fill(m, geom, scale, offset)
            instances[m] = k
            if target.index is not None:
                types[m] = target.index
        inside = instances > 0
        ring_px = max(1, int(round(geometry.ring_um / mpp)))
        near = ndi.binary_dilation(inside, structure=_disc(ring_px)) & ~inside
        known = inside | near
        polygon_known |= known
        ids = np.unique(instances[inside])
        if ids.size:
            centres = ndi.center_of_mass(np.ones(shape, np.float32), instances, ids)
            heat = np.zeros(shape, np.float32)
            for cy, cx in centres:
                fy, fx = cy - np.floor(cy), cx - np.floor(cx)
                g = np.exp(-((yy - fy) ** 2 + (xx - fx) ** 2) / (2 * sigma * sigma))
                _stamp(heat, cy, cx, g, "max")
            centre = np.where(known, heat, np.where(centre_valid, centre, 0)).astype(np.float32)
        centre_valid |= known
        boundary = np.where(known, boundary_map(instances), boundary).astype(np.float32)
        boundary_valid |= known
        nucleus = np.where(known, inside.astype(np.float32), nucleus)
        nucleus_valid |= known
        bits = np.where(near, not_nucleus_bits, bits)
        bits = np.where(inside, nucleus_bit, bits)

    # 3. points: a nucleus core, centre heat around it, a typed disc
    if points or complete_points:
        core = _disc(geometry.point_core_um / mpp)
        tdisc = _disc(geometry.type_radius_um / mpp)
        core_mask = np.zeros(shape, bool)
        support = np.zeros(shape, bool)
        heat = np.zeros(shape, np.float32)
        near_point = np.zeros(shape, bool)  # within point_extent_um of a point (complete_points only)
        extent = _disc(geometry.point_extent_um / mpp) if complete_points else None
        for a, target in points:
            for p in shapely.get_parts(a.geometry):
                x = p.x * scale - offset[0]
                y = p.y * scale - offset[1]
                cx, cy = x - 0.5, y - 0.5  # pixel-index coordinates of the point
                if not (-0.5 <= cx < w - 0.5 and -0.5 <= cy < h - 0.5):
                    continue
                icy, icx = int(np.floor(cy + 0.5)), int(np.floor(cx + 0.5))
                fy, fx = cy - icy, cx - icx
                g = np.exp(-((yy - fy) ** 2 + (xx - fx) ** 2) / (2 * sigma * sigma))
                _stamp(heat, icy, icx, g, "max")
                _stamp(support, icy, icx, centre_support, "or")
                _stamp(core_mask, icy, icx, core, "or")
                if complete_points:
                    _stamp(near_point, icy, icx, extent, "or")
                if target.index is not None:
                    _stamp(types, icy, icx, tdisc, "fill", target.index)
        if complete_points:  # no nucleus without a point: the centre map is 0 wherever no point's heat reaches
            support[:] = True
            far = ~near_point & ~polygon_known
            bits = np.where(far, not_nucleus_bits, bits)
            nucleus = np.where(far, np.float32(0), nucleus)
            nucleus_valid |= far
            boundary = np.where(far, np.float32(0), boundary)
            boundary_valid |= far
        centre = np.where(support, np.maximum(heat, np.where(centre_valid, centre, 0)), centre).astype(np.float32)
        centre_valid |= support
        bits = np.where(core_mask, nucleus_bit, bits)
        nucleus = np.where(core_mask, np.float32(1), nucleus)
        nucleus_valid |= core_mask

    return SparseTargets(bits, nucleus.astype(np.float32), nucleus_valid, centre.astype(np.float32), centre_valid,
                         boundary.astype(np.float32), boundary_valid, types)


def tile_targets(shape: tuple[int, int], valid: np.ndarray, class_index: int, nucleus_index: int,
                 no_nucleus: np.ndarray) -> SparseTargets:
    """:class:`SparseTargets` of a one-class tile (see :func:`histopan.training.targets.tile_class_targets`)."""
    from histopan.training.targets import tile_class_targets

    t = tile_class_targets(valid, class_index, nucleus_index, no_nucleus)
    return SparseTargets(t.label_bits, t.nucleus, t.nucleus_valid, t.centre, t.nucleus_valid.copy(), t.boundary,
                         t.nucleus_valid.copy(), np.full(shape, -1, np.int16))
