"""Weight-space interpolation of a warm-started model with its start (histopan.training.interpolate, histopan
interpolate): the end points are the two models, channels of a class the start lacks stay the end model's."""

import dataclasses

import pytest
import torch

from histopan.cli import main
from histopan.config import from_dict
from histopan.model.checkpoint import load_model, save_model
from histopan.model.config import DEFAULT_CLASSES, ClassSpec, ModelConfig
from histopan.model.network import build_network
from histopan.training.interpolate import interpolated_network

TINY_ARCH = {"arch": "unet", "encoder": "mobilenet_v2", "encoder_depth": 5, "decoder_channels": [16, 16, 8, 8, 8]}
GROWN = (*DEFAULT_CLASSES[:-1], ClassSpec("benign_epithelium", (240, 170, 40), "stuff"), DEFAULT_CLASSES[-1])


def _model(folder, classes, seed):
    config = from_dict(ModelConfig, {"name": "tiny", "architecture": TINY_ARCH, "mpp": 0.5})
    config = dataclasses.replace(config, classes=tuple(classes))
    torch.manual_seed(seed)
    save_model(folder, build_network(config), config)
    return load_model(folder)


def test_end_points_are_the_two_models_and_new_classes_keep_the_end_models_channels(tmp_path):
    start = _model(tmp_path / "start", DEFAULT_CLASSES, 0)
    end = _model(tmp_path / "end", GROWN, 1)
    new_row = [c.name for c in GROWN].index("benign_epithelium")
    s, e = start.network.state_dict(), end.network.state_dict()
    one = interpolated_network(start, end, 1.0).state_dict()
    assert all(torch.equal(one[k], e[k]) for k in e)
    zero = interpolated_network(start, end, 0.0).state_dict()
    assert all(torch.equal(zero[k], s[k]) for k in e if not k.startswith("segmentation_head.")
               and zero[k].is_floating_point())
    head = "segmentation_head.0.weight"
    old_rows = [i for i in range(e[head].shape[0]) if i != new_row]
    # old channels: the start model's rows (the start's channel i sits at the grown index)
    assert torch.equal(zero[head][old_rows], s[head])
    assert torch.equal(zero[head][new_row], e[head][new_row])
    half = interpolated_network(start, end, 0.5).state_dict()
    key = next(k for k in e if k.startswith("decoder.") and k.endswith(".weight"))
    assert torch.allclose(half[key], (s[key] + e[key]) / 2, atol=1e-6)
    with pytest.raises(Exception, match="alpha must be within 0..1"):
        interpolated_network(start, end, 1.5)


def test_cli_writes_a_model_with_its_provenance_and_refuses_other_architectures(tmp_path, capsys):
    _model(tmp_path / "start", DEFAULT_CLASSES, 0)
    _model(tmp_path / "end", GROWN, 1)
    assert main(["interpolate", str(tmp_path / "start"), str(tmp_path / "end"), "--alpha", "0.6",
                 "--out", str(tmp_path / "mixed")]) == 0
    mixed = load_model(tmp_path / "mixed")
    record = mixed.config.training["interpolation"]
    assert record["alpha"] == 0.6 and record["end"]["weights_sha256"] == load_model(tmp_path / "end").weights_sha256
    assert mixed.config.class_names == tuple(c.name for c in GROWN)
    other = from_dict(ModelConfig, {"name": "tiny", "architecture": {**TINY_ARCH, "decoder_channels": [16, 16, 8, 8, 4]},
                                    "mpp": 0.5})
    save_model(tmp_path / "other", build_network(other), other)
    capsys.readouterr()
    assert main(["interpolate", str(tmp_path / "start"), str(tmp_path / "other"), "--alpha", "0.5",
                 "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "different architectures" in err and "Traceback" not in err and str(tmp_path / "other") in err
    assert not (tmp_path / "bad").exists()
