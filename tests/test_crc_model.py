"""The shipped fine-tuned model models/crc-nucleus-types: types on real CRC tiles and in a slide store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import histopan
from histopan.evaluation import read_points_geojson
from histopan.metrics import point_detection
from histopan.model.checkpoint import load_model
from histopan.postprocess import PostprocessConfig

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "crc-nucleus-types"
TYPES = ("epithelial", "fibroblast", "inflammatory", "others")


@pytest.fixture(scope="module")
def crc_model():
    if not (MODEL / "weights.safetensors").is_file():
        raise FileNotFoundError(f"the fine-tuned model is missing from {MODEL}")
    return load_model("crc-nucleus-types")


def test_model_folder_is_the_default_plus_a_type_head(crc_model):
    default = load_model("default")
    assert crc_model.config.type_names == TYPES
    # fine-tuned from the default's stage 3: its tissue classes are that model's, which the default still has
    # (stages 7-10 added benign_epithelium)
    assert set(crc_model.config.class_names) <= set(default.config.class_names)
    assert crc_model.config.class_names == ("background", "stroma", "necrosis", "tumour", "nucleus")
    assert (MODEL / "weights.safetensors").stat().st_size < 30e6
    # two fine-tuning stages: the type head (stage 1, from the default's stage 3), then detection from the
    # points as a complete set (stage 2); each record keeps its base's record
    record = crc_model.config.training
    assert record["kind"] == "finetune"
    stage1 = record["base"]["training"]
    assert stage1["kind"] == "finetune" and stage1["base"]["name"] == "default"
    # the shipped default keeps the record of each stage it was trained from as init_training
    # (stage 10 <- stage 9 <- stage 6 <- stage 4 <- stage 3); stage 1 started from stage 3, whose thresholds
    # travelled along and were then fitted to the held-back CRC points by detection F1 (histopan tune --points)
    after_base = default.config.training
    while after_base.get("init_weights_sha256") != stage1["base"]["weights_sha256"]:
        after_base = after_base["init_training"]  # a KeyError here: the chain does not reach the CRC base
    stage3 = after_base["init_training"]
    base_pp = PostprocessConfig(**stage3["postprocess_tuning"]["before"]["postprocess"])
    assert PostprocessConfig(**stage1["postprocess_tuning"]["before"]["postprocess"]) == base_pp
    # stage 2 fitted its thresholds (fit_thresholds) and then its TTA thresholds (histopan tune --points --tta)
    # to the 10 held-back images' points; both raised the held-back detection F1
    for key, tta in (("postprocess_tuning", False), ("postprocess_tuning_tta", True)):
        tuning = record[key]
        assert tuning["metric"] == "detection_f1" and tuning["heldback_point_images"] == 10
        assert tuning["tta"] is tta
        assert tuning["validation"]["detection"]["f1"] >= tuning["before"]["detection"]["f1"]
    assert crc_model.config.postprocess_tta is not None
    assert record["after"]["test"]["points"]["detection"]["f1"] > record["before"]["test"]["points"]["detection"]["f1"]
    card = (MODEL / "README.md").read_text(encoding="utf-8")
    assert "| test point detection F1 |" in card and "Sirinukunwattana" in card
    assert "Sets marked `complete_points`" in card  # stage 2 counted the points as complete


def test_predict_tile_fills_types_on_held_out_crc_tiles(crc_model, data_dir):
    val = data_dir / "crc_points" / "val"
    default = load_model("default")
    totals, base_totals, truth_types = None, None, []
    for path in sorted((val / "images").glob("*.png"))[:4]:
        image = np.asarray(Image.open(path).convert("RGB"))
        result = histopan.predict_tile(image, 0.5, model=crc_model)
        base = histopan.predict_tile(image, 0.5, model=default).nuclei
        assert base["type"].isna().all()  # the default model has no type head
        nuclei = result.nuclei
        assert isinstance(nuclei, pd.DataFrame) and len(nuclei) > 20
        assert set(nuclei["type"]) <= set(TYPES) and nuclei["type"].notna().all()
        assert ((nuclei["type_prob"] > 0) & (nuclei["type_prob"] <= 1)).all()
        xy, names = read_points_geojson(val / "points" / f"{path.stem}.geojson")
        res = point_detection(xy, nuclei[["centroid_x", "centroid_y"]].to_numpy() + 0.5, 3.0 / 0.5, names,
                              nuclei["type"].tolist())
        totals = res if totals is None else totals + res
        base_res = point_detection(xy, base[["centroid_x", "centroid_y"]].to_numpy() + 0.5, 3.0 / 0.5)
        base_totals = base_res if base_totals is None else base_totals + base_res
        truth_types += [names[i] for i, _ in res.pairs if names[i] is not None]
    assert totals.f1 > base_totals.f1 - 0.05  # learning the types did not cost detection
    # better than always answering the commonest type of these nuclei, by a clear margin
    majority = max(truth_types.count(t) for t in TYPES) / len(truth_types)
    assert totals.type_accuracy > majority + 0.1


def test_segment_with_the_typed_model_writes_types_into_the_store(crc_model, slides_dir, tmp_path):
    from histopan.cli import main
    from histopan.store import open_store

    out = tmp_path / "cmu.zarr"
    assert main(["segment", str(slides_dir / "cmu_small_region.svs"), "-o", str(out), "--model",
                 "crc-nucleus-types", "--device", "cpu"]) == 0
    store = open_store(out)
    table = pd.read_parquet(out / "tables" / "nuclei.parquet")
    assert len(table) > 100
    assert set(table["type"].dropna()) <= set(TYPES) and table["type"].notna().all()
    assert "crc-nucleus-types" in json.dumps(store.attrs)  # provenance names the model
