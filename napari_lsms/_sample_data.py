"""npe2 sample data: the offline abdominal CT with inserted liver lesions (``lsms_core.data.sample``).

The CT is derived from TotalSegmentator's ``example_ct_sm.nii.gz`` (Apache-2.0); see
``lsms_core/data/sample/ATTRIBUTION.md``.
"""

from __future__ import annotations

from napari_lsms._reader import EXPRESSIONS_KEY, LayerData, ct_image_kwargs, spatial_kwargs

SAMPLE_IMAGE_NAME = "sample CT"
SAMPLE_LABELS_NAME = "sample lesions (truth)"


def sample_ct() -> list[LayerData]:
    """The sample CT (Image layer, HU, abdomen window) and its lesion labels (Labels layer).

    The image's metadata also carries the sample's referring expressions, which the segment
    widget offers as suggestions.
    """
    from lsms_core.data.sample import load_sample

    case = load_sample()
    image_kwargs = ct_image_kwargs(case.image, name=SAMPLE_IMAGE_NAME)
    image_kwargs["metadata"][EXPRESSIONS_KEY] = sample_expressions(case.expressions)
    labels_kwargs = spatial_kwargs(case.image)
    labels_kwargs.update(name=SAMPLE_LABELS_NAME, opacity=0.4)
    return [(case.image.array, image_kwargs, "image"), (case.lesions, labels_kwargs, "labels")]


def sample_expressions(records) -> list[str]:
    """The distinct expression texts of the sample, in file order (records may be dicts or strings)."""
    texts: list[str] = []
    for record in records:
        text = record.get("expression") if isinstance(record, dict) else getattr(record, "expression", record)
        if isinstance(text, str) and text.strip() and text not in texts:
            texts.append(text)
    return texts
