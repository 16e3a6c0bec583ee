"""LSMSLoss: finite on empty targets, Dice and InfoNCE behave as documented, weights switch terms."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lsms_core.losses import LSMSLoss, info_nce_loss, soft_dice_loss
from lsms_core.model import LSMSOutput
from lsms_core.testing import tiny_config as make_tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TEXTS = ["the lesion in the left lobe", "the small cyst", "the largest lesion", "no lesion"]


def _targets(batch: int, size: int = 48, empty: tuple[int, ...] = ()) -> torch.Tensor:
    target = torch.zeros(batch, 1, size, size)
    for i in range(batch):
        if i not in empty:
            target[i, :, 4 + 3 * i : 14 + 3 * i, 8:20] = 1
    return target


def _output(model, batch: int = 4, size: int = 48, texts=TEXTS) -> LSMSOutput:
    torch.manual_seed(0)
    return model.train()(torch.rand(batch, 1, size, size), list(texts[:batch]))


def _all_finite(losses: dict) -> bool:
    return all(torch.isfinite(v).all() for v in losses.values())


def test_returns_the_documented_terms(tiny_model):
    out = _output(tiny_model)
    losses = LSMSLoss(tiny_model.config)(out, _targets(4))
    assert set(losses) == {"loss", "seg", "contrastive", "presence"}
    assert all(v.ndim == 0 for v in losses.values()) and _all_finite(losses)
    cfg = tiny_model.config
    expected = (
        losses["seg"]
        + cfg.contrastive_weight * losses["contrastive"]
        + cfg.presence_weight * losses["presence"]
    )
    torch.testing.assert_close(losses["loss"], expected)
    assert losses["contrastive"] > 0  # four valid samples with different texts


def test_finite_with_some_and_with_all_targets_empty(tiny_model):
    loss_fn = LSMSLoss(tiny_model.config)
    some = loss_fn(_output(tiny_model), _targets(4, empty=(1, 3)))
    assert _all_finite(some) and some["contrastive"] > 0
    out = _output(tiny_model)
    none = loss_fn(out, _targets(4, empty=(0, 1, 2, 3)))
    assert _all_finite(none)
    assert none["contrastive"] == 0  # fewer than 2 valid samples
    none["loss"].backward()
    grads = [p.grad for p in tiny_model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_one_valid_sample_turns_the_contrastive_term_off(tiny_model):
    losses = LSMSLoss(tiny_model.config)(_output(tiny_model), _targets(4, empty=(1, 2, 3)))
    assert losses["contrastive"] == 0 and torch.isfinite(losses["loss"])


def test_contrastive_weight_zero_turns_it_off(tiny_encoder_dir, tiny_model):
    config = make_tiny_config(tiny_encoder_dir, contrastive_weight=0.0)
    losses = LSMSLoss(config)(_output(tiny_model), _targets(4))
    assert losses["contrastive"] == 0


def test_deep_supervision_weights_add_the_aux_terms(tiny_encoder_dir, tiny_model):
    out, target = _output(tiny_model), _targets(4)
    without = LSMSLoss(make_tiny_config(tiny_encoder_dir, deep_supervision_weights=(0, 0, 0)))(out, target)
    with_ds = LSMSLoss(make_tiny_config(tiny_encoder_dir, deep_supervision_weights=(0.5, 0, 0)))(out, target)
    assert with_ds["seg"] > without["seg"]


def test_dice_term_ignores_empty_targets_so_they_cannot_force_empty_predictions(tiny_encoder_dir, tiny_model):
    config = make_tiny_config(tiny_encoder_dir, deep_supervision_weights=(0, 0, 0), seg_bce_weight=0.0)
    loss_fn = LSMSLoss(config)
    out = _output(tiny_model)
    target = _targets(4, empty=(1, 3))
    expected = soft_dice_loss(out.logits[[0, 2]], target[[0, 2]]).mean()
    torch.testing.assert_close(loss_fn.segmentation_loss(out, target), expected)
    # all targets empty: no Dice term at all (BCE alone says "predict nothing")
    assert loss_fn.segmentation_loss(out, _targets(4, empty=(0, 1, 2, 3))).detach().item() == 0.0


def test_distractor_weight_scales_the_bce_on_the_other_lesions_only(tiny_encoder_dir, tiny_model):
    """With BCE alone at one level, the gradient on a distractor pixel is ``distractor_weight``
    times what it is without; every other pixel's gradient, and weight 1, leave the loss as it was."""
    out, target = _output(tiny_model), _targets(4)
    distractor = torch.zeros_like(target)
    distractor[:, :, 30:40, 30:40] = 1  # away from every target
    logits = out.logits.detach().requires_grad_(True)
    out = dataclasses.replace(out, logits=logits)

    def seg_and_grad(weight: float, with_map: bool) -> tuple[torch.Tensor, torch.Tensor]:
        config = make_tiny_config(
            tiny_encoder_dir,
            deep_supervision_weights=(0, 0, 0),
            seg_dice_weight=0.0,
            distractor_weight=weight,
        )
        seg = LSMSLoss(config).segmentation_loss(out, target, distractor if with_map else None)
        (grad,) = torch.autograd.grad(seg, logits)
        return seg.detach(), grad

    plain, plain_grad = seg_and_grad(1.0, False)
    torch.testing.assert_close(seg_and_grad(1.0, True)[0], plain)  # weight 1 = off
    torch.testing.assert_close(seg_and_grad(4.0, False)[0], plain)  # no map = off
    heavy, heavy_grad = seg_and_grad(4.0, True)
    assert heavy > plain
    inside = distractor.bool()
    torch.testing.assert_close(heavy_grad[inside], 4.0 * plain_grad[inside])
    torch.testing.assert_close(heavy_grad[~inside], plain_grad[~inside])
    # Through forward, at every level, with the map checked like the target.
    config = make_tiny_config(tiny_encoder_dir, distractor_weight=4.0)
    assert LSMSLoss(config)(out, target, distractor)["seg"] > LSMSLoss(config)(out, target)["seg"]
    with pytest.raises(ValueError, match="distractor shape"):
        LSMSLoss(config)(out, target, distractor[:, 0])
    with pytest.raises(ValueError, match="distractor_weight"):
        make_tiny_config(tiny_encoder_dir, distractor_weight=-1.0)


