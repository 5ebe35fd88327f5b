"""Weight-space interpolation between a warm-started model and the model it started from.

A model warm-started from ``start`` and trained on new data (``end``) sits in the same basin of the loss as
``start``; the straight line between the two weight sets trades what ``end`` learnt against what ``start``
knew, smoothly (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models", WiSE-FT).  Here it trades the
tissue map a run learnt from pixel masks against the nuclei of the model it started from.

``weights(alpha) = start + alpha * (end - start)``: alpha 0 is ``start``, 1 is ``end``.  The result has
``end``'s classes: channels ``start`` lacks (a class ``end`` added) are ``end``'s at every alpha; channels
matched by name are interpolated.  Integer buffers (batch-norm step counts) are ``end``'s.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histopan import __version__
from histopan.config import to_dict
from histopan.errors import ConfigError
from histopan.model.checkpoint import LoadedModel, load_model, save_model
from histopan.model.network import HEAD_KEY, channel_names, grow_heads

__all__ = ["interpolate_models", "interpolated_network"]


def interpolated_network(start: LoadedModel, end: LoadedModel, alpha: float) -> nn.Module:
    """``end``'s network with every weight ``start + alpha * (end - start)`` (channels matched by name)."""
    if not (math.isfinite(alpha) and 0 <= alpha <= 1):
        raise ConfigError("alpha must be within 0..1 (0: the start model, 1: the end model)", value=alpha,
                          fix="pass e.g. --alpha 0.5")
    if start.config.architecture != end.config.architecture:
        raise ConfigError("the two models have different architectures: only a model and its own warm start can "
                          "be interpolated", path=end.path,
                          value={"start": to_dict(start.config.architecture), "end": to_dict(end.config.architecture)},
                          fix="pass the model the second one was trained from (its 'init') as the first")
    a = grow_heads(start.network, start.config, end.config).state_dict()
    new = _new_channels(start, end)
    net = copy.deepcopy(end.network)
    b = net.state_dict()
    mixed = {}
    for key, value in b.items():
        if not value.is_floating_point():
            mixed[key] = value
            continue
        w = torch.lerp(a[key], value, alpha)  # exactly a at 0 and value at 1
        if key.startswith(HEAD_KEY + ".") and new.numel():  # channels the start model lacks: the end model's own
            w[new] = value[new]
        mixed[key] = w
    net.load_state_dict(mixed)
    return net.eval()


def _new_channels(start: LoadedModel, end: LoadedModel) -> torch.Tensor:
    """The output channels (rows of the final convolution) of ``end`` that ``start`` lacks."""
    old = set(channel_names(start.config))
    return torch.tensor([i for i, n in enumerate(channel_names(end.config)) if n not in old], dtype=torch.long)


def interpolate_models(start: str | Path, end: str | Path, alpha: float, out: str | Path, *,
                       command: str | None = None) -> Path:
    """Write the interpolated model (``end``'s config and thresholds, its training record with an
    ``interpolation`` entry naming both models) to ``out``; returns the folder."""
    a, b = load_model(start), load_model(end)
    network = interpolated_network(a, b, alpha)
    training: dict[str, Any] = dict(b.config.training)
    training["interpolation"] = {
        "histopan_version": __version__, "command": command,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "alpha": alpha,
        "start": {"path": str(a.path), "weights_sha256": a.weights_sha256},
        "end": {"path": str(b.path), "weights_sha256": b.weights_sha256},
        "rule": "weights = start + alpha * (end - start); classes the start model lacks keep the end model's",
    }
    return save_model(out, network, dataclasses.replace(b.config, training=training))
