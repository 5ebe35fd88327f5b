"""Fault and hostile-input suite for `histopan export qupath`, `qc`, `evaluate`, `train`, `tune` and `finetune`.

Each case runs the command as a user would (:func:`histopan.cli.main`) and checks what issue 30 asks of every
failure (:func:`fails`): exit code 2; exactly one line on stderr that names the file or argument, the value
and the fix; no traceback; nothing left behind that looks complete (no final output, no ``.part`` file); and
nothing that blocks a rerun (the same command with good input then works, see :func:`works`).

Honest stand-ins for faults a test cannot cause as root on a shared disk:

- read-only output folder: tests run as root, so ``chmod`` stops nothing; ``/proc`` refuses new files and
  folders even to root, and a path *under a file* cannot be created by anyone;
- full disk: ``/dev/full`` fails every write with ENOSPC.  A command writes its output under a temporary
  name first (``.NAME.PID.part``, or ``.NAME.part`` for the QC report); the test puts a symbolic link to
  /dev/full at that name, so the command's own writes hit a full "disk" and its own clean-up is tested
  (the link is the ``.part`` file that must not be left behind).

The training commands (train, finetune) are rerun for real once each; their other cases check that the
failed run left no checkpoint, which is what would make a rerun refuse ("run folder already holds a run").
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from PIL import Image

from histopan.cli import main
from histopan.config import from_dict
from histopan.export.qupath import _Writer
from histopan.model.checkpoint import save_model
from histopan.model.config import ModelConfig
from histopan.model.network import build_network
from histopan.testing_store import build_test_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_ARCH = {"arch": "unet", "encoder": "mobilenet_v2", "encoder_depth": 5, "decoder_channels": [16, 16, 8, 8, 8]}
GRID = {"nucleus_threshold": [0.5], "centre_threshold": [0.3], "boundary_weight": [0.5], "min_distance_um": [2.0]}


# ----------------------------------------------------------------------------------------------- helpers


def leftovers(*folders: Path) -> list[Path]:
    """Temporary files a command left in ``folders`` (``.part`` names, links included)."""
    found: list[Path] = []
    for folder in folders:
        if Path(folder).is_dir():
            found += [p for p in Path(folder).rglob("*") if ".part" in p.name or ".tmp-" in p.name]
    return found


def _run(capsys, argv: Sequence[str]) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(["-q", *map(str, argv)])
    except SystemExit as exc:  # argparse refuses an argument before the command runs
        code = exc.code
    return code, capsys.readouterr().err


def fails(capsys, argv: Sequence[str], names: Sequence[object] = (), *, absent: Sequence[Path] = (),
          clean: Sequence[Path] = ()) -> str:
    """Run the CLI: exit 2, exactly one stderr line naming each of ``names`` (file, argument, value) and the
    fix, no traceback, none of ``absent`` exists, no ``.part`` file in ``clean``.  Returns the line."""
    code, err = _run(capsys, argv)
    assert "Traceback" not in err, err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"histopan {argv[0]}") and ": error: " in line, line
    assert "Fix: " in line, line
    for name in names:
        assert str(name) in line, (name, line)
    for path in absent:
        assert not os.path.lexists(path), path
    assert not leftovers(*clean)
    return line


def works(capsys, argv: Sequence[str]) -> str:
    """The rerun with good input: exit 0.  Returns stdout."""
    capsys.readouterr()
    code = main(["-q", *map(str, argv)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def full_disk(out: Path, name: str | None = None) -> Path:
    """A link to /dev/full where the command will write its temporary file for ``out`` (see the module
    docstring); returns the link."""
    link = out.parent / (name or f".{out.name}.{os.getpid()}.part")
    link.symlink_to("/dev/full")
    return link


class _Unpickled:
    """Unpickling this creates ``path``: a pickle checkpoint that is ever unpickled leaves a trace."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _edit_attrs(store: Path, **changes) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["histopan"].update(changes)
    (store / "zarr.json").write_text(json.dumps(meta))


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "slide.zarr"
    build_test_store(path, shape=(256, 320), chunk=128, seed=11)
    return path


