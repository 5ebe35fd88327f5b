"""Masked losses: masked pixels contribute neither loss nor gradient; partial labels behave as documented."""

import math

import pytest
import torch

from histopan.training.config import LossConfig
from histopan.training.losses import masked_bce, masked_ce, masked_soft_dice, partial_label_ce, total_loss
from histopan.training.targets import class_bits


def _logits(seed: int = 0, shape=(2, 5, 4, 4)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_(True)


def test_partial_label_ce_matches_formula_and_ignores_unlabelled():
    logits = _logits()
    bits = torch.zeros((2, 4, 4), dtype=torch.int64)
    bits[0, 0, 0] = class_bits([4])        # nucleus
    bits[0, 1, 1] = class_bits([2, 4])     # tile class "necrosis" or nucleus
    bits[1, 2, 3] = class_bits([0, 1, 2, 3])  # any stuff
    loss = partial_label_ce(logits, bits)
    p = torch.softmax(logits.detach(), dim=1)
    expected = -(torch.log(p[0, 4, 0, 0]) + torch.log(p[0, 2, 1, 1] + p[0, 4, 1, 1])
                 + torch.log(p[1, :4, 2, 3].sum())) / 3
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-6)
    loss.backward()
    grad = logits.grad
    unlabelled = bits == 0
    assert torch.all(grad.permute(1, 0, 2, 3)[:, unlabelled] == 0)
    assert grad[0, :, 0, 0].abs().sum() > 0


def test_partial_label_ce_all_classes_allowed_is_zero():
    logits = _logits(1)
    bits = torch.full((2, 4, 4), class_bits(range(5)), dtype=torch.int64)
    loss = partial_label_ce(logits, bits)
    assert abs(loss.item()) < 1e-6
    loss.backward()
    assert logits.grad.abs().max() < 1e-6


def test_partial_label_ce_nothing_labelled_is_zero_not_nan():
    logits = _logits(2)
    loss = partial_label_ce(logits, torch.zeros((2, 4, 4), dtype=torch.int64))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all() and not logits.grad.any()


def test_masked_bce_and_dice_ignore_masked_pixels():
    logits = _logits(3, (2, 4, 4))
    target = (torch.rand((2, 4, 4), generator=torch.Generator().manual_seed(0)) > 0.5).double()
    mask = torch.zeros((2, 4, 4), dtype=torch.bool)
    mask[:, :2] = True
    loss = masked_bce(logits, target, mask, pos_weight=3.0) + masked_soft_dice(torch.sigmoid(logits), target, mask)
    loss.backward()
    assert not logits.grad[:, 2:].any()
    assert logits.grad[:, :2].abs().sum() > 0
    # changing targets where masked changes nothing
    other = target.clone()
    other[:, 2:] = 1 - other[:, 2:]
    assert masked_bce(logits, target, mask).item() == masked_bce(logits, other, mask).item()


def test_total_loss_tile_crop_trains_no_nucleus_maps():
    from histopan.model.config import ModelConfig
    from histopan.model.network import split_outputs

    cfg = ModelConfig()
    out = _logits(4, (1, cfg.n_outputs, 4, 4)).float().detach().requires_grad_(True)
    batch = {
        "label_bits": torch.full((1, 4, 4), class_bits([2, cfg.nucleus_index]), dtype=torch.int64),
        "nucleus": torch.zeros((1, 4, 4)), "centre": torch.ones((1, 4, 4)), "boundary": torch.ones((1, 4, 4)),
        "nucleus_valid": torch.zeros((1, 4, 4), dtype=torch.bool),
    }
    loss, terms = total_loss(split_outputs(out, cfg), batch, cfg.nucleus_index, LossConfig())
    loss.backward()
    c = cfg.n_classes
    assert terms["centre"] == 0 and terms["boundary"] == 0 and terms["dice"] == 0
    assert not out.grad[:, c:].any()          # centre and boundary logits get no gradient
    assert out.grad[:, :c].abs().sum() > 0    # the semantic head does


