"""TRD refinement (math.md §9.3): the teacher turns the student's raw rollout y_o into a refined
trajectory y_r that keeps the useful part of y_o and unfolds the correction; distillation then runs along
y_r. This module only builds y_r (and chooses, per row, between y_r and y_o); the loss is the objective's.

Procedure details are [D] (derived; the paper's code was not available):

- ``mode="prefix"`` (any teacher): one teacher forward, without gradient, over prompt ⊕ y_o. The cut is the
  first loss position t whose student token is outside the teacher's top-``cut_topk`` there, i.e. at least
  ``cut_topk`` ids have a strictly higher teacher logit (ties at the K-th place count as inside). y_r =
  y_o[:t] ⊕ the teacher's own continuation of prompt ⊕ y_o[:t], sampled at ``temperature`` with top_p 1 and
  at most ``max_new_tokens - t`` new tokens. If the teacher accepts every token, y_r = y_o and that row is
  not generated. The rows that need a continuation share one ``generate`` call.
- ``mode="prompt"`` (instruction-following teachers): the teacher's prompt is the example with its last turn
  replaced by the user turn ``template.format(prompt=<that turn's text>, draft=<y_o decoded, EOS and special
  tokens dropped>)``, encoded with ``encode_prompts``; y_r is the teacher's completion as the token ids it
  sampled with the shared tokenizer (never decoded and re-encoded). A teacher that hits ``max_new_tokens``
  without EOS gives a y_r without EOS (marked truncated, never given an EOS it did not write); one that runs
  out of budget without writing any text leaves the row at y_o.
- Selection (``select``): "always" takes y_r. "verified" takes y_r only if it passes the verifier
  (fail→pass or pass→pass) and otherwise falls back to y_o; a row behaves as "always" when ``verify`` is
  None or its example has no ``answer``.
- Support check (``max_nll_gap`` > 0): the student's mean per-token NLL (loss tokens, EOS included) of y_o
  and of y_r, one student forward without gradient each; y_r is rejected (the row falls back to y_o) where
  NLL(y_r) > NLL(y_o) + max_nll_gap.

A row is *refined* when it ends up on a y_r that differs from y_o. The returned Rollout keeps the student's
prompts and lays the chosen completions out as the sampler does: right-padded, EOS kept, loss mask through
the first EOS, ``truncated_B`` where no EOS falls within ``max_new_tokens``. Its ``sampler_logp_BT`` is y_o's
for rows that keep y_o and 0 on refined rows: those tokens were not sampled by the student, so estimators
that rely on on-policy samples (the sampled-token PG branch, importance ratios, sampled KL estimates) are not
valid on them; distil along y_r with a divergence over the teacher's distribution (math.md §9.3: FKL,
full vocab).

Metrics (floats, shares of the batch's rows): ``trd_refined`` (trained on y_r), ``trd_fail_to_pass`` and
``trd_pass_to_fail`` (y_o failed and y_r passed / y_o passed and y_r failed, whichever the row keeps: the
second is the leakage the paper tracks; only rows with a verifier, an answer and y_r ≠ y_o count),
``trd_nll_rejected`` (y_r rejected by the support check, whether or not the verifier kept it) and, in prefix
mode, ``trd_prefix_kept`` (mean share of y_o's tokens kept before the cut; 1.0 when nothing is cut); and the
counter ``teacher_generated_tokens``: the tokens the teacher read and wrote (the pass that finds the cuts and
the continuations, or the rewrites), which the run's FLOPs count (observe/flops.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from opdistill.config import TrdConfig
from opdistill.data.examples import Example, right_pad
from opdistill.data.rendering import encode_prompts, end_ids, first_end
from opdistill.logits import CompletionLogits, reduce_chunks
from opdistill.objectives.losses import token_logprobs
from opdistill.sampling.rollout import sample_prompts
from opdistill.types import Rollout


def refine(
    rollout: Rollout,
    rows: Sequence[Example],
    *,
    teacher,
    student,
    tokenizer,
    settings: TrdConfig,
    max_new_tokens: int,
    verify: Callable[[str, Example], bool] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Rollout, dict[str, float]]:
    """(the rollout to distil along, metrics): per row y_r or y_o as the module docstring says. ``rows`` holds
    the example of each rollout row (G consecutive rows per prompt). ``teacher`` and ``student`` are HF causal
    LMs sharing ``tokenizer``; ``generator`` draws the teacher's samples when ``settings.temperature`` > 0."""
    if len(rows) != rollout.tokens_BT.shape[0]:
        raise ValueError(f"refine got {len(rows)} examples for {rollout.tokens_BT.shape[0]} rollout rows")
    drafts = [row[mask].tolist() for row, mask in zip(rollout.tokens_BT, rollout.loss_mask_BT, strict=True)]
    prompts = [
        row[mask].tolist() for row, mask in zip(rollout.prompt_ids_BP, rollout.prompt_mask_BP, strict=True)
    ]
    metrics: dict[str, float] = {}
    if settings.mode == "prefix":
        cut_B = prefix_cuts(teacher, rollout, settings.cut_topk).tolist()
        refined, written_tokens = continue_prefixes(
            teacher, tokenizer, prompts, drafts, cut_B, max_new_tokens, settings.temperature, generator
        )
        written_tokens += int(rollout.attention_mask.sum())  # the pass that finds the cuts
        kept_B = [t / max(len(d), 1) for t, d in zip(cut_B, drafts, strict=True)]
        metrics["trd_prefix_kept"] = sum(kept_B) / len(kept_B)
    elif settings.mode == "prompt":
        refined, written_tokens = rewrite_drafts(
            teacher, tokenizer, rows, drafts, settings, max_new_tokens, generator
        )
    else:
        raise ValueError(f"refine needs trd.mode prefix or prompt, got {settings.mode!r}")
    refined = [through_first_end(ids[:max_new_tokens], end_ids(tokenizer)) for ids in refined]
    changed_B = [r != d for r, d in zip(refined, drafts, strict=True)]
    chosen_B = list(changed_B)

    # selection: a changed row keeps y_r unless the verifier can judge it and y_r fails
    fail_to_pass = pass_to_fail = 0
    if verify is not None:
        for b, example in enumerate(rows):
            if not changed_B[b] or not example.answer:
                continue
            draft_ok = verify(completion_text(tokenizer, drafts[b]), example)
            refined_ok = verify(completion_text(tokenizer, refined[b]), example)
            fail_to_pass += not draft_ok and refined_ok
            pass_to_fail += draft_ok and not refined_ok
            if settings.select == "verified" and not refined_ok:
                chosen_B[b] = False

    # support check: y_r must stay about as likely under the student as its own sample. The two forwards run
    # even when nothing changed: every rank of a sharded student must run the same forwards.
    rejected = 0
    if settings.max_nll_gap > 0:
        candidate = layout(rollout, refined, [None] * len(refined), tokenizer, max_new_tokens)
        gap_B = (mean_nll(student, candidate) - mean_nll(student, rollout)).tolist()
        for b, gap in enumerate(gap_B):
            if changed_B[b] and gap > settings.max_nll_gap:
                rejected += 1
                chosen_B[b] = False

    completions = [r if c else d for r, d, c in zip(refined, drafts, chosen_B, strict=True)]
    sampler_logp = [
        None if c else logp[: len(d)].tolist()
        for c, d, logp in zip(chosen_B, drafts, rollout.sampler_logp_BT, strict=True)
    ]
    n = len(rows)
    metrics.update(
        trd_refined=sum(chosen_B) / n,
        trd_fail_to_pass=fail_to_pass / n,
        trd_pass_to_fail=pass_to_fail / n,
        trd_nll_rejected=rejected / n,
        teacher_generated_tokens=written_tokens,
    )
    return layout(rollout, completions, sampler_logp, tokenizer, max_new_tokens), metrics


