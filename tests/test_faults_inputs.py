"""Hostile slides, images and YAML files through the real CLI: `info`, `segment` and `batch` (slide side).

Each bad input is a real file written here (tifffile, Pillow, raw bytes).  A refused input must end in exit
code 2 and exactly one line on stderr that names the file and the fix, with no traceback and no store left
behind; an input histopan can read (16-bit, alpha, a huge slide without a pyramid) must work, in bounded time.
"""

from __future__ import annotations

import csv
import json
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image

from histopan.cli import main
from histopan.config import MAX_YAML_VALUES, load_yaml
from histopan.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "default"
CMU = "cmu_small_region.svs"


# ------------------------------------------------------------------------------------------- file makers


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels (its data is one empty deflate stream)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


def _sparse_tiff(path: Path, width: int, height: int, tile: int = 512) -> Path:
    """A tiled 8-bit RGB TIFF of ``width`` x ``height`` whose tiles were never written (offsets and byte
    counts 0): a few hundred kilobytes on disk however large the image it declares."""
    n_tiles = -(-width // tile) * -(-height // tile)
    data = bytearray()

    def array(values: np.ndarray) -> int:
        offset = 8 + len(data)
        data.extend(values.tobytes())
        return offset

    bits = array(np.array([8, 8, 8], "<u2"))
    offsets = array(np.zeros(n_tiles, "<u4"))
    counts = array(np.zeros(n_tiles, "<u4"))
    short, long_ = 3, 4
    entries = [(256, long_, 1, width), (257, long_, 1, height), (258, short, 3, bits), (259, short, 1, 1),
               (262, short, 1, 2), (277, short, 1, 3), (284, short, 1, 1), (322, short, 1, tile),
               (323, short, 1, tile), (324, long_, n_tiles, offsets), (325, long_, n_tiles, counts)]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        ifd += (struct.pack("<HHIHH", tag, kind, count, value, 0) if kind == short and count == 1
                else struct.pack("<HHII", tag, kind, count, value))
    ifd += struct.pack("<I", 0)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8 + len(data)) + bytes(data) + ifd)
    return path