def test_contact_weight_counts_contact_pixels_more():
    from histopan.model.config import ModelConfig
    from histopan.model.network import split_outputs

    cfg = ModelConfig()
    out = _logits(6, (1, cfg.n_outputs, 4, 4)).float().detach()
    g = torch.Generator().manual_seed(1)
    contact = torch.zeros((1, 4, 4), dtype=torch.bool)
    contact[0, 1, :] = True
    batch = {
        "label_bits": torch.where(torch.rand((1, 4, 4), generator=g) > 0.5, class_bits([cfg.nucleus_index]),
                                  class_bits([0, 1, 2, 3])),
        "nucleus": torch.rand((1, 4, 4), generator=g).round(), "centre": torch.rand((1, 4, 4), generator=g),
        "boundary": torch.rand((1, 4, 4), generator=g).round(),
        "nucleus_valid": torch.ones((1, 4, 4), dtype=torch.bool), "contact": contact,
    }
    heads = split_outputs(out, cfg)
    plain = total_loss(heads, batch, cfg.nucleus_index, LossConfig())[1]
    _, weighted = total_loss(heads, batch, cfg.nucleus_index, LossConfig(contact_weight=3.0))
    # a contact pixel counts 4 times: the same as repeating row 1 four times
    rows = torch.tensor([0, 1, 1, 1, 1, 2, 3])
    repeated = {k: v[:, rows] for k, v in batch.items() if k != "contact"}
    _, expected = total_loss(split_outputs(out[:, :, rows], cfg), repeated, cfg.nucleus_index, LossConfig())
    for term in ("ce", "centre", "boundary"):
        assert math.isclose(weighted[term], expected[term], rel_tol=1e-5), term
        assert not math.isclose(weighted[term], plain[term], rel_tol=1e-5), term
    assert weighted["dice"] == plain["dice"]
    # without a contact map in the batch the weight changes nothing
    no_map = {k: v for k, v in batch.items() if k != "contact"}
    assert total_loss(heads, no_map, cfg.nucleus_index, LossConfig(contact_weight=3.0))[1] == plain
    with pytest.raises(ValueError, match="contact_weight"):
        LossConfig(contact_weight=-1.0)
    with pytest.raises(ValueError, match="contact_um"):
        LossConfig(contact_um=0.0)


def test_stuff_given_tissue_ce_only_on_tile_pixels():
    from histopan.training.losses import stuff_given_tissue_ce

    logits = _logits(5)
    bits = torch.zeros((2, 4, 4), dtype=torch.int64)
    bits[0, 0, 0] = class_bits([2, 4])         # tile class necrosis (or nucleus)
    bits[0, 1, 1] = class_bits([0, 1, 2, 3])   # nucleus-set tissue pixel: every stuff class allowed
    bits[0, 2, 2] = class_bits([4])            # nucleus pixel
    loss = stuff_given_tissue_ce(logits, bits, nucleus_index=4)
    p = torch.softmax(logits.detach(), dim=1)[0, :, 0, 0]
    expected = -torch.log(p[2] / p[:4].sum()) * (1 - p[4])
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)
    loss.backward()
    grad = logits.grad.clone()
    grad[0, :, 0, 0] = 0
    assert not grad.any()                       # only the tile pixel gets a gradient
    assert logits.grad[0, 4, 0, 0] == 0         # and never through p(nucleus)


def test_masked_ce_class_weights_give_the_weighted_mean():
    logits = _logits(3, (1, 3, 2, 2)).detach()
    target = torch.tensor([[[0, 1], [-1, 2]]])
    logp = torch.log_softmax(logits, dim=1)[0]
    nll = [-logp[0, 0, 0], -logp[1, 0, 1], -logp[2, 1, 1]]
    assert math.isclose(masked_ce(logits, target).item(), float(sum(nll) / 3), rel_tol=1e-6)
    w = torch.tensor([1.0, 3.0, 0.5])
    expected = (nll[0] * 1.0 + nll[1] * 3.0 + nll[2] * 0.5) / 4.5
    assert math.isclose(masked_ce(logits, target, w).item(), float(expected), rel_tol=1e-6)
    assert math.isclose(masked_ce(logits, target, torch.ones(3)).item(), masked_ce(logits, target).item(),
                        rel_tol=1e-6)
