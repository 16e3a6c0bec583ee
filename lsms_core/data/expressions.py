"""Lesion attributes and referring-expression generation.

Two steps turn a labelled CT into training text:

1. :func:`lesion_attributes` measures every lesion of an instance map (size, attenuation, location in
   the liver) on arrays in the **canonical orientation** (``lsms_core.io.to_canonical``: array x grows
   toward the patient's left, y toward posterior, z toward superior).
2. :func:`generate_expressions` writes referring expressions for them. Every expression is first
   built as a structured :class:`Query` (attribute filters plus a selector such as "the single one",
   "the largest", "both", "all") and **evaluated against the case's lesions** with :func:`resolve`;
   only expressions whose referent set is exactly the intended target set (and whose grammatical
   number fits it) are kept. The query is then realised as text with varied phrasing.

Helpers used elsewhere: :func:`expression_number` (singular or plural; the volume ``Segmenter`` keeps
one 3D component for singular text) and :func:`swap_left_right` (for flip augmentations).

The anatomy is approximate and documented next to each constant: lobes and Couinaud segments come
from geometric rules on the liver's bounding box, not from vessel landmarks.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: Size classes by longest axial diameter: small < 20 mm <= medium < 50 mm <= large.
SMALL_MAX_MM = 20.0
MEDIUM_MAX_MM = 50.0
#: A lesion whose mean HU is within +-15 HU of the liver parenchyma is isodense; below: hypodense,
#: above: hyperdense.
ISODENSE_TOLERANCE_HU = 15.0
#: Without a liver mask, the reference parenchyma is the shell of tissue within 5 mm around the lesions.
REFERENCE_SHELL_MM = 5.0
#: Subcapsular: some lesion voxel lies within 10 mm of the liver surface.
SUBCAPSULAR_MM = 10.0
#: "Near the dome": the lesion centroid lies in the top 15 % of the liver's superior-inferior extent.
DOME_FRACTION = 0.15
#: Approximate Cantlie line (right/left lobe boundary): a sagittal plane at 60 % of the liver's
#: left-right extent measured from its patient-right edge, i.e. the bounding-box x-centre shifted by
#: 10 % toward the patient's left (the right lobe holds roughly 60 % of the liver). Without a liver
#: mask the split is the plain x-centre of the lesions' own bounding box.
CANTLIE_FRACTION = 0.6
#: Couinaud approximation (left lobe): the medial 40 % of the left lobe's width next to the Cantlie
#: line is segment 4, the lateral rest is segment 2 (upper half) or 3 (lower half).
SEGMENT4_FRACTION = 0.4
#: Couinaud approximation: the caudate lobe (segment 1) is the posterior 30 % of the liver within 10 %
#: of its width on either side of the Cantlie line, in the middle 60 % of its height.
CAUDATE_POSTERIOR_FRACTION = 0.3
CAUDATE_HALF_WIDTH_FRACTION = 0.1
CAUDATE_HEIGHT_FRACTION = 0.6
#: Size in whole centimetres is only spoken for lesions of at least 8 mm.
MIN_CM_DIAMETER_MM = 8.0

KINDS = ("location", "size", "attenuation", "rank", "count", "combined", "all", "negative")

_FILTER_KEYS = (
    "side",
    "vertical",
    "ap",
    "segment",
    "subcapsular",
    "dome",
    "size_class",
    "diameter_cm",
    "attenuation",
    "appearance",
)
_FAMILY = {
    "side": "location",
    "vertical": "location",
    "ap": "location",
    "segment": "location",
    "subcapsular": "location",
    "dome": "location",
    "size_class": "size",
    "diameter_cm": "size",
    "attenuation": "attenuation",
    "appearance": None,  # a type word ("cyst"): refines the noun, not an attribute family of its own
}
#: Filter pairs never combined in one query (redundant or clumsy together).
_CONFLICTS = {
    frozenset(("segment", "side")),
    frozenset(("segment", "vertical")),
    frozenset(("segment", "ap")),
    frozenset(("dome", "vertical")),
    frozenset(("size_class", "diameter_cm")),
}
_MAX_LOCATION_FILTERS = 2
_SELECTORS = ("the", "largest", "smallest", "both", "count", "all")
_SINGULAR_SELECTORS = ("the", "largest", "smallest")


# --------------------------------------------------------------------------------------------------
# Attributes
# --------------------------------------------------------------------------------------------------


@dataclass
class LesionAttributes:
    """Measured attributes of one lesion (canonical orientation; ``None`` = not measurable).

    Attributes:
        id: the lesion's label in the instance map.
        voxels: number of voxels.
        volume_ml: volume in millilitres.
        diameter_mm: longest axial diameter (max Feret diameter in the axial slice of largest area).
        size_class: "small" (< 20 mm), "medium" (< 50 mm) or "large".
        mean_hu: mean intensity in HU.
        relative_hu: ``mean_hu`` minus the mean of the reference parenchyma (liver without lesions).
        attenuation: "hypodense", "isodense" or "hyperdense" (+-``ISODENSE_TOLERANCE_HU``).
        side: "right" or "left" lobe (patient side, approximate Cantlie line).
        vertical: "superior" or "inferior" half of the liver.
        ap: "anterior" or "posterior" half of the liver.
        segment: approximate Couinaud segment 1-8 (needs a liver mask).
        subcapsular: within ``SUBCAPSULAR_MM`` of the liver surface (needs a liver mask).
        dome: centroid in the top ``DOME_FRACTION`` of the liver (needs a liver mask).
        rank: 1 = largest lesion of the case (by volume).
        count: number of lesions in the case.
        centroid_zyx: centroid in voxel indices (z, y, x).
        appearance: optional type ("cyst", "metastasis", "hypervascular", ...) given by the caller.
    """

    id: int
    voxels: int
    volume_ml: float
    diameter_mm: float
    size_class: str
    mean_hu: float
    relative_hu: float | None
    attenuation: str | None
    side: str
    vertical: str
    ap: str
    segment: int | None
    subcapsular: bool | None
    dome: bool | None
    rank: int = 0
    count: int = 0
    centroid_zyx: tuple[float, float, float] = (0.0, 0.0, 0.0)
    appearance: str | None = None

    @property
    def diameter_cm(self) -> int | None:
        """Longest axial diameter rounded to whole centimetres (``None`` below 8 mm)."""
        if self.diameter_mm < MIN_CM_DIAMETER_MM:
            return None
        return int(math.floor(self.diameter_mm / 10.0 + 0.5))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (plain Python numbers)."""
        return asdict(self)


