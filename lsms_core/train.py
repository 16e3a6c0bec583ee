"""Training LSMS on a referring-segmentation dataset: :class:`TrainConfig` and :class:`Trainer`.

The recipe (see ``docs/training.md``): AdamW (no weight decay on biases, norms and scalars; the
text encoder's trainable layers get their own learning rate ``text_lr``), linear warm-up then
cosine decay, gradient clipping, bf16 autocast on CUDA (fp32 on CPU), validation on the ``val``
split every ``val_every`` epochs with the 2D slice metrics of :mod:`lsms_core.evaluate`, the best
model (by ``monitor``, mIoU by default) kept as ``OUT/model.safetensors``, early stopping after
``patience`` validations without improvement.

Files written into ``out_dir`` (only by rank 0 under DDP; all atomic, no pickle anywhere)::

    model.safetensors + model.json       best model so far (a normal LSMS model file)
    last.safetensors  + last.json        latest checkpoint: weights + sidecar whose "extra" holds
                                         the training state (step, scheduler, RNG, best metric...);
                                         last.json is the checkpoint's commit point
    last_state.safetensors               optimizer state (and torch RNG) as plain tensors
    log.jsonl                            one JSON object per event
    STOP                                 create it to ask a running fit() to stop cleanly

``fit()`` resumes from ``last.*`` when present: same ``out_dir`` -> training continues at the saved
step with the same data order, optimizer, scheduler and RNG state (the same ``TrainConfig`` is
required, except the fields of :data:`RESUME_FREE_FIELDS` and more ``epochs``/``max_steps``). Several GPUs: run the same
command under ``torchrun`` (``python -m torch.distributed.run --nproc_per_node N -m lsms_core.train
--data D --out O``); the process group comes from ``WORLD_SIZE``/``RANK``.

Importing this module is cheap: torch and the model are imported inside the functions, so the
napari plugin can read :class:`TrainConfig` at start-up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import random
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lsms_core._common import dataclass_from_dict

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from lsms_core.model import LSMS, LSMSConfig

logger = logging.getLogger(__name__)

BEST_MODEL = "model.safetensors"
LAST_MODEL = "last.safetensors"
LAST_STATE = "last_state.safetensors"
LAST_CARD = "last.json"
LOG_FILE = "log.jsonl"
STOP_FILE = "STOP"
STATE_FORMAT = "lsms-train-state"
STATE_FORMAT_VERSION = 1

#: ``LSMSConfig`` fields that describe how to train, not the architecture: with ``init_from``
#: they come from the ``model_config`` given to the Trainer, everything else from the saved model.
#: ``image_size`` is here because the weights work at any input size (fully convolutional,
#: normalised coordinates), so a model can be fine-tuned at a higher resolution.
TRAINING_FIELDS = (
    "image_size",
    "text_trainable",
    "text_trainable_layers",
    "seg_bce_weight",
    "seg_dice_weight",
    "deep_supervision_weights",
    "distractor_weight",
    "contrastive_weight",
    "contrastive_distractors",
    "presence_weight",
    "appearance_weight",
)

#: ``LSMSConfig`` switches that add a module of the same name that changes no mask or presence at
#: first (zero-initialised outputs, or a head that writes only its own output), with the fields that
#: size it: with ``init_from`` a switch may be turned on (not off), so a saved model is grown by the
#: module and starts exactly where it was.
GROWABLE_MODULES: dict[str, tuple[str, ...]] = {
    "refine_head": ("refine_dim",),
    "relation_attention": ("relation_layers",),
    "appearance_head": ("appearance_classes",),
    "attention_pooling": ("attention_pooling_heads",),
}
GROWABLE_FIELDS = tuple(f for switch, sizes in GROWABLE_MODULES.items() for f in (switch, *sizes))

#: ``in_slices`` may grow when fine-tuning (more through-plane context, never less): the
#: convolutions that read the input get zero weights for the new outer slices, so the widened model
#: starts exactly where the saved one was (see :func:`widen_input_weight`).
WIDENABLE_FIELD = "in_slices"

#: ``depths`` may grow when fine-tuning (more SVLA blocks per stage, never fewer): the new blocks
#: are appended at the end of their stage and start as identities
#: (:meth:`~lsms_core.model.SVLABlock.reset_to_identity`), so the deepened model starts exactly where
#: the saved one was.
DEEPENABLE_FIELD = "depths"


def deepened(requested, saved) -> bool:
    """Whether ``requested`` (config or dict) has at least as many blocks as ``saved`` in every
    stage and more in one."""
    requested, saved = (c if isinstance(c, dict) else c.to_dict() for c in (requested, saved))
    new, old = tuple(requested.get(DEEPENABLE_FIELD, ())), tuple(saved.get(DEEPENABLE_FIELD, ()))
    return len(new) == len(old) and new != old and all(n >= o for n, o in zip(new, old))


def widen_input_weight(weight, saved_slices: int, slices: int, trailing: int):
    """A convolution weight ``(out, in, kh, kw)`` whose last ``trailing`` input channels are the
    model input (``saved_slices`` adjacent slices, then the coordinate channels), widened to
    ``slices`` adjacent slices: each saved slice keeps its weights at its offset from the centre
    slice (:func:`~lsms_core.data.dataset.adjacent_slices`), the new outer slices get zeros."""
    extra = slices - saved_slices
    lead = weight.shape[1] - trailing  # channels before the input block (refinement head features)
    shift = slices // 2 - saved_slices // 2
    widened = weight.new_zeros(weight.shape[0], weight.shape[1] + extra, *weight.shape[2:])
    widened[:, :lead] = weight[:, :lead]
    widened[:, lead + shift : lead + shift + saved_slices] = weight[:, lead : lead + saved_slices]
    widened[:, lead + slices :] = weight[:, lead + saved_slices :]  # coordinate channels
    return widened


def switched_on(requested, saved) -> list[str]:
    """The :data:`GROWABLE_MODULES` switches on in ``requested`` but off in ``saved`` (configs or dicts)."""
    requested, saved = (c if isinstance(c, dict) else c.to_dict() for c in (requested, saved))
    return [switch for switch in GROWABLE_MODULES if requested.get(switch) and not saved.get(switch)]


def merge_fine_tune_config(saved: dict, requested: dict) -> tuple[dict, list[str]]:
    """The config a fine-tune trains, and what it drops of the request (``LSMSConfig`` dicts).

    The saved model's config with the requested :data:`TRAINING_FIELDS`, the requested
    :data:`GROWABLE_MODULES` switched on, a larger requested ``in_slices`` and deeper requested
    ``depths`` (:func:`deepened`); the second value names (sorted) the other requested fields whose
    values differ from the model's and are therefore not applied.
    """
    merged = dict(saved)
    for name in TRAINING_FIELDS:
        if name in requested and name in merged:
            merged[name] = requested[name]
    for switch in switched_on(requested, merged):
        for name in (switch, *GROWABLE_MODULES[switch]):
            merged[name] = requested[name]
    if requested.get(WIDENABLE_FIELD, 0) > merged.get(WIDENABLE_FIELD, 0):
        merged[WIDENABLE_FIELD] = requested[WIDENABLE_FIELD]
    if deepened(requested, merged):
        merged[DEEPENABLE_FIELD] = requested[DEEPENABLE_FIELD]
    dropped = sorted(k for k in requested if k in merged and requested[k] != merged[k])
    return merged, dropped


EVENTS = ("start", "step", "validation", "checkpoint", "end", "stopped")

#: ``TrainConfig`` fields that may differ when a run is resumed: where and how fast it runs, how
#: often it logs, checkpoints and validates. ``epochs``/``max_steps`` may only extend the run and are
#: checked separately; every other field (batch size, seed, learning rates, schedule, augmentation,
#: splits, monitor, validation subset) must match the checkpoint's, since it changes what a step or
#: the best metric means.
RESUME_FREE_FIELDS = (
    "patience",
    "val_every",
    "val_batch_size",
    "num_workers",
    "cache_cases",
    "device",
    "amp",
    "checkpoint_every_steps",
    "log_every_steps",
)
RESUME_LENGTH_FIELDS = ("epochs", "max_steps")


def monitor_metrics() -> tuple[str, ...]:
    """Names ``TrainConfig.monitor`` accepts: the keys of ``evaluate_model(...)["overall"]``."""
    from lsms_core.metrics import summarize

    return (*summarize([]), "presence_accuracy")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """How to train (the model itself is described by ``LSMSConfig``).

    Attributes:
        epochs: passes over the train split (ignored when ``max_steps`` is set).
        max_steps: total optimizer steps; ``None`` = ``epochs`` x steps per epoch.
        batch_size: slices per step and per process.
        lr: AdamW learning rate of the visual/fusion/decoder parameters.
        text_lr: learning rate of the trainable text-encoder layers (``text_trainable`` != frozen).
        weight_decay: AdamW decoupled weight decay (not applied to biases, norms and scalars).
        warmup_steps: linear warm-up length: an int >= 1 is a number of steps, a value in
            ``[0, 1)`` a fraction of the total steps.
        grad_clip: max global gradient norm (``None`` or 0 = no clipping).
        seed: seeds torch, numpy, random and the data order.
        patience: stop after this many validations without improvement of ``monitor``
            (``None`` or 0 = no early stopping).
        monitor: validation metric to maximise (a key of ``evaluate_model(...)["overall"]``, see
            :func:`monitor_metrics`; checked when the config is built).
        val_every: validate every this many epochs (and always after the last step).
        val_max_items: evaluate at most this many (expression, slice) pairs per validation
            (an evenly spaced deterministic subset); ``None`` = all.
        val_batch_size: batch size of validation.
        num_workers: DataLoader worker processes. Each worker seeds its augmentation from
            (``seed``, epoch, rank, worker id); 0 draws them in the main process (exact resume).
        cache_cases: how many decoded cases to keep in memory; ``None`` = every case of the train
            and validation splits (no CT is decompressed twice; costs about the cases' raw size in RAM).
        device: ``"auto"`` (cuda, then mps, then cpu) or a torch device string.
        amp: bf16 autocast on CUDA; CPU and MPS always train in fp32.
        checkpoint_every_steps: write ``last.*`` every this many steps (also at every
            validation, on stop and at the end); ``None`` or 0 = only then.
        log_every_steps: write every n-th "step" event to ``log.jsonl`` (the callback sees all).
        augment: training-time augmentation of :class:`~lsms_core.data.dataset.SliceDataset`.
        crowded_repeat: how many times per epoch a training item appears whose slice also shows a
            lesion its expression does not refer to (``SliceDataset``'s ``crowded_repeat``); 1 = once.
        decidable_only: leave out the training items whose slice shows the target beside another lesion
            and where only the volume decides which one the words mean (``SliceDataset``'s
            ``decidable_only``): such items can only teach the model to mark both.
        train_split, val_split: split names in the dataset's ``splits.json``.
    """

    epochs: int = 20
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = 3e-4
    text_lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_steps: float = 0.05
    grad_clip: float | None = 1.0
    seed: int = 0
    patience: int | None = 5
    monitor: str = "mIoU"
    val_every: int = 1
    val_max_items: int | None = None
    val_batch_size: int = 16
    num_workers: int = 0
    cache_cases: int | None = None
    device: str = "auto"
    amp: bool = True
    checkpoint_every_steps: int | None = 200
    log_every_steps: int = 10
    augment: bool = True
    crowded_repeat: int = 1
    decidable_only: bool = False
    train_split: str = "train"
    val_split: str = "val"

    def __post_init__(self):
        def bad(name, problem):
            raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {problem}")

        for name in (
            "epochs",
            "batch_size",
            "val_every",
            "val_batch_size",
            "log_every_steps",
            "crowded_repeat",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be an integer >= 1")
        for name in ("max_steps", "val_max_items"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                bad(name, "must be None or an integer >= 1")
        for name in ("patience", "checkpoint_every_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                bad(name, "must be None or an integer >= 0 (0 or None turns it off)")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            bad("num_workers", "must be an integer >= 0")
        if not isinstance(self.decidable_only, bool):
            bad("decidable_only", "must be true or false")
        if self.cache_cases is not None and (not isinstance(self.cache_cases, int) or self.cache_cases < 0):
            bad("cache_cases", "must be None (every train/val case) or an integer >= 0")
        for name in ("lr", "text_lr"):
            if not float(getattr(self, name)) > 0:
                bad(name, "must be a positive learning rate, e.g. 3e-4")
        if float(self.weight_decay) < 0:
            bad("weight_decay", "must be >= 0")
        if float(self.warmup_steps) < 0:
            bad("warmup_steps", "must be >= 0 (steps, or a fraction of the total below 1)")
        if self.grad_clip is not None and float(self.grad_clip) < 0:
            bad("grad_clip", "must be None or >= 0")
        names = monitor_metrics()
        if not isinstance(self.monitor, str) or self.monitor not in names:
            bad("monitor", f"not a validation metric; choose one of {', '.join(names)}")

    def warmup_for(self, total_steps: int) -> int:
        """The warm-up length in steps for a run of ``total_steps``."""
        w = float(self.warmup_steps)
        return int(round(w * total_steps)) if w < 1 else int(w)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build from a dict (e.g. JSON); unknown keys raise a ``ValueError`` naming them."""
        return dataclass_from_dict(cls, d)


# --------------------------------------------------------------------------------------------
# Safe (pickle-free) serialisation of nested states with tensors
# --------------------------------------------------------------------------------------------


def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (e.g. ``optimizer.state_dict()``) into a JSON skeleton and tensors.

    Tensors become ``{"__tensor__": key}`` with the tensor stored under ``key`` in the returned
    dict (for safetensors); tuples become ``{"__tuple__": [...]}``; dicts become
    ``{"__dict__": [[key, value], ...]}`` so that non-string keys (AdamW's integer parameter ids)
    survive JSON. Everything else must be a JSON scalar or list. :func:`unflatten_state` inverts it.
    """
    import torch

    tensors: dict[str, torch.Tensor] = {}

    def encode(value, path):
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().to("cpu").contiguous().clone()
            return {"__tensor__": path}
        if isinstance(value, dict):
            return {"__dict__": [[k, encode(v, f"{path}.{k}")] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"__tuple__": [encode(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, f"{path}.{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalars
            return value.item()
        raise TypeError(f"cannot serialise {type(value).__name__} at {path!r} without pickle")

    return encode(obj, prefix or "state"), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            key = skeleton["__tensor__"]
            if key not in tensors:
                raise ValueError(f"training state refers to tensor {key!r} that the state file lacks")
            return tensors[key]
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        if "__dict__" in skeleton:
            return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
    return skeleton


def _rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """Python, numpy and torch (CPU + CUDA) RNG states: JSON part and tensor part."""
    import numpy as np
    import torch

    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *(np_state[2:])],
    }
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return state, tensors


def _set_rng_state(state: dict, tensors: dict[str, torch.Tensor]) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _augmentation_rng(train_set):
    """The numpy ``Generator`` that drives a SliceDataset's augmentation, if it exposes one.

    Its state is checkpointed so that a resumed run draws the same augmentations as an
    uninterrupted one (with ``num_workers=0``; worker processes get their own copies, reseeded by
    :func:`_seed_augmentation_worker`).
    """
    import numpy as np

    rng = getattr(train_set, "augmentation_rng", None)
    return rng if isinstance(rng, np.random.Generator) else None


def _seed_augmentation_worker(worker_id: int, *, seed: int, epoch: int, rank: int) -> None:
    """DataLoader ``worker_init_fn`` (``num_workers > 0``): give this worker's copy of the dataset
    its own augmentation generator, seeded from (``seed``, ``epoch``, ``rank``, worker id).

    Without it every worker would start from the same copied generator state (the main process's
    one, which never advances when workers load), so workers would repeat each other's draws and
    every epoch would repeat the previous one.
    """
    import numpy as np
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    dataset = info.dataset if info is not None else None
    if _augmentation_rng(dataset) is not None:
        key = [int(v) & (2**64 - 1) for v in (seed, epoch, rank, worker_id)]  # SeedSequence wants >= 0
        dataset.augmentation_rng = np.random.default_rng(key)


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (CPU and CUDA)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Helpers: devices, distributed context, schedule, JSON-safe values
# --------------------------------------------------------------------------------------------


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """Like :func:`lsms_core.infer.resolve_device` (``"auto"``: cuda, then mps, then cpu; an
    unavailable device raises ``ValueError`` listing the available ones), but a CUDA device without
    an index becomes ``cuda:LOCAL_RANK`` so that each torchrun process gets its own GPU."""
    import torch

    from lsms_core.infer import resolve_device as resolve

    device = resolve(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


@dataclass
class _DistContext:
    """Where this process sits in a ``torchrun`` job (world size 1 without one)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> _DistContext:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _jsonable(value: Any) -> Any:
    """Plain Python values (floats, ints, lists, dicts) from tensors/numpy; NaN/inf -> None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # tensors, numpy values
        value = value.tolist()
        if isinstance(value, list):
            return _jsonable(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _stop_requested(path: Path, should_stop: Callable[[], bool] | None) -> bool:
    return path.exists() or bool(should_stop is not None and should_stop())


# --------------------------------------------------------------------------------------------
# Data checks
# --------------------------------------------------------------------------------------------


def open_training_data(data, train_split: str = "train"):
    """Open the dataset folder ``data`` and check it can be trained on, before any work starts.

    Raises ``FileNotFoundError``/``ValueError`` naming the folder: missing folder or
    ``dataset.json`` (from :class:`~lsms_core.data.dataset.ReferringDataset`), no cases in the
    train split, or no referring expressions for them.
    """
    from lsms_core.data.dataset import ReferringDataset

    if isinstance(data, ReferringDataset):
        dataset = data
    else:
        root = Path(data)
        if not root.is_dir():
            raise FileNotFoundError(f"training data folder {root} does not exist; pass a dataset folder")
        if not (root / "dataset.json").is_file():
            raise ValueError(
                f"{root} is not an LSMS dataset: it has no dataset.json. Create one with "
                "`lsms data synth`, `lsms data import` or lsms_core.data.dataset.DatasetWriter"
            )
        dataset = ReferringDataset(root)
    root = dataset.root
    cases = dataset.split(train_split)  # a missing split raises a clear ValueError
    if not cases:
        raise ValueError(
            f"the {train_split!r} split of {root} has no cases; list training cases under "
            f"{train_split!r} in splits.json (e.g. DatasetWriter.make_splits)"
        )
    if not dataset.expressions(train_split):
        raise ValueError(
            f"the {train_split!r} cases of {root} have no referring expressions in expressions.jsonl; "
            "add expressions (DatasetWriter.add_expressions) before training"
        )
    return dataset


def _split_has_expressions(dataset, split: str) -> bool:
    """True when ``split`` exists in the dataset and has at least one expression."""
    try:
        return bool(dataset.split(split)) and bool(dataset.expressions(split))
    except ValueError:  # no such split
        return False


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


class Trainer:
    """Train (or fine-tune) an LSMS model on a dataset folder.

    Args:
        model_config: the architecture and training-related model options (``LSMSConfig``). With
            ``init_from`` the saved model's config wins for the architecture; only the
            :data:`TRAINING_FIELDS` (text-encoder trainability, loss weights) are taken from here.
            May be ``None`` with ``init_from``.
        train_config: a :class:`TrainConfig`.
        data: a dataset folder (``dataset.json``, ``splits.json``...): the ``train`` split trains,
            the ``val`` split validates. An empty ``val`` split is allowed: validation then runs
            on the train split, with a warning (early stopping then tracks training fit).
        out_dir: the run folder (checkpoints, best model, logs). Re-using it resumes the run.
        callback: called with each progress event (a JSON-serialisable dict, see ``docs/training.md``).
            Only rank 0 calls it. An exception raised by it aborts ``fit()`` (the last checkpoint stays).
        init_from: a saved LSMS model (``NAME.safetensors``) to fine-tune.
        should_stop: polled after every step; returning True stops cleanly (checkpoint written,
            event ``"stopped"``). Creating the file ``OUT/STOP`` does the same.

    Every input problem (dataset, model file, config) raises before any training work starts.
    """

    def __init__(
        self,
        model_config: LSMSConfig | None,
        train_config: TrainConfig,
        data: str | os.PathLike,
        out_dir: str | os.PathLike,
        callback: Callable[[dict], None] | None = None,
        init_from: str | os.PathLike | None = None,
        should_stop: Callable[[], bool] | None = None,
    ):
        if not isinstance(train_config, TrainConfig):
            raise ValueError(f"train_config must be a TrainConfig, got {type(train_config).__name__}")
        if model_config is None and init_from is None:
            raise ValueError("model_config is required unless init_from names a saved model to fine-tune")
        self.train_config = train_config
        self.model_config = model_config
        self.out_dir = Path(out_dir)
        self.callback = callback
        self.should_stop = should_stop
        self.dist = _DistContext.from_env()

        self.dataset = open_training_data(data, train_config.train_split)
        self.dataset.cache_size = self._cases_to_cache()
        self.data_fingerprint = self.dataset.fingerprint()

        self.init_from: Path | None = None
        self.init_card: dict | None = None
        if init_from is not None:
            from lsms_core.checkpoint import _weights_path, read_model_card

            self.init_from = _weights_path(init_from)
            self.init_card = read_model_card(self.init_from)  # clear error if it is not our model

        self.val_split = train_config.val_split
        if not _split_has_expressions(self.dataset, self.val_split):
            warnings.warn(
                f"the {self.val_split!r} split of {self.dataset.root} has no cases or no expressions; "
                f"validating on the {train_config.train_split!r} split instead (add validation cases to "
                "splits.json for an honest early-stopping signal)",
                UserWarning,
                stacklevel=2,
            )
            self.val_split = train_config.train_split

    # ---------------------------------------------------------------- paths

    def _cases_to_cache(self) -> int:
        tc = self.train_config
        if tc.cache_cases is not None:
            return tc.cache_cases
        splits = self.dataset.splits
        every = len(set(splits.get(tc.train_split, [])) | set(splits.get(tc.val_split, [])))
        return max(self.dataset.cache_size, every)

    @property
    def best_model_path(self) -> Path:
        return self.out_dir / BEST_MODEL

    @property
    def last_model_path(self) -> Path:
        return self.out_dir / LAST_MODEL

    @property
    def stop_file(self) -> Path:
        return self.out_dir / STOP_FILE

    # ---------------------------------------------------------------- setup

    def _resolve_model_config(self) -> LSMSConfig:
        """The config to build: the saved model's architecture + our training fields (init_from)."""
        from lsms_core.model import LSMSConfig

        if self.init_card is None:
            return self.model_config
        from lsms_core.checkpoint import _resolve_text_encoder_dir

        saved = LSMSConfig.from_dict(self.init_card["config"])
        # A relative encoder folder is relative to the saved model (as load_model finds it); the
        # models this run saves elsewhere need the folder's real path.
        _resolve_text_encoder_dir(saved, self.init_from)
        if self.model_config is None:
            return saved
        merged, ignored = merge_fine_tune_config(saved.to_dict(), self.model_config.to_dict())
        if self.init_card.get("includes_text_encoder") and merged.get("text_trainable") == "frozen":
            logger.warning(
                "%s has a fine-tuned text encoder; keeping text_trainable=%r so its weights stay in "
                "the saved models",
                self.init_from,
                saved.text_trainable,
            )
            merged["text_trainable"] = saved.text_trainable
            merged["text_trainable_layers"] = saved.text_trainable_layers
        if ignored:
            logger.info("init_from %s: its config wins for %s", self.init_from, ", ".join(ignored))
        return LSMSConfig.from_dict(merged)

    def _build_model(self, config: LSMSConfig, device) -> LSMS:
        from lsms_core.model import LSMS

        if self.init_from is None:
            return LSMS(config).to(device)
        from lsms_core.checkpoint import load_model
        from lsms_core.text_encoder import apply_trainable_policy

        model = load_model(self.init_from, device=device)
        if (
            switched_on(config, model.config)
            or config.in_slices != model.config.in_slices
            or deepened(config, model.config)
        ):
            model = self._grow(model, config).to(device)
        model.config = config
        apply_trainable_policy(model.text_encoder, config.text_trainable, config.text_trainable_layers)
        logger.info("fine-tuning %s (text encoder: %s)", self.init_from, config.text_trainable)
        return model

    @staticmethod
    def _grow(saved: LSMS, config: LSMSConfig) -> LSMS:
        """A model built from ``config`` holding every weight of ``saved``; only the modules that
        ``GROWABLE_FIELDS`` switched on and the blocks of deeper ``depths`` are new (and start as
        no-ops), and with a larger ``in_slices`` the convolutions reading the input are widened
        (:func:`widen_input_weight`)."""
        from lsms_core.model import LSMS

        grown = LSMS(config, text_encoder=saved.text_encoder, tokenizer=saved.tokenizer)
        new_blocks = [
            (f"encoder.stages.{i}.{j}.", grown.encoder.stages[i][j])
            for i, depth in enumerate(saved.config.depths)
            for j in range(depth, config.depths[i])
        ]
        new_modules = tuple(f"{switch}." for switch in switched_on(config, saved.config))
        new_modules += tuple(prefix for prefix, _ in new_blocks)
        state = saved.state_dict()
        extra = config.in_slices - saved.config.in_slices
        if extra:
            targets = grown.state_dict()
            trailing = saved.config.in_slices + (2 if saved.config.coord_channels else 0)
            for key, value in state.items():
                wanted = targets.get(key)
                if wanted is not None and value.dim() == 4 and wanted.shape[1] == value.shape[1] + extra:
                    state[key] = widen_input_weight(value, saved.config.in_slices, config.in_slices, trailing)
        missing, unexpected = grown.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith(new_modules) for k in missing):
            raise ValueError(
                f"cannot grow the saved model into the requested config (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}); only {GROWABLE_FIELDS}, a larger {WIDENABLE_FIELD} and "
                f"deeper {DEEPENABLE_FIELD} may change when fine-tuning"
            )
        for _, block in new_blocks:
            block.reset_to_identity()
        logger.info("grown with %s: %d new weight tensors", ", ".join(new_modules), len(missing))
        return grown

    def _param_groups(self, model) -> list[dict]:
        """AdamW groups: decayed weights, non-decayed biases/norms/scalars, text encoder (text_lr)."""
        from lsms_core.checkpoint import TEXT_ENCODER_PREFIX

        tc = self.train_config
        decay, no_decay, text = [], [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith(TEXT_ENCODER_PREFIX):
                text.append(param)
            elif param.ndim <= 1:
                no_decay.append(param)
            else:
                decay.append(param)
        groups = [
            {"name": "decay", "params": decay, "lr": tc.lr, "weight_decay": tc.weight_decay},
            {"name": "no_decay", "params": no_decay, "lr": tc.lr, "weight_decay": 0.0},
            {"name": "text_encoder", "params": text, "lr": tc.text_lr, "weight_decay": tc.weight_decay},
        ]
        return [g for g in groups if g["params"]]

    # ---------------------------------------------------------------- events

    def _emit(self, event: str, **fields) -> None:
        """Send an event to the callback, ``log.jsonl`` and TensorBoard (rank 0 only)."""
        if not self.dist.is_main:
            return
        record = {
            "event": event,
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": self._epoch_number(),
            "epochs": math.ceil(self.total_steps / self.steps_per_epoch),
            "elapsed_s": round(self._elapsed(), 3),
            **fields,
        }
        record = _jsonable(record)
        if event != "step" or self.step % self.train_config.log_every_steps == 0:
            with open(self.out_dir / LOG_FILE, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key in ("loss", "lr"):
                if record.get(key) is not None:
                    self._tb.add_scalar(f"train/{key}", record[key], self.step)
            overall = (record.get("metrics") or {}).get("overall") or {}
            for key, value in overall.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"val/{key}", value, self.step)
        if self.callback is not None:
            self.callback(record)

    def _epoch_number(self) -> int:
        """1-based epoch of the latest step (0 before the first step)."""
        return math.ceil(self.step / self.steps_per_epoch)

    def _elapsed(self) -> float:
        return self._elapsed_before + (time.monotonic() - self._t0)

    @staticmethod
    def _open_tensorboard(folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(log_dir=str(folder / "tensorboard"))

    # ---------------------------------------------------------------- checkpoints

    def _training_state(self, finished: bool, reason: str | None) -> dict:
        return {
            "format": STATE_FORMAT,
            "format_version": STATE_FORMAT_VERSION,
            "step": self.step,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.dist.world_size,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "bad_validations": self.bad_validations,
            "last_validation_step": self.last_validation_step,
            "last_metrics": self.last_metrics,
            "elapsed_s": self._elapsed(),
            "finished": finished,
            "reason": reason,
            "monitor": self.train_config.monitor,
            "val_split": self.val_split,
            "train_config": self.train_config.to_dict(),
        }

    def _tagged(self, name: str, step: int) -> Path:
        """The step-tagged file a checkpoint at ``step`` writes before its commit, e.g.
        ``last-step00000200.safetensors`` for ``last.safetensors``."""
        stem = name[: -len(".safetensors")]
        return self.out_dir / f"{stem}-step{step:08d}.safetensors"

    def _remove_stale_tagged(self) -> None:
        """Remove step-tagged checkpoint files left by an interrupted checkpoint write."""
        pattern = re.compile(r"(last|last_state)-step\d+\.safetensors")
        for path in self.out_dir.iterdir():
            if pattern.fullmatch(path.name):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _save_checkpoint(self, finished: bool = False, reason: str | None = None) -> None:
        """Write the checkpoint of the current step (rank 0); ``last.json`` is its commit point.

        1. ``last_state-stepN.safetensors`` (optimizer, scheduler tensors, torch RNG) and
           ``last-stepN.safetensors`` (weights), both with ``step`` N in their header;
        2. ``last.json`` (sidecar + training state of step N), atomically: the commit;
        3. the step-tagged files are renamed to ``last_state.safetensors`` / ``last.safetensors``.

        A crash or a full disk before 2 leaves the previous checkpoint whole (its ``last.json``,
        ``last.safetensors`` and ``last_state.safetensors``); one after 2 leaves the step-tagged files,
        which :meth:`_read_checkpoint` finds. Either way the run resumes from a consistent checkpoint.
        """
        if self.dist.is_main:
            from safetensors.torch import save_file

            from lsms_core._atomic import atomic_path, atomic_write_json
            from lsms_core.checkpoint import model_card, write_weights

            step = self.step
            rng_json, rng_tensors = _rng_state()
            opt_skeleton, tensors = flatten_state(
                {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
            )
            tensors.update(rng_tensors)
            state_file, weights_file = self._tagged(LAST_STATE, step), self._tagged(LAST_MODEL, step)
            with atomic_path(state_file) as tmp:
                save_file(tensors, str(tmp), metadata={"format": STATE_FORMAT, "step": str(step)})
            write_weights(self.raw_model, weights_file, metadata={"step": str(step)})
            state = self._training_state(finished, reason)
            aug_rng = _augmentation_rng(self.train_set)
            rng_json["augmentation"] = aug_rng.bit_generator.state if aug_rng is not None else None
            state.update(optimizer_skeleton=opt_skeleton, rng=rng_json)
            card = model_card(
                self.raw_model,
                metrics=self.last_metrics or {},
                data_fingerprint=self.data_fingerprint,
                extra={"training_state": state},
            )
            atomic_write_json(self.out_dir / LAST_CARD, card)  # the commit point
            os.replace(weights_file, self.last_model_path)
            os.replace(state_file, self.out_dir / LAST_STATE)
            self._remove_stale_tagged()
            self._last_checkpoint_step = step
            self._emit("checkpoint", path=str(self.last_model_path), finished=finished)
        self._barrier()

    def _read_checkpoint(self) -> dict | None:
        """The saved training state of ``out_dir`` (``None`` when there is no checkpoint).

        ``last.json`` says which step is committed; its weights and optimizer state are the
        step-tagged files of that step when a crash left them there, else ``last.safetensors`` and
        ``last_state.safetensors``. Sets ``self._resume_files`` to (weights, state file).
        """
        from lsms_core.checkpoint import read_card_file, read_model_card

        card_file = self.out_dir / LAST_CARD
        if not card_file.is_file():
            if self.last_model_path.is_file():
                read_model_card(self.last_model_path)  # raises: weights without their sidecar
            return None  # (step-tagged files alone: a first checkpoint that never committed)
        card = read_card_file(card_file)
        state = (card.get("extra") or {}).get("training_state")
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"{self.last_model_path} is a model file but not a training checkpoint (no training "
                "state in its sidecar); use another --out folder or remove last.safetensors/last.json"
            )
        step = int(state["step"])
        found = []
        for name in (LAST_MODEL, LAST_STATE):
            tagged = self._tagged(name, step)
            found.append(tagged if tagged.is_file() else self.out_dir / name)
        for path in found:
            if not path.is_file():
                raise ValueError(
                    f"{path} is missing, so the checkpoint in {self.out_dir} cannot be resumed; remove "
                    "last.* to start over in this folder or use a new --out folder"
                )
        self._resume_files = tuple(found)
        state["config"] = card["config"]
        return state

    def _check_resume_config(self, state: dict) -> None:
        """Refuse to resume with a ``TrainConfig`` that changes what a step means (see
        :data:`RESUME_FREE_FIELDS`); ``epochs``/``max_steps`` are checked by :meth:`_check_resume_length`."""
        saved = state.get("train_config")
        if not isinstance(saved, dict):  # a checkpoint without its config: nothing to compare
            return
        current = json.loads(json.dumps(self.train_config.to_dict()))
        # A field newer than the checkpoint had its default value then.
        saved = {**json.loads(json.dumps(TrainConfig().to_dict())), **saved}
        ignored = set(RESUME_FREE_FIELDS) | set(RESUME_LENGTH_FIELDS)
        differing = [
            f"{name} (saved {saved[name]!r}, now {current[name]!r})"
            for name in current
            if name not in ignored and saved[name] != current[name]
        ]
        if differing:
            raise ValueError(
                f"cannot resume the run in {self.out_dir} with a different TrainConfig: "
                + ", ".join(differing)
                + ". These fields change what a step or the best metric means; pass the saved values "
                f"(extra.training_state.train_config in {self.out_dir / LAST_CARD}) or use a new --out "
                f"folder. Only epochs/max_steps (to extend the run) and {', '.join(RESUME_FREE_FIELDS)} "
                "may change on resume"
            )

    def _check_resume_length(self, state: dict) -> None:
        """A resumed run may be extended (more epochs/max_steps), not shortened."""
        saved_total = state.get("total_steps")
        if isinstance(saved_total, int) and self.total_steps < saved_total:
            saved = state.get("train_config") or {}
            fields = ", ".join(
                f"{name} (saved {saved.get(name)!r}, now {getattr(self.train_config, name)!r})"
                for name in RESUME_LENGTH_FIELDS
            )
            raise ValueError(
                f"cannot resume the run in {self.out_dir} with fewer total steps ({self.total_steps} < "
                f"{saved_total}: {fields}); a resumed run can only be extended. Pass the saved values "
                "or more, or use a new --out folder"
            )

    def _restore(self, state: dict) -> None:
        """Load weights, optimizer, scheduler, RNG and bookkeeping from a checkpoint."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        from lsms_core.checkpoint import TEXT_ENCODER_PREFIX

        weights_file, state_file = self._resume_files
        step = int(state["step"])
        with safe_open(str(weights_file), framework="pt") as fh:
            weights_step = (fh.metadata() or {}).get("step")  # absent in checkpoints of older versions
        weights = load_file(str(weights_file), device="cpu")
        missing, unexpected = self.raw_model.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.startswith(TEXT_ENCODER_PREFIX)]
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {weights_file} does not fit the model (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}); remove last.* or use a new --out folder"
            )
        with safe_open(str(state_file), framework="pt") as fh:
            saved_step = int((fh.metadata() or {}).get("step", -1))
        mismatched = [
            f"{path.name} (step {found})"
            for path, found in ((state_file, saved_step), (weights_file, weights_step))
            if found is not None and int(found) != step
        ]
        if mismatched:
            # Only a checkpoint written by an older lsms_core (three files without a commit point)
            # can get here: a kill between its writes. Its files are one checkpoint apart; resuming
            # from last.json's step with them is close to, but not exactly, the uninterrupted run.
            logger.warning(
                "%s and %s (step %s) disagree: the run was killed while an older lsms_core wrote this "
                "checkpoint; resuming from step %s with them (not bit-exact)",
                ", ".join(mismatched),
                LAST_CARD,
                step,
                step,
            )
        tensors = load_file(str(state_file), device="cpu")
        restored = unflatten_state(state["optimizer_skeleton"], tensors)
        self.optimizer.load_state_dict(restored["optimizer"])
        self.scheduler.load_state_dict(restored["scheduler"])
        _set_rng_state(state["rng"], tensors)
        aug_rng = _augmentation_rng(self.train_set)
        if aug_rng is not None and state["rng"].get("augmentation"):
            aug_rng.bit_generator.state = state["rng"]["augmentation"]
        self.step = step
        self.best_metric = state.get("best_metric")
        self.best_step = state.get("best_step")
        self.bad_validations = int(state.get("bad_validations", 0))
        self.last_validation_step = state.get("last_validation_step")
        self.last_metrics = state.get("last_metrics")
        self._elapsed_before = float(state.get("elapsed_s", 0.0))
        self._last_checkpoint_step = self.step
        if state.get("world_size", 1) != self.dist.world_size:
            logger.warning(
                "resuming a run saved with %s processes on %s: the data order differs from an "
                "uninterrupted run",
                state.get("world_size"),
                self.dist.world_size,
            )

    # ---------------------------------------------------------------- distributed

    def _init_distributed(self, device) -> None:
        import torch.distributed as dist

        if self.dist.enabled and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self._owns_process_group = True

    def _barrier(self) -> None:
        if self.dist.enabled:
            import torch.distributed as dist

            dist.barrier()

    def _broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's decision (stop / early stop) for every rank."""
        if not self.dist.enabled:
            return flag
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([1 if flag else 0], device=self.device)
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    # ---------------------------------------------------------------- data

    def _epoch_batches(self, train_set, epoch: int, skip_batches: int) -> Iterator[dict]:
        """Batches of ``epoch`` for this rank, skipping the first ``skip_batches`` (resume).

        The order is a ``DistributedSampler`` permutation seeded by ``seed`` and ``epoch``, so an
        epoch's batches are the same whether the run was interrupted or not. With ``num_workers > 0``
        each worker draws its augmentations from its own (seed, epoch, rank, worker) generator.
        """
        import torch
        from torch.utils.data import DataLoader, DistributedSampler

        tc = self.train_config
        sampler = DistributedSampler(
            train_set, num_replicas=self.dist.world_size, rank=self.dist.rank, shuffle=True, seed=tc.seed
        )
        sampler.set_epoch(epoch)
        indices = list(sampler)[skip_batches * tc.batch_size :]
        generator = torch.Generator().manual_seed(tc.seed * 100_003 + epoch)
        # Workers (if any) reseed their copy of the augmentation generator per (seed, epoch, rank,
        # worker); with num_workers=0 the main process's generator is used as before.
        worker_init_fn = (
            functools.partial(_seed_augmentation_worker, seed=tc.seed, epoch=epoch, rank=self.dist.rank)
            if tc.num_workers
            else None
        )
        loader = DataLoader(
            train_set,
            batch_size=tc.batch_size,
            sampler=indices,
            num_workers=tc.num_workers,
            generator=generator,
            worker_init_fn=worker_init_fn,
            pin_memory=self.device.type == "cuda",
        )
        yield from loader

    def _build_train_set(self, config: LSMSConfig):
        from lsms_core.data.dataset import SliceDataset

        tc = self.train_config
        train_set = SliceDataset(
            self.dataset,
            tc.train_split,
            in_slices=config.in_slices,
            image_size=config.image_size,
            hu_window=tuple(config.hu_window),
            augment=tc.augment,
            seed=tc.seed,
            crowded_repeat=tc.crowded_repeat,
            decidable_only=tc.decidable_only,
            appearance_classes=config.appearance_classes if config.appearance_head else None,
        )
        if config.appearance_head:
            recorded = {
                k
                for case in self.dataset.split(tc.train_split)
                for k in self.dataset.lesion_kinds(case).values()
            }
            if not recorded & set(config.appearance_classes):
                raise ValueError(
                    f"the model has an appearance head for {list(config.appearance_classes)}, but no "
                    f"lesion of the {tc.train_split!r} split of {self.dataset.root} has one of these "
                    "types recorded (dataset.json's provenance.case_details, written by `lsms data "
                    "synth`); train without appearance_head, or on data that records lesion types"
                )
        if len(train_set) == 0:
            raise ValueError(
                f"the {tc.train_split!r} split of {self.dataset.root} yields no (expression, slice) "
                "training items; check that its expressions' target lesions exist in the label maps"
            )
        return train_set

    # ---------------------------------------------------------------- training

    def _train_step(self, model, loss_fn, batch: dict) -> tuple[float, dict, float | None]:
        import torch

        images = batch["image"].to(self.device, memory_format=self.memory_format, non_blocking=True)
        masks = batch["mask"].to(self.device, non_blocking=True)
        distractor, appearance = batch.get("distractor"), batch.get("appearance")
        if distractor is not None:
            distractor = distractor.to(self.device, non_blocking=True)
        if appearance is not None:
            appearance = appearance.to(self.device, non_blocking=True)
        texts = list(batch["text"])
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.train_config.amp and self.device.type == "cuda"
            else contextlib.nullcontext()
        )
        with autocast:
            output = model(images, texts)
            parts = loss_fn(output, masks, distractor, appearance)
        loss = parts["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the training loss became {loss.item()} at step {self.step + 1}; lower TrainConfig.lr "
                "or set grad_clip, and check the data for broken images"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = None
        if self.train_config.grad_clip:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.train_config.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        values = {k: v.detach().float() for k, v in parts.items()}
        if self.dist.enabled:  # report the mean over ranks
            import torch.distributed as dist

            keys = sorted(values)
            stacked = torch.stack([values[k] for k in keys])
            dist.all_reduce(stacked)
            values = dict(zip(keys, stacked / self.dist.world_size))
        values = {k: float(v) for k, v in values.items()}
        return values.pop("loss"), values, grad_norm

    def _validate(self) -> bool:
        """Evaluate on the validation split (rank 0), keep the best model; return early-stop flag."""
        stop = False
        if self.dist.is_main:
            from lsms_core.checkpoint import save_model
            from lsms_core.evaluate import evaluate_model

            tc = self.train_config
            metrics = evaluate_model(
                self.raw_model,
                self.dataset,
                split=self.val_split,
                device=self.device,
                batch_size=tc.val_batch_size,
                max_items=tc.val_max_items,
            )
            overall = metrics.get("overall", {})
            if tc.monitor not in overall:
                raise ValueError(
                    f"TrainConfig.monitor={tc.monitor!r} is not a validation metric; "
                    f"choose one of {sorted(overall)}"
                )
            value = overall[tc.monitor]
            value = float("nan") if value is None else float(value)
            if math.isfinite(value):
                improved = self.best_metric is None or value > self.best_metric
            else:  # e.g. no positive pair evaluated: keep a first model, never count it as progress
                improved = self.best_step is None
            if improved:
                self.best_metric = value if math.isfinite(value) else self.best_metric
                self.best_step = self.step
                self.bad_validations = 0
                save_model(
                    self.raw_model,
                    self.best_model_path,
                    metrics={**_jsonable(overall), "split": self.val_split, "step": self.step},
                    data_fingerprint=self.data_fingerprint,
                    extra={
                        "train_config": tc.to_dict(),
                        "step": self.step,
                        "per_kind": metrics.get("per_kind"),
                    },
                )
            else:
                self.bad_validations += 1
            self.last_metrics = _jsonable(metrics)
            self.last_validation_step = self.step
            stop = bool(tc.patience) and self.bad_validations >= tc.patience
            self._emit(
                "validation",
                metrics=self.last_metrics,
                monitor=tc.monitor,
                value=value,
                best=self.best_metric,
                best_step=self.best_step,
                improved=improved,
                model_path=str(self.best_model_path),
            )
        self.last_validation_step = self.step
        return self._broadcast_flag(stop)

    def _summary(self, reason: str) -> dict:
        return _jsonable(
            {
                "reason": reason,
                "step": self.step,
                "total_steps": self.total_steps,
                "epoch": self._epoch_number(),
                "best_metric": self.best_metric,
                "best_step": self.best_step,
                "monitor": self.train_config.monitor,
                "metrics": self.last_metrics,
                "model_path": str(self.best_model_path) if self.best_model_path.is_file() else None,
                "last_path": str(self.last_model_path),
                "elapsed_s": self._elapsed(),
            }
        )

    def fit(self) -> dict:
        """Train until ``max_steps``/``epochs``, early stopping or a stop request; resume if possible.

        Returns a summary dict: ``reason`` ("completed", "early_stopping" or "stopped"), ``step``,
        ``best_metric``, ``best_step``, ``metrics`` (last validation), ``model_path`` (the best
        model, ``None`` if no validation ran yet), ``elapsed_s``.
        """
        import torch

        from lsms_core.losses import LSMSLoss
        from lsms_core.model import LSMS, LSMSConfig, preferred_memory_format

        tc = self.train_config
        self._t0 = time.monotonic()
        self._elapsed_before = 0.0
        self.device = resolve_device(tc.device, self.dist.local_rank)
        self._owns_process_group = False
        self._init_distributed(self.device)
        try:
            if self.dist.is_main:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                if self.stop_file.exists():  # a request for a previous run
                    self.stop_file.unlink()
            self._barrier()
            checkpoint = self._read_checkpoint()
            if checkpoint is not None:
                self._check_resume_config(checkpoint)
            seed_everything(tc.seed)
            if checkpoint is not None:  # the run's own config wins when resuming
                from lsms_core.checkpoint import _resolve_text_encoder_dir

                config = LSMSConfig.from_dict(checkpoint["config"])
                _resolve_text_encoder_dir(config, self.last_model_path)
                self.raw_model = LSMS(config).to(self.device)
            else:
                config = self._resolve_model_config()
                self.raw_model = self._build_model(config, self.device)
            # channels-last on CPU: a training step ~1.6x faster, same results
            self.memory_format = preferred_memory_format(self.device)
            self.raw_model = self.raw_model.to(memory_format=self.memory_format)
            self.train_set = train_set = self._build_train_set(config)

            per_rank = math.ceil(len(train_set) / self.dist.world_size)
            self.steps_per_epoch = math.ceil(per_rank / tc.batch_size)
            self.total_steps = tc.max_steps or tc.epochs * self.steps_per_epoch
            if checkpoint is not None:
                self._check_resume_length(checkpoint)
            warmup = tc.warmup_for(self.total_steps)
            self.optimizer = torch.optim.AdamW(self._param_groups(self.raw_model), lr=tc.lr)
            total = self.total_steps
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda s: warmup_cosine(s, warmup, total)
            )
            self.step = 0
            self.best_metric = self.best_step = self.last_validation_step = self.last_metrics = None
            self.bad_validations = 0
            self._last_checkpoint_step = None
            if checkpoint is not None:
                self._restore(checkpoint)
            self._tb = self._open_tensorboard(self.out_dir) if self.dist.is_main else None
            return self._run(config, train_set, checkpoint, LSMSLoss(config).to(self.device))
        finally:
            if getattr(self, "_tb", None) is not None:
                self._tb.close()
            if self._owns_process_group:
                import torch.distributed as dist

                dist.destroy_process_group()

    def _run(self, config, train_set, checkpoint: dict | None, loss_fn) -> dict:
        tc = self.train_config
        self._emit(
            "start",
            resumed=checkpoint is not None,
            init_from=str(self.init_from) if self.init_from else None,
            train_items=len(train_set),
            steps_per_epoch=self.steps_per_epoch,
            world_size=self.dist.world_size,
            device=str(self.device),
            val_split=self.val_split,
            train_config=tc.to_dict(),
            model_config=config.to_dict(),
        )
        if checkpoint is not None and checkpoint.get("finished"):
            reason = checkpoint.get("reason") or "completed"
            self._emit("end", reason=reason, best=self.best_metric, model_path=str(self.best_model_path))
            return self._summary(reason)

        model = self.raw_model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # Unused parameters happen with ablation switches or a zero loss weight.
            model = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
        model.train()

        reason = "completed"
        while self.step < self.total_steps:
            epoch = self.step // self.steps_per_epoch
            skip = self.step - epoch * self.steps_per_epoch
            for batch in self._epoch_batches(train_set, epoch, skip):
                loss, parts, grad_norm = self._train_step(model, loss_fn, batch)
                self.step += 1
                self._emit(
                    "step",
                    loss=loss,
                    loss_parts=parts,
                    lr=self.optimizer.param_groups[0]["lr"],
                    grad_norm=grad_norm,
                )
                epoch_done = self.step % self.steps_per_epoch == 0
                last_step = self.step >= self.total_steps
                early_stop = False
                if (epoch_done and (self.step // self.steps_per_epoch) % tc.val_every == 0) or last_step:
                    early_stop = self._validate()
                if early_stop:
                    reason = "early_stopping"
                    break
                if last_step:
                    break
                every = tc.checkpoint_every_steps
                if epoch_done or (every and self.step % every == 0):
                    self._save_checkpoint()
                stop = self._broadcast_flag(
                    self.dist.is_main and _stop_requested(self.stop_file, self.should_stop)
                )
                if stop:
                    if self._last_checkpoint_step != self.step:
                        self._save_checkpoint()
                    self._emit("stopped", reason="stop requested", model_path=str(self.best_model_path))
                    return self._summary("stopped")
            if reason == "early_stopping":
                break

        self._save_checkpoint(finished=True, reason=reason)
        self._emit("end", reason=reason, best=self.best_metric, model_path=str(self.best_model_path))
        return self._summary(reason)


# --------------------------------------------------------------------------------------------
# Minimal entry point (used for torchrun / DDP without the CLI)
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m lsms_core.train --data DIR --out DIR [--config-json FILE] [--init-from MODEL]``.

    The JSON file holds ``{"model": {LSMSConfig fields}, "train": {TrainConfig fields}}`` (both
    optional). Prints the summary as JSON on rank 0. The full-featured command is ``lsms train``.
    """
    import argparse

    from lsms_core.model import LSMSConfig

    parser = argparse.ArgumentParser(prog="python -m lsms_core.train", description=main.__doc__)
    parser.add_argument("--data", required=True, help="dataset folder")
    parser.add_argument("--out", required=True, help="run folder (checkpoints, best model, log)")
    parser.add_argument("--config-json", help='JSON file {"model": {...}, "train": {...}}')
    parser.add_argument("--init-from", help="saved model to fine-tune")
    args = parser.parse_args(argv)

    spec: dict = {}
    if args.config_json:
        path = Path(args.config_json)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            parser.error(f"--config-json {path}: cannot read it as JSON ({err})")
        if not isinstance(spec, dict) or set(spec) - {"model", "train"}:
            parser.error(f'--config-json {path}: expected {{"model": {{...}}, "train": {{...}}}}')
    if "model" in spec:
        model_config = LSMSConfig.from_dict(spec["model"])
    else:  # fine-tuning keeps the saved model's config; training from scratch uses the defaults
        model_config = None if args.init_from else LSMSConfig()
    train_config = TrainConfig.from_dict(spec.get("train", {}))
    summary = Trainer(model_config, train_config, args.data, args.out, init_from=args.init_from).fit()
    if _DistContext.from_env().is_main:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
