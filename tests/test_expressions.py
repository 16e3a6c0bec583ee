"""Lesion attributes on phantoms of known geometry, and verified referring-expression generation."""

from __future__ import annotations

import numpy as np
import pytest

from lsms_core.data.expressions import (
    KINDS,
    MEDIUM_MAX_MM,
    SMALL_MAX_MM,
    LesionAttributes,
    Query,
    decided_on_slice,
    expression_number,
    generate_expressions,
    is_felicitous,
    lesion_attributes,
    resolve,
    size_class,
    swap_left_right,
)

SPACING = (2.5, 0.75, 0.75)  # (z, y, x) mm
SHAPE = (28, 90, 110)
LIVER = (slice(2, 26), slice(6, 84), slice(6, 104))  # voxel box: z 2..25, y 6..83, x 6..103
PARENCHYMA_HU = 60.0

# id: (centre (z, y, x) in voxels, radius mm, HU). Canonical: small x = patient right, small y =
# anterior, large z = superior. The Cantlie split lies at x = 6 + 0.6 * 97 ~ 64.
LESIONS = {
    1: ((17, 25, 30), 12.0, 10.0),  # right lobe, superior, anterior, at the anterior surface, hypodense
    2: ((7, 70, 92), 6.0, 130.0),  # left lateral, inferior, posterior, at the posterior surface, hyperdense
    3: ((12, 36, 40), 5.0, 66.0),  # right lobe, anterior, inferior, deep, isodense
    4: ((24, 40, 25), 4.0, 5.0),  # right lobe, near the dome, hypodense
}


def make_phantom(seed: int = 0):
    """CT (HU with mild noise), lesion instance map and liver mask in canonical orientation."""
    rng = np.random.default_rng(seed)
    hu = rng.normal(-120.0, 3.0, SHAPE)
    organ = np.zeros(SHAPE, np.uint8)
    organ[LIVER] = 1
    hu[organ > 0] = rng.normal(PARENCHYMA_HU, 3.0, int(organ.sum()))
    lesions = np.zeros(SHAPE, np.int32)
    grid = np.indices(SHAPE, dtype=np.float64)
    for lesion_id, (centre, radius, value) in LESIONS.items():
        dist2 = sum(((grid[a] - centre[a]) * SPACING[a]) ** 2 for a in range(3))
        inside = dist2 <= radius**2
        lesions[inside] = lesion_id
        hu[inside] = rng.normal(value, 3.0, int(inside.sum()))
    return hu, lesions, organ


@pytest.fixture(scope="module")
def phantom():
    return make_phantom()


@pytest.fixture(scope="module")
def attrs(phantom):
    hu, lesions, organ = phantom
    return lesion_attributes(hu, lesions, organ, SPACING, appearance={2: "cyst"})


def by_id(attrs):
    return {a.id: a for a in attrs}


# --------------------------------------------------------------------------------------------------
# Attributes
# --------------------------------------------------------------------------------------------------


def test_sizes_match_the_spheres(attrs):
    a = by_id(attrs)
    assert sorted(a) == [1, 2, 3, 4]
    for lesion_id, (_, radius, _) in LESIONS.items():
        # Max Feret diameter between voxel centres: within one in-plane voxel of the true diameter.
        assert abs(a[lesion_id].diameter_mm - 2 * radius) <= SPACING[2] + 1e-6, lesion_id
        sphere_ml = 4 / 3 * np.pi * radius**3 / 1000
        assert a[lesion_id].volume_ml == pytest.approx(sphere_ml, rel=0.2)
        assert a[lesion_id].volume_ml == pytest.approx(a[lesion_id].voxels * np.prod(SPACING) / 1000)
        assert a[lesion_id].centroid_zyx == pytest.approx(LESIONS[lesion_id][0], abs=0.05)
    assert a[1].size_class == "medium" and a[2].size_class == "small"
    assert a[1].diameter_cm == 2 and a[2].diameter_cm == 1
    assert [a[i].rank for i in (1, 2, 3, 4)] == [1, 2, 3, 4]
    assert all(x.count == 4 for x in attrs)