def size_class(diameter_mm: float) -> str:
    """Size class of a longest diameter: small < ``SMALL_MAX_MM`` <= medium < ``MEDIUM_MAX_MM`` <= large."""
    if diameter_mm < SMALL_MAX_MM:
        return "small"
    return "medium" if diameter_mm < MEDIUM_MAX_MM else "large"


def lesion_attributes(
    hu: np.ndarray,
    lesions: np.ndarray,
    organ: np.ndarray | None,
    spacing_zyx: Sequence[float],
    *,
    appearance: Mapping[int, str] | None = None,
) -> list[LesionAttributes]:
    """Measure every lesion of an instance map (arrays in canonical orientation).

    Args:
        hu: CT in Hounsfield units, shape ``(z, y, x)``.
        lesions: integer instance map (0 background, 1..N lesion ids), same shape.
        organ: liver mask (non-zero = liver), same shape, or ``None``. Lesions count as liver whether
            or not the mask includes them. Without it, the lobe and halves are taken relative to the
            lesions' own bounding box (or the image for a single lesion), attenuation relative to a
            ``REFERENCE_SHELL_MM`` shell around the lesions, and segment / subcapsular / dome are
            ``None``.
        spacing_zyx: voxel size in mm, ``(z, y, x)`` order (``Volume.scale``).
        appearance: optional lesion type per id, e.g. ``{2: "cyst"}``; enables type words in text.

    Returns:
        one :class:`LesionAttributes` per lesion id, sorted by id.
    """
    from scipy import ndimage

    hu = np.asarray(hu)
    lesions = np.asarray(lesions)
    if hu.ndim != 3:
        raise ValueError(f"hu must be a 3D (z, y, x) array, got shape {hu.shape}")
    if lesions.shape != hu.shape:
        raise ValueError(
            f"lesions shape {lesions.shape} does not match hu shape {hu.shape}; pass arrays on one grid"
        )
    if lesions.dtype.kind not in "iub":
        raise ValueError(
            f"lesions must be an integer instance map (0 background, 1..N ids), got dtype {lesions.dtype}"
        )
    if organ is not None and np.shape(organ) != hu.shape:
        raise ValueError(
            f"organ shape {np.shape(organ)} does not match hu shape {hu.shape}; pass arrays on one grid"
        )
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    if spacing.shape != (3,) or not (spacing > 0).all():
        raise ValueError(f"spacing_zyx must be three positive voxel sizes in mm (z, y, x), got {spacing_zyx}")
    appearance = dict(appearance or {})

    lesions = lesions.astype(np.int64, copy=False)
    ids = [int(i) for i in np.unique(lesions) if i > 0]
    unknown = sorted(set(appearance) - set(ids))
    if unknown:
        raise ValueError(
            f"appearance names lesion ids {unknown} that are not in the instance map (ids {ids})"
        )
    if not ids:
        return []
    full_shape = np.asarray(hu.shape, dtype=np.float64)
    liver = None if organ is None else (np.asarray(organ) > 0) | (lesions > 0)
    # Work on the box around the liver (or lesions) plus a margin: every measure is local to it, and
    # a full-resolution CT would otherwise cost gigabytes in distance transforms.
    crop = _padded_box(lesions > 0 if liver is None else liver, spacing)
    offset = np.asarray([s.start for s in crop], dtype=np.float64)
    hu, lesions = hu[crop], lesions[crop]
    any_lesion = lesions > 0

    if liver is not None:
        liver = liver[crop]
        box_lo, box_hi = _bounding_box(liver)
        split_fraction = CANTLIE_FRACTION
        parenchyma = liver & ~any_lesion
        reference = parenchyma if parenchyma.any() else _shell(any_lesion, spacing)
        # Distance (mm) of each liver voxel to the nearest non-liver voxel; padding makes the image
        # border count as outside.
        depth = ndimage.distance_transform_edt(np.pad(liver, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    else:
        if len(ids) > 1:
            box_lo, box_hi = _bounding_box(any_lesion)
        else:  # a single lesion has no bounding box to be on one side of: use the image's
            box_lo, box_hi = -offset, full_shape - 1.0 - offset
        split_fraction = 0.5
        reference = _shell(any_lesion, spacing)
        depth = None
    reference_hu = float(hu[reference].mean()) if reference.any() else None
    extent = np.maximum(box_hi - box_lo, 1e-6)
    split_x = box_lo[2] + split_fraction * extent[2]

    index = np.arange(1, max(ids) + 1)
    counts = np.bincount(lesions.ravel(), minlength=max(ids) + 1)[1:]
    means = ndimage.mean(hu.astype(np.float64), lesions, index)
    centroids = ndimage.center_of_mass(any_lesion, lesions, index)
    slices = ndimage.find_objects(lesions)

    attrs = []
    for lesion_id in ids:
        voxels = int(counts[lesion_id - 1])
        centroid = np.asarray(centroids[lesion_id - 1], dtype=np.float64)
        box = slices[lesion_id - 1]
        region = lesions[box] == lesion_id
        diameter = _axial_feret_diameter(region, spacing[1:])
        mean_hu = float(means[lesion_id - 1])
        relative = None if reference_hu is None else mean_hu - reference_hu
        rel_pos = (centroid - box_lo) / extent  # 0..1 within the reference box, per (z, y, x)
        subcapsular = None if depth is None else bool(depth[box][region].min() <= SUBCAPSULAR_MM)
        attrs.append(
            LesionAttributes(
                id=lesion_id,
                voxels=voxels,
                volume_ml=voxels * float(np.prod(spacing)) / 1000.0,
                diameter_mm=diameter,
                size_class=size_class(diameter),
                mean_hu=mean_hu,
                relative_hu=relative,
                attenuation=None if relative is None else _attenuation(relative),
                side="right" if centroid[2] < split_x else "left",
                vertical="superior" if rel_pos[0] >= 0.5 else "inferior",
                ap="anterior" if rel_pos[1] < 0.5 else "posterior",
                segment=None if organ is None else _couinaud_segment(centroid, box_lo, extent, split_x),
                subcapsular=subcapsular,
                dome=None if organ is None else bool(rel_pos[0] >= 1.0 - DOME_FRACTION),
                centroid_zyx=tuple(float(c) for c in centroid + offset),
                appearance=appearance.get(lesion_id),
            )
        )
    order = sorted(attrs, key=lambda a: (-a.voxels, -a.diameter_mm, a.id))
    for rank, a in enumerate(order, start=1):
        a.rank = rank
        a.count = len(attrs)
    return attrs


def _bounding_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest voxel index (z, y, x) of a non-empty mask."""
    coords = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    return (np.asarray([c[0] for c in coords], float), np.asarray([c[-1] for c in coords], float))


def _padded_box(mask: np.ndarray, spacing: np.ndarray) -> tuple[slice, slice, slice]:
    """Bounding box of a non-empty mask grown by ``REFERENCE_SHELL_MM`` plus one voxel, clipped."""
    lo, hi = _bounding_box(mask)
    margin = np.ceil(REFERENCE_SHELL_MM / spacing).astype(int) + 1
    return tuple(
        slice(max(int(a) - m, 0), min(int(b) + m + 1, n)) for a, b, m, n in zip(lo, hi, margin, mask.shape)
    )


def _shell(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Voxels outside ``mask`` within ``REFERENCE_SHELL_MM`` of it."""
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(~mask, sampling=spacing)
    return (distance > 0) & (distance <= REFERENCE_SHELL_MM)


def _axial_feret_diameter(region: np.ndarray, spacing_yx: np.ndarray) -> float:
    """Max Feret diameter (mm, between voxel centres) in the axial slice where ``region`` is largest."""
    from scipy import ndimage
    from scipy.spatial import ConvexHull, QhullError
    from scipy.spatial.distance import pdist

    z = int(np.argmax(region.sum(axis=(1, 2))))
    axial = region[z]
    boundary = axial & ~ndimage.binary_erosion(axial)
    points = np.argwhere(boundary) * spacing_yx
    if len(points) < 2:
        return 0.0
    if len(points) > 64:
        try:
            points = points[ConvexHull(points).vertices]
        except QhullError:  # collinear points: keep them all
            pass
    return float(pdist(points).max())


def _attenuation(relative_hu: float) -> str:
    if relative_hu < -ISODENSE_TOLERANCE_HU:
        return "hypodense"
    return "hyperdense" if relative_hu > ISODENSE_TOLERANCE_HU else "isodense"


def _couinaud_segment(centroid: np.ndarray, box_lo: np.ndarray, extent: np.ndarray, split_x: float) -> int:
    """Approximate Couinaud segment of a point from the liver's bounding box (see the constants).

    Right lobe (patient right of the Cantlie plane): anterior/posterior by the box's y-centre and
    superior/inferior by its z-centre give 8/5 (anterior) and 7/6 (posterior). Left lobe: segment 4
    next to the Cantlie plane, lateral 2 (superior) / 3 (inferior). The caudate (1) is a posterior,
    central, mid-height box around the Cantlie plane.
    """
    rel_z, rel_y, _ = (centroid - box_lo) / extent
    superior = rel_z >= 0.5
    if (
        rel_y >= 1.0 - CAUDATE_POSTERIOR_FRACTION
        and abs(centroid[2] - split_x) <= CAUDATE_HALF_WIDTH_FRACTION * extent[2]
        and abs(rel_z - 0.5) <= CAUDATE_HEIGHT_FRACTION / 2
    ):
        return 1
    if centroid[2] < split_x:
        if rel_y < 0.5:
            return 8 if superior else 5
        return 7 if superior else 6
    left_width = max(box_lo[2] + extent[2] - split_x, 1e-6)
    if (centroid[2] - split_x) / left_width < SEGMENT4_FRACTION:
        return 4
    return 2 if superior else 3


# --------------------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    """A structured referring expression: attribute filters plus a selector.

    Attributes:
        filters: ``(attribute, value)`` equality filters on :class:`LesionAttributes`
            (side, vertical, ap, segment, subcapsular, dome, size_class, diameter_cm, attenuation,
            appearance), all of which must hold.
        selector: "the" (the single matching lesion), "largest" / "smallest" (the extreme one among
            the matches), "both" (exactly two), "count" (exactly ``n``), "all" (every match).
        n: the number for the "count" selector.
    """

    filters: tuple[tuple[str, Any], ...] = ()
    selector: str = "the"
    n: int | None = None

    def __post_init__(self) -> None:
        if self.selector not in _SELECTORS:
            raise ValueError(f"Query selector must be one of {_SELECTORS}, got {self.selector!r}")
        for key, _ in self.filters:
            if key not in _FILTER_KEYS:
                raise ValueError(f"Query filter {key!r} is not an attribute; use one of {_FILTER_KEYS}")
        if (self.selector == "count") != (self.n is not None):
            raise ValueError("Query n must be given exactly when the selector is 'count'")

    @property
    def number(self) -> str:
        """Grammatical number of the phrase: "singular" or "plural"."""
        return "singular" if self.selector in _SINGULAR_SELECTORS else "plural"

    def value(self, key: str) -> Any:
        return dict(self.filters).get(key)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"filters": {k: v for k, v in self.filters}, "selector": self.selector}
        if self.n is not None:
            d["n"] = self.n
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Query:
        filters = tuple(sorted(dict(d.get("filters", {})).items(), key=lambda kv: _FILTER_KEYS.index(kv[0])))
        return cls(filters=filters, selector=d.get("selector", "the"), n=d.get("n"))


def resolve(query: Query | Mapping[str, Any], attrs: Iterable[LesionAttributes]) -> set[int]:
    """The ids of the lesions a query denotes in a case.

    The filters select the matching lesions; "largest"/"smallest" keep the extreme one by volume;
    "the", "both", "count" and "all" denote all matches (whether the phrase's number fits them is the
    generator's check, see :func:`is_felicitous`). An empty set means nothing in the case fits.
    """
    if not isinstance(query, Query):
        query = Query.from_dict(query)
    matches = [a for a in attrs if all(getattr(a, key) == value for key, value in query.filters)]
    if not matches:
        return set()
    if query.selector == "largest":
        return {min(matches, key=lambda a: a.rank).id}
    if query.selector == "smallest":
        return {max(matches, key=lambda a: a.rank).id}
    return {a.id for a in matches}


#: Query filters whose value a slice shows for a lesion on it: its contrast and look, its lobe and
#: front/back half (in-plane position), whether it touches the liver surface. The others (superior /
#: inferior half, dome, segment, size class and diameter in mm) and the superlatives (volume rank)
#: are properties of the whole volume.
IN_PLANE_FILTERS = ("attenuation", "appearance", "side", "ap", "subcapsular")
#: What picks an expression's referent among the lesions one slice shows (:func:`decided_on_slice`).
SLICE_DECIDERS = (
    "the in-plane words",
    "in-plane words + areas on the slice",
    "only the volume",
    "(no query)",
)


def decided_on_slice(
    query: Query | Mapping[str, Any] | None,
    targets: Iterable[int],
    areas: Mapping[int, int],
    attrs: Mapping[int, LesionAttributes],
) -> str:
    """What picks the referent among the lesions a slice shows (one of :data:`SLICE_DECIDERS`).

    ``areas``: each lesion's pixels on the slice; ``attrs``: lesion id -> its attributes. The
    in-plane words decide when the query's :data:`IN_PLANE_FILTERS` alone, applied to the shown
    lesions, select exactly the shown targets; a "largest"/"smallest" query with one shown target
    is decided by the slice's areas when, among the shown lesions that fit the in-plane words, the
    target has the largest (smallest) area there. Otherwise only the volume decides.
    """
    if not query:
        return SLICE_DECIDERS[3]
    if not isinstance(query, Query):
        query = Query.from_dict(query)
    shown = {int(i) for i, area in areas.items() if area > 0}
    shown_targets = {int(t) for t in targets} & shown
    in_plane = [(k, v) for k, v in query.filters if k in IN_PLANE_FILTERS]
    fitting = {i for i in shown if all(getattr(attrs[i], k) == v for k, v in in_plane)}
    if fitting == shown_targets:
        return SLICE_DECIDERS[0]
    if query.selector in ("largest", "smallest") and len(shown_targets) == 1 and shown_targets <= fitting:
        pick = (max if query.selector == "largest" else min)(sorted(fitting), key=lambda i: areas[i])
        if {pick} == shown_targets:
            return SLICE_DECIDERS[1]
    return SLICE_DECIDERS[2]


def is_felicitous(query: Query, attrs: Sequence[LesionAttributes]) -> bool:
    """Whether the phrase fits its referents: singular for one, "both" for two, "count" for ``n``,
    "all" for two or more, and a superlative only among at least two matching lesions."""
    matches = resolve(Query(filters=query.filters, selector="all"), attrs)
    if query.selector == "the":
        return len(matches) == 1
    if query.selector in ("largest", "smallest"):
        return len(matches) >= 2
    if query.selector == "both":
        return len(matches) == 2
    if query.selector == "count":
        return len(matches) == query.n
    return len(matches) >= 2


def _kind(query: Query) -> str:
    if query.selector == "all" and not query.filters:
        return "all"
    if query.selector in ("both", "count", "all") or (query.selector == "the" and not query.filters):
        return "count"  # plural with filters, or "the lesion" when the case has exactly one
    families = {_FAMILY[key] for key, _ in query.filters} - {None}
    if query.selector in ("largest", "smallest"):
        return "combined" if families else "rank"
    return families.pop() if len(families) == 1 else "combined"


def _valid_filter_set(keys: Sequence[str]) -> bool:
    if any(frozenset(pair) in _CONFLICTS for pair in itertools.combinations(keys, 2)):
        return False
    return sum(_FAMILY[k] == "location" for k in keys) <= _MAX_LOCATION_FILTERS


def _lesion_filters(a: LesionAttributes) -> list[tuple[str, Any]]:
    """The (attribute, value) filters that are true of lesion ``a`` (unknowns and "not" facts left out)."""
    filters = []
    for key in _FILTER_KEYS:
        value = getattr(a, key)
        if value is None or value is False:
            continue
        filters.append((key, value))
    return filters


def _filter_sets(filters: Sequence[tuple[str, Any]], max_size: int) -> Iterable[tuple[tuple[str, Any], ...]]:
    for size in range(max_size + 1):
        for combo in itertools.combinations(filters, size):
            keys = [k for k, _ in combo]
            if len(set(keys)) == len(keys) and _valid_filter_set(keys):
                yield combo


# --------------------------------------------------------------------------------------------------
# Realisation (query -> text)
# --------------------------------------------------------------------------------------------------

_GENERIC_NOUNS = {"lesion": "lesions", "mass": "masses", "nodule": "nodules", "focus": "foci"}
_APPEARANCE_NOUNS = {
    "cyst": [("cyst", "cysts"), ("cystic lesion", "cystic lesions")],
    "metastasis": [("metastasis", "metastases"), ("metastatic lesion", "metastatic lesions")],
    "hemangioma": [("hemangioma", "hemangiomas")],
    "hypervascular": [("hypervascular lesion", "hypervascular lesions")],
    "hcc": [("HCC", "HCCs"), ("hepatocellular carcinoma", "hepatocellular carcinomas")],
}
_ATTENUATION_WORDS = {
    "hypodense": ["hypodense", "low-attenuation", "hypoattenuating"],
    "isodense": ["isodense", "isoattenuating"],
    "hyperdense": ["hyperdense", "high-attenuation", "hyperattenuating"],
}
_SIZE_WORDS = {"small": ["small"], "medium": ["medium-sized", "mid-sized"], "large": ["large", "big"]}
_COUNT_WORDS = {
    2: "two",
    3: "three",
    4: "four",
    5: "five",
    6: "six",
    7: "seven",
    8: "eight",
    9: "nine",
    10: "ten",
}
_ROMAN = {1: "I", 2: "II", 3: "III", 4: "IV", 5: "V", 6: "VI", 7: "VII", 8: "VIII"}
_VERTICAL_WORDS = {"superior": ["upper", "superior"], "inferior": ["lower", "inferior"]}
_AP_WORDS = {"anterior": ["anterior"], "posterior": ["posterior"]}


def _noun(query: Query, targets: Sequence[LesionAttributes], rng: random.Random) -> tuple[str, str]:
    """(singular, plural) head noun: a type word when the query names an appearance, else generic.

    "mass" is avoided for small lesions and "nodule" for large ones.
    """
    appearance = query.value("appearance")
    if appearance is not None:
        options = _APPEARANCE_NOUNS.get(appearance, [(f"{appearance} lesion", f"{appearance} lesions")])
        return rng.choice(options)
    sizes = {t.size_class for t in targets} | ({query.value("size_class")} - {None})
    nouns = ["lesion", "lesion", "lesion", "nodule", "mass", "focus"]
    if "small" in sizes:
        nouns.remove("mass")
    if "large" in sizes:
        nouns.remove("nodule")
    singular = rng.choice(nouns)
    return singular, _GENERIC_NOUNS[singular]


def _location_phrase(query: Query, rng: random.Random) -> str:
    segment = query.value("segment")
    if segment is not None:
        return rng.choice(
            [
                f"in segment {segment}",
                f"in hepatic segment {segment}",
                f"in Couinaud segment {segment}",
                f"in segment {_ROMAN[segment]}",
            ]
        )
    side, vertical, ap = query.value("side"), query.value("vertical"), query.value("ap")
    parts = [rng.choice(_VERTICAL_WORDS[vertical])] if vertical else []
    parts += [rng.choice(_AP_WORDS[ap])] if ap else []
    if side:
        lobe = rng.choice(["lobe", "hepatic lobe", "liver lobe"])
        if parts and rng.random() < 0.5:
            return f"in the {' '.join(parts)} part of the {side} {lobe}"
        return f"in the {' '.join([*parts, side, lobe])}"
    if parts:
        return rng.choice([f"in the {' '.join(parts)} liver", f"in the {' '.join(parts)} part of the liver"])
    return ""


def realise(query: Query, targets: Sequence[LesionAttributes], rng: random.Random) -> str:
    """Text for a query, with phrasing and synonyms drawn from ``rng``.

    ``targets`` (the referents, empty for negatives) only steer word choice (e.g. "mass" vs "nodule").
    """
    singular, plural = _noun(query, targets, rng)
    noun = singular if query.number == "singular" else plural
    adjectives = []
    size_cls, cm = query.value("size_class"), query.value("diameter_cm")
    if size_cls:
        adjectives.append(rng.choice(_SIZE_WORDS[size_cls]))
    if cm:
        adjectives.append(f"{cm} cm")
    attenuation = query.value("attenuation")
    if attenuation:
        adjectives.append(rng.choice(_ATTENUATION_WORDS[attenuation]))
    trailing = []
    if query.value("subcapsular"):
        if rng.random() < 0.7:
            adjectives.insert(0, "subcapsular")
        else:
            trailing.append(rng.choice(["beneath the liver capsule", "just under the capsule"]))
    location = _location_phrase(query, rng)
    if query.value("dome"):
        location = " ".join(
            p
            for p in (location, rng.choice(["near the dome", "near the liver dome", "at the hepatic dome"]))
            if p
        )

    if query.selector == "all" and not query.filters:
        return rng.choice(
            [
                f"all liver {plural}",
                f"all {plural} in the liver",
                f"all the liver {plural}",
                f"all of the {plural}",
            ]
        )
    determiner = {
        "the": "the",
        "largest": rng.choice(["the largest", "the biggest"]),
        "smallest": "the smallest",
        "both": "both",
        "count": f"the {_COUNT_WORDS.get(query.n, str(query.n))}",
        "all": rng.choice(["all", "all the", "all of the"]),
    }[query.selector]
    words = [determiner, *adjectives, noun, location, *trailing]
    return " ".join(w for w in words if w)


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def generate_expressions(
    attrs: Sequence[LesionAttributes],
    case_id: str,
    *,
    seed: int = 0,
    max_per_target: int = 3,
    negatives: int = 2,
) -> list[dict]:
    """Referring expressions for a case's lesions, each verified against the case.

    For every single lesion, for every group of lesions sharing attributes ("both hypodense lesions",
    "the three lesions in the right lobe") and for all lesions together ("all liver lesions"), up to
    ``max_per_target`` expressions of different kinds are kept whose query denotes exactly that target
    set. ``negatives`` expressions denote no lesion of the case (``targets == []``), preferring
    near misses whose filters each fit some lesion. Texts are unique within the case, and the output
    depends only on ``(attrs, case_id, seed)``.

    Returns:
        records ``{"id", "case", "expression", "targets", "source": "generated", "kind", "query"}``;
        ``query`` is :meth:`Query.to_dict` (``resolve(record["query"], attrs)`` gives the targets).
    """
    if max_per_target < 0 or negatives < 0:
        raise ValueError(f"max_per_target and negatives must be >= 0, got {max_per_target} and {negatives}")
    rng = random.Random(f"{seed}-{case_id}")
    attrs = sorted(attrs, key=lambda a: a.id)
    by_id = {a.id: a for a in attrs}
    chosen: list[tuple[Query, frozenset[int]]] = []

    for target in attrs:
        candidates = [Query(filters=f) for f in _filter_sets(_lesion_filters(target), 3)]
        candidates += [
            Query(filters=f, selector=s)
            for f in _filter_sets(_lesion_filters(target), 1)
            for s in ("largest", "smallest")
            if not any(_FAMILY[k] == "size" for k, _ in f)
        ]
        valid = [q for q in candidates if resolve(q, attrs) == {target.id} and is_felicitous(q, attrs)]
        chosen += [(q, frozenset({target.id})) for q in _pick_diverse(valid, max_per_target, rng)]

    # Plural target sets: all lesions, plus other groups up to half the number of lesions (at least 2),
    # so that plural expressions do not swamp the singular ones in cases with many lesions.
    groups = _plural_groups(attrs)
    everything = frozenset(by_id)
    others = [targets for targets in groups if targets != everything]
    rng.shuffle(others)
    for targets in ([everything] if everything in groups else []) + others[: max(2, len(attrs) // 2)]:
        chosen += [(q, targets) for q in _pick_diverse(groups[targets], max_per_target, rng)]

    chosen = [(_with_type_word(q, targets, attrs, rng), targets) for q, targets in chosen]
    chosen += [(q, frozenset()) for q in _negative_queries(attrs, negatives, rng)]

    records, texts = [], set()
    for query, targets in chosen:
        target_attrs = [by_id[i] for i in sorted(targets)]
        for _ in range(8):  # re-draw phrasing until the text is new in this case
            text = realise(query, target_attrs, rng)
            if text not in texts:
                break
        else:
            continue
        texts.add(text)
        records.append(
            {
                "id": f"{case_id}-g{len(records):03d}",
                "case": case_id,
                "expression": text,
                "targets": sorted(targets),
                "source": "generated",
                "kind": "negative" if not targets else _kind(query),
                "query": query.to_dict(),
            }
        )
    return records


#: Probability of naming a lesion's known type ("cyst") in an expression that does not yet name it.
TYPE_WORD_PROBABILITY = 0.6


def _with_type_word(
    query: Query, targets: frozenset[int], attrs: Sequence[LesionAttributes], rng: random.Random
) -> Query:
    """Add the targets' shared appearance ("the hypodense cyst") when that keeps the referent set.

    "all liver lesions" stays generic; a query that would change meaning is returned unchanged.
    """
    kinds = {a.appearance for a in attrs if a.id in targets}
    if len(kinds) != 1 or None in kinds or query.value("appearance") is not None or _kind(query) == "all":
        return query
    if rng.random() >= TYPE_WORD_PROBABILITY:
        return query
    filters = tuple(
        sorted((*query.filters, ("appearance", kinds.pop())), key=lambda kv: _FILTER_KEYS.index(kv[0]))
    )
    typed = Query(filters=filters, selector=query.selector, n=query.n)
    if resolve(typed, attrs) == set(targets) and is_felicitous(typed, attrs) and _kind(typed) == _kind(query):
        return typed
    return query


def _pick_diverse(queries: Sequence[Query], k: int, rng: random.Random) -> list[Query]:
    """Up to ``k`` queries, one per kind in random kind order, preferring fewer filters."""
    by_kind: dict[str, list[Query]] = {}
    for q in queries:
        by_kind.setdefault(_kind(q), []).append(q)
    for options in by_kind.values():
        rng.shuffle(options)
        options.sort(key=lambda q: len(q.filters))  # stable: random among equally simple ones
    kinds = sorted(by_kind)
    rng.shuffle(kinds)
    picked: list[Query] = []
    while len(picked) < k and any(by_kind.values()):
        for kind in kinds:
            if by_kind[kind] and len(picked) < k:
                options = by_kind[kind]
                picked.append(options.pop(0 if rng.random() < 0.7 else rng.randrange(len(options))))
    return picked


def _plural_groups(attrs: Sequence[LesionAttributes]) -> dict[frozenset[int], list[Query]]:
    """Plural queries ("both ...", "the three ...", "all ...") grouped by their exact referent set."""
    groups: dict[frozenset[int], list[Query]] = {}
    if len(attrs) < 2:
        return groups
    present = sorted(
        {f for a in attrs for f in _lesion_filters(a)}, key=lambda kv: (_FILTER_KEYS.index(kv[0]), str(kv[1]))
    )
    for filters in _filter_sets(present, 2):
        matches = frozenset(resolve(Query(filters=filters, selector="all"), attrs))
        if len(matches) < 2:
            continue
        queries = [Query(filters=filters, selector="all")]
        if len(matches) == 2:
            queries.append(Query(filters=filters, selector="both"))
        if filters and len(matches) <= max(_COUNT_WORDS):
            queries.append(Query(filters=filters, selector="count", n=len(matches)))
        groups.setdefault(matches, []).extend(q for q in queries if is_felicitous(q, attrs))
    return groups


def _negative_queries(attrs: Sequence[LesionAttributes], k: int, rng: random.Random) -> list[Query]:
    """Up to ``k`` singular queries that denote no lesion of the case; near misses first."""
    if k == 0:
        return []
    values = {
        "side": ["right", "left"],
        "segment": list(range(1, 9)),
        "size_class": ["small", "medium", "large"],
        "attenuation": ["hypodense", "hyperdense"],
        "subcapsular": [True],
        "dome": [True],
    }
    if not attrs or any(a.segment is None for a in attrs):
        # Unmeasured attributes cannot be denied: keep to the ones known for every lesion.
        values = {key: v for key, v in values.items() if all(getattr(a, key) is not None for a in attrs)}
    filters = [(key, v) for key, vs in values.items() for v in vs]
    seen = {f for a in attrs for f in _lesion_filters(a)}
    near, far = [], []
    for combo in _filter_sets(filters, 2):
        if not combo:
            continue
        query = Query(filters=combo)
        if resolve(query, attrs):
            continue
        (near if len(combo) == 2 and all(f in seen for f in combo) else far).append(query)
    rng.shuffle(near)
    rng.shuffle(far)
    return (near + far)[:k]


# --------------------------------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------------------------------

_PLURAL_WORDS = frozenset(
    """both all every multiple several many various lesions masses nodules foci tumors tumours cysts
    metastases mets hemangiomas haemangiomas hccs carcinomas two three four five six seven eight nine ten
    """.split()
)
_SINGULAR_OF = re.compile(
    r"\b(?:the\s+)?(?:largest|biggest|smallest|one|single|first|second|third)\b.*\bof\b"
)
_WORD = re.compile(r"[a-z]+")


def expression_number(text: str) -> str:
    """ "plural" if the text refers to several lesions ("both ...", "all ...", "two lesions",
    "masses", ...), else "singular". A superlative or "one" followed by "of" ("the largest of the
    three nodules", "one of the lesions") is singular."""
    lowered = text.lower()
    if _SINGULAR_OF.search(lowered):
        return "singular"
    return "plural" if any(w in _PLURAL_WORDS for w in _WORD.findall(lowered)) else "singular"


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """Swap the words "left" and "right", keeping their case ("Left" -> "Right", "LEFT" -> "RIGHT").

    Segment numbers are not changed: a left-right flipped image no longer fits Couinaud segment
    words, so flip augmentations should skip expressions of kind location that name a segment.
    """

    def swap(match: re.Match) -> str:
        word = match.group(0)
        new = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return new.upper()
        return new.capitalize() if word[0].isupper() else new

    return _LEFT_RIGHT.sub(swap, text)


__all__ = [
    "KINDS",
    "LesionAttributes",
    "Query",
    "expression_number",
    "generate_expressions",
    "is_felicitous",
    "lesion_attributes",
    "realise",
    "resolve",
    "size_class",
    "swap_left_right",
]
