"""Passes without gradient, a chunk of logits at a time (logits.py): the same numbers as one whole forward,
with no chunk larger than asked."""

from __future__ import annotations

import random

import pytest
import torch

from opdistill.config import load_config
from opdistill.data.examples import rollout_of
from opdistill.logits import CompletionLogits, completion_logits, head_split, paired_chunks, reduce_chunks
from opdistill.objectives import shaping
from opdistill.observe import monitor
from opdistill.observe.evaluate import evaluate, mean_token_entropy
from opdistill.teachers.local import LocalTeacher
from opdistill.training.distributed import World
from opdistill.types import SignalRequest, StepBatch, TeacherSignal


def _rollout(tokenizer, rows: int = 5, seed: int = 0):
    """Prompts and completions of different lengths (left- and right-padding both exercised)."""
    rng = random.Random(seed)
    digits = [tokenizer.convert_tokens_to_ids(c) for c in "0123456789"]
    prompts = [[tokenizer.bos_token_id] + rng.choices(digits, k=rng.randint(2, 6)) for _ in range(rows)]
    completions = [rng.choices(digits, k=rng.randint(1, 9)) + [tokenizer.eos_token_id] for _ in range(rows)]
    rollout = rollout_of(prompts, completions, tokenizer.pad_token_id)
    rollout.sampler_logp_BT = -torch.rand(rollout.tokens_BT.shape) * rollout.loss_mask_BT
    return rollout


@pytest.mark.parametrize("chunk_tokens", [1, 7, 10, 23, 10_000])
def test_chunks_cover_every_position_once_within_the_budget_and_match_one_forward(
    make_model, tokenizer, chunk_tokens
):
    model, rollout = make_model(seed=1), _rollout(tokenizer)
    whole_BTV = completion_logits(model, rollout)
    B, T = rollout.tokens_BT.shape
    seen_BT = torch.zeros(B, T, dtype=torch.long)
    assert head_split(model) is not None  # a tiny Llama: chunked by position as well as by row
    for rows, positions, logits_btV in CompletionLogits(model, rollout).chunks(chunk_tokens):
        assert logits_btV.shape[0] * logits_btV.shape[1] <= max(chunk_tokens, 1)
        seen_BT[rows, positions] += 1
        torch.testing.assert_close(logits_btV, whole_BTV[rows, positions], atol=1e-5, rtol=1e-5)
    assert (seen_BT == 1).all()


def test_models_with_a_logit_transform_are_chunked_by_whole_rows(make_model, tokenizer):
    model, rollout = make_model(seed=1), _rollout(tokenizer)
    model.config.final_logit_softcapping = 30.0  # the head alone would no longer give the model's logits
    assert head_split(model) is None
    T = rollout.tokens_BT.shape[1]
    spans = [positions for _, positions, _ in CompletionLogits(model, rollout).chunks(3)]
    assert spans and all(p == slice(0, T) for p in spans)


def test_paired_chunks_line_up_when_one_side_is_kept_whole(make_model, tokenizer):
    student, teacher, rollout = make_model(seed=1), make_model(seed=2), _rollout(tokenizer)
    kept = CompletionLogits.of(completion_logits(teacher, rollout))
    for rows, positions, s_btV, t_btV in paired_chunks(CompletionLogits(student, rollout), kept, 6):
        torch.testing.assert_close(t_btV, completion_logits(teacher, rollout)[rows, positions])
        assert s_btV.shape == t_btV.shape


def test_a_chunked_teacher_sends_the_same_signal_and_defers_its_full_logits(make_model, tokenizer):
    model, rollout = make_model(seed=4), _rollout(tokenizer)
    ids_BTK = torch.randint(0, len(tokenizer), (*rollout.tokens_BT.shape, 3))
    request = SignalRequest(topk=4, at_ids=True, full=True, entropy=True)
    whole = LocalTeacher(model, chunk_tokens=10_000).score(rollout, request, ids_BTK)
    chunked = LocalTeacher(model, chunk_tokens=5).score(rollout, request, ids_BTK)
    for name in ("token_logp_BT", "topk_ids_BTK", "topk_logp_BTK", "given_logp_BTK", "entropy_BT"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), atol=1e-5, rtol=1e-5)
    assert whole.full_logits is not None and chunked.full_logits is not None
    assert chunked.full_logits._kept is None  # nothing [B, T, V] made for the step
    micro = chunked.full_logits[1:3]  # what a loss micro-batch asks for: its rows only
    torch.testing.assert_close(micro.tensor(), whole.full_logits.tensor()[1:3], atol=1e-5, rtol=1e-5)


