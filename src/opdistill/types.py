"""The tensors that flow through one step, with their shapes.

Shape suffixes: B sequences (prompts x samples per prompt), P prompt width, T completion width, V vocab.
Prompts are left-padded and completions right-padded, so ``cat([prompt_ids_BP, tokens_BT], 1)`` is
a valid batch whose position ``P - 1 + t`` predicts completion token ``t``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    prompt_ids_BP: torch.Tensor  # int64, left-padded prompts (repeated G times per prompt)
    prompt_mask_BP: torch.Tensor  # bool, True on real prompt tokens
    tokens_BT: torch.Tensor  # int64, completions; pad after EOS
    loss_mask_BT: torch.Tensor  # bool, True on completion tokens that receive loss (EOS included)
    sampler_logp_BT: torch.Tensor  # fp32, log-prob of each token under the behaviour policy (0 on pad)
    truncated_B: torch.Tensor  # bool, hit max_new_tokens without EOS

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids_BP, self.tokens_BT], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask_BP, self.loss_mask_BT], dim=1)

    def select(self, rows: slice) -> Rollout:
        return Rollout(*(getattr(self, name)[rows] for name in self.__dataclass_fields__))


@dataclass
class TeacherSignal:
    """What the teacher sends back: only the level the objective asked for (ALGORITHMS.md §1.3)."""

    token_logp_BT: torch.Tensor  # L0: teacher log-prob of each sampled token (0 on pad)
    logp_BTV: torch.Tensor | None = None  # L2: full teacher log-probs, only for full-vocabulary objectives

    def select(self, rows: slice) -> TeacherSignal:
        return TeacherSignal(self.token_logp_BT[rows], None if self.logp_BTV is None else self.logp_BTV[rows])
