"""Training-data packs: a pack loads to exactly the samples training reads from the folders, and is refused
for other data; `histopan train --pack-data` then `--data` trains without the data folders."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from histopan.cli import main
from histopan.config import from_dict
from histopan.errors import ConfigError, DataError
from histopan.model.checkpoint import load_model
from histopan.training.config import TrainConfig
from histopan.training.data import load_training_data
from histopan.training.packed import load_packed, pack_training_data

TINY_ARCH = {"arch": "unet", "encoder": "mobilenet_v2", "encoder_depth": 5,
             "decoder_channels": [16, 16, 8, 8, 8]}
KEEP = ["TCGA-A7-A13E-01Z-00-DX1", "TCGA-B0-5698-01Z-00-DX1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config_data(data_dir: Path) -> dict:
    """Two MoNuSeg images (shrunk 0.25 -> 0.5 um/px), Kather tiles (0.495) and osteosarcoma tiles (enlarged
    1.0 -> 0.5 um/px): every way a sample can be stored in a pack."""
    monuseg = data_dir / "monuseg_train"
    names = sorted(p.stem for p in (monuseg / "images").glob("*.png"))
    return {"model": {"name": "packed", "architecture": TINY_ARCH, "mpp": 0.5},
            "nuclei": [{"path": str(monuseg), "val": [KEEP[1]], "exclude": [n for n in names if n not in KEEP]}],
            "tiles": [{"path": str(data_dir / "tissue_tiles" / "kather2016"), "mpp": 0.495, "pad_to_crop": True,
                       "classes": {"01_TUMOR": "tumour", "02_STROMA": "stroma", "03_COMPLEX": None,
                                   "04_LYMPHO": None, "05_DEBRIS": None, "06_MUCOSA": None, "07_ADIPOSE": None,
                                   "08_EMPTY": "background"},
                       "val": ["1BAF_CRC-Prim-HE-03_009.tif_Row_151_Col_151"]},
                      {"path": str(data_dir / "tissue_tiles" / "osteosarcoma"), "mpp": 1.0,
                       "classes": {"Viable": "tumour", "Non-Viable-Tumor": None, "Non-Tumor": None},
                       "val": ["Viable___Case-4-C21-25306-21689_120"]}],
            "tile_fraction": 0.3, "crop": 64, "batch_size": 2, "epochs": 1, "steps_per_epoch": 2,
            "warmup_steps": 1, "threads": 1, "device": "cpu",
            "tune": {"nucleus_threshold": [0.5], "centre_threshold": [0.3], "boundary_weight": [0.5],
                     "min_distance_um": [2.0]}}


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and np.array_equal(a, b)


def test_a_pack_loads_to_the_samples_read_from_the_folders(data_dir, tmp_path):
    cfg = from_dict(TrainConfig, _config_data(data_dir), source="test")
    data = load_training_data(cfg)
    folder = pack_training_data(cfg, data, tmp_path / "pack")
    files = {p.name for p in folder.iterdir()}
    assert "index.json" in files and "labels.npz" in files and not (tmp_path / "pack.partial").exists()
    # shrunk images are stored at the model's mpp, enlarged ones as their (smaller) source files
    assert any(f.endswith(".jpg") for f in files) and any(f.endswith(".png") for f in files)
    packed = load_packed(folder, cfg)
    for group in ("train_nuclei", "train_tiles", "val_nuclei", "val_tiles"):
        want, got = getattr(data, group), getattr(packed, group)
        assert len(want) == len(got) > 0, group
        for a, b in zip(want, got):
            assert (a.name, a.dataset, a.stuff_class, a.source_mpp, a.native_shape) == \
                   (b.name, b.dataset, b.stuff_class, b.source_mpp, b.native_shape)
            assert _same(a.image, b.image) and _same(a.labels, b.labels) and _same(a.native_labels, b.native_labels)
    # another schedule or sampling weight may use the pack; other data may not
    other_schedule = from_dict(TrainConfig, {**_config_data(data_dir), "epochs": 5, "lr": 1e-4}, source="test")
    assert len(load_packed(folder, other_schedule).train_nuclei) == len(data.train_nuclei)
    changed = _config_data(data_dir)
    changed["nuclei"][0]["val"] = [KEEP[0]]
    with pytest.raises(ConfigError, match="other data") as err:
        load_packed(folder, from_dict(TrainConfig, changed, source="test"))
    assert "nuclei" in str(err.value)
    with pytest.raises(ConfigError, match="not empty"):
        pack_training_data(cfg, data, folder)
    with pytest.raises(DataError, match="index.json"):
        load_packed(tmp_path, cfg)
    (folder / "index.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(DataError, match="format"):
        load_packed(folder, cfg)


def test_histopan_train_from_a_pack_without_the_data_folders(data_dir, tmp_path, capsys):
    # the data sets are copied to a folder that is deleted after packing: training reads only the pack
    local = tmp_path / "data"
    shutil.copytree(data_dir / "monuseg_train", local / "monuseg_train")
    shutil.copytree(data_dir / "tissue_tiles", local / "tissue_tiles")
    cfg_path = tmp_path / "train.yaml"
    cfg_path.write_text(yaml.safe_dump(_config_data(local)))
    pack = tmp_path / "pack"
    assert main(["train", str(cfg_path), "--pack-data", str(pack)]) == 0
    assert "packed" in capsys.readouterr().out
    shutil.rmtree(local)
    out = tmp_path / "run"
    assert main(["train", str(cfg_path), "--data", str(pack), "--out", str(out), "--no-progress"]) == 0
    record = load_model(out / "model").config.training
    assert record["data"]["train_images"] == 1 and record["data"]["val_tiles"] == 2
    assert "--data" in record["command"]
    # bad combinations are one-line errors with exit code 2
    assert main(["train", str(cfg_path), "--pack-data", str(tmp_path / "p2"), "--out", str(out)]) == 2
    assert main(["train", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert "--pack-data only packs" in err and "needs --out" in err
    assert main(["train", str(cfg_path), "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "r2")]) == 2
    assert "index.json" in capsys.readouterr().err
