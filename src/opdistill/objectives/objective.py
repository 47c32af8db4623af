"""Each objective's per-token loss, as one function of the same ``ObjectiveInputs`` (and, where the objective
reweights the step, one shaping function): the glue between a micro-batch and the math core.

Orchestration only: every formula lives in ``losses.py`` and ``weighting.py``. The direct branch
back-propagates a divergence at the visited states; the policy-gradient branch builds a detached advantage per
token (math.md §1.4); the step's ``Shaping`` weights the teacher term. ``registry.py`` names each function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from opdistill.objectives import losses, weighting
from opdistill.types import Rollout, Shaping, StepBatch, TeacherSignal

if TYPE_CHECKING:
    from opdistill.config import ObjectiveConfig


@dataclass
class ObjectiveInputs:
    """What every objective's loss may read for one micro-batch; ``metrics`` collects what it logs."""

    objective: ObjectiveConfig
    logits_BTV: torch.Tensor  # the student's logits at each completion position, with grad
    logp_BT: torch.Tensor  # their log-prob of each sampled token, with grad
    entropy_BT: torch.Tensor  # the student's entropy per position, with grad
    batch: StepBatch
    shaping: Shaping
    metrics: dict[str, float]

    @property
    def rollout(self) -> Rollout:
        return self.batch.rollout

    @property
    def signal(self) -> TeacherSignal:
        assert self.batch.signal is not None, "a distillation objective needs the teacher's signal"
        return self.batch.signal


@dataclass
class ShapingInputs:
    """What an objective's own shaping may read: the step's whole batch, its student statistics (without
    gradient, over the whole batch) and where the run stands."""

    objective: ObjectiveConfig
    batch: StepBatch
    student_logp_BT: torch.Tensor | None
    student_entropy_BT: torch.Tensor | None
    step: int
    steps: int  # train.steps: SEAD anneals over the run
    group: int  # rollout.n_per_prompt: samples per prompt (GRPO groups)
    metrics: dict[str, float]

    @property
    def signal(self) -> TeacherSignal:
        assert self.batch.signal is not None
        return self.batch.signal


# --- the direct branch: back-propagate a divergence at each visited state -----------------------------------


def direct(divergence_BT: torch.Tensor, inputs: ObjectiveInputs) -> torch.Tensor:
    """A divergence per token as the loss: logged before clipping, optionally clipped (math.md §6.2),
    weighted."""
    objective, mask_BT = inputs.objective, inputs.rollout.loss_mask_BT
    inputs.metrics["divergence"] = losses.masked_mean(divergence_BT, mask_BT)  # before any clipping
    if objective.token_clip:
        divergence_BT, clip_metrics = losses.clip_divergence(
            divergence_BT, mask_BT, objective.token_clip, objective.token_clip_soft
        )
        inputs.metrics.update(clip_metrics)
    return inputs.shaping.weight_BT * divergence_BT


def teacher_logits(inputs: ObjectiveInputs) -> torch.Tensor:
    """The teacher's full logits (L2) for this micro-batch's rows, made on first use."""
    assert inputs.signal.full_logits is not None
    return inputs.signal.full_logits.tensor()


def full_vocabulary_loss(inputs: ObjectiveInputs, beta: float) -> torch.Tensor:
    """GKD's generalized JSD_β over the whole vocabulary at temperature τ (math.md §3): β = 1 reverse KL. A
    teacher with another tokenizer (math.md §18.3): the divergence where its distribution reached the
    student's vocabulary (projected, at span starts; or both restricted to the shared vocabulary, at
    one-to-one spans), the exact span-level sampled reverse KL on the other tokens."""
    spans, student_BTV = inputs.signal.spans, inputs.logits_BTV
    if spans is not None and spans.vocab_ids_S is not None:
        student_BTV = student_BTV[..., spans.vocab_ids_S]
    divergence_BT = losses.generalized_jsd(
        student_BTV, teacher_logits(inputs), beta, inputs.objective.temperature
    )
    if spans is None:
        return direct(divergence_BT, inputs)
    assert spans.full_BT is not None
    mask_BT = inputs.rollout.loss_mask_BT
    inputs.metrics["divergence_frac"] = losses.masked_mean(spans.full_BT.float(), mask_BT)
    sampled_BT = policy_gradient(sampled_advantage(inputs), inputs) * (mask_BT & ~spans.full_BT)
    return direct(divergence_BT * spans.full_BT, inputs) + sampled_BT