@pytest.fixture
def store_copy(store, tmp_path) -> Path:
    dst = tmp_path / "copy.zarr"
    shutil.copytree(store, dst)
    return dst


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny untrained model folder at 0.5 um/px."""
    cfg = from_dict(ModelConfig, {"name": "tiny", "architecture": TINY_ARCH, "mpp": 0.5})
    torch.manual_seed(0)
    return save_model(tmp_path_factory.mktemp("model") / "tiny", build_network(cfg), cfg)


@pytest.fixture
def bad_model(model, tmp_path) -> Path:
    """A copy of the tiny model for a case to spoil."""
    dst = tmp_path / "bad-model"
    shutil.copytree(model, dst)
    return dst


@pytest.fixture(scope="module")
def nucleus_set(tmp_path_factory, disc_nucleus_set) -> Path:
    return disc_nucleus_set(tmp_path_factory.mktemp("nuclei") / "set")


def _train_yaml(path: Path, data: Path, **kw) -> Path:
    cfg = {"model": {"name": "tiny", "architecture": TINY_ARCH, "mpp": 0.5},
           "nuclei": [{"path": str(data), "val": ["s2"]}], "tile_fraction": 0.0, "crop": 64, "batch_size": 2,
           "epochs": 1, "steps_per_epoch": 1, "warmup_steps": 1, "threads": 1, "device": "cpu", "tune": GRID, **kw}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _feature(geometry: dict, cls: str | None) -> dict:
    props: dict = {"objectType": "annotation"}
    if cls is not None:
        props["classification"] = {"name": cls}
    return {"type": "Feature", "geometry": geometry, "properties": props}


def _annotated_set(folder: Path) -> Path:
    """Three 96 x 96 images with discs (nuclei); per image a GeoJSON of points on them and a stroma box."""
    rng = np.random.default_rng(1)
    (folder / "images").mkdir(parents=True)
    (folder / "geojson").mkdir()
    yy, xx = np.mgrid[:96, :96]
    for i in range(3):
        img = np.full((96, 96, 3), (230, 200, 220), np.uint8)
        img[70:, :30] = (200, 120, 170)
        features = [_feature({"type": "Polygon", "coordinates": [[[0, 72], [28, 72], [28, 96], [0, 96], [0, 72]]]},
                             "stroma")]
        for k in range(6):
            cx, cy = 16 + 20 * (k % 4) + int(rng.integers(-2, 3)), 14 + 24 * (k // 4) + int(rng.integers(-2, 3))
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 16] = (80, 40, 140)
            features.append(_feature({"type": "Point", "coordinates": [cx + 0.5, cy + 0.5]}, "nucleus"))
        Image.fromarray(img).save(folder / "images" / f"a{i}.png")
        (folder / "geojson" / f"a{i}.geojson").write_text(json.dumps({"type": "FeatureCollection",
                                                                      "features": features}))
    (folder / "meta.json").write_text(json.dumps({"mpp": 0.5}))
    return folder


@pytest.fixture(scope="module")
def annotated(tmp_path_factory) -> Path:
    return _annotated_set(tmp_path_factory.mktemp("annotated") / "data")


@pytest.fixture
def ft(annotated, model, tmp_path):
    """A fine-tuning config over a private copy of the annotated set: (config path, data folder)."""
    data = tmp_path / "data"
    shutil.copytree(annotated, data)
    cfg = {"name": "ft", "base": str(model),
           "annotations": [{"images": str(data / "images"), "geojson": str(data / "geojson"), "val": ["a2"]}],
           "crop": 64, "batch_size": 2, "epochs": 1, "steps_per_epoch": 1, "warmup_steps": 1, "threads": 1,
           "device": "cpu"}
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, data


def _set_base(config: Path, base: Path) -> None:
    cfg = yaml.safe_load(config.read_text())
    cfg["base"] = str(base)
    config.write_text(yaml.safe_dump(cfg))


# ================================================================================================ export


def test_export_missing_parent_folder(capsys, store, tmp_path):
    out = tmp_path / "nope" / "x.geojson"
    fails(capsys, ["export", "qupath", store, "-o", out], [tmp_path / "nope", "does not exist", "mkdir -p"],
          absent=[tmp_path / "nope"])
    works(capsys, ["export", "qupath", store, "-o", tmp_path / "x.geojson"])


def test_export_file_in_the_way_of_the_folder(capsys, store, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    fails(capsys, ["export", "qupath", store, "-o", blocker / "x.geojson"], [blocker, "in the way"],
          clean=[tmp_path])
    assert blocker.read_text() == "a file, not a folder"
    works(capsys, ["export", "qupath", store, "-o", tmp_path / "x.geojson"])


def test_export_output_is_a_folder(capsys, store, tmp_path):
    folder = tmp_path / "x.geojson"
    folder.mkdir()
    fails(capsys, ["export", "qupath", store, "-o", folder], [folder, "is a folder"], clean=[tmp_path])
    works(capsys, ["export", "qupath", store, "-o", tmp_path / "y.geojson"])


def test_export_read_only_folder(capsys, store, tmp_path):
    out = Path("/proc/histopan-fault.geojson")
    fails(capsys, ["export", "qupath", store, "-o", out], ["/proc", "Fix: "], absent=[out])
    works(capsys, ["export", "qupath", store, "-o", tmp_path / "x.geojson"])


@pytest.mark.parametrize("big", [False, True], ids=["small", "over-1MiB"])
def test_export_full_disk_leaves_no_part_file(capsys, store, tmp_path_factory, tmp_path, big):
    """A small file fails when it is closed; a file over the writer's 1 MiB buffer fails while nuclei are
    still written, with the rest of the buffer unflushable (issue 30: abort() raised again there)."""
    if big:  # about 2,200 nuclei written as cells: 1.9 MB of GeoJSON
        store = tmp_path_factory.mktemp("big") / "big.zarr"
        build_test_store(store, shape=(768, 1024), chunk=256, seed=11, spacing_um=6.0)
    out = tmp_path / "x.geojson"
    full_disk(out)
    fails(capsys, ["export", "qupath", store, "-o", out, "--cells", "--workers", "1"],
          [out, "No space left on device"], absent=[out], clean=[tmp_path])
    works(capsys, ["export", "qupath", store, "-o", out, "--cells"])
    assert json.loads(out.read_text())["features"]


def test_export_abort_on_a_full_disk_does_not_raise_again(tmp_path):
    """More than the writer's buffer (1 MiB) is written before the disk is found full: the buffered rest
    cannot be flushed either, and abort() must still remove the .part file without raising."""
    out = tmp_path / "big.geojson"
    link = full_disk(out)
    writer = _Writer(out, None)
    assert writer.tmp == link
    with pytest.raises(OSError):
        for _ in range(8):
            writer.write(b"x" * 300_000, 1)
    writer.abort()
    assert not os.path.lexists(link) and not out.exists()


def test_export_not_a_store(capsys, store, tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    out = tmp_path / "x.geojson"
    fails(capsys, ["export", "qupath", folder, "-o", out], [folder, "not a zarr"], absent=[out], clean=[tmp_path])
    works(capsys, ["export", "qupath", store, "-o", out])


def test_export_store_with_garbage_metadata(capsys, store, tmp_path):
    bad = tmp_path / "bad.zarr"
    bad.mkdir()
    (bad / "zarr.json").write_text("{ not json")
    out = tmp_path / "x.geojson"
    fails(capsys, ["export", "qupath", bad, "-o", out], [bad, "cannot open"], absent=[out], clean=[tmp_path])
    works(capsys, ["export", "qupath", store, "-o", out])


def test_export_incomplete_store(capsys, tmp_path):
    partial = tmp_path / "partial.zarr"
    build_test_store(partial, shape=(128, 128), chunk=64, seed=2, complete=False)
    out = tmp_path / "x.geojson"
    fails(capsys, ["export", "qupath", partial, "-o", out], [partial, "incomplete", "--partial"], absent=[out],
          clean=[tmp_path])
    works(capsys, ["export", "qupath", partial, "-o", out, "--partial"])


def test_export_store_of_another_format_version(capsys, store, store_copy, tmp_path):
    _edit_attrs(store_copy, format_version=99)
    out = tmp_path / "x.geojson"
    fails(capsys, ["export", "qupath", store_copy, "-o", out], [store_copy, "format version 99"], absent=[out],
          clean=[tmp_path])
    works(capsys, ["export", "qupath", store, "-o", out])


def test_export_store_missing_its_table(capsys, store, store_copy, tmp_path):
    (store_copy / "tables" / "nuclei.parquet").unlink()
    out = tmp_path / "x.geojson"
    fails(capsys, ["export", "qupath", store_copy, "-o", out], [store_copy, "no nucleus table"], absent=[out],
          clean=[tmp_path])
    works(capsys, ["export", "qupath", store, "-o", out])


def test_export_store_with_a_truncated_table(capsys, store, store_copy, tmp_path):
    table = store_copy / "tables" / "nuclei.parquet"
    table.write_bytes(table.read_bytes()[:200])
    out = tmp_path / "x.geojson"
    fails(capsys, ["export", "qupath", store_copy, "-o", out], [table, "cannot be read"], absent=[out],
          clean=[tmp_path])
    works(capsys, ["export", "qupath", store, "-o", out])


@pytest.mark.parametrize("bbox, shown", [
    ("a,b,c,d", "'a,b,c,d'"),  # not numbers
    ("1,2,3", "'1,2,3'"),  # three numbers
    ("nan,0,100,100", "nan"),  # not finite
    ("0,0,1e400,100", "inf"),  # overflows to infinity
    ("0,0,-5,10", "-5.0"),  # negative size
    ("0,0,1e12,1e12", "1e+12"),  # huge: outside the slide
])
def test_export_bad_bbox(capsys, store, tmp_path, bbox, shown):
    out = tmp_path / "x.geojson"
    fails(capsys, ["export", "qupath", store, "-o", out, "--bbox", bbox], ["bbox", shown], absent=[out],
          clean=[tmp_path])
    works(capsys, ["export", "qupath", store, "-o", out, "--bbox", "0,0,200,200"])


def test_export_unknown_class_name(capsys, store, tmp_path):
    out = tmp_path / "x.geojson"
    fails(capsys, ["export", "qupath", store, "-o", out, "--classes", "Tumour"], ["Tumour", "tumour"],
          absent=[out], clean=[tmp_path])
    works(capsys, ["export", "qupath", store, "-o", out, "--classes", "tumour"])


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_export_non_finite_cell_expansion(capsys, store, tmp_path, value):
    out = tmp_path / "x.geojson"
    fails(capsys, ["export", "qupath", store, "-o", out, "--cells", "--cell-expansion", value],
          ["--cell-expansion", value], absent=[out])
    works(capsys, ["export", "qupath", store, "-o", out, "--cells", "--cell-expansion", "2"])


# ==================================================================================================== qc


def test_qc_not_a_store(capsys, store, tmp_path):
    out = tmp_path / "qc"
    fails(capsys, ["qc", tmp_path, "-o", out], [tmp_path, "not a zarr"], absent=[out])
    works(capsys, ["qc", store, "-o", out])


def test_qc_incomplete_store(capsys, tmp_path):
    partial = tmp_path / "partial.zarr"
    build_test_store(partial, shape=(128, 128), chunk=64, seed=2, complete=False)
    out = tmp_path / "qc"
    fails(capsys, ["qc", partial, "-o", out], [partial, "incomplete", "--partial"], absent=[out])
    works(capsys, ["qc", partial, "-o", out, "--partial"])


def test_qc_store_of_another_format_version(capsys, store, store_copy, tmp_path):
    _edit_attrs(store_copy, format_version="0")
    out = tmp_path / "qc"
    fails(capsys, ["qc", store_copy, "-o", out], [store_copy, "format version '0'"], absent=[out])
    works(capsys, ["qc", store, "-o", out])


def test_qc_file_in_the_way(capsys, store, tmp_path):
    out = tmp_path / "qc"
    out.write_text("a file")
    fails(capsys, ["qc", store, "-o", out], [out, "not a folder"])
    assert out.read_text() == "a file"
    works(capsys, ["qc", store, "-o", tmp_path / "qc2"])


def test_qc_read_only_place(capsys, store, tmp_path):
    out = Path("/proc/histopan-fault-qc")
    fails(capsys, ["qc", store, "-o", out], [out, "cannot create"], absent=[out])
    works(capsys, ["qc", store, "-o", tmp_path / "qc"])


def test_qc_full_disk_leaves_no_report_and_no_part_file(capsys, store, tmp_path):
    out = tmp_path / "qc"
    out.mkdir()
    full_disk(out / "synthetic-11.html", ".synthetic-11.html.part")
    fails(capsys, ["qc", store, "-o", out], [out, "No space left on device"],
          absent=[out / "synthetic-11.html", out / "overview.png"], clean=[out])
    assert "synthetic-11.html" in works(capsys, ["qc", store, "-o", out])
    assert (out / "synthetic-11.html").stat().st_size > 0


def test_qc_slide_that_is_not_a_slide(capsys, store, tmp_path):
    fake = tmp_path / "slide.svs"
    fake.write_text("not a slide")
    out = tmp_path / "qc"
    fails(capsys, ["qc", store, "-o", out, "--slide", fake], [fake], absent=[out / "synthetic-11.html"])
    works(capsys, ["qc", store, "-o", out])


def test_qc_bad_crop_count(capsys, store, tmp_path):
    out = tmp_path / "qc"
    fails(capsys, ["qc", store, "-o", out, "--crops", "0"], ["--crops", "'0'"], absent=[out])
    works(capsys, ["qc", store, "-o", out, "--crops", "1"])


# ============================================================================================== evaluate


@pytest.fixture
def labels(tmp_path) -> tuple[Path, Path]:
    """A truth instance map and a prediction of it (32 x 32, uint16)."""
    truth = np.zeros((32, 32), np.uint16)
    truth[4:12, 4:12] = 1
    truth[18:28, 16:30] = 2
    pred = np.roll(truth, 1, axis=1)
    tifffile.imwrite(tmp_path / "truth.tif", truth)
    tifffile.imwrite(tmp_path / "pred.tif", pred)
    return tmp_path / "pred.tif", tmp_path / "truth.tif"


@pytest.mark.parametrize("case", ["shape", "empty", "float", "negative", "rgb", "text"])
def test_evaluate_bad_label_images(capsys, labels, tmp_path, case):
    pred, truth = labels
    bad = tmp_path / "bad.tif"
    if case == "shape":
        tifffile.imwrite(bad, np.zeros((32, 40), np.uint16))
        names = [bad, "(32, 40)", "differ in size"]
    elif case == "empty":
        bad.write_bytes(b"")
        names = [bad, "0 bytes"]
    elif case == "float":
        tifffile.imwrite(bad, np.full((32, 32), 1.5, np.float32))
        names = [bad, "float32"]
    elif case == "negative":
        tifffile.imwrite(bad, np.full((32, 32), -3, np.int16))
        names = [bad, "-3", "negative"]
    elif case == "rgb":
        bad = tmp_path / "bad.png"
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(bad)
        names = [bad, "(32, 32, 3)"]
    else:
        bad.write_text("this is not a TIFF file\n" * 4)
        names = [bad, "cannot read"]
    out = tmp_path / "scores.json"
    fails(capsys, ["evaluate", "--pred", bad, "--truth", truth, "--json", out], names, absent=[out],
          clean=[tmp_path])
    assert "pq" in works(capsys, ["evaluate", "--pred", pred, "--truth", truth, "--json", out])
    assert json.loads(out.read_text())["all"]


def test_evaluate_json_under_a_file(capsys, labels, tmp_path):
    pred, truth = labels
    out = truth / "scores.json"  # truth.tif is a file
    fails(capsys, ["evaluate", "--pred", pred, "--truth", truth, "--json", out], [truth, "in the way"])
    works(capsys, ["evaluate", "--pred", pred, "--truth", truth, "--json", tmp_path / "scores.json"])


def test_evaluate_json_is_a_folder(capsys, labels, tmp_path):
    pred, truth = labels
    out = tmp_path / "scores.json"
    out.mkdir()
    fails(capsys, ["evaluate", "--pred", pred, "--truth", truth, "--json", out], [out, "is a folder"])
    works(capsys, ["evaluate", "--pred", pred, "--truth", truth, "--json", tmp_path / "s.json"])


def test_evaluate_json_in_a_read_only_place(capsys, labels, tmp_path):
    pred, truth = labels
    out = Path("/proc/histopan-fault.json")
    fails(capsys, ["evaluate", "--pred", pred, "--truth", truth, "--json", out], [out], absent=[out])
    works(capsys, ["evaluate", "--pred", pred, "--truth", truth, "--json", tmp_path / "s.json"])


def test_evaluate_json_to_a_device(capsys, labels, tmp_path):
    pred, truth = labels
    fails(capsys, ["evaluate", "--pred", pred, "--truth", truth, "--json", "/dev/full"], ["/dev/full", ".json"])
    device = tmp_path / "full.json"  # a name that passes the suffix check, for a device
    device.symlink_to("/dev/full")
    fails(capsys, ["evaluate", "--pred", pred, "--truth", truth, "--json", device], [device, "not a regular file"])
    assert Path("/dev/full").is_char_device() and device.is_symlink()
    works(capsys, ["evaluate", "--pred", pred, "--truth", truth, "--json", tmp_path / "s.json"])


def test_evaluate_json_on_a_full_disk(capsys, labels, tmp_path):
    pred, truth = labels
    out = tmp_path / "scores.json"
    full_disk(out)
    fails(capsys, ["evaluate", "--pred", pred, "--truth", truth, "--json", out], [out, "No space left"],
          absent=[out], clean=[tmp_path])
    works(capsys, ["evaluate", "--pred", pred, "--truth", truth, "--json", out])
    assert json.loads(out.read_text())["all"]


@pytest.mark.parametrize("argv, shown", [
    (["--iou-threshold", "nan"], "nan"),
    (["--iou-threshold", "1.5"], "1.5"),
    (["--points", "--radius-um", "inf"], "--radius-um"),
    (["--points", "--radius-um", "3", "--mpp", "nan"], "--mpp"),
])
def test_evaluate_bad_numbers(capsys, labels, argv, shown):
    pred, truth = labels
    fails(capsys, ["evaluate", "--pred", pred, "--truth", truth, *argv], [shown])
    works(capsys, ["evaluate", "--pred", pred, "--truth", truth])


@pytest.fixture
def class_maps(tmp_path) -> tuple[Path, Path]:
    """A truth tissue map in the user's values (0 background, 255 tumour) and a prediction in the same values."""
    truth = np.zeros((32, 32), np.uint8)
    truth[:, 16:] = 255
    pred = np.roll(truth, 2, axis=1)
    Image.fromarray(truth).save(tmp_path / "truth.png")
    Image.fromarray(pred).save(tmp_path / "pred.png")
    return tmp_path / "pred.png", tmp_path / "truth.png"


