"""The training loop on a tiny network: determinism, resume == uninterrupted, and `histopan train` end to end."""

import dataclasses
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from histopan.cli import main
from histopan.config import from_dict
from histopan.errors import ConfigError, DataError, ModelError
from histopan.model.checkpoint import load_model, save_config
from histopan.postprocess import PostprocessConfig
from histopan.training.config import TrainConfig, TuneConfig, read_train_config
from histopan.training.data import load_training_data
from histopan.training.loop import grid_search, learning_rate, train

TINY_ARCH = {"arch": "unet", "encoder": "mobilenet_v2", "encoder_depth": 5,
             "decoder_channels": [16, 16, 8, 8, 8]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(folder: Path, **kw) -> TrainConfig:
    data = {"model": {"name": "tiny", "architecture": TINY_ARCH, "mpp": 0.5},
            "nuclei": [{"path": str(folder), "val": ["s2"]}], "tile_fraction": 0.0,
            "crop": 64, "batch_size": 2, "epochs": 2, "steps_per_epoch": 1, "warmup_steps": 1, "threads": 1,
            "device": "cpu",
            "tune": {"nucleus_threshold": [0.5], "centre_threshold": [0.3], "boundary_weight": [0.5],
                     "min_distance_um": [2.0]}, **kw}
    return from_dict(TrainConfig, data, source="test")


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["train"]["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_schedule_warmup_then_cosine():
    cfg = _config(Path("x"), epochs=10, steps_per_epoch=10, warmup_steps=10, lr=1e-3)
    assert learning_rate(0, cfg) == pytest.approx(1e-4)
    assert learning_rate(9, cfg) == pytest.approx(1e-3)
    assert learning_rate(99, cfg) < 0.05e-3
    lrs = [learning_rate(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_same_seed_same_loss_curve_and_weights(tmp_path, disc_nucleus_set):
    cfg = _config(disc_nucleus_set(tmp_path / "data"))
    data = load_training_data(cfg)
    a = train(cfg, tmp_path / "a", progress=False, data=data)
    b = train(cfg, tmp_path / "b", progress=False, data=data)
    assert _losses(a.run_dir) == _losses(b.run_dir) and len(_losses(a.run_dir)) == 2
    wa = load_file(str(tmp_path / "a" / "checkpoints" / "last" / "weights.safetensors"))
    wb = load_file(str(tmp_path / "b" / "checkpoints" / "last" / "weights.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # a different seed gives different crops, hence a different curve
    c = train(_config(tmp_path / "data", seed=1), tmp_path / "c", progress=False, data=data)
    assert _losses(c.run_dir) != _losses(a.run_dir)


def test_resume_gives_the_same_state_as_uninterrupted(tmp_path, disc_nucleus_set):
    cfg = _config(disc_nucleus_set(tmp_path / "data"))
    data = load_training_data(cfg)
    full = train(cfg, tmp_path / "full", progress=False, data=data)
    assert train(cfg, tmp_path / "staged", progress=False, data=data, stop_after=1) is None
    assert len(_losses(tmp_path / "staged")) == 1
    with pytest.raises(ConfigError, match="already holds a training run"):
        train(cfg, tmp_path / "staged", progress=False, data=data)
    staged = train(cfg, tmp_path / "staged", resume=True, progress=False, data=data)
    assert _losses(full.run_dir) == _losses(staged.run_dir)
    for part in ("weights", "optimizer"):
        wa = load_file(str(full.run_dir / "checkpoints" / "last" / f"{part}.safetensors"))
        wb = load_file(str(staged.run_dir / "checkpoints" / "last" / f"{part}.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ema_weights_are_validated_exported_and_resumed(tmp_path, disc_nucleus_set):
    cfg = _config(disc_nucleus_set(tmp_path / "data"), ema=0.75)
    data = load_training_data(cfg)
    full = train(cfg, tmp_path / "full", progress=False, data=data)
    assert train(cfg, tmp_path / "staged", progress=False, data=data, stop_after=1) is None
    last = tmp_path / "staged" / "checkpoints" / "last"
    w1 = load_file(str(last / "weights.safetensors"))
    e1 = load_file(str(last / "ema.safetensors"))
    assert e1.pop("n_averaged").item() == 1  # the first update copies the weights
    assert all(torch.equal(w1[k], e1[k]) for k in w1)
    staged = train(cfg, tmp_path / "staged", resume=True, progress=False, data=data)
    w2 = load_file(str(last / "weights.safetensors"))
    e2 = load_file(str(last / "ema.safetensors"))
    assert e2.pop("n_averaged").item() == 2
    floats = [k for k in w2 if w2[k].is_floating_point()]
    assert any(not torch.equal(w2[k], e2[k]) for k in floats)
    for k in floats:  # average = decay * previous average + (1 - decay) * new weights
        torch.testing.assert_close(e2[k], 0.75 * e1[k] + 0.25 * w2[k])
    # the run resumed from a checkpoint equals the uninterrupted one, the average included
    for part in ("weights", "ema"):
        a = load_file(str(full.run_dir / "checkpoints" / "last" / f"{part}.safetensors"))
        b = load_file(str(last / f"{part}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    # validation, the best checkpoint and the exported model hold the average, not the raw weights
    best = load_file(str(staged.run_dir / "checkpoints" / "best" / "weights.safetensors"))
    averaged = e2 if staged.best_epoch == 2 else e1
    assert all(torch.equal(best[k], averaged[k]) for k in best)
    exported = load_file(str(staged.model_dir / "weights.safetensors"))
    assert all(torch.equal(exported[k], best[k]) for k in best)
    with pytest.raises(ConfigError, match="ema"):
        _config(tmp_path / "data", ema=1.0)


def test_init_starts_from_a_model_and_a_mismatch_is_refused(tmp_path, disc_nucleus_set):
    data_dir = disc_nucleus_set(tmp_path / "data")
    first = train(_config(data_dir), tmp_path / "first", progress=False)
    start = load_file(str(first.model_dir / "weights.safetensors"))
    # one step at lr ~0 from the first model: the second run's weights stay the first model's
    cfg = _config(data_dir, init=str(first.model_dir), epochs=1, lr=1e-12, weight_decay=0.0)
    second = train(cfg, tmp_path / "second", progress=False)
    after = load_file(str(second.model_dir / "weights.safetensors"))
    conv = [k for k in start if k.endswith(".weight") and start[k].ndim == 4]
    assert conv and all(torch.allclose(start[k], after[k], atol=1e-6) for k in conv)
    record = load_model(second.model_dir).config.training
    assert record["init"] == str(first.model_dir)
    # the init model's identity and its own training record travel, as they were when the run started
    assert record["init_weights_sha256"] == load_model(first.model_dir).weights_sha256
    assert record["init_training"] == load_model(first.model_dir).config.training
    # from scratch the same run ends elsewhere
    scratch = load_file(str(train(_config(data_dir, epochs=1, lr=1e-12), tmp_path / "scratch",
                                  progress=False).model_dir / "weights.safetensors"))
    assert not all(torch.allclose(start[k], scratch[k], atol=1e-6) for k in conv)
    # a new class grows the head; a different architecture is refused
    grown = _config(data_dir, init=str(first.model_dir), epochs=1,
                    model={"name": "tiny", "architecture": TINY_ARCH, "mpp": 0.5,
                           "classes": [{"name": "background", "color": [255, 255, 255], "kind": "stuff"},
                                       {"name": "stroma", "color": [240, 160, 200], "kind": "stuff"},
                                       {"name": "fat", "color": [250, 250, 150], "kind": "stuff"},
                                       {"name": "nucleus", "color": [40, 40, 220], "kind": "thing"}]})
    assert load_model(train(grown, tmp_path / "grown", progress=False).model_dir).config.n_classes == 4
    other = {**TINY_ARCH, "decoder_channels": [16, 16, 8, 8, 4]}
    wrong = _config(data_dir, init=str(first.model_dir),
                    model={"name": "tiny", "architecture": other, "mpp": 0.5})
    with pytest.raises(ConfigError, match="different architecture"):
        train(wrong, tmp_path / "wrong", progress=False)


def test_trainable_decoder_keeps_the_init_models_encoder(tmp_path, disc_nucleus_set):
    data_dir = disc_nucleus_set(tmp_path / "data")
    first = train(_config(data_dir), tmp_path / "first", progress=False)
    start = load_file(str(first.model_dir / "weights.safetensors"))
    cfg = _config(data_dir, init=str(first.model_dir), epochs=1, lr=1e-2, trainable="decoder")
    after = load_file(str(train(cfg, tmp_path / "second", progress=False).model_dir / "weights.safetensors"))
    encoder = [k for k in start if k.startswith("encoder.")]
    decoder = [k for k in start if k.startswith("decoder.") and k.endswith(".weight") and start[k].ndim == 4]
    assert encoder and decoder
    # every encoder tensor (batch-norm running statistics included) is the init model's, bit for bit
    assert all(torch.equal(start[k], after[k]) for k in encoder)
    # the decoder's batch-norm statistics stay too; its weights and the head train
    assert all(torch.equal(start[k], after[k]) for k in start if k.startswith("decoder.") and "running_" in k)
    assert sum(not torch.allclose(start[k], after[k]) for k in decoder) >= len(decoder) // 2
    assert not torch.allclose(start["segmentation_head.0.weight"], after["segmentation_head.0.weight"])
    assert load_model(tmp_path / "second" / "model").config.training["trainable"] == "decoder"
    with pytest.raises(ConfigError, match="trainable: decoder freezes layers of the .init. model"):
        _config(data_dir, trainable="decoder")


def test_histopan_train_on_real_monuseg_tiles_writes_a_loadable_model(tmp_path, data_dir, capsys):
    monuseg = data_dir / "monuseg_train"
    names = sorted(p.stem for p in (monuseg / "images").glob("*.png"))
    keep = ["TCGA-A7-A13E-01Z-00-DX1", "TCGA-B0-5698-01Z-00-DX1"]
    config = {"model": {"name": "e2e", "architecture": TINY_ARCH, "mpp": 0.5},
              "nuclei": [{"path": str(monuseg), "val": [keep[1]], "exclude": [n for n in names if n not in keep]}],
              "tiles": [{"path": str(data_dir / "tissue_tiles" / "kather2016"), "mpp": 0.495, "pad_to_crop": True,
                         "classes": {"01_TUMOR": "tumour", "02_STROMA": "stroma", "03_COMPLEX": None,
                                     "04_LYMPHO": None, "05_DEBRIS": None, "06_MUCOSA": None, "07_ADIPOSE": None,
                                     "08_EMPTY": "background"}}],
              "tile_fraction": 0.3, "crop": 64, "batch_size": 2, "epochs": 1, "steps_per_epoch": 2,
              "warmup_steps": 1, "threads": 1, "device": "cpu",
              "tune": {"nucleus_threshold": [0.5], "centre_threshold": [0.3], "boundary_weight": [0.5],
                       "min_distance_um": [2.0]}}
    cfg_path = tmp_path / "train.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    out, export = tmp_path / "run", tmp_path / "exported"
    assert main(["train", str(cfg_path), "--out", str(out), "--export", str(export), "--no-progress"]) == 0
    assert "validation nucleus PQ" in capsys.readouterr().out
    for name in ("train.yaml", "metrics.jsonl", "curves.png", "tuning.json", "model/model.yaml"):
        assert (out / name).is_file(), name
    loaded = load_model(export)
    assert loaded.config.name == "e2e" and loaded.config.mpp == 0.5
    record = loaded.config.training
    assert record["data"]["val_images"] == 1 and record["steps"] == 2
    assert record["command"].startswith("histopan train ") and str(out) in record["command"]
    assert 0.0 <= record["validation"]["pq"] <= 1.0
    # a second run into the same folder without --resume is refused with exit code 2
    assert main(["train", str(cfg_path), "--out", str(out), "--no-progress"]) == 2


def test_extends_starts_from_another_config_with_paths_relative_to_each_file(tmp_path, disc_nucleus_set):
    base_dir, child_dir = tmp_path / "base", tmp_path / "child"
    base_dir.mkdir()
    child_dir.mkdir()
    disc_nucleus_set(tmp_path / "set")
    base = {"model": {"name": "tiny", "architecture": TINY_ARCH, "mpp": 0.5},
            "nuclei": [{"path": "../set", "val": ["s2"]}], "epochs": 3, "lr": 0.01, "tile_fraction": 0.0}
    (base_dir / "train.yaml").write_text(yaml.safe_dump(base))
    (child_dir / "longer.yaml").write_text(yaml.safe_dump(
        {"extends": "../base/train.yaml", "epochs": 9, "init": "../runs/first/model"}))
    cfg = read_train_config(child_dir / "longer.yaml")
    assert cfg.epochs == 9 and cfg.lr == 0.01 and cfg.model.name == "tiny"
    assert Path(cfg.nuclei[0].path) == (tmp_path / "set").resolve()          # relative to base/train.yaml
    assert Path(cfg.init) == (tmp_path / "runs" / "first" / "model").resolve()  # relative to child/longer.yaml

    (base_dir / "train.yaml").write_text(yaml.safe_dump({**base, "extends": "../child/longer.yaml"}))
    with pytest.raises(ConfigError, match="loop"):
        read_train_config(child_dir / "longer.yaml")
    (child_dir / "bad.yaml").write_text(yaml.safe_dump({"extends": 3}))
    with pytest.raises(ConfigError, match="extends"):
        read_train_config(child_dir / "bad.yaml")
    (child_dir / "missing.yaml").write_text(yaml.safe_dump({"extends": "nope.yaml"}))
    with pytest.raises(ConfigError, match="not found"):
        read_train_config(child_dir / "missing.yaml")


def test_shipped_default_training_configs_read():
    repo_root = Path(__file__).resolve().parents[1]
    stage1 = read_train_config(repo_root / "models" / "default" / "train.yaml")
    warm = read_train_config(repo_root / "models" / "default" / "train-warm.yaml")
    assert warm.model == stage1.model and warm.tiles == stage1.tiles
    assert (warm.epochs, warm.tile_fraction, warm.nuclei[0].weight) == (8, 0.3, 3.0)
    assert warm.init is not None and Path(warm.init).parts[-3:] == ("runs", "default", "model")
    stage3 = read_train_config(repo_root / "models" / "default" / "train-stage3.yaml")
    assert stage3.model == stage1.model and stage3.nuclei == warm.nuclei
    assert (stage3.epochs, stage3.tile_fraction, stage3.lr) == (4, 0.5, 0.0005)
    assert stage3.init is not None and Path(stage3.init).parts[-3:] == ("runs", "default-warm", "model")
    gpu = read_train_config(repo_root / "models" / "default" / "train-gpu.yaml")
    assert gpu.model == stage1.model and gpu.nuclei == warm.nuclei and gpu.tiles == warm.tiles
    assert (gpu.batch_size, gpu.workers, gpu.epochs * gpu.steps_per_epoch, gpu.device) == (16, 14, 7890, "auto")
    assert Path(gpu.init) == (repo_root / "models" / "default").resolve()
    # the shipped pack signature: the GPU run's config packs the same data as stage 2's
    from histopan.training.packed import data_signature
    assert data_signature(gpu) == data_signature(warm)
    # stage 4 (CPU, moving average) repeats the shipped model's section: its network, geometry and thresholds
    stage4 = read_train_config(repo_root / "models" / "default" / "train-stage4.yaml")
    shipped = load_model("default").config
    assert stage4.model.architecture == shipped.architecture
    assert (stage4.model.tile, stage4.model.halo, stage4.model.mpp) == (shipped.tile, shipped.halo, shipped.mpp)
    assert stage4.model.postprocess.centre_h > 0 and stage4.tiles == warm.tiles
    assert (stage4.ema, stage4.lr, stage4.epochs * stage4.steps_per_epoch, stage4.nuclei[0].weight) == (
        0.999, 0.0002, 2800, 4.0)
    assert Path(stage4.init) == (repo_root / "models" / "default").resolve()
    # stage 6: stage 4's run plus the contact weighting, warm-started from the folder (then stage 4)
    stage6 = read_train_config(repo_root / "models" / "default" / "train-stage6.yaml")
    assert stage6.model == stage4.model and stage6.nuclei == stage4.nuclei and stage6.tiles == stage4.tiles
    assert (stage6.loss.contact_weight, stage6.loss.contact_um, stage6.ema) == (5.0, 1.0, 0.999)
    assert Path(stage6.init) == (repo_root / "models" / "default").resolve()
    # its thresholds were re-tuned with the object filter, plain and with TTA
    assert shipped.postprocess.min_nucleus_prob > 0 and shipped.postprocess_tta.min_nucleus_prob > 0
    # stages 7 and 8 (not shipped): pixel masks and a benign-epithelium class, nuclei distilled from stage 6
    stage7 = read_train_config(repo_root / "models" / "default" / "train-stage7.yaml")
    assert "benign_epithelium" in stage7.model.class_names and len(stage7.masks) == 2
    assert [Path(m.path).name for m in stage7.masks] == ["ebhi_seg", "glas_train"] and stage7.distill == 1.0
    stage8 = read_train_config(repo_root / "models" / "default" / "train-stage8.yaml")
    assert Path(stage8.distill_from) == (repo_root / "models" / "default").resolve()
    assert Path(stage8.init).parts[-3:] == ("runs", "default-stage7", "model") and stage8.masks == stage7.masks
    # stages 9 and 10 (shipped): stage 7's data and classes from stage 6 with the encoder frozen, then continued
    stage9 = read_train_config(repo_root / "models" / "default" / "train-stage9.yaml")
    assert stage9.trainable == "decoder" and Path(stage9.init) == (repo_root / "models" / "default").resolve()
    assert stage9.masks == stage7.masks and stage9.model.classes == stage7.model.classes
    stage10 = read_train_config(repo_root / "models" / "default" / "train-stage10.yaml")
    assert stage10.trainable == "decoder" and Path(stage10.init).parts[-3:] == ("runs", "default-stage9", "model-prob")
    assert Path(stage10.distill_from) == (repo_root / "models" / "default").resolve()
    assert (stage10.model.classes, stage10.model.architecture) == (shipped.classes, shipped.architecture)
    assert shipped.training["trainable"] == "decoder"
    # and the record names what it started from: stage 9, which had started from stage 6 (itself from stage 4,
    # from stage 3)
    stage9_record = shipped.training["init_training"]
    assert stage9_record["init_weights_sha256"].startswith("9f4fdd5eaa70")
    assert stage9_record["init_training"]["init_weights_sha256"].startswith("1e4df6580b9d")
    assert stage9_record["init_training"]["init_training"]["init_weights_sha256"].startswith("9c93e0ebc03e")


def test_stuff_tile_scores_count_the_argmax_and_the_true_class_share():
    """Two tiles of the default class list: one called right by a clear margin, one lost by a near-tie."""
    from histopan.model.config import ModelConfig
    from histopan.postprocess import PostprocessConfig, ProbabilityMaps
    from histopan.training.data import Sample
    from histopan.training.loop import ValidationMaps, score_maps

    model = ModelConfig()
    names = [c.name for c in model.classes]
    stroma, necrosis, nucleus = names.index("stroma"), names.index("necrosis"), model.nucleus_index

    def tile(probs: dict[int, float], true: int) -> tuple[Sample, ProbabilityMaps]:
        semantic = np.zeros((len(names), 8, 8), np.float32)
        for index, value in probs.items():
            semantic[index] = value
        semantic[nucleus, :2] = 1.0          # two rows of nucleus pixels: not counted for the tissue class
        semantic[[i for i in range(len(names)) if i != nucleus], :2] = 0.0
        zeros = np.zeros((8, 8), np.float32)
        sample = Sample(name=f"t{true}", dataset="tiles", image=np.zeros((8, 8, 3), np.uint8), labels=None,
                        stuff_class=true, source_mpp=0.5)
        return sample, ProbabilityMaps(semantic, zeros, zeros)

    maps = ValidationMaps((), (tile({stroma: 0.8, necrosis: 0.2}, stroma),
                               tile({stroma: 0.49, necrosis: 0.51}, stroma)))
    scores = score_maps(maps, model, PostprocessConfig())
    assert scores["stuff_tiles"] == 2
    assert scores["stuff_tile_accuracy"] == pytest.approx(0.5)
    assert scores["stuff_tile_true_share"] == pytest.approx((0.8 + 0.49) / 2, abs=1e-6)


def test_worker_processes_make_the_same_batches_and_the_same_run(tmp_path, disc_nucleus_set):
    from histopan.training.data import CropSampler
    from histopan.training.loop import batches

    cfg = _config(disc_nucleus_set(tmp_path / "data"), epochs=2, steps_per_epoch=2)
    data = load_training_data(cfg)
    sampler = CropSampler(data, cfg)
    here = list(batches(sampler, 1, 4))
    workers = list(batches(sampler, 1, 4, workers=2))
    assert len(here) == len(workers) == 3
    for a, b in zip(here, workers):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], np.asarray(b[k])) for k in a)
    a = train(cfg, tmp_path / "a", progress=False, data=data)
    b = train(_config(tmp_path / "data", epochs=2, steps_per_epoch=2, workers=2), tmp_path / "b", progress=False,
              data=data)
    assert _losses(a.run_dir) == _losses(b.run_dir)
    wa, wb = (load_file(str(r.model_dir / "weights.safetensors")) for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert load_model(b.model_dir).config.training["hardware"]["workers"] == 2
    with pytest.raises(ConfigError, match="workers"):
        _config(tmp_path / "data", workers=-1)


def test_a_finished_run_is_tuned_and_exported_from_its_best_weights_and_state_alone(tmp_path, disc_nucleus_set):
    """A run trained elsewhere (e.g. on a GPU node) comes back as best weights + state; --resume exports it."""
    cfg = _config(disc_nucleus_set(tmp_path / "data"))
    data = load_training_data(cfg)
    first = train(cfg, tmp_path / "run", progress=False, data=data)
    best = load_file(str(tmp_path / "run" / "checkpoints" / "best" / "weights.safetensors"))
    for name in ("weights.safetensors", "optimizer.safetensors"):
        (tmp_path / "run" / "checkpoints" / "last" / name).unlink()
    shutil.rmtree(first.model_dir)
    again = train(cfg, tmp_path / "run", resume=True, progress=False, data=data)
    exported = load_file(str(again.model_dir / "weights.safetensors"))
    assert all(torch.equal(best[k], exported[k]) for k in best)
    assert again.best_epoch == first.best_epoch and again.scores["pq"] == pytest.approx(first.scores["pq"])
    assert load_model(again.model_dir).config.training["steps"] == 2
    # an unfinished run still needs its last checkpoint to continue
    assert train(cfg, tmp_path / "staged", progress=False, data=data, stop_after=1) is None
    (tmp_path / "staged" / "checkpoints" / "last" / "optimizer.safetensors").unlink()
    with pytest.raises(DataError, match="incomplete"):
        train(cfg, tmp_path / "staged", resume=True, progress=False, data=data)


def test_grid_search_keeps_the_current_thresholds_unless_a_setting_beats_them():
    base = PostprocessConfig(nucleus_threshold=0.5)
    grid = from_dict(TuneConfig, {"nucleus_threshold": [0.3, 0.4, 0.7], "centre_threshold": [base.centre_threshold],
                                  "boundary_weight": [base.boundary_weight],
                                  "min_distance_um": [base.min_distance_um], "centre_h": [base.centre_h]})
    # the score peaks at 0.5, which the grid lacks: the base stays
    best, trials = grid_search(grid, base, lambda pp: -abs(pp.nucleus_threshold - 0.5), "score")
    assert best == base and [t["nucleus_threshold"] for t in trials] == [0.3, 0.4, 0.7]
    # a peak the grid holds wins; of equal scores the first
    best, _ = grid_search(grid, base, lambda pp: -abs(pp.nucleus_threshold - 0.38), "score")
    assert best == dataclasses.replace(base, nucleus_threshold=0.4)
    best, _ = grid_search(grid, base, lambda pp: 1.0 if pp.nucleus_threshold != 0.5 else 0.0, "score")
    assert best.nucleus_threshold == 0.3
    # a caller that has the base's score already passes it, and the base is not scored again
    scored = []
    best, _ = grid_search(grid, base, lambda pp: scored.append(pp) or 0.0, "score", base_value=1.0)
    assert best == base and base not in scored and len(scored) == 3


def test_grid_search_on_threads_gives_the_serial_searchs_trials_and_result():
    base = PostprocessConfig()
    grid = from_dict(TuneConfig, {"nucleus_threshold": [0.3, 0.4, 0.5, 0.6], "centre_threshold": [0.1, 0.2, 0.3],
                                  "boundary_weight": [base.boundary_weight], "min_distance_um": [1.0, 2.0],
                                  "centre_h": [base.centre_h]})
    threads = set()

    def score(pp):  # slow enough that the pool hands the settings to several threads; ties on purpose
        threads.add(threading.get_ident())
        time.sleep(0.005)
        return round(-abs(pp.nucleus_threshold - 0.45) - abs(pp.centre_threshold - 0.2), 6)

    serial = grid_search(grid, base, score, "score", base_value=-1.0)
    threads.clear()
    parallel = grid_search(grid, base, score, "score", base_value=-1.0, workers=4)
    assert len(threads) > 1
    assert parallel == serial and len(serial[1]) == 24
    # the first of the tied best (0.4 and 0.5 at centre 0.2) in the grid's order, as a serial search picks
    assert (serial[0].nucleus_threshold, serial[0].centre_threshold, serial[0].min_distance_um) == (0.4, 0.2, 1.0)


def test_histopan_tune_searches_the_grid_and_writes_the_same_weights_with_new_thresholds(tmp_path, capsys,
                                                                                         disc_nucleus_set):
    folder = disc_nucleus_set(tmp_path / "data")
    trained = train(_config(folder), tmp_path / "run", progress=False)
    grid = {"nucleus_threshold": [0.3, 0.5], "centre_threshold": [0.2], "boundary_weight": [0.5],
            "min_distance_um": [1.0], "centre_h": [0.0, 0.15]}
    cfg = {"extends": str(tmp_path / "base.yaml"), "tune": grid}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(
        {"model": {"name": "tiny", "architecture": TINY_ARCH, "mpp": 0.5},
         "nuclei": [{"path": str(folder), "val": ["s2"]}], "tile_fraction": 0.0, "crop": 64, "device": "cpu"}))
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(cfg))
    # without --out only the scores are shown
    assert main(["tune", str(trained.model_dir), "--config", str(tmp_path / "tune.yaml"), "--device", "cpu"]) == 0
    assert "validation nucleus PQ" in capsys.readouterr().out and not (tmp_path / "tuned").exists()
    out = tmp_path / "tuned"
    assert main(["tune", str(trained.model_dir), "--config", str(tmp_path / "tune.yaml"), "--device", "cpu",
                 "--out", str(out)]) == 0
    before, after = load_model(trained.model_dir), load_model(out)
    assert after.weights_sha256 == before.weights_sha256  # the network is untouched
    pp = after.config.postprocess
    # a setting of the grid, or the model's own thresholds where none beats them
    assert pp == before.config.postprocess or (
        pp.nucleus_threshold in (0.3, 0.5) and pp.centre_h in (0.0, 0.15) and pp.min_distance_um == 1.0)
    record = after.config.training["postprocess_tuning"]
    assert record["trials"] == 4 and record["tta"] is False and record["validation_images"] == 1
    assert record["validation"]["pq"] >= record["before"]["pq"] - 1e-12
    assert record["command"].startswith("histopan tune ") and str(out) in record["command"]
    assert after.config.training["steps"] == before.config.training["steps"]  # the training record is kept
    assert after.config.postprocess_tta is None
    # --tta tunes on augmented maps into postprocess_tta (here in place); the plain thresholds stay
    assert main(["tune", str(out), "--config", str(tmp_path / "tune.yaml"), "--device", "cpu", "--tta",
                 "--out", str(out)]) == 0
    both = load_model(out)
    assert both.weights_sha256 == before.weights_sha256 and both.config.postprocess == pp
    tta_pp = both.config.postprocess_tta  # a setting of the grid, or the plain thresholds it started from
    assert tta_pp is not None and (tta_pp == pp or tta_pp.min_distance_um == 1.0)
    assert both.for_tta(True).config.postprocess == both.config.postprocess_tta
    assert both.config.training["postprocess_tuning_tta"]["tta"] is True
    assert both.config.training["postprocess_tuning"] == record
    # a config for another network is never written beside these weights
    other = dataclasses.replace(both.config, architecture=dataclasses.replace(both.config.architecture,
                                                                              decoder_channels=(32, 16, 8, 8, 8)))
    with pytest.raises(ModelError, match="another network"):
        save_config(both, other, tmp_path / "other")
    assert not (tmp_path / "other").exists()
    # a config whose data sets hold no validation image is refused, and nothing is written
    (tmp_path / "noval.yaml").write_text(yaml.safe_dump(
        {"model": {"name": "tiny", "architecture": TINY_ARCH, "mpp": 0.5},
         "nuclei": [{"path": str(folder)}], "tile_fraction": 0.0, "crop": 64}))
    assert main(["tune", str(trained.model_dir), "--config", str(tmp_path / "noval.yaml"), "--out",
                 str(tmp_path / "never")]) == 2
    assert "no validation images" in capsys.readouterr().err and not (tmp_path / "never").exists()
    # and --points wants a fine-tuning config
    assert main(["tune", str(trained.model_dir), "--config", str(tmp_path / "tune.yaml"), "--points"]) == 2
    assert "fine-tuning config" in capsys.readouterr().err