def test_soft_dice_values():
    big = 20.0
    target = torch.zeros(2, 1, 4, 4)
    target[0, :, :2] = 1
    perfect = torch.where(target > 0, big, -big)
    losses = soft_dice_loss(perfect, target)
    assert losses.shape == (2,)
    assert losses[0] == pytest.approx(0.0, abs=1e-6) and losses[1] == pytest.approx(0.0, abs=1e-6)
    # empty target: nothing predicted -> 0; everything predicted -> 16 / 17
    everything = torch.full_like(target, big)
    assert soft_dice_loss(everything, target)[1] == pytest.approx(16 / 17, abs=1e-5)
    # target = rows 0-1 (8 pixels), prediction = rows 1-2: 4 pixels overlap
    shifted = torch.full_like(target, -big)
    shifted[0, :, 1:3] = big
    assert soft_dice_loss(shifted, target)[0] == pytest.approx(1 - (2 * 4 + 1) / (8 + 8 + 1), abs=1e-5)


def test_info_nce_is_log_n_for_uninformative_embeddings_and_low_when_matched():
    n = 4
    same = torch.ones(n, 8)
    assert float(info_nce_loss(same, same, torch.tensor(10.0))) == pytest.approx(math.log(n), abs=1e-5)
    eye = torch.eye(n, 8)
    assert float(info_nce_loss(eye, eye, torch.tensor(50.0))) < 1e-6
    swapped = eye[[1, 0, 2, 3]]
    assert float(info_nce_loss(eye, swapped, torch.tensor(50.0))) > 10


