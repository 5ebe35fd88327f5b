"""Mask sets (pixel masks of a tissue region against the rest): reading, the glass rule, targets, crops,
tissue-map validation, distillation of the init model's nucleus maps, and packs."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histopan.config import from_dict
from histopan.errors import ConfigError, DataError
from histopan.model.checkpoint import load_model
from histopan.training.config import TrainConfig
from histopan.training.data import (REGION_FOREGROUND, REGION_GLASS, REGION_REST, CropSampler, Sample, glass_mask,
                                    load_mask_set, load_training_data)
from histopan.training.loop import tissue_scores, train
from histopan.training.packed import load_packed, pack_training_data
from histopan.training.targets import class_bits, region_targets

TINY_ARCH = {"arch": "unet", "encoder": "mobilenet_v2", "encoder_depth": 5, "decoder_channels": [16, 16, 8, 8, 8]}
CLASSES = [{"name": "background", "color": [255, 255, 255], "kind": "stuff"},
           {"name": "stroma", "color": [240, 160, 200], "kind": "stuff"},
           {"name": "tumour", "color": [200, 40, 40], "kind": "stuff"},
           {"name": "benign_epithelium", "color": [240, 170, 40], "kind": "stuff"},
           {"name": "nucleus", "color": [40, 40, 220], "kind": "thing"}]
BG, STROMA, TUMOUR, BENIGN, NUC = range(5)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image() -> tuple[np.ndarray, np.ndarray]:
    """A 96 x 96 image at 0.5 um/px: glass (slightly tinted white) in the left quarter, pink tissue elsewhere
    with a purple 'gland' square whose centre holds a white lumen; and its mask (gland incl. lumen)."""
    img = np.full((96, 96, 3), (225, 150, 190), np.uint8)
    img[:, :24] = (242, 240, 245)
    img[30:70, 40:80] = (150, 90, 160)
    img[42:58, 52:68] = (244, 244, 246)  # lumen: 16 x 16 px = 64 um^2
    img[46, 46] = (250, 250, 250)  # a white speck inside the epithelium (one pixel): not glass
    mask = np.zeros((96, 96), np.uint8)
    mask[30:70, 40:80] = 255
    return img, mask


def _write_set(root: Path, groups: dict[str, list[str]], by_grade: bool = False) -> Path:
    img, mask = _image()
    grades = {}
    for group, names in groups.items():
        sub = "" if by_grade else group
        (root / "images" / sub).mkdir(parents=True, exist_ok=True)
        (root / "masks" / sub).mkdir(parents=True, exist_ok=True)
        for name in names:
            Image.fromarray(img).save(root / "images" / sub / f"{name}.png")
            Image.fromarray(mask).save(root / "masks" / sub / f"{name}.png")
            grades[name] = {"grade": group}
    (root / "meta.json").write_text(json.dumps({"mpp": 0.5, "grades": grades}))
    return root


def _config(tmp_path: Path, masks: list[dict], **kw) -> TrainConfig:
    from tests.conftest import write_disc_nucleus_set

    nuclei = tmp_path / "nuclei"
    if not nuclei.exists():
        write_disc_nucleus_set(nuclei)
    data = {"model": {"name": "tiny", "architecture": TINY_ARCH, "mpp": 0.5, "classes": CLASSES},
            "nuclei": [{"path": str(nuclei), "val": ["s2"]}], "masks": masks, "tile_fraction": 0.0,
            "mask_fraction": 0.5, "crop": 64, "batch_size": 2, "epochs": 1, "steps_per_epoch": 2, "warmup_steps": 1,
            "threads": 1, "device": "cpu",
            "tune": {"nucleus_threshold": [0.5], "centre_threshold": [0.3], "boundary_weight": [0.5],
                     "min_distance_um": [2.0]}, **kw}
    return from_dict(TrainConfig, data, source="test")


def test_glass_mask_and_lumen_become_background_and_the_rest_keeps_its_classes(tmp_path):
    root = _write_set(tmp_path / "set", {"Adeno": ["C1-1", "C1-2", "C2-1"], "HGIN": ["C3-1"], "Skip": ["C4-1"]})
    cfg = _config(tmp_path, [{"path": str(root), "foreground": {"Adeno": "tumour", "HGIN": ["tumour", "benign_epithelium"],
                                                                 "Skip": None}, "val": ["C2"]}])
    train_s, val_s = load_mask_set(cfg.masks[0], cfg.model, cfg.crop)
    # the case prefix C2 holds out C2-1 only; the skipped group is not read
    assert sorted(s.name for s in train_s) == ["C1-1", "C1-2", "C3-1"] and [s.name for s in val_s] == ["C2-1"]
    r = train_s[0].regions
    assert (r[:, :20] == REGION_GLASS).all()  # bare glass (tinted, not pure grey)
    assert (r[44:56, 54:66] == REGION_GLASS).all()  # the white lumen (64 um^2 >= 40) inside the gland
    assert (r[31:40, 41:50] == REGION_FOREGROUND).all() and r[46, 46] == REGION_FOREGROUND  # a speck is not glass
    assert (r[80:, 30:] == REGION_REST).all()
    bits = {s.name: s.region_bits for s in train_s}
    assert bits["C1-1"] == (class_bits([BG]), class_bits([TUMOUR]), class_bits([STROMA]))
    assert bits["C3-1"][1] == class_bits([TUMOUR, BENIGN])
    # targets: glass is background and no nucleus; tissue is its class or a nucleus in it; padding trains nothing
    valid = np.ones(r.shape, bool)
    valid[:, -4:] = False
    t = region_targets(r, valid, bits["C3-1"], NUC, REGION_GLASS)
    assert (t.label_bits[:, :20] == class_bits([BG])).all() and t.nucleus_valid[:, :20].all()
    assert (t.label_bits[31:40, 41:50] == class_bits([TUMOUR, BENIGN, NUC])).all()
    assert (t.label_bits[80:, 30:90] == class_bits([STROMA, NUC])).all() and not t.nucleus_valid[80:, 30:].any()
    assert (t.label_bits[:, -4:] == 0).all() and (t.nucleus == 0).all()


def test_mask_set_errors_name_the_file_and_the_fix(tmp_path):
    root = _write_set(tmp_path / "set", {"A": ["x-1"], "B": ["y-1"]})
    with pytest.raises(ConfigError, match="not mapped") as err:
        cfg = _config(tmp_path, [{"path": str(root), "foreground": {"A": "tumour"}}])
        load_mask_set(cfg.masks[0], cfg.model, cfg.crop)
    assert "B" in str(err.value)
    with pytest.raises(ConfigError, match="not in the mask set"):
        cfg = _config(tmp_path, [{"path": str(root), "foreground": {"A": "tumour", "B": None}, "val": ["zz"]}])
        load_mask_set(cfg.masks[0], cfg.model, cfg.crop)
    with pytest.raises(ConfigError, match="unknown stuff classes"):
        _config(tmp_path, [{"path": str(root), "foreground": {"A": "gland", "B": None}}])
    (root / "masks" / "A" / "x-1.png").unlink()
    with pytest.raises(DataError, match="no mask"):
        cfg = _config(tmp_path, [{"path": str(root), "foreground": {"A": "tumour", "B": None}}])
        load_mask_set(cfg.masks[0], cfg.model, cfg.crop)
    with pytest.raises(ConfigError, match="needs at least one mask set"):
        _config(tmp_path, [], mask_fraction=0.3)
    with pytest.raises(ConfigError, match="distill"):
        _config(tmp_path, [], mask_fraction=0.0, distill=1.0)


def test_grades_from_meta_json_and_crops_of_mask_sets(tmp_path):
    root = _write_set(tmp_path / "glas", {"benign": ["train_1", "train_2"], "malignant": ["train_3"]}, by_grade=True)
    cfg = _config(tmp_path, [{"path": str(root), "group_by": "grade",
                              "foreground": {"benign": "benign_epithelium", "malignant": "tumour"}}],
                  mask_fraction=1.0)
    data = load_training_data(cfg)
    assert {s.name: s.region_bits[1] for s in data.train_masks} == {
        "train_1": class_bits([BENIGN]), "train_2": class_bits([BENIGN]), "train_3": class_bits([TUMOUR])}
    sampler = CropSampler(data, cfg)
    seen = set()
    for i in range(12):
        _, t = sampler.crop(i)
        seen |= {int(b) for b in np.unique(t.label_bits)}
        assert not t.nucleus.any() and not t.contact.any()
    assert class_bits([BG]) in seen and class_bits([STROMA, NUC]) in seen
    assert seen & {class_bits([BENIGN, NUC]), class_bits([TUMOUR, NUC])}


def test_tile_crops_see_glass_in_0_to_1_values(tmp_path):
    """The tile glass rule gets the crop scaled to 0..1 (it was given 0..255 and found only exactly grey pixels)."""
    img, _ = _image()
    assert glass_mask(img.astype(np.float32) / 255.0)[:, :24].all()
    assert not glass_mask(img.astype(np.float32))[:, :24].any()  # the old call: tinted glass was missed


def _sample(name: str, regions: np.ndarray, fg: list[int], dataset: str = "set") -> Sample:
    return Sample(name=name, dataset=dataset, image=np.zeros((*regions.shape, 3), np.uint8), labels=None,
                  stuff_class=None, source_mpp=0.5, regions=regions,
                  region_bits=(class_bits([BG]), class_bits(fg), class_bits([STROMA])))


def test_tissue_scores_by_hand():
    cfg = from_dict(TrainConfig, {"model": {"name": "tiny", "architecture": TINY_ARCH, "mpp": 0.5, "classes": CLASSES},
                                  "nuclei": [{"path": "x"}], "tile_fraction": 0.0}, source="test")
    regions = np.full((4, 4), REGION_REST, np.uint8)
    regions[:, 0] = REGION_GLASS
    regions[:2, 2:] = REGION_FOREGROUND
    pred = np.full((4, 4), STROMA, np.uint8)
    pred[:, 0] = BG
    pred[0, 0] = STROMA  # one glass pixel missed
    pred[:2, 2] = TUMOUR  # two of four tumour pixels found ...
    pred[:2, 3] = BENIGN  # ... two called benign: region IoU 1, class accuracy 1/2
    pred[3, 2] = TUMOUR  # one stroma pixel called tumour
    out = tissue_scores(((_sample("a", regions, [TUMOUR]), pred),), cfg.model)
    s = out["tissue_by_set"]["set"]
    # with tumour the only region class, the benign calls are not region: 2 of 5
    assert s["region_iou"] == pytest.approx(2 / 5)
    assert s["glass_iou"] == pytest.approx(3 / 4)
    assert "region_class_accuracy" not in s  # one region class: nothing to tell apart
    assert out["tissue"]["iou"]["tumour"] == pytest.approx(2 / 5)
    assert out["tissue"]["iou"]["background"] == pytest.approx(3 / 4)
    # with a benign image in the set, the tumour / benign split is scored
    benign = _sample("b", regions, [BENIGN])
    out = tissue_scores(((_sample("a", regions, [TUMOUR]), pred), (benign, pred)), cfg.model)
    # both region classes: any epithelium call is region (4 of 5 per image); half of them have the right class
    assert out["tissue_by_set"]["set"]["region_iou"] == pytest.approx(8 / 10)
    assert out["tissue_by_set"]["set"]["region_class_accuracy"] == pytest.approx(4 / 8)
    assert out["tissue_region_iou"] == pytest.approx(8 / 10)


def test_training_with_masks_and_distillation_scores_tissue_and_keeps_the_init_models_nuclei(tmp_path):
    root = _write_set(tmp_path / "set", {"A": ["c1-1", "c2-1"]})
    masks = [{"path": str(root), "foreground": {"A": "tumour"}, "val": ["c2"]}]
    first = train(_config(tmp_path, masks), tmp_path / "first", progress=False)
    record = [json.loads(line) for line in (tmp_path / "first" / "metrics.jsonl").read_text().splitlines()]
    val = record[-1]["val"]
    assert set(val["tissue"]["iou"]) == {"background", "stroma", "tumour", "benign_epithelium"}
    assert val["tissue_by_set"]["set"]["images"] == 1 and 0 <= val["tissue_by_set"]["set"]["region_iou"] <= 1
    assert load_model(first.model_dir).config.training["data"]["val_mask_images"] == 1
    # a warm start with distillation logs the term (small: the student starts as the teacher; not 0, since the
    # student's batch norm uses batch statistics in training and the teacher its running ones)
    cfg = _config(tmp_path, masks, init=str(first.model_dir), distill=1.0, lr=1e-12, weight_decay=0.0,
                  tissue_score_weight=0.5)
    train(cfg, tmp_path / "second", progress=False)
    rec = json.loads((tmp_path / "second" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= rec["train"]["distill"] < 0.5 * rec["train"]["loss"]
    # the teacher's classes must all be in the trained model
    fewer = [c for c in CLASSES if c["name"] != "benign_epithelium"]
    cfg = _config(tmp_path, [{**masks[0]}], init=str(first.model_dir), distill=1.0,
                  model={"name": "tiny", "architecture": TINY_ARCH, "mpp": 0.5, "classes": fewer})
    with pytest.raises(ConfigError, match="every class of the init model"):
        train(cfg, tmp_path / "third", progress=False)


def test_a_pack_holds_mask_sets(tmp_path):
    root = _write_set(tmp_path / "set", {"A": ["c1-1", "c2-1"], "B": ["c3-1"]})
    cfg = _config(tmp_path, [{"path": str(root), "mpp": 0.6, "foreground": {"A": "tumour", "B": "benign_epithelium"},
                              "val": ["c2"]}])
    data = load_training_data(cfg)
    packed = load_packed(pack_training_data(cfg, data, tmp_path / "pack"), cfg)
    for group in ("train_masks", "val_masks"):
        want, got = getattr(data, group), getattr(packed, group)
        assert len(want) == len(got) > 0
        for a, b in zip(want, got):
            assert a.name == b.name and a.region_bits == b.region_bits and a.source_mpp == b.source_mpp
            assert np.array_equal(a.image, b.image) and np.array_equal(a.regions, b.regions)
