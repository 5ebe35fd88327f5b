"""Slide reading: real slides against OpenSlide and skimage references, seams, pickling, bad input."""

from __future__ import annotations

import logging
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from skimage.transform import rescale

from histopan.errors import MppError, RegionError, SlideError
from histopan.slide import OpenSlideReader, TifffileReader, open_slide

CMU = "cmu_small_region.svs"
TCGA = "tcga-cr-7395-01a-01-ts1.svs"


@pytest.fixture(scope="module")
def cmu(slides_dir: Path):
    with open_slide(slides_dir / CMU) as reader:
        yield reader


@pytest.fixture(scope="module")
def tcga(slides_dir: Path):
    with open_slide(slides_dir / TCGA, mpp=0.5) as reader:
        yield reader


def _rgb(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------- real slides


@pytest.mark.parametrize(
    ("name", "dims", "levels", "mpp", "vendor", "power", "assoc"),
    [
        (CMU, (2220, 2967), 1, 0.499, "aperio", 20.0, ["label", "macro", "thumbnail"]),
        (TCGA, (4443, 3567), 2, None, "aperio", None, ["thumbnail"]),
        ("small.svs", (16, 16), 1, 0.499, "aperio", 20.0, ["thumbnail"]),
        ("boxes_0.dcm", (16, 16), 1, 0.499, "dicom", 20.0, ["thumbnail"]),
        # boxes.tiff's resolution tags say 72 dpi (352.8 um/px): not a microscope pixel size, so unknown
        ("boxes.tiff", (300, 250), 4, None, "generic-tiff", None, []),
    ],
)
def test_real_slide_metadata(slides_dir, name, dims, levels, mpp, vendor, power, assoc):
    with open_slide(slides_dir / name) as reader:
        assert isinstance(reader, OpenSlideReader)
        assert reader.path == slides_dir / name
        assert reader.dimensions == dims
        assert reader.level_count == levels == len(reader.level_downsamples)
        assert reader.level_dimensions[0] == dims
        assert reader.level_downsamples[0] == 1.0
        assert list(reader.level_downsamples) == sorted(reader.level_downsamples)
        assert reader.mpp == (None if mpp is None else pytest.approx(mpp))
        assert reader.vendor == vendor
        assert reader.objective_power == power
        assert sorted(reader.associated_images) == assoc
        for key in assoc:
            img = reader.associated_images[key]
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.size > 0
        assert reader.properties["openslide.vendor"] == vendor
        px = reader.read_region(0, 0, dims[0], dims[1])
        assert px.shape == (dims[1], dims[0], 3) and px.dtype == np.uint8


def test_boxes_tiff_levels_match_openslide(slides_dir):
    path = slides_dir / "boxes.tiff"
    osr = openslide.OpenSlide(str(path))
    with open_slide(path) as reader:
        assert reader.level_dimensions == tuple(osr.level_dimensions)
        assert reader.level_downsamples == pytest.approx(osr.level_downsamples)
        # level 1 has downsample exactly 2: reading at half resolution on its grid is the raw level (fast path)
        half = reader.read_region(0, 0, 300, 250, out_size=(150, 125))
        ref = np.asarray(osr.read_region((0, 0), 1, (150, 125)).convert("RGB"))
        np.testing.assert_array_equal(half, ref)


@pytest.mark.parametrize(("name", "region"), [(CMU, (100, 200, 300, 250)), (CMU, (1917, 2711, 303, 256)),
                                              (TCGA, (3001, 17, 401, 333)), ("boxes.tiff", (0, 0, 300, 250))])
def test_level0_read_equals_openslide(slides_dir, name, region):
    x, y, w, h = region
    osr = openslide.OpenSlide(str(slides_dir / name))
    ref = np.asarray(osr.read_region((x, y), 0, (w, h)).convert("RGB"))
    with open_slide(slides_dir / name) as reader:
        np.testing.assert_array_equal(reader.read_region(x, y, w, h), ref)


def test_coarser_read_matches_skimage_rescale(cmu):
    full = cmu.read_region(0, 1000, 1024, 768)
    half = cmu.read_region(0, 1000, 1024, 768, mpp=2 * cmu.mpp)
    assert half.shape == (384, 512, 3)
    ref = rescale(full.astype(np.float64), 0.5, channel_axis=2, anti_aliasing=True, preserve_range=True)
    diff = np.abs(half.astype(np.float64) - ref)
    assert diff.mean() < 1.0
    assert np.percentile(diff, 99) < 6
    # and not just a plain decimation (which aliases): clearly closer to the filtered reference
    assert diff.mean() < np.abs(full[::2, ::2].astype(np.float64) - ref).mean() / 2


def test_pyramid_level_is_used_and_close_to_rescale(tcga):
    # 1.0 um/px with a 0.5 override = downsample 2: level 1 (downsample 2.0005) within the 1 % tolerance
    assert tcga.best_level(2.0) == 1
    assert tcga.best_level(1.9) == 0
    x, y, w, h = 1200, 1000, 1024, 1024
    coarse = tcga.read_region(x, y, w, h, mpp=1.0)
    full = tcga.read_region(x, y, w, h)
    ref = rescale(full.astype(np.float64), 0.5, channel_axis=2, anti_aliasing=True, preserve_range=True)
    assert coarse.shape == (512, 512, 3)
    # level 1 is the scanner's own downsample (JPEG 2000), so it differs from our rescale of level 0 by more
    # than a resample would, but it must be aligned (a one-pixel shift doubles the difference) ...
    diff = np.abs(coarse.astype(np.float64) - ref)
    assert diff.mean() < 9
    shifted = np.abs(coarse[:, 1:].astype(np.float64) - ref[:, :-1]).mean()
    assert diff.mean() < shifted * 0.75
    # ... and close to OpenSlide's own read of that level (we resample by 2 / 2.0005 from it)
    osr = openslide.OpenSlide(str(tcga.path))
    native = np.asarray(osr.read_region((x, y), 1, (512, 512)).convert("RGB")).astype(np.float64)
    assert np.abs(coarse - native).mean() < 5


def test_output_size_from_mpp_and_out_size(cmu):
    assert cmu.read_region(0, 0, 1000, 500, mpp=0.998).shape == (250, 500, 3)
    assert cmu.read_region(0, 0, 1000, 500, mpp=0.5).shape == (round(500 * 0.499 / 0.5), 998, 3)
    assert cmu.read_region(10.5, 20.25, 100, 80, out_size=(33, 17)).shape == (17, 33, 3)
    up = cmu.read_region(0, 0, 64, 64, mpp=0.2495)  # 2x upsampling
    assert up.shape == (128, 128, 3)


@pytest.mark.parametrize(("slide", "factor"), [("cmu", 1.002), ("cmu", 2.5), ("cmu", 7.0), ("tcga", 2.0),
                                               ("tcga", 3.3), ("cmu", 0.75)])
def test_tiles_on_a_common_grid_agree_exactly(request, slide, factor):
    reader = request.getfixturevalue(slide)
    mpp = reader.mpp * factor
    tile, step = 80, 48  # output pixels: neighbouring tiles overlap by 32 pixels
    tiles = {}
    for i in range(3):
        for j in range(3):
            x0, y0 = (70 + j * step) * factor, (90 + i * step) * factor
            tiles[i, j] = reader.read_region(x0, y0, tile * factor, tile * factor, mpp=mpp)
            assert tiles[i, j].shape == (tile, tile, 3)
    whole = reader.read_region(70 * factor, 90 * factor, (2 * step + tile) * factor, (2 * step + tile) * factor,
                               mpp=mpp)
    for (i, j), t in tiles.items():
        np.testing.assert_array_equal(t, whole[i * step:i * step + tile, j * step:j * step + tile])


@settings(max_examples=25, deadline=None)
@given(gx=st.integers(0, 300), gy=st.integers(0, 300), dx=st.integers(1, 40), dy=st.integers(1, 40),
       factor=st.sampled_from([1.5, 2.0, 2.75, 4.0]))
def test_overlapping_grid_reads_property(slides_dir, gx, gy, dx, dy, factor):
    with open_slide(slides_dir / TCGA, mpp=0.25) as reader:
        a = reader.read_region(gx * factor, gy * factor, 48 * factor, 48 * factor, mpp=0.25 * factor)
        b = reader.read_region((gx + dx) * factor, (gy + dy) * factor, 48 * factor, 48 * factor,
                               mpp=0.25 * factor)
    np.testing.assert_array_equal(a[dy:, dx:], b[:48 - dy, :48 - dx])


def test_read_at_slide_border(cmu):
    w, h = cmu.dimensions
    edge = cmu.read_region(w - 300, h - 300, 300, 300, mpp=3 * cmu.mpp)
    assert edge.shape == (100, 100, 3)
    whole = cmu.read_region(w - 600, h - 600, 600, 600, mpp=3 * cmu.mpp)
    np.testing.assert_array_equal(edge, whole[100:, 100:])


def test_pickle_round_trip_keeps_override_and_pixels(slides_dir, tcga):
    clone = pickle.loads(pickle.dumps(tcga))
    assert type(clone) is type(tcga) and clone.path == tcga.path
    assert clone.mpp == 0.5 and clone.identity == tcga.identity
    np.testing.assert_array_equal(clone.read_region(100, 100, 256, 256, mpp=1.3),
                                  tcga.read_region(100, 100, 256, 256, mpp=1.3))
    clone.close()


def test_concurrent_reads_from_threads_equal_serial_reads(tcga):
    boxes = [(x, y, 384, 384) for x in range(0, 3000, 700) for y in range(0, 2500, 900)]
    serial = [tcga.read_region(*b, mpp=1.1) for b in boxes]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda b: tcga.read_region(*b, mpp=1.1), boxes))
    for s, t in zip(serial, threaded):
        np.testing.assert_array_equal(s, t)


