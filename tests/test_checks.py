"""The shared checks: one mpp check and one output check (OutputError, exit code 2 from the CLI)."""

import math
import os
from pathlib import Path

import numpy as np
import pytest

from histopan.checks import MPP_FIX, check_mpp, check_output
from histopan.cli import main
from histopan.config import from_dict
from histopan.errors import ConfigError, DataError, HistopanError, MppError, OutputError
from histopan.model.config import ModelConfig


@pytest.mark.parametrize("value", [0.25, 1, np.float32(0.5), np.float64(2.0), np.int64(1)])
def test_check_mpp_returns_a_float(value):
    out = check_mpp(value)
    assert isinstance(out, float) and out == pytest.approx(float(value))


@pytest.mark.parametrize("value", [0.0, -0.5, math.nan, math.inf, True, "0.5", None, [0.5]])
def test_check_mpp_refuses_anything_but_a_positive_finite_number(value, tmp_path):
    with pytest.raises(MppError, match="the slide's mpp must be a positive finite number of microns per pixel") as info:
        check_mpp(value, what="the slide's mpp", path=tmp_path / "s.svs")
    err = info.value
    assert err.path == str(tmp_path / "s.svs") and err.value is value and err.fix == MPP_FIX
    assert str(tmp_path / "s.svs") in str(err) and "Fix: " in str(err)


def test_check_mpp_raises_the_callers_error_class():
    with pytest.raises(ConfigError, match="--mpp must be") as info:
        check_mpp(-1.0, what="--mpp", error=ConfigError, fix="pass e.g. --mpp 0.5")
    assert info.value.fix == "pass e.g. --mpp 0.5" and info.value.value == -1.0
    # a config dataclass raises ValueError, which the loader turns into a ConfigError naming the file
    with pytest.raises(ValueError, match=r"mpp must be a positive finite number of microns per pixel, got 0"):
        check_mpp(0, error=ValueError)
    with pytest.raises(ConfigError, match="mpp must be a positive finite") as info:
        from_dict(ModelConfig, {"mpp": -0.5}, source="model.yaml")
    assert info.value.path == "model.yaml"


def test_every_stage_refuses_a_bad_mpp_the_same_way():
    from histopan.pipeline import SegmentOptions
    from histopan.tiling import TileGrid

    messages = []
    for call in (lambda: TileGrid(1000, 800, base_mpp=0.0, mpp=0.5, tile=256, halo=0),
                 lambda: SegmentOptions(mpp=math.nan)):
        with pytest.raises(HistopanError) as info:
            call()
        messages.append(info.value.reason)
    assert messages == ["the slide's mpp must be a positive finite number of microns per pixel",
                        "--mpp must be a positive finite number of microns per pixel"]


def test_meta_json_mpp_is_checked(tmp_path):
    from histopan.training.data import meta_mpp

    (tmp_path / "meta.json").write_text('{"mpp": Infinity}')
    with pytest.raises(DataError, match="the mpp of meta.json must be a positive finite number") as info:
        meta_mpp(tmp_path, None)
    assert info.value.path == str(tmp_path / "meta.json")
    (tmp_path / "meta.json").write_text('{"mpp": 0.5}')
    assert meta_mpp(tmp_path, None) == 0.5 and meta_mpp(tmp_path, 0.25) == 0.25


def test_output_error_is_a_histopan_error():
    assert issubclass(OutputError, HistopanError) and not issubclass(OutputError, DataError)


def test_check_output_accepts_a_writable_place(tmp_path):
    assert check_output(tmp_path / "x.geojson", suffixes=(".geojson",)) == tmp_path / "x.geojson"
    assert check_output(tmp_path / "OUT.zarr", folder=True, suffixes=(".zarr",)) == tmp_path / "OUT.zarr"
    (tmp_path / "exists.png").write_bytes(b"")
    assert check_output(tmp_path / "exists.png") == tmp_path / "exists.png"  # overwritten by default
    made = check_output(tmp_path / "a" / "b", create=True)
    assert made.is_dir()


def test_check_output_refusals_name_the_path_and_the_fix(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder.geojson").mkdir()
    cases = [
        (dict(path=tmp_path / "missing" / "x.zarr", folder=True), "the output folder does not exist",
         tmp_path / "missing"),
        (dict(path=tmp_path / "x.tif", suffixes=(".zarr",), folder=True), "the output must be a .zarr folder",
         tmp_path / "x.tif"),
        (dict(path=tmp_path / "x.txt", suffixes=(".geojson", ".geojson.gz")),
         "the output must be a .geojson or .geojson.gz file", tmp_path / "x.txt"),
        (dict(path=tmp_path / "file", folder=True), "the output path exists and is not a folder", tmp_path / "file"),
        (dict(path=tmp_path / "folder.geojson"), "the output path is a folder", tmp_path / "folder.geojson"),
        (dict(path=tmp_path / "file", overwrite=False), "the output file exists", tmp_path / "file"),
        (dict(path=tmp_path / "file" / "qc", create=True), "cannot create the output folder", tmp_path / "file" / "qc"),
    ]
    for kwargs, message, named in cases:
        with pytest.raises(OutputError) as info:
            check_output(**kwargs)
        assert info.value.reason.startswith(message), (kwargs, info.value.reason)
        assert info.value.path == str(named) and info.value.fix, kwargs


def test_check_output_refuses_a_folder_it_cannot_write(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        # root ignores folder permissions; /proc refuses new files even to root
        target = locked if not os.access(locked, os.W_OK) else Path("/proc/sys")
        assert not os.access(target, os.W_OK | os.X_OK), f"{target} should refuse new files to this user"
        with pytest.raises(OutputError, match="the output folder is not writable") as info:
            check_output(target / "x.geojson")
        assert info.value.path == str(target)
    finally:
        locked.chmod(0o700)


def test_cli_maps_an_output_error_to_exit_code_2(tmp_path, capsys):
    missing = tmp_path / "missing" / "out"
    assert main(["batch", str(tmp_path / "none-*.svs"), "-o", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "the output folder does not exist" in err and str(tmp_path / "missing") in err and "mkdir -p" in err
