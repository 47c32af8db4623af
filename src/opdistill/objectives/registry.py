"""One record per objective: its name, how its gradient flows, the teacher signal it needs, what else it needs
(a verifier reward, the student's own samples, a batch-wide student pass), its loss and its own shaping.

Config validation, ``opd objectives``, ``--help`` and docs/objectives.md are derived from ``OBJECTIVES``;
adding an objective is one loss function in objective.py, one record here and its test. ``objective_loss`` is
the only place the update touches the math core.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from opdistill.errors import UserError
from opdistill.objectives import losses, objective, weighting
from opdistill.objectives.objective import ObjectiveInputs, ShapingInputs
from opdistill.observe import diagnostics
from opdistill.types import Shaping, SignalRequest, StepBatch

if TYPE_CHECKING:
    from opdistill.config import Config, ObjectiveConfig

Branch = Literal["direct", "PG", "both", "-"]


def sampled_token_only(_: ObjectiveConfig) -> SignalRequest:
    """L0: the teacher's log-prob of each sampled token, which every objective receives."""
    return SignalRequest()


def full_logits(_: ObjectiveConfig) -> SignalRequest:
    """L2: the teacher's full logits (an exact divergence over the vocabulary)."""
    return SignalRequest(full=True)


def topk_signal(config: ObjectiveConfig) -> SignalRequest:
    """L1 (the teacher's own top-K) unless the support is the student's alone; L1s (log-probs at the student's
    top-K ids) when the support includes the student's."""
    return SignalRequest(
        topk=config.topk if config.topk_support != "student" else 0,
        at_ids=config.topk_support in ("student", "union"),
    )


@dataclass(frozen=True)
class ObjectiveRecord:
    name: str  # objective.type
    branch: Branch  # direct: back-propagate a divergence; PG: a detached advantage (math.md §1.4); both
    summary: str  # one line for `opd objectives`, --help and docs
    loss: Callable[[ObjectiveInputs], torch.Tensor]  # per-token loss [B, T] of one micro-batch
    signal: Callable[[ObjectiveConfig], SignalRequest] = sampled_token_only  # what the teacher sends
    shaping: Callable[[ShapingInputs, Shaping], None] | None = None  # its own weights/masks for the step
    beta: Callable[[ObjectiveConfig], float] | None = None  # a full-vocabulary JSD_β (objective.temperature)
    clippable: bool = False  # objective.token_clip applies (a divergence per token)
    student_samples: bool = False  # estimates from the student's own samples (no SKD, TRD or off-policy)
    needs_reward: bool = False  # each sample's verifier outcome
    needs_group: bool = False  # a GRPO advantage over rollout.n_per_prompt samples per prompt
    student_pass: bool = False  # its shaping reads the untempered student over the whole batch
    student_entropy: bool = False  # ... and the student's entropy per position there
    teacher_entropy: bool = False  # the teacher's exact entropy per position
    rlvr_hybrid: bool = False  # grpo_coef, route_opd, route_rl and baseline=vopd apply
    ranks: bool = False  # the teacher ranks each group's samples (objective.rank_by, math.md §17)
    needs_reference: bool = False  # the initial student's log-probs (DPO's reference)
    aggregation: str | None = None  # its own normaliser, whatever objective.aggregation says
    check: Callable[[ObjectiveConfig], None] | None = None  # what only its own settings must satisfy

    @property
    def distills(self) -> bool:
        """Whether a teacher scores the batch (everything but SFT)."""
        return self.branch != "-"

    def request(self, config: ObjectiveConfig) -> SignalRequest:
        """What this objective alone needs from the teacher (weighting and baselines add to it)."""
        request = self.signal(config)
        if self.teacher_entropy:
            return SignalRequest(request.topk, request.at_ids, request.full, entropy=True)
        return request


def topk_check(config: ObjectiveConfig) -> None:
    single_id = config.topk == 1 and config.topk_support in ("student", "teacher", "intersect")
    if config.topk_variant == "renorm" and single_id:
        warnings.warn(
            "objective.topk=1 with topk_variant=renorm: both sides renormalise to 1 on a single id, so the "
            "loss and its gradient are identically 0. Use K >= 4 (Rethinking OPD §6.3).",
            stacklevel=3,
        )


def minillm_check(config: ObjectiveConfig) -> None:
    if config.discount <= 0:
        raise UserError(
            "minillm's long-term term is the discounted future reward: set objective.discount in (0, 1] "
            "(MiniLLM uses 1)."
        )