def test_identity_stable_across_copy_and_distinct_between_slides(slides_dir, tmp_path):
    copy = tmp_path / "elsewhere" / "renamed.svs"
    copy.parent.mkdir()
    shutil.copyfile(slides_dir / CMU, copy)
    ids = {}
    for path in (slides_dir / CMU, copy, slides_dir / TCGA, slides_dir / "small.svs", slides_dir / "boxes.tiff"):
        with open_slide(path) as reader:
            ids[path] = reader.identity
    assert ids[slides_dir / CMU] == ids[copy]
    assert len(set(ids.values())) == 4
    assert all(len(v) == 32 and int(v, 16) >= 0 for v in ids.values())


# ----------------------------------------------------------------------------------------- mpp


def test_missing_mpp_error_names_file_and_fix(slides_dir):
    with open_slide(slides_dir / TCGA) as reader:
        assert reader.mpp is None and reader.mpp_xy is None
        with pytest.raises(MppError) as err:
            reader.require_mpp()
        with pytest.raises(MppError):
            reader.read_region(0, 0, 100, 100, mpp=0.5)
        assert reader.read_region(0, 0, 10, 10).shape == (10, 10, 3)  # level-0 reads need no mpp
    msg = str(err.value)
    assert TCGA in msg and "no microns per pixel in its metadata" in msg and "--mpp 0.25" in msg