def test_a_routed_batchs_full_logits_come_from_each_rows_teacher_a_chunk_at_a_time(make_model, tokenizer):
    """Several teachers, each scoring some rows (TeacherSignal.gather): every row's logits are its own
    teacher's, narrowed or chunked without the whole batch ever being made."""
    first, second, rollout = make_model(seed=5), make_model(seed=6), _rollout(tokenizer, rows=5)
    index_first, index_second = torch.tensor([0, 3, 4]), torch.tensor([1, 2])
    request = SignalRequest(full=True)
    parts = [
        (index, LocalTeacher(model, chunk_tokens=1).score(rollout.select(index), request))
        for index, model in ((index_first, first), (index_second, second))
    ]
    signal = TeacherSignal.gather(parts, 5)
    expected_BTV = torch.empty_like(completion_logits(first, rollout))
    expected_BTV[index_first] = completion_logits(first, rollout.select(index_first))
    expected_BTV[index_second] = completion_logits(second, rollout.select(index_second))
    assert signal.full_logits is not None and signal.full_logits._kept is None
    torch.testing.assert_close(signal.full_logits[1:4].tensor(), expected_BTV[1:4], atol=1e-5, rtol=1e-5)
    T = rollout.tokens_BT.shape[1]
    for rows, _, logits_btV in signal.full_logits.chunks(2 * T):
        assert logits_btV.shape[0] <= 2
        torch.testing.assert_close(logits_btV, expected_BTV[rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(signal.select(torch.tensor([4, 1])).full_logits.tensor(), expected_BTV[[4, 1]])


def test_diagnostics_and_shaping_do_not_depend_on_the_chunk_size(make_model, tokenizer):
    student, teacher, rollout = make_model(seed=1), make_model(seed=2), _rollout(tokenizer)
    results = []
    for chunk in (4, 10_000):
        config = load_config(
            None,
            [
                f"train.chunk_tokens={chunk}",
                "objective.topk=4",
                "weighting.tip_ratio=0.5",
                "weighting.prune=true",
            ],
        )
        request = config.diagnostics_request
        signal = LocalTeacher(teacher, chunk_tokens=chunk).score(rollout, request)
        batch = StepBatch(rollout, signal, {})
        diagnosed = monitor.diagnose(config, student, tokenizer, batch)
        shaped, _ = shaping.shape(config, student, batch, 0)
        results.append((diagnosed, shaped, dict(batch.metrics)))
    (d_small, s_small, m_small), (d_big, s_big, m_big) = results
    assert "exact_kl_by_position" in d_small
    assert d_small.keys() == d_big.keys()
    for key, value in d_small.items():
        assert value == pytest.approx(d_big[key], abs=1e-5, nan_ok=True), key
    torch.testing.assert_close(s_small.mask_BT, s_big.mask_BT)
    torch.testing.assert_close(s_small.weight_BT, s_big.weight_BT)
    assert m_small == pytest.approx(m_big, abs=1e-5)


def test_a_shard_is_padded_to_the_same_length_on_every_rank():
    items = list(range(10))
    shares = [World(rank, 4).shard(items) for rank in range(4)]
    assert [len(share) for share, _ in shares] == [3, 3, 3, 3]
    assert [real for _, real in shares] == [3, 3, 3, 1]
    assert [x for share, real in shares for x in share[:real]] == items
    assert World(0, 1).shard(items) == (items, 10)


def test_reduce_chunks_assembles_each_name_in_place():
    chunks = [
        (slice(0, 1), slice(0, 2), torch.ones(1, 2, 3)),
        (slice(1, 2), slice(0, 2), 2 * torch.ones(1, 2, 3)),
    ]
    out = reduce_chunks(chunks, (2, 2), lambda rows, positions, x: {"sum": x.sum(-1), "top": x[..., :2]})
    assert out["sum"].tolist() == [[3.0, 3.0], [6.0, 6.0]] and out["top"].shape == (2, 2, 2)


def test_evaluation_batched_by_tokens_and_chunked_gives_the_same_figures(make_model, tokenizer):
    from opdistill.data.tasks import task_from_config

    task = task_from_config(load_config(None).data, 0)
    model, problems = make_model(seed=1), task.test[:6]
    greedy = [
        evaluate(model, tokenizer, problems, task.verify, max_new_tokens=6, batch_tokens=batch)["greedy_acc"]
        for batch in (1, 65536)
    ]
    assert greedy[0] == greedy[1]
    completions = [ex.answer + "," for ex in problems for _ in range(2)]
    entropies = [
        mean_token_entropy(model, tokenizer, problems, completions, 2, batch, chunk)
        for batch, chunk in ((1, 3), (65536, 4096))
    ]
    assert entropies[0] == pytest.approx(entropies[1], abs=1e-6)
