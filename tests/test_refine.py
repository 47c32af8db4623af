"""TRD refinement (math.md §9.3): the prefix cut and the teacher's continuation against an independent
recompute, the selection table and the support check, prompt-mode trajectories, and the shipped addition
teacher repairing corrupted student rollouts."""

from __future__ import annotations

import pytest
import torch

from opdistill.cli.demo import asset_dir
from opdistill.config import ModelSpec, TrdConfig
from opdistill.data.examples import Example, rollout_of
from opdistill.data.rendering import encode_completion, encode_prompts
from opdistill.data.tasks import addition
from opdistill.models import load_model, tiny_model
from opdistill.sampling.refine import completion_text, refine, teacher_example
from opdistill.sampling.rollout import sample_prompts
from opdistill.types import Rollout

MAX_NEW = 48  # the addition task's completion (47 characters) and its EOS


@pytest.fixture(scope="module")
def addition_setup():
    """The shipped teacher (greedy accuracy 0.99) and student (0.71), their shared tokenizer, the task's
    verifier, and 8 training problems."""
    teacher, tokenizer = load_model(ModelSpec(path=str(asset_dir("addition-teacher"))))
    student, _ = load_model(ModelSpec(path=str(asset_dir("addition-student"))))
    stream, _, verify = addition.build(seed=0, test_size=1)
    return teacher.eval(), student.eval(), tokenizer, verify, [stream[i] for i in range(8)]


def student_rollout(student, tokenizer, rows, temperature=1.0, max_new=MAX_NEW, seed=0) -> Rollout:
    return sample_prompts(
        student,
        tokenizer,
        encode_prompts(tokenizer, rows),
        max_new_tokens=max_new,
        temperature=temperature,
        generator=torch.Generator().manual_seed(seed),
    )


def completions(rollout: Rollout) -> list[list[int]]:
    return [row[mask].tolist() for row, mask in zip(rollout.tokens_BT, rollout.loss_mask_BT, strict=True)]


def prompt_ids(rollout: Rollout) -> list[list[int]]:
    return [
        row[mask].tolist() for row, mask in zip(rollout.prompt_ids_BP, rollout.prompt_mask_BP, strict=True)
    ]


@torch.no_grad()
def greedy(model, ids: list[int], steps: int, eos_id: int) -> list[int]:
    """Greedy decoding by plain recompute of one unpadded sequence (no KV cache, no batching)."""
    ids, out = list(ids), []
    for _ in range(steps):
        token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        out.append(token)
        ids.append(token)
        if token == eos_id:
            break
    return out


@torch.no_grad()
def mean_nll(model, prompt: list[int], completion: list[int]) -> float:
    logp_LV = model(input_ids=torch.tensor([prompt + completion])).logits[0].log_softmax(-1)
    logp_T = logp_LV[len(prompt) - 1 : -1].gather(-1, torch.tensor(completion)[:, None])
    return -float(logp_T.mean())


def assert_sampler_layout(rollout: Rollout, eos_id: int, pad_id: int, max_new_tokens: int) -> None:
    """Right-padded, loss mask a prefix through the first EOS, truncated exactly where there is no EOS."""
    for row, mask, truncated in zip(
        rollout.tokens_BT, rollout.loss_mask_BT, rollout.truncated_B, strict=True
    ):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any() and (row[n:] == pad_id).all()
        assert 0 < n <= max_new_tokens
        ids = row[:n].tolist()
        assert eos_id not in ids[:-1]
        assert bool(truncated) == (ids[-1] != eos_id)


def test_a_teacher_equal_to_the_student_keeps_every_rollout(addition_setup, monkeypatch):
    _, student, tokenizer, _, rows = addition_setup
    monkeypatch.setattr(
        "opdistill.sampling.refine.sample_prompts",
        lambda *a, **k: pytest.fail("nothing is cut: nothing to generate"),
    )
    # greedy samples sit in the teacher's top-1; samples at temperature 1 in its top-V
    for temperature, cut_topk in ((0.0, 1), (1.0, len(tokenizer))):
        rollout = student_rollout(student, tokenizer, rows, temperature)
        settings = TrdConfig(mode="prefix", cut_topk=cut_topk, select="always", max_nll_gap=1.0)
        refined, metrics = refine(
            rollout,
            rows,
            teacher=student,
            student=student,
            tokenizer=tokenizer,
            settings=settings,
            max_new_tokens=MAX_NEW,
        )
        for name in rollout.__dataclass_fields__:
            got, want = getattr(refined, name), getattr(rollout, name)
            assert got is want is None or torch.equal(got, want), name
        assert metrics["trd_prefix_kept"] == 1.0
        assert metrics["trd_refined"] == metrics["trd_nll_rejected"] == 0.0