def topk_rkl_loss(inputs: ObjectiveInputs) -> torch.Tensor:
    """Reverse KL on K ids per position, of the configured variant and support (math.md §5)."""
    objective, signal, logits_BTV = inputs.objective, inputs.signal, inputs.logits_BTV
    student_ids_BTK = None
    if objective.topk_support == "intersect":
        student_ids_BTK = logits_BTV.detach().topk(objective.topk, dim=-1).indices
    ids_BTK, teacher_BTK, valid_BTK = losses.topk_support(
        objective.topk_support,
        teacher_topk=(signal.topk_ids_BTK, signal.topk_logp_BTK),
        at_student_ids=(signal.given_ids_BTK, signal.given_logp_BTK),
        student_ids_BTK=student_ids_BTK,
    )
    # the mass each side puts on the support (Many Faces: logging it is mandatory for top-K objectives)
    mask_BT = inputs.shaping.mask_BT
    student_lp_BTK = losses.logprobs_at(logits_BTV.detach(), ids_BTK)
    inputs.metrics["student_mass"] = losses.masked_mean((student_lp_BTK.exp() * valid_BTK).sum(-1), mask_BT)
    inputs.metrics["teacher_mass"] = losses.masked_mean((teacher_BTK.exp() * valid_BTK).sum(-1), mask_BT)
    divergence_BT = losses.topk_divergence(
        logits_BTV, ids_BTK, teacher_BTK, objective.topk_variant, valid_BTK
    )
    return direct(divergence_BT, inputs)


def sead_loss(inputs: ObjectiveInputs) -> torch.Tensor:
    """SEAD (math.md §7.7): D = (1-λ) D_zone + λ FKL, with D_zone = FKL where the teacher is uncertain."""
    shaping = inputs.shaping
    assert shaping.zone_BT is not None
    reverse_BT = losses.generalized_jsd(inputs.logits_BTV, teacher_logits(inputs), beta=1.0)
    forward_BT = losses.generalized_jsd(inputs.logits_BTV, teacher_logits(inputs), beta=0.0)
    zoned_BT = torch.where(shaping.zone_BT == weighting.FKL, forward_BT, reverse_BT)
    return direct((1 - shaping.sead_lambda) * zoned_BT + shaping.sead_lambda * forward_BT, inputs)


def k2_loss(inputs: ObjectiveInputs) -> torch.Tensor:
    """½ (log p_S - log p_T)² of the sampled token, back-propagated (KDRL, math.md §1.4)."""
    return inputs.shaping.weight_BT * losses.k2_per_token(inputs.logp_BT, inputs.signal.token_logp_BT)


def sft_loss(inputs: ObjectiveInputs) -> torch.Tensor:
    """Cross-entropy on the batch's completions (dataset or teacher)."""
    inputs.metrics["nll"] = losses.masked_mean(-inputs.logp_BT, inputs.rollout.loss_mask_BT)
    return -inputs.logp_BT


# --- sequence-level teacher feedback: the teacher ranks the student's own samples (math.md §17) ------------


def teacher_pick_loss(inputs: ObjectiveInputs) -> torch.Tensor:
    """On-policy rejection sampling: cross-entropy on the sample of each group the teacher picked (the
    shaping's mask holds only its tokens)."""
    inputs.metrics["nll"] = losses.masked_mean(-inputs.logp_BT, inputs.shaping.mask_BT)
    return -inputs.logp_BT


