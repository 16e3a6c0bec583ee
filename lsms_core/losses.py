"""Training loss of LSMS: segmentation (BCE + soft Dice, deep supervision), vision-language
contrastive (symmetric InfoNCE) and lesion presence (BCE).

``loss = seg + contrastive_weight * contrastive + presence_weight * presence`` with

* ``seg = Σ_level w_level * (seg_bce_weight * BCE + seg_dice_weight * Dice)`` over the final logits
  (``w = 1``) and the aux logits at strides 8, 16, 32 (``w = deep_supervision_weights``); the target
  is area-downsampled (soft) to each aux size. Dice is computed per sample with smoothing 1,
  ``1 - (2 Σpt + 1) / (Σp + Σt + 1)``, and averaged over the samples whose target is **not empty**
  (0 when none is). Empty targets (negative expressions, slices without the lesion) are left to BCE
  and the presence term: their per-sample Dice, ``Σp / (Σp + 1)``, is already 0.5 for a total
  probability mass of one pixel, and with a third of the batch empty it drove the model into the
  trivial "predict nothing" solution on our benchmark (measured: mIoU 0 after 400 steps).
* ``distractor``: given the map of the slice's other lesions (those the expression does not refer
  to), the BCE of their pixels is multiplied by ``distractor_weight`` at every level: a mask drawn
  on the wrong lesion then costs more than one drawn on liver. 1 (the default) = off.
* ``contrastive``: the visual embedding of sample ``i`` is ``visual_map`` averaged over its target
  mask; visual and text embeddings are L2-normalised and compared with the model's learnable scale
  ``output.logit_scale`` (``1 / temperature``). Samples with an empty target are excluded; with
  fewer than 2 valid samples the term is 0. Samples with the *same text* (identical strings when
  the model got strings, else identical text embeddings) are not negatives of each other: they are
  removed from each other's softmax denominators (e.g. "the largest lesion" on two patients).
* ``contrastive_distractors``: each text also meets, as one more negative of its own row only,
  ``visual_map`` pooled over the other lesions of its slice (the ``distractor`` map), so the term
  must tell lesions of one slice apart, not only slices apart. Off by default.
* ``presence``: BCE between ``presence_logits`` and "target has any foreground".
* ``appearance`` (models with ``appearance_head``, given the items' ``"appearance"`` maps): the
  maps are area-downsampled to the head's stride-4 grid; every cell at least half covered by typed
  lesions is a sample of a cross-entropy against the cell's share of each type (soft targets at
  borders between two lesions), averaged over those cells (0 when no cell is), times
  ``appearance_weight``. It does not depend on the expression: every lesion on the slice counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lsms_core.model import LSMSConfig, LSMSOutput

__all__ = ["LSMSLoss", "soft_dice_loss", "info_nce_loss"]


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Per-sample soft Dice loss ``(B,)`` from logits and a (soft) target of the same shape."""
    probs = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    intersection = (probs * target).sum(1)
    return 1.0 - (2.0 * intersection + smooth) / (probs.sum(1) + target.sum(1) + smooth)


def _duplicate_texts(output: LSMSOutput) -> torch.Tensor:
    """``(B, B)`` bool: True where samples i != j share the same text."""
    n = output.text_embedding.shape[0]
    if output.texts is not None and len(output.texts) == n:
        keys = [" ".join(t.lower().split()) for t in output.texts]
        same = torch.tensor([[a == b for b in keys] for a in keys], device=output.text_embedding.device)
    else:
        emb = output.text_embedding.detach()
        same = torch.cdist(emb, emb) <= 1e-5 * emb.norm(dim=1).max().clamp_min(1.0)
    return same & ~torch.eye(n, dtype=torch.bool, device=same.device)