@torch.no_grad()
def prefix_cuts(teacher, rollout: Rollout, cut_topk: int) -> torch.Tensor:
    """[B] int64: per row the first loss position whose token is outside the teacher's top-``cut_topk`` (at
    least ``cut_topk`` ids strictly more likely), or the row's completion length (an episode's included) if
    there is none. The teacher's logits exist a chunk at a time (logits.py)."""
    device = next(teacher.parameters()).device
    on_teacher = rollout.to(device)
    logits = CompletionLogits(teacher, on_teacher)

    def outside(rows: slice, positions: slice, logits_btV: torch.Tensor) -> dict[str, torch.Tensor]:
        token_logit_bt1 = logits_btV.gather(-1, on_teacher.tokens_BT[rows, positions, None])
        return {"outside": (logits_btV > token_logit_bt1).sum(-1) >= cut_topk}

    outside_BT = reduce_chunks(logits.chunks(), logits.shape, outside)["outside"] & on_teacher.loss_mask_BT
    length_B = on_teacher.real_BT.sum(1)
    # argmax of a bool row finds its first True; rows with none keep their whole length
    return torch.where(outside_BT.any(1), outside_BT.int().argmax(1), length_B).cpu()


def continue_prefixes(
    teacher,
    tokenizer,
    prompts: list[list[int]],
    drafts: list[list[int]],
    cut_B: list[int],
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator | None,
) -> tuple[list[list[int]], int]:
    """(per row y_o[:t] ⊕ the teacher's continuation of prompt ⊕ y_o[:t] (at most ``max_new_tokens - t`` new
    tokens), or y_o itself where t is the whole of y_o; the tokens the teacher read and wrote doing it). One
    batched ``generate`` over the rows that are cut: a row's tokens do not depend on the budget, so clipping
    each row to its own budget afterwards gives what a call per row would."""
    cut_rows = [b for b, t in enumerate(cut_B) if t < len(drafts[b]) and t < max_new_tokens]
    refined = [list(d) for d in drafts]
    if not cut_rows:
        return refined, 0
    budget = {b: max_new_tokens - cut_B[b] for b in cut_rows}
    continued = sample_prompts(
        teacher,
        tokenizer,
        [prompts[b] + drafts[b][: cut_B[b]] for b in cut_rows],
        max_new_tokens=max(budget.values()),
        temperature=temperature,
        top_p=1.0,
        generator=generator,
    )
    for row, b in enumerate(cut_rows):
        tail = continued.tokens_BT[row][continued.loss_mask_BT[row]].tolist()
        refined[b] = drafts[b][: cut_B[b]] + tail[: budget[b]]
    return refined, int(continued.attention_mask.sum())


