"""Tiny referring-segmentation datasets for training/evaluation tests, written with DatasetWriter.

Each case is an ``8 x 48 x 48`` CT (HU) with a bright "liver" box, a dark (hypodense) blob on one
side and a bright (hyperdense) blob on the other, so the text decides which blob is the target.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SHAPE = (8, 48, 48)  # (z, y, x)


def _case_arrays(rng: np.random.Generator, dark_left: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU image, lesion instance map (1 = dark blob, 2 = bright blob) and liver mask."""
    z, y, x = np.indices(SHAPE)
    hu = rng.normal(-60.0, 10.0, SHAPE).astype(np.float32)  # soft tissue with noise
    liver = (y >= 8) & (y < 40) & (x >= 4) & (x < 44) & (z >= 1) & (z < 7)
    hu[liver] = rng.normal(60.0, 8.0, int(liver.sum()))
    lesions = np.zeros(SHAPE, np.uint8)
    # canonical x grows toward the patient's left: small x = patient right
    left_x, right_x = 34, 14
    centres = {1: (4, 24, left_x if dark_left else right_x), 2: (3, 22, right_x if dark_left else left_x)}
    for lesion_id, (cz, cy, cx) in centres.items():
        r = int(rng.integers(4, 7))
        blob = ((y - cy) ** 2 + (x - cx) ** 2 <= r * r) & (np.abs(z - cz) <= 1)
        lesions[blob] = lesion_id
        hu[blob] = -10.0 if lesion_id == 1 else 200.0
    return hu, lesions, liver.astype(np.uint8)


def make_tiny_dataset(
    root, cases: int = 4, seed: int = 0, splits: dict | None = None, lesion_types: bool = False
) -> Path:
    """Write a tiny dataset of ``cases`` cases to ``root`` and return ``root``.

    Every case has three expressions: the dark lesion (kind "attenuation"), the bright lesion
    (kind "attenuation") and one negative ("the cyst in the dome", kind "negative").
    Default splits: all but the last two cases train, then one val case and one test case.
    ``lesion_types`` records, as ``lsms data synth`` does, the dark lesion as a "cyst" and the
    bright one as "hypervascular" (``provenance.case_details``).
    """
    from lsms_core.data.dataset import DatasetWriter
    from lsms_core.io import Volume

    rng = np.random.default_rng(seed)
    details = {
        f"case{i:02d}": {"lesions": [{"id": 1, "kind": "cyst"}, {"id": 2, "kind": "hypervascular"}]}
        for i in range(cases)
    }
    writer = DatasetWriter(
        root,
        name="tiny-test",
        description="tiny synthetic test data",
        license="CC0",
        provenance={"case_details": details} if lesion_types else None,
    )
    records = []
    for i in range(cases):
        case_id = f"case{i:02d}"
        hu, lesions, liver = _case_arrays(rng, dark_left=i % 2 == 0)
        writer.add_case(case_id, Volume(hu, spacing=(1.0, 1.0, 3.0)), lesions, liver)
        records += [
            {"case": case_id, "expression": "the hypodense lesion", "targets": [1], "kind": "attenuation"},
            {"case": case_id, "expression": "the hyperdense lesion", "targets": [2], "kind": "attenuation"},
            {"case": case_id, "expression": "the cyst near the dome", "targets": [], "kind": "negative"},
        ]
    writer.add_expressions(records)
    ids = writer.cases
    if splits is None:
        splits = {"train": ids[:-2], "val": ids[-2:-1], "test": ids[-1:]} if len(ids) >= 3 else {"train": ids}
    writer.write_splits(splits)
    return Path(root)


def totalseg_reference_dir() -> Path | None:
    """TotalSegmentator 2.18.0 ``tests/reference_files`` from ``$LSMS_TOTALSEG_DIR`` or the cache that
    ``lsms_core.data.synth.fetch_totalsegmentator`` fills (``.ci/install`` fills it), else None.
    Never downloads: tests that need the real CTs are skipped without them."""
    candidates = []
    if os.environ.get("LSMS_TOTALSEG_DIR"):
        candidates.append(Path(os.environ["LSMS_TOTALSEG_DIR"]))
    cache = Path(os.environ.get("LSMS_CACHE", Path.home() / ".cache" / "lsms"))
    candidates.append(cache / "totalsegmentator-2.18.0")
    for root in candidates:
        reference = root / "tests" / "reference_files"
        if (reference / "example_ct_sm.nii.gz").exists():
            return reference
    return None
