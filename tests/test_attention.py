"""opd_auto attention computes what SDPA computes, forward and backward, and takes the math path only where
it should."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from opdistill import attention
from opdistill.config import ModelSpec
from opdistill.data.examples import left_pad
from opdistill.errors import UserError
from opdistill.logits import completion_logits
from opdistill.models import set_attention, tiny_model
from opdistill.types import Rollout

attend = attention.attend  # the real one, for the counting wrappers below


def _qwen3():
    """Grouped-query attention (2 key/value heads for 4) and per-head q/k norms."""
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=18,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
    )
    return Qwen3ForCausalLM(config)


def _rollout(rows: int = 5) -> Rollout:
    """Left-padded prompts of different lengths with right-padded completions (a row ends early)."""
    g = torch.Generator().manual_seed(1)
    prompts = [[1] + torch.randint(4, 18, (n,), generator=g).tolist() for n in range(2, 2 + rows)]
    ids_BP, mask_BP = left_pad(prompts, pad_id=0)
    tokens_BT = torch.randint(4, 18, (rows, 9), generator=g)
    loss_mask_BT = torch.ones_like(tokens_BT, dtype=torch.bool)
    loss_mask_BT[0, 4:] = False
    tokens_BT[0, 4:] = 0
    zeros = torch.zeros(rows, 9)
    return Rollout(ids_BP, mask_BP, tokens_BT, loss_mask_BT, zeros, torch.zeros(rows, dtype=torch.bool))


def _logits_and_grads(model, rollout):
    model.zero_grad()
    logits = completion_logits(model, rollout)
    (logits.log_softmax(-1)[rollout.loss_mask_BT] * torch.linspace(-1, 1, 18)).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "build", ["llama", "qwen2", "qwen3", "llama-d64l2"]
)  # heads of 8 (the written-out backward) and, d64l2, of 16 (autograd's)
def test_auto_attention_gives_sdpa_logits_and_gradients(build, tokenizer, monkeypatch):
    arch, _, preset = build.partition("-")
    spec = ModelSpec(preset=preset or "d32l2", arch=arch)  # type: ignore[arg-type]
    model = _qwen3() if build == "qwen3" else tiny_model(spec, tokenizer, 0)
    rollout = _rollout()
    set_attention(model, "sdpa")
    want_logits, want_grads = _logits_and_grads(model, rollout)
    calls = []
    monkeypatch.setattr(attention, "attend", lambda *a: calls.append(1) or attend(*a))
    set_attention(model, "auto")
    got_logits, got_grads = _logits_and_grads(model, rollout)
    assert len(calls) == model.config.num_hidden_layers  # the math ran, in every layer
    torch.testing.assert_close(got_logits, want_logits, atol=2e-5, rtol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_auto_attention_hands_larger_shapes_to_sdpa(tokenizer, monkeypatch):
    model = tiny_model(ModelSpec(preset="d32l2"), tokenizer, 0)
    rollout = _rollout()
    B, L = rollout.input_ids.shape
    calls = []
    monkeypatch.setattr(attention, "attend", lambda *a: calls.append(1) or attend(*a))
    with torch.no_grad():
        want = completion_logits(set_attention(model, "sdpa"), rollout)
        set_attention(model, "auto")
        for limit, math_layers in ((B * L * L, 2), (B * L * L - 1, 0)):  # the mask's size, then one less
            calls.clear()
            monkeypatch.setattr(attention, "MATH_LIMIT", limit)
            torch.testing.assert_close(completion_logits(model, rollout), want, atol=2e-5, rtol=1e-5)
            assert len(calls) == math_layers


def test_attention_setting_reaches_the_model_and_bad_values_are_refused(tokenizer):
    assert tiny_model(ModelSpec(preset="d16l1"), tokenizer, 0).config._attn_implementation == attention.NAME
    eager = tiny_model(ModelSpec(preset="d16l1", attention="eager"), tokenizer, 0)
    assert eager.config._attn_implementation == "eager"
    with pytest.raises(UserError, match="attention='fast_please'"):
        tiny_model(ModelSpec(preset="d16l1", attention="fast_please"), tokenizer, 0)


def test_attention_backward_is_the_derivative_of_its_forward():
    """The written-out backward (attention._Attention) against finite differences, in float64, with grouped
    query heads and masked keys; and against autograd through the plain math."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    allowed = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    allowed[0, :, :, 0] = False  # a padded first key in the first row
    allowed[0, :, 0, 0] = True  # (which its own query may see, as a padded query does)
    bias = torch.zeros(2, 1, 5, 5, dtype=torch.float64).masked_fill(~allowed, -1e9)
    assert torch.autograd.gradcheck(lambda q, k, v: attention.attend(q, k, v, bias, 0.7), (q, k, v))
    upstream = torch.randn(2, 4, 5, 3, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((attention.attend(q, k, v, bias, 0.7) * upstream).sum(), (q, k, v))
    k_rep, v_rep = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    plain = torch.softmax((q @ k_rep.transpose(-1, -2)) * 0.7 + bias, -1) @ v_rep
    for mine, autograds in zip(got, torch.autograd.grad((plain * upstream).sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(mine, autograds)
