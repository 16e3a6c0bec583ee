"""Pictures of the synthetic benchmark for ``docs/data.md`` ("Synthetic benchmark").

Generates a small benchmark with :func:`lsms_core.data.synth.synthesize`, then writes into
``docs/images/``:

* ``synth_<kind>.png`` for each lesion kind: the axial slice through the largest lesion of that kind
  (liver window, level 60 / width 160 HU), cropped around it and enlarged, without and with the
  lesion contour (red) and the liver contour (green);
* ``synth_case.png``: a whole canonical slice of one case with all its lesions outlined;

and prints the generated referring expressions of the cases shown.

    LSMS_TOTALSEG_DIR=/path/to/totalsegmentator-2.18.0 python benchmarks/synth_pictures.py [--cases 8]

(without ``LSMS_TOTALSEG_DIR`` the TotalSegmentator package is downloaded once with pip). Canonical
slices are shown as radiologists view them: the patient's right on the left of the picture,
anterior at the top. PNGs are written with Pillow when installed, else with SimpleITK.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from lsms_core.data.dataset import ReferringDataset
from lsms_core.data.synth import LESION_KINDS, synthesize

LIVER_WINDOW = (-20.0, 140.0)  # level 60, width 160
LESION_RGB = (255, 40, 40)
LIVER_RGB = (40, 220, 40)


def to_rgb(hu: np.ndarray, window=LIVER_WINDOW) -> np.ndarray:
    """A 2D HU slice as uint8 RGB in the given window."""
    grey = np.clip((hu - window[0]) / (window[1] - window[0]), 0.0, 1.0) * 255.0
    return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)


def outline(rgb: np.ndarray, mask: np.ndarray, colour) -> np.ndarray:
    """Paint the one-pixel inner border of ``mask`` in ``colour``."""
    mask = mask.astype(bool)
    rgb = rgb.copy()
    rgb[mask & ~ndimage.binary_erosion(mask)] = colour
    return rgb


def enlarge(rgb: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)


def save_png(rgb: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from PIL import Image
    except ImportError:
        import SimpleITK as sitk

        sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))
    else:
        Image.fromarray(rgb).save(path)


def lesion_picture(hu, liver, lesions, lesion_id, crop: int = 72, factor: int = 4) -> np.ndarray:
    """Side-by-side crop (plain | outlined) through the slice where lesion ``lesion_id`` is largest."""
    mask = lesions == lesion_id
    z = int(np.argmax(mask.sum(axis=(1, 2))))
    cy, cx = (int(c) for c in np.argwhere(mask[z]).mean(axis=0))
    y0 = int(np.clip(cy - crop // 2, 0, max(hu.shape[1] - crop, 0)))
    x0 = int(np.clip(cx - crop // 2, 0, max(hu.shape[2] - crop, 0)))
    box = (z, slice(y0, y0 + crop), slice(x0, x0 + crop))
    plain = to_rgb(hu[box])
    marked = outline(outline(plain, liver[box], LIVER_RGB), lesions[box] > 0, LESION_RGB)
    gap = np.full((plain.shape[0], 2, 3), 255, dtype=np.uint8)
    return enlarge(np.concatenate([plain, gap, marked], axis=1), factor)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "images")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = synthesize(Path(tmp) / "synth", cases=args.cases, seed=args.seed, phantom_fraction=0.25)
        ds = ReferringDataset(root)
        details = json.loads((root / "dataset.json").read_text())["provenance"]["case_details"]
        # The largest lesion of each kind, preferring real anatomies over phantoms.
        best: dict[str, tuple] = {}
        for case_id, info in details.items():
            for lesion in info["lesions"]:
                key = (info["anatomy"] != "phantom", lesion["diameter_mm"])
                if lesion["kind"] not in best or key > best[lesion["kind"]][0]:
                    best[lesion["kind"]] = (key, case_id, lesion["id"])
        shown = []
        for kind in LESION_KINDS:
            if kind not in best:
                print(f"no {kind} in these {args.cases} cases; try more --cases")
                continue
            _, case_id, lesion_id = best[kind]
            case = ds.load_case(case_id, canonical=True)
            picture = lesion_picture(case.image.array, case.organ, case.lesions, lesion_id)
            save_png(picture, args.out / f"synth_{kind}.png")
            shown.append(case_id)
            info = next(les for les in details[case_id]["lesions"] if les["id"] == lesion_id)
            print(
                f"synth_{kind}.png: case {case_id} ({details[case_id]['anatomy']}), lesion {lesion_id}: {info}"
            )

        # A whole slice of the case with the most lesions on real anatomy.
        real = [c for c, info in details.items() if info["anatomy"] != "phantom"] or list(details)
        case_id = max(real, key=lambda c: (len(details[c]["lesions"]), c))
        case = ds.load_case(case_id, canonical=True)
        z = int(np.argmax((case.lesions > 0).sum(axis=(1, 2))))
        rgb = outline(
            outline(to_rgb(case.image.array[z]), case.organ[z], LIVER_RGB), case.lesions[z] > 0, LESION_RGB
        )
        save_png(enlarge(rgb, 2), args.out / "synth_case.png")
        print(f"synth_case.png: case {case_id} ({details[case_id]['anatomy']}), canonical slice {z}")
        shown.append(case_id)

        print("\nGenerated expressions of the cases shown:")
        for record in ds.expressions():
            if record["case"] in shown:
                print(
                    f"  {record['case']}  {str(record['targets']):>9}  {record['kind']:<12} {record['expression']}"
                )


if __name__ == "__main__":
    main()