def _rgb(h: int = 256, w: int = 256, seed: int = 0) -> np.ndarray:
    """H&E-like colours: pink stroma with purple blobs."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.uint8)
    img[...] = (230, 160, 200)
    yy, xx = np.mgrid[:h, :w]
    for cy, cx in rng.integers(16, min(h, w) - 16, (20, 2)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 49] = (90, 40, 140)
    return img


@pytest.fixture
def hostile(tmp_path, slides_dir) -> dict[str, Path]:
    """Every hostile slide of the module, by case name."""
    files: dict[str, Path] = {}
    files["truncated-svs"] = tmp_path / "t.svs"  # the README's own example: head -c 102400
    files["truncated-svs"].write_bytes((slides_dir / CMU).read_bytes()[:102400])
    files["empty"] = tmp_path / "empty.svs"
    files["empty"].write_bytes(b"")
    files["text-as-svs"] = tmp_path / "notes.svs"
    files["text-as-svs"].write_text("patient notes, not a slide\n" * 20)
    files["png-bomb"] = _png_claiming(tmp_path / "bomb.png", 100_000, 100_000)
    files["directory"] = tmp_path / "folder.svs"
    files["directory"].mkdir()
    grey = tmp_path / "grey.tif"
    tifffile.imwrite(grey, _rgb().mean(axis=2).astype(np.uint8), tile=(64, 64),
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    files["greyscale"] = grey
    files["huge-no-pyramid"] = _sparse_tiff(tmp_path / "huge.tif", 200_000, 200_000)
    return files


#: what the one error line must say for each refused slide (besides the file's path and "Fix:")
NEEDLES = {
    "truncated-svs": "truncated or corrupt",
    "empty": "empty (0 bytes)",
    "text-as-svs": "not a readable slide",
    "png-bomb": "more pixels than a plain PNG/JPEG",
    "directory": "is a directory",
    "greyscale": "greyscale",
    "huge-no-pyramid": "no downsampled pyramid level",
}


def _one_error_line(err: str, command: str, path: Path, needle: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"histopan {command}: error: "), line
    assert str(path) in line and needle in line and "Fix:" in line, line
    assert "Traceback" not in err
    return line


# ------------------------------------------------------------------------------------------- info


@pytest.mark.parametrize("case", ["truncated-svs", "empty", "text-as-svs", "png-bomb", "directory"])
def test_info_refuses_a_hostile_slide_in_one_line(hostile, capsys, case):
    path = hostile[case]
    assert main(["info", str(path), "--mpp", "0.5"]) == 2
    _one_error_line(capsys.readouterr().err, "info", path, NEEDLES[case])


def test_info_refuses_an_unreadable_slide(hostile, capsys, monkeypatch):
    """Tests run as root, whom file modes do not stop, so a file without read permission is simulated by
    answering os.access(path, R_OK) with False for that file only; open_slide checks it before any read."""
    import os

    from histopan import slide as slide_module

    path = hostile["text-as-svs"]
    real_access = os.access
    monkeypatch.setattr(slide_module.os, "access",
                        lambda p, mode, **kw: False if Path(p) == path and mode & os.R_OK else real_access(p, mode,
                                                                                                           **kw))
    assert main(["info", str(path)]) == 2
    _one_error_line(capsys.readouterr().err, "info", path, "permission denied")


def test_info_reads_a_greyscale_slide_and_says_segment_needs_colour(hostile, capsys):
    path = hostile["greyscale"]
    assert main(["info", str(path)]) == 0
    captured = capsys.readouterr()
    assert "greyscale" in captured.out and "segment needs the colour (RGB) slide" in captured.err
    assert "Traceback" not in captured.err


def test_info_scans_a_huge_slide_without_a_pyramid_in_bounded_time(hostile, tmp_path, capsys):
    path = hostile["huge-no-pyramid"]
    thumb = tmp_path / "huge.png"
    t = time.perf_counter()
    assert main(["info", str(path), "--mpp", "0.25", "--json", "--thumbnail", str(thumb)]) == 0
    assert time.perf_counter() - t < 60  # reading all 40 gigapixels would take hours
    captured = capsys.readouterr()
    info = json.loads(captured.out)
    assert info["dimensions"] == [200_000, 200_000] and info["tissue_fraction"] == 0.0
    assert "sample" in captured.err  # the scan says it samples instead of reading everything
    assert max(Image.open(thumb).size) <= 256


def test_info_reads_16_bit_and_alpha_images(tmp_path, capsys):
    rgb = _rgb()
    deep = tmp_path / "deep.tif"
    tifffile.imwrite(deep, rgb.astype(np.uint16) * 257, photometric="rgb", tile=(64, 64))
    rgba = tmp_path / "alpha.png"
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(rgba)
    from histopan.slide import open_slide

    for path in (deep, rgba):
        assert main(["info", str(path), "--mpp", "0.5", "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["dimensions"] == [256, 256] and not info["greyscale"]
        with open_slide(path, mpp=0.5) as reader:
            np.testing.assert_array_equal(reader.read_region(0, 0, 256, 256), rgb)  # 16 bits / 257, alpha 255


# ------------------------------------------------------------------------------------------- segment


@pytest.mark.parametrize("case", ["truncated-svs", "empty", "text-as-svs", "png-bomb", "directory", "greyscale",
                                  "huge-no-pyramid"])
def test_segment_refuses_a_hostile_slide_and_leaves_no_store(hostile, tmp_path, capsys, case):
    path = hostile[case]
    out = tmp_path / "out.zarr"
    assert main(["segment", str(path), "-o", str(out), "--mpp", "0.5", "--model", str(DEFAULT_MODEL)]) == 2
    _one_error_line(capsys.readouterr().err, "segment", path, NEEDLES[case])
    assert not out.exists()


# ------------------------------------------------------------------------------------------- YAML


def _bomb(depth: int = 9, width: int = 9) -> str:
    """A 'billion laughs' YAML: ``width ** depth`` strings from a dozen lines."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, depth):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines)


