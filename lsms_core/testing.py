"""Test helpers: a tiny, randomly initialised BERT text encoder and a tiny LSMS configuration.

Nothing here is downloaded. :func:`make_tiny_text_encoder` writes a complete Hugging Face folder
(``config.json``, weights, ``vocab.txt`` and tokenizer files) that ``AutoModel`` /
``AutoTokenizer.from_pretrained(folder, local_files_only=True)`` load like any real encoder, so
tests, examples and the plugin's tests exercise the real loading path in well under a second.

Example::

    from lsms_core.testing import make_tiny_text_encoder, tiny_config
    from lsms_core.model import LSMS

    folder = make_tiny_text_encoder("/tmp/tiny_bert")
    model = LSMS(tiny_config(folder))
"""

from __future__ import annotations

import os
from pathlib import Path

#: Special tokens first (BERT's conventional order), then the words of liver-lesion expressions.
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB_WORDS = (
    "the a an lesion lesions tumor tumour mass nodule metastasis cyst large small larger smaller "
    "largest smallest biggest big tiny hypodense hyperdense isodense hypoattenuating dark bright "
    "left right lobe liver hepatic caudate superior inferior anterior posterior medial lateral "
    "segment dome near both all in of and no not upper lower middle central peripheral "
    "cm mm size with without at on to is one two three only first second third "
    "round irregular edge margin capsule vessel portal vein"
).split()
PUNCTUATION = list(".,;:-()/")
DIGITS = [str(d) for d in range(10)]
#: Roman numerals for Couinaud segments (I..VIII), lower-cased as the tokenizer lower-cases input.
ROMAN = ["i", "ii", "iii", "iv", "v", "vi", "vii", "viii"]


def tiny_vocab() -> list[str]:
    """The tiny tokenizer's vocabulary: special tokens, words, digits, Roman numerals, punctuation."""
    seen: dict[str, None] = {}
    for token in [*SPECIAL_TOKENS, *VOCAB_WORDS, *DIGITS, *ROMAN, *PUNCTUATION]:
        seen.setdefault(token, None)
    return list(seen)


def make_tiny_text_encoder(
    folder: str | os.PathLike,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 64,
    seed: int = 0,
) -> Path:
    """Save a tiny randomly initialised ``BertModel`` and its ``BertTokenizer`` into ``folder``.

    The weights are seeded (``seed``), so two calls give identical folders. Returns the folder.
    """
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    from lsms_core.text_encoder import quiet_transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")

    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    fork_devices: list = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = BertModel(config)
    tokenizer = BertTokenizer(vocab=str(vocab_file), do_lower_case=True, model_max_length=64)
    with quiet_transformers():
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def randomise_batch_norm(model, seed: int = 0) -> None:
    """Give every ``BatchNorm2d`` of ``model`` non-trivial statistics and affine weights, as after
    training, so that folding them into the convolutions is not a no-op."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in model.modules():
            if isinstance(norm, torch.nn.BatchNorm2d):
                n = norm.num_features
                norm.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                norm.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                norm.weight.copy_(torch.randn(n, generator=g) * 0.3 + 1.0)
                norm.bias.copy_(torch.randn(n, generator=g) * 0.3)


def tiny_config(text_encoder_dir: str | os.PathLike, **overrides):
    """A tiny, fast :class:`~lsms_core.model.LSMSConfig` using the encoder in ``text_encoder_dir``.

    Small widths and one block per stage, ``image_size=64``; any field can be overridden by keyword.
    """
    from lsms_core.model import LSMSConfig

    fields = dict(
        text_encoder=str(text_encoder_dir),
        image_size=64,
        embed_dims=(8, 16, 24, 32),
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 2, 2),
        mlp_ratio=2.0,
        decoder_skip_dim=8,
        decoder_dim=16,
        embed_dim=16,
        max_text_length=32,
    )
    fields.update(overrides)
    return LSMSConfig(**fields)