def test_override_replaces_metadata_mpp(slides_dir):
    with open_slide(slides_dir / CMU, mpp=0.25) as reader:
        assert reader.mpp == 0.25 and reader.mpp_xy == (0.25, 0.25) and reader.require_mpp() == 0.25
        assert reader.describe()["mpp_source"] == "override"
        assert reader.read_region(0, 0, 100, 100, mpp=0.5).shape == (50, 50, 3)


@pytest.mark.parametrize("bad", [0, -0.5, float("nan"), float("inf"), "abc"])
def test_invalid_mpp_raises_mpp_error(slides_dir, cmu, bad):
    with pytest.raises(MppError, match="mpp"):
        open_slide(slides_dir / CMU, mpp=bad)
    with pytest.raises(MppError):
        cmu.read_region(0, 0, 10, 10, mpp=bad)


# ----------------------------------------------------------------------------------------- regions


@pytest.mark.parametrize("region", [(-1, 0, 10, 10), (0, -5, 10, 10), (2215, 0, 10, 10), (0, 2960, 10, 10),
                                    (5000, 5000, 1, 1), (0, 0, 0, 10), (0, 0, 10, -3), (float("nan"), 0, 1, 1)])
def test_region_outside_or_empty_raises(cmu, region):
    with pytest.raises(RegionError) as err:
        cmu.read_region(*region)
    assert CMU in str(err.value) and "Fix:" in str(err.value)


