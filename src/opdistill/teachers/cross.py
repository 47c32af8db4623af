"""A teacher with its own tokenizer (math.md §18): the student's rollout in the teacher's tokens (the
teacher's chat template for each prompt, its encoding of each completion's decoded text), scored there by a
``LocalTeacher`` or ``RemoteTeacher``, and the scores brought back to the student's positions span by span
(alignment.py).

At the student's positions the signal reads: L0, each span's teacher log-prob (the chain rule over its
teacher tokens) at the span's last position, so a row's sum is the teacher's log-prob of the whole text; the
state-level scores (L1 top-K, mapped to student ids, -1 where a teacher id has no student twin; the entropy)
at each span's first position, where both models have read the same text; L2 at spans of one token on each
side, over the shared vocabulary only. ``Spans`` says which positions are which."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch

from opdistill.alignment import align, shared_vocabulary, token_ends, unwritable
from opdistill.config import Config, WeightingConfig
from opdistill.data.examples import Example, rollout_of
from opdistill.data.rendering import encode_prompts, end_ids
from opdistill.errors import UserError
from opdistill.logits import CompletionLogits, reduce_chunks
from opdistill.objectives.losses import MASKED
from opdistill.types import Rollout, SignalRequest, Spans, TeacherSignal


@dataclasses.dataclass
class RowSpans:
    """One row's alignment: each student and each teacher completion token's span."""

    student: list[int]
    teacher: list[int]

    @property
    def count(self) -> int:
        return max([*self.student, *self.teacher], default=-1) + 1


class CrossTokenizerTeacher:
    """``inner`` (a teacher over ``teacher_tokenizer``'s ids) scoring the rollouts of a student with
    ``student_tokenizer``. It needs each row's example, for the teacher's own rendering of the prompt. A
    teacher whose tokenizer cannot write some student token's text (it would read it as its unknown token)
    is refused."""

    def __init__(self, inner, student_tokenizer, teacher_tokenizer, chunk_tokens: int):
        missing = unwritable(student_tokenizer, teacher_tokenizer)
        if missing:
            raise UserError(
                f"the teacher's tokenizer differs from the student's and cannot write {len(missing)} of the "
                f"student's tokens (e.g. {missing[:3]}): it would read them as its unknown token. Use a "
                "teacher whose tokenizer covers the student's text."
            )
        self.inner, self.chunk_tokens = inner, chunk_tokens
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.student_ends, self.teacher_end = end_ids(student_tokenizer), end_ids(teacher_tokenizer)[0]
        self._shared: tuple[torch.Tensor, torch.Tensor] | None = None

    def shared(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(student ids, teacher ids) of the shared vocabulary, decoded once on first use (seconds for a
        262k vocabulary)."""
        if self._shared is None:
            student, teacher = shared_vocabulary(self.student_tokenizer, self.teacher_tokenizer)
            self._shared = torch.tensor(student), torch.tensor(teacher)
        return self._shared

    def score(
        self, rollout: Rollout, request: SignalRequest, ids_BTK=None, rows: Sequence[Example] = ()
    ) -> TeacherSignal:
        if request.at_ids:
            raise ValueError("a teacher with another tokenizer cannot score the student's own ids (L1s)")
        if len(rows) != rollout.tokens_BT.shape[0]:
            raise ValueError("a teacher with another tokenizer needs each row's example (its prompt)")
        started = time.perf_counter()
        view, alignment = self.view(rollout, rows)
        align_s = time.perf_counter() - started
        scored = self.inner.score(view, request)
        started = time.perf_counter()
        signal = self.at_student_positions(rollout, view, alignment, scored, request)
        assert signal.spans is not None
        signal.spans.align_s = align_s + time.perf_counter() - started
        return signal

    def view(self, rollout: Rollout, rows: Sequence[Example]) -> tuple[Rollout, list[RowSpans]]:
        """The rollout in the teacher's tokens, and each row's spans."""
        student, teacher = self.student_tokenizer, self.teacher_tokenizer
        completions, alignment = [], []
        for content in rollout.completion_ids():
            ended = bool(content) and content[-1] in self.student_ends
            content = content[:-1] if ended else content
            text = student.decode(content, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            theirs = teacher(text, add_special_tokens=False)["input_ids"]
            mine_span, their_span = align(
                token_ends(student, content, text), token_ends(teacher, theirs, text), len(text)
            )
            spans = RowSpans(mine_span, their_span)
            if ended:  # the end token is a span of its own on both sides
                spans = RowSpans([*mine_span, spans.count], [*their_span, spans.count])
                theirs = [*theirs, self.teacher_end]
            completions.append(theirs)
            alignment.append(spans)
        prompts = encode_prompts(teacher, rows)
        view = rollout_of(prompts, completions, teacher.pad_token_id)
        view.truncated_B = rollout.truncated_B.cpu()
        return view.to(rollout.tokens_BT.device), alignment

    def at_student_positions(
        self,
        rollout: Rollout,
        view: Rollout,
        alignment: list[RowSpans],
        scored: TeacherSignal,
        request: SignalRequest,
    ) -> TeacherSignal:
        """``scored`` (at the teacher's positions of ``view``) at the student's positions of ``rollout``."""
        device, (B, T) = rollout.tokens_BT.device, rollout.tokens_BT.shape
        span_BT = torch.full((B, T), -1, dtype=torch.long)
        start_BT = torch.zeros(B, T, dtype=torch.bool)
        one_BT = torch.zeros(B, T, dtype=torch.bool)
        token_logp_BT = torch.zeros(B, T)
        starts: list[tuple[int, int, int]] = []  # (row, student position, teacher position) of span starts
        teacher_logp = scored.token_logp_BT.cpu()
        for b, spans in enumerate(alignment):
            mine, theirs = (
                torch.tensor(spans.student, dtype=torch.long),
                torch.tensor(spans.teacher, dtype=torch.long),
            )
            count = spans.count
            span_BT[b, : len(mine)] = mine
            totals = torch.zeros(count).index_add(0, theirs, teacher_logp[b, : len(theirs)].float())
            last_S = _lasts(mine, count)
            token_logp_BT[b, last_S[last_S >= 0]] = totals[last_S >= 0]
            first_mine, first_theirs = _firsts(mine, count), _firsts(theirs, count)
            both = (first_mine >= 0) & (first_theirs >= 0)
            start_BT[b, first_mine[both]] = True
            single = (
                both
                & (torch.bincount(mine, minlength=count) == 1)
                & (torch.bincount(theirs, minlength=count) == 1)
            )
            one_BT[b, first_mine[single]] = True
            starts += [(b, int(p), int(q)) for p, q in zip(first_mine[both], first_theirs[both], strict=True)]
        index = torch.tensor(starts, dtype=torch.long).view(-1, 3)
        at_rows, mine_at, theirs_at = index[:, 0], index[:, 1], index[:, 2]

        def moved(
            values_BtX: torch.Tensor, fill: float, where_BT: torch.Tensor | None = None
        ) -> torch.Tensor:
            """Teacher values at the student's span starts (only where ``where_BT``), ``fill`` elsewhere."""
            out = values_BtX.new_full((B, T, *values_BtX.shape[2:]), fill)
            keep = slice(None) if where_BT is None else where_BT[at_rows, mine_at]
            out[at_rows[keep], mine_at[keep]] = values_BtX[at_rows[keep], theirs_at[keep]]
            return out

        fields: dict[str, torch.Tensor] = {}
        if scored.topk_ids_BTK is not None and scored.topk_logp_BTK is not None:
            fields["topk_ids_BTK"] = moved(self.student_ids(scored.topk_ids_BTK.cpu()), -1)
            fields["topk_logp_BTK"] = moved(scored.topk_logp_BTK.cpu().float(), MASKED)
        if scored.entropy_BT is not None:
            fields["entropy_BT"] = moved(scored.entropy_BT.cpu().float(), 0.0)
        full_logits, vocab_ids_S = None, None
        if request.full:
            assert scored.full_logits is not None
            vocab_ids_S, teacher_ids_S = self.shared()
            shared_BtS = self.shared_logits(scored.full_logits, teacher_ids_S).cpu()
            full_logits = CompletionLogits.of(moved(shared_BtS, 0.0, one_BT).to(device))
            vocab_ids_S = vocab_ids_S.to(device)
        mask_BT = rollout.loss_mask_BT.cpu()
        spans = Spans(
            span_BT.to(device), (start_BT & mask_BT).to(device), (one_BT & mask_BT).to(device), vocab_ids_S
        )
        return TeacherSignal(
            token_logp_BT=(token_logp_BT * mask_BT).to(device),
            full_logits=full_logits,
            spans=spans,
            **{name: value.to(device) for name, value in fields.items()},
        )

    def student_ids(self, teacher_ids: torch.Tensor) -> torch.Tensor:
        """Teacher ids as the student's (-1 where the student's vocabulary has no token of the same text)."""
        student_S, teacher_S = self.shared()
        table = torch.full((len(self.teacher_tokenizer),), -1, dtype=torch.long)
        table[teacher_S] = student_S
        return table[teacher_ids]

    def shared_logits(self, logits: CompletionLogits, teacher_ids_S: torch.Tensor) -> torch.Tensor:
        """[B, T_teacher, S]: the teacher's logits at the shared vocabulary's ids, a chunk at a time."""
        return reduce_chunks(
            logits.chunks(self.chunk_tokens),
            logits.shape,
            lambda rows, positions, logits_btV: {
                "shared": logits_btV[..., teacher_ids_S.to(logits_btV.device)]
            },
        )["shared"].float()


def _firsts(span_N: torch.Tensor, count: int) -> torch.Tensor:
    """[count]: the first index of each span in ``span_N`` (-1 for a span with no token)."""
    first = torch.full((count,), len(span_N), dtype=torch.long)
    first = first.scatter_reduce(0, span_N, torch.arange(len(span_N)), reduce="amin")
    return torch.where(first < len(span_N), first, -1)


def _lasts(span_N: torch.Tensor, count: int) -> torch.Tensor:
    """[count]: the last index of each span in ``span_N`` (-1 for a span with no token)."""
    return torch.full((count,), -1, dtype=torch.long).scatter_reduce(
        0, span_N, torch.arange(len(span_N)), reduce="amax"
    )


EXACT = ("sampled_rkl", "teacher_pick", "dpo")  # read only the sampled tokens' log-probs: exact over spans
SHARED_VOCABULARY = ("full_rkl", "full_fkl", "jsd")  # divergences on one-to-one spans, shared vocabulary only


def check_config(config: Config) -> None:
    """Raise a ``UserError`` naming the first setting a teacher with another tokenizer cannot serve."""
    objective = config.objective
    if objective.type not in EXACT + SHARED_VOCABULARY:
        raise UserError(
            f"the teacher's tokenizer differs from the student's, and objective.type={objective.type} needs "
            f"the teacher's scores token by token in the student's vocabulary: use {', '.join(EXACT)} (exact "
            f"over aligned spans) or {', '.join(SHARED_VOCABULARY)} (on the shared vocabulary; "
            "docs/cross_tokenizer.md)."
        )
    unsupported = [
        name
        for name, on in (
            ("objective.discount", objective.discount > 0),
            ("objective.baseline=vopd", objective.baseline == "vopd"),
            ("weighting.*", config.weighting != WeightingConfig()),
            ("rollout.skd_topk", config.rollout.skd_topk >= 0),
            (f"trd.mode={config.trd.mode}", config.trd.mode != "off"),
            (f"data.completions={config.data.completions}", config.data.completions != "dataset"),
            ("cold_start.samples", config.cold_start.samples > 0),
            ("data.select_fraction", config.data.select_fraction > 0),
            ("teachers", bool(config.teachers)),
            ("env.name (multi-turn episodes)", bool(config.env.name)),
        )
        if on
    ]
    if unsupported:
        raise UserError(
            f"the teacher's tokenizer differs from the student's, which does not combine with "
            f"{unsupported[0]} yet (docs/cross_tokenizer.md lists what does)."
        )