def test_attenuation_relative_to_parenchyma(attrs):
    a = by_id(attrs)
    assert a[1].attenuation == "hypodense" and a[4].attenuation == "hypodense"
    assert a[2].attenuation == "hyperdense"
    assert a[3].attenuation == "isodense"
    assert a[1].relative_hu == pytest.approx(10.0 - PARENCHYMA_HU, abs=2.0)
    assert a[2].mean_hu == pytest.approx(130.0, abs=2.0)


def test_location_follows_the_canonical_convention(attrs):
    a = by_id(attrs)
    assert [a[i].side for i in (1, 2, 3, 4)] == ["right", "left", "right", "right"]
    assert a[1].vertical == "superior" and a[2].vertical == "inferior"
    assert a[1].ap == "anterior" and a[2].ap == "posterior"
    assert a[1].segment == 8  # right anterior superior
    assert a[2].segment == 3  # left lateral inferior
    assert a[3].segment == 5  # right anterior inferior
    assert a[1].subcapsular and a[2].subcapsular and not a[3].subcapsular
    assert a[4].dome and not a[1].dome and not a[2].dome
    assert a[2].appearance == "cyst" and a[1].appearance is None


def test_flipping_the_patient_swaps_the_lobe(phantom):
    """Mirroring x (patient right <-> left) moves a lesion to the other side of the liver's midline."""
    hu, lesions, organ = phantom
    flipped = lesion_attributes(hu[..., ::-1], lesions[..., ::-1], organ[..., ::-1], SPACING)
    # Lesion 2 (lateral left) is now far right; lesion 1 (x=30 of 6..103) is now in the left lobe.
    assert by_id(flipped)[2].side == "right" and by_id(flipped)[1].side == "left"


def test_without_organ_mask(phantom):
    hu, lesions, _ = phantom
    attrs = by_id(lesion_attributes(hu, lesions, None, SPACING))
    assert all(a.segment is None and a.subcapsular is None and a.dome is None for a in attrs.values())
    assert attrs[2].centroid_zyx == pytest.approx(LESIONS[2][0], abs=0.05)
    # The reference is the tissue shell around the lesions (liver parenchyma here).
    assert attrs[1].attenuation == "hypodense" and attrs[2].attenuation == "hyperdense"
    # Sides relative to the lesions' own bounding box: lesion 2 is the leftmost.
    assert attrs[2].side == "left" and attrs[4].side == "right"


def test_size_class_thresholds():
    assert size_class(SMALL_MAX_MM - 0.1) == "small"
    assert size_class(SMALL_MAX_MM) == "medium"
    assert size_class(MEDIUM_MAX_MM - 0.1) == "medium"
    assert size_class(MEDIUM_MAX_MM) == "large"