def info_nce_loss(
    visual: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    duplicates: torch.Tensor | None = None,
    hard_negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE between matching rows of ``visual`` and ``text`` ``(N, D)``.

    ``duplicates`` ``(N, N)`` bool marks pairs (i != j) that must not act as negatives.
    ``hard_negatives`` ``(visual (N, D), valid (N,) bool)``: one more visual negative per text, for
    its own row only (text i against the other lesions of image i), where ``valid``.
    """
    visual = F.normalize(visual, dim=1)
    text = F.normalize(text, dim=1)
    logits = logit_scale * visual @ text.t()
    if duplicates is not None:
        logits = logits.masked_fill(duplicates, float("-inf"))
    labels = torch.arange(logits.shape[0], device=logits.device)
    text_logits = logits.t()
    if hard_negatives is not None:
        hard, valid = hard_negatives
        extra = logit_scale * (F.normalize(hard, dim=1) * text).sum(1)
        text_logits = torch.cat([text_logits, extra.masked_fill(~valid, float("-inf"))[:, None]], 1)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(text_logits, labels))


class LSMSLoss(nn.Module):
    """The LSMS training objective, weighted by the loss fields of :class:`LSMSConfig`.

    ``forward(output, target, distractor=None, appearance=None)`` takes the model's
    :class:`LSMSOutput`, the binary target ``(B, 1, H, W)`` (float in {0, 1}, same H, W as
    ``output.logits``), optionally the ``distractor`` map of the same shape (the training items'
    ``"distractor"``) and the ``appearance`` maps ``(B, K, H, W)`` (the items' ``"appearance"``), and
    returns a dict of scalar tensors: ``"loss"`` (to backpropagate), ``"seg"``, ``"contrastive"``,
    ``"presence"``, ``"appearance"`` (unweighted terms, for logging).
    """

    def __init__(self, config: LSMSConfig):
        super().__init__()
        if not isinstance(config, LSMSConfig):
            raise ValueError(f"LSMSLoss needs an LSMSConfig, got {type(config).__name__}")
        self.config = config

    def _seg_term(
        self, logits: torch.Tensor, target: torch.Tensor, distractor: torch.Tensor | None = None
    ) -> torch.Tensor:
        cfg = self.config
        pixel_weight = None if distractor is None else 1.0 + (cfg.distractor_weight - 1.0) * distractor
        bce = F.binary_cross_entropy_with_logits(logits, target, weight=pixel_weight)
        positive = target.flatten(1).amax(1) > 0
        if positive.any():
            dice = soft_dice_loss(logits[positive], target[positive]).mean()
        else:
            dice = logits.new_zeros(())
        return cfg.seg_bce_weight * bce + cfg.seg_dice_weight * dice

    def segmentation_loss(
        self, output: LSMSOutput, target: torch.Tensor, distractor: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.config.distractor_weight == 1.0:  # off: the map would weigh every pixel 1
            distractor = None
        loss = self._seg_term(output.logits, target, distractor)
        for weight, aux in zip(self.config.deep_supervision_weights, output.aux_logits):
            if weight > 0:
                size = aux.shape[-2:]
                aux_distractor = None if distractor is None else F.adaptive_avg_pool2d(distractor, size)
                loss = loss + weight * self._seg_term(
                    aux, F.adaptive_avg_pool2d(target, size), aux_distractor
                )
        return loss

    @staticmethod
    def _pooled(output: LSMSOutput, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``visual_map`` averaged over ``mask`` (area weights) ``(B, D)`` and whether the mask has area."""
        weights = F.adaptive_avg_pool2d(mask, output.visual_map.shape[-2:])
        area = weights.sum((1, 2, 3))
        return (output.visual_map * weights).sum((2, 3)) / area.clamp_min(1e-6)[:, None], area > 0

    def contrastive_loss(
        self, output: LSMSOutput, target: torch.Tensor, distractor: torch.Tensor | None = None
    ) -> torch.Tensor:
        visual, valid = self._pooled(output, target)
        if int(valid.sum()) < 2:
            return output.visual_map.new_zeros(())
        duplicates = _duplicate_texts(output)[valid][:, valid]
        hard = None
        if distractor is not None and self.config.contrastive_distractors:
            other, has_other = self._pooled(output, distractor)
            hard = (other[valid], has_other[valid])
        return info_nce_loss(
            visual[valid], output.text_embedding[valid], output.logit_scale, duplicates, hard
        )

    def appearance_loss(self, output: LSMSOutput, appearance: torch.Tensor) -> torch.Tensor:
        logits = output.appearance_logits
        shares = F.adaptive_avg_pool2d(appearance.to(logits.dtype), logits.shape[-2:])
        covered = shares.sum(1)  # (B, h, w): the cell's share of typed lesion pixels
        cells = covered >= 0.5
        if not bool(cells.any()):
            return logits.new_zeros(())
        soft = (shares / covered.clamp_min(1e-6)[:, None]).permute(0, 2, 3, 1)[cells]
        log_probs = F.log_softmax(logits.permute(0, 2, 3, 1)[cells], dim=1)
        return -(soft * log_probs).sum(1).mean()

    def forward(
        self,
        output: LSMSOutput,
        target: torch.Tensor,
        distractor: torch.Tensor | None = None,
        appearance: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        target = self._check_mask("target", target, output)
        if distractor is not None:
            distractor = self._check_mask("distractor", distractor, output)
        cfg = self.config
        seg = self.segmentation_loss(output, target, distractor)
        present = (target.flatten(1).amax(1) > 0.5).to(output.presence_logits.dtype)
        presence = F.binary_cross_entropy_with_logits(output.presence_logits, present)
        if cfg.contrastive_weight > 0:
            contrastive = self.contrastive_loss(output, target, distractor)
        else:
            contrastive = target.new_zeros(())
        loss = seg + cfg.contrastive_weight * contrastive + cfg.presence_weight * presence
        parts = {"seg": seg, "contrastive": contrastive, "presence": presence}
        if output.appearance_logits is not None and appearance is not None:
            parts["appearance"] = self.appearance_loss(output, self._check_appearance(appearance, output))
            loss = loss + cfg.appearance_weight * parts["appearance"]
        return {"loss": loss, **parts}

    def _check_appearance(self, appearance: torch.Tensor, output: LSMSOutput) -> torch.Tensor:
        classes = len(self.config.appearance_classes)
        expected = (output.logits.shape[0], classes, *output.logits.shape[-2:])
        if not isinstance(appearance, torch.Tensor) or tuple(appearance.shape) != expected:
            got = (
                tuple(appearance.shape) if isinstance(appearance, torch.Tensor) else type(appearance).__name__
            )
            raise ValueError(
                f"appearance must be a tensor (B, {classes}, H, W) of per-type lesion maps at the image "
                f"size {expected}, got {got}; build the items with SliceDataset(appearance_classes=...)"
            )
        if not torch.isfinite(appearance).all() or appearance.min() < 0 or appearance.max() > 1:
            raise ValueError("appearance maps must contain values in [0, 1]")
        return appearance

    @staticmethod
    def _check_mask(name: str, mask: torch.Tensor, output: LSMSOutput) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor (B, 1, H, W), got {type(mask).__name__}")
        if mask.shape != output.logits.shape:
            raise ValueError(
                f"{name} shape {tuple(mask.shape)} does not match the logits {tuple(output.logits.shape)}; "
                "pass the binary mask as (B, 1, H, W) at the image size"
            )
        mask = mask.to(output.logits.dtype)
        if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
            raise ValueError(f"{name} must contain values in [0, 1] (a binary mask)")
        return mask
