"""Network layout, model folders (safetensors + model.yaml), validation on load and head growing."""

from __future__ import annotations

import hashlib
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import histopan
from histopan.config import from_dict, to_dict
from histopan.errors import ConfigError, ModelError
from histopan.model.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LoadedModel,
    available_models,
    load_model,
    resolve_model_path,
    save_model,
)
from histopan.model.config import (
    ArchitectureConfig,
    ClassSpec,
    ModelConfig,
    NucleusTypeSpec,
    read_model_config,
    write_model_config,
)
from histopan.model.network import build_network, final_conv, grow_heads, normalize_input, split_outputs, \
    to_probabilities

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ArchitectureConfig(encoder="mobilenet_v2", decoder_channels=(32, 16, 16, 8, 8))
CLASSES = (
    ClassSpec("background", (255, 255, 255)),
    ClassSpec("stroma", (240, 160, 200)),
    ClassSpec("necrosis", (120, 120, 40)),
    ClassSpec("nucleus", (40, 40, 220), "thing"),
)
TYPES = (NucleusTypeSpec("tumour", (255, 0, 0)), NucleusTypeSpec("lymphocyte", (0, 255, 0)))


def small_config(**kw) -> ModelConfig:
    return ModelConfig(name=kw.pop("name", "tiny"), architecture=kw.pop("architecture", SMALL),
                       classes=kw.pop("classes", CLASSES), **kw)


def make_model(folder: Path, config: ModelConfig | None = None, seed: int = 0, **kw) -> Path:
    config = config or small_config()
    torch.manual_seed(seed)
    return save_model(folder, build_network(config).eval(), config, **kw)


def rewrite_yaml(folder: Path, edit) -> None:
    data = yaml.safe_load((folder / CONFIG_FILE).read_text())
    edit(data)
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(data, sort_keys=False))


# -- config --------------------------------------------------------------------------------------------
def test_config_roundtrip_and_layout(tmp_path):
    cfg = small_config(nucleus_types=TYPES, mpp=0.25, training={"epochs": 3})
    write_model_config(cfg, tmp_path / "m.yaml")
    back = read_model_config(tmp_path / "m.yaml")
    assert back == cfg
    assert cfg.n_classes == 4 and cfg.n_types == 2 and cfg.n_outputs == 8
    assert cfg.nucleus_index == 3 and cfg.stuff_indices == (0, 1, 2)
    assert cfg.class_index("necrosis") == 2
    with pytest.raises(ConfigError, match="unknown class name"):
        cfg.class_index("fat")


def test_default_config_has_required_classes():
    cfg = ModelConfig()
    assert {"background", "stroma", "necrosis", "nucleus"} <= set(cfg.class_names)
    assert cfg.classes[cfg.nucleus_index].kind == "thing"
    assert cfg.tile % 32 == 0


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["classes"].pop(), "exactly one class must have kind 'thing'"),
        (lambda d: d["classes"].reverse(), "first class must be the stuff class 'background'"),
        (lambda d: d["classes"].append(dict(d["classes"][1])), "class names must be unique"),
        (lambda d: d.update(tile=500), "multiple of 32"),
        (lambda d: d.update(mpp=-0.5), "mpp must be a positive"),
        (lambda d: d["postprocess"].update(nucleus_threshold=1.5), "nucleus_threshold"),
        (lambda d: d["architecture"].update(decoder_channels=[8, 8]), "one entry per encoder stage"),
        (lambda d: d["architecture"].update(arch="segformer"), "not supported"),
        (lambda d: d.update(format_version=7), "format_version 7"),
        (lambda d: d.update(colour=[1, 2, 3]), "unknown key 'colour'"),
    ],
)
def test_config_validation_names_file_and_problem(tmp_path, edit, message):
    data = to_dict(small_config())
    edit(data)
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match=message) as info:
        read_model_config(path)
    assert str(path) in str(info.value)


# -- network -------------------------------------------------------------------------------------------
def test_network_output_layout_with_types():
    cfg = small_config(nucleus_types=TYPES)
    net = build_network(cfg).eval()
    images = torch.randint(0, 256, (2, 64, 96, 3), dtype=torch.uint8)
    x = normalize_input(images, cfg)
    assert x.shape == (2, 3, 64, 96) and x.dtype == torch.float32
    with torch.no_grad():
        out = net(x)
    assert out.shape == (2, cfg.n_outputs, 64, 96)
    heads = split_outputs(out, cfg)
    assert heads["semantic"].shape == (2, 4, 64, 96)
    assert heads["centre"].shape == heads["boundary"].shape == (2, 64, 96)
    assert heads["types"].shape == (2, 2, 64, 96)
    probs = to_probabilities(out, cfg)
    assert torch.allclose(probs["semantic"].sum(1), torch.ones(2, 64, 96), atol=1e-5)
    assert torch.allclose(probs["types"].sum(1), torch.ones(2, 64, 96), atol=1e-5)
    assert float(probs["centre"].min()) >= 0 and float(probs["centre"].max()) <= 1
    assert final_conv(net).out_channels == cfg.n_outputs


