"""QuPath GeoJSON export and import: conformance with QuPath's import rules, round trips, bad input."""

from __future__ import annotations

import gzip
import json
import math
import uuid
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from shapely.geometry import shape

from histopan.cli import main
from histopan.errors import AnnotationError, ConfigError, HistopanError, RegionError, StoreError
from histopan.export.contours import outer_rings, trace_rings
from histopan.export.qupath import (ExportOptions, export_qupath, nucleus_uuid, nucleus_uuids, read_geojson,
                                    ring_polygons)
from histopan.store import open_store
from histopan.testing_store import build_test_store

# --------------------------------------------------------------------------------- QuPath's rules as a schema
# From QuPath's GeoJSON import: properties.objectType in annotation / detection / cell / tile; a
# classification is a plain string or an object with both name and color ([r, g, b]); measurements a dict
# of numbers; ids UUID strings; cells may carry nucleusGeometry beside geometry.
_POSITION = {"type": "array", "minItems": 2, "maxItems": 3, "items": {"type": "number"}}
_RING = {"type": "array", "minItems": 4, "items": _POSITION}
_POLYGON = {"type": "object", "required": ["type", "coordinates"],
            "properties": {"type": {"const": "Polygon"}, "coordinates": {"type": "array", "minItems": 1,
                                                                          "items": _RING}}}
_MULTIPOLYGON = {"type": "object", "required": ["type", "coordinates"],
                 "properties": {"type": {"const": "MultiPolygon"},
                                "coordinates": {"type": "array", "minItems": 1,
                                                "items": {"type": "array", "minItems": 1, "items": _RING}}}}
_COLOR = {"type": "array", "minItems": 3, "maxItems": 3, "items": {"type": "integer", "minimum": 0, "maximum": 255}}
FEATURE_SCHEMA = {
    "type": "object",
    "required": ["type", "id", "geometry", "properties"],
    "properties": {
        "type": {"const": "Feature"},
        "id": {"type": "string", "format": "uuid",
               "pattern": "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"},
        "geometry": {"oneOf": [_POLYGON, _MULTIPOLYGON]},
        "properties": {
            "type": "object",
            "required": ["objectType", "classification", "measurements"],
            "properties": {
                "objectType": {"enum": ["annotation", "detection", "cell", "tile"]},
                "classification": {"oneOf": [
                    {"type": "string"},
                    {"type": "object", "required": ["name", "color"],
                     "properties": {"name": {"type": "string", "minLength": 1}, "color": _COLOR}},
                ]},
                "measurements": {"type": "object", "additionalProperties": {"type": "number"}},
                "nucleusGeometry": _POLYGON,
            },
        },
    },
}
COLLECTION_SCHEMA = {"type": "object", "required": ["type", "features"],
                     "properties": {"type": {"const": "FeatureCollection"},
                                    "features": {"type": "array", "items": FEATURE_SCHEMA}}}


def _decimals_ok(coords) -> bool:
    arr = np.asarray(coords, dtype=float)
    return bool(np.all(np.abs(arr * 100 - np.round(arr * 100)) < 1e-6))


def _check_conformance(doc: dict, width: int, height: int) -> None:
    jsonschema.validate(doc, COLLECTION_SCHEMA, format_checker=jsonschema.FormatChecker())
    slide = shapely.box(0, 0, width, height)
    ids = [f["id"] for f in doc["features"]]
    assert len(set(ids)) == len(ids)
    for f in doc["features"]:
        geoms = [f["geometry"]]
        if "nucleusGeometry" in f["properties"]:
            geoms.append(f["properties"]["nucleusGeometry"])
        for g in geoms:
            geom = shape(g)
            assert geom.is_valid and not geom.is_empty, (f["id"], shapely.is_valid_reason(geom))
            assert slide.covers(geom), f["id"]
            polys = [g["coordinates"]] if g["type"] == "Polygon" else g["coordinates"]
            for poly in polys:
                for k, ring in enumerate(poly):
                    assert ring[0] == ring[-1] and len(ring) >= 4
                    assert _decimals_ok(ring)
                    # RFC 7946: exterior counter-clockwise, holes clockwise (for the numbers as written)
                    assert shapely.LinearRing(ring).is_ccw == (k == 0)
        for v in f["properties"]["measurements"].values():
            assert isinstance(v, (int, float)) and math.isfinite(v)
        assert str(uuid.UUID(f["id"])) == f["id"]


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qp") / "slide.zarr"
    build_test_store(path, shape=(600, 760), chunk=256, seed=3)
    return path


