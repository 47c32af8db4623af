"""Shared fixtures: tiny real HF models with a character tokenizer, built in-process."""

from __future__ import annotations

import pytest
import torch

from opdistill.config import ModelSpec
from opdistill.models import char_tokenizer, tiny_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer(["0123456789+=,>"])


@pytest.fixture
def make_model(tokenizer):
    def make(seed: int = 0, preset: str = "d16l1", arch: str = "llama"):
        return tiny_model(ModelSpec(preset=preset, arch=arch), tokenizer, seed).eval()

    return make
