"""Procedural abdominal CT phantoms (NumPy/SciPy only).

A phantom is a stack of axial slices of an upper abdomen in **canonical orientation** (see
``docs/architecture.md``): array ``x`` grows toward the patient's left, ``y`` toward posterior,
``z`` toward superior. So the liver sits at *small* ``x`` (the patient's right), its dome toward
the top slices, the spleen at large ``x``, the spine and aorta posterior (large ``y``).

The phantoms complement the few real anatomies of the synthetic benchmark
(:mod:`lsms_core.data.synth`): they vary body size, organ shapes and contrast enhancement freely,
so that a model trained on the benchmark sees more than two patients' livers. They are cartoons
with plausible Hounsfield units (air -1000, fat -100, soft tissue 30-60, enhanced vessels and
kidneys 130-180, bone 250-800) and CT-like spatially correlated noise, not anatomy atlases.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["abdominal_phantom", "correlated_noise"]


def correlated_noise(
    rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: tuple[float, ...] | float
) -> np.ndarray:
    """Gaussian noise with unit standard deviation, smoothed by a Gaussian of ``sigma_vox`` voxels.

    Smoothing white noise correlates neighbouring voxels like CT reconstruction does; the result is
    rescaled by the exact norm of the (separable, truncated) smoothing kernel so that its standard
    deviation stays 1 whatever ``sigma_vox`` is. A sigma of 0 along an axis leaves it uncorrelated.
    """
    sigmas = np.broadcast_to(np.asarray(sigma_vox, dtype=float), (len(shape),))
    pad = [int(4 * s + 0.5) + 1 for s in sigmas]  # keep the reflective borders out of the result
    white = rng.standard_normal([n + 2 * p for n, p in zip(shape, pad)]).astype(np.float32)
    if not np.any(sigmas > 0):
        return white[tuple(slice(p, p + n) for n, p in zip(shape, pad))]
    smooth = ndimage.gaussian_filter(white, sigma=sigmas, mode="reflect", truncate=4.0)
    gain = 1.0
    for s in sigmas:
        if s > 0:
            radius = int(4.0 * s + 0.5)
            x = np.arange(-radius, radius + 1, dtype=float)
            kernel = np.exp(-0.5 * (x / s) ** 2)
            kernel /= kernel.sum()
            gain *= float(np.sum(kernel**2))
    smooth /= np.sqrt(gain)
    return smooth[tuple(slice(p, p + n) for n, p in zip(shape, pad))]


def _ellipsoid(coords, center, radii) -> np.ndarray:
    """Normalised ellipsoid radius (<= 1 inside) on broadcast physical coordinates (z, y, x) in mm."""
    z, y, x = coords
    return np.sqrt(
        ((z - center[0]) / radii[0]) ** 2
        + ((y - center[1]) / radii[1]) ** 2
        + ((x - center[2]) / radii[2]) ** 2
    )


def abdominal_phantom(
    rng: np.random.Generator,
    shape: tuple[int, int, int] = (40, 224, 256),
    spacing: tuple[float, float, float] = (3.0, 1.5, 1.5),
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a random upper-abdomen CT phantom in canonical (LPS) orientation.

    Args:
        rng: NumPy random generator; the phantom is a deterministic function of its state.
        shape: array shape ``(z, y, x)``; the slices should cover roughly 80-200 mm so that the
            liver (which spans the whole stack, dome at the top) looks plausible.
        spacing: voxel size in mm, in the same ``(z, y, x)`` order as ``shape``.

    Returns:
        ``(hu, liver_mask)``: float32 Hounsfield units and a uint8 liver mask, both ``shape``.
    """
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(
            f"abdominal_phantom: shape must be 3 sizes (z, y, x) of at least 4 voxels, got {shape}"
        )
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(
            f"abdominal_phantom: spacing must be 3 positive sizes in mm (z, y, x), got {spacing}"
        )
    nz, ny, nx = shape
    sz, sy, sx = (float(s) for s in spacing)
    # Physical coordinates in mm, centred in-plane; z from 0 (inferior) to height (superior).
    z = (np.arange(nz, dtype=np.float32) * sz)[:, None, None]
    y = ((np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * sy)[None, :, None]
    x = ((np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * sx)[None, None, :]
    height = nz * sz
    coords = (z, y, x)
    u = rng.uniform

    # Body outline: an ellipse that fits the field of view, a little wider inferiorly.
    half_x, half_y = (nx - 1) / 2 * sx, (ny - 1) / 2 * sy
    bx = min(u(140, 175), 0.95 * half_x)
    by = min(u(100, 125), 0.95 * half_y)
    taper = 1.0 + u(0.0, 0.06) * (1 - z / height)
    body_r = np.sqrt((x / (bx * taper)) ** 2 + (y / (by * taper)) ** 2)
    fat_mm = u(8, 25)
    muscle_mm = u(6, 12)
    inner_fat = 1 - (fat_mm / by)
    inner_muscle = inner_fat - (muscle_mm / by)

    hu = np.full(shape, -1000.0, dtype=np.float32)  # air
    hu[np.broadcast_to(body_r <= 1, shape)] = -100.0 + u(-10, 10)  # subcutaneous fat
    hu[np.broadcast_to(body_r <= inner_fat, shape)] = 50.0 + u(-5, 5)  # abdominal wall muscle
    hu[np.broadcast_to(body_r <= inner_muscle, shape)] = -90.0 + u(-10, 10)  # visceral fat

    def paint(mask: np.ndarray, value: float) -> None:
        hu[np.broadcast_to(mask, shape) & (body_r <= inner_muscle)] = value

    # Lung bases posteriorly in the top slices (the liver dome pushes up between them).
    lung_top = height * u(0.8, 0.95)
    for side in (-1, 1):
        lung = _ellipsoid(
            coords,
            (height + 40, 0.35 * by, side * 0.5 * bx),
            (height + 40 - lung_top + 35, 0.45 * by, 0.4 * bx),
        )
        paint(lung <= 1, -850.0 + u(-30, 30))

    # Bowel loops with gas, anteriorly in the lower half, and the stomach on the left.
    for _ in range(int(rng.integers(3, 7))):
        c = (u(0, 0.5 * height), u(-0.6, 0.0) * by, u(-0.2, 0.6) * bx)
        r = (u(10, 25), u(10, 22), u(10, 22))
        loop = _ellipsoid(coords, c, r)
        paint(loop <= 1, 30.0 + u(-10, 10))
        paint(loop <= 0.6, -900.0 + u(-50, 50))
    stomach = _ellipsoid(coords, (0.7 * height, -0.2 * by, 0.35 * bx), (u(30, 45), u(25, 40), u(25, 40)))
    paint(stomach <= 1, 25.0 + u(-10, 10))
    paint((stomach <= 1) & (y < -0.2 * by - 10), -950.0)  # gas rises anteriorly (patient supine)

    # Kidneys in the lower slices, posterior, both sides; enhanced cortex, paler medulla.
    for side in (-1, 1):
        c = (u(0.15, 0.35) * height, 0.35 * by, side * u(0.3, 0.4) * bx)
        kidney = _ellipsoid(coords, c, (u(40, 55), u(22, 28), u(22, 28)))
        paint(kidney <= 1, 160.0 + u(-20, 20))
        paint(kidney <= 0.55, 90.0 + u(-15, 15))

    # Spleen: patient's left (large x), posterior, upper slices.
    spleen = _ellipsoid(
        coords, (u(0.55, 0.75) * height, 0.3 * by, 0.62 * bx), (u(35, 55), u(35, 50), u(20, 30))
    )
    paint(spleen <= 1, 50.0 + u(-5, 10))

    # Posterior structures the liver must not cover: IVC, aorta, spine, back muscles.
    ivc = _ellipsoid(coords, (height / 2, 0.25 * by, -0.12 * bx), (10 * height, 11.0, 13.0))
    paint(ivc <= 1, 120.0 + u(-20, 20))

    aorta = _ellipsoid(coords, (height / 2, 0.32 * by, 0.06 * bx), (10 * height, 11.0, 11.0))
    paint(aorta <= 1, 170.0 + u(-30, 30))
    spine_y = 0.62 * by
    reserved = np.broadcast_to((ivc <= 1) | (aorta <= 1), shape).copy()
    for side in (-1, 1):
        back = _ellipsoid(
            coords, (height / 2, 0.78 * by, side * 0.17 * bx), (10 * height, 0.16 * by, 0.13 * bx)
        )
        paint(back <= 1, 55.0 + u(-5, 5))
        reserved |= np.broadcast_to(back <= 1, shape)
    vertebra = np.sqrt(x**2 + (y - spine_y) ** 2)
    paint(np.broadcast_to(vertebra <= 20, shape), 750.0)
    paint(np.broadcast_to(vertebra <= 17, shape), 220.0 + u(-30, 30))
    canal = np.sqrt(x**2 + (y - spine_y - 28) ** 2)
    paint(np.broadcast_to(canal <= 8, shape), 20.0)

    reserved |= np.broadcast_to(vertebra <= 24, shape)

    # Liver: patient's right (small x). A large right lobe whose dome reaches the top slices, plus a
    # thinner left lobe crossing the midline anteriorly in the upper part; low-frequency lobulation.
    lobulation = 0.06 * correlated_noise(rng, (max(nz // 4, 2), max(ny // 16, 2), max(nx // 16, 2)), 1.0)
    lobulation = ndimage.zoom(lobulation, np.array(shape) / np.array(lobulation.shape), order=1)
    right_lobe = _ellipsoid(
        coords,
        (height * u(0.45, 0.6), u(-0.1, 0.1) * by, -u(0.35, 0.45) * bx),
        (height * u(0.55, 0.7), u(0.6, 0.75) * by, u(0.38, 0.48) * bx),
    )
    left_lobe = _ellipsoid(
        coords,
        (height * u(0.6, 0.8), -u(0.3, 0.45) * by, u(-0.05, 0.1) * bx),
        (height * u(0.25, 0.35), u(0.25, 0.35) * by, u(0.3, 0.4) * bx),
    )
    liver = (np.minimum(right_lobe, left_lobe) + lobulation <= 1) & (body_r <= inner_muscle - 0.03)
    liver &= ~np.broadcast_to(x > 0.45 * bx, shape) & ~reserved  # keep clear of spleen and vessels
    liver_hu = 55.0 + u(-10, 15)
    hu[liver] = liver_hu

    # Portal/hepatic vessels inside the liver (brighter tubes).
    for _ in range(int(rng.integers(3, 6))):
        c = (u(0.2, 0.9) * height, u(-0.3, 0.3) * by, -u(0.2, 0.5) * bx)
        vessel = _ellipsoid(coords, c, (u(20, 60), u(2.5, 5), u(2.5, 5)))
        hu[(vessel <= 1) & liver] = liver_hu + u(40, 80)

    # Partial volume (a slight blur of the sharp label painting) and CT-like correlated noise.
    hu = ndimage.gaussian_filter(hu, sigma=(0.3, 0.7, 0.7))
    noise_std = u(8.0, 15.0)
    hu += noise_std * correlated_noise(rng, shape, (0.3, 0.8, 0.8))
    return hu.astype(np.float32), liver.astype(np.uint8)
