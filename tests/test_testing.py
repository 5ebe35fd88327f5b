"""The synthetic test-slide writer: files OpenSlide opens, H&E-like content, exact ground truth."""

from __future__ import annotations

import tracemalloc

import numpy as np
import openslide
import pytest
import tifffile

from histopan.errors import ConfigError, HistopanError, OutputError
from histopan.slide import open_slide
from histopan.testing import (
    SlideSpec,
    level_dimensions,
    load_test_slide,
    nuclei_in_region,
    render_region,
    truth_region,
    write_test_slide,
)


@pytest.fixture(scope="module")
def svs(tmp_path_factory):
    return write_test_slide(tmp_path_factory.mktemp("svs") / "synthetic.svs", 1536, 1280, mpp=0.25, seed=3)


@pytest.fixture(scope="module")
def lossless_tiff(tmp_path_factory):
    return write_test_slide(tmp_path_factory.mktemp("tiff") / "synthetic.tif", 1100, 1000, mpp=0.5, seed=4,
                            flavour="tiff", compression="deflate", tile=128)


def _level(path, level):
    with openslide.OpenSlide(str(path)) as s:
        return np.asarray(s.read_region((0, 0), level, s.level_dimensions[level]).convert("RGB"))


def test_svs_opens_in_openslide_as_aperio(svs):
    with openslide.OpenSlide(str(svs.path)) as s:
        assert s.properties["openslide.vendor"] == "aperio"
        assert s.dimensions == (1536, 1280)
        assert s.level_dimensions == ((1536, 1280), (768, 640), (384, 320), (192, 160))
        assert s.level_dimensions == svs.level_dimensions
        assert float(s.properties["openslide.mpp-x"]) == 0.25 == float(s.properties["aperio.MPP"])
        assert float(s.properties["openslide.objective-power"]) == 40
        assert "thumbnail" in s.associated_images
        desc = s.properties["tiff.ImageDescription"]
    assert desc.startswith("Aperio Image Library") and "|MPP = 0.25|AppMag = 40|" in desc
    reader = open_slide(svs.path)
    assert reader.mpp == 0.25 and reader.dimensions == (1536, 1280)


def test_generic_tiff_opens_with_mpp_from_resolution_tags(lossless_tiff):
    with openslide.OpenSlide(str(lossless_tiff.path)) as s:
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert s.level_dimensions == ((1100, 1000), (550, 500), (275, 250), (137, 125), (68, 62))
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    assert open_slide(lossless_tiff.path).mpp == pytest.approx(0.5)


@pytest.mark.parametrize("flavour", ["svs", "tiff"])
@pytest.mark.parametrize("compression", ["jpeg", "deflate", "lzw"])
def test_every_flavour_and_compression_round_trips(tmp_path, flavour, compression):
    ts = write_test_slide(tmp_path / f"s.{flavour}", 512, 384, flavour=flavour, compression=compression,
                          levels=2, truth=False, seed=8)
    got = _level(ts.path, 0).astype(int)
    ref = render_region(ts.spec, 0, 0, 512, 384).astype(int)
    err = np.abs(got - ref).mean()
    assert err < 2.5 if compression == "jpeg" else err == 0


def test_pixels_equal_the_renderer_and_levels_are_2x2_means(lossless_tiff):
    spec = lossless_tiff.spec
    level0 = _level(lossless_tiff.path, 0)
    np.testing.assert_array_equal(level0, render_region(spec, 0, 0, 1100, 1000))
    level1 = _level(lossless_tiff.path, 1).astype(float)
    np.testing.assert_array_equal(level1, render_region(spec, 0, 0, 550, 500, level=1))
    mean0 = level0[:1000, :1100].astype(float).reshape(500, 2, 550, 2, 3).mean(axis=(1, 3))
    assert np.abs(level1 - mean0).max() <= 1.0  # the same up to uint8 rounding


def test_content_has_tissue_and_white_background(svs):
    rgb = _level(svs.path, 2).astype(float)
    white = (rgb.min(axis=2) > 235)
    assert 0.25 < white.mean() < 0.75  # tissue in the middle, glass around it
    assert white[0].all() and white[-1].all() and white[:, 0].all()  # slide borders are background
    tissue = rgb[~white]
    assert tissue[:, 1].mean() < tissue[:, 0].mean() - 30  # pink/purple: less green than red


def test_truth_file_matches_truth_region_and_counts(svs):
    labels = tifffile.imread(svs.truth_path)
    assert labels.dtype == np.uint32 and labels.shape == (1280, 1536)
    ids = np.unique(labels)
    assert ids[0] == 0 and len(ids) - 1 == svs.n_nuclei > 100
    np.testing.assert_array_equal(labels[200:900, 333:1400], truth_region(svs, 333, 200, 1067, 700))
    # a box sticking out of the slide is zero outside
    edge = truth_region(svs, 1400, 1200, 300, 200)
    np.testing.assert_array_equal(edge[:80, :136], labels[1200:, 1400:])
    assert not edge[80:].any() and not edge[:, 136:].any()


