"""Training data: resampling to the model's mpp, seeded crops, and clear errors for bad folders."""

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from histopan.config import from_dict
from histopan.errors import ConfigError, DataError
from histopan.model.config import ModelConfig
from histopan.training.config import NucleusSetConfig, TileSetConfig, TrainConfig
from histopan.training.data import (CropSampler, load_nucleus_set, load_tile_set, load_training_data,
                                    resample_labels)


def _write_nucleus_set(root: Path, size: int = 128, n: int = 3, mpp: float | None = 0.25) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        lab = np.zeros((size, size), dtype=np.uint16)
        for k in range(1, 9):
            y, x = rng.integers(8, size - 8, 2)
            lab[y - 4:y + 4, x - 4:x + 4] = k
        Image.fromarray(img).save(root / "images" / f"img{i}.png")
        tifffile.imwrite(root / "labels" / f"img{i}.tif", lab)
    (root / "meta.json").write_text(json.dumps({"mpp": mpp}))
    return root


def _write_tile_set(root: Path, size: int = 80) -> Path:
    rng = np.random.default_rng(1)
    for cls in ("STROMA", "TUMOR", "LYMPHO"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / cls / f"{cls}_{i}.png")
    return root


def test_resampling_halves_sizes_and_keeps_label_ids(tmp_path):
    folder = _write_nucleus_set(tmp_path / "set")
    train, val = load_nucleus_set(NucleusSetConfig(path=folder, val=("img2",)), model_mpp=0.5, min_size=64)
    assert [s.name for s in train] == ["img0", "img1"] and [s.name for s in val] == ["img2"]
    s = train[0]
    assert s.image.shape == (64, 64, 3) and s.labels.shape == (64, 64)
    original = tifffile.imread(folder / "labels" / "img0.tif")
    assert set(np.unique(s.labels)) <= set(np.unique(original))       # nearest: no blended ids
    assert s.source_mpp == 0.25
    # validation keeps the labels at the data's own resolution for scoring there
    assert val[0].native_labels.shape == (128, 128) and val[0].native_shape == (128, 128)


def test_resample_labels_nearest_exact_on_blocks():
    lab = np.kron(np.arange(16, dtype=np.int32).reshape(4, 4), np.ones((2, 2), dtype=np.int32))
    np.testing.assert_array_equal(resample_labels(lab, 0.25, 0.5), np.arange(16).reshape(4, 4))
    assert resample_labels(lab, 0.5, 0.25).shape == (16, 16)


def test_missing_mpp_is_a_clear_error_unless_overridden(tmp_path):
    folder = _write_nucleus_set(tmp_path / "set", mpp=None)
    with pytest.raises(DataError, match="states no mpp") as err:
        load_nucleus_set(NucleusSetConfig(path=folder), 0.5, 64)
    assert "meta.json" in str(err.value) and "Fix:" in str(err.value)
    train, _ = load_nucleus_set(NucleusSetConfig(path=folder, mpp=0.5), 0.5, 64)
    assert train[0].image.shape == (128, 128, 3)


def test_missing_and_missized_labels(tmp_path):
    folder = _write_nucleus_set(tmp_path / "a")
    (folder / "labels" / "img1.tif").unlink()
    with pytest.raises(DataError, match="no label file"):
        load_nucleus_set(NucleusSetConfig(path=folder), 0.5, 32)
    folder = _write_nucleus_set(tmp_path / "b")
    tifffile.imwrite(folder / "labels" / "img0.tif", np.zeros((100, 128), dtype=np.uint16))
    with pytest.raises(DataError, match="differ in size"):
        load_nucleus_set(NucleusSetConfig(path=folder), 0.5, 32)


def test_image_smaller_than_crop(tmp_path):
    folder = _write_nucleus_set(tmp_path / "set", size=96)
    with pytest.raises(DataError, match="smaller than the training crop"):
        load_nucleus_set(NucleusSetConfig(path=folder), 0.5, 64)  # 96 px at 0.25 -> 48 px < 64


