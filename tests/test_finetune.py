"""Sparse-label fine-tuning on a tiny network: `histopan finetune` end to end, determinism, resume, bad input."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import histopan
from histopan.cli import main
from histopan.config import from_dict, to_dict
from histopan.model.checkpoint import load_model, save_model
from histopan.model.config import ModelConfig
from histopan.model.network import build_network
from histopan.training.config import AugmentConfig, read_finetune_config
from histopan.training.finetune import build_finetune_model, finetune, heldback_loss, type_weights, types_at_points
from histopan.training.sparse import SparseTargets
from histopan.training.sparse_data import (FinetuneData, SparseCropSampler, SparseSample, load_finetune_data,
                                           load_slide_annotations)
from histopan.training.targets import class_bits

TINY_ARCH = {"arch": "unet", "encoder": "mobilenet_v2", "encoder_depth": 5,
             "decoder_channels": [16, 16, 8, 8, 8]}
TYPES = [{"name": "epithelial", "color": [255, 0, 0]}, {"name": "fibroblast", "color": [0, 255, 0]}]
SLIDE = "cmu_small_region.svs"  # 2220 x 2967 px at 0.499 um/px


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny untrained base model; low thresholds so that even it finds "nuclei" to score and type."""
    cfg = from_dict(ModelConfig, {"name": "tiny", "architecture": TINY_ARCH,
                                  "postprocess": {"nucleus_threshold": 0.1, "centre_threshold": 0.1,
                                                  "min_area_um2": 1.0}})
    torch.manual_seed(0)
    return save_model(tmp_path_factory.mktemp("base") / "base", build_network(cfg), cfg)


def _feature(geometry: dict, cls: str | None, object_type: str = "annotation") -> dict:
    props = {"objectType": object_type}
    if cls is not None:
        props["classification"] = {"name": cls}
    return {"type": "Feature", "geometry": geometry, "properties": props}


def _point(x: float, y: float, cls: str | None = None) -> dict:
    return _feature({"type": "Point", "coordinates": [x, y]}, cls)


def _circle(x: float, y: float, r: float, cls: str) -> dict:
    a = np.linspace(0, 2 * np.pi, 17)
    ring = [[float(x + r * np.cos(t)), float(y + r * np.sin(t))] for t in a[:-1]]
    return _feature({"type": "Polygon", "coordinates": [[*ring, ring[0]]]}, cls)


