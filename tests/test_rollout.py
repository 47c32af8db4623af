"""Sampling logic (pure sampler with hand-made logits) and KV-cached generation on a real tiny model."""

from __future__ import annotations

import torch

from opdistill.data.examples import left_pad
from opdistill.sampling.rollout import generate, sample_next_token, sample_prompts


def test_greedy_and_logp_of_sampled_token():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    token, logp = sample_next_token(logits, 0.0, 1.0, torch.rand(2))
    assert token.tolist() == [1, 0] and logp.tolist() == [0.0, 0.0]
    token, logp = sample_next_token(logits, 1.0, 1.0, torch.rand(2))
    torch.testing.assert_close(logp, logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1))


def test_temperature_and_top_p_define_the_behaviour_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = set()
    for u in torch.rand(200):
        token, logp = sample_next_token(logits, 1.0, 0.75, u[None])
        seen.add(int(token))
        # nucleus {0, 1} renormalised: p = 0.5/0.8 or 0.3/0.8
        expected = {0: 0.5 / 0.8, 1: 0.3 / 0.8}[int(token)]
        assert abs(float(logp.exp()) - expected) < 1e-5
    assert seen == {0, 1}
    _, logp = sample_next_token(logits, 2.0, 1.0, torch.rand(1))
    assert torch.isfinite(logp).all()


def test_inverse_cdf_sampling_matches_the_probabilities_and_skips_zero_mass_ids():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    n = 20_000
    uniform_N = torch.rand(n, generator=torch.Generator().manual_seed(0))
    uniform_N[:2] = torch.tensor([0.0, 1.0 - 2**-24])  # both ends of [0, 1)
    token_N, _ = sample_next_token(probs.log().expand(n, -1), 1.0, 1.0, uniform_N)
    assert token_N[:2].tolist() == [1, 4]
    frequency = torch.bincount(token_N, minlength=6).float() / n
    assert torch.allclose(frequency, probs, atol=0.01)


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
        model, ids, mask, max_new_tokens=6, end_ids=(), pad_id=tokenizer.pad_token_id, temperature=0.0
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
        end_ids=[eos],
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
        model,
        ids,
        torch.ones(2, 1, dtype=torch.bool),
        max_new_tokens=50,
        end_ids=[2],
        pad_id=0,
        temperature=0.0,
    )
    assert rollout.tokens_BT.shape == (2, 2)


def test_a_batch_split_across_ranks_samples_the_same_rows_as_the_whole_batch(make_model, tokenizer):
    model = make_model(seed=3, preset="d32l2")
    texts = ["12+34=", "5=", "1+1=", "777+2="]
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]

    def sample(part: list[list[int]], rows: tuple[int, int]):
        ids, mask = left_pad(part, tokenizer.pad_token_id)
        torch.manual_seed(11)
        return generate(
            model,
            ids,
            mask,
            max_new_tokens=8,
            end_ids=[tokenizer.eos_token_id],
            pad_id=tokenizer.pad_token_id,
            temperature=1.0,
            rows=rows,
        )

    whole = sample(prompts, (0, 4))
    halves = [sample(prompts[:2], (0, 4)), sample(prompts[2:], (2, 4))]
    for half, rows in zip(halves, (slice(0, 2), slice(2, 4)), strict=True):
        width = half.tokens_BT.shape[1]
        assert torch.equal(half.tokens_BT, whole.tokens_BT[rows, :width])
        assert not whole.loss_mask_BT[rows, width:].any()


class _Recording(torch.nn.Module):
    """Wraps a real model and records the width of every input it is given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.widths = model, []

    def forward(self, input_ids, **kwargs):
        self.widths.append(input_ids.shape[1])
        return self.model(input_ids=input_ids, **kwargs)


def test_every_sampled_token_costs_one_position_thanks_to_the_kv_cache(make_model, tokenizer):
    """TRL's GKDTrainer samples without its KV cache under gradient checkpointing (re-encoding the prefix
    for every token); here the student is in training mode with checkpointing on, and still each new token
    is one forward over one position."""
    model = make_model(seed=3, preset="d32l2").train()
    model.activation_checkpointing_enable()
    recording = _Recording(model)
    prompts = [tokenizer.encode("12+34=", add_special_tokens=False)] * 3
    rollout = sample_prompts(recording, tokenizer, prompts, max_new_tokens=8, temperature=1.0)
    assert recording.widths == [6] + [1] * (rollout.tokens_BT.shape[1] - 1)
    assert model.training  # the mode is restored
