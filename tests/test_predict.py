"""Inference (devices, padding, batching, windows) and predict_tile on a real H&E tile.

The model is a small, randomly initialised network saved with save_model into a temporary folder (the
trained default model is tested elsewhere); its nucleus threshold is set from its own maps on the test
tile so that post-processing has nuclei to work on.  The assertions are properties (shapes, dtypes,
agreement of semantic and instances, table columns and coordinates, determinism), not predictions.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import ndimage as ndi

import histopan
from histopan.errors import ConfigError, HistopanError, ModelError, MppError
from histopan.inference import TileInferencer, predict_maps, resolve_device
from histopan.model.checkpoint import load_model, save_model
from histopan.model.config import ArchitectureConfig, ModelConfig, NucleusTypeSpec
from histopan.model.network import build_network
from histopan.postprocess import PostprocessConfig
from histopan.predict import NUCLEI_COLUMNS, TileResult, predict_tile

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TYPES = (NucleusTypeSpec("epithelial", (255, 0, 0)), NucleusTypeSpec("inflammatory", (0, 200, 0)),
         NucleusTypeSpec("other", (0, 0, 255)))
MPP = 0.5


@pytest.fixture(scope="module")
def tile(data_dir) -> np.ndarray:
    """A 160 x 192 crop of a real colorectal H&E tile at 0.5 um/px."""
    path = data_dir / "crc_points" / "val" / "images" / "img11.png"
    return np.asarray(Image.open(path).convert("RGB"))[100:260, 120:312].copy()


def _make_model(folder, tile, types=()):
    cfg = ModelConfig(name="tiny", architecture=ArchitectureConfig(decoder_channels=(32, 16, 16, 8, 8)),
                      nucleus_types=types, mpp=MPP, tile=64, halo=16)
    torch.manual_seed(0)
    network = build_network(cfg).eval()
    probe = save_model(folder, network, cfg)
    maps = TileInferencer(load_model(probe)).predict_image(tile)
    threshold = float(np.quantile(maps.semantic[cfg.nucleus_index], 0.7))
    tuned = PostprocessConfig(nucleus_threshold=threshold, centre_threshold=0.0, min_distance_um=2.0,
                              min_area_um2=2.0)
    return save_model(folder, network, replace(cfg, postprocess=tuned))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tile):
    return _make_model(tmp_path_factory.mktemp("models") / "tiny", tile)


@pytest.fixture(scope="module")
def typed_model_dir(tmp_path_factory, tile):
    return _make_model(tmp_path_factory.mktemp("models") / "typed", tile, TYPES)


def check_result(result: TileResult, image_shape: tuple[int, int], mpp: float) -> None:
    h, w = image_shape
    assert result.semantic.shape == result.instances.shape == (h, w)
    assert result.semantic.dtype == np.uint8 and result.instances.dtype == np.uint32
    assert result.semantic.max() < len(result.classes)
    nucleus = [c.kind for c in result.classes].index("thing")
    assert np.array_equal(result.semantic == nucleus, result.instances > 0)
    assert result.class_names[0] == "background" and len(result.class_colors) == len(result.classes)
    table = result.nuclei
    assert isinstance(table, pd.DataFrame) and list(table.columns) == list(NUCLEI_COLUMNS)
    ids = np.unique(result.instances)
    ids = ids[ids > 0]
    assert table["id"].tolist() == ids.tolist() == list(range(1, len(ids) + 1))
    assert table["area_px"].tolist() == np.bincount(result.instances.ravel())[1:].tolist()
    np.testing.assert_allclose(table["area_um2"], table["area_px"] * mpp**2)
    assert table["centroid_x"].between(0, w - 1).all() and table["centroid_y"].between(0, h - 1).all()
    boxes = ndi.find_objects(result.instances)
    for row in table.itertuples():  # each centroid lies within its own nucleus's bounding box
        rows, cols = boxes[row.id - 1]
        assert rows.start <= row.centroid_y <= rows.stop - 1 and cols.start <= row.centroid_x <= cols.stop - 1
    assert table["nucleus_prob"].between(0, 1).all()


def test_predict_tile_properties(tile, model_dir):
    result = histopan.predict_tile(tile, MPP, model=model_dir)
    check_result(result, tile.shape[:2], MPP)
    assert len(result.nuclei) > 3
    assert result.model == "tiny" and result.mpp == MPP
    assert result.nuclei["type"].isna().all() and all(v is None for v in result.nuclei["type_prob"])


def test_predict_tile_is_deterministic(tile, model_dir):
    a = predict_tile(tile, MPP, model=model_dir)
    b = predict_tile(tile, MPP, model=load_model(model_dir))
    assert np.array_equal(a.instances, b.instances) and np.array_equal(a.semantic, b.semantic)
    pd.testing.assert_frame_equal(a.nuclei, b.nuclei)


def test_type_head_fills_type_columns(tile, typed_model_dir):
    result = predict_tile(tile, MPP, model=typed_model_dir)
    check_result(result, tile.shape[:2], MPP)
    assert len(result.nuclei) > 0
    assert set(result.nuclei["type"]) <= {t.name for t in TYPES}
    assert result.nuclei["type_prob"].astype(float).between(1 / 3 - 1e-6, 1).all()


@pytest.mark.parametrize("mpp", [0.25, 0.4, 0.8])
def test_other_resolutions_map_back_to_the_input_grid(tile, model_dir, mpp):
    result = predict_tile(tile, mpp, model=model_dir)
    check_result(result, tile.shape[:2], mpp)


def test_upsampled_input_gives_a_consistent_result(tile, model_dir):
    base = predict_tile(tile, MPP, model=model_dir)
    big = np.repeat(np.repeat(tile, 2, axis=0), 2, axis=1)
    up = predict_tile(big, MPP / 2, model=model_dir)
    check_result(up, big.shape[:2], MPP / 2)
    # the same tissue: semantic labels mostly agree and the nucleus area in um^2 is of the same size
    agree = (up.semantic[::2, ::2] == base.semantic).mean()
    assert agree > 0.8
    ratio = up.nuclei["area_um2"].sum() / base.nuclei["area_um2"].sum()
    assert 0.7 < ratio < 1.4


def test_scale_within_tolerance_is_not_resampled(tile, model_dir):
    a = predict_tile(tile, MPP, model=model_dir)
    b = predict_tile(tile, MPP * 1.0002, model=model_dir)
    assert np.array_equal(a.instances, b.instances)


def test_grayscale_and_rgba_inputs(tile, model_dir):
    gray = tile.mean(axis=2).astype(np.uint8)
    check_result(predict_tile(gray, MPP, model=model_dir), gray.shape, MPP)
    rgba = np.dstack([tile, np.full(tile.shape[:2], 255, np.uint8)])
    assert np.array_equal(predict_tile(rgba, MPP, model=model_dir).instances,
                          predict_tile(tile, MPP, model=model_dir).instances)


@pytest.mark.parametrize(
    "image, mpp, error, message",
    [
        (np.zeros((64, 64, 3), np.float32), 0.5, HistopanError, "image must be uint8"),
        (np.zeros((64, 64, 2), np.uint8), 0.5, HistopanError, "must be shaped"),
        (np.zeros((64, 64, 3), np.uint8), 0.0, MppError, "mpp must be a positive"),
        (np.zeros((64, 64, 3), np.uint8), float("nan"), MppError, "mpp must be a positive"),
        (np.zeros((64, 64, 3), np.uint8), None, MppError, "mpp must be a positive"),
        (np.zeros((20, 200, 3), np.uint8), 0.5, HistopanError, "image too small"),
        (np.zeros((48, 48, 3), np.uint8), 0.25, HistopanError, "below the minimum of 32 px"),
        (np.zeros((64, 9000, 3), np.uint8), 0.5, HistopanError, "image too large"),
    ],
)
def test_bad_inputs_are_clear_errors(model_dir, image, mpp, error, message):
    with pytest.raises(error, match=message) as info:
        predict_tile(image, mpp, model=model_dir)
    assert "Fix:" in str(info.value)


def test_unknown_model_name_lists_available(tmp_path, monkeypatch, model_dir):
    monkeypatch.setenv("HISTOPAN_MODELS", str(model_dir.parent))
    with pytest.raises(ModelError, match="unknown model name") as info:
        predict_tile(np.zeros((64, 64, 3), np.uint8), 0.5, model="no-such-model")
    assert "tiny" in str(info.value)
    assert predict_tile(np.zeros((64, 64, 3), np.uint8), 0.5, model="tiny").semantic.shape == (64, 64)


# -- inference -------------------------------------------------------------------------------------------
def test_resolve_device():
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="not a valid torch device"):
        resolve_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")


def test_inference_pads_crops_and_batches(tile, model_dir):
    model = load_model(model_dir)
    tiles = np.stack([tile[:50, :70], tile[50:100, 70:140], tile[100:150, 100:170]])
    maps = predict_maps(model, tiles, batch_size=2)
    assert len(maps) == 3
    for m in maps:
        assert m.semantic.shape == (model.config.n_classes, 50, 70) and m.semantic.dtype == np.float32
        np.testing.assert_allclose(m.semantic.sum(0), 1.0, atol=1e-5)
        assert m.centre.shape == m.boundary.shape == (50, 70) and m.types is None
    one = TileInferencer(model, batch_size=1).predict(tiles[1])[0]
    np.testing.assert_allclose(one.semantic, maps[1].semantic, atol=1e-5)
    streamed = list(TileInferencer(model, batch_size=2).iter_predict([tiles[0], tile[:64, :64], tiles[2]]))
    assert [m.shape for m in streamed] == [(50, 70), (64, 64), (50, 70)]
    np.testing.assert_allclose(streamed[2].centre, maps[2].centre, atol=1e-5)


def test_predict_image_windows_cover_large_images(tile, typed_model_dir):
    model = load_model(typed_model_dir)
    inferencer = TileInferencer(model)
    small = tile[:96, :96]  # tile + 2 * halo = 96: one pass, identical to predict()
    np.testing.assert_array_equal(inferencer.predict_image(small).semantic, inferencer.predict(small)[0].semantic)
    maps = inferencer.predict_image(tile)  # 160 x 192: 3 x 3 windows of 64 + 2 * 16
    assert maps.shape == tile.shape[:2] and maps.types.shape == (3, *tile.shape[:2])
    np.testing.assert_allclose(maps.semantic.sum(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(maps.types.sum(0), 1.0, atol=1e-5)
    # a window's core matches running that window alone (window origins: rows 0, 64, 96; columns 0, 64, 128)
    padded = np.pad(tile, ((16, 16), (16, 16), (0, 0)), mode="reflect")
    for y, x in ((0, 0), (96, 128)):
        alone = inferencer.predict(padded[y:y + 96, x:x + 96])[0]
        np.testing.assert_allclose(maps.centre[y:y + 64, x:x + 64], alone.centre[16:80, 16:80], atol=1e-5)


def test_bad_tiles_and_batch_size(model_dir):
    model = load_model(model_dir)
    with pytest.raises(HistopanError, match="at least 32 px"):
        predict_maps(model, np.zeros((1, 16, 64, 3), np.uint8))
    with pytest.raises(HistopanError, match="must be uint8"):
        predict_maps(model, np.zeros((1, 64, 64, 3), np.float64))
    with pytest.raises(ConfigError, match="batch_size"):
        TileInferencer(model, batch_size=0)


def test_tta_maps_are_equivariant_and_average_the_eight_views(tile, typed_model_dir):
    model = load_model(typed_model_dir)
    square = tile[:96, :96]  # a multiple of 32: no padding
    tta = TileInferencer(model, tta=True)
    plain = TileInferencer(model)
    a = tta.predict(square)[0]
    # a rotated / flipped input gives the rotated / flipped maps (untrained networks are not symmetric)
    for view in (lambda m: np.rot90(m, 1, axes=(-2, -1)), lambda m: m[..., ::-1], lambda m: m[..., ::-1, :]):
        b = tta.predict(np.ascontiguousarray(view(square.transpose(2, 0, 1)).transpose(1, 2, 0)))[0]
        for name in ("semantic", "centre", "boundary", "types"):
            np.testing.assert_allclose(getattr(b, name), view(getattr(a, name)), atol=2e-5)
        p = plain.predict(np.ascontiguousarray(view(square.transpose(2, 0, 1)).transpose(1, 2, 0)))[0]
        assert not np.allclose(p.centre, view(plain.predict(square)[0].centre), atol=1e-3)
    # the TTA logits are the mean of the eight views' logits: check the centre map's
    views = []
    for flip in (False, True):
        img = square[:, ::-1] if flip else square
        for k in range(4):
            m = plain.predict(np.ascontiguousarray(np.rot90(img, k)))[0]
            logit = np.log(m.centre) - np.log1p(-m.centre)
            logit = np.rot90(logit, -k)
            views.append(logit[:, ::-1] if flip else logit)
    np.testing.assert_allclose(a.centre, 1 / (1 + np.exp(-np.mean(views, axis=0))), atol=1e-4)
    result = predict_tile(tile, MPP, model=typed_model_dir, tta=True)
    check_result(result, tile.shape[:2], MPP)
    with pytest.raises(ConfigError, match="tta"):
        TileInferencer(model, tta="yes")


def test_tta_runs_use_the_thresholds_tuned_for_tta(tile, model_dir, tmp_path):
    """A model with ``postprocess_tta`` post-processes TTA maps with it and plain maps with ``postprocess``."""
    loaded = load_model(model_dir)
    assert loaded.for_tta(True) is loaded  # no TTA thresholds: the same config either way
    nothing = replace(loaded.config.postprocess, nucleus_threshold=1.0)  # p(nucleus) > 1 never holds
    folder = save_model(tmp_path / "tta", loaded.network, replace(loaded.config, postprocess_tta=nothing))
    model = load_model(folder)
    assert model.for_tta(True).config.postprocess == nothing and model.for_tta(False) is model
    plain = predict_tile(tile, MPP, model=model)
    tta = predict_tile(tile, MPP, model=model, tta=True)
    assert len(plain.nuclei) > 0 and len(tta.nuclei) == 0
    assert len(predict_tile(tile, MPP, model=loaded, tta=True).nuclei) > 0


# -- predict_tile == segment ---------------------------------------------------------------------------
def test_predict_tile_equals_segment_on_the_same_region(data_dir, tmp_path):
    """The default model on a real 480 x 480 CRC region at its own 0.5 um/px, whose lower half is glass strewn with
    black debris: ``histopan segment`` over the region as a one-tile slide (tile 480, no halo: the network sees the
    same pixels; the tissue detector on, as by default) and ``predict_tile`` give the same tissue classes, through
    the same rules (the glass rule: background outside the tissue region; small regions absorbed), and the same
    nuclei."""
    from histopan.pipeline import SegmentOptions, segment_slide
    from histopan.postprocess import panoptic_labels, postprocess_tile
    from histopan.store import open_store

    default = Path(histopan.__file__).resolve().parents[1] / "models" / "default"
    image = np.asarray(Image.open(data_dir / "crc_points" / "val" / "images" / "img11.png").convert("RGB"))
    image = np.ascontiguousarray(image[:480, :480])
    png = tmp_path / "region.png"
    Image.fromarray(image).save(png)
    segment_slide(png, tmp_path / "region.zarr",
                  SegmentOptions(model=str(default), mpp=MPP, tile=480, halo=0, workers=1))
    store = open_store(tmp_path / "region.zarr")
    result = predict_tile(image, MPP, model=default)

    # tissue classes: equal, and both rules changed something on this region
    assert np.array_equal(store.semantic[:], result.semantic)
    model = load_model(default)
    cfg = model.config
    maps = TileInferencer(model).predict_image(image)
    raw = postprocess_tile(maps, MPP, cfg.postprocess, cfg.classes).semantic
    region = store.tissue_region().sample_box(0, 0, 480, 480, 1.0)
    thing = cfg.nucleus_index
    assert 0.3 < region.mean() < 0.8  # tissue above, glass below
    glass = ~region & (result.semantic != thing)
    assert (result.semantic[glass] == 0).all()  # the glass rule
    assert (raw[glass] != 0).sum() > 10_000  # the model alone paints tissue classes over much of the glass
    free = panoptic_labels(maps, MPP, cfg.postprocess, cfg.classes).semantic  # the rules without the glass rule
    assert ((raw != free) & region).sum() > 100  # small regions absorbed inside the tissue
    assert np.array_equal(predict_tile(image, MPP, model=model, tissue=False).semantic, free)
    assert len(np.unique(result.semantic[region])) >= 3

    # nuclei: the same instances up to renumbering, with the same centroids and areas
    seg, pred = store.nuclei[:], result.instances
    pairs = np.unique(np.stack([seg.ravel().astype(np.int64), pred.ravel().astype(np.int64)]), axis=1)
    assert ((pairs[0] == 0) == (pairs[1] == 0)).all()
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]  # one-to-one
    table = store.read_table().set_index("id")
    nuclei = result.nuclei.set_index("id")
    assert len(table) == len(nuclei) > 50
    matched = pairs[:, pairs[0] > 0]
    a, b = table.loc[matched[0].astype(np.uint32)], nuclei.loc[matched[1].astype(np.uint32)]
    np.testing.assert_allclose(a["area_um2"].to_numpy(), b["area_um2"].to_numpy())
    # the store's centroids are level-0 pixel centres (+0.5); the slide is at 0.5 um/px, so level 0 = this grid
    np.testing.assert_allclose(a["centroid_x"].to_numpy() - 0.5, b["centroid_x"].to_numpy())
    np.testing.assert_allclose(a["centroid_y"].to_numpy() - 0.5, b["centroid_y"].to_numpy())
    np.testing.assert_allclose(a["nucleus_prob"].to_numpy(), b["nucleus_prob"].to_numpy())


def test_predict_tile_glass_rule_on_a_small_tile(tile, model_dir):
    """A 96 x 80 um tile of tissue is left to the model (a small view keeps its tissue); the same tile with a band
    of glass pasted in gets background there, and the same nuclei as without the rule."""
    plain = predict_tile(tile, MPP, model=model_dir)
    assert np.array_equal(plain.semantic, predict_tile(tile, MPP, model=model_dir, tissue=False).semantic)
    glassy = tile.copy()
    glassy[:, 120:] = (240, 238, 242)
    ruled = predict_tile(glassy, MPP, model=model_dir)
    free = predict_tile(glassy, MPP, model=model_dir, tissue=False)
    check_result(ruled, glassy.shape[:2], MPP)
    thing = [c.kind for c in ruled.classes].index("thing")
    far = ruled.semantic[:, 140:]  # beyond the region's 8 um (16 px) margin
    assert (far[far != thing] == 0).all() and (free.semantic[:, 140:] != 0).any()
    np.testing.assert_array_equal(ruled.instances, free.instances)
    pd.testing.assert_frame_equal(ruled.nuclei, free.nuclei)
