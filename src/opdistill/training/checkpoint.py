"""Atomic checkpoints and exact resume.

A checkpoint is ``checkpoints/step_N/``: the model and tokenizer in HF ``save_pretrained`` layout
plus ``trainer_state.pt`` (optimizer, step, training clock, counters). It is written into a temporary
directory and renamed into place, and ``checkpoints/latest`` is replaced atomically afterwards, so a
crash at any moment leaves the previous checkpoint intact. Data order and sampling randomness are
functions of (seed, step), so nothing else is needed to continue bit for bit.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from opdistill.errors import UserError
from opdistill.models import save_model

STATE_FILE = "trainer_state.pt"


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    tokenizer,
    state: dict[str, Any],
    keep: int,
    model_state: dict | None = None,
) -> Path:
    """Write ``checkpoints/step_N`` atomically; ``model_state`` is the full state dict of a sharded model.
    A whole checkpoint of the same step already on disk (a run resumed at its last step saves it again) is
    kept as it is: the same step's state, and no moment without it."""
    root = run_dir / "checkpoints"

    def write(path: Path) -> None:
        save_model(model, tokenizer, path, model_state)
        torch.save(state, path / STATE_FILE)

    for stale in root.glob(".step_*"):  # what a killed session left half-written
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step}"
    if not (final / STATE_FILE).is_file():
        publish(final, write)
    _write_atomic(root / "latest", final.name)
    for old in sorted(root.glob("step_*"), key=_step_of)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def publish(final: Path, write: Callable[[Path], None]) -> Path:
    """Have ``write`` fill a temporary directory beside ``final``, then rename it into place: ``final`` is
    whole or absent at every moment. A failed write (a full disk, no permission) removes the temporary
    directory and says so in one sentence; whatever was there before is untouched."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():  # moved aside, not deleted in place: a kill mid-way would leave half of it
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, SafetensorError) as err:  # safetensors reports a failed write as its own error
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(err, "strerror", None) or str(err).removeprefix("Error while serializing: ")
        raise UserError(
            f"cannot write {final} ({reason}); the checkpoints written before it are intact."
        ) from None
    return final


def latest_checkpoint(run_dir: Path) -> Path:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        raise UserError(f"no checkpoint to resume from in {run_dir} (expected {pointer}).")
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise UserError(f"checkpoint {path} is incomplete (no {STATE_FILE}); remove it or start afresh.")
    return path


def load_state(path: Path) -> dict[str, Any]:
    return torch.load(path / STATE_FILE, weights_only=True)  # tensors and plain data: no code runs


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop records logged after ``max_step`` so a resumed run's logs read as one uninterrupted run."""
    import json

    if not path.is_file():
        return
    text = path.read_text()
    lines = text.split("\n")[:-1]  # a last line without its newline was cut by a kill mid-write: dropped
    kept = [line for line in lines if line and json.loads(line)["step"] <= max_step]
    _write_atomic(path, "".join(line + "\n" for line in kept))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))