def test_split_outputs_without_types_and_wrong_channels():
    cfg = small_config()
    heads = split_outputs(torch.zeros(1, cfg.n_outputs, 32, 32), cfg)
    assert heads["types"] is None
    with pytest.raises(ModelError, match="expects 6 channels"):
        split_outputs(torch.zeros(1, cfg.n_outputs + 1, 32, 32), cfg)


def test_normalize_input_uses_config_statistics():
    cfg = small_config()
    img = torch.full((1, 32, 32, 3), 255, dtype=torch.uint8)
    x = normalize_input(img, cfg)
    expected = [(1 - m) / s for m, s in zip(cfg.normalization.mean, cfg.normalization.std)]
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(expected))
    assert torch.allclose(normalize_input(img.permute(0, 3, 1, 2).float() / 255, cfg), x)


def test_unknown_encoder_is_a_model_error():
    cfg = small_config(architecture=replace(SMALL, encoder="no-such-net"))
    with pytest.raises(ModelError, match="unknown encoder 'no-such-net'"):
        build_network(cfg)


# -- save / load ---------------------------------------------------------------------------------------
def test_save_load_roundtrip_reproduces_outputs(tmp_path):
    cfg = small_config(nucleus_types=TYPES)
    torch.manual_seed(1)
    net = build_network(cfg).eval()
    folder = save_model(tmp_path / "m", net, cfg, card="# tiny model\n")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", CONFIG_FILE, WEIGHTS_FILE]
    loaded = load_model(folder)
    assert isinstance(loaded, LoadedModel)
    assert loaded.config == cfg and loaded.path == folder and loaded.name == "tiny"
    assert not loaded.network.training
    assert loaded.weights_sha256 == hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(x), loaded.network(x))
    # a path to either file inside the folder works too, and histopan.load_model is the same function
    assert histopan.load_model(folder / CONFIG_FILE).weights_sha256 == loaded.weights_sha256


def test_half_precision_weights_load_as_float32(tmp_path):
    cfg = small_config()
    torch.manual_seed(2)
    net = build_network(cfg).eval()
    full = save_model(tmp_path / "full", net, cfg)
    half = save_model(tmp_path / "half", net, cfg, half=True)
    assert (half / WEIGHTS_FILE).stat().st_size < 0.6 * (full / WEIGHTS_FILE).stat().st_size
    loaded = load_model(half).network
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net(x), loaded(x), atol=5e-2)


def test_save_refuses_network_that_does_not_match_config(tmp_path):
    cfg = small_config()
    other = build_network(small_config(nucleus_types=TYPES))
    with pytest.raises(ModelError, match="8 output channels"):
        save_model(tmp_path / "m", other, cfg)
    assert not (tmp_path / "m" / WEIGHTS_FILE).exists()


def test_load_by_name_from_env_and_unknown_name(tmp_path, monkeypatch):
    make_model(tmp_path / "zoo" / "tiny")
    monkeypatch.setenv("HISTOPAN_MODELS", str(tmp_path / "zoo"))
    assert "tiny" in available_models()
    assert resolve_model_path("tiny") == tmp_path / "zoo" / "tiny"
    assert load_model("tiny").config.name == "tiny"
    with pytest.raises(ModelError, match="unknown model name") as info:
        load_model("nonexistent")
    assert "tiny" in str(info.value) and "nonexistent" in str(info.value)


def test_missing_folder_and_missing_files(tmp_path):
    with pytest.raises(ModelError, match="model folder not found"):
        load_model(tmp_path / "nope")
    folder = make_model(tmp_path / "m")
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelError, match="weights.safetensors is missing"):
        load_model(folder)


# -- pickles are refused -------------------------------------------------------------------------------
def test_pickle_checkpoint_paths_are_refused(tmp_path):
    cfg = small_config()
    for suffix in (".pt", ".pth", ".ckpt", ".pkl"):
        path = tmp_path / f"model{suffix}"
        torch.save(build_network(cfg).state_dict(), path)
        with pytest.raises(ModelError, match="refusing to load a pickle") as info:
            load_model(path)
        assert str(path) in str(info.value) and "save_model" in str(info.value)


