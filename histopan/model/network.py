"""The network: one segmentation-models-pytorch model built from a :class:`ModelConfig`, and its head layout.

Output channels (all at input resolution), for C classes and K nucleus types::

    [0 : C)          semantic logits over ``config.classes`` (softmax)
    [C]              nucleus-centre logit (sigmoid)
    [C + 1]          nucleus-boundary logit (sigmoid)
    [C + 2 : C+2+K)  nucleus-type logits (softmax), only when ``config.nucleus_types`` is non-empty

Input: RGB uint8 -> float / 255 -> normalised with ``config.normalization``; NCHW with H and W multiples
of 32 (the caller pads).  Encoder weights are never downloaded: they come from our own checkpoints.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import segmentation_models_pytorch as smp
import torch
from torch import nn

from histopan.errors import ModelError

if TYPE_CHECKING:
    from histopan.model.config import ModelConfig

log = logging.getLogger(__name__)

__all__ = [
    "HEAD_KEY",
    "INPUT_MULTIPLE",
    "build_network",
    "channel_names",
    "final_conv",
    "grow_heads",
    "normalize_input",
    "split_outputs",
    "to_probabilities",
]

#: state-dict key of the final 1x1/3x3 convolution that produces every output channel.
HEAD_KEY = "segmentation_head.0"
#: H and W of the network input must be multiples of this (5 stride-2 stages).
INPUT_MULTIPLE = 32


def build_network(config: ModelConfig) -> nn.Module:
    """A freshly initialised smp network for ``config`` (encoder_weights=None, never a download)."""
    arch = config.architecture
    known = smp.encoders.get_encoder_names()
    if arch.encoder not in known:
        raise ModelError(
            f"unknown encoder {arch.encoder!r} in model config {config.name!r}",
            value=arch.encoder,
            fix=f"use an encoder segmentation-models-pytorch knows, e.g. mobilenet_v2, efficientnet-b0, resnet18 "
                f"({len(known)} available: smp.encoders.get_encoder_names())",
        )
    network = smp.create_model(
        arch.arch,
        encoder_name=arch.encoder,
        encoder_weights=None,
        encoder_depth=arch.encoder_depth,
        decoder_channels=tuple(arch.decoder_channels),
        in_channels=arch.in_channels,
        classes=config.n_outputs,
    )
    return network


def final_conv(network: nn.Module) -> nn.Conv2d:
    """The convolution producing all output channels (``segmentation_head[0]`` of an smp model)."""
    head = getattr(network, "segmentation_head", None)
    conv = head[0] if isinstance(head, nn.Sequential) and len(head) else None
    if not isinstance(conv, nn.Conv2d):
        raise ModelError(
            f"{type(network).__name__} has no segmentation_head[0] convolution",
            fix="build the network with histopan.model.network.build_network",
        )
    return conv


def normalize_input(images: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """RGB images, NHWC or NCHW, -> float32 NCHW normalised as the model expects.

    uint8 images are divided by 255; floating-point images are taken to be in 0..1 already (as after
    float augmentations).  The channel axis is the one of size 3 among axes 1 and 3 (NHWC wins when both
    are 3).
    """
    if images.ndim != 4:
        raise ValueError(f"expected a 4-d batch of images, got shape {tuple(images.shape)}")
    if images.shape[-1] == 3:
        images = images.permute(0, 3, 1, 2)
    elif images.shape[1] != 3:
        raise ValueError(f"expected 3 colour channels (NHWC or NCHW), got shape {tuple(images.shape)}")
    x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(config.normalization.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(config.normalization.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def split_outputs(output: torch.Tensor, config: ModelConfig) -> dict[str, torch.Tensor | None]:
    """Slice the raw network output (N, C+2+K, H, W) into its heads (logits, not probabilities).

    Returns ``semantic`` (N, C, H, W), ``centre`` (N, H, W), ``boundary`` (N, H, W) and ``types``
    (N, K, H, W) or ``None`` without a type head.
    """
    c = config.n_classes
    if output.ndim != 4 or output.shape[1] != config.n_outputs:
        raise ModelError(
            f"network output has shape {tuple(output.shape)} but model {config.name!r} expects "
            f"{config.n_outputs} channels ({c} classes + centre + boundary + {config.n_types} types)",
            fix="rebuild the network from this model's config",
        )
    return {
        "semantic": output[:, :c],
        "centre": output[:, c],
        "boundary": output[:, c + 1],
        "types": output[:, c + 2:] if config.has_types else None,
    }


def to_probabilities(output: torch.Tensor, config: ModelConfig) -> dict[str, torch.Tensor | None]:
    """Raw output -> probabilities per head (softmax / sigmoid), computed in float32."""
    heads = split_outputs(output.float(), config)
    return {
        "semantic": torch.softmax(heads["semantic"], dim=1),
        "centre": torch.sigmoid(heads["centre"]),
        "boundary": torch.sigmoid(heads["boundary"]),
        "types": torch.softmax(heads["types"], dim=1) if heads["types"] is not None else None,
    }


def channel_names(config: ModelConfig) -> list[str]:
    """The name of each output channel, in order: ``class:NAME``..., ``centre``, ``boundary``, ``type:NAME``..."""
    return ([f"class:{n}" for n in config.class_names] + ["centre", "boundary"]
            + [f"type:{n}" for n in config.type_names])


def grow_heads(network: nn.Module, old_config: ModelConfig, new_config: ModelConfig) -> nn.Module:
    """A network for ``new_config`` keeping every weight of ``network`` (trained for ``old_config``).

    Used for fine-tuning with more stuff classes or nucleus types: the encoder, decoder and the output
    channels whose name exists in both configs (classes and types matched by name; centre and boundary
    always) are copied; channels new in ``new_config`` keep their fresh initialisation.  Channels dropped
    from the old config are discarded.  The architectures must be identical.
    """
    if old_config.architecture != new_config.architecture:
        raise ModelError(
            "grow_heads needs the same architecture in both configs",
            value=(old_config.architecture, new_config.architecture),
            fix="change only classes / nucleus_types when growing heads",
        )
    grown = build_network(new_config)
    old_state = network.state_dict()
    new_state = grown.state_dict()
    old_names = channel_names(old_config)
    new_names = channel_names(new_config)
    with torch.no_grad():
        for key, value in old_state.items():
            if not key.startswith(HEAD_KEY + "."):
                new_state[key].copy_(value)
        for suffix in ("weight", "bias"):
            key = f"{HEAD_KEY}.{suffix}"
            if key not in old_state:
                continue
            for j, name in enumerate(new_names):
                if name in old_names:
                    new_state[key][j].copy_(old_state[key][old_names.index(name)])
    grown.load_state_dict(new_state)
    kept = sum(n in old_names for n in new_names)
    log.info("grew heads from %d to %d output channels (%d kept)", len(old_names), len(new_names), kept)
    return grown
