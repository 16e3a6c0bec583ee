"""Volume inference: geometry, slice range, progress/cancel, validation, post-processing."""

from __future__ import annotations

import numpy as np
import pytest

from lsms_core.infer import (
    Segmenter,
    _prepare,
    available_devices,
    body_slices,
    postprocess,
    resolve_device,
)
from lsms_core.io import Volume

RAS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # x and y flipped w.r.t. canonical LPS
Z_DOWN = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # slices stored superior -> inferior


def _ct(depth=8, height=40, width=48, seed=0) -> np.ndarray:
    """A small CT: air everywhere, a soft-tissue ellipse with a brighter blob in slices 1..depth-2."""
    rng = np.random.default_rng(seed)
    hu = np.full((depth, height, width), -1000.0, dtype=np.float32)
    yy, xx = np.mgrid[:height, :width]
    body = ((yy - height / 2) / (height * 0.42)) ** 2 + ((xx - width / 2) / (width * 0.45)) ** 2 <= 1
    lesion = (yy - height * 0.4) ** 2 + (xx - width * 0.35) ** 2 <= 16
    for z in range(1, depth - 1):
        hu[z][body] = 50 + rng.normal(0, 10, body.sum())
        hu[z][lesion] = 120
    return hu


@pytest.fixture(scope="module")
def model3(tiny_encoder_dir):
    """A tiny model on 3 adjacent slices (exercises the k-slice stacking); shared, never modified."""
    from lsms_core.model import LSMS
    from lsms_core.testing import tiny_config

    return LSMS(tiny_config(tiny_encoder_dir, in_slices=3)).eval()


def test_devices():
    devices = available_devices()
    assert devices[-1] == "cpu"
    assert str(resolve_device("auto")) == devices[0]
    with pytest.raises(ValueError, match=r"'tpu' is not available.*auto, .*cpu"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="choose one of"):
        Segmenter(object(), device="quantum")


def test_prepare_matches_the_training_transform(model3):
    from lsms_core.data.dataset import adjacent_slices, prepare_slices

    hu = _ct()
    idx = np.array([0, 3, 7])
    batch = _prepare(hu, idx, model3.config)
    assert batch.shape == (3, 3, 64, 64) and batch.dtype == np.float32
    for row, z in zip(batch, idx):
        expected = prepare_slices(hu[adjacent_slices(int(z), 3, hu.shape[0])], 64, model3.config.hu_window)
        np.testing.assert_allclose(row, expected, atol=1e-6)


def test_reoriented_volume_gives_the_same_answer_in_its_own_grid(model3):
    hu = _ct()
    lps = Volume(hu, spacing=(0.8, 0.9, 2.5))
    ras = Volume(hu[:, ::-1, ::-1].copy(), spacing=(0.8, 0.9, 2.5), direction=RAS)  # same voxels, RAS file
    seg = Segmenter(model3, device="cpu", batch_size=4)
    a = seg.segment(lps, "the lesion", return_probability=True)
    b = seg.segment(ras, "the lesion", return_probability=True)
    assert b.mask.shape == ras.array.shape and b.mask.dtype == np.uint8
    assert b.probability.shape == ras.array.shape
    np.testing.assert_allclose(b.probability, a.probability[:, ::-1, ::-1], atol=1e-5)
    np.testing.assert_array_equal(b.mask, a.mask[:, ::-1, ::-1])
    np.testing.assert_allclose(b.slice_scores, a.slice_scores, atol=1e-6)


