"""Masked training losses: pixels without a label contribute nothing (value and gradient).

- :func:`partial_label_ce`: ``-log(sum_{c in allowed} softmax(logits)_c)`` per pixel, with the allowed set
  given as a bit mask (see :mod:`.targets`); a pixel whose set is empty has no loss, one whose set holds
  every class has zero loss.
- :func:`stuff_given_tissue_ce`: on pixels whose allowed set names some but not all stuff classes (tile-class
  tiles), ``-log(p(allowed stuff) / p(any stuff))``, weighted by ``1 - p(nucleus)`` (detached): "where this is
  tissue rather than a nucleus, it is the tile's class".  Without it a network could satisfy a tile's
  ``{class, nucleus}`` label by calling everything a nucleus and never learn the class.
- :func:`masked_bce`: binary cross-entropy with logits over the pixels of a mask.
- :func:`masked_soft_dice`: soft Dice of a probability map over the pixels of a mask.
- :func:`masked_ce`: cross-entropy of the nucleus-type logits on pixels with a type (index >= 0).
- :func:`total_loss`: the weighted sum over the heads of :func:`histopan.model.network.split_outputs`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from histopan.training.config import LossConfig

__all__ = ["distill_loss", "masked_bce", "masked_ce", "masked_soft_dice", "partial_label_ce", "stuff_given_tissue_ce", "total_loss"]


def _allowed(label_bits: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(N, H, W) int64 bit masks -> (N, C, H, W) bool membership."""
    shifts = torch.arange(n_classes, device=label_bits.device, dtype=torch.int64).view(1, -1, 1, 1)
    return ((label_bits.unsqueeze(1) >> shifts) & 1).bool()


