"""The one GeoJSON reader (histopan.export.geojson): the same file reads the same for evaluation, training and
export, gzip-compressed or not."""

import gzip
import json

import numpy as np
import pytest
import shapely

import histopan.evaluation
import histopan.export.qupath
from histopan.cli import main
from histopan.errors import AnnotationError, DataError
from histopan.export.geojson import read_geojson, read_points_geojson


@pytest.fixture(scope="module")
def crc_file(data_dir):
    return sorted((data_dir / "crc_points" / "val" / "points").glob("*.geojson"))[0]


def test_one_reader_behind_every_import_path():
    assert histopan.evaluation.read_points_geojson is read_points_geojson
    assert histopan.export.qupath.read_geojson is read_geojson


def test_points_are_the_annotations_points(crc_file):
    raw = json.loads(crc_file.read_text())["features"]
    annotations = read_geojson(crc_file)
    xy, names = read_points_geojson(crc_file)
    assert len(annotations) == len(raw) == len(xy) == len(names) > 10
    np.testing.assert_array_equal(xy, [f["geometry"]["coordinates"] for f in raw])
    assert names == [(f["properties"].get("classification") or {}).get("name") for f in raw]
    assert names == [a.class_name for a in annotations]
    np.testing.assert_array_equal(xy, np.concatenate([shapely.get_coordinates(a.geometry) for a in annotations]))


def test_training_reads_the_same_points(crc_file):
    from histopan.training.sparse import resolve_classes
    from histopan.training.sparse_data import read_points

    annotations = read_geojson(crc_file)
    seen = sorted({a.class_name for a in annotations if a.class_name is not None})
    mapping = resolve_classes({}, ("background", "stroma", "nucleus"), ["background", "stroma"], "nucleus",
                              tuple(seen), seen, crc_file)
    xy_train, types = read_points(annotations, 1.0, mapping)
    xy_eval, names = read_points_geojson(crc_file)
    np.testing.assert_array_equal(xy_train, xy_eval)
    assert list(types) == names


def test_gzip_and_plain_read_the_same_and_evaluate_the_same(crc_file, tmp_path, capsys):
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    truth.mkdir()
    pred.mkdir()
    (truth / crc_file.name).write_bytes(crc_file.read_bytes())
    (pred / crc_file.name).write_bytes(gzip.compress(crc_file.read_bytes()))  # a .geojson holding gzip data
    a, b = read_points_geojson(truth / crc_file.name), read_points_geojson(pred / crc_file.name)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]
    out = tmp_path / "points.json"
    assert main(["evaluate", "--points", "--pred", str(pred), "--truth", str(truth), "--mpp", "0.5",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["all"]["f1"] == 1.0 and res["all"]["tp"] == len(a[0]) and res["type_accuracy"] == 1.0


def test_a_polygon_is_not_a_point_and_bad_json_is_named(tmp_path):
    bad = tmp_path / "bad.geojson"
    bad.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [0, 1], [0, 0]]]},
         "properties": {}}]}))
    assert len(read_geojson(bad)) == 2
    with pytest.raises(AnnotationError, match="feature 1 is not a point") as info:
        read_points_geojson(bad)
    assert info.value.value == "Polygon" and info.value.path == str(bad)
    bad.write_text("{not json")
    with pytest.raises(DataError, match="cannot read the GeoJSON file: not valid JSON") as info:
        read_points_geojson(bad)
    assert info.value.path == str(bad)