@pytest.fixture(scope="module")
def exported(store_path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("qpout") / "slide.geojson"
    export_qupath(store_path, out)
    return out, json.loads(out.read_text())


# --------------------------------------------------------------------------------------- tracer (reference)


@settings(max_examples=60, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 14), st.integers(1, 14)), elements=st.integers(0, 3)))
def test_traced_rings_rasterise_back_to_the_labels(lab):
    """Pixel centres inside a label's rings (outer minus holes) are exactly that label's pixels."""
    rings = trace_rings(lab)
    yy, xx = np.mgrid[0:lab.shape[0], 0:lab.shape[1]] + 0.5
    for value in range(1, 4):
        idx = np.flatnonzero(rings.label == value)
        outer = [shapely.Polygon(rings.ring(i)) for i in idx if rings.area[i] > 0]
        holes = [shapely.Polygon(rings.ring(i)) for i in idx if rings.area[i] < 0]
        for p in outer + holes:
            assert p.is_valid
        region = shapely.union_all(outer) if outer else shapely.Polygon()
        if holes:
            region = region.difference(shapely.union_all(holes))
        assert np.array_equal(shapely.contains_xy(region, xx, yy), lab == value)


@settings(max_examples=60, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 20), st.integers(1, 20)), elements=st.integers(0, 3)))
def test_ring_order_by_walking_equals_pointer_jumping(lab):
    """The two ways of putting the edges in ring order (short rings: walk; long rings: jump) agree."""
    walked, jumped = trace_rings(lab), trace_rings(lab, walk_limit=0)
    for name in ("x", "y", "offsets", "label", "area"):
        assert np.array_equal(getattr(walked, name), getattr(jumped, name))


def test_rings_that_simplification_collapses_keep_their_traced_outline():
    lab = np.zeros((6, 9), np.uint16)
    lab[1, 1] = 1  # one pixel: a diamond that a 2-pixel tolerance collapses
    lab[2:5, 3:8] = 2
    rings = outer_rings(trace_rings(lab))
    coords, bounds = ring_polygons(rings, 2.0, 10, 20, simplify=2.0)
    for i in range(len(rings)):
        ring = coords[bounds[i]:bounds[i + 1]]
        poly = shapely.Polygon(ring)
        assert len(ring) >= 4 and poly.is_valid and poly.area > 0
        assert np.array_equal(ring[0], ring[-1])
    # the one-pixel nucleus keeps its traced diamond (scaled, shifted): area 1/2 px * 2^2
    assert shapely.Polygon(coords[bounds[0]:bounds[1]]).area == pytest.approx(0.5 * 4)


def test_outer_ring_area_is_pixel_count_minus_half():
    lab = np.zeros((9, 9), np.int32)
    lab[2:7, 1:5] = 5
    lab[3, 2] = 0  # a hole does not change the outer ring
    lab[7, 5] = 5  # a corner-touching pixel is a separate ring (4-connectivity); the largest is kept
    rings = outer_rings(trace_rings(lab))
    assert rings.label.tolist() == [5]
    assert rings.area[0] == pytest.approx(20 - 0.5)


def test_uuids_are_uuid5_of_slide_and_nucleus():
    ids = np.array([1, 7, 4_000_000_000], np.int64)
    assert nucleus_uuids("abc123", ids) == [nucleus_uuid("abc123", i) for i in ids]
    assert uuid.UUID(nucleus_uuid("abc123", 7)).version == 5
    assert nucleus_uuid("abc123", 7) != nucleus_uuid("abd123", 7)


# ------------------------------------------------------------------------------------------- export