def partial_label_ce(logits: torch.Tensor, label_bits: torch.Tensor,
                     pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over labelled pixels of ``-log(sum of allowed classes' probabilities)``; 0 if none is labelled.

    ``pixel_weight`` (N, H, W), if given, makes it a weighted mean.
    """
    logits = logits.float()
    allowed = _allowed(label_bits, logits.shape[1])
    labelled = label_bits != 0
    # An empty set would give log(0); allow everything there (zero loss, zero gradient), then mask it out.
    allowed = allowed | ~labelled.unsqueeze(1)
    log_in = torch.logsumexp(logits.masked_fill(~allowed, float("-inf")), dim=1)
    log_all = torch.logsumexp(logits, dim=1)
    weight = labelled.float() if pixel_weight is None else labelled * pixel_weight.float()
    return ((log_all - log_in) * weight).sum() / weight.sum().clamp(min=1e-6)


def stuff_given_tissue_ce(logits: torch.Tensor, label_bits: torch.Tensor, nucleus_index: int) -> torch.Tensor:
    """Stuff-class cross-entropy conditional on "not a nucleus", on pixels naming a strict subset of stuff.

    Weighted by ``1 - p(nucleus)`` (no gradient through the weight); 0 when no pixel qualifies.
    """
    logits = logits.float()
    c = logits.shape[1]
    allowed = _allowed(label_bits, c)
    is_stuff = torch.ones(c, dtype=torch.bool, device=logits.device)
    is_stuff[nucleus_index] = False
    is_stuff = is_stuff.view(1, -1, 1, 1)
    allowed_stuff = allowed & is_stuff
    n_allowed = allowed_stuff.sum(1)
    qualifies = (n_allowed > 0) & (n_allowed < int(is_stuff.sum()))
    allowed_stuff = allowed_stuff | ~qualifies.unsqueeze(1)  # keep log() finite where it does not apply
    stuff_logits = logits.masked_fill(~is_stuff, float("-inf"))
    log_in = torch.logsumexp(stuff_logits.masked_fill(~allowed_stuff, float("-inf")), dim=1)
    log_stuff = torch.logsumexp(stuff_logits, dim=1)
    weight = (1.0 - torch.softmax(logits, dim=1)[:, nucleus_index]).detach() * qualifies
    return ((log_stuff - log_in) * weight).sum() / qualifies.sum().clamp(min=1)


def masked_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
               pos_weight: float = 1.0) -> torch.Tensor:
    """Mean binary cross-entropy with logits over ``mask``; positives weighted by ``pos_weight``.

    ``mask`` may be a float pixel weight (0 = not trained) rather than a bool mask.
    """
    logits = logits.float()
    weight = mask.float() * (1.0 + (pos_weight - 1.0) * target)
    per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (per_pixel * weight).sum() / weight.sum().clamp(min=1e-6)


def masked_soft_dice(prob: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     eps: float = 1.0) -> torch.Tensor:
    """``1 - soft Dice`` of ``prob`` against ``target`` over ``mask`` (whole batch pooled); 0 if the mask is empty."""
    m = mask.float()
    if m.sum() == 0:
        return prob.sum() * 0.0
    p = prob.float() * m
    t = target * m
    inter = (p * t).sum()
    return 1.0 - (2.0 * inter + eps) / (p.sum() + t.sum() + eps)


def masked_ce(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of (N, K, H, W) logits over pixels whose (N, H, W) target index is >= 0; 0 if none.

    With ``class_weights`` (K,) each pixel counts with its target's weight (a weighted mean, as in
    :func:`torch.nn.functional.cross_entropy`).
    """
    labelled = target >= 0
    if not bool(labelled.any()):
        return logits.sum() * 0.0
    index = target.clamp(min=0).long()
    per_pixel = F.cross_entropy(logits.float(), index, reduction="none")
    weight = labelled.float()
    if class_weights is not None:
        weight = weight * class_weights.to(per_pixel.device, torch.float32)[index]
    return (per_pixel * weight).sum() / weight.sum().clamp(min=1e-12)


def distill_loss(student: dict[str, torch.Tensor | None], teacher: dict[str, torch.Tensor | None],
                 batch: dict[str, torch.Tensor], channels: torch.Tensor,
                 weights: LossConfig | None = None, teacher_nucleus: int | None = None) -> torch.Tensor:
    """Keep the base model's outputs where the batch has no label for them ("learning without forgetting").

    ``student`` and ``teacher`` are logits from :func:`histopan.model.network.split_outputs`; ``channels``
    indexes the student's semantic channels that the teacher's classes map to (by name).  Terms, each a
    mean over the pixels that head has no label on: the KL divergence of the semantic softmax (the student
    renormalised over the teacher's classes) where ``label_bits == 0``, and the binary cross-entropy of the
    centre and boundary maps' Bernoulli KL divergence from the teacher's outside ``centre_valid`` /
    ``boundary_valid``.  Each is 0 when the student equals the teacher.  A head whose supervised loss is
    switched off in ``weights`` is distilled everywhere (e.g. points that should train only the type head).
    With ``teacher_nucleus`` (the teacher's nucleus class index), pixels whose label allows the nucleus and a
    tissue class (tile classes, regions: "this tissue, or a nucleus in it") keep the teacher's p(nucleus)
    (a Bernoulli KL term), so training tissue classes cannot turn tissue into nuclei.
    """
    w = weights or LossConfig()
    bits = batch["label_bits"]
    free = bits == 0
    if w.semantic == 0 and w.stuff == 0 and w.dice == 0:
        free = torch.ones_like(free)
    s_log = torch.log_softmax(student["semantic"].float()[:, channels], dim=1)
    t_prob = torch.softmax(teacher["semantic"].float(), dim=1)
    kl = (t_prob * (torch.log(t_prob.clamp(min=1e-8)) - s_log)).sum(1)
    loss = (kl * free).sum() / free.sum().clamp(min=1)
    # where the label allows "nucleus" and some tissue class (tile classes, regions), it does not say whether
    # a pixel is a nucleus: keep the base model's p(nucleus) there
    t_nuc = teacher_nucleus
    if t_nuc is not None:
        s_nuc = int(channels[t_nuc])
        nucleus_bit = torch.tensor(1, dtype=torch.int64, device=bits.device) << s_nuc
        undecided = ~free & ((bits & nucleus_bit) != 0) & ((bits & ~nucleus_bit) != 0)
        if bool(undecided.any()):
            p_s = torch.softmax(student["semantic"].float(), dim=1)[:, s_nuc].clamp(1e-6, 1 - 1e-6)
            p_t = t_prob[:, t_nuc].clamp(1e-6, 1 - 1e-6)
            bern = p_t * torch.log(p_t / p_s) + (1 - p_t) * torch.log((1 - p_t) / (1 - p_s))
            loss = loss + (bern * undecided).sum() / undecided.sum()
    for key, valid in (("centre", "centre_valid"), ("boundary", "boundary_valid")):
        mask = ~batch.get(valid, batch["nucleus_valid"])
        if getattr(w, key) == 0:
            mask = torch.ones_like(mask)
        t = torch.sigmoid(teacher[key].float())
        bce = F.binary_cross_entropy_with_logits(student[key].float(), t, reduction="none")
        entropy = -(t * torch.log(t.clamp(min=1e-8)) + (1 - t) * torch.log((1 - t).clamp(min=1e-8)))
        loss = loss + ((bce - entropy) * mask).sum() / mask.sum().clamp(min=1)  # Bernoulli KL: 0 when equal
    return loss


def total_loss(heads: dict[str, torch.Tensor | None], batch: dict[str, torch.Tensor], nucleus_index: int,
               weights: LossConfig, type_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the masked losses of one batch, and the value of each term (floats, for logging).

    ``heads`` are the logits of :func:`histopan.model.network.split_outputs`; ``batch`` holds
    ``label_bits`` (N, H, W) int64, ``nucleus``, ``centre``, ``boundary`` (N, H, W) float and
    ``nucleus_valid`` (N, H, W) bool; optionally ``centre_valid`` and ``boundary_valid`` (N, H, W) bool,
    where those maps are known when that differs from ``nucleus_valid`` (sparse labels: a point gives a
    centre but no boundary), and ``types`` (N, H, W) int nucleus-type index, -1 where unknown (trains the
    type head, weighted by ``weights.type``; ``type_weights`` (K,) weights its pixels by type).  With
    ``weights.contact_weight`` > 0 and a ``contact`` (N, H, W) bool map in the batch, the pixels near two
    different nuclei count ``1 + contact_weight`` times in the cross-entropy and the centre and boundary losses.
    """
    semantic = heads["semantic"]
    valid = batch["nucleus_valid"]
    centre_valid = batch.get("centre_valid", valid)
    boundary_valid = batch.get("boundary_valid", valid)
    pixel_weight = None
    if weights.contact_weight > 0 and "contact" in batch:
        pixel_weight = 1.0 + weights.contact_weight * batch["contact"].float()
        centre_valid = centre_valid * pixel_weight
        boundary_valid = boundary_valid * pixel_weight
    ce = partial_label_ce(semantic, batch["label_bits"], pixel_weight)
    stuff = stuff_given_tissue_ce(semantic, batch["label_bits"], nucleus_index)
    p_nucleus = torch.softmax(semantic.float(), dim=1)[:, nucleus_index]
    dice = masked_soft_dice(p_nucleus, batch["nucleus"], valid)
    centre = masked_bce(heads["centre"], batch["centre"], centre_valid)
    boundary = masked_bce(heads["boundary"], batch["boundary"], boundary_valid, weights.boundary_pos_weight)
    loss = (weights.semantic * ce + weights.stuff * stuff + weights.dice * dice + weights.centre * centre
            + weights.boundary * boundary)
    terms = {"ce": float(ce.detach()), "stuff": float(stuff.detach()), "dice": float(dice.detach()),
             "centre": float(centre.detach()), "boundary": float(boundary.detach())}
    if heads.get("types") is not None and "types" in batch:
        type_ce = masked_ce(heads["types"], batch["types"], type_weights)
        loss = loss + weights.type * type_ce
        terms["type"] = float(type_ce.detach())
    terms["loss"] = float(loss.detach())
    return loss, terms