@pytest.mark.parametrize("case", ["value", "no-equals", "name", "empty", "duplicate", "not-a-map", "yaml", "list",
                                  "no-map", "size", "points"])
def test_evaluate_semantic_bad_maps_and_sizes(capsys, class_maps, tmp_path, case):
    pred, truth = class_maps
    good = "0=background,255=tumour"
    spec, extra, names = good, [], []
    if case == "value":
        spec, names = "0=background,x=tumour", ["--semantic-map", "'x'", "whole number"]
    elif case == "no-equals":
        spec, names = "0=background;255=tumour", ["--semantic-map", "'0=background;255=tumour'", "VALUE=CLASS"]
    elif case == "name":
        spec, names = "0=background,255=", ["--semantic-map", "255", "no class name"]
    elif case == "empty":
        spec = tmp_path / "map.json"
        spec.write_text("{}")
        names = [spec, "empty"]
    elif case == "duplicate":
        spec, names = "0=background,00=tumour", ["--semantic-map", "0", "twice"]
    elif case == "not-a-map":
        spec, names = "background", ["--semantic-map", "'background'", "not a class map"]
    elif case == "yaml":
        spec = tmp_path / "map.yaml"
        spec.write_text("0: [background\n")
        names = [spec, "cannot read the class map"]
    elif case == "list":
        spec = tmp_path / "map.json"
        spec.write_text('["background", "tumour"]')
        names = [spec, "'list'", "mapping"]
    elif case == "no-map":
        spec, names = None, [truth, "--semantic-map"]
        extra = ["--semantic"]
    elif case == "size":
        pred = tmp_path / "small.png"
        Image.fromarray(np.zeros((32, 40), np.uint8)).save(pred)
        names = [pred, "(32, 40)", "differ in size"]
    else:
        extra, names = ["--points"], ["--points"]
    out = tmp_path / "scores.json"
    argv = ["evaluate", "--pred", pred, "--truth", truth, *extra, "--json", out]
    fails(capsys, argv + ([] if spec is None else ["--semantic-map", spec]), names, absent=[out], clean=[tmp_path])
    pred, truth = class_maps
    result = works(capsys, ["evaluate", "--pred", pred, "--truth", truth, "--semantic-map", good, "--json", out])
    assert "mean_iou" in result and json.loads(out.read_text())["pixels"] == 32 * 32