def test_export_conforms_to_qupath_rules(store_path, exported):
    out, doc = exported
    store = open_store(store_path)
    slide = store.attrs["slide"]
    _check_conformance(doc, slide["width"], slide["height"])
    kinds = {f["properties"]["objectType"] for f in doc["features"]}
    assert kinds == {"detection", "annotation"}
    names = {f["properties"]["classification"]["name"] for f in doc["features"]}
    assert {"epithelial", "fibroblast", "inflammatory"} <= names
    assert {"stroma", "tumour"} <= names and "background" not in names
    # one line per feature: the file streams and is easy to grep
    lines = out.read_text().splitlines()
    assert len(lines) == len(doc["features"]) + 2


def test_round_trip_preserves_every_nucleus(store_path, exported):
    out, _ = exported
    store = open_store(store_path)
    table = store.read_table()
    identity = store.attrs["slide"]["identity"]
    mpp0 = store.attrs["slide"]["mpp"]
    ds = store.attrs["downsample"]
    objects = read_geojson(out)
    nuclei = {a.id: a for a in objects if a.object_type == "detection"}
    assert len(nuclei) == len(table)
    for row in table.itertuples():
        a = nuclei[nucleus_uuid(identity, row.id)]
        c = a.geometry.centroid
        # centroid within half a label pixel; area within 1/2 px + the simplification (<= 12 %)
        assert math.hypot(c.x - row.centroid_x, c.y - row.centroid_y) < 0.5 * ds
        area_um2 = a.geometry.area * mpp0**2
        assert abs(area_um2 - row.area_um2) <= 0.12 * row.area_um2 + 0.5 * store.mpp**2
        assert a.measurements["Area µm^2"] == pytest.approx(row.area_um2, abs=1e-4)
        assert a.class_name == row.type and a.color is not None


def test_exported_polygons_cover_their_label_pixels(store_path, exported):
    """The simplified outline still holds the nucleus: IoU with the label mask >= 0.8 on a window."""
    _, doc = exported
    store = open_store(store_path)
    ds = store.attrs["downsample"]
    lab = store.nuclei[0:200, 0:200]
    ids = set(np.unique(lab).tolist()) - {0}
    identity = store.attrs["slide"]["identity"]
    by_id = {f["id"]: f for f in doc["features"]}
    yy, xx = (np.mgrid[0:200, 0:200] + 0.5) * ds
    checked = 0
    for nid in ids:
        f = by_id[nucleus_uuid(identity, nid)]
        inside = shapely.contains_xy(shape(f["geometry"]), xx, yy)
        mask = lab == nid
        if mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any():
            continue  # cut by the window
        assert (inside & mask).sum() / (inside | mask).sum() >= 0.8
        checked += 1
    assert checked > 20


def test_gzip_cells_bbox_and_classes(store_path, tmp_path):
    store = open_store(store_path)
    slide = store.attrs["slide"]
    bbox = (200.0, 100.0, 600.0, 500.0)
    out = tmp_path / "cells.geojson.gz"
    result = export_qupath(store_path, out, ExportOptions(cells=True, bbox=bbox,
                                                          classes=("epithelial", "stroma")))
    with gzip.open(out, "rt") as fh:
        doc = json.load(fh)
    _check_conformance(doc, slide["width"], slide["height"])
    cells = [f for f in doc["features"] if f["properties"]["objectType"] == "cell"]
    regions = [f for f in doc["features"] if f["properties"]["objectType"] == "annotation"]
    assert len(cells) == result.n_nuclei > 0 and len(regions) == result.n_regions > 0
    assert {f["properties"]["classification"]["name"] for f in cells} == {"epithelial"}
    assert {f["properties"]["classification"]["name"] for f in regions} == {"stroma"}
    box = shapely.box(bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3])
    for f in regions:
        assert box.buffer(0.01).covers(shape(f["geometry"]))
    cell_geoms = [shape(f["geometry"]) for f in cells]
    for f, cell in zip(cells, cell_geoms):
        nucleus = shape(f["properties"]["nucleusGeometry"])
        assert box.buffer(0.5 * store.attrs["downsample"]).contains(nucleus.centroid)  # table centroid inside
        assert cell.buffer(0.75 * store.attrs["downsample"]).covers(nucleus)  # within the simplification
        assert cell.area > nucleus.area
        assert f["properties"]["measurements"]["Cell: Area µm^2"] > f["properties"]["measurements"][
            "Nucleus: Area µm^2"]
    # cells do not overlap (beyond the simplification tolerance)
    tree = shapely.STRtree(cell_geoms)
    left, right = tree.query(cell_geoms, predicate="intersects")
    pairs = left < right
    overlap = shapely.area(shapely.intersection(np.take(cell_geoms, left[pairs]), np.take(cell_geoms, right[pairs])))
    ds = store.attrs["downsample"]
    assert overlap.size == 0 or overlap.max() < 4 * ds * ds
    objects = read_geojson(out)
    assert sum(a.object_type == "cell" for a in objects) == len(cells)
    assert all(a.nucleus_geometry is not None for a in objects if a.object_type == "cell")