def test_prefix_cut_and_continuation_match_an_independent_teacher(addition_setup):
    teacher, student, tokenizer, _, rows = addition_setup
    rollout = student_rollout(student, tokenizer, rows)
    cut_topk = 2
    settings = TrdConfig(mode="prefix", cut_topk=cut_topk, select="always")
    refined, metrics = refine(
        rollout,
        rows,
        teacher=teacher,
        student=student,
        tokenizer=tokenizer,
        settings=settings,
        max_new_tokens=MAX_NEW,
    )
    eos = tokenizer.eos_token_id
    drafts, prompts, outputs = completions(rollout), prompt_ids(rollout), completions(refined)
    cuts, shares = [], []
    for b, (prompt, draft) in enumerate(zip(prompts, drafts, strict=True)):
        with torch.no_grad():
            logits_TV = teacher(input_ids=torch.tensor([prompt + draft])).logits[0, len(prompt) - 1 : -1]
        top_TK = logits_TV.topk(cut_topk, dim=-1).indices
        outside = [j for j, token in enumerate(draft) if token not in top_TK[j].tolist()]
        t = outside[0] if outside else len(draft)
        cuts.append(t)
        shares.append(t / len(draft))
        if t == len(draft):
            assert outputs[b] == draft
            n = len(draft)
            assert torch.equal(refined.sampler_logp_BT[b, :n], rollout.sampler_logp_BT[b, :n])
            assert not refined.sampler_logp_BT[b, n:].any()
        else:
            expected = draft[:t] + greedy(teacher, prompt + draft[:t], MAX_NEW - t, eos)
            assert outputs[b] == expected
            assert not refined.sampler_logp_BT[b].any()
    assert any(0 < t < len(d) for t, d in zip(cuts, drafts, strict=True))  # a kept prefix, then a repair
    assert any(t == len(d) for t, d in zip(cuts, drafts, strict=True))  # and a row left alone
    assert metrics["trd_prefix_kept"] == pytest.approx(sum(shares) / len(shares))
    assert metrics["trd_refined"] == sum(t < len(d) for t, d in zip(cuts, drafts, strict=True)) / len(rows)
    # the teacher's tokens (FLOPs): its pass over every row, then prefill and continuation of each cut row
    # (generated together up to the largest row's budget)
    cut_pass = sum(len(p) + len(d) for p, d in zip(prompts, drafts, strict=True))
    cut_rows = [b for b, (t, d) in enumerate(zip(cuts, drafts, strict=True)) if t < len(d)]
    least = cut_pass + sum(len(prompts[b]) + len(outputs[b]) for b in cut_rows)
    most = cut_pass + sum(len(prompts[b]) + MAX_NEW for b in cut_rows)
    assert least <= metrics["teacher_generated_tokens"] <= most
    assert torch.equal(refined.prompt_ids_BP, rollout.prompt_ids_BP)
    assert_sampler_layout(refined, eos, tokenizer.pad_token_id, MAX_NEW)