def test_evaluate_semantic_store_unknown_class_and_size(capsys, store, tmp_path):
    truth = tmp_path / "truth.png"
    Image.fromarray(np.zeros((256, 320), np.uint8)).save(truth)
    fails(capsys, ["evaluate", "--pred", store, "--truth", truth, "--semantic-map", "0=background,255=tumor"],
          ["--semantic-map", "'tumor'", "255", "tumour"])
    fails(capsys, ["evaluate", "--pred", store, "--truth", truth, "--semantic-map", "0=background",
                   "--pred-map", "0=background"], [store, "--pred-map"])
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(small)
    fails(capsys, ["evaluate", "--pred", store, "--truth", small, "--semantic"], [small, "100 x 100", "320 x 256"])
    assert "pixel_accuracy" in works(capsys, ["evaluate", "--pred", store, "--truth", truth, "--semantic-map",
                                              "0=background,255=tumour"])


def _points(path: Path, coords: Sequence) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": c}, "properties": {}} for c in coords]}))
    return path


@pytest.mark.parametrize("case", ["malformed", "empty", "nan", "inf", "string", "features", "polygon"])
def test_evaluate_bad_point_files(capsys, tmp_path, case):
    truth = _points(tmp_path / "truth.geojson", [[10, 10], [20, 20]])
    good = _points(tmp_path / "good.geojson", [[10.5, 10], [20, 21]])
    bad = tmp_path / "pred.geojson"
    if case == "malformed":
        bad.write_text(good.read_text()[:-7])
        names = [bad, "not valid JSON"]
    elif case == "empty":
        bad.write_bytes(b"")
        names = [bad, "not valid JSON"]
    elif case == "nan":
        bad.write_text(good.read_text().replace("10.5", "NaN"))
        names = [bad, "non-finite", "nan"]
    elif case == "inf":
        bad.write_text(good.read_text().replace("10.5", "1e400"))
        names = [bad, "non-finite", "inf"]
    elif case == "string":
        bad.write_text(good.read_text().replace("[10.5, 10]", '"10.5,10"'))
        names = [bad, "feature 0"]
    elif case == "features":
        bad.write_text(json.dumps({"type": "FeatureCollection", "features": {"a": 1}}))
        names = [bad, "'features'"]
    else:
        bad.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": {
            "type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 0]]]}}))
        names = [bad, "not a point", "Polygon"]
    fails(capsys, ["evaluate", "--points", "--pred", bad, "--truth", truth, "--mpp", "0.5"], names)
    assert "f1" in works(capsys, ["evaluate", "--points", "--pred", good, "--truth", truth, "--mpp", "0.5"])


