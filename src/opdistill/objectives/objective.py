"""The objective of one micro-batch: which math-core functions the config selects, and what they are fed.

Orchestration only, like the loop: every formula lives in ``losses.py`` and ``weighting.py``. The direct
branch back-propagates a divergence at the visited states; the policy-gradient branch builds a detached
advantage per token (ALGORITHMS.md §1.4); the step's ``Shaping`` weights the teacher term and its extras.
"""

from __future__ import annotations

import torch

from opdistill.config import Config, ObjectiveConfig
from opdistill.models import completion_logits
from opdistill.objectives import losses, weighting
from opdistill.observe import diagnostics
from opdistill.types import Shaping, StepBatch, TeacherSignal


def objective_loss(config: Config, student, batch: StepBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """(per-token loss [B, T], metrics) of the configured objective on one micro-batch: the only place the loop
    touches the math core. The step's ``Shaping`` weights the teacher term; its mask is the normaliser's."""
    objective, rollout, signal_ = config.objective, batch.rollout, batch.signal
    mask_BT = rollout.loss_mask_BT
    logits_BTV = completion_logits(student, rollout)  # [B, T, V], with grad
    logp_BT = losses.token_logprobs(logits_BTV, rollout.tokens_BT)
    entropy_BT = diagnostics.token_entropy(logits_BTV)
    metrics = {
        "entropy": losses.masked_mean(entropy_BT, mask_BT),
        "high_entropy_rate": diagnostics.high_entropy_rate(entropy_BT, mask_BT),
    }
    if objective.type == "sft":
        return -logp_BT, {**metrics, "nll": losses.masked_mean(-logp_BT, mask_BT)}
    assert signal_ is not None
    shaping = batch.shaping or Shaping(mask_BT, mask_BT.float())
    # teacher_kl (the sampled reverse-KL estimate), mean |log-ratio|, share of negative-reward tokens
    metrics.update(diagnostics.log_ratio_stats(logp_BT - signal_.token_logp_BT, mask_BT))
    if objective.type == "k2":
        loss_BT = shaping.weight_BT * losses.k2_per_token(logp_BT, signal_.token_logp_BT)
    elif objective.direct_beta is not None or objective.type in ("topk_rkl", "sead"):
        divergence_BT = _divergence(objective, logits_BTV, signal_, shaping, metrics)
        metrics["divergence"] = losses.masked_mean(divergence_BT, mask_BT)  # before any clipping
        if objective.token_clip:
            divergence_BT, clip_metrics = losses.clip_divergence(
                divergence_BT, mask_BT, objective.token_clip, objective.token_clip_soft
            )
            metrics.update(clip_metrics)
        loss_BT = shaping.weight_BT * divergence_BT
    else:
        loss_BT = _policy_gradient(objective, logits_BTV, logp_BT, entropy_BT, batch, shaping, metrics)
    if config.weighting.eopd_coef:  # EOPD: forward KL on the teacher's top-K where the teacher is uncertain
        assert signal_.entropy_BT is not None and signal_.topk_ids_BTK is not None
        assert signal_.topk_logp_BTK is not None
        gate_BT = weighting.entropy_gate(signal_.entropy_BT, mask_BT, config.weighting.eopd_threshold)
        fkl_BT = losses.topk_divergence(logits_BTV, signal_.topk_ids_BTK, signal_.topk_logp_BTK, "fkl")
        loss_BT = loss_BT + config.weighting.eopd_coef * shaping.weight_BT * gate_BT * fkl_BT
        metrics["eopd_gate_frac"] = losses.masked_mean(gate_BT.float(), mask_BT)
    if objective.ref_kl_coef:  # StableOPD: k3 KL to the initial student on the sampled tokens
        assert batch.reference_logp_BT is not None
        k3_BT = losses.k3_per_token(logp_BT, batch.reference_logp_BT)
        loss_BT = loss_BT + objective.ref_kl_coef * k3_BT
        metrics["reference_kl"] = losses.masked_mean(k3_BT, mask_BT)
    return loss_BT, metrics


def _policy_gradient(
    objective: ObjectiveConfig,
    logits_BTV: torch.Tensor,
    logp_BT: torch.Tensor,
    entropy_BT: torch.Tensor,
    batch: StepBatch,
    shaping: Shaping,
    metrics: dict,
) -> torch.Tensor:
    """The PG branch (ALGORITHMS §1.4): a detached advantage per token, importance-sampled or PPO-clipped.
    The teacher part of the advantage is weighted by the shaping; a verifier part (GRPO, DASD's A_G) is not."""
    rollout, signal_ = batch.rollout, batch.signal
    assert signal_ is not None
    mask_BT, teacher_logp_BT = rollout.loss_mask_BT, signal_.token_logp_BT
    # the reward uses the trainer's (detached) log-prob: equal to the sampler's at temperature 1, and still the
    # student's own policy when sampling is tempered; the importance ratio corrects for the sampler.
    student_logp_BT = logp_BT.detach()
    bonus_BT = (
        torch.zeros_like(student_logp_BT) if shaping.bonus_B is None else shaping.bonus_B[:, None] * mask_BT
    )
    # rewards stop at each row's last loss token: a window or trap ends the response as far as returns go
    stream_BT = weighting.through_last(mask_BT, shaping.mask_BT)
    if objective.type == "minillm":
        advantage_BT = losses.minillm_long_advantage(
            student_logp_BT, teacher_logp_BT, stream_BT, objective.discount, shaping.baseline
        )
    elif objective.type == "scope":  # correct samples: IS-surrogate MLE (A = 1); failed: sampled reverse KL
        assert shaping.correct_B is not None
        advantage_BT = (
            torch.where(shaping.correct_B[:, None], 1.0, teacher_logp_BT - student_logp_BT) * mask_BT
        )
    elif objective.type == "dasd":
        assert shaping.bonus_B is not None
        advantage_BT, extra = weighting.dasd_advantage(
            teacher_logp_BT - student_logp_BT, entropy_BT, mask_BT, shaping.bonus_B,
            objective.dasd_beta, objective.dasd_rho,
        )  # fmt: skip
        advantage_BT = advantage_BT - bonus_BT
        metrics.update(extra)
    else:
        baseline_BT = None
        if objective.baseline == "vopd":  # the state's reverse KL, under the same (untempered) policy
            if objective.baseline_topk:  # on the student's top-K, both sides renormalised (vOPD's kl_top_k)
                assert signal_.given_ids_BTK is not None and signal_.given_logp_BTK is not None
                baseline_BT = losses.topk_divergence(
                    logits_BTV.detach(), signal_.given_ids_BTK, signal_.given_logp_BTK, "renorm"
                )
            else:
                assert signal_.logits_BTV is not None
                baseline_BT = losses.generalized_jsd(logits_BTV.detach(), signal_.logits_BTV, beta=1.0)
        advantage_BT, _ = losses.sampled_rkl_advantage(
            student_logp_BT, teacher_logp_BT, stream_BT, objective.kl_coef, objective.discount, baseline_BT
        )
    teacher_part_BT = shaping.weight_BT * advantage_BT
    if shaping.bonus_B is not None:  # the two components differ in scale by 10-100x: log both (§12)
        metrics["teacher_advantage_abs"] = losses.masked_mean(teacher_part_BT.abs(), mask_BT)
        metrics["reward_advantage_abs"] = losses.masked_mean(bonus_BT.abs(), mask_BT)
    loss_BT, extra = losses.pg_per_token(
        logp_BT,
        rollout.sampler_logp_BT,
        teacher_part_BT + bonus_BT,
        mask_BT,
        objective.ppo_clip,
        objective.dual_clip,
    )
    metrics.update(extra)
    if objective.type == "minillm":  # the single-step term: the exact reverse KL at each visited state
        assert signal_.logits_BTV is not None
        single_BT = losses.generalized_jsd(logits_BTV, signal_.logits_BTV, beta=1.0)
        metrics["divergence"] = losses.masked_mean(single_BT, mask_BT)
        loss_BT = loss_BT + shaping.weight_BT * single_BT
    return loss_BT


def _divergence(
    objective: ObjectiveConfig,
    logits_BTV: torch.Tensor,
    signal_: TeacherSignal,
    shaping: Shaping,
    metrics: dict,
) -> torch.Tensor:
    """The direct-branch divergence at each position: full-vocabulary JSD_β, SEAD's zoned mix of reverse and
    forward KL, or reverse KL on a top-K support."""
    mask_BT = shaping.mask_BT
    if objective.type == "sead":  # D = (1-λ) D_zone + λ FKL, D_zone = FKL where the teacher is uncertain
        assert signal_.logits_BTV is not None and shaping.zone_BT is not None
        reverse_BT = losses.generalized_jsd(logits_BTV, signal_.logits_BTV, beta=1.0)
        forward_BT = losses.generalized_jsd(logits_BTV, signal_.logits_BTV, beta=0.0)
        zoned_BT = torch.where(shaping.zone_BT == weighting.FKL, forward_BT, reverse_BT)
        return (1 - shaping.sead_lambda) * zoned_BT + shaping.sead_lambda * forward_BT
    if objective.direct_beta is not None:
        assert signal_.logits_BTV is not None
        return losses.generalized_jsd(
            logits_BTV, signal_.logits_BTV, objective.direct_beta, objective.temperature
        )
    student_ids_BTK = None
    if objective.topk_support == "intersect":
        student_ids_BTK = logits_BTV.detach().topk(objective.topk, dim=-1).indices
    ids_BTK, teacher_BTK, valid_BTK = losses.topk_support(
        objective.topk_support,
        teacher_topk=(signal_.topk_ids_BTK, signal_.topk_logp_BTK),
        at_student_ids=(signal_.given_ids_BTK, signal_.given_logp_BTK),
        student_ids_BTK=student_ids_BTK,
    )
    # the mass each side puts on the support (Many Faces: logging it is mandatory for top-K objectives)
    student_lp_BTK = losses.logprobs_at(logits_BTV.detach(), ids_BTK)
    metrics["student_mass"] = losses.masked_mean((student_lp_BTK.exp() * valid_BTK).sum(-1), mask_BT)
    metrics["teacher_mass"] = losses.masked_mean((teacher_BTK.exp() * valid_BTK).sum(-1), mask_BT)
    return losses.topk_divergence(logits_BTV, ids_BTK, teacher_BTK, objective.topk_variant, valid_BTK)
