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
