"""Mixed precision (train.precision): bf16 forwards for the loss over fp32 master weights, fp32 loss math."""

from __future__ import annotations

import json

import pytest
import torch

from opdistill.config import ModelSpec, load_config
from opdistill.errors import UserError
from opdistill.models import load_model
from opdistill.training import loop
from opdistill.training.step import student_logits


def test_bf16_autocasts_the_forward_and_returns_fp32_logits(make_model, tokenizer):
    from opdistill.data.examples import rollout_of

    model = make_model(seed=1)
    rollout = rollout_of([[1, 5, 6, 7]], [[8, 9, tokenizer.eos_token_id]], tokenizer.pad_token_id)
    fp32 = student_logits(load_config(None), model, rollout)
    bf16 = student_logits(load_config(None, ["train.precision=bf16"]), model, rollout)
    assert bf16.dtype == torch.float32 and bf16.requires_grad
    assert not torch.equal(bf16, fp32)  # the matmuls really ran in bf16
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0.05)
    bf16.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_a_bf16_run_keeps_fp32_weights_and_optimizer_state_and_tracks_the_fp32_run(tiny_run, tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):
        config = tiny_run("train.steps=3", f"train.precision={precision}", out=precision)
        loop.run(config, show_progress=False)
        records = [json.loads(line) for line in (tmp_path / precision / "metrics.jsonl").open()]
        losses[precision] = [r["loss"] for r in records]
        model, _ = load_model(ModelSpec(path=str(tmp_path / precision / "final")))
        assert all(p.dtype == torch.float32 for p in model.parameters())
    state = torch.load(
        next((tmp_path / "bf16" / "checkpoints").glob("step_*")) / "trainer_state.pt", weights_only=False
    )
    moments = [t for s in state["optimizer"]["state"].values() for t in s.values() if t.dim() > 0]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def test_bf16_weights_without_a_master_copy_are_refused():
    with pytest.raises(UserError, match="train.precision=bf16"):
        load_config(None, ["student.dtype=bfloat16"])
