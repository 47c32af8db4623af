"""SKD sampling: the student proposes each token and the teacher verifies it (math.md §9.2).

Xu et al., 2025, "Speculative Knowledge Distillation" (arXiv 2410.11325), Algorithm 1. A ``rollout.Guide``:
``generate`` keeps its single decode loop and calls this guide at every step.
"""

from __future__ import annotations

import torch

from opdistill.sampling.decode import decoder_for
from opdistill.sampling.rollout import sample_next_token


class SpeculativeGuide:
    """Keep the student's token if it is among the teacher's top-``topk`` at that state, else replace it by a
    token sampled from the teacher (with the rollout's ``temperature`` and ``top_p``).

    ``topk >= V`` keeps every token (pure on-policy sampling); ``topk = 0`` replaces every token (teacher
    sampling). The top-K test is on the teacher's untempered logits: it asks which ids the teacher ranks
    highest, and a temperature does not change that order (top_p does not enter it either); ties at the K-th
    place are broken as ``torch.topk`` breaks them. A replacement is a fresh teacher sample, which may by
    chance be the student's token; it still counts as replaced.

    The teacher keeps its own KV cache (decode.py: the lean step where it applies) over exactly the student's
    prefix (same prompt ids, attention mask and position ids; then the final tokens), so it costs one teacher
    decode per token. Its uniforms come from its own ``generator``, and every step draws ``total`` of them and
    uses this batch's rows, as ``generate`` does: a row's sample is the same for any split of the batch across
    ranks, and the student's draws are those of plain sampling (with ``generator=None`` both would share the
    global stream, which breaks this). ``teacher`` is put in eval mode.

    ``stats()`` and ``replaced_BT`` describe the last rollout, over real tokens only (up to and including each
    row's EOS); under torchrun they are this rank's share (sum ``skd_proposed`` and ``skd_replaced``).
    """

    def __init__(
        self,
        teacher,
        topk: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ):
        if topk < 0:
            raise ValueError(f"the SKD top-K must be >= 0 (0 replaces every token), got {topk}")
        self.teacher = teacher.eval()
        self.topk, self.temperature, self.top_p, self.generator = topk, temperature, top_p, generator
        self.rows = (0, 0)
        self.out = None  # the teacher's decoder over this rollout (its KV cache), see decode.py
        self.logits_BV = None  # the teacher's logits for the next token
        self.real: list[torch.Tensor] = []  # per step, [B]: rows whose token is real (not after EOS)
        self.replaced: list[torch.Tensor] = []  # per step, [B]: real tokens the teacher replaced
        self.counts = [0, 0]  # tokens proposed and replaced over every rollout so far (an episode's turns)

    def start(
        self,
        prompt_ids_BP: torch.Tensor,
        attention_BP: torch.Tensor,
        position_BP: torch.Tensor,
        rows: tuple[int, int],
        max_len: int,
    ) -> None:
        self.rows, self.real, self.replaced = rows, [], []
        self.out = decoder_for(self.teacher)
        self.logits_BV = self.out.prefill(prompt_ids_BP, attention_BP, position_BP, max_len)

    def choose(
        self, token_B: torch.Tensor, logp_B: torch.Tensor, done_B: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.logits_BV is not None, "generate calls start before choose"
        first, total = self.rows
        B = token_B.shape[0]
        logits_BV = self.logits_BV
        # drawn every step, whatever is replaced, so the guide's stream stays aligned with the step index
        uniform_B = torch.rand(total, generator=self.generator)[first : first + B].to(token_B.device)
        teacher_B, teacher_logp_B = sample_next_token(logits_BV, self.temperature, self.top_p, uniform_B)
        top_ids_BK = logits_BV.topk(min(self.topk, logits_BV.shape[-1]), dim=-1).indices
        accepted_B = (top_ids_BK == token_B[:, None]).any(-1)  # K = 0: an empty top-K accepts nothing
        self.real.append(~done_B)
        self.replaced.append(~accepted_B & ~done_B)
        return (
            torch.where(accepted_B, token_B, teacher_B),
            torch.where(accepted_B, logp_B, teacher_logp_B.to(logp_B.dtype)),
        )

    def advance(self, token_B: torch.Tensor, attention_BL: torch.Tensor, position_B1: torch.Tensor) -> None:
        assert self.out is not None, "generate calls start before advance"
        self.logits_BV = self.out.step(token_B, attention_BL, position_B1)

    def finish(self) -> None:
        self.out = self.logits_BV = None  # the teacher's KV cache is not kept past the rollout
        if self.real:
            self.counts[0] += int(torch.stack(self.real).sum())
            self.counts[1] += int(torch.stack(self.replaced).sum())

    @property
    def replaced_BT(self) -> torch.Tensor:
        """bool [B, T] of the last rollout: True where the teacher replaced the student's (real) token."""
        return torch.stack(self.replaced, dim=1)

    def stats(self) -> dict[str, float | int]:
        """The acceptance rate (student tokens kept / proposed) over the rollouts this guide steered (one
        per step; each turn of an episode), and the counts behind it."""
        proposed, replaced = self.counts
        return {
            "skd_acceptance": (proposed - replaced) / proposed if proposed else 1.0,
            "skd_proposed": proposed,
            "skd_replaced": replaced,
        }