def dpo_loss(inputs: ObjectiveInputs) -> torch.Tensor:
    """DPO on the teacher-ranked pair of each group: Σ_t coef · log π_θ(y_t), whose gradient is DPO's (the
    shaping's per-row coefficient, detached, from the whole pair)."""
    return inputs.shaping.weight_BT * inputs.logp_BT


def _ranking(inputs: ShapingInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The best and worst sample of each group by ``objective.rank_by``, with their scores logged."""
    batch = inputs.batch
    score_B = weighting.sequence_score(
        inputs.objective.rank_by, inputs.signal.token_logp_BT, batch.rollout.loss_mask_BT, batch.reward_B
    )
    best_B, worst_B = weighting.group_extremes(score_B, inputs.group)
    inputs.metrics["picked_score"] = float(score_B[best_B].mean())
    inputs.metrics["mean_score"] = float(score_B.mean())
    return best_B, worst_B


def teacher_pick_shaping(inputs: ShapingInputs, shaping: Shaping) -> None:
    """Loss only on the picked sample of each group; ranked by a verifier, only if that sample passed (a
    group whose samples all failed trains on none of them)."""
    best_B, _ = _ranking(inputs)
    if inputs.objective.rank_by != "teacher":
        assert inputs.batch.reward_B is not None
        best_B = best_B & (inputs.batch.reward_B > 0.5)
    shaping.mask_BT = shaping.mask_BT & best_B[:, None]
    inputs.metrics["picked_frac"] = float(best_B.float().mean())


def dpo_shaping(inputs: ShapingInputs, shaping: Shaping) -> None:
    """Each row's DPO coefficient ∂loss/∂Δ, from the student's and the reference's sequence log-ratios over
    the whole pair; scaled by the group size so that the step's loss is the mean over groups under the
    record's seq-mean-token-sum aggregation. The loss itself and the pairs' accuracy are logged."""
    batch, student_logp_BT = inputs.batch, inputs.student_logp_BT
    assert student_logp_BT is not None and batch.reference_logp_BT is not None
    mask_BT = batch.rollout.loss_mask_BT
    best_B, worst_B = _ranking(inputs)
    delta_B = ((student_logp_BT - batch.reference_logp_BT) * mask_BT).sum(1)
    loss_N, coef_B = losses.dpo_terms(delta_B, best_B, worst_B, inputs.objective.dpo_beta)
    shaping.mask_BT = shaping.mask_BT & (coef_B != 0)[:, None]
    shaping.weight_BT = (coef_B * inputs.group)[:, None] * mask_BT
    inputs.metrics["dpo_loss"] = float(loss_N.mean()) if len(loss_N) else 0.0
    inputs.metrics["dpo_pairs"] = len(loss_N)
    inputs.metrics["dpo_accuracy"] = float((loss_N < math.log(2)).float().mean()) if len(loss_N) else 0.0


# --- the policy-gradient branch: a detached advantage per token, importance-sampled or PPO-clipped ----------


def policy_gradient(advantage_BT: torch.Tensor, inputs: ObjectiveInputs) -> torch.Tensor:
    """The PG loss (math.md §1.4) of a teacher advantage: the shaping weights it; a verifier part (GRPO,
    DASD's A_G) is added unweighted."""
    objective, rollout, shaping = inputs.objective, inputs.rollout, inputs.shaping
    mask_BT = rollout.loss_mask_BT
    teacher_part_BT = shaping.weight_BT * advantage_BT
    bonus_BT = bonus(inputs)
    if shaping.bonus_B is not None:  # the two components differ in scale by 10-100x: log both (math.md §12)
        inputs.metrics["teacher_advantage_abs"] = losses.masked_mean(teacher_part_BT.abs(), mask_BT)
        inputs.metrics["reward_advantage_abs"] = losses.masked_mean(bonus_BT.abs(), mask_BT)
    loss_BT, extra = losses.pg_per_token(
        inputs.logp_BT,
        rollout.sampler_logp_BT,
        teacher_part_BT + bonus_BT,
        mask_BT,
        objective.ppo_clip,
        objective.dual_clip,
    )
    inputs.metrics.update(extra)
    return loss_BT


def bonus(inputs: ObjectiveInputs) -> torch.Tensor:
    """The verifier advantage of each sample on its tokens (zero without one)."""
    mask_BT, bonus_B = inputs.rollout.loss_mask_BT, inputs.shaping.bonus_B
    return torch.zeros_like(inputs.logp_BT) if bonus_B is None else bonus_B[:, None] * mask_BT


def detached_logp(inputs: ObjectiveInputs) -> torch.Tensor:
    """The reward uses the trainer's (detached) log-prob: equal to the sampler's at temperature 1, and still
    the student's own policy when sampling is tempered; the importance ratio corrects for the sampler."""
    return inputs.logp_BT.detach()


def in_teacher_units(logp_BT: torch.Tensor, signal: TeacherSignal) -> torch.Tensor:
    """The student's log-probs as the teacher's L0 comes: per token, or per aligned span at its last token
    under a teacher with another tokenizer (math.md §18.2)."""
    return logp_BT if signal.spans is None else losses.span_sums(logp_BT, signal.spans.span_BT)


def reward_stream(inputs: ObjectiveInputs) -> torch.Tensor:
    """Rewards stop at each row's last loss token: a window or trap ends the response as far as returns go."""
    return weighting.through_last(inputs.rollout.loss_mask_BT, inputs.shaping.mask_BT)


def sampled_rkl_loss(inputs: ObjectiveInputs) -> torch.Tensor:
    """Advantage -(log p_S - log p_T) of each sampled token, discounted, optionally minus vOPD's baseline
    (math.md §2, §10)."""
    objective, signal = inputs.objective, inputs.signal
    baseline_BT = None
    if objective.baseline == "vopd":  # the state's reverse KL, under the same (untempered) policy
        if objective.baseline_topk:  # on the student's top-K, both sides renormalised (vOPD's kl_top_k)
            assert signal.given_ids_BTK is not None and signal.given_logp_BTK is not None
            baseline_BT = losses.topk_divergence(
                inputs.logits_BTV.detach(), signal.given_ids_BTK, signal.given_logp_BTK, "renorm"
            )
        else:
            baseline_BT = losses.generalized_jsd(inputs.logits_BTV.detach(), teacher_logits(inputs), beta=1.0)
    return policy_gradient(sampled_advantage(inputs, baseline_BT), inputs)


def sampled_advantage(inputs: ObjectiveInputs, baseline_BT: torch.Tensor | None = None) -> torch.Tensor:
    """The sampled reverse-KL advantage of each token (math.md §2); under a teacher with another tokenizer,
    of each aligned span, for each of its tokens (math.md §18.2)."""
    objective, signal = inputs.objective, inputs.signal
    advantage_BT, _ = losses.sampled_rkl_advantage(
        in_teacher_units(detached_logp(inputs), signal),
        signal.token_logp_BT,
        reward_stream(inputs),
        objective.kl_coef,
        objective.discount,
        baseline_BT,
    )
    if signal.spans is not None:
        advantage_BT = losses.span_fill(advantage_BT, signal.spans.span_BT)
    return advantage_BT


def minillm_loss(inputs: ObjectiveInputs) -> torch.Tensor:
    """MiniLLM (math.md §4): PG on the length-normalised future reward, plus the single-step term, the exact
    reverse KL at each visited state."""
    objective, signal, shaping = inputs.objective, inputs.signal, inputs.shaping
    advantage_BT = losses.minillm_long_advantage(
        detached_logp(inputs),
        signal.token_logp_BT,
        reward_stream(inputs),
        objective.discount,
        shaping.baseline,
    )
    loss_BT = policy_gradient(advantage_BT, inputs)
    single_BT = losses.generalized_jsd(inputs.logits_BTV, teacher_logits(inputs), beta=1.0)
    inputs.metrics["divergence"] = losses.masked_mean(single_BT, inputs.rollout.loss_mask_BT)
    return loss_BT + shaping.weight_BT * single_BT


def scope_loss(inputs: ObjectiveInputs) -> torch.Tensor:
    """SCOPE (math.md §7.3): correct samples by the IS-surrogate likelihood (A = 1), failed ones by sampled
    reverse KL; the perplexity weights are the shaping's."""
    correct_B = inputs.shaping.correct_B
    assert correct_B is not None
    log_ratio_BT = inputs.signal.token_logp_BT - detached_logp(inputs)
    advantage_BT = torch.where(correct_B[:, None], 1.0, log_ratio_BT) * inputs.rollout.loss_mask_BT
    return policy_gradient(advantage_BT, inputs)


def dasd_loss(inputs: ObjectiveInputs) -> torch.Tensor:
    """DASD (math.md §7.4): the GRPO advantage plus an entropy-routed, direction-adaptive teacher term."""
    objective, shaping = inputs.objective, inputs.shaping
    assert shaping.bonus_B is not None
    advantage_BT, extra = weighting.dasd_advantage(
        inputs.signal.token_logp_BT - detached_logp(inputs),
        inputs.entropy_BT,
        inputs.rollout.loss_mask_BT,
        shaping.bonus_B,
        objective.dasd_beta,
        objective.dasd_rho,
    )
    inputs.metrics.update(extra)
    return policy_gradient(advantage_BT - bonus(inputs), inputs)


# --- objectives' own shaping: what they add to the step's Shaping before the loss ---------------------------


def sead_shaping(inputs: ShapingInputs, shaping: Shaping) -> None:
    """SEAD's zones per token (skipped tokens leave the loss) and its annealed forward-KL share (math.md
    §7.7)."""
    assert inputs.student_entropy_BT is not None and inputs.signal.entropy_BT is not None
    shaping.zone_BT = weighting.sead_zones(
        inputs.signal.entropy_BT, inputs.student_entropy_BT, shaping.mask_BT
    )
    shaping.sead_lambda = weighting.sead_anneal(inputs.step, inputs.steps)
    shaping.mask_BT = shaping.mask_BT & (shaping.zone_BT != weighting.SKIP)
    inputs.metrics["sead_lambda"] = shaping.sead_lambda


def scope_shaping(inputs: ShapingInputs, shaping: Shaping) -> None:
    """SCOPE's branch per sample and its perplexity weights over each whole response (math.md §7.3)."""
    reward_B, student_logp_BT = inputs.batch.reward_B, inputs.student_logp_BT
    assert reward_B is not None and student_logp_BT is not None
    correct_B, mask_BT = reward_B > 0.5, inputs.batch.rollout.loss_mask_BT
    student_ppl_B = weighting.sequence_perplexity(student_logp_BT, mask_BT)
    teacher_ppl_B = weighting.sequence_perplexity(inputs.signal.token_logp_BT, mask_BT)
    scope_B, scope_metrics = weighting.scope_weights(
        student_ppl_B, teacher_ppl_B, correct_B, inputs.group, inputs.objective.scope_tau
    )
    shaping.weight_BT, shaping.correct_B = shaping.weight_BT * scope_B[:, None], correct_B
    inputs.metrics.update(scope_metrics)


def dasd_shaping(inputs: ShapingInputs, shaping: Shaping) -> None:
    """DASD's A_G: the GRPO advantage of the verifier reward (math.md §7.4)."""
    assert inputs.batch.reward_B is not None
    shaping.bonus_B = weighting.grpo_advantage(inputs.batch.reward_B, inputs.group)


def minillm_shaping(inputs: ShapingInputs, shaping: Shaping) -> None:
    """MiniLLM's constant baseline: the step's mean long-term advantage (math.md §4)."""
    rollout = inputs.batch.rollout
    stream_BT = weighting.through_last(rollout.loss_mask_BT, shaping.mask_BT)
    long_BT = losses.minillm_long_advantage(
        rollout.sampler_logp_BT,
        inputs.signal.token_logp_BT,
        stream_BT,
        inputs.objective.discount,
        baseline=0.0,
    )
    shaping.baseline = losses.masked_mean(long_BT, stream_BT)