def test_regions_have_holes_and_are_traced_on_a_coarse_level(store_path, exported):
    _, doc = exported
    regions = [f for f in doc["features"] if f["properties"]["objectType"] == "annotation"]
    store = open_store(store_path)
    total = sum(shape(f["geometry"]).area for f in regions) * store.attrs["slide"]["mpp"] ** 2 / 1e6
    summary = store.attrs["summary"]["stuff_area_mm2"]
    tissue = sum(v for k, v in summary.items() if k not in ("background",))
    # nucleus pixels are given to the tissue around them; coarse tracing and dropped specks cost a few %
    assert total == pytest.approx(tissue, rel=0.1)
    assert all(f["properties"]["classification"]["name"] == f["properties"]["name"] for f in regions)


def test_export_is_deterministic(store_path, exported, tmp_path):
    out, _ = exported
    again = tmp_path / "again.geojson"
    export_qupath(store_path, again)
    assert again.read_bytes() == out.read_bytes()


def test_worker_processes_write_the_same_bytes(store_path, exported, tmp_path):
    """Blocks encoded in worker processes are written in order: byte-identical files for any worker count,
    plain and gzip (one gzip member per block: a valid multi-member stream that decompresses to the plain
    file)."""
    options = ExportOptions(block=128)  # many blocks
    one = export_qupath(store_path, tmp_path / "1.geojson.gz", options, workers=1)
    two = export_qupath(store_path, tmp_path / "2.geojson.gz", options, workers=2)
    plain = export_qupath(store_path, tmp_path / "1.geojson", options, workers=1)
    assert two.timings["workers"] == 2 and one.timings["workers"] == 1
    assert (one.n_nuclei, one.n_regions) == (two.n_nuclei, two.n_regions) == (plain.n_nuclei, plain.n_regions)
    zipped = (tmp_path / "2.geojson.gz").read_bytes()
    assert zipped == (tmp_path / "1.geojson.gz").read_bytes()
    assert zipped.count(b"\x1f\x8b\x08") > 3  # several members
    with gzip.open(tmp_path / "2.geojson.gz", "rb") as fh:
        assert fh.read() == (tmp_path / "1.geojson").read_bytes()
    # another block size gives the same features (ids, geometry, properties), in another order
    doc = json.loads((tmp_path / "1.geojson").read_text(encoding="utf-8"))
    by_id = {f["id"]: f for f in exported[1]["features"]}
    assert len(doc["features"]) == len(by_id)
    assert all(by_id[f["id"]] == f for f in doc["features"])
    assert len(read_geojson(tmp_path / "2.geojson.gz")) == len(doc["features"])


def test_bad_worker_count_is_refused(store_path, tmp_path):
    for bad in (0, -2, 1.5):
        with pytest.raises(ConfigError, match="workers"):
            export_qupath(store_path, tmp_path / "w.geojson", workers=bad)
    assert not list(tmp_path.iterdir())