def verifier_check(config: ObjectiveConfig) -> None:
    if config.kl_coef != 1 or config.discount:
        raise UserError(f"objective.kl_coef and discount do not apply to objective.type={config.type}.")


def _full(beta: Callable[[ObjectiveConfig], float]) -> Callable[[ObjectiveInputs], torch.Tensor]:
    return lambda inputs: objective.full_vocabulary_loss(inputs, beta(inputs.objective))


def _beta(value: float) -> Callable[[ObjectiveConfig], float]:
    return lambda _: value


def _jsd_beta(config: ObjectiveConfig) -> float:
    return config.jsd_beta


RECORDS = (
    ObjectiveRecord(
        "full_rkl",
        "direct",
        "KL(p_S ‖ p_T) over the vocabulary at each visited state (GKD β = 1), math.md §3",
        _full(_beta(1.0)),
        full_logits,
        beta=_beta(1.0),
        clippable=True,
    ),
    ObjectiveRecord(
        "full_fkl",
        "direct",
        "KL(p_T ‖ p_S) over the vocabulary (GKD β = 0), math.md §3",
        _full(_beta(0.0)),
        full_logits,
        beta=_beta(0.0),
        clippable=True,
    ),
    ObjectiveRecord(
        "jsd",
        "direct",
        "generalized JSD_β over the vocabulary (GKD; objective.jsd_beta), math.md §3",
        _full(_jsd_beta),
        full_logits,
        beta=_jsd_beta,
        clippable=True,
    ),
    ObjectiveRecord(
        "topk_rkl",
        "direct",
        "reverse KL on K ids per position: topk_variant, topk_support, math.md §5",
        objective.topk_rkl_loss,
        topk_signal,
        clippable=True,
        check=topk_check,
    ),
    ObjectiveRecord(
        "sead",
        "direct",
        "entropy zones skip / reverse KL / forward KL, annealed toward forward KL, math.md §7.7",
        objective.sead_loss,
        full_logits,
        objective.sead_shaping,
        student_pass=True,
        student_entropy=True,
        teacher_entropy=True,
    ),
    ObjectiveRecord(
        "sampled_rkl",
        "PG",
        "advantage -(log p_S - log p_T) of the sampled token, IS or PPO-clipped, math.md §2",
        objective.sampled_rkl_loss,
        student_samples=True,
        rlvr_hybrid=True,
    ),
    ObjectiveRecord(
        "k2",
        "direct",
        "½ (log p_S - log p_T)² of the sampled token, back-propagated (KDRL), math.md §1.4",
        objective.k2_loss,
        student_samples=True,
    ),
    ObjectiveRecord(
        "minillm",
        "both",
        "full reverse KL + PG on the length-normalised future reward (MiniLLM), math.md §4",
        objective.minillm_loss,
        full_logits,
        objective.minillm_shaping,
        student_samples=True,
        check=minillm_check,
    ),
    ObjectiveRecord(
        "scope",
        "PG",
        "verifier: correct samples by likelihood, failed by sampled_rkl, PPL-weighted, math.md §7.3",
        objective.scope_loss,
        shaping=objective.scope_shaping,
        needs_reward=True,
        student_pass=True,
        check=verifier_check,
    ),
    ObjectiveRecord(
        "dasd",
        "PG",
        "verifier: GRPO advantage + entropy-routed, direction-adaptive teacher term, math.md §7.4",
        objective.dasd_loss,
        shaping=objective.dasd_shaping,
        needs_reward=True,
        needs_group=True,
        check=verifier_check,
    ),
    ObjectiveRecord(
        "teacher_pick",
        "direct",
        "on-policy rejection sampling: SFT on the sample of each group the teacher ranks best, math.md §17",
        objective.teacher_pick_loss,
        shaping=objective.teacher_pick_shaping,
        student_samples=True,
        needs_group=True,
        ranks=True,
    ),
    ObjectiveRecord(
        "dpo",
        "direct",
        "on-policy DPO on each group's best vs worst sample as the teacher ranks them, math.md §17",
        objective.dpo_loss,
        shaping=objective.dpo_shaping,
        student_samples=True,
        needs_group=True,
        student_pass=True,
        ranks=True,
        needs_reference=True,
        aggregation="seq-mean-token-sum",
    ),
    ObjectiveRecord(
        "sft",
        "-",
        "cross-entropy on dataset or teacher completions (what `opd sft` runs)",
        objective.sft_loss,
    ),
)
OBJECTIVES: dict[str, ObjectiveRecord] = {record.name: record for record in RECORDS}