def test_bad_input_raises_clear_errors(phantom):
    hu, lesions, organ = phantom
    with pytest.raises(ValueError, match="lesions shape"):
        lesion_attributes(hu, lesions[:-1], organ, SPACING)
    with pytest.raises(ValueError, match="spacing_zyx"):
        lesion_attributes(hu, lesions, organ, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="integer instance map"):
        lesion_attributes(hu, lesions.astype(float), organ, SPACING)
    with pytest.raises(ValueError, match=r"appearance names lesion ids \[9\]"):
        lesion_attributes(hu, lesions, organ, SPACING, appearance={9: "cyst"})
    assert lesion_attributes(hu, np.zeros_like(lesions), organ, SPACING) == []


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def check_records(records, attrs, case_id):
    """Every record's query denotes exactly its targets, with fitting grammatical number."""
    texts = [r["expression"] for r in records]
    assert len(texts) == len(set(texts)), "texts must be unique within a case"
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    known = {a.id for a in attrs}
    for r in records:
        assert r["case"] == case_id and r["source"] == "generated" and r["kind"] in KINDS
        query = Query.from_dict(r["query"])
        assert resolve(query, attrs) == set(r["targets"]), r
        assert set(r["targets"]) <= known
        if r["kind"] == "negative":
            assert r["targets"] == [] and query.number == "singular"
            continue
        assert is_felicitous(query, attrs), r
        expected = "singular" if len(r["targets"]) == 1 else "plural"
        assert query.number == expected and expression_number(r["expression"]) == expected, r
        # Side words appear exactly when the query names a side, and name the right one.
        side = query.value("side")
        words = r["expression"].split()
        assert ("left" in words) == (side == "left") and ("right" in words) == (side == "right"), r
        if "cyst" in r["expression"] or "cysts" in r["expression"]:
            assert all(a.appearance == "cyst" for a in attrs if a.id in r["targets"]), r


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_generated_expressions_resolve_to_their_targets(attrs, seed):
    records = generate_expressions(attrs, "case_a", seed=seed, max_per_target=3, negatives=3)
    check_records(records, attrs, "case_a")
    singular_targets = {r["targets"][0] for r in records if len(r["targets"]) == 1}
    assert singular_targets == {1, 2, 3, 4}, "every lesion gets a singular expression"
    per_target = {}
    for r in records:
        per_target.setdefault(tuple(r["targets"]), []).append(r)
    assert all(len(v) <= 3 for k, v in per_target.items() if k)
    assert [r["targets"] for r in records if r["kind"] == "all"] == [[1, 2, 3, 4]]
    negatives = [r for r in records if r["kind"] == "negative"]
    assert len(negatives) == 3 and all(resolve(r["query"], attrs) == set() for r in negatives)


def test_kinds_and_type_words_over_seeds(attrs):
    records = [r for seed in range(12) for r in generate_expressions(attrs, "c", seed=seed)]
    kinds = {r["kind"] for r in records}
    assert {"location", "size", "attenuation", "rank", "count", "combined", "all", "negative"} <= kinds
    assert any("cyst" in r["expression"] for r in records)


def test_determinism_and_seed_variation(attrs):
    a = generate_expressions(attrs, "case_a", seed=5)
    assert a == generate_expressions(attrs, "case_a", seed=5)
    b = generate_expressions(attrs, "case_a", seed=6)
    assert [r["expression"] for r in a] != [r["expression"] for r in b]
    assert [r["expression"] for r in a] != [
        r["expression"] for r in generate_expressions(attrs, "case_b", seed=5)
    ]


def _lesion(lesion_id, side, attenuation, voxels, **kw):
    base = dict(
        id=lesion_id,
        voxels=voxels,
        volume_ml=voxels / 1000,
        diameter_mm=10.0 + voxels / 100,
        size_class="small",
        mean_hu=20.0,
        relative_hu=-40.0,
        attenuation=attenuation,
        side=side,
        vertical="superior",
        ap="anterior",
        segment=None,
        subcapsular=None,
        dome=None,
    )
    base.update(kw)
    return LesionAttributes(**base)


def _ranked(attrs):
    for rank, a in enumerate(sorted(attrs, key=lambda a: -a.voxels), start=1):
        a.rank, a.count = rank, len(attrs)
    return attrs


def test_both_and_superlatives_on_a_handmade_case():
    attrs = _ranked(
        [
            _lesion(1, "left", "hypodense", 900),
            _lesion(2, "left", "hypodense", 400),
            _lesion(3, "right", "hyperdense", 200),
        ]
    )
    both_left = Query(filters=(("side", "left"),), selector="both")
    assert resolve(both_left, attrs) == {1, 2} and is_felicitous(both_left, attrs)
    assert not is_felicitous(
        Query(filters=(("side", "left"),)), attrs
    )  # "the lesion in the left lobe": 2 fit
    assert resolve(Query(filters=(("side", "left"),), selector="largest"), attrs) == {1}
    assert resolve(Query(filters=(("side", "left"),), selector="smallest"), attrs) == {2}
    assert resolve(Query(filters=(("side", "left"), ("attenuation", "hyperdense"))), attrs) == set()
    assert not is_felicitous(Query(filters=(("side", "right"),), selector="largest"), attrs)  # only one there
    records = []
    for seed in range(6):
        case_records = generate_expressions(attrs, "h", seed=seed)
        check_records(case_records, attrs, "h")
        records += case_records
    assert {tuple(r["targets"]) for r in records} >= {(1,), (2,), (3,), (1, 2), (1, 2, 3), ()}
    assert any(r["expression"].startswith("both") and r["targets"] == [1, 2] for r in records)