def test_untyped_store_uses_nucleus_class_and_omits_nan(tmp_path):
    path = tmp_path / "untyped.zarr"
    build_test_store(path, shape=(256, 256), chunk=128, seed=5, with_types=False)
    out = tmp_path / "u.geojson"
    export_qupath(path, out, ExportOptions(regions=False))
    doc = json.loads(out.read_text())
    assert doc["features"]
    for f in doc["features"]:
        assert f["properties"]["classification"] == {"name": "nucleus", "color": [40, 40, 220]}
        assert "Type probability" not in f["properties"]["measurements"]


# -------------------------------------------------------------------------------------------- bad input


def test_incomplete_store_is_refused_unless_partial(tmp_path):
    path = tmp_path / "partial.zarr"
    build_test_store(path, shape=(256, 256), chunk=128, seed=6, complete=False)
    out = tmp_path / "p.geojson"
    with pytest.raises(StoreError, match="incomplete.*--partial"):
        export_qupath(path, out)
    assert not out.exists() and not list(tmp_path.glob(".*part"))
    result = export_qupath(path, out, ExportOptions(partial=True))
    assert result.n_nuclei > 0 and json.loads(out.read_text())["features"]


def test_bad_options_raise_clear_errors(store_path, tmp_path):
    out = tmp_path / "x.geojson"
    with pytest.raises(ConfigError, match="unknown class name.*Fix: use some of"):
        export_qupath(store_path, out, ExportOptions(classes=("tumor",)))
    with pytest.raises(RegionError, match="not inside the slide"):
        export_qupath(store_path, out, ExportOptions(bbox=(1000, 1000, 5000, 10)))
    with pytest.raises(ConfigError, match="bbox"):
        ExportOptions(bbox=(0, 0, -5, 10))
    with pytest.raises(HistopanError, match="folder does not exist"):
        export_qupath(store_path, tmp_path / "nope" / "x.geojson")
    with pytest.raises(HistopanError, match=r"\.geojson"):
        export_qupath(store_path, tmp_path / "x.txt")
    with pytest.raises(StoreError, match="no such store"):
        export_qupath(tmp_path / "missing.zarr", out)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_folder(store_path, tmp_path):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    # root ignores folder permissions; /proc refuses new files even to root
    target = Path("/proc") if os.access(locked, os.W_OK) else locked
    try:
        with pytest.raises(HistopanError, match="not writable|cannot write into the output folder"):
            export_qupath(store_path, target / "x.geojson")
    finally:
        locked.chmod(0o700)
    assert not list(locked.iterdir())


def test_cli_export_and_errors(store_path, tmp_path, capsys):
    out = tmp_path / "cli.geojson.gz"
    assert main(["export", "qupath", str(store_path), "-o", str(out), "--bbox", "0,0,800,600",
                 "--classes", "fibroblast", "tumour"]) == 0
    doc = json.loads(gzip.decompress(out.read_bytes()))
    assert {f["properties"]["classification"]["name"] for f in doc["features"]} == {"fibroblast", "tumour"}
    assert "nuclei" in capsys.readouterr().out
    assert main(["export", "qupath", str(store_path), "-o", str(tmp_path / "y.geojson"),
                 "--classes", "nope"]) == 2
    assert "unknown class name" in capsys.readouterr().err
    assert main(["export", "qupath", str(store_path), "-o", str(tmp_path / "y.geojson"),
                 "--bbox", "1,2,3"]) == 2
    assert "bbox" in capsys.readouterr().err
    assert main(["export", "qupath", str(store_path), "-o", str(tmp_path / "y.geojson"), "--workers", "0"]) == 2
    assert "workers" in capsys.readouterr().err
    assert not (tmp_path / "y.geojson").exists()


# ------------------------------------------------------------------------------------------------ import


