"""The synthetic referring-lesion benchmark: real abdominal anatomy with inserted liver lesions.

``lsms data synth OUT`` calls :func:`synthesize`. Each case is

* a **real anatomy**, one of the CTs shipped in the TotalSegmentator 2.18.0 source package
  (Apache-2.0, fetched with pip by :func:`fetch_totalsegmentator`) with its liver mask, or a
  **procedural phantom** (:func:`lsms_core.data.phantom.abdominal_phantom`);
* brought to canonical orientation (LPS: x toward the patient's left, y posterior, z superior) and
  resampled to the benchmark grid :data:`GRID_SPACING_ZYX` (3 mm slices, 1.5 mm pixels), cropped to
  the body (at most :data:`MAX_INPLANE` pixels a side) and to the slices around the liver, with mild
  random variation: in-plane scale, a small rotation about the body axis, slice range, crop and a
  global HU offset. A left-right flip is **never** applied: "the right lobe" must stay the patient's
  right lobe;
* given 0-4 non-overlapping liver lesions (:func:`insert_lesion`) of three appearances
  (:data:`LESION_KINDS`): near-water **cysts** with sharp margins, **metastases** with a hypodense
  centre and an enhancing rim, **hypervascular** lesions brighter than the liver. Shapes are
  ellipsoids perturbed by low-frequency radial noise; borders have partial volume (supersampled
  occupancy blended with the background); the lesion carries noise with the standard deviation and
  spatial correlation measured in the surrounding liver (:func:`liver_texture`).

The cases are written with :class:`lsms_core.data.dataset.DatasetWriter` together with referring
expressions from :mod:`lsms_core.data.expressions`, which is told each lesion's appearance. Everything
is a deterministic function of the seed.

The source masks are TotalSegmentator *predictions*, not manual ground truth; the inserted lesions'
masks are exact by construction (the rendered occupancy thresholded at 0.5).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from lsms_core.data.phantom import abdominal_phantom, correlated_noise

logger = logging.getLogger(__name__)

__all__ = [
    "GENERATOR_VERSION",
    "GRID_SPACING_ZYX",
    "LESION_KINDS",
    "SOURCES",
    "Anatomy",
    "InsertedLesion",
    "LiverTexture",
    "fetch_totalsegmentator",
    "insert_lesion",
    "insert_random_lesions",
    "liver_texture",
    "load_anatomy",
    "synthesize",
]

#: Bumped whenever the same seed would produce different data.
GENERATOR_VERSION = "1"
TOTALSEG_VERSION = "2.18.0"
TOTALSEG_LICENSE = "Apache-2.0"
TOTALSEG_URL = "https://github.com/wasserth/TotalSegmentator"
#: TotalSegmentator's ``total`` task label of the liver (``map_to_binary.py: class_map["total"]``).
LIVER_LABEL = 5

#: Benchmark voxel size in mm, (z, y, x): 3 mm slices, 1.5 mm pixels.
GRID_SPACING_ZYX = (3.0, 1.5, 1.5)
#: Largest in-plane size (pixels) of a benchmark case after cropping to the body.
MAX_INPLANE = 256
#: Slices kept above and below the liver (range, mm) before the random slice-range choice.
LIVER_Z_MARGIN_MM = (3.0, 12.0)

LESION_KINDS = ("cyst", "metastasis", "hypervascular")
#: Probability of each kind when drawn at random.
LESION_KIND_PROBS = (0.3, 0.4, 0.3)
#: Lesion diameters (mm) are log-uniform in this range.
LESION_DIAMETER_MM = (5.0, 60.0)
#: Probability of 0, 1, 2, 3, 4 lesions in a case.
LESION_COUNT_PROBS = (0.15, 0.3, 0.3, 0.17, 0.08)
#: Fractions of cases in the train / val / test splits.
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)


@dataclass(frozen=True)
class AnatomySource:
    """One CT + TotalSegmentator label map pair in the package's ``tests/reference_files``."""

    name: str
    ct: str
    seg: str
    note: str


SOURCES: tuple[AnatomySource, ...] = (
    AnatomySource(
        "example_ct",
        "example_ct.nii.gz",
        "example_seg_fast_force_split.nii.gz",
        "112 slices of 3 mm (thorax to pelvis), with the matching 'fast' label map; whole liver",
    ),
    AnatomySource(
        "example_ct_sm",
        "example_ct_sm.nii.gz",
        "example_seg.nii.gz",
        "the top 30 slices of example_ct (same patient) with the full-resolution model's label map",
    ),
    AnatomySource(
        "example_ct_dicom",
        "example_ct_dicom",
        "example_seg_dicom.nii.gz",
        "another patient: 20 DICOM slices of 2 mm, 0.98 mm pixels; upper liver only",
    ),
)


