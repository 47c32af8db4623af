"""The tensors that flow through one step, with their shapes.

Shape suffixes: B sequences (prompts x samples per prompt), P prompt width, T completion width, V vocab.
Prompts are left-padded and completions right-padded, so ``cat([prompt_ids_BP, tokens_BT], 1)`` is
a valid batch whose position ``P - 1 + t`` predicts completion token ``t``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from opdistill.logits import CompletionLogits

# the run's token counters: what each step adds and one-time work is charged (RunState, Cost, metrics.jsonl)
COUNTERS = (
    "student_train_tokens",
    "student_sampled_tokens",
    "teacher_scored_tokens",
    "teacher_generated_tokens",
)


@dataclass
class Cost:
    """Time and tokens of one-time work (a teacher pool, a curriculum, a prompt selection, a cold start),
    which count against the run's clock and counters."""

    elapsed_s: float = 0.0
    student_train_tokens: int = 0
    student_sampled_tokens: int = 0
    teacher_scored_tokens: int = 0
    teacher_generated_tokens: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))


@dataclass
class Rollout:
    prompt_ids_BP: torch.Tensor  # int64, left-padded prompts (repeated G times per prompt)
    prompt_mask_BP: torch.Tensor  # bool, True on real prompt tokens
    tokens_BT: torch.Tensor  # int64, completions; pad after EOS
    loss_mask_BT: torch.Tensor  # bool, True on completion tokens that receive loss (EOS included)
    sampler_logp_BT: torch.Tensor  # fp32, log-prob of each token under the behaviour policy (0 on pad)
    truncated_B: torch.Tensor  # bool, hit max_new_tokens without EOS
    # bool, True on an episode's environment tokens (observations, chat-template glue between turns): part of
    # the context every model attends to, never loss, never counted (None: a single-turn completion)
    observed_BT: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids_BP, self.tokens_BT], dim=1)

    @property
    def real_BT(self) -> torch.Tensor:
        """The completion's tokens that are not padding: the student's and an episode's environment's."""
        return self.loss_mask_BT if self.observed_BT is None else self.loss_mask_BT | self.observed_BT

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask_BP, self.real_BT], dim=1)

    def completion_ids(self) -> list[list[int]]:
        """Each row's completion tokens (its loss tokens: through the end token where it ended)."""
        return [row[mask].tolist() for row, mask in zip(self.tokens_BT, self.loss_mask_BT, strict=True)]

    def select(self, rows: slice | torch.Tensor) -> Rollout:
        return self._map(lambda tensor: tensor[rows])

    def to(self, device: torch.device) -> Rollout:
        return self._map(lambda tensor: tensor.to(device))

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Rollout:
        fields = {name: fn(value) for name, value in vars(self).items() if value is not None}
        return dataclasses.replace(self, **fields)


@dataclass(frozen=True)
class SignalRequest:
    """What the objective needs from the teacher (math.md §1.3); the sampled-token log-prob (L0) always."""

    topk: int = 0  # L1: the teacher's own top-K ids and log-probs per position
    at_ids: bool = False  # L1s: log-probs at caller-chosen ids (the student's top-K)
    full: bool = False  # L2: full logits over the vocabulary
    entropy: bool = False  # the teacher's exact entropy per position ([B, T], not a [B, T, V] tensor)


@dataclass
class Spans:
    """How a teacher with another tokenizer lines up with the student's tokens (teachers/cross.py, math.md
    §18): runs of student positions that cover the same text as a run of the teacher's tokens."""

    span_BT: torch.Tensor  # int64, each completion position's span, counted from 0 along the row (-1 on pad)
    start_BT: torch.Tensor  # bool, the span's first position: the teacher scored the same text prefix there
    one_to_one_BT: torch.Tensor  # bool, a span of one token on each side, the same token text on both
    full_BT: torch.Tensor | None = None  # bool, the positions L2 covers (math.md §18.3), when it was asked
    vocab_ids_S: torch.Tensor | None = None  # L2 over the shared vocabulary: its student ids, L2's columns
    align_s: float = 0.0  # seconds spent re-tokenizing, aligning and moving the scores
    teacher_tokens: int = 0  # the tokens the teacher read (its prompts and completions, in its own ids)

    def __getitem__(self, rows: slice | torch.Tensor) -> Spans:
        full_BT = None if self.full_BT is None else self.full_BT[rows]
        return dataclasses.replace(
            self,
            span_BT=self.span_BT[rows],
            start_BT=self.start_BT[rows],
            one_to_one_BT=self.one_to_one_BT[rows],
            full_BT=full_BT,
        )