def test_selection_table_and_support_check(addition_setup):
    _, student, tokenizer, _, problems = addition_setup
    teacher = tiny_model(ModelSpec(preset="d32l2"), tokenizer, seed=1).eval()  # disagrees with every draft
    cells = {"fp": (False, True), "pp": (True, True), "ff": (False, False), "pf": (True, False)}
    rows = [
        Example(prompt=ex.prompt, answer=ex.answer, id=cell)
        for ex, cell in zip(problems, cells, strict=False)
    ]
    rows.append(Example(prompt=problems[4].prompt, id="no answer"))
    max_new = 16  # the table does not need whole solutions
    rollout = student_rollout(student, tokenizer, rows, max_new=max_new)
    drafts = completions(rollout)

    def run(verify=None, **settings):
        return refine(
            rollout,
            rows,
            teacher=teacher,
            student=student,
            tokenizer=tokenizer,
            max_new_tokens=max_new,
            settings=TrdConfig(mode="prefix", cut_topk=1, **settings),
            verify=verify,
        )

    always, metrics = run(select="always")
    candidates = completions(always)
    assert all(c != d for c, d in zip(candidates, drafts, strict=True)) and metrics["trd_refined"] == 1.0
    texts = {ex.id: completion_text(tokenizer, c) for ex, c in zip(rows, candidates, strict=True)}

    def verifier(text: str, example: Example) -> bool:  # the outcome a cell prescribes to y_o / y_r
        assert example.answer, "an example without an answer is never verified"
        return cells[example.id][text == texts[example.id]]

    verified, metrics = run(verifier, select="verified")
    expected = [
        candidates[b] if ex.id in ("fp", "pp", "no answer") else drafts[b] for b, ex in enumerate(rows)
    ]
    assert completions(verified) == expected
    assert metrics["trd_refined"] == 3 / 5
    assert metrics["trd_fail_to_pass"] == metrics["trd_pass_to_fail"] == 1 / 5
    for b, ex in enumerate(rows):  # the student's behaviour log-probs survive only where y_o is kept
        n = len(drafts[b]) if ex.id in ("ff", "pf") else 0
        assert torch.equal(verified.sampler_logp_BT[b, :n], rollout.sampler_logp_BT[b, :n])
        assert not verified.sampler_logp_BT[b, n:].any()
    assert completions(run(verifier, select="always")[0]) == candidates  # "always" ignores the verdicts
    assert completions(run(select="verified")[0]) == candidates  # without a verifier, as "always"

    # support check: the student's NLL gap y_r - y_o, recomputed per row; a threshold between the gaps
    prompts = prompt_ids(rollout)
    gaps = [
        mean_nll(student, p, c) - mean_nll(student, p, d)
        for p, c, d in zip(prompts, candidates, drafts, strict=True)
    ]
    low, high = sorted(gaps)[1:3]
    threshold = (low + high) / 2
    assert threshold > 0 and high - low > 0.05
    checked, metrics = run(select="always", max_nll_gap=threshold)
    rejected = [gap > threshold for gap in gaps]
    assert completions(checked) == [
        d if r else c for r, c, d in zip(rejected, candidates, drafts, strict=True)
    ]
    assert metrics["trd_nll_rejected"] == sum(rejected) / len(rows) == 3 / 5
    assert metrics["trd_refined"] == 2 / 5