def test_truth_matches_the_image(svs):
    labels = tifffile.imread(svs.truth_path)
    rgb = _level(svs.path, 0).astype(float)
    tissue = rgb.min(axis=2) < 235
    nuc, stroma = rgb[labels > 0], rgb[(labels == 0) & tissue]
    assert nuc.sum(axis=1).mean() < stroma.sum(axis=1).mean() - 150  # nuclei are darker
    assert nuc[:, 2].mean() > nuc[:, 0].mean()  # and purple-blue: more blue than red
    assert stroma[:, 0].mean() > stroma[:, 2].mean()  # stroma is pink: more red than blue


def test_nucleus_table_sizes_and_centres(svs):
    table = nuclei_in_region(svs, 0, 0, 1536, 1280)
    labels = tifffile.imread(svs.truth_path)
    assert set(table) == {"id", "x", "y", "a", "b", "angle"}
    diam_um = 2 * table["a"] * 0.25
    assert diam_um.min() >= 5.0 and diam_um.max() <= 10.0
    centre = labels[table["y"].astype(int), table["x"].astype(int)]
    assert (centre == table["id"]).mean() > 0.97  # centres lie in their own nucleus
    present = set(np.unique(labels)) - {0}
    assert present <= set(table["id"].tolist()) | set(nuclei_in_region(svs, -40, -40, 1616, 1360)["id"].tolist())
    # some nuclei touch: 4-neighbour pixels with two different nucleus ids
    a, b = labels[:, :-1], labels[:, 1:]
    assert ((a > 0) & (b > 0) & (a != b)).sum() > 0


def test_regions_agree_across_tile_borders():
    spec = SlideSpec(3000, 3000, mpp=0.25, seed=11)
    whole = truth_region(spec, 1000, 1100, 512, 300)
    left, right = truth_region(spec, 1000, 1100, 200, 300), truth_region(spec, 1200, 1100, 312, 300)
    np.testing.assert_array_equal(whole, np.concatenate([left, right], axis=1))
    img = render_region(spec, 1000, 1100, 512, 300)
    np.testing.assert_array_equal(img[:150], render_region(spec, 1000, 1100, 512, 150))
    np.testing.assert_array_equal(img[150:], render_region(spec, 1000, 1250, 512, 150))
    assert whole.any()
    # deterministic per seed; a different seed moves the nuclei
    np.testing.assert_array_equal(whole, truth_region(SlideSpec(3000, 3000, mpp=0.25, seed=11), 1000, 1100, 512, 300))
    assert not np.array_equal(whole, truth_region(SlideSpec(3000, 3000, mpp=0.25, seed=12), 1000, 1100, 512, 300))


def test_load_test_slide_round_trips(svs):
    back = load_test_slide(svs.path)
    assert back == svs
    assert load_test_slide(svs.spec_path) == svs


def test_writer_memory_does_not_grow_with_slide_size(tmp_path):
    write_test_slide(tmp_path / "warm-up.svs", 256, 256)  # imports and first-use caches are not counted
    peaks = []
    for side in (1024, 3072):
        tracemalloc.start()
        write_test_slide(tmp_path / f"m{side}.svs", side, side, truth=True, seed=1)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    # 9x the pixels; the peak stays put (one tile row of work, fixed-size fields and textures)
    assert peaks[1] < 1.3 * peaks[0] + 2e6, peaks
    assert peaks[1] < 64e6, peaks


def test_level_dimensions_halve_down_to_one_tile():
    assert level_dimensions(1000, 1000, 256) == ((1000, 1000), (500, 500), (250, 250))
    assert level_dimensions(100_000, 100_000, 256)[-1] == (195, 195)
    assert len(level_dimensions(4096, 1024, 256, levels=2)) == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        (dict(flavour="ndpi"), ConfigError, "flavour"),
        (dict(compression="jpeg2000"), ConfigError, "compression"),
        (dict(tile=100), ConfigError, "multiple of 16"),
        (dict(mpp=0.0), ConfigError, "mpp"),
        (dict(quality=0), ConfigError, "quality"),
        (dict(nucleus_um=(12.0, 4.0)), ConfigError, "nucleus diameters"),
    ],
)
def test_bad_writer_arguments(tmp_path, kwargs, error, words):
    with pytest.raises(error, match=words) as info:
        write_test_slide(tmp_path / "x.svs", 256, 256, **kwargs)
    assert isinstance(info.value, HistopanError) and info.value.fix


def test_existing_files_are_not_overwritten(tmp_path):
    write_test_slide(tmp_path / "x.svs", 256, 256, truth=False)
    with pytest.raises(OutputError, match="file exists"):
        write_test_slide(tmp_path / "x.svs", 256, 256, truth=False)
    write_test_slide(tmp_path / "x.svs", 256, 256, truth=False, overwrite=True)
    with pytest.raises(OutputError, match="does not exist"):
        write_test_slide(tmp_path / "missing" / "x.svs", 256, 256)
