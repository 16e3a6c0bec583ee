"""Volume inference: one referring expression -> one 3D lesion mask.

:class:`Segmenter` loads a model once and segments whole CT volumes slice by slice:

1. validate the input (3D, finite HU values, a non-empty expression);
2. reorient a :class:`~lsms_core.io.Volume` to the canonical LPS grid the model was trained on
   (plain arrays are taken as already canonical);
3. encode the expression **once** and reuse the features for every batch;
4. run only the slices that contain the body (``HU > -500`` over a small fraction of the slice) in
   the requested slice range, in batches of ``k``-slice stacks prepared exactly as in training
   (:func:`lsms_core.data.dataset.prepare_slices`);
5. upsample the probabilities to the slice size and post-process in 3D (:func:`postprocess`):
   threshold, gate each slice by its presence score, then keep the single most probable connected
   component for a singular expression ("the largest lesion") or every component above a minimum
   size for a plural one ("all lesions");
6. map the mask back onto the input grid.

torch is imported lazily (the napari plugin imports this module at start-up).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from lsms_core.io import Volume
    from lsms_core.model import LSMS

#: Probability threshold of the mask and of the presence gate: a voxel is foreground, and a slice
#: may hold the lesion, when its probability is *above* it. The 2D evaluation
#: (:mod:`lsms_core.evaluate`) scores with the same rule.
THRESHOLD = 0.5

#: Slices whose fraction of voxels above ``BODY_HU`` is below ``BODY_MIN_FRACTION`` are skipped.
BODY_HU = -500.0
BODY_MIN_FRACTION = 0.02


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------


class DeviceOutOfMemoryError(RuntimeError):
    """The device ran out of memory; the message says what to change (batch size, device)."""


def available_devices() -> list[str]:
    """Devices this machine can run the model on, best first: ``cuda`` (and ``cuda:N`` for several
    GPUs), ``mps``, ``cpu``. The napari device picker shows these (plus ``"auto"``)."""
    import torch

    devices = []
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        devices.append("cuda")
        if n > 1:
            devices.extend(f"cuda:{i}" for i in range(n))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    devices.append("cpu")
    return devices


def resolve_device(device: str = "auto") -> torch.device:
    """Turn ``"auto"`` (cuda, then mps, then cpu) or a device name into a ``torch.device``.

    Raises ``ValueError`` listing the available devices for an unknown or unavailable one.
    """
    import torch

    available = available_devices()
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device(available[0])
    if name == "cuda:0" and "cuda" in available:
        name = "cuda"
    if name not in available:
        raise ValueError(
            f"device {device!r} is not available on this machine; choose one of: "
            f"{', '.join(['auto', *available])}"
        )
    return torch.device(name)


# --------------------------------------------------------------------------------------------
# Result and post-processing
# --------------------------------------------------------------------------------------------


@dataclass
class SegmentationResult:
    """The answer of :meth:`Segmenter.segment`.

    Attributes:
        mask: ``(z, y, x)`` uint8 on the input's grid (1 = the lesion(s) the text refers to).
        slice_scores: ``(z,)`` float32 presence probability of each input slice (0 for skipped
            slices; for sagittal/coronal input, the maximum over the model's slices crossing it).
        found: False when no voxel is left ("not found").
        cancelled: True when ``should_cancel()`` stopped the run (the mask is then empty).
        text: the expression.
        model_version: the model card's version (None for an unsaved model).
        elapsed_s: wall-clock seconds of :meth:`Segmenter.segment`.
        probability: ``(z, y, x)`` float32 foreground probability on the input grid when requested.
        timings: seconds per stage (``prepare``, ``model``, ``postprocess``).
    """

    mask: np.ndarray
    slice_scores: np.ndarray
    found: bool
    cancelled: bool
    text: str
    model_version: str | None = None
    elapsed_s: float = 0.0
    probability: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def voxels(self) -> int:
        """Number of mask voxels."""
        return int(np.count_nonzero(self.mask))


def postprocess(
    prob: np.ndarray,
    presence: np.ndarray,
    singular: bool,
    *,
    threshold: float = THRESHOLD,
    presence_threshold: float = THRESHOLD,
    min_size: int = 1,
) -> np.ndarray:
    """Turn a probability volume into the mask the expression refers to (pure function).

    Args:
        prob: ``(z, y, x)`` foreground probabilities.
        presence: ``(z,)`` per-slice presence probabilities; slices not above
            ``presence_threshold`` are emptied (the model says the target is not in that slice).
        singular: True for an expression naming one lesion: keep the single 3D connected component
            with the highest summed probability. False: keep every component of at least
            ``min_size`` voxels.
        threshold: probability threshold (foreground: above it).
        min_size: minimum component size (voxels) for plural expressions.

    Returns:
        uint8 ``(z, y, x)`` mask.
    """
    from scipy import ndimage

    prob = np.asarray(prob)
    presence = np.asarray(presence)
    if prob.ndim != 3 or presence.shape != prob.shape[:1]:
        raise ValueError(
            f"postprocess: prob must be (z, y, x) and presence (z,), got {prob.shape} and {presence.shape}"
        )
    binary = (prob > threshold) & (presence > presence_threshold)[:, None, None]
    mask = np.zeros(prob.shape, dtype=np.uint8)
    boxes = ndimage.find_objects(binary.view(np.uint8))  # [] when nothing is above the thresholds
    if not boxes:
        return mask
    box = boxes[0]
    # Label only inside the box around the foreground: a lesion is a small part of a CT, and
    # labelling the whole volume cost over a second per 512 x 512 x 100 CT.
    binary, prob = binary[box], prob[box]
    labels, n = ndimage.label(binary, structure=np.ones((3, 3, 3), dtype=bool))
    index = np.arange(1, n + 1)
    if singular:
        scores = ndimage.sum_labels(prob, labels, index)
        keep = [int(index[int(np.argmax(scores))])]
    else:
        sizes = ndimage.sum_labels(binary, labels, index)
        keep = index[sizes >= min_size].tolist()
    mask[box] = np.isin(labels, keep)
    return mask


def body_slices(
    hu: np.ndarray, threshold: float = BODY_HU, min_fraction: float = BODY_MIN_FRACTION
) -> np.ndarray:
    """``(z,)`` bool: slices where more than ``min_fraction`` of the voxels are above ``threshold`` HU."""
    # Strided subsampling keeps this cheap on 512x512 slices without changing the answer in practice.
    sub = hu[:, ::4, ::4] if min(hu.shape[1:]) >= 64 else hu
    return (sub > threshold).mean(axis=(1, 2)) > min_fraction


# --------------------------------------------------------------------------------------------
# Segmenter
# --------------------------------------------------------------------------------------------


#: Input scales of every user-facing answer (:class:`Segmenter`, ``lsms predict|evaluate``, the
#: plugin): the model's input size and 1.2x larger, probabilities averaged, the 1.2x pass only on
#: slices not confidently empty (:meth:`~lsms_core.model.LSMS.predict`). Chosen on the validation
#: split; ``(1.0,)`` is one pass, about 1.75x faster (docs/benchmarks.md#multi-scale-inference).
DEFAULT_SCALES: tuple[float, ...] = (1.0, 1.2)


class Segmenter:
    """Segment lesions described in words in whole CT volumes.

    Args:
        model: an :class:`~lsms_core.model.LSMS`, a model file path, or None for the shipped default.
        device: ``"auto"`` (cuda, then mps, then cpu) or a name from :func:`available_devices`.
        batch_size: slices per forward pass.
        min_lesion_mm3: minimum component volume kept for plural expressions.
        scales: input scales whose probabilities are averaged per slice
            (:meth:`~lsms_core.model.LSMS.predict`, gated: the extra scale runs only on slices whose
            first answer is not confidently empty); :data:`DEFAULT_SCALES` by default, ``(1.0,)``
            for one forward pass.
        gate: the extra scales skip slices whose first presence or peak mask probability is below
            it (:meth:`~lsms_core.model.LSMS.predict`; default
            :data:`~lsms_core.model.SCALES_GATE`, chosen on the validation split); ``0`` runs every
            scale on every slice.

    Example::

        seg = Segmenter("my_model.safetensors")
        volume = read_volume("ct.nii.gz")
        result = seg.segment(volume, "the largest lesion in the right lobe")
        write_volume("mask.nii.gz", result.mask, like=volume)
    """

    def __init__(
        self,
        model: LSMS | str | os.PathLike | None = None,
        device: str = "auto",
        batch_size: int = 8,
        min_lesion_mm3: float = 20.0,
        scales: tuple[float, ...] = DEFAULT_SCALES,
        gate: float | None = None,
    ):
        from lsms_core.model import check_gate, check_scales, preferred_memory_format

        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.scales = check_scales(scales)
        self.gate = check_gate(gate)
        self.device = resolve_device(device)
        if model is None or isinstance(model, (str, os.PathLike)):
            from lsms_core.checkpoint import load_model

            model = load_model(None if model is None else Path(model), device=str(self.device))
        self.memory_format = preferred_memory_format(self.device)
        # Batch norm folded into the convolutions: the same masks, faster. A given model is moved to
        # the device (as before) but otherwise left as it is; the copy shares its text encoder.
        self.model = model.to(self.device).fused_for_inference().to(memory_format=self.memory_format)
        self.config = model.config
        self.batch_size = batch_size
        self.min_lesion_mm3 = float(min_lesion_mm3)

    @property
    def model_version(self) -> str | None:
        card = getattr(self.model, "model_card", None)
        return card.get("version") if isinstance(card, dict) else None

    def segment(
        self,
        volume: Volume | np.ndarray,
        text: str,
        *,
        slices: tuple[int, int] | None = None,
        progress: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        return_probability: bool = False,
        scales: tuple[float, ...] | None = None,
    ) -> SegmentationResult:
        """Segment what ``text`` refers to in ``volume`` (HU, ``(z, y, x)``).

        Args:
            volume: a :class:`~lsms_core.io.Volume` (reoriented to canonical internally) or an
                array taken as already canonical.
            text: the referring expression.
            slices: ``(z0, z1)`` range of input slices (z0 inclusive, z1 exclusive) to segment.
            progress: called as ``progress(done, total)`` with slice counts, once before the first
                batch and after every batch.
            should_cancel: checked between batches; when it returns True the run stops and the
                result has ``cancelled=True`` and an empty mask.
            return_probability: also return the probability volume (float32, input grid).
            scales: input scales for this call (default: the Segmenter's ``scales``).
        """
        from lsms_core.data.expressions import expression_number
        from lsms_core.io import Volume, from_canonical, to_canonical
        from lsms_core.model import check_scales

        start = time.perf_counter()
        text = _check_text(text)
        scales = self.scales if scales is None else check_scales(scales)
        original = volume if isinstance(volume, Volume) else None
        array = _check_array(original.array if original is not None else volume)
        z_range = _check_range(slices, array.shape[0])

        if original is not None:
            canonical = to_canonical(original)
            hu, spacing = canonical.array, canonical.spacing
            wanted = _canonical_slice_selection(original, z_range)
        else:
            hu, spacing = array, (1.0, 1.0, 1.0)
            wanted = _range_mask(z_range, hu.shape[0])
        todo = np.flatnonzero(wanted & body_slices(hu))
        timings = {"prepare": time.perf_counter() - start}

        prob, presence, cancelled = self._predict(hu, todo, text, scales, timings, progress, should_cancel)

        t0 = time.perf_counter()
        if cancelled:
            mask = np.zeros(hu.shape, dtype=np.uint8)
        else:
            min_size = max(1, math.ceil(self.min_lesion_mm3 / float(np.prod(spacing))))
            singular = expression_number(text) == "singular"
            mask = postprocess(prob, presence, singular, min_size=min_size)
        scores = presence
        if original is not None:
            mask = from_canonical(mask, original)
            mask[: z_range[0]] = 0  # for sagittal/coronal input the range cuts across model slices
            mask[z_range[1] :] = 0
            prob = from_canonical(prob, original) if return_probability else None
            scores = _to_input_slices(presence, original)
        timings["postprocess"] = time.perf_counter() - t0

        return SegmentationResult(
            mask=mask,
            slice_scores=scores,
            found=bool(mask.any()),
            cancelled=cancelled,
            text=text,
            model_version=self.model_version,
            elapsed_s=time.perf_counter() - start,
            probability=prob if return_probability else None,
            timings=timings,
        )

    def _predict(self, hu, todo, text, scales, timings, progress, should_cancel):
        """Run the model on canonical slices ``todo`` of ``hu`` in batches (averaged over ``scales``).

        Returns ``(prob (z, y, x), presence (z,), cancelled)``; adds ``prepare``/``model`` seconds
        to ``timings``.
        """
        import torch

        from lsms_core.data.dataset import resize_mask_back

        prob = np.zeros(hu.shape, dtype=np.float32)
        presence = np.zeros(hu.shape[0], dtype=np.float32)
        total = int(todo.size)
        timings.setdefault("model", 0.0)
        if progress is not None:
            progress(0, total)
        if total == 0:
            return prob, presence, False
        with torch.inference_mode():
            t0 = time.perf_counter()
            features = self.model.encode_text([text])  # once for the whole volume
            timings["model"] += time.perf_counter() - t0
            for b0 in range(0, total, self.batch_size):
                if should_cancel is not None and should_cancel():
                    return prob, presence, True
                idx = todo[b0 : b0 + self.batch_size]
                t0 = time.perf_counter()
                images = torch.from_numpy(_prepare(hu, idx, self.config))
                images = images.to(self.device, memory_format=self.memory_format)
                t1 = time.perf_counter()
                try:
                    mask_prob, presence_prob = self.model.predict(
                        images, _expand(features, len(idx)), scales, self.gate
                    )
                except RuntimeError as exc:  # torch.OutOfMemoryError (CUDA), MPS "out of memory"
                    if "out of memory" not in str(exc).lower():
                        raise
                    raise DeviceOutOfMemoryError(
                        f"the {self.device.type} device ran out of memory segmenting {len(idx)} slices at once; "
                        "use a smaller batch size (lsms predict --batch-size) or the cpu device"
                    ) from exc
                prob_small = mask_prob[:, 0].cpu().numpy()
                presence[idx] = presence_prob.cpu().numpy()
                t2 = time.perf_counter()
                prob[idx] = resize_mask_back(prob_small, hu.shape[1:])
                timings["prepare"] += (t1 - t0) + (time.perf_counter() - t2)
                timings["model"] += t2 - t1
                if progress is not None:
                    progress(min(b0 + self.batch_size, total), total)
        return prob, presence, False


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _check_text(text) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(
            f"text must be a non-empty referring expression such as 'the largest lesion', got {text!r}"
        )
    return text.strip()


def _check_array(array) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(
            f"volume must be a 3D CT (z, y, x) in HU, got an array of shape {array.shape}; "
            "pass the whole volume, not a single slice"
        )
    if min(array.shape) == 0:
        raise ValueError(f"volume is empty (shape {array.shape})")
    if array.dtype.kind not in "biuf":
        raise ValueError(f"volume must hold numbers (HU), got dtype {array.dtype}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError(
            "volume contains NaN or infinite values; replace them (e.g. with -1024 HU for air) before segmenting"
        )
    return array


def _check_range(slices, n: int) -> tuple[int, int]:
    if slices is None:
        return (0, n)
    try:
        z0, z1 = (int(v) for v in slices)
    except (TypeError, ValueError):
        raise ValueError(f"slices must be a (z0, z1) pair of integers, got {slices!r}") from None
    if not 0 <= z0 < z1 <= n:
        raise ValueError(f"slices {slices!r} must satisfy 0 <= z0 < z1 <= {n} (the volume has {n} slices)")
    return (z0, z1)


def _range_mask(z_range: tuple[int, int], n: int) -> np.ndarray:
    wanted = np.zeros(n, dtype=bool)
    wanted[z_range[0] : z_range[1]] = True
    return wanted


def _canonical_slice_selection(original: Volume, z_range: tuple[int, int]) -> np.ndarray:
    """``(z,)`` bool over the canonical slices: those holding voxels of input slices ``z_range``.

    For axial input the canonical slice axis is the input's (possibly reversed); when the input's
    slice axis becomes an in-plane axis for the model (sagittal or coronal files) every canonical
    slice holds some of the wanted voxels, and the mask is cropped to the range afterwards.
    """
    from lsms_core.io import canonical_axes

    perm, flip = canonical_axes(original.direction)
    if perm[2] != 2:
        return np.ones(original.array.shape[2 - perm[2]], dtype=bool)
    wanted = _range_mask(z_range, original.array.shape[0])
    return wanted[::-1].copy() if flip[2] else wanted


def _to_input_slices(scores: np.ndarray, original: Volume) -> np.ndarray:
    """Map per-canonical-slice scores onto the input's slice axis (max over a slice when the
    input's slice axis is in-plane for the model)."""
    from lsms_core.io import canonical_axes, from_canonical

    perm, flip = canonical_axes(original.direction)
    if perm[2] == 2:
        return scores[::-1].copy() if flip[2] else scores
    shape = tuple(original.array.shape[2 - perm[2 - q]] for q in range(3))
    full = from_canonical(np.broadcast_to(scores[:, None, None], shape), original)
    return full.max(axis=(1, 2)).astype(np.float32)


def _prepare(hu: np.ndarray, indices: np.ndarray, config) -> np.ndarray:
    """``(len(indices), k, S, S)`` float32 model input, exactly as in training.

    Each needed slice is prepared once (neighbouring stacks share slices), with the training
    transform :func:`~lsms_core.data.dataset.prepare_slices`, which treats slices independently.
    """
    from lsms_core.data.dataset import adjacent_slices, prepare_slices

    stacks = np.array([adjacent_slices(int(z), config.in_slices, hu.shape[0]) for z in indices])
    needed, inverse = np.unique(stacks, return_inverse=True)
    prepared = prepare_slices(hu[needed], config.image_size, config.hu_window)
    return np.ascontiguousarray(prepared[inverse.reshape(stacks.shape)])


def _expand(features, n: int):
    """Repeat one encoded expression for a batch of ``n`` slices (a view, no copy)."""
    from lsms_core.text_encoder import TextFeatures

    return TextFeatures(
        features.words.expand(n, -1, -1),
        features.mask.expand(n, -1),
        features.sentence.expand(n, -1),
    )