def test_evaluate_huge_point_coordinates(capsys, tmp_path):
    """Finite but huge coordinates (beyond any image) are refused; scipy's matching would overflow on them."""
    truth = _points(tmp_path / "truth.geojson", [[10, 10], [20, 20]])
    pred = _points(tmp_path / "pred.geojson", [[1e300, 10], [20, 21]])
    out = tmp_path / "points.json"
    fails(capsys, ["evaluate", "--points", "--pred", pred, "--truth", truth, "--mpp", "0.5", "--json", out],
          [pred, "1e+300", "point 0"], absent=[out], clean=[tmp_path])
    pred = _points(tmp_path / "pred.geojson", [[1e6, 10], [20, 21]])  # far, but inside a (huge) image: a miss
    works(capsys, ["evaluate", "--points", "--pred", pred, "--truth", truth, "--mpp", "0.5", "--json", out])
    scores = json.loads(out.read_text())["all"]
    assert (scores["tp"], scores["fp"], scores["fn"]) == (1, 1, 1)


# ================================================================================================= train


def test_train_yaml_python_tag_is_never_constructed(capsys, nucleus_set, tmp_path):
    marker = tmp_path / "constructed"
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"model: !!python/object/apply:builtins.open ['{marker}', 'w']\nnuclei: []\n")
    run = tmp_path / "run"
    fails(capsys, ["train", cfg, "--out", run], [cfg, "python/object"], absent=[marker, run / "model"])