def test_empty_case_gives_only_negatives():
    records = generate_expressions([], "empty", negatives=4)
    assert len(records) == 4 and all(r["kind"] == "negative" and r["targets"] == [] for r in records)
    assert generate_expressions([], "empty", negatives=0) == []


def test_query_validation():
    with pytest.raises(ValueError, match="selector"):
        Query(selector="most")
    with pytest.raises(ValueError, match="not an attribute"):
        Query(filters=(("colour", "red"),))
    q = Query(filters=(("side", "left"), ("attenuation", "hypodense")), selector="count", n=3)
    assert Query.from_dict(q.to_dict()) == q


# --------------------------------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, number",
    [
        ("the hypodense lesion in the right lobe", "singular"),
        ("the largest mass", "singular"),
        ("the 2 cm cyst near the dome", "singular"),
        ("the smallest of the three nodules", "singular"),
        ("one of the lesions in segment 7", "singular"),
        ("both lesions in the left lobe", "plural"),
        ("all liver lesions", "plural"),
        ("the two hypodense masses", "plural"),
        ("Multiple metastases", "plural"),
        ("hyperdense foci", "plural"),
        ("the three lesions", "plural"),
    ],
)
def test_expression_number(text, number):
    assert expression_number(text) == number


def test_swap_left_right():
    assert swap_left_right("the lesion in the left lobe") == "the lesion in the right lobe"
    assert swap_left_right("Right lobe, LEFT side, left") == "Left lobe, RIGHT side, right"
    assert swap_left_right("leftover bright lesion") == "leftover bright lesion"
    text = "both nodules in the right hepatic lobe"
    assert swap_left_right(swap_left_right(text)) == text


def test_decided_on_slice_names_what_picks_the_referent_among_the_shown_lesions():
    def lesion(i, attenuation, vertical, rank):
        return LesionAttributes(
            id=i,
            voxels=100,
            volume_ml=1.0,
            diameter_mm=20.0,
            size_class="medium",
            mean_hu=50.0,
            relative_hu=0.0,
            attenuation=attenuation,
            side="right",
            vertical=vertical,
            ap="anterior",
            segment=8,
            subcapsular=False,
            dome=False,
            rank=rank,
            count=3,
        )

    attrs = {
        1: lesion(1, "hypodense", "superior", 1),
        2: lesion(2, "hyperdense", "inferior", 2),
        3: lesion(3, "hypodense", "inferior", 3),
    }
    shown = {1: 40, 2: 90, 3: 0}  # lesions 1 and 2 on the slice, 2 the larger there

    def decided(filters, selector, targets, areas=shown):
        return decided_on_slice({"filters": filters, "selector": selector}, targets, areas, attrs)

    assert decided({"attenuation": "hypodense"}, "largest", [1]) == "the in-plane words"
    assert decided({"attenuation": "hyperdense"}, "the", [2]) == "the in-plane words"
    assert decided({"vertical": "superior"}, "the", [1]) == "only the volume"
    # the largest in the volume is lesion 1, but lesion 2 has more pixels on this slice
    assert decided({}, "largest", [1]) == "only the volume"
    assert decided({}, "smallest", [1]) == "in-plane words + areas on the slice"
    assert decided({}, "largest", [1], {1: 95, 2: 90, 3: 0}) == "in-plane words + areas on the slice"
    assert decided({}, "all", [1, 2, 3]) == "the in-plane words"  # both shown lesions are meant
    assert decided_on_slice(None, [1], shown, attrs) == "(no query)"