def test_reads_real_qupath_point_exports(data_dir):
    files = sorted((data_dir / "crc_points").glob("*/points/*.geojson"))
    assert len(files) >= 80
    total = 0
    for path in files[:20]:
        objects = read_geojson(path)
        raw = json.loads(path.read_text())
        assert len(objects) == len(raw["features"])
        for a, f in zip(objects, raw["features"]):
            assert a.geometry.geom_type == "Point" and a.object_type == "annotation"
            assert (a.geometry.x, a.geometry.y) == tuple(f["geometry"]["coordinates"])
            cls = f["properties"].get("classification")
            assert a.class_name == (cls["name"] if cls else None)
            assert a.color == (tuple(cls["color"]) if cls else None)
        total += len(objects)
    assert total > 1000


def _write(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc))
    return path


_POLY = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}


def test_reads_every_shape_of_qupath_export(tmp_path):
    feats = [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1.5, 2.5]},
         "properties": {"objectType": "annotation", "classification": "Tumor"}},
        {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Immune cells",
                                                                       "colorRGB": -6749953}}},
        {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [5, 5], [9, 2]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Stroma", "color": [150, 200, 150]}}},
        {"type": "Feature", "id": "a1b2", "geometry": _POLY,
         "properties": {"objectType": "detection", "measurements": {"Area µm^2": 25.0}}},
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [_POLY["coordinates"]]},
         "properties": {"isLocked": False}},
        {"type": "Feature", "geometry": _POLY,
         "properties": {"objectType": "cell", "nucleusGeometry": _POLY,
                        "measurements": [{"name": "Nucleus: Area", "value": 3.0}]}},
    ]
    collection = read_geojson(_write(tmp_path / "fc.geojson", {"type": "FeatureCollection", "features": feats}))
    assert [a.geometry.geom_type for a in collection] == ["Point", "MultiPoint", "LineString", "Polygon",
                                                          "MultiPolygon", "Polygon"]
    assert collection[0].class_name == "Tumor" and collection[0].color is None
    assert collection[1].color == (153, 0, 255)  # packed ARGB -6749953 = 0xFF9900FF
    assert collection[2].color == (150, 200, 150)
    assert collection[3].object_type == "detection" and collection[3].id == "a1b2"
    assert collection[3].measurements == {"Area µm^2": 25.0} and collection[3].class_name is None
    assert collection[4].object_type == "annotation"  # QuPath's default
    assert collection[5].nucleus_geometry.area == 100 and collection[5].measurements == {"Nucleus: Area": 3.0}
    bare = read_geojson(_write(tmp_path / "bare.geojson", feats))
    assert [a.geometry.wkt for a in bare] == [a.geometry.wkt for a in collection]
    one = read_geojson(_write(tmp_path / "one.geojson", feats[2]))
    assert len(one) == 1 and one[0].class_name == "Stroma"
    gz = tmp_path / "fc.geojson.gz"
    gz.write_bytes(gzip.compress(json.dumps(feats).encode()))
    assert len(read_geojson(gz)) == len(feats)


@pytest.mark.parametrize("content, message", [
    (b"this is not json", "not valid JSON"),
    (b'{"type": "Feature", "geometry": {"type": "Circle", "coordinates": [1, 2]}, "properties": {}}',
     "unsupported geometry type"),
    (b'{"type": "Feature", "geometry": {"type": "Polygon"}, "properties": {}}', "has no coordinates"),
    (b'{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[1, 2]]}, "properties": {}}',
     "malformed coordinates"),
    (b'{"type": "Feature", "geometry": null, "properties": {}}', "no geometry"),
    (b'{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, '
     b'"properties": {"classification": {"color": [1, 2, 3]}}}', "classification without a name"),
    (b'{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, '
     b'"properties": {"objectType": "blob"}}', "unknown objectType"),
    (b'{"type": "GeometryCollection", "geometries": []}', "expected a GeoJSON FeatureCollection"),
    (b"\x1f\x8b\x08\x00garbage", "gzip data cannot be read"),
])
def test_bad_annotation_files_name_file_and_fix(tmp_path, content, message):
    path = tmp_path / "bad.geojson"
    path.write_bytes(content)
    with pytest.raises(AnnotationError, match=message) as info:
        read_geojson(path)
    assert str(path) in str(info.value) and "Fix:" in str(info.value)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(AnnotationError, match="not found"):
        read_geojson(tmp_path / "none.geojson")