def test_region_error_names_region_and_slide_size(cmu):
    with pytest.raises(RegionError, match=r"x=2200.*outside the slide of 2220 x 2967"):
        cmu.read_region(2200, 0, 100, 100)
    with pytest.raises(RegionError, match="out_size"):
        cmu.read_region(0, 0, 10, 10, out_size=(0, 5))


def test_closed_reader_raises(slides_dir):
    reader = open_slide(slides_dir / "small.svs")
    reader.close()
    with pytest.raises(SlideError, match="closed"):
        reader.read_region(0, 0, 4, 4)


# ----------------------------------------------------------------------------------------- tifffile backend


def test_ome_tiff_pyramid(tmp_path):
    rgb = _rgb(1, 512, 640)
    path = tmp_path / "pyr.ome.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(rgb, photometric="rgb", tile=(128, 128), subifds=1,
                 metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
        tw.write(rgb[::2, ::2], photometric="rgb", tile=(128, 128), subfiletype=1)
    with open_slide(path) as reader:
        assert isinstance(reader, TifffileReader)
        assert reader.vendor == "ome-tiff" and reader.mpp == 0.25
        assert reader.level_dimensions == ((640, 512), (320, 256)) and reader.level_downsamples == (1.0, 2.0)
        np.testing.assert_array_equal(reader.read_region(17, 33, 200, 100), rgb[33:133, 17:217])
        np.testing.assert_array_equal(reader.read_region(64, 32, 256, 128, mpp=0.5), rgb[::2, ::2][16:80, 32:160])
        assert reader.read_region(0, 0, 640, 512, mpp=1.0).shape == (128, 160, 3)  # downsample 4


def test_plain_tiff_with_cm_resolution_and_pickle(tmp_path):
    rgb = _rgb(2, 200, 300)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    with open_slide(path) as reader:
        assert isinstance(reader, TifffileReader) and reader.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(reader.read_region(0, 0, 300, 200), rgb)
        clone = pickle.loads(pickle.dumps(reader))
        np.testing.assert_array_equal(clone.read_region(5, 6, 70, 80), rgb[6:86, 5:75])


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_png_jpeg_are_one_level_slides_needing_mpp(tmp_path, suffix):
    rgb = _rgb(3, 120, 160)
    path = tmp_path / f"tile{suffix}"
    Image.fromarray(rgb).save(path, dpi=(300, 300))
    with open_slide(path) as reader:
        assert reader.level_count == 1 and reader.dimensions == (160, 120)
        assert reader.mpp is None  # dpi is not a microscope pixel size
        with pytest.raises(MppError, match=r"tile.*--mpp"):
            reader.require_mpp()
        px = reader.read_region(0, 0, 160, 120)
        with Image.open(path) as ref:  # JPEG is lossy: compare with Pillow's own decode
            np.testing.assert_array_equal(px, np.asarray(ref.convert("RGB")))
        if suffix == ".png":
            np.testing.assert_array_equal(px, rgb)
    with open_slide(path, mpp=0.5) as reader:
        assert reader.read_region(0, 0, 160, 120, mpp=1.0).shape == (60, 80, 3)


def test_transparent_pixels_become_white(tmp_path):
    rgb = _rgb(4, 64, 64)
    alpha = np.full((64, 64, 1), 255, np.uint8)
    alpha[:32] = 0
    alpha[32:, :16] = 128
    for tiled in (True, False):  # tiled -> OpenSlide (generic TIFF), stripped -> tifffile
        path = tmp_path / f"rgba_{tiled}.tif"
        tifffile.imwrite(path, np.concatenate([rgb, alpha], axis=2), photometric="rgb",
                         extrasamples=["unassalpha"], tile=(32, 32) if tiled else None)
        with open_slide(path) as reader:
            px = reader.read_region(0, 0, 64, 64)
        assert (px[:32] == 255).all()
        np.testing.assert_array_equal(px[32:, 16:], rgb[32:, 16:])
        expect = np.rint(rgb[32:, :16] * (128 / 255) + 255 * (1 - 128 / 255))
        assert np.abs(px[32:, :16].astype(int) - expect).max() <= 1


