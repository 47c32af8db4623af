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

from opdistill.alignment import align, decode, prefix_projection, shared_vocabulary, token_ends, unwritable
from opdistill.config import Config, WeightingConfig
from opdistill.data.examples import Example, rollout_of
from opdistill.data.rendering import encode_prompts, end_ids, turn_end
from opdistill.errors import UserError
from opdistill.logits import CompletionLogits, reduce_chunks
from opdistill.objectives.losses import MASKED, TAIL_FLOOR
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
    is refused. ``vocabulary`` is how its full logits (L2) reach the student's vocabulary (math.md §18.3):
    ``prefix`` projects them onto it at every span start, ``shared`` restricts both to the shared vocabulary
    at one-to-one spans."""

    def __init__(
        self, inner, student_tokenizer, teacher_tokenizer, chunk_tokens: int, vocabulary: str = "prefix"
    ):
        missing = unwritable(student_tokenizer, teacher_tokenizer)
        if missing:
            raise UserError(
                f"the teacher's tokenizer differs from the student's and cannot write {len(missing)} of the "
                f"student's tokens (e.g. {missing[:3]}): it would read them as its unknown token. Use a "
                "teacher whose tokenizer covers the student's text."
            )
        self.inner, self.chunk_tokens, self.vocabulary = inner, chunk_tokens, vocabulary
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.student_ends, self.teacher_end = end_ids(student_tokenizer), turn_end(teacher_tokenizer)
        self._shared: tuple[torch.Tensor, torch.Tensor] | None = None
        self._projection: torch.Tensor | None = None
        self._to_student: torch.Tensor | None = None

    def shared(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(student ids, teacher ids) of the shared vocabulary, decoded once on first use (seconds for a
        262k vocabulary)."""
        if self._shared is None:
            student, teacher = shared_vocabulary(self.student_tokenizer, self.teacher_tokenizer)
            self._shared = torch.tensor(student), torch.tensor(teacher)
        return self._shared

    def projection(self) -> torch.Tensor:
        """[V_teacher]: each teacher id's student id under the prefix projection (-1: none), made once."""
        if self._projection is None:
            self._projection = torch.tensor(prefix_projection(self.student_tokenizer, self.teacher_tokenizer))
        return self._projection

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
        signal.spans.teacher_tokens = int(view.attention_mask.sum())
        return signal

    def view(self, rollout: Rollout, rows: Sequence[Example]) -> tuple[Rollout, list[RowSpans]]:
        """The rollout in the teacher's tokens, and each row's spans."""
        student, teacher = self.student_tokenizer, self.teacher_tokenizer
        contents, ended = [], []
        for content in rollout.completion_ids():
            ended.append(bool(content) and content[-1] in self.student_ends)
            contents.append(content[:-1] if ended[-1] else content)
        texts = decode(student, contents)
        # a special token's name in the text is text to the teacher, never its own special token
        theirs = (
            teacher(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"] if texts else []
        )
        completions, alignment = [], []
        for mine, text, their_ids, end in zip(contents, texts, theirs, ended, strict=True):
            mine_ends, their_ends = token_ends(student, mine, text), token_ends(teacher, their_ids, text)
            spans = RowSpans(*align(mine_ends, their_ends, len(text)))
            if end:  # the end token is a span of its own on both sides
                spans = RowSpans([*spans.student, spans.count], [*spans.teacher, spans.count])
                their_ids = [*their_ids, self.teacher_end]
            completions.append(their_ids)
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
        mask_BT = rollout.loss_mask_BT.cpu()
        full_logits, full_BT, vocab_ids_S = None, None, None
        if request.full:
            assert scored.full_logits is not None
            full_BT = (start_BT if self.vocabulary == "prefix" else one_BT) & mask_BT
            logits_BtX, vocab_ids_S = self.student_vocabulary_logits(scored.full_logits)
            full_logits = CompletionLogits.of(moved(logits_BtX, 0.0, full_BT).to(device))
        spans = Spans(
            span_BT.to(device),
            (start_BT & mask_BT).to(device),
            (one_BT & mask_BT).to(device),
            None if full_BT is None else full_BT.to(device),
            None if vocab_ids_S is None else vocab_ids_S.to(device),
        )
        return TeacherSignal(
            token_logp_BT=(token_logp_BT * mask_BT).to(device),
            full_logits=full_logits,
            spans=spans,
            **{name: value.to(device) for name, value in fields.items()},
        )

    def student_ids(self, teacher_ids: torch.Tensor) -> torch.Tensor:
        """Teacher ids as the student's (-1 where the student's vocabulary has no token of the same text)."""
        if self._to_student is None:
            student_S, teacher_S = self.shared()
            self._to_student = torch.full((len(self.teacher_tokenizer),), -1, dtype=torch.long)
            self._to_student[teacher_S] = student_S
        return self._to_student[teacher_ids]

    def student_vocabulary_logits(self, logits: CompletionLogits) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's full logits at its own positions, a chunk at a time, in the student's vocabulary:
        projected ([B, T_teacher, V_student] log-probs, floored at ``TAIL_FLOOR``), or at the shared
        vocabulary's ids ([B, T_teacher, S], with those ids' student twins)."""
        if self.vocabulary == "shared":
            student_S, teacher_S = self.shared()

            def bring(rows, positions, logits_btV: torch.Tensor) -> dict[str, torch.Tensor]:
                return {"out": logits_btV[..., teacher_S.to(logits_btV.device)].float()}

        else:
            student_S, projection, width = None, self.projection(), len(self.student_tokenizer)
            kept = projection >= 0

            def bring(rows, positions, logits_btV: torch.Tensor) -> dict[str, torch.Tensor]:
                probs_btV = logits_btV.float().softmax(-1)[..., kept.to(logits_btV.device)]
                index_btV = projection[kept].to(logits_btV.device).expand_as(probs_btV)
                mass_btW = probs_btV.new_zeros(*probs_btV.shape[:2], width).scatter_add(
                    -1, index_btV, probs_btV
                )
                return {"out": mass_btW.clamp(min=TAIL_FLOOR).log()}

        return reduce_chunks(logits.chunks(self.chunk_tokens), logits.shape, bring)["out"].cpu(), student_S


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
            ("rollout.on_policy_fraction < 1", config.rollout.on_policy_fraction < 1),
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