def names_where(predicate: Callable[[ObjectiveRecord], bool]) -> str:
    """The objectives a setting applies to, for error messages: "full_rkl, full_fkl, jsd and topk_rkl"."""
    names = [record.name for record in RECORDS if predicate(record)]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def signal_levels(request: SignalRequest, distills: bool = True) -> str:
    """The teacher-signal levels of a request (math.md §1.3), e.g. "L0 L1 H"."""
    levels = ["L0"] * distills + ["L1"] * bool(request.topk) + ["L1s"] * request.at_ids
    return " ".join(levels + ["L2"] * request.full + ["H"] * request.entropy)


def objective_loss(config: Config, logits_BTV: torch.Tensor, batch: StepBatch) -> tuple[torch.Tensor, dict]:
    """(per-token loss [B, T], metrics) of the configured objective on one micro-batch, from the student's
    logits at its completion positions (with grad). The step's ``Shaping`` weights the teacher term; its mask
    is the normaliser's. The extras any distillation objective may carry (EOPD, StableOPD's reference KL) are
    added here."""
    settings, rollout, signal = config.objective, batch.rollout, batch.signal
    record = OBJECTIVES[settings.type]
    mask_BT = rollout.loss_mask_BT
    logp_BT = losses.token_logprobs(logits_BTV, rollout.tokens_BT)
    entropy_BT = diagnostics.token_entropy(logits_BTV)
    metrics = {
        "entropy": losses.masked_mean(entropy_BT, mask_BT),
        "high_entropy_rate": diagnostics.high_entropy_rate(entropy_BT, mask_BT),
    }
    shaping = batch.shaping or Shaping(mask_BT, mask_BT.float())
    inputs = ObjectiveInputs(settings, logits_BTV, logp_BT, entropy_BT, batch, shaping, metrics)
    if not record.distills:
        return record.loss(inputs), metrics
    assert signal is not None
    # teacher_kl (the sampled reverse-KL estimate), mean |log-ratio|, share of negative-reward tokens
    student_BT, ratio_BT = objective.in_teacher_units(logp_BT, signal), mask_BT  # per span: at span ends
    if signal.spans is not None:
        ratio_BT = mask_BT & losses.span_ends(signal.spans.span_BT)
    metrics.update(diagnostics.log_ratio_stats(student_BT - signal.token_logp_BT, ratio_BT))
    loss_BT = record.loss(inputs)
    if config.weighting.eopd_coef:  # EOPD: forward KL on the teacher's top-K where the teacher is uncertain
        assert signal.entropy_BT is not None and signal.topk_ids_BTK is not None
        assert signal.topk_logp_BTK is not None
        gate_BT = weighting.entropy_gate(signal.entropy_BT, mask_BT, config.weighting.eopd_threshold)
        fkl_BT = losses.topk_divergence(logits_BTV, signal.topk_ids_BTK, signal.topk_logp_BTK, "fkl")
        loss_BT = loss_BT + config.weighting.eopd_coef * shaping.weight_BT * gate_BT * fkl_BT
        metrics["eopd_gate_frac"] = losses.masked_mean(gate_BT.float(), mask_BT)
    if settings.ref_kl_coef:  # StableOPD: k3 KL to the initial student on the sampled tokens
        assert batch.reference_logp_BT is not None
        k3_BT = losses.k3_per_token(logp_BT, batch.reference_logp_BT)
        loss_BT = loss_BT + settings.ref_kl_coef * k3_BT
        metrics["reference_kl"] = losses.masked_mean(k3_BT, mask_BT)
    return loss_BT, metrics


TABLE_BEGIN = "<!-- objectives table: generated from objectives/registry.py by scripts/write_docs.py -->"
TABLE_END = "<!-- end of the generated objectives table -->"


def objectives_table(defaults: ObjectiveConfig) -> str:
    """The Markdown table of docs/objectives.md: each objective, its branch, the teacher signal it needs at
    ``defaults`` (the objective section's defaults), what else it needs, and its summary."""
    lines = [
        "| `objective.type` | branch | teacher sends | needs | what (docs/math.md §) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for record in RECORDS:
        needs = [
            label
            for label, on in (
                ("the student's own samples", record.student_samples),
                ("a verifier reward", record.needs_reward),
                ("n_per_prompt ≥ 2", record.needs_group),
                ("a student pass", record.student_pass),
            )
            if on
        ]
        levels = signal_levels(record.request(defaults), record.distills) or "—"
        lines.append(
            f"| `{record.name}` | {record.branch} | {levels} | {', '.join(needs) or '—'} | {record.summary} |"
        )
    return "\n".join(lines) + "\n"