def rewrite_drafts(
    teacher,
    tokenizer,
    rows: Sequence[Example],
    drafts: list[list[int]],
    settings: TrdConfig,
    max_new_tokens: int,
    generator: torch.Generator | None,
) -> tuple[list[list[int]], int]:
    """(per row the teacher's answer to ``settings.template`` filled with the example's last turn and the
    decoded draft, as the token ids it sampled with the shared tokenizer (through its end token where it
    ended); the tokens the teacher read and wrote). A row whose teacher ran out of budget without writing any
    text keeps its draft."""
    examples = [
        teacher_example(ex, completion_text(tokenizer, d), settings.template)
        for ex, d in zip(rows, drafts, strict=True)
    ]
    written = sample_prompts(
        teacher,
        tokenizer,
        encode_prompts(tokenizer, examples),
        max_new_tokens=max_new_tokens,
        temperature=settings.temperature,
        top_p=1.0,
        generator=generator,
    )
    refined = []
    for ids, truncated, draft in zip(
        written.completion_ids(), written.truncated_B.tolist(), drafts, strict=True
    ):
        # cut off by the budget, it did not end, so neither does y_r; without any text there is none
        refined.append(list(draft) if truncated and not completion_text(tokenizer, ids) else ids)
    return refined, int(written.attention_mask.sum())


def teacher_example(example: Example, draft: str, template: str) -> Example:
    """``example`` with its last turn replaced by the user turn asking the teacher to refine ``draft``."""
    messages = example.messages()
    turn = template.format(prompt=messages[-1]["content"], draft=draft)
    if isinstance(example.prompt, str):
        return dataclasses.replace(example, prompt=turn)
    return dataclasses.replace(example, prompt=(*example.prompt[:-1], ("user", turn)))


def completion_text(tokenizer, ids: list[int]) -> str:
    """A completion's text as the verifier reads it: end tokens and other special tokens dropped."""
    ends = end_ids(tokenizer)
    return tokenizer.decode([i for i in ids if i not in ends], skip_special_tokens=True)


def through_first_end(ids: list[int], ends: Sequence[int]) -> list[int]:
    """``ids`` through the first of ``ends`` (all of them if none occurs)."""
    at = first_end(ids, ends)
    return ids if at is None else ids[: at + 1]


@torch.no_grad()
def mean_nll(model, rollout: Rollout) -> torch.Tensor:
    """[B] fp32 on the CPU: the model's mean negative log-likelihood per loss token of each completion."""
    on_model = rollout.to(next(model.parameters()).device)
    logits = CompletionLogits(model, on_model)
    logp_BT = reduce_chunks(
        logits.chunks(),
        logits.shape,
        lambda rows, positions, logits_btV: {
            "logp": token_logprobs(logits_btV, on_model.tokens_BT[rows, positions])
        },
    )["logp"]
    mask_BT = on_model.loss_mask_BT
    return (-(logp_BT * mask_BT).sum(1) / mask_BT.sum(1).clamp(min=1)).cpu()


def layout(
    rollout: Rollout,
    completions: list[list[int]],
    sampler_logp: list[list[float] | None],
    tokenizer,
    max_new_tokens: int,
) -> Rollout:
    """``rollout``'s prompts with ``completions`` (each ending at its first end token, if
    any) laid out as the
    sampler lays them out; ``sampler_logp`` per row: its behaviour log-probs, or None for 0 (not the student's
    sample)."""
    tokens_BT, loss_mask_BT = right_pad(completions, tokenizer.pad_token_id)
    sampler_logp_BT = torch.zeros(tokens_BT.shape)
    for b, logp in enumerate(sampler_logp):
        if logp is not None:
            sampler_logp_BT[b, : len(logp)] = torch.tensor(logp)
    ends = end_ids(tokenizer)
    truncated_B = torch.tensor([not any(i in ends for i in ids[:max_new_tokens]) for ids in completions])
    device = rollout.prompt_ids_BP.device
    return Rollout(
        prompt_ids_BP=rollout.prompt_ids_BP,
        prompt_mask_BP=rollout.prompt_mask_BP,
        tokens_BT=tokens_BT.to(device),
        loss_mask_BT=loss_mask_BT.to(device),
        sampler_logp_BT=sampler_logp_BT.to(device),
        truncated_B=truncated_B.to(device),
    )