@dataclass
class TeacherSignal:
    """What the teacher sends back: L0 always, the other levels only when asked (math.md §1.3)."""

    token_logp_BT: torch.Tensor  # L0: teacher log-prob of each sampled token (0 on pad)
    topk_ids_BTK: torch.Tensor | None = None  # L1: the teacher's top-K ids, most likely first
    topk_logp_BTK: torch.Tensor | None = None  # L1: their log-probs (tail mass = 1 - Σ exp)
    given_ids_BTK: torch.Tensor | None = None  # L1s: the ids the caller asked about
    given_logp_BTK: torch.Tensor | None = None  # L1s: teacher log-probs at those ids
    # L2: the teacher's full logits, made when asked: a chunk at a time for the step, whole per micro-batch
    full_logits: CompletionLogits | None = None
    entropy_BT: torch.Tensor | None = None  # exact teacher entropy in nats
    # a teacher with another tokenizer (math.md §18): L0 is each span's log-prob, at its last position; its
    # state-level scores (L1, entropy) sit at span starts, and L2 where spans.full_BT says
    spans: Spans | None = None

    def select(self, rows: slice | torch.Tensor) -> TeacherSignal:
        return dataclasses.replace(
            self, **{name: value[rows] for name, value in vars(self).items() if value is not None}
        )

    @staticmethod
    def gather(parts: list[tuple[torch.Tensor, TeacherSignal]], rows: int) -> TeacherSignal:
        """One signal of ``rows`` rows from signals of some of them: ``(index_B, signal)`` pairs that cover
        each row once (the teachers of a routed batch). Every part must carry the same fields."""
        index_B = torch.cat([index for index, _ in parts])
        order_B = torch.empty_like(index_B)
        order_B[index_B] = torch.arange(rows, device=index_B.device)
        fields: dict[str, Any] = {}
        for name, value in vars(parts[0][1]).items():
            if isinstance(value, torch.Tensor):
                fields[name] = torch.cat([getattr(signal, name) for _, signal in parts])[order_B]
            elif value is not None:  # full logits: each row's made by its own teacher, when asked
                fields[name] = type(value).routed(
                    [(index, getattr(signal, name)) for index, signal in parts], rows
                )
        return TeacherSignal(**fields)


@dataclass
class Shaping:
    """Per-token weights and masks of one step (shaping.py from weighting.py), applied on top of the
    objective's own math; all detached. The rollout's own mask still says which tokens are real; this one
    which get loss."""

    mask_BT: torch.Tensor  # bool, tokens that receive loss (and count in the normaliser)
    weight_BT: torch.Tensor  # multiplies the teacher term (the advantage or the divergence)
    bonus_B: torch.Tensor | None = None  # verifier advantage per sample: c_R · route · A_GRPO, or DASD's A_G
    correct_B: torch.Tensor | None = None  # SCOPE's branch per sample
    zone_BT: torch.Tensor | None = None  # SEAD's zone per token (weighting.SKIP / RKL / FKL)
    sead_lambda: float = 0.0  # SEAD's annealed forward-KL share
    baseline: float | None = None  # MiniLLM: the step's mean long-term advantage (a constant baseline)

    def select(self, rows: slice) -> Shaping:
        return dataclasses.replace(
            self,
            **{name: value[rows] for name, value in vars(self).items() if isinstance(value, torch.Tensor)},
        )


@dataclass
class StepBatch:
    rollout: Rollout  # what the objective trains on
    signal: TeacherSignal | None  # the teacher's scores of it (None for SFT)
    metrics: dict[
        str, Any
    ]  # lengths, token counters, the GKD coin (and per-position lists on diagnostics steps)
    sft_rollout: Rollout | None = None  # off-policy completions for the SFT-stabiliser (objective.sft_coef)
    reward_B: torch.Tensor | None = (
        None  # verifier outcome (1.0 = correct) per sample, when the objective uses it
    )
    reference_logp_BT: torch.Tensor | None = (
        None  # the initial student's log-prob of each token (ref-KL term)
    )
    shaping: Shaping | None = None  # per-token weights and masks (shaping.py), set by the loop

    def select(self, rows: slice) -> StepBatch:
        """The micro-batch of ``rows`` (the SFT-stabiliser's batch is separate and stays whole)."""
        return StepBatch(
            self.rollout.select(rows),
            None if self.signal is None else self.signal.select(rows),
            self.metrics,
            self.sft_rollout,
            None if self.reward_B is None else self.reward_B[rows],
            None if self.reference_logp_BT is None else self.reference_logp_BT[rows],
            None if self.shaping is None else self.shaping.select(rows),
        )
