"""`histopan info`: text and JSON reports, the tissue thumbnail, and bad input -> exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from histopan.cli import main
from histopan.slide import open_slide

CMU = "cmu_small_region.svs"
TCGA = "tcga-cr-7395-01a-01-ts1.svs"


def test_info_text(slides_dir, capsys):
    assert main(["info", str(slides_dir / CMU)]) == 0
    out = capsys.readouterr().out
    assert "2220 x 2967 px" in out and "0.499 um/px (metadata)" in out and "aperio" in out
    assert "objective power:  20x" in out and "label, macro, thumbnail" in out
    assert "tissue fraction:" in out


def test_info_json_and_thumbnail(slides_dir, tmp_path, capsys):
    thumb = tmp_path / "cmu.png"
    assert main(["info", str(slides_dir / CMU), "--json", "--thumbnail", str(thumb)]) == 0
    info = json.loads(capsys.readouterr().out)
    with open_slide(slides_dir / CMU) as reader:
        assert info["identity"] == reader.identity
    assert info["dimensions"] == [2220, 2967] and info["level_count"] == 1
    assert info["level_dimensions"] == [[2220, 2967]] and info["level_downsamples"] == [1.0]
    assert info["mpp"] == pytest.approx(0.499) and info["objective_power"] == 20.0
    assert info["vendor"] == "aperio" and info["associated_images"] == ["label", "macro", "thumbnail"]
    assert 0.25 < info["tissue_fraction"] < 0.5
    img = np.asarray(Image.open(thumb))
    assert img.shape == (1024, round(2220 * 1024 / 2967), 3)  # long side 1024, aspect kept
    green = (img == (0, 200, 0)).all(axis=2)
    assert 50 < green.sum() < 0.2 * green.size  # an outline, not a filled mask
    assert not green[:10, :10].any()


def test_info_without_mpp_says_how_to_pass_it(slides_dir, capsys):
    assert main(["info", str(slides_dir / TCGA)]) == 0
    captured = capsys.readouterr()
    assert "mpp:              unknown (pass --mpp" in captured.out
    assert "--mpp" in captured.err and TCGA in captured.err
    assert main(["info", str(slides_dir / TCGA), "--mpp", "0.5", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mpp"] == 0.5 and info["mpp_source"] == "override" and info["level_count"] == 2


def _bad_files(tmp_path):
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    text = tmp_path / "text.svs"
    text.write_text("not a slide\n")
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, np.zeros((256, 256, 3), np.uint8), photometric="rgb", tile=(64, 64), compression="zlib")
    cut = tmp_path / "cut.tif"
    cut.write_bytes(good.read_bytes()[:600])
    cmyk = tmp_path / "cmyk.tif"
    tifffile.imwrite(cmyk, np.zeros((64, 64, 4), np.uint8), photometric="separated")
    return {
        "missing": ([str(tmp_path / "missing.svs")], "not found"),
        "directory": ([str(tmp_path)], "is a directory"),
        "empty": ([str(empty)], "empty (0 bytes)"),
        "text": ([str(text)], "not a readable slide"),
        "truncated": ([str(cut)], "truncated"),
        "cmyk": ([str(cmyk)], "CMYK"),
        "mpp0": ([str(good), "--mpp", "0"], "--mpp must be a positive finite number"),
        "mpp-negative": ([str(good), "--mpp", "-0.25"], "--mpp must be a positive finite number"),
        "thumb-not-png": ([str(good), "--mpp", "1", "--thumbnail", str(tmp_path / "t.jpg")], "must be a .png"),
    }


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "text", "truncated", "cmyk", "mpp0",
                                  "mpp-negative", "thumb-not-png"])
def test_bad_input_exits_2_with_file_and_fix(tmp_path, capsys, case):
    argv, needle = _bad_files(tmp_path)[case]
    assert main(["info", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("histopan info: error: ")
    assert needle in err and "Fix:" in err
    named = argv[-1] if case == "thumb-not-png" else argv[0]
    assert named in err
