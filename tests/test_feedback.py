"""Sequence-level teacher feedback (docs/math.md §17): the teacher ranks each group of the student's own
samples; teacher_pick trains on the best by cross-entropy, dpo on the best vs the worst. Closed forms on a
tabular model, then short runs through the loop."""

from __future__ import annotations

import json

import pytest
import torch

from opdistill.config import load_config
from opdistill.objectives import losses, objective, weighting
from opdistill.objectives.objective import ShapingInputs
from opdistill.objectives.registry import objective_loss
from opdistill.training import loop
from opdistill.types import Rollout, Shaping, StepBatch, TeacherSignal

V, T, G = 4, 3, 2  # vocabulary, completion length, samples per prompt
# two groups of two samples; the last row ends one token early
TOKENS = torch.tensor([[0, 1, 2], [3, 3, 1], [2, 2, 0], [1, 0, 3]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)


def test_the_pick_is_the_argmax_and_the_worst_the_argmin_of_each_group():
    score_B = torch.tensor([0.1, 0.7, 0.3, -2.0, 5.0, 5.0])
    best_B, worst_B = weighting.group_extremes(score_B, 3)
    assert best_B.tolist() == [False, True, False, False, True, False]  # a tie goes to the first
    assert worst_B.tolist() == [True, False, False, True, False, False]


def test_ranking_by_verifier_then_teacher_keeps_the_rewards_order_and_breaks_its_ties():
    teacher_logp_BT = torch.tensor([[-0.1, -0.1], [-3.0, -3.0], [-9.0, -9.0], [-0.5, -0.5]])
    mask_BT = torch.ones(4, 2, dtype=torch.bool)
    reward_B = torch.tensor([0.0, 1.0, 1.0, 0.0])
    score_B = weighting.sequence_score("verifier+teacher", teacher_logp_BT, mask_BT, reward_B)
    assert score_B.argsort(descending=True).tolist() == [1, 2, 0, 3]
    likelihood_B = weighting.sequence_score("teacher", teacher_logp_BT, mask_BT)
    torch.testing.assert_close(likelihood_B, torch.tensor([-0.1, -3.0, -9.0, -0.5]))


def _tabular(seed: int):
    """Logits θ[t] of a position-indexed tabular policy (with grad), a reference's log-probs and a teacher's
    per-token log-probs of TOKENS."""
    g = torch.Generator().manual_seed(seed)
    theta_TV = torch.randn(T, V, generator=g, dtype=torch.float64, requires_grad=True)
    reference_TV = torch.randn(T, V, generator=g, dtype=torch.float64).log_softmax(-1)
    teacher_BT = torch.randn(4, T, generator=g, dtype=torch.float64).log_softmax(-1) * MASK
    return theta_TV, reference_TV, teacher_BT


def _batch(theta_TV, reference_TV, teacher_BT, rank_by="teacher", reward_B=None):
    logits_BTV = theta_TV.expand(4, T, V)
    at = TOKENS[..., None]
    rollout = Rollout(
        torch.ones(4, 1, dtype=torch.long),
        torch.ones(4, 1, dtype=torch.bool),
        TOKENS,
        MASK,
        torch.zeros(4, T),
        torch.zeros(4, dtype=torch.bool),
    )
    reference_BT = reference_TV.expand(4, T, V).gather(-1, at).squeeze(-1) * MASK
    batch = StepBatch(
        rollout, TeacherSignal(teacher_BT), {}, reward_B=reward_B, reference_logp_BT=reference_BT
    )
    return logits_BTV, batch


def _shaped(kind: str, logits_BTV, batch, *overrides: str):
    config = load_config(None, [f"objective.type={kind}", f"rollout.n_per_prompt={G}", *overrides])
    student_logp_BT = losses.token_logprobs(logits_BTV.detach(), batch.rollout.tokens_BT) * MASK
    shaping = Shaping(MASK, MASK.double())
    inputs = ShapingInputs(config.objective, batch, student_logp_BT, None, 0, 1, G, batch.metrics)
    getattr(objective, f"{kind}_shaping")(inputs, shaping)
    batch.shaping = shaping
    return config


def _sequence_logp(logp_TV, row: int) -> torch.Tensor:
    return sum(logp_TV[t, TOKENS[row, t]] for t in range(T) if MASK[row, t])


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_dpo_has_the_closed_form_loss_and_gradient_on_a_tabular_model(beta):
    theta_TV, reference_TV, teacher_BT = _tabular(0)
    logits_BTV, batch = _batch(theta_TV, reference_TV, teacher_BT)
    config = _shaped("dpo", logits_BTV, batch, f"objective.dpo_beta={beta}")
    per_token_BT, _ = objective_loss(config, logits_BTV, batch)
    normalizer = losses.Normalizer("seq-mean-token-sum", float(batch.shaping.mask_BT.sum()), 4)
    normalizer(per_token_BT, batch.shaping.mask_BT).backward()
    ours = theta_TV.grad.clone()

    # DPO written out: each group's best and worst by mean teacher log-prob, -log σ(β(Δ_w - Δ_l)), averaged
    theta_TV.grad = None
    logp_TV = theta_TV.log_softmax(-1)
    score_B = (teacher_BT * MASK).sum(1) / MASK.sum(1)
    expected, pairs = 0.0, []
    for group in range(2):
        rows = [group * G + i for i in range(G)]
        best, worst = max(rows, key=lambda r: score_B[r]), min(rows, key=lambda r: score_B[r])
        pairs.append((best, worst))
        delta_w = _sequence_logp(logp_TV, best) - _sequence_logp(reference_TV, best)
        delta_l = _sequence_logp(logp_TV, worst) - _sequence_logp(reference_TV, worst)
        expected = expected + torch.nn.functional.softplus(-beta * (delta_w - delta_l)) / 2
    expected.backward()
    assert batch.metrics["dpo_loss"] == pytest.approx(float(expected.detach()), rel=1e-6)
    assert batch.metrics["dpo_pairs"] == 2
    torch.testing.assert_close(ours, theta_TV.grad)
    assert float(theta_TV.grad.abs().max()) > 1e-3  # not a vanishing case
    picked = batch.shaping.mask_BT.any(1).nonzero().squeeze(-1).tolist()
    assert sorted(picked) == sorted(r for pair in pairs for r in pair)


def test_dpo_on_a_group_of_equal_scores_has_no_pair_and_no_gradient():
    theta_TV, reference_TV, _ = _tabular(1)
    logits_BTV, batch = _batch(theta_TV, reference_TV, torch.zeros(4, T, dtype=torch.float64))
    config = _shaped("dpo", logits_BTV, batch)
    per_token_BT, _ = objective_loss(config, logits_BTV, batch)
    assert not batch.shaping.mask_BT.any() and batch.metrics["dpo_pairs"] == 0
    (per_token_BT * batch.shaping.mask_BT).sum().backward()
    assert float(theta_TV.grad.abs().max()) == 0


def test_teacher_pick_is_cross_entropy_on_the_argmax_of_each_group():
    theta_TV, reference_TV, teacher_BT = _tabular(2)
    reward_B = torch.tensor([0.0, 1.0, 1.0, 1.0])
    logits_BTV, batch = _batch(theta_TV, reference_TV, teacher_BT, reward_B=reward_B)
    config = _shaped("teacher_pick", logits_BTV, batch, "objective.rank_by=verifier+teacher")
    score_B = (teacher_BT * MASK).sum(1) / MASK.sum(1)
    second = (
        2 if score_B[2] >= score_B[3] else 3
    )  # the first group's reward decides; the second's tie, the teacher
    assert batch.shaping.mask_BT.any(1).tolist() == [False, True, second == 2, second == 3]
    per_token_BT, metrics = objective_loss(config, logits_BTV, batch)
    logp_TV = theta_TV.log_softmax(-1)
    nll = -(_sequence_logp(logp_TV, 1) + _sequence_logp(logp_TV, second))
    mask_BT = batch.shaping.mask_BT
    torch.testing.assert_close((per_token_BT * mask_BT).sum(), nll)
    assert metrics["nll"] == pytest.approx(float(nll) / float(mask_BT.sum()))


def test_teacher_pick_by_the_verifier_trains_on_no_sample_of_a_group_that_all_failed():
    theta_TV, reference_TV, teacher_BT = _tabular(3)
    logits_BTV, batch = _batch(
        theta_TV, reference_TV, teacher_BT, reward_B=torch.tensor([0.0, 0.0, 0.0, 1.0])
    )
    _shaped("teacher_pick", logits_BTV, batch, "objective.rank_by=verifier+teacher")
    assert batch.shaping.mask_BT.any(1).tolist() == [False, False, False, True]
    assert batch.metrics["picked_frac"] == 0.25


def test_the_ranking_settings_are_checked():
    from opdistill.errors import UserError

    with pytest.raises(UserError, match="rank_by applies to objective.type=teacher_pick and dpo"):
        load_config(None, ["objective.type=full_rkl", "objective.rank_by=verifier"])
    with pytest.raises(UserError, match="n_per_prompt"):
        load_config(None, ["objective.type=dpo"])
    with pytest.raises(UserError, match="weighs whole samples"):
        load_config(None, ["objective.type=dpo", "rollout.n_per_prompt=2", "weighting.tip_ratio=0.5"])
    with pytest.raises(UserError, match="dpo_beta must be above 0"):
        load_config(None, ["objective.type=dpo", "rollout.n_per_prompt=2", "objective.dpo_beta=0"])
    assert load_config(None, ["objective.type=dpo", "rollout.n_per_prompt=2"]).objective.needs_reference
    verifier = load_config(
        None, ["objective.type=teacher_pick", "rollout.n_per_prompt=2", "objective.rank_by=verifier"]
    )
    assert verifier.objective.needs_reward


@pytest.mark.parametrize(
    "overrides",
    [
        ("objective.type=teacher_pick",),  # by teacher likelihood: a fresh student solves nothing
        ("objective.type=dpo", "optim.lr=1e-2"),
    ],
)
def test_a_short_run_of_each_feedback_mode_trains_and_logs_it(tiny_run, tmp_path, overrides):
    config = tiny_run("train.steps=3", "rollout.n_per_prompt=4", "rollout.max_new_tokens=52", *overrides)
    summary = loop.run(config, show_progress=False)
    assert summary["complete"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert len(rows) == 3 and all(r["picked_score"] >= r["mean_score"] for r in rows)
    if "objective.type=dpo" in overrides:
        assert all(r["dpo_pairs"] > 0 for r in rows) and all(r["dpo_loss"] > 0 for r in rows)
        assert rows[0]["dpo_loss"] == pytest.approx(0.6931, abs=1e-3)  # at the reference z = 0: log 2
    else:
        assert all(0 < r["kept_token_frac"] <= 0.5 for r in rows)  # one sample of four keeps its loss
