"""GeoJSON in: the one reader of QuPath GeoJSON files, used by evaluation, training and export.

:func:`read_geojson` reads what QuPath exports (a FeatureCollection, a bare array of Features or one Feature;
classification as a string or an object; Point, MultiPoint, LineString, MultiLineString, Polygon and
MultiPolygon geometries; ``.geojson`` or gzip-compressed) into :class:`Annotation` objects with shapely
geometries.  :func:`read_points_geojson` is the point view of the same reader (point evaluation).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from histopan.errors import AnnotationError

__all__ = ["GEOJSON_SUFFIXES", "OBJECT_TYPES", "Annotation", "read_geojson", "read_points_geojson"]

#: QuPath's object types
OBJECT_TYPES = ("annotation", "detection", "cell", "tile")
#: names a GeoJSON file may have (gzip-compressed when the name ends in .gz)
GEOJSON_SUFFIXES = (".geojson", ".geojson.gz", ".json", ".json.gz")
_GEOMETRY_TYPES = ("Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon")
_POINT_TYPES = ("Point", "MultiPoint")



@dataclass(frozen=True)
class Annotation:
    """One object read from a QuPath GeoJSON file.

    ``geometry`` is a shapely geometry in the file's coordinates (QuPath: level-0 pixels of the image);
    ``object_type`` is QuPath's objectType (``"annotation"`` when the file says nothing);
    ``class_name`` / ``color`` are None for unclassified objects; ``nucleus_geometry`` is set for cells.
    """

    geometry: Any
    object_type: str = "annotation"
    class_name: str | None = None
    color: tuple[int, int, int] | None = None
    id: str | None = None
    name: str | None = None
    measurements: dict[str, float] = field(default_factory=dict)
    nucleus_geometry: Any = None


_READ_FIX = "export the objects again from QuPath (File > Export objects as GeoJSON) or fix the file"


def read_geojson(path: str | PathLike[str]) -> list[Annotation]:
    """Every object of a QuPath GeoJSON file (``.geojson`` or gzip-compressed); see :class:`Annotation`.

    Raises :class:`~histopan.errors.AnnotationError` naming the file, the feature and the fix for a
    missing or unreadable file, text that is not JSON, and features QuPath would not import either
    (unknown geometry type, missing coordinates, a malformed classification).
    """
    p = Path(path)
    if not p.is_file():
        raise AnnotationError("annotation file not found", path=p, fix="check the path and spelling")
    with open(p, "rb") as fh:
        data = fh.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise AnnotationError(f"cannot read the GeoJSON file: the gzip data cannot be read (truncated?): {exc}",
                                  path=p,
                                  fix="copy or export the file again") from exc
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"cannot read the GeoJSON file: not UTF-8 text: {exc}", path=p,
                              fix=_READ_FIX) from exc
    except json.JSONDecodeError as exc:
        raise AnnotationError("cannot read the GeoJSON file: not valid JSON "
                              f"(line {exc.lineno}, column {exc.colno}: {exc.msg})", path=p,
                              fix=_READ_FIX) from exc
    if isinstance(doc, list):
        features = doc
    elif isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features")
        if not isinstance(features, list):
            raise AnnotationError("the FeatureCollection has no 'features' array", path=p, fix=_READ_FIX)
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    else:
        what = doc.get("type") if isinstance(doc, dict) else type(doc).__name__
        raise AnnotationError("expected a GeoJSON FeatureCollection, an array of Features or one Feature",
                              path=p, value=what, fix=_READ_FIX)
    return [_read_feature(f, p, i) for i, f in enumerate(features)]


def _read_geometry(geom: Any, path: Path, where: str):
    import shapely
    from shapely.errors import GEOSException
    from shapely.geometry import shape

    if not isinstance(geom, dict):
        raise AnnotationError(f"{where} has no geometry object", path=path, value=geom, fix=_READ_FIX)
    gtype = geom.get("type")
    if gtype not in _GEOMETRY_TYPES:
        raise AnnotationError(f"{where} has an unsupported geometry type", path=path, value=gtype,
                              fix=f"use one of {list(_GEOMETRY_TYPES)} (convert or remove this object in QuPath)")
    if "coordinates" not in geom or geom["coordinates"] is None:
        raise AnnotationError(f"{where} ({gtype}) has no coordinates", path=path, fix=_READ_FIX)
    try:
        g = shape(geom)
    except (ValueError, TypeError, IndexError, AttributeError, GEOSException) as exc:
        raise AnnotationError(f"{where} ({gtype}) has malformed coordinates: {exc}", path=path,
                              value=str(geom["coordinates"])[:80], fix=_READ_FIX) from exc
    if g.is_empty:
        raise AnnotationError(f"{where} ({gtype}) has empty coordinates", path=path, fix=_READ_FIX)
    coords = shapely.get_coordinates(g)
    finite = np.isfinite(coords).all(axis=1)
    if not finite.all():
        bad = coords[int(np.argmin(finite))]
        raise AnnotationError(f"{where} ({gtype}) has non-finite coordinates (NaN or infinite)", path=path,
                              value=f"{bad[0]}, {bad[1]}", fix="remove or redraw this object, " + _READ_FIX)
    return g


def _read_classification(value: Any, path: Path, where: str) -> tuple[str | None, tuple[int, int, int] | None]:
    if value is None:
        return None, None
    if isinstance(value, str):
        return value, None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise AnnotationError(f"{where} has a classification without a name", path=path, value=value,
                              fix='use "classification": "Tumor" or {"name": "Tumor", "color": [200, 0, 0]}')
    color = value.get("color")
    if color is None and isinstance(value.get("colorRGB"), int):  # QuPath 0.2: packed (A)RGB integer
        rgb = value["colorRGB"] & 0xFFFFFF
        color = [(rgb >> 16) & 255, (rgb >> 8) & 255, rgb & 255]
    if color is not None:
        if not (isinstance(color, list) and len(color) == 3 and all(isinstance(c, int) for c in color)):
            raise AnnotationError(f"{where} has a classification colour that is not [r, g, b]", path=path,
                                  value=color, fix="write the colour as three integers 0..255")
        color = tuple(int(c) for c in color)
    return value["name"], color


def _read_feature(feat: Any, path: Path, index: int) -> Annotation:
    where = f"feature {index}"
    if not isinstance(feat, dict) or feat.get("type") != "Feature":
        raise AnnotationError(f"{where} is not a GeoJSON Feature", path=path,
                              value=feat.get("type") if isinstance(feat, dict) else type(feat).__name__,
                              fix=_READ_FIX)
    props = feat.get("properties") or {}
    if not isinstance(props, dict):
        raise AnnotationError(f"{where} has properties that are not an object", path=path, fix=_READ_FIX)
    geometry = _read_geometry(feat.get("geometry"), path, where)
    object_type = props.get("objectType", props.get("object_type", "annotation"))
    if object_type not in OBJECT_TYPES:
        raise AnnotationError(f"{where} has an unknown objectType", path=path, value=object_type,
                              fix=f"use one of {list(OBJECT_TYPES)}")
    class_name, color = _read_classification(props.get("classification"), path, where)
    measurements: dict[str, float] = {}
    raw = props.get("measurements")
    if isinstance(raw, dict):
        measurements = {str(k): float(v) for k, v in raw.items() if isinstance(v, (int, float))}
    elif isinstance(raw, list):  # older QuPath: [{"name": ..., "value": ...}]
        measurements = {str(m["name"]): float(m["value"]) for m in raw
                        if isinstance(m, dict) and isinstance(m.get("value"), (int, float)) and "name" in m}
    nucleus = None
    if props.get("nucleusGeometry") is not None:
        nucleus = _read_geometry(props["nucleusGeometry"], path, f"{where} nucleusGeometry")
    fid = feat.get("id")
    return Annotation(geometry=geometry, object_type=object_type, class_name=class_name, color=color,
                      id=None if fid is None else str(fid), name=props.get("name"), measurements=measurements,
                      nucleus_geometry=nucleus)


def read_points_geojson(path: str | PathLike[str]) -> tuple[np.ndarray, list[str | None]]:
    """Point coordinates ``(n, 2)`` (x, y in pixels) and class names (``None`` = unclassified) of a GeoJSON
    file of points (Point or MultiPoint features, e.g. QuPath's point export), read with :func:`read_geojson`.

    A feature of another geometry is an :class:`~histopan.errors.AnnotationError` naming it.
    """
    import shapely

    xy: list[np.ndarray] = []
    names: list[str | None] = []
    for i, a in enumerate(read_geojson(path)):
        if a.geometry.geom_type not in _POINT_TYPES:
            raise AnnotationError(f"feature {i} is not a point", path=Path(path), value=a.geometry.geom_type,
                                  fix="export point annotations (Point / MultiPoint geometries)")
        pts = shapely.get_coordinates(a.geometry)
        xy.append(pts)
        names += [a.class_name] * len(pts)
    arr = np.concatenate(xy).astype(np.float64) if xy else np.zeros((0, 2), dtype=np.float64)
    return arr.reshape(-1, 2), names
