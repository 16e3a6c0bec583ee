"""Tests of the synthetic benchmark: phantoms, lesion insertion, determinism, dataset output."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _datasets import totalseg_reference_dir as _reference_dir
from scipy import ndimage

from lsms_core.data import synth
from lsms_core.data.phantom import abdominal_phantom, correlated_noise
from lsms_core.data.synth import LiverTexture, insert_lesion, synthesize

SPACING = (3.0, 1.5, 1.5)
LIVER_HU = 55.0


needs_totalseg = pytest.mark.skipif(
    _reference_dir() is None, reason="TotalSegmentator reference files not available"
)


def _block_liver(noise_std: float = 0.0, seed: int = 0):
    """A box-shaped 'liver' of constant HU (plus optional noise) inside soft tissue."""
    shape = (24, 64, 64)
    hu = np.full(shape, 30.0, dtype=np.float32)
    liver = np.zeros(shape, dtype=np.uint8)
    liver[2:-2, 4:-4, 4:-4] = 1
    hu[liver > 0] = LIVER_HU
    if noise_std:
        hu += noise_std * correlated_noise(np.random.default_rng(seed), shape, (0.4, 1.0, 1.0))
    return hu, liver


QUIET = LiverTexture(mean=LIVER_HU, noise_std=1.0, noise_sigma_vox=(0.0, 0.0, 0.0))


# --------------------------------------------------------------------------------------------------
# Phantom
# --------------------------------------------------------------------------------------------------


def test_phantom_liver_on_patient_right_with_plausible_hu():
    hu, liver = abdominal_phantom(np.random.default_rng(3), (20, 128, 160), (4.0, 2.5, 2.5))
    assert hu.shape == liver.shape == (20, 128, 160)
    assert liver.dtype == np.uint8 and liver.sum() > 1000
    x_centroid = np.argwhere(liver)[:, 2].mean()
    assert x_centroid < 160 / 2 - 10  # canonical: small x = the patient's right
    assert hu[:, 0, 0].mean() < -900  # air outside the body
    assert 30 < np.median(hu[liver > 0]) < 90
    # The liver dome is superior: the top half of the stack holds more liver than the bottom half.
    per_slice = liver.sum(axis=(1, 2))
    assert per_slice[10:].sum() > per_slice[:10].sum()
    assert (hu > 500).any()  # bone (spine)


def test_phantom_rejects_bad_shape():
    with pytest.raises(ValueError, match="shape"):
        abdominal_phantom(np.random.default_rng(0), (10, 10), (1.0, 1.0, 1.0))


def test_correlated_noise_has_unit_std_and_correlation():
    noise = correlated_noise(np.random.default_rng(0), (8, 64, 64), (0.0, 1.5, 1.5))
    assert abs(noise.std() - 1.0) < 0.1
    lag1 = np.corrcoef(noise[:, :, :-1].ravel(), noise[:, :, 1:].ravel())[0, 1]
    assert lag1 == pytest.approx(np.exp(-1 / (4 * 1.5**2)), abs=0.08)
    lag_z = np.corrcoef(noise[:-1].ravel(), noise[1:].ravel())[0, 1]
    assert abs(lag_z) < 0.1


# --------------------------------------------------------------------------------------------------
# Lesion insertion
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", synth.LESION_KINDS)
def test_insert_lesion_stays_in_liver_with_right_intensity(kind):
    hu, liver = _block_liver()
    before = hu.copy()
    lesions = np.zeros(hu.shape, dtype=np.uint8)
    inserted = insert_lesion(hu, liver, lesions, kind, 30.0, SPACING, np.random.default_rng(1), texture=QUIET)
    assert inserted is not None and inserted.id == 1 and inserted.kind == kind
    label = lesions == 1
    assert label.sum() > 100
    assert liver[label].all()
    changed = np.abs(hu - before) > 1e-3
    assert changed.any() and liver[changed].all()  # partial volume included, nothing leaks out
    mean = hu[label].mean()
    if kind == "cyst":
        assert -5 < mean < LIVER_HU - 25  # near water, hypodense
    elif kind == "hypervascular":
        assert mean > LIVER_HU + 20
    else:
        assert mean < LIVER_HU - 10


def test_metastasis_rim_brighter_than_centre():
    hu, liver = _block_liver()
    lesions = np.zeros(hu.shape, dtype=np.uint8)
    inserted = insert_lesion(
        hu, liver, lesions, "metastasis", 40.0, SPACING, np.random.default_rng(5), texture=QUIET
    )
    assert inserted is not None
    label = lesions == 1
    depth = ndimage.distance_transform_edt(label, sampling=SPACING)
    core = depth > 0.6 * depth.max()
    shell = label & (depth <= 3.0)
    assert hu[shell].mean() > hu[core].mean() + 25
    assert inserted.hu["rim"] > LIVER_HU > inserted.hu["centre"]


def test_cyst_edges_are_soft_partial_volume():
    hu, liver = _block_liver()
    lesions = np.zeros(hu.shape, dtype=np.uint8)
    inserted = insert_lesion(
        hu, liver, lesions, "cyst", 30.0, SPACING, np.random.default_rng(2), texture=QUIET
    )
    value = inserted.hu["value"]
    border = ndimage.binary_dilation(lesions > 0) & ~ndimage.binary_erosion(lesions > 0)
    intermediate = border & (hu > value + 8) & (hu < LIVER_HU - 8)
    assert intermediate.sum() > 20  # blended voxels between cyst and liver, not a hard step


def test_lesions_do_not_overlap_and_respect_region():
    hu, liver = _block_liver(noise_std=10.0)
    lesions = np.zeros(hu.shape, dtype=np.uint8)
    rng = np.random.default_rng(0)
    right = liver.astype(bool) & (np.arange(hu.shape[2])[None, None, :] < 28)
    for n in range(3):
        lesion = insert_lesion(hu, liver, lesions, "hypervascular", 12.0, SPACING, rng, region=right)
        assert lesion is not None and lesion.id == n + 1
        assert lesion.center_zyx[2] < 28.5
    ids = [int(i) for i in np.unique(lesions) if i]
    assert ids == [1, 2, 3]
    for i in ids:  # separate components: at least one voxel of liver between lesions
        others = ndimage.binary_dilation((lesions > 0) & (lesions != i))
        assert not (others & (lesions == i)).any()


def test_liver_texture_measures_noise_and_correlation():
    hu, liver = _block_liver(noise_std=12.0, seed=4)
    texture = synth.liver_texture(hu, liver)
    assert texture.mean == pytest.approx(LIVER_HU, abs=2)
    assert texture.noise_std == pytest.approx(12.0 * 0.85, rel=0.25)  # the 3-voxel trend removes a little
    assert texture.noise_sigma_vox[2] > 0.5 and texture.noise_sigma_vox[0] < texture.noise_sigma_vox[2]


def test_insert_lesion_rejects_unknown_kind():
    hu, liver = _block_liver()
    with pytest.raises(ValueError, match="kind"):
        insert_lesion(
            hu, liver, np.zeros(hu.shape, np.uint8), "hemangioma", 20.0, SPACING, np.random.default_rng(0)
        )


# --------------------------------------------------------------------------------------------------
# synthesize
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_dataset(tmp_path_factory):
    return synthesize(
        tmp_path_factory.mktemp("synth") / "ds", cases=3, seed=1, phantom_fraction=1.0, max_inplane=128
    )


def test_synthesize_phantoms_gives_a_readable_dataset(phantom_dataset):
    from lsms_core.data.dataset import ReferringDataset

    ds = ReferringDataset(phantom_dataset)
    assert ds.cases == ["synth_000", "synth_001", "synth_002"]
    assert all(len(ds.split(s)) == 1 for s in ("train", "val", "test"))
    meta = json.loads((phantom_dataset / "dataset.json").read_text())
    prov = meta["provenance"]
    assert prov["seed"] == 1 and prov["generator_version"] == synth.GENERATOR_VERSION
    assert set(prov["case_details"]) == set(ds.cases)
    records = ds.expressions()
    assert records and all(r["case"] in ds.cases for r in records)
    for case_id in ds.cases:
        case = ds.load_case(case_id, canonical=True)
        assert case.image.scale == pytest.approx(synth.GRID_SPACING_ZYX)
        assert max(case.image.array.shape[1:]) <= 128
        ids = {int(i) for i in np.unique(case.lesions) if i}
        assert ids == set(range(1, len(ids) + 1))
        assert case.organ[case.lesions > 0].all()  # lesions inside the liver
        details = prov["case_details"][case_id]["lesions"]
        assert [d["id"] for d in details] == sorted(ids)
        for record in ds.expressions():
            if record["case"] == case_id:
                assert set(record["targets"]) <= ids
        for d in details:  # appearance told to the expressions: "cyst" only for cysts
            for record in records:
                if (
                    record["case"] == case_id
                    and record["targets"] == [d["id"]]
                    and "cyst" in record["expression"]
                ):
                    assert d["kind"] == "cyst"


def test_synthesize_is_deterministic(phantom_dataset, tmp_path):
    from lsms_core.data.dataset import ReferringDataset

    again = ReferringDataset(
        synthesize(tmp_path / "again", cases=3, seed=1, phantom_fraction=1.0, max_inplane=128)
    )
    first = ReferringDataset(phantom_dataset)
    assert again.expressions() == first.expressions()
    assert {s: again.split(s) for s in ("train", "val", "test")} == {
        s: first.split(s) for s in ("train", "val", "test")
    }
    for case_id in first.cases:
        a, b = first.load_case(case_id), again.load_case(case_id)
        np.testing.assert_array_equal(a.image.array, b.image.array)
        np.testing.assert_array_equal(a.lesions, b.lesions)
        np.testing.assert_array_equal(a.organ, b.organ)


def test_case_plan_has_negatives_and_positives():
    plan = synth._case_plan(20, seed=0, phantom_fraction=0.25)
    assert sum(name == "phantom" for name, _ in plan) == 5
    counts = [c for _, c in plan]
    assert 0 in counts and max(counts) >= 1 and max(counts) <= 4
    assert {name for name, _ in plan} - {"phantom"} == {s.name for s in synth.SOURCES}


def test_synthesize_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="cases"):
        synthesize(tmp_path / "a", cases=0)
    with pytest.raises(ValueError, match="phantom_fraction"):
        synthesize(tmp_path / "b", cases=2, phantom_fraction=1.5)


def test_fetch_reports_pip_failure(tmp_path, monkeypatch, capsys):
    import subprocess

    monkeypatch.delenv("LSMS_TOTALSEG_DIR", raising=False)

    def failing_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "totalsegmentator==2.18.0" in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(synth.subprocess, "run", failing_run)
    with pytest.raises(ConnectionError, match="(?s)No matching distribution.*LSMS_TOTALSEG_DIR"):
        synth.fetch_totalsegmentator(tmp_path)

    # the CLI turns it into one line and exit code 2 that names the offline way out, not a traceback
    from lsms_core.cli import main

    out = tmp_path / "synth"
    assert main(["data", "synth", str(out), "--cases", "2", "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lsms data synth: error: could not download") and "--phantom-fraction 1.0" in err
    assert "Traceback" not in err and not out.exists()


def test_fetch_rejects_a_wrong_override(tmp_path, monkeypatch):
    monkeypatch.setenv("LSMS_TOTALSEG_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="LSMS_TOTALSEG_DIR"):
        synth.fetch_totalsegmentator()


# --------------------------------------------------------------------------------------------------
# Real anatomy (TotalSegmentator reference files; skipped when absent)
# --------------------------------------------------------------------------------------------------


@needs_totalseg
def test_dicom_anatomy_liver_mask_is_aligned():
    source = next(s for s in synth.SOURCES if s.name == "example_ct_dicom")
    anatomy = synth.load_anatomy(_reference_dir(), source)
    liver_hu = anatomy.hu[anatomy.liver > 0]
    # A misaligned (e.g. y-flipped) mask would mix air, fat and bone: mean far off, huge spread.
    assert 40 < np.median(liver_hu) < 150 and liver_hu.std() < 60
    assert np.argwhere(anatomy.liver)[:, 2].mean() < anatomy.hu.shape[2] / 2  # patient's right


@needs_totalseg
def test_synthesize_real_anatomy(tmp_path, monkeypatch):
    from lsms_core.data.dataset import ReferringDataset

    monkeypatch.setenv("LSMS_TOTALSEG_DIR", str(_reference_dir().parents[1]))
    root = synthesize(tmp_path / "real", cases=3, seed=0, phantom_fraction=0.0, max_inplane=192)
    ds = ReferringDataset(root)
    prov = json.loads((root / "dataset.json").read_text())["provenance"]
    assert prov["anatomy_source"]["license"] == "Apache-2.0"
    assert "not manual" in prov["anatomy_source"]["liver_masks"]
    assert {d["anatomy"] for d in prov["case_details"].values()} == {s.name for s in synth.SOURCES}
    for case_id in ds.cases:
        case = ds.load_case(case_id, canonical=True)
        assert not prov["case_details"][case_id]["variation"]["left_right_flip"]
        # Liver on the patient's right of the spine (the largest bone blob of the liver's main slice).
        z = int(np.argmax(case.organ.sum(axis=(1, 2))))
        bone, n = ndimage.label(case.image.array[z] > 200)
        spine = bone == 1 + int(np.argmax(ndimage.sum(bone > 0, bone, np.arange(1, n + 1))))
        assert np.argwhere(case.organ[z])[:, 1].mean() < np.argwhere(spine)[:, 1].mean() - 20
        assert 20 < np.median(case.image.array[(case.organ > 0) & (case.lesions == 0)]) < 150
        assert case.organ[case.lesions > 0].all()
