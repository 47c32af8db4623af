"""SKD sampling (math.md §9.2): its two limits, a step-by-step replay of Algorithm 1 without KV caches,
and the row-split and left-padding invariances, on tiny real student and teacher models."""

from __future__ import annotations

import pytest
import torch

from opdistill.data.examples import left_pad
from opdistill.logits import completion_logits
from opdistill.sampling.rollout import generate, sample_next_token, sample_prompts
from opdistill.sampling.speculative import SpeculativeGuide

TEXTS = ["12+34=", "5=", "1+1=", "777+2=", "9=", "3+3=", "40+1=", "8+88="]  # four widths: left padding
STUDENT_SEED, GUIDE_SEED, STEPS = 11, 5, 10


@pytest.fixture
def models(make_model):
    """A student and a teacher that differ in seed and size (one KV cache each, of different shapes)."""
    return make_model(seed=3, preset="d32l2"), make_model(seed=8, preset="d16l1")


def _prompts(tokenizer, texts=TEXTS) -> list[list[int]]:
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def _generate(model, tokenizer, prompts, seed: int, guide=None, temperature=1.0, top_p=1.0, rows=None):
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    return generate(
        model,
        ids,
        mask,
        max_new_tokens=STEPS,
        end_ids=[tokenizer.eos_token_id],
        pad_id=tokenizer.pad_token_id,
        temperature=temperature,
        top_p=top_p,
        generator=torch.Generator().manual_seed(seed),
        rows=rows,
        guide=guide,
    )


def _guide(teacher, topk: int, temperature=1.0, top_p=1.0) -> SpeculativeGuide:
    generator = torch.Generator().manual_seed(GUIDE_SEED)
    return SpeculativeGuide(teacher, topk=topk, temperature=temperature, top_p=top_p, generator=generator)


def test_topk_of_the_whole_vocabulary_is_plain_student_sampling(models, tokenizer):
    student, teacher = models
    plain = _generate(student, tokenizer, _prompts(tokenizer), STUDENT_SEED)
    for topk in (len(tokenizer), 1000):
        guide = _guide(teacher, topk)
        skd = _generate(student, tokenizer, _prompts(tokenizer), STUDENT_SEED, guide)
        assert torch.equal(skd.tokens_BT, plain.tokens_BT)
        assert torch.equal(skd.loss_mask_BT, plain.loss_mask_BT)
        assert torch.equal(skd.sampler_logp_BT, plain.sampler_logp_BT)
        assert guide.stats() == {
            "skd_acceptance": 1.0,
            "skd_proposed": int(plain.loss_mask_BT.sum()),
            "skd_replaced": 0,
        }


def test_topk_zero_is_teacher_sampling_with_the_guides_random_stream(models, tokenizer):
    """The student still proposes (drawing from its own stream) but every token is the teacher's: exactly
    what the teacher samples alone from the guide's seed, so the teacher saw the very prefixes, positions and
    padding it sees when it generates; temperature and top_p reach the teacher's draw."""
    student, teacher = models
    temperature, top_p = 0.8, 0.9
    guide = _guide(teacher, 0, temperature, top_p)
    skd = _generate(student, tokenizer, _prompts(tokenizer), STUDENT_SEED, guide, temperature, top_p)
    alone = _generate(teacher, tokenizer, _prompts(tokenizer), GUIDE_SEED, None, temperature, top_p)
    assert torch.equal(skd.tokens_BT, alone.tokens_BT)
    assert torch.equal(skd.loss_mask_BT, alone.loss_mask_BT)
    torch.testing.assert_close(skd.sampler_logp_BT, alone.sampler_logp_BT)
    real = int(alone.loss_mask_BT.sum())
    assert guide.stats() == {"skd_acceptance": 0.0, "skd_proposed": real, "skd_replaced": real}
    assert torch.equal(guide.replaced_BT, alone.loss_mask_BT)