def test_hard_negatives_join_only_their_own_texts_row():
    """Text i meets its image's other lesions as one more negative; no other text does, and an
    invalid hard negative changes nothing."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    visual, text, scale = torch.randn(3, 8), torch.randn(3, 8), torch.tensor(5.0)
    hard = torch.randn(3, 8)
    base = info_nce_loss(visual, text, scale)
    torch.testing.assert_close(
        info_nce_loss(visual, text, scale, hard_negatives=(hard, torch.zeros(3, dtype=torch.bool))), base
    )
    only_first = torch.tensor([True, False, False])
    logits = scale * F.normalize(visual, dim=1) @ F.normalize(text, dim=1).t()
    extra = torch.full((3, 1), float("-inf"))
    extra[0, 0] = scale * F.normalize(hard[0], dim=0) @ F.normalize(text[0], dim=0)
    labels = torch.arange(3)
    expected = 0.5 * (
        F.cross_entropy(logits, labels) + F.cross_entropy(torch.cat([logits.t(), extra], 1), labels)
    )
    got = info_nce_loss(visual, text, scale, hard_negatives=(hard, only_first))
    torch.testing.assert_close(got, expected)
    assert got > base  # a negative more can only raise the loss


def test_contrastive_distractors_pool_the_other_lesions_as_negatives(tiny_encoder_dir, tiny_model):
    out, target = _output(tiny_model), _targets(4)
    distractor = torch.zeros_like(target)
    distractor[:2, :, 30:40, 30:40] = 1  # the first two slices show another lesion
    on = LSMSLoss(make_tiny_config(tiny_encoder_dir, contrastive_distractors=True))
    off = LSMSLoss(make_tiny_config(tiny_encoder_dir))
    assert on(out, target, distractor)["contrastive"] > off(out, target, distractor)["contrastive"]
    torch.testing.assert_close(on(out, target)["contrastive"], off(out, target)["contrastive"])  # no map
    torch.testing.assert_close(
        on(out, target, torch.zeros_like(target))["contrastive"], off(out, target)["contrastive"]
    )


def test_identical_texts_are_not_negatives_of_each_other(tiny_model):
    texts = ["the largest lesion", "the largest lesion", "the small cyst", "no lesion"]
    out = _output(tiny_model, texts=texts)
    target = _targets(4)
    masked = LSMSLoss(tiny_model.config).contrastive_loss(out, target)
    # by hand: pool, normalise, mask the (0, 1) duplicate pair out of both softmaxes
    weights = torch.nn.functional.adaptive_avg_pool2d(target, out.visual_map.shape[-2:])
    visual = (out.visual_map * weights).sum((2, 3)) / weights.sum((1, 2, 3))[:, None]
    dup = torch.zeros(4, 4, dtype=torch.bool)
    dup[0, 1] = dup[1, 0] = True
    expected = info_nce_loss(visual, out.text_embedding, out.logit_scale, dup)
    unmasked = info_nce_loss(visual, out.text_embedding, out.logit_scale)
    torch.testing.assert_close(masked, expected)
    assert not torch.allclose(masked, unmasked)
    # without the strings, identical text embeddings are detected instead
    out.texts = None
    torch.testing.assert_close(LSMSLoss(tiny_model.config).contrastive_loss(out, target), expected)


def test_temperature_lives_in_the_model_and_gets_a_gradient(tiny_model):
    out = _output(tiny_model)
    LSMSLoss(tiny_model.config)(out, _targets(4))["loss"].backward()
    assert "logit_scale" in dict(tiny_model.named_parameters())
    assert tiny_model.logit_scale.grad is not None and tiny_model.logit_scale.grad != 0
    assert float(out.logit_scale.detach()) == pytest.approx(
        1 / tiny_model.config.contrastive_temperature_init, rel=1e-5
    )


def test_bad_targets_raise(tiny_model):
    out = _output(tiny_model, batch=2)
    loss_fn = LSMSLoss(tiny_model.config)
    with pytest.raises(ValueError, match="does not match"):
        loss_fn(out, torch.zeros(2, 48, 48))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        loss_fn(out, torch.full((2, 1, 48, 48), 2.0))


def _with_appearance_head(tiny_encoder_dir, tiny_model):
    from lsms_core.model import LSMS

    config = dataclasses.replace(tiny_model.config, appearance_head=True, appearance_weight=2.0)
    return LSMS(config, tiny_model.text_encoder, tiny_model.tokenizer)


def test_appearance_term_scores_the_lesion_cells_types_and_ignores_the_rest(tiny_encoder_dir, tiny_model):
    model = _with_appearance_head(tiny_encoder_dir, tiny_model)
    out = _output(model, batch=2)
    assert out.appearance_logits.shape == (2, 3, 12, 12)  # stride 4 of 48 x 48
    types = torch.zeros(2, 3, 48, 48)
    types[0, 0, 8:24, 8:24] = 1  # a cyst (type 0) in the first image, 4 x 4 cells
    types[1, 2, 24:40, 24:40] = 1  # a hypervascular lesion (type 2) in the second
    loss_fn = LSMSLoss(model.config)

    def term(logits):
        return float(loss_fn.appearance_loss(dataclasses.replace(out, appearance_logits=logits), types))

    right, wrong = torch.zeros(2, 3, 12, 12), torch.zeros(2, 3, 12, 12)
    right[0, 0, 2:6, 2:6] = right[1, 2, 6:10, 6:10] = 10.0
    wrong[0, 1, 2:6, 2:6] = wrong[1, 0, 6:10, 6:10] = 10.0
    assert term(right) < 1e-3 < math.log(3) - 1e-3 < term(wrong)
    assert term(torch.zeros(2, 3, 12, 12)) == pytest.approx(math.log(3), rel=1e-5)
    # cells outside the typed lesions do not count, whatever the head says there
    right[:, 1, :2] = 50.0
    assert term(right) < 1e-3
    # the weighted term joins the loss; without maps, or on slices without a typed lesion, it is absent / 0
    losses = loss_fn(out, _targets(2), appearance=types)
    rest = losses["seg"] + model.config.contrastive_weight * losses["contrastive"]
    rest = rest + model.config.presence_weight * losses["presence"]
    torch.testing.assert_close(losses["loss"], rest + 2.0 * losses["appearance"])
    assert "appearance" not in loss_fn(out, _targets(2))
    assert float(loss_fn(out, _targets(2), appearance=torch.zeros_like(types))["appearance"]) == 0.0
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        loss_fn(out, _targets(2), appearance=types[:, :2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        loss_fn(out, _targets(2), appearance=types * 3)