def test_slice_range_body_skipping_and_progress(model3):
    hu = _ct(depth=10)
    calls = []
    seg = Segmenter(model3, device="cpu", batch_size=2)
    result = seg.segment(
        Volume(hu, direction=Z_DOWN), "all lesions", slices=(3, 8), progress=lambda d, t: calls.append((d, t))
    )
    assert calls == [(0, 5), (2, 5), (4, 5), (5, 5)]
    # The range is in the input's slice order even though the canonical order is reversed.
    scored = np.flatnonzero(result.slice_scores > 0)
    np.testing.assert_array_equal(scored, np.arange(3, 8))
    assert not result.mask[:3].any() and not result.mask[8:].any()

    # Air-only slices (0 and 9) are skipped: 8 body slices in all.
    calls.clear()
    full = seg.segment(hu, "all lesions", progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (8, 8)
    assert full.slice_scores[0] == 0 and full.slice_scores[9] == 0 and (full.slice_scores[1:9] > 0).all()
    np.testing.assert_array_equal(body_slices(hu), full.slice_scores > 0)


def test_cancel_after_first_batch(model3):
    hu = _ct()
    checks = []

    def should_cancel():
        checks.append(1)
        return len(checks) > 1

    calls = []
    result = Segmenter(model3, device="cpu", batch_size=2).segment(
        hu, "the lesion", should_cancel=should_cancel, progress=lambda d, t: calls.append(d)
    )
    assert result.cancelled and not result.found
    assert result.mask.shape == hu.shape and not result.mask.any()
    assert calls == [0, 2]


def test_text_is_encoded_once(model3, monkeypatch):
    counter = {"n": 0}
    original = model3.encode_text

    def counting(texts):
        counter["n"] += 1
        return original(texts)

    monkeypatch.setattr(model3, "encode_text", counting)
    Segmenter(model3, device="cpu", batch_size=2).segment(_ct(), "the largest lesion")
    assert counter["n"] == 1


def test_scales_average_each_slice_over_input_sizes(model3):
    ct = _ct()
    results = {
        scales: Segmenter(model3, device="cpu", batch_size=4, scales=scales).segment(
            ct, "the lesion", return_probability=True
        )
        for scales in [(1.0,), (1.5,), (1.0, 1.5)]
    }
    both = results[(1.0, 1.5)]
    one, other = results[(1.0,)], results[(1.5,)]
    assert not np.allclose(one.slice_scores, other.slice_scores)
    np.testing.assert_allclose(both.slice_scores, (one.slice_scores + other.slice_scores) / 2, atol=1e-5)
    np.testing.assert_allclose(both.probability, (one.probability + other.probability) / 2, atol=1e-5)
    with pytest.raises(ValueError, match="scales must be"):
        Segmenter(model3, device="cpu", scales=(0.0,))


def test_the_segmenter_runs_extra_scales_with_its_gate(model3, monkeypatch):
    from lsms_core.model import LSMS, SCALES_GATE

    gates = []
    predict = LSMS.predict

    def recording(self, images, text, scales=(1.0,), gate=SCALES_GATE):
        gates.append(gate)
        return predict(self, images, text, scales, gate)

    monkeypatch.setattr(LSMS, "predict", recording)
    ct = _ct()
    Segmenter(model3, device="cpu", batch_size=4).segment(ct, "the lesion")
    assert gates and set(gates) == {SCALES_GATE}  # what LSMS.predict's gate does: test_model.py
    gates.clear()
    Segmenter(model3, device="cpu", batch_size=4, gate=0).segment(ct, "the lesion")
    assert gates and set(gates) == {0.0}
    for gate in (-0.1, 0.5, "high"):
        with pytest.raises(ValueError, match="gate must be in"):
            Segmenter(model3, device="cpu", gate=gate)


@pytest.mark.parametrize(
    ("volume", "text", "match"),
    [
        (_ct(), "", "non-empty referring expression"),
        (_ct(), "   ", "non-empty referring expression"),
        (_ct()[3], "the lesion", "3D CT"),
        (np.where(np.arange(8)[:, None, None] == 2, np.nan, _ct()), "the lesion", "NaN"),
    ],
)
def test_bad_input(model3, volume, text, match):
    with pytest.raises(ValueError, match=match):
        Segmenter(model3, device="cpu").segment(volume, text)


def test_bad_slice_range(model3):
    with pytest.raises(ValueError, match="0 <= z0 < z1 <= 8"):
        Segmenter(model3, device="cpu").segment(_ct(), "the lesion", slices=(5, 12))


def test_no_body_means_not_found(model3):
    air = np.full((4, 32, 32), -1000.0, dtype=np.float32)
    calls = []
    result = Segmenter(model3, device="cpu").segment(
        air, "the lesion", progress=lambda d, t: calls.append((d, t))
    )
    assert calls == [(0, 0)]
    assert not result.found and not result.cancelled and not result.mask.any()
    assert not result.slice_scores.any()


def test_segmenter_loads_a_model_file(model3, tmp_path):
    from lsms_core.checkpoint import save_model

    path = save_model(model3, tmp_path / "m.safetensors", version="7")
    seg = Segmenter(path, device="cpu")
    result = seg.segment(_ct(), "the lesion")
    assert result.model_version == "7" and result.text == "the lesion"
    assert result.elapsed_s > 0 and set(result.timings) == {"prepare", "model", "postprocess"}


def test_segmenter_runs_a_folded_copy_and_leaves_a_given_model_trainable(tiny_encoder_dir):
    """The Segmenter folds batch norm into a copy; the caller's model keeps its batch norms and
    training mode, and the copy's probabilities match the model's own eval-mode forward pass."""
    import torch

    from lsms_core.data.dataset import resize_mask_back
    from lsms_core.model import LSMS, ConvNormAct
    from lsms_core.testing import randomise_batch_norm, tiny_config

    model3 = LSMS(tiny_config(tiny_encoder_dir, in_slices=3)).train()
    randomise_batch_norm(model3)  # as after training, so that folding them is not a no-op
    seg = Segmenter(model3, device="cpu", scales=(1.0,))  # compared with one forward pass below
    assert seg.model is not model3 and seg.model.text_encoder is model3.text_encoder
    assert model3.training and all(
        isinstance(block[1], torch.nn.BatchNorm2d)
        for block in model3.modules()
        if isinstance(block, ConvNormAct)
    )
    ct = _ct()
    result = seg.segment(ct, "the lesion", return_probability=True)
    model3.eval()
    todo = np.flatnonzero(body_slices(ct))
    with torch.inference_mode():
        logits = model3(torch.from_numpy(_prepare(ct, todo, model3.config)), "the lesion").logits
    expected = resize_mask_back(torch.sigmoid(logits[:, 0]).numpy(), ct.shape[1:])
    np.testing.assert_allclose(result.probability[todo], expected, atol=1e-5)


# --------------------------------------------------------------------------------------------
# postprocess (pure)
# --------------------------------------------------------------------------------------------


def _two_blobs():
    """A: 27 voxels at 0.9 (sum 24.3); B: 40 voxels at 0.55 (sum 22), larger but less sure."""
    prob = np.zeros((6, 20, 20), dtype=np.float32)
    prob[1:4, 2:5, 2:5] = 0.9
    prob[1:3, 10:14, 10:15] = 0.55
    prob[5, 18, 18] = 0.3  # below threshold
    return prob


def test_postprocess_singular_keeps_the_most_probable_component():
    prob = _two_blobs()
    mask = postprocess(prob, np.ones(6), singular=True)
    assert mask.dtype == np.uint8
    assert mask.sum() == 27 and mask[1:4, 2:5, 2:5].all()


def test_postprocess_plural_keeps_components_above_min_size():
    prob = _two_blobs()
    assert postprocess(prob, np.ones(6), singular=False).sum() == 67
    only_big = postprocess(prob, np.ones(6), singular=False, min_size=30)
    assert only_big.sum() == 40 and only_big[1:3, 10:14, 10:15].all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_postprocess_labels_inside_the_foreground_box_as_over_the_whole_volume(seed):
    """Random blobs anywhere in the volume, edges included: the kept mask is what labelling the whole
    volume gives."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    prob = ndimage.gaussian_filter(rng.random((12, 40, 50)).astype(np.float32), 1.0)
    prob = ((prob - prob.min()) / (prob.max() - prob.min())) ** 2
    presence = rng.random(12) + 0.3
    binary = (prob > 0.5) & (presence > 0.5)[:, None, None]
    labels, n = ndimage.label(binary, structure=np.ones((3, 3, 3), dtype=bool))
    assert n >= 2
    index = np.arange(1, n + 1)
    best = index[np.argmax(ndimage.sum_labels(prob, labels, index))]
    big = index[ndimage.sum_labels(binary, labels, index) >= 10]

    np.testing.assert_array_equal(postprocess(prob, presence, singular=True), labels == best)
    np.testing.assert_array_equal(
        postprocess(prob, presence, singular=False, min_size=10), np.isin(labels, big)
    )
    assert not postprocess(prob * 0.4, presence, singular=True).any()


def test_postprocess_thresholds_as_the_2d_evaluation_does():
    """A probability of exactly the threshold is background in both, for the mask and the presence."""
    from lsms_core import evaluate, infer

    assert evaluate.THRESHOLD is infer.THRESHOLD
    prob = np.zeros((2, 4, 4), np.float32)
    prob[:, 1:3, 1:3] = 0.5
    prob[:, 1, 1] = 0.75
    presence = np.array([0.5, 0.75])
    kept = postprocess(prob, presence, singular=False)
    assert kept[0].sum() == 0  # presence exactly 0.5: not there
    assert kept[1].sum() == 1 and kept[1, 1, 1]  # probability exactly 0.5: background


def test_postprocess_presence_gates_slices():
    prob = _two_blobs()
    presence = np.ones(6)
    presence[1:4] = 0.2  # the model says: not in these slices
    assert not postprocess(prob, presence, singular=False).any()
    presence[1] = 0.9  # only slice 1 is kept, and both blobs there
    kept = postprocess(prob, presence, singular=False)
    assert kept.sum() == 9 + 20 and kept[1].sum() == 29
    with pytest.raises(ValueError, match="presence"):
        postprocess(prob, np.ones(5), singular=True)


def test_out_of_memory_says_what_to_do(model3, monkeypatch):
    import torch

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model3, "forward", exhausted)
    from lsms_core.infer import DeviceOutOfMemoryError

    with pytest.raises(
        DeviceOutOfMemoryError, match="ran out of memory segmenting 2 slices.*smaller batch size.*cpu"
    ):
        Segmenter(model3, device="cpu", batch_size=2).segment(_ct(), "the lesion")

    def other_failure(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(model3, "forward", other_failure)
    with pytest.raises(RuntimeError, match="^shape mismatch$"):
        Segmenter(model3, device="cpu", batch_size=2).segment(_ct(), "the lesion")


# --------------------------------------------------------------------------------------------
# Segmenter post-processing, with a model whose answer is known
# --------------------------------------------------------------------------------------------

# Index y runs inferior and the slices (index z) run posterior: a coronal file.
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0)


def _ct_with_two_lesions():
    """64 x 64 slices (the tiny model's image size: no resizing either way), soft tissue (40 HU) in
    slices 1..4, two bright (200 HU) lesions far apart. A: 2 x 4 x 4 = 32 voxels, first in raster
    order; B: 3 x 8 x 8 = 192 voxels. Returns ``(hu, a, b)`` with the lesions' bool masks."""
    hu = np.full((6, 64, 64), -1000.0, dtype=np.float32)
    hu[1:5, 4:60, 4:60] = 40.0
    a = np.zeros(hu.shape, dtype=bool)
    a[1:3, 10:14, 10:14] = True
    b = np.zeros(hu.shape, dtype=bool)
    b[2:5, 36:44, 36:44] = True
    hu[a | b] = 200.0
    return hu, a, b


def _coronal(array: np.ndarray) -> np.ndarray:
    """The (z, y, x) array of the CORONAL file holding the same voxels as an axial (canonical) array:
    coronal[j, i, x] = axial[Z - 1 - i, j, x] (coronal slice j is axial row j, superior on top)."""
    return np.ascontiguousarray(array.transpose(1, 0, 2)[:, ::-1, :])


@pytest.fixture()
def bright_is_lesion(model3, monkeypatch):
    """model3 answering like a perfect model: foreground wherever the centre slice of its input is
    above 150 HU, and "present" in every slice. Everything around the forward pass is real."""
    from types import SimpleNamespace

    import torch

    low, high = model3.config.hu_window
    cut = (150.0 - low) / (high - low)

    def forward(images, text):
        centre = images[:, images.shape[1] // 2]
        logits = torch.where(centre > cut, 12.0, -12.0)[:, None]
        return SimpleNamespace(logits=logits, presence_logits=torch.full((len(images),), 12.0))

    monkeypatch.setattr(model3, "forward", forward)
    return model3


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("the largest lesion", "b"),
        ("the largest of the two lesions", "b"),
        ("all lesions", "ab"),
        ("both lesions", "ab"),
    ],
)
def test_the_expression_decides_one_component_or_all(bright_is_lesion, text, kept):
    from scipy import ndimage

    hu, a, b = _ct_with_two_lesions()
    result = Segmenter(bright_is_lesion, device="cpu", batch_size=4).segment(hu, text)
    # Singular: only B, the component with the highest summed probability (the larger one, labelled
    # second); plural: both (32 and 192 voxels, above the default 20 mm3 at 1 mm3 per voxel).
    expected = b if kept == "b" else a | b
    np.testing.assert_array_equal(result.mask, expected.astype(np.uint8))
    assert ndimage.label(result.mask, structure=np.ones((3, 3, 3)))[1] == len(kept)
    assert result.found


@pytest.mark.parametrize(
    ("spacing", "min_mm3", "text", "kept"),
    [
        ((1.0, 1.0, 1.0), 40.0, "all lesions", "b"),  # A: 32 x 1 mm3 = 32 < 40
        ((1.0, 1.0, 1.0), 0.0, "all lesions", "ab"),
        ((1.0, 1.0, 2.0), 40.0, "all lesions", "ab"),  # A: 32 x 2 mm3 = 64
        ((0.5, 1.0, 2.5), 40.0, "all lesions", "ab"),  # A: 32 x 1.25 mm3 = 40, exactly the minimum
        ((0.5, 1.0, 2.5), 40.5, "all lesions", "b"),
        ((1.0, 1.0, 2.0), 400.0, "all lesions", ""),  # B: 192 x 2 mm3 = 384 < 400 too
        ((1.0, 1.0, 2.0), 400.0, "the largest lesion", "b"),  # the minimum is for plural expressions
    ],
)
def test_min_lesion_volume_is_in_mm3(bright_is_lesion, spacing, min_mm3, text, kept):
    hu, a, b = _ct_with_two_lesions()
    seg = Segmenter(bright_is_lesion, device="cpu", batch_size=4, min_lesion_mm3=min_mm3)
    result = seg.segment(Volume(hu, spacing=spacing), text)
    expected = np.zeros(hu.shape, dtype=bool)
    if "a" in kept:
        expected |= a
    if "b" in kept:
        expected |= b
    np.testing.assert_array_equal(result.mask, expected.astype(np.uint8))
    assert result.found == bool(kept)


def test_coronal_volume_segments_like_its_axial_copy(bright_is_lesion):
    from lsms_core.io import to_canonical

    hu, a, b = _ct_with_two_lesions()
    coronal = Volume(_coronal(hu), spacing=(0.8, 2.5, 0.9), direction=CORONAL)
    np.testing.assert_array_equal(to_canonical(coronal).array, hu)  # the same voxels as the axial copy
    seg = Segmenter(bright_is_lesion, device="cpu", batch_size=4)
    axial = seg.segment(Volume(hu, spacing=(0.8, 0.9, 2.5)), "all lesions")
    np.testing.assert_array_equal(axial.mask, (a | b).astype(np.uint8))

    result = seg.segment(coronal, "all lesions")
    assert result.mask.shape == (64, 6, 64) and result.mask.dtype == np.uint8
    np.testing.assert_array_equal(result.mask, _coronal(a | b).astype(np.uint8))
    # One score per coronal slice; each crosses every body slice, so it gets their presence, sigmoid(12).
    assert result.slice_scores.shape == (64,)
    np.testing.assert_allclose(result.slice_scores, 1 / (1 + np.exp(-12.0)), rtol=1e-6)

    singular = seg.segment(coronal, "the largest lesion")
    np.testing.assert_array_equal(singular.mask, _coronal(b).astype(np.uint8))

    # A slice range is in the coronal file's slices (axial rows): rows 36..39 hold part of B only.
    cropped = seg.segment(coronal, "all lesions", slices=(36, 40))
    expected = _coronal(b)
    expected[40:] = False
    np.testing.assert_array_equal(cropped.mask, expected.astype(np.uint8))