def test_prompt_mode_writes_a_valid_student_trajectory(addition_setup, monkeypatch):
    teacher, student, tokenizer, _, problems = addition_setup
    # the addition teacher is no instruction follower, but shown prompt ⊕ draft it finishes the draft
    template, max_new = "{prompt}{draft}", 30
    rows = problems[:4]
    draft_texts = [ex.completion[:length] for ex, length in zip(rows, (5, 20, 30, 36), strict=True)]
    draft_texts[3] = draft_texts[3][:-3] + "999"  # a draft gone wrong
    prompts = encode_prompts(tokenizer, rows)
    drafts = [tokenizer.encode(text, add_special_tokens=False) for text in draft_texts]
    rollout = rollout_of(prompts, drafts, tokenizer.pad_token_id)
    settings = TrdConfig(mode="prompt", template=template, select="always")
    refined, metrics = refine(
        rollout,
        rows,
        teacher=teacher,
        student=student,
        tokenizer=tokenizer,
        settings=settings,
        max_new_tokens=max_new,
    )
    eos = tokenizer.eos_token_id
    assert torch.equal(refined.prompt_ids_BP, rollout.prompt_ids_BP)
    assert torch.equal(refined.prompt_mask_BP, rollout.prompt_mask_BP)
    assert_sampler_layout(refined, eos, tokenizer.pad_token_id, max_new)
    outputs = completions(refined)
    for ex, draft, output in zip(rows, draft_texts, outputs, strict=True):
        teacher_prompt = encode_prompts(
            tokenizer, [Example(prompt=template.format(prompt=ex.prompt, draft=draft))]
        )[0]
        assert output == greedy(teacher, teacher_prompt, max_new, eos)  # the ids it wrote, not re-encoded
    assert [o[-1] == eos for o in outputs] == [False, True, True, True]  # the short draft hit the budget
    assert completion_text(tokenizer, outputs[1]) == rows[1].completion[20:]  # the teacher finished it
    assert metrics["trd_refined"] == 1.0 and not refined.sampler_logp_BT.any()

    # a chat prompt keeps its earlier turns; only the last becomes the refinement request
    chat = Example(prompt=(("system", "S"), ("user", "1+1=")), answer="2")
    asked = teacher_example(chat, "3", "{prompt}|{draft}")
    assert asked.prompt == (("system", "S"), ("user", "1+1=|3")) and asked.answer == "2"

    # y_r is the ids the teacher wrote, special tokens and all: one cut off by the budget gives no EOS; one
    # that wrote no text, y_o
    bos, five, six = tokenizer.bos_token_id, *tokenizer.encode("56", add_special_tokens=False)
    written = rollout_of(
        prompts[:3], [[five, bos, six, six], [five, bos, eos], [bos] * 4], tokenizer.pad_token_id
    )
    written.truncated_B = torch.tensor([True, False, True])
    monkeypatch.setattr("opdistill.sampling.refine.sample_prompts", lambda *args, **kwargs: written)
    short = rollout_of(prompts[:3], [draft[:4] for draft in drafts[:3]], tokenizer.pad_token_id)
    scripted, metrics = refine(
        short,
        rows[:3],
        teacher=teacher,
        student=student,
        tokenizer=tokenizer,
        settings=settings,
        max_new_tokens=4,
    )
    assert completions(scripted) == [[five, bos, six, six], [five, bos, eos], drafts[2][:4]]
    assert metrics["trd_refined"] == 2 / 3
    assert scripted.truncated_B.tolist() == [True, False, True]


def test_the_addition_teacher_repairs_a_corrupted_digit(addition_setup):
    teacher, student, tokenizer, verify, problems = addition_setup
    rows = problems[:4]
    corrupt_at, drafts = [], []
    for ex, step in zip(rows, (0, 1, 2, None), strict=True):
        # a wrong ones digit in a step's written sum, read back into the answer as the student would; or
        # (None) a wrong digit in the answer alone
        text, answer_at = ex.completion, len(ex.completion) - 1 - (step or 0)
        sum_at = answer_at if step is None else [i for i, c in enumerate(text) if c == "="][step] + 2
        assert len(ex.answer) > (step or 0) and text[sum_at] == text[answer_at]
        chars = list(text)
        chars[sum_at] = chars[answer_at] = str((int(text[sum_at]) + 5) % 10)
        assert not verify("".join(chars), ex)
        corrupt_at.append(sum_at)
        drafts.append(encode_completion(tokenizer, "".join(chars)))
    rollout = rollout_of(encode_prompts(tokenizer, rows), drafts, tokenizer.pad_token_id)
    settings = TrdConfig(mode="prefix", cut_topk=1, select="verified")
    refined, metrics = refine(
        rollout,
        rows,
        teacher=teacher,
        student=student,
        tokenizer=tokenizer,
        settings=settings,
        max_new_tokens=MAX_NEW,
        verify=verify,
    )
    for ex, j, draft, output in zip(rows, corrupt_at, drafts, completions(refined), strict=True):
        assert output[:j] == draft[:j] and output[j] != draft[j]  # cut exactly at the corruption
        assert completion_text(tokenizer, output) == ex.completion and verify(ex.completion, ex)
        assert output[-1] == tokenizer.eos_token_id
    assert metrics["trd_prefix_kept"] == pytest.approx(
        sum(j / len(d) for j, d in zip(corrupt_at, drafts, strict=True)) / 4
    )
    assert metrics["trd_fail_to_pass"] == metrics["trd_refined"] == 1.0
    assert metrics["trd_pass_to_fail"] == 0.0
    assert not refined.truncated_B.any()