def test_model_yaml_alias_bomb_is_refused_before_expansion(tmp_path, generated_png, capsys):
    model = tmp_path / "bomb-model"
    shutil.copytree(DEFAULT_MODEL, model)
    text = (model / "model.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    assert "training" in data
    body = "\n".join("  " + line for line in _bomb().splitlines())
    kept = yaml.safe_dump({k: v for k, v in data.items() if k != "training"}, sort_keys=False)
    (model / "model.yaml").write_text(kept + "training:\n" + body + "\n", encoding="utf-8")
    t = time.perf_counter()
    out = tmp_path / "out.zarr"
    assert main(["segment", str(generated_png), "-o", str(out), "--mpp", "0.5", "--model", str(model)]) == 2
    assert time.perf_counter() - t < 30
    _one_error_line(capsys.readouterr().err, "segment", model / "model.yaml", "aliases")
    assert not out.exists() or not (out / "zarr.json").is_file()


def test_training_config_alias_bomb_is_refused(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text("name: bomb\nnuclei:\n" + "\n".join("  " + line for line in _bomb().splitlines()) + "\n",
                      encoding="utf-8")
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    _one_error_line(capsys.readouterr().err, "train", config, "aliases")
    assert not (tmp_path / "run").exists()


def test_load_yaml_bounds_expanded_size_and_self_reference(tmp_path):
    small = tmp_path / "ok.yaml"
    small.write_text("base: &b {x: 1, y: [1, 2, 3]}\nother: *b\n", encoding="utf-8")
    assert load_yaml(small) == {"base": {"x": 1, "y": [1, 2, 3]}, "other": {"x": 1, "y": [1, 2, 3]}}
    loop = tmp_path / "loop.yaml"
    loop.write_text("a: &a [1, *a]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="refers to itself"):
        load_yaml(loop)
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_bomb(depth=7, width=10), encoding="utf-8")  # 9 * 10 ** 6 strings: just over the bound
    assert 9 * 10 ** 6 > MAX_YAML_VALUES
    with pytest.raises(ConfigError, match="alias"):
        load_yaml(bomb)
    big = tmp_path / "big.yaml"
    with big.open("w", encoding="utf-8") as fh:
        fh.write("# " + "x" * (9 * 2**20) + "\n")
    with pytest.raises(ConfigError, match="too large"):
        load_yaml(big)


@pytest.fixture
def generated_png(tmp_path) -> Path:
    path = tmp_path / "tile.png"
    Image.fromarray(_rgb()).save(path)
    return path


# ------------------------------------------------------------------------------------------- batch


def test_batch_records_each_hostile_slide_in_one_line_without_a_traceback(hostile, tmp_path, capfd):
    """A batch isolates failures (README): each bad slide fails alone with one line on stderr, its report row
    holds the same one-line error as `segment` gives, and no store is left that looks complete; the batch exits
    1 (slides failed), as it does for any failed slide."""
    cases = ["truncated-svs", "text-as-svs", "png-bomb", "greyscale", "huge-no-pyramid"]
    manifest = tmp_path / "slides.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "mpp", "name"])
        for case in cases:
            writer.writerow([str(hostile[case]), "0.5", case])
    out = tmp_path / "out"
    code = main(["-q", "batch", str(manifest), "-o", str(out), "--workers", "1", "--model", str(DEFAULT_MODEL),
                 "--dashboard-address", ":0"])
    captured = capfd.readouterr()
    assert code == 1
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == len(cases), captured.err  # one line per bad slide, nothing from the workers
    for case in cases:  # in whatever order the worker finished them
        (line,) = [line for line in lines if f"{hostile[case]} failed:" in line]
        assert NEEDLES[case] in line and "Fix:" in line, line
    rows = {row["name"]: row for row in csv.DictReader((out / "batch_report.csv").open(encoding="utf-8"))}
    assert set(rows) == set(cases)
    for case in cases:
        row = rows[case]
        assert row["status"] == "failed"
        assert "\n" not in row["error"] and str(hostile[case]) in row["error"] and NEEDLES[case] in row["error"]
        assert "Fix:" in row["error"]
        assert not (out / f"{case}.zarr" / "zarr.json").exists()


def test_local_dashboard_listens_on_localhost_only():
    import psutil

    from histopan.batch import local_address, local_cluster

    assert local_address(":8787") == "127.0.0.1:8787" and local_address("8787") == "127.0.0.1:8787"
    assert local_address("0.0.0.0:8787") == "0.0.0.0:8787" and local_address(None) is None
    with local_cluster(workers=1, dashboard_address=":0") as cluster:
        port = cluster.scheduler.http_server.port
        listening = [c.laddr.ip for c in psutil.Process().net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert listening and set(listening) <= {"127.0.0.1"}
        assert "127.0.0.1" in cluster.dashboard_link
