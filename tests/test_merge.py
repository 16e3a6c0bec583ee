"""Tests for lsms_core.data.merge.merge_datasets."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from lsms_core.data.dataset import DatasetWriter, ReferringDataset
from lsms_core.data.merge import merge_datasets
from lsms_core.io import write_volume
from tests.test_dataset import build, make_case

EXPRESSIONS = [("the largest lesion", [1]), ("both lesions", [1, 2]), ("the calcified lesion", [])]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("merge")
    build(base / "bench", n_cases=4)
    extra = DatasetWriter(base / "extra", name="extra", license="CC0-1.0")
    for i in range(3):  # the same case ids as bench, other images: the merge must keep both
        image, lesions, organ = make_case(10 + i)
        extra.add_case(f"case_{i:02d}", image.with_array(image.array + 7), lesions, organ)
        extra.add_expressions(
            [{"case": f"case_{i:02d}", "expression": e, "targets": t} for e, t in EXPRESSIONS]
        )
    extra.make_splits(seed=1)
    corrections = base / "corr"
    writer = DatasetWriter(corrections, name="corrections", license="CC-BY-4.0")
    image, lesions, organ = make_case(5, "PIR")
    writer.add_case("case_00", image, lesions, organ)
    drawn = (lesions == 2).astype(np.uint8)
    write_volume(corrections / "cases" / "case_00" / "masks" / "m1.nii.gz", drawn, like=image)
    write_volume(corrections / "loose.nii.gz", drawn, like=image)  # a mask outside its case folder
    writer.add_expressions(
        [
            {"case": "case_00", "expression": "the one I drew", "mask": "cases/case_00/masks/m1.nii.gz"},
            {"id": "x", "case": "case_00", "expression": "the loose one", "mask": "loose.nii.gz"},
        ]
    )
    return base


def test_merge_keeps_the_first_sources_ids_and_splits_and_trains_on_the_rest(sources, tmp_path):
    bench = ReferringDataset(sources / "bench")
    out = merge_datasets(
        tmp_path / "merged",
        [sources / "bench", sources / "extra", sources / "corr"],
        train_only=[sources / "extra", sources / "corr"],
    )
    merged = ReferringDataset(out)
    merged.check()
    assert len(merged.cases) == 4 + 3 + 1
    for split in ("val", "test"):  # the benchmark's evaluation splits are unchanged
        assert merged.split(split) == bench.split(split)
    assert sorted(merged.split("train")) == sorted(
        bench.split("train") + [f"extra-case_{i:02d}" for i in range(3)] + ["corr-case_00"]
    )
    assert len(merged.expressions()) == len(bench.expressions()) + 9 + 2
    for record in bench.expressions():  # first source: ids and content as they were
        (same,) = [r for r in merged.expressions() if r["id"] == record["id"]]
        assert same == record
    # The prefixed copy of a colliding case is the extra source's case, not the benchmark's.
    extra = ReferringDataset(sources / "extra")
    bench_image = merged.load_case("case_00").image.array
    for name in ("case_00", "case_02"):
        image = merged.load_case(f"extra-{name}").image.array
        np.testing.assert_array_equal(image, extra.load_case(name).image.array)
        assert not np.array_equal(image, bench_image)
    # Mask records point at their copied masks, inside or outside the case folder before.
    corr = ReferringDataset(sources / "corr")
    for record in corr.expressions():
        (copy,) = [r for r in merged.expressions() if r["id"] == "corr-" + record["id"]]
        assert copy["mask"].startswith("cases/corr-case_00/")
        np.testing.assert_array_equal(
            merged.target_mask(copy, merged.load_case("corr-case_00")),
            corr.target_mask(record, corr.load_case("case_00")),
        )
    provenance = merged.meta["provenance"]["merged_from"]
    assert [p["case_prefix"] for p in provenance] == ["", "extra-", "corr-"]
    assert provenance[0]["fingerprint"] == bench.fingerprint()
    assert merged.meta["license"] == "CC0-1.0; CC-BY-4.0"


def test_merge_without_train_only_keeps_each_sources_splits(sources, tmp_path):
    merged = ReferringDataset(merge_datasets(tmp_path / "m", [sources / "bench", sources / "extra"]))
    extra = ReferringDataset(sources / "extra")
    assert sorted(merged.split("test")) == sorted(
        ReferringDataset(sources / "bench").split("test") + ["extra-" + c for c in extra.split("test")]
    )


def test_merge_refuses_bad_requests_before_writing(sources, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="at least two"):
        merge_datasets(out, [sources / "bench"])
    with pytest.raises(ValueError, match="twice"):
        merge_datasets(out, [sources / "bench", sources / "bench"])
    with pytest.raises(ValueError, match="not sources"):
        merge_datasets(out, [sources / "bench", sources / "extra"], train_only=[sources / "corr"])
    with pytest.raises(ValueError, match="no splits.json"):
        merge_datasets(out, [sources / "bench", sources / "corr"])
    (tmp_path / "other").mkdir()
    same_name = tmp_path / "other" / "extra"
    shutil.copytree(sources / "extra", same_name)
    with pytest.raises(ValueError, match="would come from both"):
        merge_datasets(out, [sources / "bench", sources / "extra", same_name])
    with pytest.raises(FileNotFoundError, match="not an LSMS dataset"):
        merge_datasets(out, [sources / "bench", tmp_path])
    existing = tmp_path / "full"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        merge_datasets(existing, [sources / "bench", sources / "extra"])
    assert not out.exists() and (existing / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "other"]  # nothing half-written


def test_an_interrupted_merge_leaves_no_folder(sources, tmp_path, monkeypatch):
    import lsms_core.data.merge as merge

    calls = []
    link_or_copy = merge._link_or_copy

    def failing_link(src, dst):
        calls.append(dst)
        if len(calls) > 5:
            raise KeyboardInterrupt  # e.g. Ctrl-C halfway through the copy
        link_or_copy(src, dst)

    monkeypatch.setattr(merge, "_link_or_copy", failing_link)
    with pytest.raises(KeyboardInterrupt):
        merge_datasets(tmp_path / "half", [sources / "bench", sources / "extra"])
    assert list(tmp_path.iterdir()) == []


def test_lsms_data_merge_command(sources, tmp_path, capsys):
    from lsms_core.cli import main

    out = tmp_path / "both"
    argv = ["data", "merge", str(out), str(sources / "bench"), str(sources / "extra")]
    assert main([*argv, "--train-only", str(sources / "extra")]) == 0
    merged = ReferringDataset(out)
    assert len(merged.split("train")) == len(ReferringDataset(sources / "bench").split("train")) + 3
    assert f"dataset: {out} (7 cases" in capsys.readouterr().out
    assert main(argv) == 2  # the folder now holds a dataset: one clear message, no traceback
    assert "already exists" in capsys.readouterr().err


def test_merged_datasets_keep_each_sources_lesion_types(tmp_path):
    """``ReferringDataset.lesion_kinds`` reads the types ``lsms data synth`` records, also through a
    merge (under the source's case prefix), so the appearance head and the attribute checks see them."""
    from tests._datasets import make_tiny_dataset

    typed = make_tiny_dataset(tmp_path / "typed", cases=3, lesion_types=True)
    untyped = make_tiny_dataset(tmp_path / "untyped", cases=3, seed=1)
    merged = ReferringDataset(merge_datasets(tmp_path / "merged", [untyped, typed], train_only=[typed]))
    prefix = merged.meta["provenance"]["merged_from"][1]["case_prefix"]
    assert prefix and merged.lesion_kinds(prefix + "case01") == {1: "cyst", 2: "hypervascular"}
    assert merged.lesion_kinds("case01") == {}  # the untyped source's own case
    assert merged.lesion_attributes(prefix + "case01")[1].appearance == "cyst"