def test_grayscale_is_replicated_to_rgb(tmp_path, caplog):
    gray = np.random.default_rng(5).integers(0, 256, (100, 120), dtype=np.uint8)
    for tiled in (True, False):
        path = tmp_path / f"gray_{tiled}.tif"
        tifffile.imwrite(path, gray, tile=(32, 32) if tiled else None)
        with caplog.at_level(logging.DEBUG, logger="histopan"), open_slide(path) as reader:
            px = reader.read_region(0, 0, 120, 100)
            assert reader.greyscale and reader.describe()["greyscale"]
        for c in range(3):
            np.testing.assert_array_equal(px[..., c], gray)
        assert "greyscale" in caplog.text


def test_16bit_is_scaled_to_8bit_with_warning(tmp_path, caplog):
    img = np.random.default_rng(6).integers(0, 65536, (64, 80, 3), dtype=np.uint16)
    for tiled in (True, False):
        caplog.clear()
        path = tmp_path / f"deep_{tiled}.tif"
        tifffile.imwrite(path, img, photometric="rgb", tile=(32, 32) if tiled else None)
        with caplog.at_level(logging.WARNING, logger="histopan"), open_slide(path) as reader:
            px = reader.read_region(0, 0, 80, 64)
        np.testing.assert_array_equal(px, np.rint(img / 257.0).astype(np.uint8))
        assert "16-bit" in caplog.text and "257" in caplog.text


@pytest.mark.parametrize("tiled", [True, False])
def test_cmyk_is_refused(tmp_path, tiled):
    path = tmp_path / "cmyk.tif"
    tifffile.imwrite(path, _rgb(7, 64, 64)[..., [0, 1, 2, 0]], photometric="separated",
                     tile=(32, 32) if tiled else None)
    with pytest.raises(SlideError, match=r"cmyk\.tif: CMYK images are not supported.*Fix: convert it to 8-bit RGB"):
        open_slide(path)


def test_float_and_multichannel_images_are_refused(tmp_path):
    f = tmp_path / "float.tif"
    tifffile.imwrite(f, np.zeros((32, 32), np.float32))
    with pytest.raises(SlideError, match=r"float\.tif: pixel type float32 is not supported"):
        open_slide(f)
    z = tmp_path / "stack.tif"
    tifffile.imwrite(z, np.zeros((5, 32, 32), np.uint8), metadata={"axes": "ZYX"})
    with pytest.raises(SlideError, match=r"stack\.tif: the image has axes ZYX"):
        open_slide(z)


# ----------------------------------------------------------------------------------------- bad files


def test_missing_path(tmp_path):
    with pytest.raises(SlideError, match=r"nothere\.svs: slide file not found.*Fix: check the path"):
        open_slide(tmp_path / "nothere.svs")


def test_directory(tmp_path):
    with pytest.raises(SlideError, match=r"is a directory, not a slide file.*Fix: pass the slide file"):
        open_slide(tmp_path)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.svs"
    path.write_bytes(b"")
    with pytest.raises(SlideError, match=r"empty\.svs: the file is empty \(0 bytes\).*Fix: copy"):
        open_slide(path)


def test_text_file_named_svs(tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("this is a text file, not a slide\n")
    with pytest.raises(SlideError, match=r"notes\.svs: not a readable slide or image file.*Fix: pass a whole-slide"):
        open_slide(path)


def test_corrupt_png(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(SlideError, match=r"broken\.png: not a readable PNG/JPEG"):
        open_slide(path)


@pytest.mark.parametrize("keep", [0.5, 0.002])
def test_truncated_tiff(tmp_path, keep):
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, _rgb(8, 512, 512), photometric="rgb", tile=(128, 128), compression="zlib")
    data = full.read_bytes()
    path = tmp_path / "cut.svs"
    path.write_bytes(data[:max(8, int(len(data) * keep))])
    with pytest.raises(SlideError, match=r"cut\.svs: .*(truncated|cannot be read).*Fix: "):
        open_slide(path)


def test_snap_mpp_gives_the_raw_level_read(cmu, tcga):
    assert cmu.snap_mpp(0.5) == pytest.approx(0.499) and cmu.snap_mpp(0.6) == 0.6
    assert tcga.snap_mpp(1.0) == pytest.approx(0.5 * tcga.level_downsamples[1])
    mpp = cmu.snap_mpp(0.5)
    osr = openslide.OpenSlide(str(cmu.path))
    ref = np.asarray(osr.read_region((512, 1024), 0, (256, 256)).convert("RGB"))
    np.testing.assert_array_equal(cmu.read_region(512, 1024, 256, 256, mpp=mpp), ref)