# --------------------------------------------------------------------------------------------------
# Fetching the TotalSegmentator reference CTs
# --------------------------------------------------------------------------------------------------


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("LSMS_CACHE"):
        return Path(os.environ["LSMS_CACHE"]).expanduser()
    return Path.home() / ".cache" / "lsms"


def fetch_totalsegmentator(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the ``tests/reference_files`` folder of the TotalSegmentator 2.18.0 source package.

    The package (38 MB, Apache-2.0) is downloaded once with
    ``pip download --no-deps --no-binary totalsegmentator totalsegmentator==2.18.0`` and unpacked to
    ``CACHE/totalsegmentator-2.18.0``, where ``CACHE`` is ``cache_dir``, else ``$LSMS_CACHE``, else
    ``~/.cache/lsms``. ``$LSMS_TOTALSEG_DIR`` may point to an already unpacked package instead (for
    development and tests).

    Raises:
        FileNotFoundError: ``$LSMS_TOTALSEG_DIR`` is set but holds no reference files.
        RuntimeError: pip could not download the package (no access to the Python package index).
    """
    override = os.environ.get("LSMS_TOTALSEG_DIR")
    if override:
        reference = Path(override).expanduser() / "tests" / "reference_files"
        if not (reference / SOURCES[0].ct).exists():
            raise FileNotFoundError(
                f"LSMS_TOTALSEG_DIR={override}: {reference} holds no {SOURCES[0].ct}; point it to an unpacked "
                f"totalsegmentator-{TOTALSEG_VERSION} source package or unset it to download one"
            )
        return reference

    root = _cache_root(cache_dir)
    package = root / f"totalsegmentator-{TOTALSEG_VERSION}"
    reference = package / "tests" / "reference_files"
    if all((reference / name).exists() for s in SOURCES for name in (s.ct, s.seg)):
        return reference

    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".totalseg-", dir=root) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            "totalsegmentator",
            f"totalsegmentator=={TOTALSEG_VERSION}",
            "-d",
            tmp,
        ]
        logger.info("downloading the TotalSegmentator %s source package: %s", TOTALSEG_VERSION, " ".join(cmd))
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(Path(tmp).glob("totalsegmentator-*.tar.gz"))
        if done.returncode != 0 or not archives:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise ConnectionError(
                f"could not download the TotalSegmentator {TOTALSEG_VERSION} source package with pip "
                f"(exit code {done.returncode}):\n{tail}\nCheck the network access to the Python package "
                f"index, or download it elsewhere and set LSMS_TOTALSEG_DIR to the unpacked folder; "
                "phantoms only (lsms data synth --phantom-fraction 1.0, or "
                "synthesize(..., phantom_fraction=1.0)) need no download"
            )
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(archives[0]) as tar:
            tar.extractall(unpacked, filter="data")
        if package.exists():  # a concurrent or interrupted fetch: replace it
            import shutil

            shutil.rmtree(package)
        os.replace(unpacked / package.name, package)
    return reference


# --------------------------------------------------------------------------------------------------
# Anatomies
# --------------------------------------------------------------------------------------------------


@dataclass
class Anatomy:
    """A CT in canonical orientation with its liver mask.

    Attributes:
        hu: float32 Hounsfield units, ``(z, y, x)``, canonical (LPS) orientation.
        liver: uint8 liver mask of the same shape.
        spacing_zyx: voxel size in mm, ``(z, y, x)``.
        origin: physical position (mm, LPS, ``(x, y, z)``) of voxel ``[0, 0, 0]``.
        name: where it comes from (a source name or ``"phantom"``).
        provenance: free-form details written to ``dataset.json`` (source files, variation).
    """

    hu: np.ndarray
    liver: np.ndarray
    spacing_zyx: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    name: str = "phantom"
    provenance: dict = field(default_factory=dict)

    def volume(self, array: np.ndarray | None = None):
        """An :class:`lsms_core.io.Volume` with this anatomy's (axis-aligned LPS) geometry."""
        from lsms_core.io import Volume

        return Volume(
            array=self.hu if array is None else array,
            spacing=tuple(reversed(self.spacing_zyx)),
            origin=self.origin,
        )


def load_anatomy(reference_dir: str | os.PathLike, source: AnatomySource) -> Anatomy:
    """Read one reference CT and its liver (label :data:`LIVER_LABEL`) in canonical orientation."""
    from lsms_core.io import read_label, read_volume, to_canonical

    reference_dir = Path(reference_dir)
    image = read_volume(reference_dir / source.ct)
    seg = read_label(
        reference_dir / source.seg, like=image
    )  # reorients e.g. the RAS mask of the DICOM series
    image_c, seg_c = to_canonical(image), to_canonical(seg)
    liver = (seg_c.array == LIVER_LABEL).astype(np.uint8)
    if not liver.any():
        raise ValueError(f"{reference_dir / source.seg}: no liver (label {LIVER_LABEL}) in the label map")
    return Anatomy(
        hu=image_c.array.astype(np.float32),
        liver=liver,
        spacing_zyx=tuple(reversed(image_c.spacing)),
        origin=image_c.origin,
        name=source.name,
        provenance={"ct": source.ct, "liver_mask": f"{source.seg} (label {LIVER_LABEL} = liver)"},
    )


def _body_mask(hu: np.ndarray) -> np.ndarray:
    """The largest connected region above -500 HU in each slice's projection (the patient's body)."""
    body = ndimage.binary_opening((hu > -500).any(axis=0), iterations=2)
    labels, n = ndimage.label(body)
    if n == 0:
        raise ValueError("the CT contains no body (nothing above -500 HU)")
    sizes = ndimage.sum(body, labels, index=np.arange(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


def vary_anatomy(anatomy: Anatomy, rng: np.random.Generator, max_inplane: int = MAX_INPLANE) -> Anatomy:
    """Resample ``anatomy`` onto the benchmark grid with a random, mild, left-right-preserving variation.

    Applied about the liver's centre: an in-plane scale of 0.92-1.08 and a z scale of 0.95-1.05, a
    rotation of at most 6 degrees about the body (z) axis (determinant positive: never a mirror),
    a random slice range covering 60-100% of the liver plus a margin, a crop of the body to at most
    ``max_inplane`` pixels (keeping the liver) and a global HU offset of +-10 HU.
    """
    src_spacing = np.asarray(anatomy.spacing_zyx, dtype=float)
    out_spacing = np.asarray(GRID_SPACING_ZYX, dtype=float)
    # Work in mm relative to the source's voxel [0, 0, 0] ("source frame"), axes (z, y, x).
    liver_idx = np.argwhere(anatomy.liver)
    center = liver_idx.mean(axis=0) * src_spacing
    scale = np.array([rng.uniform(0.95, 1.05), *(2 * [rng.uniform(0.92, 1.08)])])
    angle = np.deg2rad(rng.uniform(-6.0, 6.0))
    rot = np.eye(3)
    rot[1:, 1:] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    forward = rot @ np.diag(scale)  # source mm -> output mm, about `center`
    assert np.linalg.det(forward) > 0  # never a left-right flip
    inverse = np.linalg.inv(forward)

    # Slice range: a random 60-100 % of the liver's height plus a margin, inside the source.
    z_lo, z_hi = liver_idx[:, 0].min() * src_spacing[0], liver_idx[:, 0].max() * src_spacing[0]
    keep = (z_hi - z_lo) * rng.uniform(0.6, 1.0)
    start = z_lo + rng.uniform(0.0, (z_hi - z_lo) - keep)
    z_range = np.array(
        [start - rng.uniform(*LIVER_Z_MARGIN_MM), start + keep + rng.uniform(*LIVER_Z_MARGIN_MM)]
    )
    z_range = np.clip(z_range, 0.0, (anatomy.hu.shape[0] - 1) * src_spacing[0])
    z_range = center[0] + scale[0] * (z_range - center[0])  # in output mm
    n_z = max(int(np.floor((z_range[1] - z_range[0]) / out_spacing[0])) + 1, 1)

    # In-plane field of view: the body's bounding box after the transform, at most MAX_INPLANE px.
    body = np.argwhere(_body_mask(anatomy.hu)) * src_spacing[1:]
    corners = np.array(
        [[y, x] for y in (body[:, 0].min(), body[:, 0].max()) for x in (body[:, 1].min(), body[:, 1].max())]
    )
    corners = (corners - center[1:]) @ forward[1:, 1:].T + center[1:]
    lo, hi = corners.min(axis=0) - 6.0, corners.max(axis=0) + 6.0
    size = np.minimum(np.ceil((hi - lo) / out_spacing[1:]).astype(int), max_inplane)
    extent = size * out_spacing[1:]
    liver_yx = (liver_idx[:, 1:] * src_spacing[1:] - center[1:]) @ forward[1:, 1:].T + center[1:]
    for axis in range(2):  # crop a too-large body around the liver side, with a random shift
        if hi[axis] - lo[axis] > extent[axis]:
            lo_min = max(lo[axis], liver_yx[:, axis].max() + 6.0 - extent[axis])
            lo_max = min(hi[axis] - extent[axis], liver_yx[:, axis].min() - 6.0)
            lo[axis] = rng.uniform(lo_min, max(lo_min, lo_max))
    out_origin = np.array([z_range[0], lo[0], lo[1]])  # output voxel [0,0,0] in output mm

    # scipy's affine_transform: source index = matrix @ output index + offset.
    matrix = np.diag(1.0 / src_spacing) @ inverse @ np.diag(out_spacing)
    offset = (center + inverse @ (out_origin - center)) / src_spacing
    shape = (n_z, int(size[0]), int(size[1]))
    hu = ndimage.affine_transform(anatomy.hu, matrix, offset, output_shape=shape, order=1, cval=-1024.0)
    liver = ndimage.affine_transform(
        anatomy.liver.astype(np.float32), matrix, offset, output_shape=shape, order=1
    )
    hu_offset = rng.uniform(-10.0, 10.0)
    hu += np.float32(hu_offset) * (hu > -900)

    # Geometry: output voxel [0,0,0] sits at source-frame mm `center + inverse @ (out_origin - center)`;
    # reported as axis-aligned LPS (the small rotation is part of the variation, not of the geometry).
    src_pos = center + inverse @ (out_origin - center)
    origin = tuple(np.asarray(anatomy.origin) + src_pos[::-1])
    provenance = dict(anatomy.provenance)
    provenance["variation"] = {
        "scale_zyx": [round(float(s), 4) for s in scale],
        "rotation_deg": round(float(np.rad2deg(angle)), 3),
        "hu_offset": round(float(hu_offset), 2),
        "left_right_flip": False,
    }
    return Anatomy(
        hu=hu.astype(np.float32),
        liver=(liver >= 0.5).astype(np.uint8),
        spacing_zyx=tuple(float(s) for s in out_spacing),
        origin=tuple(float(v) for v in origin),
        name=anatomy.name,
        provenance=provenance,
    )


def phantom_anatomy(rng: np.random.Generator, max_inplane: int = MAX_INPLANE) -> Anatomy:
    """A procedural abdomen on the benchmark grid (random height and field of view)."""
    shape = (
        int(rng.integers(28, 48)),
        int(rng.integers(max_inplane * 25 // 32, max_inplane + 1)),
        max_inplane,
    )
    hu, liver = abdominal_phantom(rng, shape, GRID_SPACING_ZYX)
    return Anatomy(
        hu=hu, liver=liver, spacing_zyx=GRID_SPACING_ZYX, name="phantom", provenance={"phantom": True}
    )


# --------------------------------------------------------------------------------------------------
# Lesion insertion
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiverTexture:
    """Liver intensity statistics that inserted lesions copy.

    Attributes:
        mean: median liver HU.
        noise_std: robust standard deviation (HU) of the liver after removing its smooth trend.
        noise_sigma_vox: Gaussian correlation length (voxels, ``(z, y, x)``) whose lag-1
            autocorrelation matches the liver's residual (0 = uncorrelated).
    """

    mean: float
    noise_std: float
    noise_sigma_vox: tuple[float, float, float]


def liver_texture(hu: np.ndarray, liver: np.ndarray) -> LiverTexture:
    """Measure the liver's mean, noise standard deviation and noise correlation (see :class:`LiverTexture`).

    The residual is the CT minus a Gaussian-smoothed copy (sigma 3 voxels) in the eroded liver;
    its robust standard deviation (1.4826 MAD) is the noise level. For white noise smoothed by a
    Gaussian of sigma ``s`` the lag-1 autocorrelation is ``exp(-1 / (4 s^2))``, which is inverted
    per axis to give the correlation length.
    """
    liver = liver.astype(bool)
    if liver.sum() < 50:
        raise ValueError(
            f"liver mask has {int(liver.sum())} voxels; at least 50 are needed to measure its texture"
        )
    core = ndimage.binary_erosion(liver, iterations=1)
    if core.sum() < 50:
        core = liver
    hu = hu.astype(np.float32)
    values = hu[core]
    mean = float(np.median(values))
    # Clip vessels/outliers before smoothing so bright vessels do not leak into the trend.
    clipped = np.clip(hu, mean - 60, mean + 60)
    residual = clipped - ndimage.gaussian_filter(clipped, sigma=3.0)
    res = residual[core]
    noise_std = float(1.4826 * np.median(np.abs(res - np.median(res))))
    sigmas = []
    for axis in range(3):
        pair = core & np.roll(core, -1, axis=axis)  # voxel and its next neighbour both in the liver
        last = [slice(None)] * 3
        last[axis] = slice(-1, None)
        pair[tuple(last)] = False  # np.roll wraps around
        a, b = residual[pair], np.roll(residual, -1, axis=axis)[pair]
        rho = float(np.corrcoef(a, b)[0, 1]) if len(a) > 10 else 0.0
        sigmas.append(
            float(np.sqrt(-1.0 / (4.0 * np.log(rho)))) if 0.05 < rho < 0.97 else (0.0 if rho <= 0.05 else 2.5)
        )
    return LiverTexture(mean=mean, noise_std=max(noise_std, 1.0), noise_sigma_vox=tuple(sigmas))


@dataclass
class InsertedLesion:
    """What :func:`insert_lesion` did; written to the case's provenance."""

    id: int
    kind: str
    center_zyx: tuple[float, float, float]  # voxel coordinates
    diameter_mm: float
    hu: dict  # e.g. {"value": 12.0} or {"centre": 10.0, "rim": 70.0}; "liver": local liver HU

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "center_zyx": [round(float(c), 2) for c in self.center_zyx],
            "diameter_mm": round(float(self.diameter_mm), 2),
            "hu": {k: round(float(v), 1) for k, v in self.hu.items()},
        }


@dataclass(frozen=True)
class _LesionShape:
    """An ellipsoid with a low-frequency radial perturbation ``1 + irregularity * f(direction)``."""

    semi_axes_mm: np.ndarray  # (3,) along the rotated axes
    rotation: np.ndarray  # (3, 3), columns = the ellipsoid's axes in (z, y, x) mm
    irregularity: float
    wave_dirs: np.ndarray  # (K, 3) unit vectors
    wave_freqs: np.ndarray  # (K,)
    wave_phases: np.ndarray  # (K,)
    wave_amps: np.ndarray  # (K,), sum of |amps| = 1

    @classmethod
    def random(cls, rng: np.random.Generator, kind: str, diameter_mm: float) -> _LesionShape:
        elongation = rng.uniform(0.7, 1.0, size=2)
        semi = 0.5 * diameter_mm * np.array([1.0, *elongation])
        q, r = np.linalg.qr(rng.standard_normal((3, 3)))
        q = q * np.sign(np.diag(r))
        if np.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]
        irregularity = {"cyst": (0.02, 0.06), "metastasis": (0.08, 0.22), "hypervascular": (0.05, 0.15)}[kind]
        k = 5
        dirs = rng.standard_normal((k, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        amps = rng.standard_normal(k)
        return cls(
            semi_axes_mm=semi,
            rotation=q,
            irregularity=float(rng.uniform(*irregularity)),
            wave_dirs=dirs,
            wave_freqs=rng.uniform(1.5, 4.0, size=k),
            wave_phases=rng.uniform(0, 2 * np.pi, size=k),
            wave_amps=amps / np.abs(amps).sum(),
        )

    @property
    def max_radius_mm(self) -> float:
        return float(self.semi_axes_mm.max() * (1 + self.irregularity))

    def normalised_radius(self, offsets_mm: np.ndarray) -> np.ndarray:
        """``r`` for points ``offsets_mm`` (..., 3) from the centre: < 1 inside, 1 on the border."""
        q = (offsets_mm @ self.rotation) / self.semi_axes_mm
        rho = np.linalg.norm(q, axis=-1)
        unit = q / np.maximum(rho, 1e-6)[..., None]
        wave = np.cos(unit @ self.wave_dirs.T * self.wave_freqs + self.wave_phases) @ self.wave_amps
        return rho / (1.0 + self.irregularity * wave)


def _rasterise(
    shape: _LesionShape,
    center_zyx: np.ndarray,
    spacing: np.ndarray,
    grid: tuple[int, ...],
    supersample: int = 3,
) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray] | None:
    """Occupancy (fraction of each voxel inside, from ``supersample^3`` sub-samples) and voxel-centre ``r``.

    Returns ``(bbox, occupancy, r)`` on the lesion's bounding box (2 voxels of padding), or ``None``
    when the box leaves the grid.
    """
    half = np.ceil(shape.max_radius_mm / spacing).astype(int) + 2
    lo = np.floor(center_zyx).astype(int) - half
    hi = np.floor(center_zyx).astype(int) + half + 1
    if np.any(lo < 0) or np.any(hi > np.asarray(grid)):
        return None
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    axes = [(np.arange(a, b) - c) * s for a, b, c, s in zip(lo, hi, center_zyx, spacing)]
    centres = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    r_centre = shape.normalised_radius(centres)
    sub = ((np.arange(supersample) + 0.5) / supersample - 0.5)[:, None] * spacing[None, :]  # (S, 3)
    occupancy = np.zeros(r_centre.shape, dtype=np.float32)
    for dz in sub[:, 0]:
        for dy in sub[:, 1]:
            for dx in sub[:, 2]:
                occupancy += shape.normalised_radius(centres + np.array([dz, dy, dx])) <= 1.0
    occupancy /= supersample**3
    return box, occupancy, r_centre.astype(np.float32)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _lesion_profile(
    kind: str, r: np.ndarray, liver_hu: float, rng: np.random.Generator
) -> tuple[np.ndarray, dict]:
    """Mean HU inside the lesion as a function of the normalised radius ``r`` (without noise)."""
    if kind == "cyst":
        value = min(rng.uniform(0.0, 20.0), liver_hu - 25.0)
        return np.full(r.shape, value, dtype=np.float32), {"value": value}
    if kind == "hypervascular":
        value = liver_hu + rng.uniform(30.0, 60.0)
        return np.full(r.shape, value, dtype=np.float32), {"value": value}
    if kind == "metastasis":
        centre = max(liver_hu - rng.uniform(45.0, 70.0), rng.uniform(5.0, 15.0))  # necrosis, not below water
        rim = liver_hu + rng.uniform(5.0, 18.0)
        rim_start = rng.uniform(0.78, 0.86)  # normalised radius where the enhancing rim begins
        weight = _smoothstep((r - rim_start) / 0.12)
        return (centre + (rim - centre) * weight).astype(np.float32), {"centre": centre, "rim": rim}
    raise ValueError(f"lesion kind must be one of {LESION_KINDS}, got {kind!r}")


#: Extra Gaussian blur (voxels) of the occupancy: cysts are sharp, metastases ill-defined.
_MARGIN_BLUR = {"cyst": 0.0, "hypervascular": 0.35, "metastasis": 0.5}
#: Amplitude (HU) of low-frequency internal heterogeneity.
_HETEROGENEITY = {"cyst": 0.0, "hypervascular": 6.0, "metastasis": 5.0}


def insert_lesion(
    hu: np.ndarray,
    liver: np.ndarray,
    lesions: np.ndarray,
    kind: str,
    diameter_mm: float,
    spacing_zyx: Sequence[float],
    rng: np.random.Generator,
    *,
    texture: LiverTexture | None = None,
    depth_mm: np.ndarray | None = None,
    region: np.ndarray | None = None,
    attempts: int = 40,
) -> InsertedLesion | None:
    """Insert one lesion into ``hu`` and ``lesions`` (both modified in place) inside ``liver``.

    The lesion's whole support (every voxel it touches, partial volume included) lies inside the
    liver, at least one voxel away from earlier lesions; its label (id ``lesions.max() + 1``) is the
    occupancy >= 0.5. The CT becomes ``(1 - a) * background + a * (profile + noise)`` with ``a`` the
    occupancy, the profile given by ``kind`` and noise matched to ``texture``.

    Args:
        hu: float CT in HU, ``(z, y, x)``.
        liver: liver mask.
        lesions: integer instance map (0 background).
        kind: one of :data:`LESION_KINDS`.
        diameter_mm: longest diameter before the shape perturbation (shrunk by 15 % after every ten
            failed placements).
        spacing_zyx: voxel size in mm.
        rng: random generator.
        texture: the liver's texture (measured with :func:`liver_texture` when omitted).
        depth_mm: :func:`liver_depth_mm` of ``liver`` (computed when omitted; pass it when inserting
            several lesions into one liver).
        region: optional mask restricting where the lesion's centre may lie (e.g. one lobe).
        attempts: placement tries before giving up.

    Returns:
        the inserted lesion, or ``None`` when no position fitted.
    """
    if kind not in LESION_KINDS:
        raise ValueError(f"kind must be one of {LESION_KINDS}, got {kind!r}")
    if not (hu.shape == liver.shape == lesions.shape):
        raise ValueError(
            f"hu {hu.shape}, liver {liver.shape} and lesions {lesions.shape} must have the same shape"
        )
    spacing = np.asarray(spacing_zyx, dtype=float)
    liver = liver.astype(bool)
    texture = texture or liver_texture(hu, liver)
    occupied = ndimage.binary_dilation(lesions > 0, iterations=2) if lesions.any() else np.zeros_like(liver)
    if depth_mm is None:
        depth_mm = liver_depth_mm(liver, spacing)
    allowed = liver & ~occupied
    if region is not None:
        allowed &= region.astype(bool)

    for attempt in range(attempts):
        diameter = diameter_mm * 0.85 ** (attempt // 10)
        shape = _LesionShape.random(rng, kind, diameter)
        candidates = np.argwhere(allowed & (depth_mm >= 0.8 * shape.semi_axes_mm.max()))
        if len(candidates) == 0:
            continue
        center = candidates[rng.integers(len(candidates))] + rng.uniform(-0.4, 0.4, size=3)
        raster = _rasterise(shape, center, spacing, hu.shape)
        if raster is None:
            continue
        box, occupancy, r = raster
        blur = _MARGIN_BLUR[kind]
        if blur > 0:
            occupancy = ndimage.gaussian_filter(occupancy, sigma=(blur * spacing[1] / spacing[0], blur, blur))
        occupancy[occupancy <= 0.01] = 0.0  # cut the blur's tails: the lesion touches only its support
        support = occupancy > 0.0
        if not support.any() or not liver[box][support].all() or occupied[box][support].any():
            continue
        label = occupancy >= 0.5
        if not label.any():
            label = occupancy == occupancy.max()
        return _render(hu, lesions, box, occupancy, r, label, kind, diameter, center, texture, rng)
    return None


def liver_depth_mm(liver: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """Distance (mm) from each liver voxel to the nearest voxel outside the liver (0 outside)."""
    liver = liver.astype(bool)
    depth = np.zeros(liver.shape, dtype=np.float32)
    if not liver.any():
        return depth
    idx = np.argwhere(liver)
    box = tuple(slice(max(int(a) - 1, 0), int(b) + 2) for a, b in zip(idx.min(axis=0), idx.max(axis=0)))
    crop = np.pad(liver[box], 1)  # the EDT on the liver's bounding box only (much cheaper)
    depth[box] = ndimage.distance_transform_edt(crop, sampling=spacing_zyx)[1:-1, 1:-1, 1:-1]
    return depth


def _render(hu, lesions, box, occupancy, r, label, kind, diameter, center, texture, rng) -> InsertedLesion:
    background = hu[box]
    liver_hu = texture.mean
    profile, values = _lesion_profile(kind, r, liver_hu, rng)
    noise = texture.noise_std * correlated_noise(rng, background.shape, texture.noise_sigma_vox)
    if _HETEROGENEITY[kind] > 0:
        noise += _HETEROGENEITY[kind] * correlated_noise(rng, background.shape, (1.0, 2.5, 2.5))
    hu[box] = (1.0 - occupancy) * background + occupancy * (profile + noise)
    lesion_id = int(lesions.max()) + 1
    lesions[box][label] = lesion_id
    return InsertedLesion(
        id=lesion_id,
        kind=kind,
        center_zyx=tuple(center),
        diameter_mm=diameter,
        hu={"liver": liver_hu, **values},
    )


def random_diameter(rng: np.random.Generator) -> float:
    """A lesion diameter in mm, log-uniform over :data:`LESION_DIAMETER_MM`."""
    lo, hi = np.log(LESION_DIAMETER_MM[0]), np.log(LESION_DIAMETER_MM[1])
    return float(np.exp(rng.uniform(lo, hi)))


def insert_random_lesions(
    hu: np.ndarray, liver: np.ndarray, spacing_zyx: Sequence[float], rng: np.random.Generator, count: int
) -> tuple[np.ndarray, list[InsertedLesion]]:
    """Insert ``count`` lesions of random kind, size and position; returns ``(instance map, lesions)``.

    ``hu`` is modified in place. Lesions that fit nowhere are skipped (so fewer may come back).
    """
    lesions = np.zeros(hu.shape, dtype=np.uint8)
    texture = liver_texture(hu, liver)
    inserted = []
    for _ in range(count):
        kind = str(rng.choice(LESION_KINDS, p=LESION_KIND_PROBS))
        lesion = insert_lesion(
            hu, liver, lesions, kind, random_diameter(rng), spacing_zyx, rng, texture=texture
        )
        if lesion is None:
            logger.info("a %s lesion fitted nowhere in the liver; skipped", kind)
        else:
            inserted.append(lesion)
    return lesions, inserted


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------

HU_RANGE = (-1024, 3071)  # stored as int16 in this range


def _case_plan(cases: int, seed: int, phantom_fraction: float) -> list[tuple[str, int]]:
    """``(anatomy, lesion count)`` per case: phantoms at random positions, the real sources in turn.

    With 4 or more cases at least one is a negative (no lesion) and at least one has lesions.
    """
    rng = np.random.default_rng([seed, 0])
    n_phantom = int(round(cases * phantom_fraction))
    is_phantom = np.zeros(cases, dtype=bool)
    is_phantom[rng.permutation(cases)[:n_phantom]] = True
    first = int(rng.integers(len(SOURCES)))
    names, k = [], first
    for phantom in is_phantom:
        if phantom:
            names.append("phantom")
        else:
            names.append(SOURCES[k % len(SOURCES)].name)
            k += 1
    counts = rng.choice(len(LESION_COUNT_PROBS), size=cases, p=LESION_COUNT_PROBS)
    if cases >= 4 and (counts > 0).all():
        counts[rng.integers(cases)] = 0
    if cases >= 4 and not (counts > 0).any():
        counts[rng.integers(cases)] = 2
    return list(zip(names, (int(c) for c in counts)))


def synthesize(
    out: str | os.PathLike,
    *,
    cases: int = 20,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    phantom_fraction: float = 0.25,
    progress: Callable[[int, int], None] | None = None,
    max_inplane: int = MAX_INPLANE,
) -> Path:
    """Generate the synthetic benchmark dataset in the folder ``out`` (see the module docstring).

    Args:
        out: dataset folder to create (must not hold a dataset yet).
        cases: number of cases.
        seed: everything (anatomy choice and variation, lesions, expressions, splits) follows from it.
        cache_dir: where the TotalSegmentator package is cached (see :func:`fetch_totalsegmentator`).
        phantom_fraction: fraction of cases on procedural phantoms; ``1.0`` needs no download.
        progress: called as ``progress(done, cases)`` after each case.
        max_inplane: largest in-plane size in pixels (1.5 mm each); smaller values give a quicker,
            tighter-cropped benchmark (tests use 128).

    Returns:
        the dataset folder, readable with :class:`lsms_core.data.dataset.ReferringDataset`.
    """
    from lsms_core import __version__
    from lsms_core._atomic import atomic_write_json
    from lsms_core.data.dataset import DatasetWriter
    from lsms_core.data.expressions import generate_expressions, lesion_attributes

    if not isinstance(cases, int) or cases < 1:
        raise ValueError(f"cases must be a positive integer, got {cases!r}")
    if not 64 <= max_inplane <= 1024:
        raise ValueError(f"max_inplane must be between 64 and 1024 pixels, got {max_inplane}")
    if not 0.0 <= phantom_fraction <= 1.0:
        raise ValueError(f"phantom_fraction must be between 0 and 1, got {phantom_fraction}")
    plan = _case_plan(cases, seed, phantom_fraction)
    reference = fetch_totalsegmentator(cache_dir) if any(name != "phantom" for name, _ in plan) else None
    sources = {s.name: s for s in SOURCES}
    anatomies: dict[str, Anatomy] = {}

    used = sorted({name for name, _ in plan} - {"phantom"})
    provenance = {
        "generator": "lsms_core.data.synth",
        "generator_version": GENERATOR_VERSION,
        "lsms_core_version": __version__,
        "seed": seed,
        "cases": cases,
        "phantom_fraction": phantom_fraction,
        "grid_spacing_zyx_mm": list(GRID_SPACING_ZYX),
        "max_inplane": max_inplane,
        "orientation": "canonical LPS (x -> patient left, y -> posterior, z -> superior); never left-right flipped",
        "lesions": "inserted by lsms_core.data.synth (cyst, metastasis, hypervascular); masks exact by construction",
    }
    if used:
        provenance["anatomy_source"] = {
            "name": f"TotalSegmentator {TOTALSEG_VERSION} source package, tests/reference_files",
            "url": TOTALSEG_URL,
            "license": TOTALSEG_LICENSE,
            "attribution": "Wasserthal et al., TotalSegmentator: robust segmentation of 104 anatomic structures "
            "in CT images, Radiology: AI 2023; example data of the totalsegmentator package (Apache-2.0)",
            "files": {
                name: {"ct": sources[name].ct, "liver_mask": sources[name].seg, "note": sources[name].note}
                for name in used
            },
            "liver_masks": "TotalSegmentator predictions (label 5 = liver), not manual ground truth",
        }
    writer = DatasetWriter(
        out,
        name="lsms-synth",
        description=(
            f"Synthetic liver-lesion referring benchmark: {cases} cases (real TotalSegmentator example anatomies "
            "and procedural phantoms) with inserted cysts, metastases and hypervascular lesions"
        ),
        license="Apache-2.0"
        if not used
        else f"Apache-2.0 (derived from TotalSegmentator {TOTALSEG_VERSION} example data)",
        provenance=provenance,
        organ_labels={"liver": 1},
    )

    records, case_notes = [], {}
    for index, (name, count) in enumerate(plan):
        rng = np.random.default_rng([seed, index + 1])
        if name == "phantom":
            anatomy = phantom_anatomy(rng, max_inplane)
        else:
            if name not in anatomies:
                anatomies[name] = load_anatomy(reference, sources[name])
            anatomy = vary_anatomy(anatomies[name], rng, max_inplane)
        hu = anatomy.hu
        lesions, inserted = insert_random_lesions(hu, anatomy.liver, anatomy.spacing_zyx, rng, count)
        hu = np.clip(np.round(hu), *HU_RANGE).astype(np.int16)
        case_id = f"synth_{index:03d}"
        writer.add_case(case_id, image=anatomy.volume(hu), lesions=lesions, organ=anatomy.liver)
        attrs = lesion_attributes(
            hu, lesions, anatomy.liver, anatomy.spacing_zyx, appearance={les.id: les.kind for les in inserted}
        )
        records += generate_expressions(attrs, case_id, seed=seed)
        case_notes[case_id] = {
            "anatomy": anatomy.name,
            **anatomy.provenance,
            "shape_zyx": list(hu.shape),
            "lesions": [les.to_dict() for les in inserted],
        }
        if progress is not None:
            progress(index + 1, cases)

    writer.add_expressions(records)
    writer.make_splits(SPLIT_FRACTIONS, seed=seed)
    writer.meta["provenance"]["case_details"] = case_notes  # only known now: rewrite dataset.json once
    atomic_write_json(Path(out) / "dataset.json", writer.meta)
    return Path(out)