def test_each_token_follows_algorithm_1_replayed_without_kv_caches(models, tokenizer):
    """Reference: from full forwards of both models over prompt ⊕ completion (no cache), redraw the student's
    proposal at every state with the main stream's uniforms, keep it if it is in the teacher's top-K, else
    draw the teacher's token with the guide's uniforms. The rollout must match token for token, and the
    sampler log-prob must be the one of the model that supplied the token."""
    student, teacher = models
    topk, temperature, top_p = 6, 1.0, 0.95
    guide = _guide(teacher, topk, temperature, top_p)
    skd = _generate(student, tokenizer, _prompts(tokenizer), STUDENT_SEED, guide, temperature, top_p)
    mask_BT, replaced_BT = skd.loss_mask_BT, guide.replaced_BT
    B, T = skd.tokens_BT.shape
    with torch.no_grad():
        student_BTV, teacher_BTV = completion_logits(student, skd), completion_logits(teacher, skd)
    main, own = torch.Generator().manual_seed(STUDENT_SEED), torch.Generator().manual_seed(GUIDE_SEED)
    for t in range(T):
        main_B, own_B = torch.rand(B, generator=main), torch.rand(B, generator=own)
        proposal_B, proposal_logp_B = sample_next_token(student_BTV[:, t], temperature, top_p, main_B)
        sample_B, sample_logp_B = sample_next_token(teacher_BTV[:, t], temperature, top_p, own_B)
        in_topk_B = (teacher_BTV[:, t].topk(topk).indices == proposal_B[:, None]).any(-1)
        real_B = mask_BT[:, t]
        assert torch.equal(replaced_BT[:, t], ~in_topk_B & real_B)
        expected_B = torch.where(in_topk_B, proposal_B, sample_B)
        assert torch.equal(skd.tokens_BT[real_B, t], expected_B[real_B])
        expected_logp_B = torch.where(in_topk_B, proposal_logp_B, sample_logp_B)
        torch.testing.assert_close(skd.sampler_logp_BT[real_B, t], expected_logp_B[real_B])
    # every kept token is in the teacher's top-K at its state; rows after EOS are pad and count for nothing
    kept_BT = mask_BT & ~replaced_BT
    rank_BT = (teacher_BTV > teacher_BTV.gather(-1, skd.tokens_BT[..., None])).sum(-1)
    assert (rank_BT[kept_BT] < topk).all()
    assert (skd.tokens_BT[~mask_BT] == tokenizer.pad_token_id).all()
    assert (skd.sampler_logp_BT[~mask_BT] == 0).all() and not replaced_BT[~mask_BT].any()
    stats = guide.stats()
    assert stats["skd_proposed"] == int(mask_BT.sum()) < B * T  # some row ended early: its pad is not counted
    assert stats["skd_replaced"] == int(replaced_BT.sum())
    assert 0.0 < stats["skd_acceptance"] < 1.0
    assert stats["skd_acceptance"] == pytest.approx(int(kept_BT.sum()) / int(mask_BT.sum()))


def test_a_batch_split_across_ranks_samples_the_same_rows_as_the_whole_batch(models, tokenizer):
    """Each rank has its own guide seeded alike, as the trainer builds them; the halves are padded to their
    own widths, narrower than the whole batch's. Through ``sample_prompts``, as the trainer calls it."""
    student, teacher = models
    prompts = _prompts(tokenizer)

    def sample(part, rows):
        guide = _guide(teacher, 6)
        rollout = sample_prompts(
            student,
            tokenizer,
            part,
            max_new_tokens=STEPS,
            temperature=1.0,
            generator=torch.Generator().manual_seed(STUDENT_SEED),
            rows=rows,
            guide=guide,
        )
        return rollout, guide

    whole, whole_guide = sample(prompts, (0, 8))
    halves = [sample(prompts[:4], (0, 8)), sample(prompts[4:], (4, 8))]
    assert halves[1][0].prompt_ids_BP.shape[1] < whole.prompt_ids_BP.shape[1]
    for (half, guide), rows in zip(halves, (slice(0, 4), slice(4, 8)), strict=True):
        width = half.tokens_BT.shape[1]
        assert torch.equal(half.tokens_BT, whole.tokens_BT[rows, :width])
        assert not whole.loss_mask_BT[rows, width:].any()
        torch.testing.assert_close(half.sampler_logp_BT, whole.sampler_logp_BT[rows, :width])
        assert torch.equal(guide.replaced_BT, whole_guide.replaced_BT[rows, :width])
    counts = [guide.stats() for _, guide in halves]
    for key in ("skd_proposed", "skd_replaced"):
        assert sum(c[key] for c in counts) == whole_guide.stats()[key]


def test_left_padded_rows_sample_as_each_prompt_alone(models, tokenizer):
    """A short prompt left-padded in a batch and the same prompt alone (no padding) get the same SKD sample:
    the teacher's positions and attention line up with the student's under padding."""
    student, teacher = models
    prompts = _prompts(tokenizer, TEXTS[:4])
    batch = _generate(student, tokenizer, prompts, STUDENT_SEED, _guide(teacher, 6), rows=(0, 4))
    assert not batch.prompt_mask_BP.all()
    for row, prompt in enumerate(prompts):
        alone = _generate(student, tokenizer, [prompt], STUDENT_SEED, _guide(teacher, 6), rows=(row, 4))
        width = alone.tokens_BT.shape[1]
        assert torch.equal(alone.tokens_BT[0], batch.tokens_BT[row, :width])
        torch.testing.assert_close(alone.sampler_logp_BT[0], batch.sampler_logp_BT[row, :width])


def test_a_guide_counts_every_rollout_it_steered_and_rejects_a_negative_topk(models, tokenizer):
    """One guide per step: an episode's turns are several rollouts; its acceptance rate covers them all."""
    student, teacher = models
    guide = _guide(teacher, 6)
    first = _generate(student, tokenizer, _prompts(tokenizer), STUDENT_SEED, guide)
    once = guide.stats()
    second = _generate(student, tokenizer, _prompts(tokenizer, TEXTS[:2]), STUDENT_SEED, guide)
    assert once["skd_proposed"] == int(first.loss_mask_BT.sum())
    both = guide.stats()
    assert both["skd_proposed"] == once["skd_proposed"] + int(second.loss_mask_BT.sum())
    assert both["skd_replaced"] == once["skd_replaced"] + int(guide.replaced_BT.sum())
    assert guide.out is None  # the teacher's KV cache is released after the rollout
    with pytest.raises(ValueError, match="top-K"):
        SpeculativeGuide(teacher, topk=-1)