def test_pickle_bytes_under_safetensors_name_are_refused(tmp_path):
    folder = make_model(tmp_path / "m")
    torch.save({"a": torch.zeros(2)}, folder / WEIGHTS_FILE)  # zip container
    with pytest.raises(ModelError, match="zip file"):
        load_model(folder)
    (folder / WEIGHTS_FILE).write_bytes(pickle.dumps({"a": [1, 2, 3]}, protocol=4))
    with pytest.raises(ModelError, match="pickle file"):
        load_model(folder)


def test_folder_with_only_a_pickle_is_refused(tmp_path):
    folder = make_model(tmp_path / "m")
    (folder / WEIGHTS_FILE).unlink()
    torch.save({"a": torch.zeros(2)}, folder / "model.pt")
    with pytest.raises(ModelError, match="only pickle checkpoint"):
        load_model(folder)


# -- mismatches ------------------------------------------------------------------------------------------
def test_class_count_mismatch(tmp_path):
    folder = make_model(tmp_path / "m")
    rewrite_yaml(folder, lambda d: d["classes"].insert(1, {"name": "fat", "color": [1, 2, 3], "kind": "stuff"}))
    with pytest.raises(ModelError, match="the weights have 6 output channels") as info:
        load_model(folder)
    text = str(info.value)
    assert str(folder / WEIGHTS_FILE) in text and "7 output channels" in text and "grow_heads" in text
    assert "'fat'" in text and "necrosis" in text


def test_encoder_mismatch_named(tmp_path):
    folder = make_model(tmp_path / "m")
    rewrite_yaml(folder, lambda d: d["architecture"].update(encoder="resnet18"))
    with pytest.raises(ModelError, match="saved for unet with encoder 'mobilenet_v2'.*says unet with encoder "
                                         "'resnet18'"):
        load_model(folder)


def test_missing_and_unexpected_keys_without_metadata(tmp_path):
    folder = make_model(tmp_path / "m")
    state = build_network(small_config()).state_dict()
    state.pop("decoder.blocks.0.conv1.0.weight")
    state["extra.weight"] = torch.zeros(3)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS_FILE))
    with pytest.raises(ModelError, match=r"1 missing keys \['decoder.blocks.0.conv1.0.weight'\], "
                                         r"1 unexpected keys \['extra.weight'\]"):
        load_model(folder)


def test_decoder_shape_mismatch(tmp_path):
    folder = make_model(tmp_path / "m")
    rewrite_yaml(folder, lambda d: d["architecture"].update(decoder_channels=[32, 16, 16, 8, 4]))
    with pytest.raises(ModelError, match="output channels|has shape"):
        load_model(folder)


def test_corrupt_and_truncated_weights(tmp_path):
    folder = make_model(tmp_path / "m")
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="corrupt|truncated"):
        load_model(folder)
    (folder / WEIGHTS_FILE).write_bytes(b"hello world, not weights")
    with pytest.raises(ModelError, match="not a safetensors file"):
        load_model(folder)


def test_invalid_yaml_is_a_model_error_naming_the_file(tmp_path):
    folder = make_model(tmp_path / "m")
    rewrite_yaml(folder, lambda d: d.pop("classes") and d.update(clases=[]))
    with pytest.raises(ModelError, match="unknown key 'clases'") as info:
        load_model(folder)
    assert str(folder / CONFIG_FILE) in str(info.value)


# -- growing heads ---------------------------------------------------------------------------------------
def test_grow_heads_keeps_existing_channels(tmp_path):
    old = small_config()
    new = small_config(classes=CLASSES[:3] + (ClassSpec("fat", (250, 250, 0)),) + CLASSES[3:],
                       nucleus_types=TYPES)
    torch.manual_seed(3)
    net = build_network(old).eval()
    grown = grow_heads(net, old, new).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = net(x), grown(x)
    assert b.shape[1] == new.n_outputs == 9
    # old channels: background, stroma, necrosis, nucleus, centre, boundary -> new positions 0,1,2,4,5,6
    assert torch.allclose(a, b[:, [0, 1, 2, 4, 5, 6]], atol=1e-6)
    save_model(tmp_path / "grown", grown, new)
    assert load_model(tmp_path / "grown").config.n_outputs == 9
    with pytest.raises(ModelError, match="same architecture"):
        grow_heads(net, old, replace(new, architecture=replace(SMALL, encoder="resnet18")))


def test_import_histopan_does_not_import_torch():
    code = ("import sys, histopan, histopan.model.config, histopan.postprocess; "
            "assert 'torch' not in sys.modules; print(callable(histopan.load_model))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_from_dict_roundtrip_is_equal():
    cfg = small_config(nucleus_types=TYPES)
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
