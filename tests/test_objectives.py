"""How the configured objective combines its parts: routing, SCOPE's branches, EOPD's gate, the reference KL,
and batch-wide shaping that micro-batching must not change (math.md §7, §8.1, §12)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from opdistill.config import ModelSpec, load_config
from opdistill.data.examples import left_pad, right_pad
from opdistill.logits import completion_logits
from opdistill.models import load_model
from opdistill.objectives import shaping
from opdistill.objectives.losses import token_logprobs
from opdistill.teachers.local import LocalTeacher
from opdistill.training import batches, loop
from opdistill.training.step import micro_batch_loss
from opdistill.types import Rollout, StepBatch

G = 2  # samples per prompt


@pytest.fixture
def setup(make_model):
    """A student, a different teacher, and a hand-made on-policy-shaped batch of 2 prompts x G samples."""
    student, teacher = make_model(seed=1).train(), make_model(seed=2)
    prompts = [[1, 5, 6], [1, 5, 6], [1, 7], [1, 7]]
    completions = [[8, 9, 10, 2], [8, 11, 2], [12, 2], [9, 9, 9, 9, 2]]
    ids_BP, mask_BP = left_pad(prompts, 0)
    tokens_BT, mask_BT = right_pad(completions, 0)
    with torch.no_grad():
        probe = Rollout(
            ids_BP, mask_BP, tokens_BT, mask_BT, torch.zeros(tokens_BT.shape), torch.zeros(4).bool()
        )
        sampler_BT = token_logprobs(completion_logits(student, probe), tokens_BT) * mask_BT
    rollout = Rollout(ids_BP, mask_BP, tokens_BT, mask_BT, sampler_BT, torch.zeros(4).bool())
    return student, LocalTeacher(teacher), rollout


def _batch(config, student, teacher, rollout, reward=None, reference=None):
    """One step's batch, scored and shaped as the loop builds it."""
    batch = StepBatch(rollout, batches.score(config, student, teacher, rollout), {}, reward_B=reward)
    if reference is not None:
        batch.reference_logp_BT = reference.score(rollout, config.teacher_request).token_logp_BT
    batch.shaping, _ = shaping.shape(config, student, batch, 0)
    return batch


def _loss(config, student, teacher, rollout, reward=None, reference=None):
    """The normalised loss and metrics of one step's batch."""
    batch = _batch(config, student, teacher, rollout, reward, reference)
    assert batch.shaping is not None
    per_token_BT, metrics = micro_batch_loss(config, student, batch)
    mask_BT = batch.shaping.mask_BT
    return (per_token_BT * mask_BT).sum() / mask_BT.sum(), metrics


def _config(*overrides):
    return load_config(None, ["objective.type=sampled_rkl", f"rollout.n_per_prompt={G}", *overrides])


def test_route_opd_removes_the_teacher_term_from_the_samples_it_excludes(setup):
    student, teacher, rollout = setup
    failed = torch.zeros(4)  # no sample is correct: correct_only routing leaves only the GRPO term
    routed, _ = _loss(
        _config("objective.grpo_coef=1", "objective.route_opd=correct_only"),
        student,
        teacher,
        rollout,
        failed,
    )
    grpo_only, _ = _loss(
        _config("objective.grpo_coef=1", "objective.kl_coef=0"), student, teacher, rollout, failed
    )
    torch.testing.assert_close(routed, grpo_only)
    mixed = torch.tensor([1.0, 0.0, 0.0, 1.0])  # one correct sample per prompt: GRPO advantage ±0.707
    _, metrics = _loss(_config("objective.grpo_coef=1"), student, teacher, rollout, mixed)
    assert metrics["reward_advantage_abs"] == pytest.approx(0.5**0.5, rel=1e-4)
    assert metrics["teacher_advantage_abs"] > 0


