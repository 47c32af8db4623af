"""Sampling logic (pure sampler with hand-made logits) and KV-cached generation on a real tiny model."""

from __future__ import annotations

import torch

from opdistill.data import left_pad
from opdistill.rollout import generate, sample_next_token


def test_greedy_and_logp_of_sampled_token():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    token, logp = sample_next_token(logits, 0.0, 1.0, None)
    assert token.tolist() == [1, 0] and logp.tolist() == [0.0, 0.0]
    g = torch.Generator().manual_seed(0)
    token, logp = sample_next_token(logits, 1.0, 1.0, g)
    torch.testing.assert_close(logp, logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1))


def test_temperature_and_top_p_define_the_behaviour_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        token, logp = sample_next_token(logits, 1.0, 0.75, g)
        seen.add(int(token))
        # nucleus {0, 1} renormalised: p = 0.5/0.8 or 0.3/0.8
        expected = {0: 0.5 / 0.8, 1: 0.3 / 0.8}[int(token)]
        assert abs(float(logp.exp()) - expected) < 1e-5
    assert seen == {0, 1}
    _, logp = sample_next_token(logits, 2.0, 1.0, g)
    assert torch.isfinite(logp).all()


def _greedy_without_cache(model, ids: list[int], steps: int) -> list[int]:
    ids = list(ids)
    out = []
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        token = int(logits.argmax())
        out.append(token)
        ids.append(token)
    return out


def test_kv_cached_batched_generation_matches_plain_recompute_under_left_padding(make_model, tokenizer):
    model = make_model(seed=3, preset="d32l2")
    prompts = [
        tokenizer.encode("12+34=", add_special_tokens=False),
        tokenizer.encode("5=", add_special_tokens=False),
    ]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    rollout = generate(
        model, ids, mask, max_new_tokens=6, eos_id=-1, pad_id=tokenizer.pad_token_id, temperature=0.0
    )
    for row, prompt in enumerate(prompts):
        assert rollout.tokens_BT[row].tolist() == _greedy_without_cache(model, prompt, 6)
    assert rollout.truncated_B.all() and rollout.loss_mask_BT.all()


class _Scripted(torch.nn.Module):
    """A mock model that emits a fixed script of tokens per row (for EOS / masking logic only)."""

    def __init__(self, script: list[list[int]], vocab: int):
        super().__init__()
        self.script, self.vocab, self.t = script, vocab, 0

    def forward(self, input_ids, **kwargs):
        logits = torch.full((len(self.script), 1, self.vocab), -1e9)
        for row, tokens in enumerate(self.script):
            logits[row, 0, tokens[min(self.t, len(tokens) - 1)]] = 0.0
        self.t += 1
        return type("Out", (), {"logits": logits, "past_key_values": None})()


def test_per_sequence_eos_masks_and_padding():
    eos, pad = 2, 0
    model = _Scripted([[5, 2, 7, 7], [5, 6, 7, 2], [5, 5, 5, 5]], vocab=8)
    ids = torch.ones(3, 2, dtype=torch.long)
    rollout = generate(
        model,
        ids,
        torch.ones(3, 2, dtype=torch.bool),
        max_new_tokens=4,
        eos_id=eos,
        pad_id=pad,
        temperature=0.0,
    )
    assert rollout.tokens_BT.tolist() == [[5, 2, pad, pad], [5, 6, 7, 2], [5, 5, 5, 5]]
    assert rollout.loss_mask_BT.tolist() == [[True, True, False, False], [True] * 4, [True] * 4]
    assert rollout.truncated_B.tolist() == [False, False, True]
    assert (rollout.sampler_logp_BT[~rollout.loss_mask_BT] == 0).all()


def test_generation_stops_when_every_row_has_ended():
    model = _Scripted([[2], [3, 2]], vocab=4)
    ids = torch.ones(2, 1, dtype=torch.long)
    rollout = generate(
        model, ids, torch.ones(2, 1, dtype=torch.bool), max_new_tokens=50, eos_id=2, pad_id=0, temperature=0.0
    )
    assert rollout.tokens_BT.shape == (2, 2)