def _box(x0: float, y0: float, x1: float, y1: float, cls: str) -> dict:
    return _feature({"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}, cls)


def _write_geojson(path: Path, features: list[dict]) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _annotated_set(folder: Path, n: int = 3, seed: int = 0) -> Path:
    """96 x 96 pale images with dark discs (nuclei) at 0.5 um/px; per image a GeoJSON with typed points on six
    discs, outlines of two and a stroma region in a pink corner."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "geojson").mkdir()
    yy, xx = np.mgrid[:96, :96]
    for i in range(n):
        img = np.full((96, 96, 3), (230, 200, 220), np.uint8)
        img[70:, :30] = (200, 120, 170)
        features = [_box(0, 72, 28, 96, "stroma")]
        for k in range(8):
            cx, cy = 16 + 20 * (k % 4) + int(rng.integers(-2, 3)), 14 + 24 * (k // 4) + int(rng.integers(-2, 3))
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 16] = (80, 40, 140)
            if k < 6:
                features.append(_point(cx + 0.5, cy + 0.5, TYPES[k % 2]["name"]))
            else:
                features.append(_circle(cx + 0.5, cy + 0.5, 4.5, "nucleus"))
        Image.fromarray(img).save(folder / "images" / f"a{i}.png")
        _write_geojson(folder / "geojson" / f"a{i}.geojson", features)
    (folder / "meta.json").write_text(json.dumps({"mpp": 0.5}))
    return folder


def _config(root: Path, base: Path, **kw) -> Path:
    """A fine-tuning YAML in ``root`` over ``root/data`` (annotated, a2 held back) and ``root/test``."""
    if not (root / "data").exists():
        _annotated_set(root / "data")
    if not (root / "test").exists():
        _annotated_set(root / "test", n=1, seed=1)
    data = {"name": "ft", "base": str(base), "nucleus_types": TYPES,
            "add_classes": [{"name": "mucosa", "color": [1, 2, 3], "kind": "stuff"}],
            "annotations": [{"images": "data/images", "geojson": "data/geojson", "val": ["a2"]}],
            "test": {"points": [{"images": "test/images", "geojson": "test/geojson"}]},
            "crop": 64, "batch_size": 2, "epochs": 2, "steps_per_epoch": 2, "warmup_steps": 1, "threads": 1,
            "device": "cpu", **kw}
    path = root / "finetune.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "weights.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _records(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        r.pop("seconds")
        out.append(r)
    return out


def _fails(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit code 2 and return its one error line (stderr also holds the log)."""
    capsys.readouterr()
    assert main(argv) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("histopan finetune: error: ")]
    assert len(errors) == 1
    return errors[0]


# -- end to end -------------------------------------------------------------------------------------------
def test_histopan_finetune_grows_heads_freezes_the_encoder_and_writes_a_model(tmp_path, base, capsys):
    cfg = _config(tmp_path, base, trainable="decoder")
    run = tmp_path / "run"
    assert main(["finetune", str(cfg), "--out", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| held-back masked loss |" in out and "best epoch" in out

    model_dir = run / "model"
    for name in ("weights.safetensors", "model.yaml", "README.md"):
        assert (model_dir / name).is_file()
    for name in ("finetune.yaml", "metrics.jsonl", "curves.png", "scores.json"):
        assert (run / name).is_file()
    assert len(_records(run)) == 2

    model = load_model(model_dir)
    assert model.config.type_names == ("epithelial", "fibroblast")
    assert model.config.class_names == ("background", "stroma", "necrosis", "tumour", "nucleus", "mucosa")
    assert model.config.n_outputs == 6 + 2 + 2
    assert model.config.postprocess == load_model(base).config.postprocess  # the base's tuned thresholds travel
    record = model.config.training
    assert record["kind"] == "finetune" and record["trainable"] == "decoder"
    assert record["base"]["weights_sha256"] == load_model(base).weights_sha256
    assert record["base"]["training"] == load_model(base).config.training  # the base's history travels along
    assert record["data"]["train_images"] == 2 and record["data"]["held_back"] == ["a2"]
    assert (record["data"]["train_points"], record["data"]["train_polygons"], record["data"]["train_regions"]) \
        == (12, 4, 2)

    # a frozen encoder stays bit-identical to the base (weights and batch-norm statistics); the decoder trained
    before, after = _weights(base), _weights(model_dir)
    encoder = [k for k in before if k.startswith("encoder.")]
    decoder = [k for k in before if k.startswith("decoder.") and after[k].is_floating_point()]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(not torch.equal(before[k], after[k]) for k in decoder)

    scores = json.loads((run / "scores.json").read_text())
    assert set(scores) == {"before", "after"}
    for when in ("before", "after"):
        assert scores[when]["val"]["loss"]["loss"] > 0 and "type" in scores[when]["val"]["loss"]
        detection = scores[when]["test"]["points"]["detection"]
        assert detection["tp"] + detection["fn"] == 6  # the test image's six points
    assert "types" in scores["after"]["test"]["points"]  # the base has no type head, the result does
    # every typed test point is classified, detected or not (the protocol of classifying given nuclei)
    at_points = scores["after"]["test"]["points"]["types_at_points"]
    assert at_points["points"] == 6 and set(at_points["f1"]) == {"epithelial", "fibroblast"}
    assert 0 <= at_points["weighted_f1"] <= 1 and "types_at_points" not in scores["before"]["test"]["points"]

    card = (model_dir / "README.md").read_text()
    assert "| figure | before (base) | after |" in card
    b, a = scores["before"]["val"]["loss"]["loss"], scores["after"]["val"]["loss"]["loss"]
    assert f"| held-back masked loss | {b:.3f} | {a:.3f} |" in card
    assert "test F1 epithelial" in card and "trained layers | decoder" in card
    assert "complete_points" not in card  # no set is marked as a complete count
    assert f"| test type weighted F1 (every typed point, given nuclei) | - | {at_points['weighted_f1']:.3f} |" in card

    image = np.asarray(Image.open(tmp_path / "test" / "images" / "a0.png"))
    result = histopan.predict_tile(image, 0.5, model=model_dir)
    assert len(result.nuclei) > 0
    assert set(result.nuclei["type"]) <= {"epithelial", "fibroblast"}
    assert result.class_names[-1] == "mucosa"

    # the same --out again without --resume is refused, naming the folder
    err = _fails(capsys, ["finetune", str(cfg), "--out", str(run), "--no-progress"])
    assert str(run) in err and "already holds a fine-tuning run" in err and "--resume" in err


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base) -> Path:
    """An uninterrupted run (2 epochs of 2 steps)."""
    root = tmp_path_factory.mktemp("reference")
    config = read_finetune_config(_config(root, base))
    result = finetune(config, root / "run", progress=False)
    assert result is not None and result.model_dir == root / "run" / "model"
    return root


def test_same_seed_gives_identical_weights(reference, tmp_path):
    config = read_finetune_config(reference / "finetune.yaml")
    again = finetune(config, tmp_path / "again", progress=False)
    assert _same(_weights(reference / "run" / "model"), _weights(again.model_dir))
    assert _records(reference / "run") == _records(tmp_path / "again")
    # a different seed gives other crops, hence other weights
    other = finetune(dataclasses.replace(config, seed=1), tmp_path / "other", progress=False)
    assert not _same(_weights(reference / "run" / "model"), _weights(other.model_dir))


def test_a_second_stage_keeps_the_first_stages_record(reference, tmp_path):
    first = load_model(reference / "run" / "model")
    config = dataclasses.replace(read_finetune_config(reference / "finetune.yaml"),
                                 base=str(reference / "run" / "model"), add_classes=(), epochs=1)
    second = load_model(finetune(config, tmp_path / "second", progress=False).model_dir).config.training
    assert second["base"]["weights_sha256"] == first.weights_sha256
    assert second["base"]["training"] == first.config.training and first.config.training["kind"] == "finetune"
    assert second["base"]["training"]["base"]["training"] == {}  # the tiny base was never trained


def test_resume_after_stop_equals_the_uninterrupted_run(reference, tmp_path):
    config = read_finetune_config(reference / "finetune.yaml")
    staged = tmp_path / "staged"
    assert finetune(config, staged, progress=False, stop_after=1) is None
    assert len(_records(staged)) == 1 and not (staged / "model").exists()
    result = finetune(config, staged, resume=True, progress=False)
    assert result is not None
    assert _records(staged) == _records(reference / "run")
    assert _same(_weights(reference / "run" / "model"), _weights(result.model_dir))
    for part in ("weights", "optimizer"):
        a = load_file(str(reference / "run" / "checkpoints" / "last" / f"{part}.safetensors"))
        b = load_file(str(staged / "checkpoints" / "last" / f"{part}.safetensors"))
        assert _same(a, b)
    ref_scores = json.loads((reference / "run" / "scores.json").read_text())
    assert json.loads((staged / "scores.json").read_text()) == ref_scores


def test_resume_without_a_run_is_refused(tmp_path, base, capsys):
    cfg = _config(tmp_path, base)
    err = _fails(capsys, ["finetune", str(cfg), "--out", str(tmp_path / "nothing"), "--resume", "--no-progress"])
    assert str(tmp_path / "nothing") in err and "nothing to resume" in err


def test_crops_are_seeded_and_padding_trains_nothing(tmp_path, base):
    config = read_finetune_config(_config(tmp_path, base))
    _, model = build_finetune_model(load_model(base), config)
    data = load_finetune_data(config, model)
    sampler = SparseCropSampler(data, config)
    a, b = sampler.crop(3, model.mpp), sampler.crop(3, model.mpp)
    assert np.array_equal(a[0], b[0]) and all(np.array_equal(x, y) for x, y in zip(a[1].layers(), b[1].layers()))
    assert not np.array_equal(a[0], sampler.crop(4, model.mpp)[0])
    assert a[0].shape == (64, 64, 3) and a[0].dtype == np.float32 and 0 <= a[0].min() and a[0].max() <= 1
    # a sample smaller than the crop is padded with pixels that train nothing
    plain = AugmentConfig(flips=False, rot90=False, scale=0.0, hed=0.0, brightness=0.0, contrast=0.0, blur_prob=0.0)
    first = data.train[0]
    small = dataclasses.replace(first, image=first.image[:40, :48],
                                targets=SparseTargets.from_layers([x[:40, :48] for x in first.targets.layers()]))
    pad = SparseCropSampler(FinetuneData((small,), (), (), ()), dataclasses.replace(config, augment=plain))
    image, t = pad.crop(0, model.mpp)
    assert image.shape == (64, 64, 3)
    for x, y in zip(t.layers(), small.targets.layers()):
        np.testing.assert_array_equal(x[:40, :48], y)
    outside = np.ones((64, 64), bool)
    outside[:40, :48] = False
    assert np.all(t.label_bits[outside] == 0) and np.all(t.types[outside] == -1)
    assert not (t.nucleus_valid[outside].any() or t.centre_valid[outside].any() or t.boundary_valid[outside].any())
    batch = pad.batch(0, model.mpp)
    assert batch["image"].shape == (2, 64, 64, 3) and batch["types"].dtype == np.int64


# -- bad annotated images ----------------------------------------------------------------------------------
def test_annotation_outside_its_image_is_refused(tmp_path, base, capsys):
    cfg = _config(tmp_path, base)
    bad = _write_geojson(tmp_path / "data" / "geojson" / "a1.geojson",
                         [_point(20.5, 20.5, "epithelial"), _point(150.0, 40.0, "fibroblast")])
    err = _fails(capsys, ["finetune", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"])
    assert str(bad) in err and "outside its image a1.png" in err and "96 x 96" in err and "x 150.0..150.0" in err
    assert not (tmp_path / "run").exists()


def test_unmapped_unknown_class_is_refused(tmp_path, base, capsys):
    cfg = _config(tmp_path, base)
    bad = _write_geojson(tmp_path / "data" / "geojson" / "a0.geojson",
                         [_point(20.5, 20.5, "Lymphocyte"), _point(40.5, 40.5, "epithelial")])
    err = _fails(capsys, ["finetune", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"])
    assert str(bad) in err and "Lymphocyte" in err and "'classes'" in err
    # mapping it (here: to null, ignored) makes the same data usable; its point trains nothing
    config = read_finetune_config(_config(tmp_path, base, annotations=[
        {"images": "data/images", "geojson": "data/geojson", "val": ["a2"], "classes": {"Lymphocyte": None}}]))
    _, model = build_finetune_model(load_model(base), config)
    summary = load_finetune_data(config, model).summary()
    assert summary["train_images"] == 2 and summary["train_points"] == 6 + 1


def test_empty_annotation_set_is_refused(tmp_path, base, capsys):
    cfg = _config(tmp_path, base)
    for path in (tmp_path / "data" / "geojson").iterdir():
        _write_geojson(path, [])
    err = _fails(capsys, ["finetune", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"])
    assert "annotation set is empty" in err and str(tmp_path / "data" / "geojson") in err


def test_unknown_geometry_type_is_refused(tmp_path, base, capsys):
    cfg = _config(tmp_path, base)
    bad = _write_geojson(tmp_path / "data" / "geojson" / "a0.geojson", [
        _point(20.5, 20.5, "epithelial"),
        _feature({"type": "Circle", "coordinates": [40, 40], "radius": 5}, "nucleus")])
    err = _fails(capsys, ["finetune", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"])
    assert str(bad) in err and "feature 1" in err and "'Circle'" in err


# -- slides ------------------------------------------------------------------------------------------------
#: two clusters of annotations on tissue of cmu_small_region.svs (level-0 pixels): two regions
CLUSTER_A = [_point(1200.5, 2000.5, "epithelial"), _point(1230.5, 2010.5, "fibroblast"),
             _point(1215.5, 2040.5, "epithelial"), _circle(1250.5, 1990.5, 5.0, "nucleus"),
             _box(1180, 2050, 1260, 2090, "stroma")]
CLUSTER_B = [_point(900.5, 2500.5, "fibroblast"), _point(930.5, 2520.5, "epithelial"),
             _point(910.5, 2540.5, "fibroblast")]


def _slide_config(tmp_path: Path, base: Path, slide: Path, features: list[dict], **entry) -> Path:
    geo = _write_geojson(tmp_path / "slide.geojson", features)
    data = {"name": "ft-slide", "base": str(base), "nucleus_types": TYPES,
            "slides": [{"slide": str(slide), "geojson": str(geo), **entry}],
            "crop": 64, "batch_size": 2, "epochs": 1, "steps_per_epoch": 2, "warmup_steps": 1, "threads": 1,
            "device": "cpu"}
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_slide_regions_around_annotations_train(tmp_path, base, slides_dir, capsys):
    slide = slides_dir / SLIDE
    cfg_path = _slide_config(tmp_path, base, slide, CLUSTER_A + CLUSTER_B)
    config = read_finetune_config(cfg_path)
    model = dataclasses.replace(load_model(base).config, nucleus_types=tuple(config.nucleus_types))
    samples = load_slide_annotations(config.slides[0], model, config)
    assert len(samples) == 2
    a = next(s for s in samples if s.counts["regions"] == 1)
    assert a.counts == {"points": 3, "polygons": 1, "regions": 1}
    # bbox of cluster A (level 0: x 1180..1260, y 1985.5..2090) + 16 um margin (32.1 px), at 0.5 um/px
    margin = 16.0 / 0.499
    w = (np.ceil(1260 + margin) - np.floor(1180 - margin)) * 0.499 / 0.5
    h = (np.ceil(2090 + margin) - np.floor(1985.5 - margin)) * 0.499 / 0.5
    assert abs(a.image.shape[1] - w) <= 1.5 and abs(a.image.shape[0] - h) <= 1.5
    assert a.image.dtype == np.uint8 and a.image.shape[2] == 3 and 30 < a.image.mean() < 240
    # the points land on their nucleus cores in the region's pixels
    assert len(a.points) == 3 and a.point_types == ("epithelial", "fibroblast", "epithelial")
    for x, y in a.points:
        assert a.targets.label_bits[int(y), int(x)] == class_bits([model.nucleus_index])
    # the stroma box (x 1180..1260, y 2050..2090) is "stroma or nucleus" (or glass: stroma only)
    x0 = (1180 - np.floor(1180 - margin)) * 0.998
    y0 = (2050 - np.floor(1985.5 - margin)) * 0.998
    inner = a.targets.label_bits[int(y0) + 3:int(y0) + 36, int(x0) + 3:int(x0) + 75]
    stroma = class_bits([1])
    assert np.all((inner == stroma | class_bits([model.nucleus_index])) | (inner == stroma))

    run = tmp_path / "run"
    assert main(["finetune", str(cfg_path), "--out", str(run), "--no-progress"]) == 0
    record = load_model(run / "model").config.training
    d = record["data"]
    assert d["train_images"] + d["val_images"] == 2 and d["val_images"] == 1  # one region held back
    assert d["train_regions"] + d["val_regions"] == 1
    assert d["train_points"] + d["val_points"] == 6 and d["train_polygons"] + d["val_polygons"] == 1
    assert record["steps"] == 2
    assert all(name.startswith("cmu_small_region@") for name in d["held_back"])


def test_slide_identity_mismatch_is_refused(tmp_path, base, slides_dir, capsys):
    slide = slides_dir / SLIDE
    cfg = _slide_config(tmp_path, base, slide, CLUSTER_B, identity="0000")
    err = _fails(capsys, ["finetune", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"])
    # config paths are resolved on load, so a ../shared that is a symbolic link shows as its target
    assert str(slide.resolve()) in err and "not the 0000" in err and "slide.geojson" in err


def test_annotations_outside_the_slide_are_refused(tmp_path, base, slides_dir, capsys):
    slide = slides_dir / SLIDE
    cfg = _slide_config(tmp_path, base, slide, [*CLUSTER_B, _point(2500.5, 100.5, "epithelial")])
    err = _fails(capsys, ["finetune", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"])
    assert str(tmp_path / "slide.geojson") in err and f"outside the slide {SLIDE}" in err
    assert "2220 x 2967" in err and "x 2500.5..2500.5" in err


def test_complete_points_set_trains_the_centre_map_on_whole_images(tmp_path, base):
    config = read_finetune_config(_config(tmp_path, base))
    _, model = build_finetune_model(load_model(base), config)
    sparse = load_finetune_data(config, model)
    cfg = yaml.safe_load((tmp_path / "finetune.yaml").read_text())
    cfg["annotations"][0]["complete_points"] = True
    (tmp_path / "complete.yaml").write_text(yaml.safe_dump(cfg))
    complete = load_finetune_data(read_finetune_config(tmp_path / "complete.yaml"), model)
    assert len(complete.train) == len(sparse.train) == 2 and len(complete.val) == 1
    for s, c in zip(sparse.train + sparse.val, complete.train + complete.val):
        assert not s.targets.centre_valid.all() and c.targets.centre_valid.all()
        known = s.targets.centre_valid
        np.testing.assert_array_equal(c.targets.centre[known], s.targets.centre[known])
        assert c.targets.centre[~known].max() < 0.02
        # far from every point the complete count adds "not a nucleus": a region there loses its "or a
        # nucleus", unannotated pixels become "any stuff class"; what else the annotations say is kept
        nucleus_bit = class_bits([model.nucleus_index])
        added = c.targets.nucleus_valid & ~s.targets.nucleus_valid
        assert added.any() and np.all(c.targets.nucleus[added] == 0)
        assert np.all(c.targets.label_bits[added] & nucleus_bit == 0)
        kept = ~added
        np.testing.assert_array_equal(c.targets.label_bits[kept], s.targets.label_bits[kept])
        region = added & (s.targets.label_bits != 0)
        np.testing.assert_array_equal(c.targets.label_bits[region], s.targets.label_bits[region] & ~nucleus_bit)
    cfg["annotations"][0]["complete_points"] = "yes"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(Exception, match="complete_points"):
        read_finetune_config(tmp_path / "bad.yaml")


def test_type_balance_weights_types_by_inverse_frequency(tmp_path, base, capsys):
    model = from_dict(ModelConfig, {"name": "t", "architecture": TINY_ARCH,
                                    "nucleus_types": [*TYPES, {"name": "others", "color": [9, 9, 9]}]})
    types = np.full((8, 8), -1, np.int16)
    types[:4, :] = 0          # 32 epithelial pixels
    types[4, :4] = 1          # 4 fibroblast pixels, no "others"
    blank = [np.zeros((8, 8), t) for t in (np.int64, np.float32, bool, np.float32, bool, np.float32, bool)]
    sample = SparseSample("s", "d", np.zeros((8, 8, 3), np.uint8), SparseTargets(*blank, types))
    assert type_weights([sample], model, 0.0) is None
    w = type_weights([sample, sample], model, 1.0)
    assert torch.allclose(w, torch.tensor([36 / (2 * 32), 36 / (2 * 4), 1.0]))
    assert torch.allclose(type_weights([sample], model, 0.5), w.sqrt())
    # a balanced run records its weights in the card; a balance outside 0..1 is refused
    result = finetune(read_finetune_config(_config(tmp_path, base, type_balance=1.0, epochs=1)), tmp_path / "run",
                      progress=False)
    weights = load_model(result.model_dir).config.training["type_weights"]
    assert set(weights) == {"epithelial", "fibroblast"} and all(v > 0 for v in weights.values())
    assert "type loss weights" in (result.model_dir / "README.md").read_text()
    bad = _config(tmp_path / "bad", base, type_balance=1.5)
    assert "type_balance" in _fails(capsys, ["finetune", str(bad), "--out", str(tmp_path / "bad" / "run")])


def test_histopan_tune_points_fits_thresholds_to_held_back_points(reference, tmp_path, capsys):
    """`histopan tune MODEL --config FINETUNE.yaml --points`: grid search for point detection F1 on the
    config's held-back images (a2), same weights, the tuning recorded."""
    data = yaml.safe_load((reference / "finetune.yaml").read_text())
    data["tune"] = {"nucleus_threshold": [0.1, 0.3], "centre_threshold": [0.1], "boundary_weight": [0.5],
                    "min_distance_um": [1.0, 3.0], "centre_h": [0.0]}
    cfg = reference / "finetune-tune.yaml"
    cfg.write_text(yaml.safe_dump(data))
    model, out = reference / "run" / "model", tmp_path / "tuned"
    capsys.readouterr()
    assert main(["tune", str(model), "--config", str(cfg), "--points", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-back point detection F1" in printed and "4 trials" in printed
    tuned, before = load_model(out), load_model(model)
    assert tuned.weights_sha256 == before.weights_sha256
    record = tuned.config.training["postprocess_tuning"]
    assert record["metric"] == "detection_f1" and record["heldback_point_images"] == 1 and record["points"] == 6
    assert record["validation"]["detection"]["f1"] >= record["before"]["detection"]["f1"] - 1e-12
    pp = tuned.config.postprocess  # a setting of the grid, or the model's own thresholds where none beats them
    assert pp == before.config.postprocess or (
        pp.nucleus_threshold in (0.1, 0.3) and pp.min_distance_um in (1.0, 3.0) and pp.centre_threshold == 0.1)
    assert tuned.config.type_names == before.config.type_names  # the type head travels along
    # a fine-tuning config without --points is refused, naming the file and the fix
    capsys.readouterr()
    assert main(["tune", str(model), "--config", str(cfg), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and "--points" in err


def test_fit_thresholds_fits_the_exported_thresholds_to_the_held_back_points(tmp_path, base, capsys):
    """`fit_thresholds: true`: the run searches its `tune` grid on the held-back points after training and
    exports the model with the best thresholds, its after figures and its card measured with them."""
    grid = {"nucleus_threshold": [0.1, 0.3], "centre_threshold": [0.1], "boundary_weight": [0.5],
            "min_distance_um": [1.0, 3.0], "centre_h": [0.0]}
    cfg = _config(tmp_path, base, fit_thresholds=True, tune=grid)
    assert main(["finetune", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    model = load_model(tmp_path / "run" / "model")
    record = model.config.training
    tuning = record["postprocess_tuning"]
    assert tuning["metric"] == "detection_f1" and tuning["trials"] == 4 and tuning["heldback_point_images"] == 1
    assert tuning["points"] == 6 and tuning["grid"]["nucleus_threshold"] == [0.1, 0.3]
    best = max(tuning["validation"]["detection"]["f1"], tuning["before"]["detection"]["f1"])
    assert tuning["validation"]["detection"]["f1"] == best
    pp = model.config.postprocess  # a setting of the grid, or the base's thresholds where none beats them
    assert pp == load_model(base).config.postprocess or (
        pp.nucleus_threshold in (0.1, 0.3) and pp.min_distance_um in (1.0, 3.0) and pp.centre_threshold == 0.1)
    # the before thresholds were the base model's; the after figures use the fitted ones
    assert tuning["before"]["postprocess"] == to_dict(load_model(base).config.postprocess)
    assert record["after"]["val"]["points"]["detection"] == tuning["validation"]["detection"]
    card = (tmp_path / "run" / "model" / "README.md").read_text(encoding="utf-8")
    assert "fitted to the held-back points after training (`fit_thresholds`, 4 trials)" in card


def test_fit_thresholds_without_held_back_points_is_refused_before_training(tmp_path, base, capsys):
    cfg = _config(tmp_path, base, fit_thresholds=True)
    _write_geojson(tmp_path / "data" / "geojson" / "a2.geojson", [_circle(20.5, 20.5, 4.5, "nucleus")])
    err = _fails(capsys, ["finetune", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"])
    assert "fit_thresholds needs held-back images with point annotations" in err and "fit_thresholds: false" in err
    assert not (tmp_path / "run").exists()


def test_contact_weight_is_refused_in_a_finetuning_config(tmp_path, base, capsys):
    cfg = _config(tmp_path, base, loss={"contact_weight": 2.0})
    err = _fails(capsys, ["finetune", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"])
    assert "loss.contact_weight (2.0)" in err and "remove it" in err and str(cfg) in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("criterion, key", [("type_f1", "type_weighted_f1"), ("point_f1", "f1"),
                                            ("point_type_f1", "types_at_points")])
def test_early_stopping_criterion_picks_the_best_epoch_by_that_held_back_score(tmp_path, base, criterion, key):
    """`early_stopping` other than the loss: the exported weights are those of the epoch with the best held-back
    score (the base model's own score counts as epoch 0), and the run stops after `patience` epochs without
    improvement."""
    cfg = read_finetune_config(_config(tmp_path, base, epochs=4, patience=2, early_stopping=criterion))
    result = finetune(cfg, tmp_path / "run", progress=False)
    records = _records(tmp_path / "run")

    def score(val: dict) -> float:
        points = val.get("points", {})
        if key == "f1":
            value = points.get("detection", {}).get("f1")
        elif key == "types_at_points":
            value = points.get(key, {}).get("weighted_f1")
        else:
            value = points.get(key)
        return -np.inf if value is None else value

    best, best_epoch, stale, ran = score(result.before["val"]), 0, 0, 0
    for r in records:  # the stopping rule, replayed on the recorded held-back scores
        ran += 1
        if score(r["val"]) > best:
            best, best_epoch, stale = score(r["val"]), r["epoch"], 0
        else:
            stale += 1
            if stale >= 2:
                break
    assert len(records) == ran and result.best_epoch == best_epoch
    if criterion != "point_f1":  # the base has no type head, so a trained epoch is always the best
        assert best_epoch >= 1
    # the exported model is the best epoch's checkpoint and its after figures are that epoch's
    assert _same(_weights(tmp_path / "run" / "checkpoints" / "best"), _weights(result.model_dir))
    if best_epoch:
        assert score(result.after["val"]) == pytest.approx(score(records[best_epoch - 1]["val"]))
    name = {"type_f1": "held-back type weighted F1", "point_f1": "held-back point detection F1",
            "point_type_f1": "held-back type weighted F1 at every typed point"}[criterion]
    assert f"early stopping on the {name}, patience 2" in (result.model_dir / "README.md").read_text()


@pytest.mark.parametrize("criterion, message", [
    ("type_accuracy", "early_stopping: type_accuracy needs held-back images with point annotations"),
    ("tile_accuracy", "early_stopping: tile_accuracy needs held-back tile-class tiles")])
def test_early_stopping_on_a_score_the_held_back_part_lacks_is_refused_before_training(tmp_path, base, capsys,
                                                                                          criterion, message):
    cfg = _config(tmp_path, base, early_stopping=criterion)
    _write_geojson(tmp_path / "data" / "geojson" / "a2.geojson", [_circle(20.5, 20.5, 4.5, "nucleus")])
    err = _fails(capsys, ["finetune", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"])
    assert message in err and "early_stopping: loss" in err and str(cfg) in err
    assert not (tmp_path / "run").exists()


def test_early_stopping_on_types_without_typed_held_back_points_is_refused(tmp_path, base, capsys):
    cfg = _config(tmp_path, base, early_stopping="type_f1")
    _write_geojson(tmp_path / "data" / "geojson" / "a2.geojson", [_point(16.5, 14.5), _point(36.5, 14.5)])
    err = _fails(capsys, ["finetune", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"])
    assert "needs held-back points with a nucleus type" in err and "early_stopping: point_f1 or loss" in err
    assert not (tmp_path / "run").exists()


def test_unknown_early_stopping_criterion_is_refused(tmp_path, base, capsys):
    cfg = _config(tmp_path, base, early_stopping="pq")
    err = _fails(capsys, ["finetune", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"])
    assert "early_stopping" in err and "'pq'" in err and "type_f1" in err
    assert not (tmp_path / "run").exists()


def test_types_at_points_average_the_type_probabilities_over_a_disc():
    """Left half type 0, right half type 1 (probability 0.8); a 3 x 3 block of type 0 (0.95) lies just right of
    the border (x 10..12, y 9..11).  A point on the block is type 0; one just right of the block, whose disc
    takes in one block pixel, stays type 1; points at the image corners are classified too."""
    types = np.zeros((2, 20, 20), np.float32)
    types[0, :, :10], types[1, :, :10] = 0.8, 0.2
    types[0, :, 10:], types[1, :, 10:] = 0.2, 0.8
    types[0, 9:12, 10:13], types[1, 9:12, 10:13] = 0.95, 0.05
    xy = np.array([[3.5, 3.5], [16.5, 3.5], [10.5, 10.5], [13.5, 10.5], [19.9, 19.9], [0.0, 0.0]])
    assert types_at_points(types, xy, 1.0).tolist() == [0, 1, 0, 1, 1, 0]
    # a point with no pixel centre within the radius takes the pixel under it
    assert types_at_points(types, np.array([[12.0, 3.0]]), 0.1).tolist() == [1]


def test_ema_scores_keeps_and_exports_the_moving_average_and_resumes_exactly(tmp_path, base):
    """`ema`: the held-back scores are those of the averaged weights, the last checkpoint holds the average
    beside the raw weights, the exported model is a checkpoint of the average, and a resumed run equals the
    uninterrupted one."""
    config = read_finetune_config(_config(tmp_path, base, ema=0.5, early_stopping="point_f1", patience=2))
    whole = finetune(config, tmp_path / "whole", progress=False)
    last = tmp_path / "whole" / "checkpoints" / "last"
    raw, averaged = _weights(last), load_file(str(last / "ema.safetensors"))
    n = averaged.pop("n_averaged")
    assert int(n) == 4  # two epochs of two steps
    assert raw.keys() == averaged.keys() and not _same(raw, averaged)
    # the recorded held-back loss of the last epoch is the average's, not the raw weights'
    model = load_model(whole.model_dir).config
    data = load_finetune_data(config, model)
    network, _ = build_finetune_model(load_model(base), config)
    losses = {}
    for name, tensors in (("raw", raw), ("averaged", averaged)):
        network.load_state_dict(tensors)
        losses[name] = heldback_loss(network, data.val, model, config, torch.device("cpu"),
                                     type_weights(data.train, model, config.type_balance))["loss"]
    recorded = _records(tmp_path / "whole")[-1]["val"]["loss"]["loss"]
    assert recorded == pytest.approx(losses["averaged"], rel=1e-5) and recorded != pytest.approx(losses["raw"])
    assert _same(_weights(tmp_path / "whole" / "checkpoints" / "best"), _weights(whole.model_dir))
    # held-back point F1 0.16 (base) -> 0.29 -> 0.30 with this seed: the last epoch is the best, its average exported
    assert whole.best_epoch == 2 and _same(averaged, _weights(whole.model_dir))
    assert "moving average of the weights (decay 0.5)" in (whole.model_dir / "README.md").read_text()

    staged = tmp_path / "staged"
    assert finetune(config, staged, progress=False, stop_after=1) is None
    result = finetune(config, staged, resume=True, progress=False)
    assert _records(staged) == _records(tmp_path / "whole")
    assert _same(_weights(result.model_dir), _weights(whole.model_dir))