def test_tile_sets_map_classes_and_pad_small_tiles(tmp_path):
    root = _write_tile_set(tmp_path / "tiles")
    model = ModelConfig()
    cfg = TileSetConfig(path=root, mpp=0.5, classes={"STROMA": "stroma", "TUMOR": "tumour", "LYMPHO": None},
                        val=("TUMOR_1",))
    with pytest.raises(DataError, match="smaller than the training crop"):
        load_tile_set(cfg, model, 96)
    train, val = load_tile_set(TileSetConfig(**{**cfg.__dict__, "pad_to_crop": True}), model, 96)
    assert sorted(s.name for s in train) == ["STROMA_0", "STROMA_1", "TUMOR_0"]
    assert [s.stuff_class for s in val] == [model.class_index("tumour")]
    with pytest.raises(ConfigError, match="not mapped"):
        load_tile_set(TileSetConfig(path=root, mpp=0.5, classes={"STROMA": "stroma", "TUMOR": "tumour"}), model, 32)


def _train_config(nuclei: Path, tiles: Path, **kw) -> TrainConfig:
    data = {"model": {"name": "t"}, "nuclei": [{"path": str(nuclei), "val": ["img2"]}],
            "tiles": [{"path": str(tiles), "mpp": 0.5, "pad_to_crop": True,
                       "classes": {"STROMA": "stroma", "TUMOR": "tumour", "LYMPHO": None}}],
            "crop": 64, "batch_size": 4, "tile_fraction": 0.5, **kw}
    return from_dict(TrainConfig, data, source="test.yaml")


def test_unknown_class_name_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown stuff class 'lymphocytes'") as err:
        from_dict(TrainConfig, {"model": {}, "nuclei": [{"path": "x"}],
                                "tiles": [{"path": "t", "mpp": 0.5, "classes": {"LYMPHO": "lymphocytes"}}]},
                  source="train.yaml")
    assert "train.yaml" in str(err.value)


def test_crops_are_seeded_and_consistent(tmp_path):
    cfg = _train_config(_write_nucleus_set(tmp_path / "n"), _write_tile_set(tmp_path / "t"))
    data = load_training_data(cfg)
    a, b = CropSampler(data, cfg).batch(3), CropSampler(data, cfg).batch(3)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert a["image"].shape == (4, 64, 64, 3) and a["image"].dtype == np.float32
    assert 0.0 <= a["image"].min() and a["image"].max() <= 1.0
    many = CropSampler(data, cfg).batch(0)
    # nucleus targets only where nucleus-valid; a nucleus mask pixel always allows exactly {nucleus}
    assert not many["centre"][~many["nucleus_valid"]].any()
    nuc = many["nucleus"] > 0
    assert (many["label_bits"][nuc] == 1 << cfg.model.nucleus_index).all()


def test_geometric_augmentation_moves_image_and_labels_together():
    from histopan.training.augment import flip_rotate, zoom_to
    from histopan.training.config import AugmentConfig

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 50, (32, 40)).astype(np.int32)
    image = np.repeat(labels[..., None].astype(np.float32), 3, axis=2)
    valid = labels % 2 == 0
    for seed in range(8):
        img, lab, val = flip_rotate([image, labels, valid], np.random.default_rng(seed), AugmentConfig())
        np.testing.assert_array_equal(img[..., 0], lab)
        np.testing.assert_array_equal(val, lab % 2 == 0)
    img, lab, val = zoom_to(image[:32, :32], labels[:32, :32], valid[:32, :32], 64)
    assert img.shape == (64, 64, 3) and lab.shape == (64, 64)
    assert set(np.unique(lab)) <= set(np.unique(labels[:32, :32]))   # nearest: no blended ids


def test_colour_jitter_identity_when_off_and_bounded_when_on():
    from histopan.training.augment import colour_jitter
    from histopan.training.config import AugmentConfig

    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    off = AugmentConfig(hed=0, brightness=0, contrast=0, blur_prob=0)
    np.testing.assert_allclose(colour_jitter(image, np.random.default_rng(0), off, 0.5), image / 255.0, atol=1e-6)
    on = colour_jitter(image, np.random.default_rng(0), AugmentConfig(blur_prob=1.0), 0.5)
    assert on.dtype == np.float32 and on.min() >= 0 and on.max() <= 1
    assert not np.allclose(on, image / 255.0, atol=1e-3)