def test_scope_trains_correct_samples_by_likelihood_and_failed_ones_by_reverse_kl(setup):
    student, teacher, rollout = setup
    config = _config("objective.type=scope")
    correct = torch.tensor([1.0, 0.0, 1.0, 1.0])
    per_token_BT, _ = micro_batch_loss(config, student, _batch(config, student, teacher, rollout, correct))
    signal = teacher.score(rollout, config.teacher_request)
    # at the sampler's parameters ρ = 1: a correct row's token loss is -w (prompt 0 has one correct row:
    # w = 1)
    mask_BT = rollout.loss_mask_BT
    torch.testing.assert_close(per_token_BT[0][mask_BT[0]], -torch.ones(int(mask_BT[0].sum())))
    # the failed row of prompt 0 (w = 1) carries the sampled reverse KL advantage -ℓ = log p_T - log p_S
    expected_BT = -(signal.token_logp_BT[1] - rollout.sampler_logp_BT[1])
    torch.testing.assert_close(per_token_BT[1][mask_BT[1]], expected_BT[mask_BT[1]], atol=1e-5, rtol=1e-4)
    # prompt 1 has two correct rows: their weights (PPL_S softmax) sum to 1
    totals = [-float(per_token_BT[row][mask_BT[row]].detach().mean()) for row in (2, 3)]
    assert sum(totals) == pytest.approx(1.0, abs=1e-5) and min(totals) > 0


def test_eopd_adds_forward_kl_only_where_the_teacher_is_uncertain(setup):
    student, teacher, rollout = setup
    base, _ = _loss(_config(), student, teacher, rollout)
    closed, metrics = _loss(
        _config("weighting.eopd_coef=1", "weighting.eopd_threshold=100"), student, teacher, rollout
    )
    torch.testing.assert_close(closed, base)  # gate shut: only the policy-gradient term
    assert metrics["eopd_gate_frac"] == 0
    opened, metrics = _loss(
        _config("weighting.eopd_coef=1", "weighting.eopd_threshold=0"), student, teacher, rollout
    )
    assert metrics["eopd_gate_frac"] == 1 and opened > base  # the forward KL on the teacher's top-16 adds on


def test_reference_kl_is_zero_at_the_reference_and_positive_away_from_it(setup, make_model):
    student, teacher, rollout = setup
    config = _config("objective.ref_kl_coef=0.5")
    base, _ = _loss(_config(), student, teacher, rollout)
    same, metrics = _loss(config, student, teacher, rollout, reference=LocalTeacher(copy.deepcopy(student)))
    torch.testing.assert_close(same, base)
    assert metrics["reference_kl"] == pytest.approx(0.0, abs=1e-6)
    _, metrics = _loss(config, student, teacher, rollout, reference=LocalTeacher(make_model(seed=3)))
    assert metrics["reference_kl"] > 0


@pytest.mark.parametrize(
    "overrides",
    [
        ("objective.type=sampled_rkl", "weighting.tip_ratio=0.5"),
        ("objective.type=sead",),
        ("objective.type=minillm", "objective.discount=0.5"),
        ("objective.type=dpo", "rollout.n_per_prompt=2"),  # micro-batches of 3 split the pairs
    ],
)
def test_batch_wide_shaping_is_the_same_for_any_micro_batch_size(tiny_run, tmp_path, overrides):
    finals = []
    for micro in (0, 3):
        config = tiny_run(
            "train.prompts_per_step=8",
            "rollout.max_new_tokens=52",
            "train.steps=3",
            f"train.micro_batch_size={micro}",
            *overrides,
            out=str(micro),
        )
        loop.run(config, show_progress=False)
        model, _ = load_model(ModelSpec(path=str(tmp_path / str(micro) / "final")))
        finals.append(dict(model.named_parameters()))
    for name, param in finals[0].items():
        torch.testing.assert_close(param, finals[1][name], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "overrides",
    [
        ("objective.type=minillm", "objective.discount=0.5"),
        ("objective.type=sead",),
        ("objective.type=topk_rkl", "objective.topk=4", "objective.topk_support=union"),
        (
            "objective.type=topk_rkl",
            "objective.topk=4",
            "objective.topk_variant=tail",
            "objective.topk_support=teacher",
        ),
        ("objective.type=sampled_rkl", "weighting.iw_opd_gamma=0.5", "weighting.position_decay=2"),
    ],
)
def test_teacher_equal_to_student_gives_zero_loss_and_zero_gradient(setup, overrides):
    student, _, rollout = setup
    config = _config(*overrides)
    loss, _ = _loss(config, student, LocalTeacher(copy.deepcopy(student)), rollout)
    student.zero_grad()
    loss.backward()
    assert abs(float(loss.detach())) < 1e-6
    assert all(p.grad is None or p.grad.abs().max() < 1e-6 for p in student.parameters())


