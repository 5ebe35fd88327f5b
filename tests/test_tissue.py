"""Tissue detection on the real slides and on written images with known geometry; tile tissue fractions."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.draw import disk, line
from skimage.transform import resize

from histopan.errors import ConfigError
from histopan.slide import open_slide
from histopan.slide.tissue import TissueMask, detect_tissue, select_tiles, tissue_fraction, tissue_mask


def _corner_boxes(w: int, h: int, size: int) -> np.ndarray:
    return np.array([[0, 0, size, size], [w - size, 0, size, size], [0, h - size, size, size],
                     [w - size, h - size, size, size]], float)


def test_cmu_slide_tissue_and_background(slides_dir):
    with open_slide(slides_dir / "cmu_small_region.svs") as reader:
        tm = tissue_mask(reader)
        w, h = reader.dimensions
    assert tm.mpp == pytest.approx(8.0, rel=0.02)
    assert tm.mask.dtype == bool and tm.shape == (round(h / tm.downsample), round(w / tm.downsample))
    assert 0.25 < tm.fraction < 0.5  # a strip of skin on a white background
    # three corners of this slide are empty glass; the tissue strip runs through the middle
    corners = tissue_fraction(tm, _corner_boxes(w, h, 300))
    assert corners[0] == 0 and corners[1] == 0 and corners[2] == 0
    centre = tissue_fraction(tm, np.array([[1000, 1900, 400, 400]]))
    assert centre[0] > 0.95
    x, y, bw, bh = tm.bounding_box()
    assert x > 50 and bw < 0.95 * w and y > 50  # glass at the left and top margins


@pytest.mark.parametrize("mpp", [None, 0.5])
def test_tcga_slide_without_mpp_and_with_override(slides_dir, mpp):
    with open_slide(slides_dir / "tcga-cr-7395-01a-01-ts1.svs", mpp=mpp) as reader:
        tm = tissue_mask(reader)
        w, h = reader.dimensions
    assert (tm.mpp is None) == (mpp is None)
    assert 0.5 < tm.fraction < 0.75  # one large tissue section, white around it
    corners = tissue_fraction(tm, _corner_boxes(w, h, 400))
    np.testing.assert_array_equal(corners[:3], 0.0)  # glass
    assert 0.1 < corners[3] < 0.5  # the section reaches into the bottom-right corner
    assert tissue_fraction(tm, np.array([[1800, 1400, 600, 600]]))[0] > 0.95
    assert tm.thumbnail is not None and tm.thumbnail.shape[:2] == tm.shape


def test_tcga_masks_agree_between_pixel_fallback_and_mpp(slides_dir):
    path = slides_dir / "tcga-cr-7395-01a-01-ts1.svs"
    with open_slide(path) as a, open_slide(path, mpp=0.5) as b:
        fine, coarse = tissue_mask(a), tissue_mask(b)
    up = resize(coarse.mask.astype(float), fine.shape, order=0) > 0.5
    iou = (up & fine.mask).sum() / (up | fine.mask).sum()
    assert iou > 0.9


def _synthetic_slide() -> tuple[np.ndarray, np.ndarray]:
    """A white 'slide' with a pink-purple tissue disc, a black border and a green pen stroke."""
    rng = np.random.default_rng(0)
    h, w = 640, 800
    img = np.full((h, w, 3), 240, np.uint8) + rng.integers(0, 12, (h, w, 3), dtype=np.uint8)
    truth = np.zeros((h, w), bool)
    rr, cc = disk((320, 380), 200, shape=truth.shape)
    truth[rr, cc] = True
    tissue = np.array([200, 110, 170], np.int16) + rng.integers(-25, 25, (rr.size, 3))
    img[rr, cc] = np.clip(tissue, 0, 255).astype(np.uint8)
    img[:, :24] = 10  # black scanner border
    for off in range(-4, 5):  # thick green marker line on the glass
        lr, lc = line(560 + off, 620, 620 + off, 790)
        img[lr, lc] = (40, 160, 70)
    return img, truth


def test_synthetic_disc_found_border_and_pen_ignored():
    img, truth = _synthetic_slide()
    mask, thr = detect_tissue(img, mpp=8.0)
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.97
    assert not mask[:, :24].any()  # black border
    assert not mask[550:630, 620:].any()  # pen
    assert 0.05 <= thr <= 0.2


def test_all_white_slide_has_no_tissue(tmp_path):
    path = tmp_path / "blank.tif"
    tifffile.imwrite(path, np.full((300, 400, 3), 245, np.uint8), photometric="rgb", tile=(64, 64))
    with open_slide(path, mpp=2.0) as reader:
        tm = tissue_mask(reader)
    assert tm.fraction == 0.0 and tm.bounding_box() is None
    assert select_tiles(tm, np.array([[0, 0, 100, 100]])).size == 0


def test_written_slide_through_reader(tmp_path):
    img, truth = _synthetic_slide()
    big = np.repeat(np.repeat(img, 4, axis=0), 4, axis=1)  # 2560 x 3200 at 2 um/px
    path = tmp_path / "synthetic.ome.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(big, photometric="rgb", tile=(256, 256), subifds=1,
                 metadata={"axes": "YXS", "PhysicalSizeX": 2.0, "PhysicalSizeY": 2.0})
        tw.write(big[::4, ::4], photometric="rgb", tile=(256, 256), subfiletype=1)
    with open_slide(path) as reader:
        tm = tissue_mask(reader)  # 8 um/px = level 1 exactly
    assert tm.shape == truth.shape and tm.downsample == 4.0
    assert (tm.mask & truth).sum() / (tm.mask | truth).sum() > 0.97
    boxes = np.array([[4 * 380 - 200, 4 * 320 - 200, 400, 400], [0, 0, 400, 400], [4 * 580, 4 * 20, 400, 400]])
    frac = tissue_fraction(tm, boxes)
    assert frac[0] == 1.0 and frac[1] == 0.0 and frac[2] == 0.0
    np.testing.assert_array_equal(select_tiles(tm, boxes), [0])


def _mask(arr: np.ndarray, ds: float = 10.0) -> TissueMask:
    h, w = arr.shape
    return TissueMask(mask=arr.astype(bool), downsample=ds, downsample_xy=(ds, ds),
                      slide_dimensions=(int(w * ds), int(h * ds)))


def test_tissue_fraction_exact_values():
    m = np.zeros((4, 6), bool)
    m[1:3, 2:4] = True  # level-0 x 20..40, y 10..30
    tm = _mask(m)
    boxes = np.array([
        [20, 10, 20, 20],  # exactly the tissue
        [0, 0, 60, 40],  # whole slide: 4 of 24 cells
        [15, 10, 10, 20],  # half on tissue
        [20, 10, 5, 5],  # inside one tissue cell
        [50, 30, 40, 40],  # mostly outside the slide: background
        [-10, -10, 40, 30],  # partly outside: tissue 10x10 of 1200
    ], float)
    np.testing.assert_allclose(tissue_fraction(tm, boxes), [1.0, 4 / 24, 0.5, 1.0, 0.0, 100 / 1200])
    np.testing.assert_array_equal(select_tiles(tm, boxes, 0.1), [0, 1, 2, 3])
    assert tissue_fraction(tm, np.zeros((0, 4))).shape == (0,)


@settings(max_examples=40, deadline=None)
@given(x=st.integers(0, 90), y=st.integers(0, 60), w=st.integers(1, 60), h=st.integers(1, 60),
       seed=st.integers(0, 1000))
def test_tissue_fraction_matches_brute_force(x, y, w, h, seed):
    m = np.random.default_rng(seed).random((8, 12)) > 0.5
    tm = _mask(m, ds=10.0)
    full = np.repeat(np.repeat(m, 10, axis=0), 10, axis=1)  # level-0 pixels
    expect = full[y:y + h, x:x + w].sum() / (w * h)  # outside the slide counts as background
    assert tissue_fraction(tm, np.array([[x, y, w, h]]))[0] == pytest.approx(expect, abs=1e-9)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_select_tiles_rejects_bad_threshold(bad):
    with pytest.raises(ConfigError, match="minimum tissue fraction"):
        select_tiles(_mask(np.ones((2, 2))), np.array([[0, 0, 5, 5]]), bad)


def test_overlay_draws_outline():
    m = np.zeros((20, 20), bool)
    m[5:15, 5:15] = True
    tm = TissueMask(mask=m, downsample=1.0, downsample_xy=(1.0, 1.0), slide_dimensions=(20, 20),
                    thumbnail=np.full((20, 20, 3), 255, np.uint8))
    out = tm.overlay((255, 0, 0))
    red = (out == (255, 0, 0)).all(axis=2)
    assert red.sum() == 36 and red[5, 5:15].all() and not red[10, 10] and not red[0, 0]


def test_glass_at_the_edge_of_a_small_view_is_not_a_hole(tmp_path):
    """A 240 x 240 um image, tissue on the left, a band of glass on the right: the band is smaller than the holes
    the detector fills, but it reaches the edge, so it stays glass; an in-memory image (ArrayReader, what
    predict_tile detects on) gives the same mask as the same pixels read from a file."""
    from PIL import Image

    from histopan.slide.base import ArrayReader

    rng = np.random.default_rng(0)
    img = np.clip(np.array([200, 110, 170]) + rng.integers(-25, 25, (480, 480, 3)), 0, 255).astype(np.uint8)
    img[:, 360:] = 243
    img[200:260, 100:160] = 243  # a hole of glass in the tissue: filled
    with ArrayReader(img, 0.5) as reader:
        tm = tissue_mask(reader)
    col = (np.arange(tm.shape[1]) + 0.5) * tm.downsample_xy[0]
    assert not tm.mask[:, col > 370].any() and tm.mask[:, col < 340].all()
    path = tmp_path / "region.png"
    Image.fromarray(img).save(path)
    with open_slide(path, mpp=0.5) as reader:
        np.testing.assert_array_equal(tissue_mask(reader).mask, tm.mask)
