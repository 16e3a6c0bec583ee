"""Shared test fixtures: a tiny randomly initialised BERT text encoder saved as a local
Hugging Face folder (nothing is downloaded), and tiny LSMS configs/models built on it."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    """Path of a tiny random BERT folder (config, weights, vocab) loadable with AutoModel/AutoTokenizer."""
    from lsms_core.testing import make_tiny_text_encoder

    return make_tiny_text_encoder(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture()
def tiny_config(tiny_encoder_dir):
    from lsms_core.testing import tiny_config

    return tiny_config(tiny_encoder_dir)


@pytest.fixture()
def tiny_model(tiny_config):
    from lsms_core.model import LSMS

    return LSMS(tiny_config)


def _biased_model(config, present: bool):
    """A tiny LSMS whose mask and presence heads are biased to always (or never) answer "here".

    Random tiny weights answer unpredictably; a strong bias makes the model's answer known (the
    whole body in the segmented slices, or nothing) while everything else stays the real model.
    """
    import torch

    from lsms_core.model import LSMS

    model = LSMS(config)
    bias = 12.0 if present else -12.0
    with torch.no_grad():
        for head in (model.decoder.heads[0], model.presence_head.mlp[-1]):
            head.weight.zero_()
            head.bias.fill_(bias)
    return model.eval()


@pytest.fixture(scope="session")
def biased_model():
    """``biased_model(config, present)``: a tiny LSMS that always (present=True) or never finds a
    lesion (see :func:`_biased_model`). Session-scoped so module-scoped fixtures can use it."""
    return _biased_model


@pytest.fixture()
def one_torch_thread():
    """Tiny models run as fast on one thread, and far faster when other processes share the cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
