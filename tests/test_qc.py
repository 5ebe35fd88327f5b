"""QC report: images, plots and the self-contained HTML, from the store alone and with the real slide."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histopan.cli import main
from histopan.errors import HistopanError, SlideError, StoreError
from histopan.export.qc import OUTLINE, qc_report
from histopan.testing_store import build_test_store


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qc") / "synthetic.zarr"
    build_test_store(path, shape=(512, 640), chunk=256, seed=4)
    return path


@pytest.fixture(scope="module")
def cmu_store(tmp_path_factory, slides_dir) -> Path:
    path = tmp_path_factory.mktemp("qc") / "cmu.zarr"
    build_test_store(path, mpp=1.996, slide=slides_dir / "cmu_small_region.svs", chunk=256, seed=2)
    return path


def _png(path: Path) -> np.ndarray:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(path).convert("RGB"))


def test_report_from_store_alone(small_store, tmp_path):
    result = qc_report(small_store, tmp_path / "qc", n_crops=2)
    assert result.html == tmp_path / "qc" / "synthetic-4.html"
    assert {"overview", "areas", "nucleus_sizes", "density", "crop_1", "crop_2"} <= set(result.images)
    for path in result.images.values():
        img = _png(path)
        assert img.shape[0] > 200 and img.shape[1] > 300 and img.std() > 10  # not blank
    # crops: outlines (pure OUTLINE colour) drawn, and the class tints in the legend
    crop = _png(result.images["crop_1"])
    assert (crop == np.array(OUTLINE)).all(axis=-1).sum() > 500
    # crops lie inside the slide and do not overlap each other
    for x, y, w, h in result.crops:
        assert x >= 0 and y >= 0 and x + w <= 1280 + 1e-6 and y + h <= 1024 + 1e-6
    text = result.html.read_text()
    # self-contained: every image embedded, nothing fetched
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(embedded) == 4 + 2
    assert all(base64.b64decode(e)[:4] == b"\x89PNG" for e in embedded)
    assert "http://" not in text and "https://" not in text
    for needle in ("synthetic", "weights sha256", "Provenance", "stroma", "tumour", "necrosis", "identity"):
        assert needle in text


def test_overview_tints_classes(small_store, tmp_path):
    result = qc_report(small_store, tmp_path / "qc", n_crops=1)
    over = _png(result.images["overview"]).astype(int)
    # the tint of tumour (200, 40, 40) over the H&E makes clearly red pixels
    reddish = (over[..., 0] - over[..., 2] > 40) & (over[..., 0] > 150)
    assert reddish.sum() > 1000


def test_report_with_the_real_slide(cmu_store, slides_dir, tmp_path):
    result = qc_report(cmu_store, tmp_path / "qc", slide=slides_dir / "cmu_small_region.svs", n_crops=2)
    assert result.html.name == "cmu_small_region.html"
    assert len(result.crops) == 2
    crop = _png(result.images["crop_1"])
    assert crop.std() > 10


def test_wrong_slide_and_incomplete_store(cmu_store, slides_dir, tmp_path):
    with pytest.raises(SlideError, match="not the slide the store was made from"):
        qc_report(cmu_store, tmp_path / "qc", slide=slides_dir / "boxes.tiff")
    partial = tmp_path / "partial.zarr"
    build_test_store(partial, shape=(256, 256), chunk=128, seed=9, complete=False)
    with pytest.raises(StoreError, match="incomplete"):
        qc_report(partial, tmp_path / "qc2")
    assert not (tmp_path / "qc2").exists()
    result = qc_report(partial, tmp_path / "qc2", partial=True, n_crops=1)
    assert result.html.is_file()


def test_unwritable_output(small_store, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(HistopanError, match="cannot create the output folder"):
        qc_report(small_store, blocker / "qc")


def test_cli_qc(small_store, tmp_path, capsys):
    assert main(["qc", str(small_store), "-o", str(tmp_path / "out"), "--crops", "1"]) == 0
    assert "synthetic-4.html" in capsys.readouterr().out
    assert main(["qc", str(tmp_path / "missing.zarr"), "-o", str(tmp_path / "out2")]) == 2
    assert "no such store" in capsys.readouterr().err


def _labelled_mm2(store) -> float:
    areas = store.attrs["summary"]["stuff_area_mm2"]
    return sum(a for name, a in areas.items() if name != "background")


@pytest.mark.parametrize("ratio, warns", [(1.05, False), (0.95, False), (1.3, True), (0.8, True)])
def test_tissue_area_check(tmp_path, caplog, ratio, warns):
    """The tissue classes' area (every class but background, nuclei included) beside the tissue mask's; a
    warning in the report and the log beyond 10 %."""
    store = build_test_store(tmp_path / "s.zarr", shape=(256, 320), chunk=128, seed=4)
    labelled = _labelled_mm2(store)
    assert labelled > 0.005
    store.update_attrs(tissue={"mask_area_mm2": labelled / ratio})
    with caplog.at_level("WARNING", logger="histopan.export.qc"):
        result = qc_report(tmp_path / "s.zarr", tmp_path / "qc", n_crops=1)
    check = result.tissue
    assert check["labelled_mm2"] == pytest.approx(labelled)
    assert check["labelled_mm2"] == pytest.approx(check["classes_mm2"] + check["nuclei_mm2"])
    assert check["nuclei_mm2"] == pytest.approx(store.attrs["summary"]["stuff_area_mm2"]["nucleus"])
    assert check["ratio"] == pytest.approx(ratio)
    text = result.html.read_text()
    assert "tissue area check" in text and f"{labelled / ratio:.3f} mm²" in text
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "tissue mask" in r.getMessage()]
    if warns:
        assert check["warning"] and "Warning:" in text and len(warnings) == 1
        assert ("more than" if ratio > 1 else "less than") in check["warning"]
    else:
        assert check["warning"] is None and "Warning:" not in text and not warnings
        assert "within 10%" in text


def test_tissue_area_check_without_a_recorded_mask(small_store, cmu_store, slides_dir, tmp_path):
    """A store without a tissue mask (a run with --min-tissue 0): the report says so, or, given the slide,
    detects the mask for the comparison."""
    result = qc_report(small_store, tmp_path / "qc", n_crops=1)
    assert result.tissue["mask_mm2"] is None and result.tissue["warning"] is None
    assert "not recorded" in result.html.read_text()
    with_slide = qc_report(cmu_store, tmp_path / "qc2", slide=slides_dir / "cmu_small_region.svs", n_crops=1)
    assert with_slide.tissue["mask_mm2"] == pytest.approx(0.605, abs=0.01)  # the quick start slide's mask
    assert "detected for this report" in with_slide.html.read_text()


def test_outlier_check_counts_huge_and_irregular_objects(tmp_path):
    """Objects made huge, elongated or ragged in a synthetic store's table are counted exactly, the largest
    listed first, the report warns and shows crops centred on them with the object outlined in yellow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from histopan.export.qc import HIGHLIGHT, HUGE_MIN_UM2, outlier_check
    from histopan.store import open_store

    path = tmp_path / "outliers.zarr"
    build_test_store(path, shape=(512, 640), chunk=256, seed=4)
    store = open_store(path)
    clean = outlier_check(store)
    assert clean["huge"] == clean["irregular"] == 0 and clean["warning"] is None
    table = pq.read_table(store.table_path).to_pandas()
    median = float(np.median(table["area_um2"]))
    assert clean["median_area_um2"] == pytest.approx(median, rel=2e-3)
    rows = table.index[::40][:6]
    huge, elongated, ragged = rows[:2], rows[2:4], rows[4:6]
    table.loc[huge, "area_um2"] = max(9 * median, HUGE_MIN_UM2 + 1)
    table.loc[elongated, "area_um2"] = 3 * median
    table.loc[elongated, "eccentricity"] = 0.99
    table.loc[ragged, "area_um2"] = 2.5 * median
    table.loc[ragged, "circularity"] = 0.1
    # a large round nucleus, and a small elongated one: not outliers
    table.loc[table.index[3], "area_um2"] = 5 * median
    table.loc[table.index[5], "eccentricity"] = 0.995
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False, schema=pq.read_schema(store.table_path)),
                   store.table_path)
    check = outlier_check(open_store(path))
    assert (check["huge"], check["irregular"]) == (2, 4)
    assert {e["id"] for e in check["examples"][:2]} == set(table.loc[huge, "id"])
    assert [e["reason"] for e in check["examples"]] == ["huge", "huge", "irregular", "irregular", "irregular",
                                                         "irregular"]
    assert "6 of" in check["warning"]
    result = qc_report(path, tmp_path / "qc", n_crops=1)
    assert result.outliers["huge"] == 2
    crop = _png(result.images["outlier_1"])
    assert (crop == np.array(HIGHLIGHT)).all(axis=-1).sum() > 20  # the object is outlined
    text = result.html.read_text()
    assert "Outlier objects" in text and "2 huge" in text and "Warning: 6 of" in text


def test_a_table_without_the_shape_columns_is_refused_before_anything_is_written(tmp_path, capsys):
    """An older store's table without `circularity`: one line naming the table and the column, exit 2, and no
    output folder left behind."""
    import pyarrow.parquet as pq

    from histopan.store import open_store

    path = tmp_path / "old.zarr"
    build_test_store(path, shape=(256, 256), chunk=128, seed=1)
    table_path = open_store(path).table_path
    pq.write_table(pq.read_table(table_path).drop(["circularity"]), table_path)
    assert main(["qc", str(path), "-o", str(tmp_path / "qc")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "circularity" in err and "nuclei.parquet" in err
    assert not (tmp_path / "qc").exists()
