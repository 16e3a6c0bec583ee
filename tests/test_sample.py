"""Tests of the committed sample CT (lsms_core/data/sample/)."""

from __future__ import annotations

import numpy as np
import pytest
from test_synth import _reference_dir, needs_totalseg

from lsms_core.data.sample import SAMPLE_CASE_ID, build_sample, load_sample, sample_dataset, sample_paths
from lsms_core.io import read_volume, to_canonical


@pytest.fixture(scope="module")
def sample():
    return load_sample()


def test_sample_files_exist_and_are_small():
    paths = sample_paths()
    assert set(paths) == {"image", "lesions", "liver", "expressions", "attribution"}
    assert sum(p.stat().st_size for p in paths.values()) < 2 * 1024 * 1024
    attribution = paths["attribution"].read_text()
    assert "Apache License, Version 2.0" in attribution and "TotalSegmentator" in attribution
    assert "not manual ground truth" in attribution


def test_sample_keeps_the_source_orientation(sample):
    image = sample.image
    assert image.array.shape == (30, 101, 122)
    assert image.spacing == pytest.approx((3.0, 3.0, 3.0))
    # RAS NIfTI as written by TotalSegmentator: x and y axes point to the patient's right and anterior.
    assert np.diag(image.direction_matrix) == pytest.approx((-1.0, -1.0, 1.0))
    assert sample.lesions.shape == sample.liver.shape == image.array.shape


def test_sample_lesions_lie_in_the_liver_and_have_their_appearance(sample):
    from lsms_core.data.expressions import lesion_attributes

    ids = [int(i) for i in np.unique(sample.lesions) if i]
    assert ids == [1, 2, 3]
    assert sample.liver[sample.lesions > 0].all()
    canon = lambda a: to_canonical(sample.image.with_array(a)).array  # noqa: E731
    hu = canon(sample.image.array)
    attrs = lesion_attributes(
        hu, canon(sample.lesions), canon(sample.liver), to_canonical(sample.image).scale
    )
    assert [a.side for a in attrs] == ["right", "left", "right"]  # one lesion in each lobe
    assert [a.attenuation for a in attrs] == ["hypodense", "hyperdense", "hypodense"]
    # The CT is the real example_ct_sm outside the lesions: liver around 45 HU, air and bone present.
    assert 30 < np.median(sample.image.array[(sample.liver > 0) & (sample.lesions == 0)]) < 60
    assert sample.image.array.min() < -900 and sample.image.array.max() > 500


def test_sample_expressions_refer_to_existing_lesions(sample):
    ids = {int(i) for i in np.unique(sample.lesions) if i}
    assert len(sample.expressions) >= 5
    texts = [r["expression"] for r in sample.expressions]
    assert len(set(texts)) == len(texts)
    for record in sample.expressions:
        assert record["case"] == SAMPLE_CASE_ID
        assert set(record["targets"]) <= ids
        assert record["expression"].strip()
    assert any(r["targets"] == [] for r in sample.expressions)  # negatives
    assert {i for r in sample.expressions for i in r["targets"]} == ids  # every lesion is referred to


def test_sample_dataset_opens(tmp_path, sample):
    from lsms_core.data.dataset import ReferringDataset

    ds = ReferringDataset(sample_dataset(tmp_path / "sample_ds"))
    assert ds.cases == [SAMPLE_CASE_ID] and ds.split("train") == [SAMPLE_CASE_ID]
    case = ds.load_case(SAMPLE_CASE_ID, canonical=False)
    np.testing.assert_array_equal(case.lesions, sample.lesions)
    record = next(r for r in ds.expressions() if r["targets"] == [2])
    np.testing.assert_array_equal(ds.target_mask(record, case), (sample.lesions == 2).astype(np.uint8))


@needs_totalseg
def test_build_sample_reproduces_the_committed_files(tmp_path):
    built = build_sample(tmp_path, reference_dir=_reference_dir())
    committed = sample_paths()
    for key in ("image", "lesions", "liver"):
        np.testing.assert_array_equal(read_volume(built[key]).array, read_volume(committed[key]).array)
    assert built["expressions"].read_text() == committed["expressions"].read_text()