def test_train_malformed_yaml(capsys, nucleus_set, tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("model: [unclosed\nnuclei:\n  - path: x\n")
    run = tmp_path / "run"
    fails(capsys, ["train", cfg, "--out", run], [cfg, "line"], absent=[run])


def test_train_non_finite_learning_rate(capsys, nucleus_set, tmp_path):
    cfg = _train_yaml(tmp_path / "train.yaml", nucleus_set, lr=float("nan"))
    run = tmp_path / "run"
    fails(capsys, ["train", cfg, "--out", run], [cfg, "lr", "nan"], absent=[run])


def _no_checkpoint(run: Path) -> None:
    """A failed run leaves nothing that looks complete and nothing that makes a rerun refuse."""
    assert not (run / "model").exists()
    assert not (run / "checkpoints" / "last" / "state.json").exists()


@pytest.mark.parametrize("case", ["truncated", "pickle", "not-safetensors"])
def test_train_bad_init_model(capsys, nucleus_set, bad_model, tmp_path, case):
    weights = bad_model / "weights.safetensors"
    marker = tmp_path / "unpickled"
    if case == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        shown = "truncated|corrupt"
    elif case == "pickle":
        weights.write_bytes(pickle.dumps(_Unpickled(marker), protocol=2))
        shown = "pickle"
    else:
        weights.write_text("hello")
        shown = "not a safetensors"
    cfg = _train_yaml(tmp_path / "train.yaml", nucleus_set, init=str(bad_model))
    run = tmp_path / "run"
    line = fails(capsys, ["train", cfg, "--out", run], [weights], absent=[marker])
    assert any(word in line for word in shown.split("|")), line
    _no_checkpoint(run)


@pytest.mark.parametrize("case", ["negative", "float"])
def test_train_bad_label_images(capsys, nucleus_set, tmp_path, case):
    data = tmp_path / "set"
    shutil.copytree(nucleus_set, data)
    bad = data / "labels" / "s1.tif"
    lab = tifffile.imread(bad).astype(np.int32)
    if case == "negative":
        lab[0, :5] = -7
        tifffile.imwrite(bad, lab)
        names = [bad, "-7"]
    else:
        tifffile.imwrite(bad, lab.astype(np.float32) + 0.5)
        names = [bad, "float32"]
    cfg = _train_yaml(tmp_path / "train.yaml", data)
    run = tmp_path / "run"
    fails(capsys, ["train", cfg, "--out", run], names)
    _no_checkpoint(run)


def test_train_out_is_a_file_then_a_rerun_trains(capsys, nucleus_set, tmp_path):
    cfg = _train_yaml(tmp_path / "train.yaml", nucleus_set)
    blocker = tmp_path / "run"
    blocker.write_text("a file")
    fails(capsys, ["train", cfg, "--out", blocker], [blocker, "in the way"])
    fails(capsys, ["train", cfg, "--out", blocker / "sub"], [blocker, "in the way"])
    assert blocker.read_text() == "a file"
    out = works(capsys, ["train", cfg, "--out", tmp_path / "good", "--no-progress"])
    assert "validation nucleus PQ" in out and (tmp_path / "good" / "model" / "weights.safetensors").is_file()


def test_train_and_finetune_export_folder_in_the_way(capsys, nucleus_set, ft, tmp_path):
    """--export is checked before training, not after it."""
    blocker = tmp_path / "models"
    blocker.write_text("a file")
    cfg = _train_yaml(tmp_path / "train.yaml", nucleus_set)
    fails(capsys, ["train", cfg, "--out", tmp_path / "run", "--export", blocker / "tiny"], [blocker, "--export"])
    _no_checkpoint(tmp_path / "run")
    config, _ = ft
    fails(capsys, ["finetune", config, "--out", tmp_path / "ftrun", "--export", blocker], [blocker, "--export"])
    assert not (tmp_path / "ftrun").exists()


def test_train_out_in_a_read_only_place(capsys, nucleus_set, tmp_path):
    cfg = _train_yaml(tmp_path / "train.yaml", nucleus_set)
    run = Path("/proc/histopan-fault-run")
    fails(capsys, ["train", cfg, "--out", run], [run], absent=[run])


# ================================================================================================== tune


@pytest.fixture
def tune_cfg(nucleus_set, tmp_path) -> Path:
    return _train_yaml(tmp_path / "tune.yaml", nucleus_set)


@pytest.mark.parametrize("case", ["truncated", "pickle", "yaml-tag", "malformed-yaml", "wrong-classes"])
def test_tune_bad_model(capsys, model, bad_model, tune_cfg, tmp_path, case):
    weights, config = bad_model / "weights.safetensors", bad_model / "model.yaml"
    marker = tmp_path / "unpickled"
    if case == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
        names = [weights]
    elif case == "pickle":
        weights.write_bytes(pickle.dumps(_Unpickled(marker), protocol=2))
        names = [weights, "pickle"]
    elif case == "yaml-tag":
        config.write_text(config.read_text() + f"extra: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
        names = [config, "python/object"]
    elif case == "malformed-yaml":
        config.write_text(config.read_text() + "classes: [unclosed\n")
        names = [config, "YAML"]
    else:  # one class more than the weights were trained for
        data = yaml.safe_load(config.read_text())
        data["classes"] = [{"name": "background", "color": [255, 255, 255], "kind": "stuff"},
                           {"name": "stroma", "color": [240, 160, 200], "kind": "stuff"},
                           {"name": "fat", "color": [250, 250, 150], "kind": "stuff"},
                           {"name": "necrosis", "color": [120, 120, 40], "kind": "stuff"},
                           {"name": "tumour", "color": [200, 40, 40], "kind": "stuff"},
                           {"name": "nucleus", "color": [40, 40, 220], "kind": "thing"}]
        config.write_text(yaml.safe_dump(data))
        names = [weights, "output channels"]
    out = tmp_path / "tuned"
    fails(capsys, ["tune", bad_model, "--config", tune_cfg, "--device", "cpu", "--out", out], names,
          absent=[marker, out])
    assert "validation nucleus PQ" in works(capsys, ["tune", model, "--config", tune_cfg, "--device", "cpu",
                                                     "--out", out])


def test_tune_renamed_classes(capsys, bad_model, tune_cfg, tmp_path):
    config = bad_model / "model.yaml"
    data = yaml.safe_load(config.read_text())
    names = [c["name"] for c in data["classes"]]
    i, j = names.index("stroma"), names.index("necrosis")
    data["classes"][i]["name"], data["classes"][j]["name"] = "necrosis", "stroma"
    config.write_text(yaml.safe_dump(data))
    fails(capsys, ["tune", bad_model, "--config", tune_cfg, "--device", "cpu"], [bad_model, "stroma"])


def test_tune_config_errors(capsys, model, tune_cfg, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tune: {nucleus_threshold: [0.5]\n")
    fails(capsys, ["tune", model, "--config", bad, "--device", "cpu"], [bad, "YAML"])
    bad.write_text(yaml.safe_dump({**yaml.safe_load(tune_cfg.read_text()), "lr": float("inf")}))
    fails(capsys, ["tune", model, "--config", bad, "--device", "cpu"], [bad, "lr must be finite", "inf"])
    works(capsys, ["tune", model, "--config", tune_cfg, "--device", "cpu"])


def test_tune_out_is_a_file(capsys, model, tune_cfg, tmp_path):
    out = tmp_path / "tuned"
    out.write_text("a file")
    fails(capsys, ["tune", model, "--config", tune_cfg, "--device", "cpu", "--out", out], [out, "not a folder"])
    assert out.read_text() == "a file"
    works(capsys, ["tune", model, "--config", tune_cfg, "--device", "cpu", "--out", tmp_path / "tuned2"])


def test_tune_out_in_a_read_only_place(capsys, model, tune_cfg, tmp_path):
    out = Path("/proc/histopan-fault-model")
    fails(capsys, ["tune", model, "--config", tune_cfg, "--device", "cpu", "--out", out], [out], absent=[out])
    works(capsys, ["tune", model, "--config", tune_cfg, "--device", "cpu", "--out", tmp_path / "tuned"])


# ============================================================================================== finetune


@pytest.mark.parametrize("case", ["malformed", "empty", "nan", "huge", "wrong-types", "features", "bad-class"])
def test_finetune_bad_annotations(capsys, ft, tmp_path, case):
    config, data = ft
    geo = data / "geojson" / "a1.geojson"
    doc = json.loads(geo.read_text())
    if case == "malformed":
        geo.write_text(geo.read_text()[:-10])
        names = [geo, "not valid JSON"]
    elif case == "empty":
        geo.write_bytes(b"")
        names = [geo, "not valid JSON"]
    elif case == "nan":
        doc["features"][1]["geometry"]["coordinates"] = [float("nan"), 5.0]
        geo.write_text(json.dumps(doc))  # json writes NaN, as some tools do
        names = [geo, "non-finite", "nan"]
    elif case == "huge":
        doc["features"][1]["geometry"]["coordinates"] = [1e12, 5.0]
        geo.write_text(json.dumps(doc))
        names = [geo, "outside", "a1.png"]
    elif case == "wrong-types":
        doc["features"][1]["geometry"]["coordinates"] = {"x": 1, "y": 2}
        geo.write_text(json.dumps(doc))
        names = [geo, "feature 1"]
    elif case == "features":
        geo.write_text(json.dumps({"type": "FeatureCollection", "features": "none"}))
        names = [geo, "'features'"]
    else:
        doc["features"][1]["properties"]["classification"] = 42
        geo.write_text(json.dumps(doc))
        names = [geo, "classification", "42"]
    run = tmp_path / "run"
    fails(capsys, ["finetune", config, "--out", run, "--no-progress"], names)
    _no_checkpoint(run)


def test_finetune_image_that_cannot_be_read(capsys, ft, tmp_path):
    config, data = ft
    image = data / "images" / "a1.png"
    image.write_bytes(image.read_bytes()[:40])
    run = tmp_path / "run"
    fails(capsys, ["finetune", config, "--out", run, "--no-progress"], [image, "cannot read"])
    _no_checkpoint(run)


def test_finetune_image_smaller_than_its_annotations(capsys, ft, tmp_path):
    config, data = ft
    image = data / "images" / "a1.png"
    Image.fromarray(np.asarray(Image.open(image))[:40, :40]).save(image)
    run = tmp_path / "run"
    fails(capsys, ["finetune", config, "--out", run, "--no-progress"], [data / "geojson" / "a1.geojson", "40 x 40"])
    _no_checkpoint(run)


@pytest.mark.parametrize("case", ["truncated", "pickle", "yaml-tag"])
def test_finetune_bad_base_model(capsys, ft, bad_model, tmp_path, case):
    config, _ = ft
    weights = bad_model / "weights.safetensors"
    marker = tmp_path / "unpickled"
    if case == "truncated":
        weights.write_bytes(weights.read_bytes()[:5000])
        names = [weights]
    elif case == "pickle":
        weights.write_bytes(pickle.dumps(_Unpickled(marker), protocol=2))
        names = [weights, "pickle"]
    else:
        cfgfile = bad_model / "model.yaml"
        cfgfile.write_text(f"!!python/object/apply:builtins.open ['{marker}', 'w']\n")
        names = [cfgfile, "python/object"]
    _set_base(config, bad_model)
    run = tmp_path / "run"
    fails(capsys, ["finetune", config, "--out", run, "--no-progress"], names, absent=[marker])
    _no_checkpoint(run)


def test_finetune_out_is_a_file_then_a_rerun_trains(capsys, ft, tmp_path):
    config, _ = ft
    blocker = tmp_path / "run"
    blocker.write_text("a file")
    fails(capsys, ["finetune", config, "--out", blocker, "--no-progress"], [blocker, "in the way"])
    assert blocker.read_text() == "a file"
    out = works(capsys, ["finetune", config, "--out", tmp_path / "good", "--no-progress"])
    assert (tmp_path / "good" / "model" / "weights.safetensors").is_file() and "best epoch" in out


def test_finetune_out_in_a_read_only_place(capsys, ft):
    config, _ = ft
    run = Path("/proc/histopan-fault-ft")
    fails(capsys, ["finetune", config, "--out", run, "--no-progress"], [run], absent=[run])