def test_a_loss_window_also_ends_the_reward_stream_and_a_position_limit_masks(setup):
    student, teacher, rollout = setup
    config = _config("objective.discount=1", "weighting.loss_window=1")
    batch = _batch(config, student, teacher, rollout)
    per_token_BT, _ = micro_batch_loss(config, student, batch)
    assert batch.shaping is not None and batch.shaping.mask_BT.sum(1).tolist() == [1, 1, 1, 1]
    # with only token 0 left, its return is its own reward: A_0 = log p_T(y_0) - log p_S(y_0), at ρ = 1
    signal = teacher.score(rollout, config.teacher_request)
    own_BT = -(signal.token_logp_BT - rollout.sampler_logp_BT)
    torch.testing.assert_close(per_token_BT[:, 0].detach(), own_BT[:, 0], atol=1e-5, rtol=1e-4)
    limited = _batch(_config("weighting.position_limit=2"), student, teacher, rollout)
    assert limited.shaping is not None and limited.shaping.mask_BT.sum(1).tolist() == [2, 2, 2, 2]


def test_a_top_k_wider_than_the_vocabulary_is_a_clear_error(tiny_run):
    from opdistill.errors import UserError

    with pytest.raises(UserError, match="more than the vocabulary"):
        loop.run(
            tiny_run("objective.type=topk_rkl", "objective.topk=64", "train.steps=1"), show_progress=False
        )


def test_diagnostics_of_a_student_scored_by_itself_show_perfect_alignment(setup, tokenizer):
    from opdistill.observe import monitor

    student, _, rollout = setup
    config = _config(
        "objective.topk=4",
        "weighting.kat_window=1",
        "weighting.kat_patience=2",
        "weighting.kat_min_position=0",
    )  # responses this short can be checked for KL traps
    twin = LocalTeacher(copy.deepcopy(student))
    batch = StepBatch(rollout, batches.score(config, student, twin, rollout, config.diagnostics_request), {})
    out = monitor.diagnose(config, student, tokenizer, batch)
    assert out["overlap"] == pytest.approx(1.0) and out["entropy_gap"] == pytest.approx(0.0, abs=1e-6)
    assert out["overlap_mass_student"] == pytest.approx(out["overlap_mass_teacher"], abs=1e-6)
    assert out["overlap_advantage"] == pytest.approx(0.0, abs=1e-6)
    assert out["repetition_rate"] == 0.0 and len(out["kl_by_token_position"]) == 4  # type: ignore[arg-type]
    assert out["kl_trap_rate"] == 0.0  # zero KL everywhere is never below κ x its median
    kl = [v for v in out["kl_by_position"] if v is not None]  # type: ignore[union-attr]
    assert len(out["kl_by_position"]) == 10 and max(abs(v) for v in kl) < 1e-5  # type: ignore[arg-type]
    ranks = [v for v in out["teacher_rank_by_position"] if v is not None]  # type: ignore[union-attr]
    assert ranks and all(1.0 <= v <= 5.0 for v in ranks)  # 1-based among the top-4, 5 when outside


def test_diagnostics_are_logged_at_their_cadence(tiny_run, tmp_path):
    loop.run(
        tiny_run("objective.type=sampled_rkl", "train.steps=3", "train.diagnostics_every=2"),
        show_progress=False,
    )
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = {
        "overlap",
        "overlap_mass_student",
        "teacher_high_entropy_rate",
        "entropy_gap",
        "kl_by_position",
        "teacher_rank_by_position",
        "repeated_token_rate",
        "abs_log_ratio_p90",
    }
    assert [keys <= set(r) for r in rows] == [True, False, True]
