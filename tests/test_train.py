"""The loop end to end on tiny real models: learning, exact resume, micro-batch invariance, guards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from opdistill.cli.demo import asset_dir
from opdistill.config import ModelSpec, load_config
from opdistill.errors import UserError
from opdistill.models import load_model
from opdistill.observe.timing import PHASES
from opdistill.training import loop


def _config(tmp_path, *overrides):
    return load_config(
        None,
        [
            f"teacher.path={asset_dir('addition-teacher')}",
            "student.preset=d16l1",
            "train.prompts_per_step=8",
            "rollout.max_new_tokens=52",
            "train.eval_every=0",
            "train.eval_size=20",
            "optim.warmup_steps=1",
            f"train.out_dir={tmp_path / 'run'}",
            *overrides,
        ],
    )


def _metrics(run_dir):
    timing = {"step_s", "tokens_per_s", "elapsed_s"}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in timing and not k.startswith("time_")} for r in rows]


def _params(run_dir):
    model, _ = load_model(ModelSpec(path=str(run_dir / "final")))
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    "objective,target",
    [
        ("full_rkl", "divergence"),
        ("full_fkl", "divergence"),
        ("jsd", "divergence"),
        ("sampled_rkl", "teacher_kl"),
        ("sampled_rkl objective.pg_clip=0.2 objective.dual_clip=3", "teacher_kl"),
        ("k2", "teacher_kl"),
        ("sampled_rkl objective.baseline=vopd", "teacher_kl"),
        ("jsd rollout.on_policy_fraction=0.5", "divergence"),
        ("full_rkl objective.sft_coef=0.3", "divergence"),
        ("full_fkl objective.token_clip=3 objective.token_clip_soft=true", "divergence"),
        ("topk_rkl objective.topk=4", "divergence"),
        (
            "topk_rkl objective.topk=4 objective.topk_variant=renorm objective.topk_support=teacher",
            "divergence",
        ),
        ("topk_rkl objective.topk=3 objective.topk_variant=tail objective.topk_support=union", "divergence"),
        (
            "topk_rkl objective.topk=4 objective.topk_variant=pg objective.topk_support=intersect",
            "divergence",
        ),
        ("sampled_rkl objective.baseline=vopd objective.baseline_topk=4", "teacher_kl"),
        ("minillm objective.discount=0.5", "divergence"),
        ("sead", "teacher_kl"),
        ("sead data.curriculum=true data.pool_size=64 data.curriculum_samples=2", "teacher_kl"),
        ("scope rollout.n_per_prompt=4 train.prompts_per_step=4", "teacher_kl"),
        ("dasd rollout.n_per_prompt=4 train.prompts_per_step=4 objective.dasd_rho=0.01", "teacher_kl"),
        (
            "sampled_rkl objective.grpo_coef=1 objective.route_opd=failed_only rollout.n_per_prompt=4 "
            "train.prompts_per_step=4",
            "teacher_kl",
        ),
        (
            "sampled_rkl objective.ref_kl_coef=1e-3 weighting.position_decay=2 weighting.iw_opd_gamma=0.5",
            "teacher_kl",
        ),
        (
            "full_rkl weighting.loss_window=20 weighting.loss_window_from=random weighting.prune=true",
            "divergence",
        ),
        (
            "sampled_rkl weighting.tip_ratio=0.5 weighting.eopd_coef=1 weighting.eopd_threshold=0.3",
            "teacher_kl",
        ),
        (
            "jsd weighting.kat=true weighting.kat_window=4 weighting.kat_min_position=8 "
            "weighting.kat_patience=2",
            "divergence",
        ),
        (f"full_rkl lora.rank=8 student.path={asset_dir('addition-student')} optim.lr=2e-3", "divergence"),
        ("full_rkl rollout.skd_topk=2", "divergence"),
        ("full_fkl trd.mode=prefix trd.cut_topk=2", "divergence"),
        ("full_rkl data.select_fraction=0.5 data.pool_size=32 data.select_topk=4", "divergence"),
        ("full_rkl cold_start.samples=32 cold_start.steps=5 cold_start.prompts_per_step=8", "divergence"),
    ],
)
def test_each_objective_lowers_its_own_divergence_against_a_fixed_teacher(tmp_path, objective, target):
    config = _config(
        tmp_path,
        "train.prompts_per_step=16",
        "train.steps=30",
        "optim.lr=1e-2",
        "optim.warmup_steps=3",
        *f"objective.type={objective}".split(),
    )
    result = loop.run(config, show_progress=False)
    rows = _metrics(tmp_path / "run")
    values = [r[target] for r in rows]
    assert result["complete"] and len(values) == 30
    assert {"abs_log_ratio", "positive_log_ratio_frac", "high_entropy_rate", "entropy", "grad_norm"} <= set(
        rows[0]
    )
    assert sum(values[-5:]) / 5 < 0.85 * sum(values[:3]) / 3, values
    if "skd_topk" in objective:  # SKD logs its acceptance rate; some proposals are kept, some replaced
        assert all(0 < r["skd_acceptance"] < 1 for r in rows), [r["skd_acceptance"] for r in rows]
        # and its FLOPs count the teacher reading each rollout once while verifying, as when it scores it
        assert rows[-1]["teacher_generated_tokens"] == rows[-1]["teacher_scored_tokens"] > 0
    if "trd.mode" in objective:  # TRD refines part of the rollouts, keeping a prefix of each
        assert any(r["trd_refined"] > 0 for r in rows) and all(0 <= r["trd_prefix_kept"] <= 1 for r in rows)
        assert rows[-1]["teacher_generated_tokens"] > rows[-1]["teacher_scored_tokens"]  # cuts + rewrites
    assert (tmp_path / "run" / "config.yaml").is_file() and (
        tmp_path / "run" / "final" / "model.safetensors"
    ).is_file()


@pytest.mark.parametrize(
    "overrides",
    [
        ("objective.type=full_rkl",),
        ("objective.type=sampled_rkl", "objective.discount=0.9"),
        ("objective.type=sft", "data.completions=teacher_pool", "data.pool_size=24"),
        ("objective.type=jsd", "rollout.on_policy_fraction=0.5"),
        ("objective.type=full_rkl", "lora.rank=4"),
        (
            "objective.type=jsd",
            "opsd.teacher=ema",
            "opsd.ema_decay=0.5",
            "data.task_options={privileged: rule}",
        ),
        (
            "objective.type=full_rkl",
            "cold_start.samples=16",
            "cold_start.steps=3",
            "cold_start.prompts_per_step=4",
        ),
        ("objective.type=full_rkl", "data.select_fraction=0.5", "data.pool_size=16", "data.select_topk=4"),
        ("objective.type=jsd", "rollout.skd_topk=2", "trd.mode=prefix"),
        ("objective.type=dpo", "rollout.n_per_prompt=2", "objective.rank_by=verifier+teacher"),
        (
            "objective.type=sead",
            "data.curriculum=true",
            "data.pool_size=32",
            "data.curriculum_samples=2",
            "weighting.kat=true",
            "weighting.kat_window=4",
            "weighting.kat_min_position=8",
        ),
    ],
)
def test_resume_is_exact(tmp_path, overrides):
    whole = _config(tmp_path / "a", "train.steps=4", *overrides)
    loop.run(whole, show_progress=False)
    split = _config(tmp_path / "b", "train.steps=4", *overrides)
    first = loop.run(split, stop_after=2, show_progress=False)
    assert first == {"stopped_at": 2, "out": str(tmp_path / "b" / "run"), "complete": False}
    assert not (tmp_path / "b" / "run" / "final").exists()
    loop.run(split, resume=True, show_progress=False)
    assert _metrics(tmp_path / "a" / "run") == _metrics(tmp_path / "b" / "run")
    a, b = _params(tmp_path / "a" / "run"), _params(tmp_path / "b" / "run")
    assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("completions,generated", [("dataset", False), ("teacher", True)])
def test_gkd_mixing_draws_one_coin_per_step(tmp_path, completions, generated):
    config = _config(
        tmp_path,
        "objective.type=jsd",
        "rollout.on_policy_fraction=0.5",
        "train.steps=12",
        f"data.completions={completions}",
    )
    loop.run(config, show_progress=False)
    rows = _metrics(tmp_path / "run")
    coins = [r["on_policy"] for r in rows]
    assert 0 < sum(coins) < 12  # both kinds of batch occur (the coins of seed 0 at λ = 0.5)
    off = [r for r in rows if not r["on_policy"]]
    assert all("response_length" not in r for r in off) and all(
        "response_length" in r for r in rows if r["on_policy"]
    )
    made_by_teacher = [
        b["teacher_generated_tokens"] - a["teacher_generated_tokens"]
        for a, b in zip(rows, rows[1:], strict=False)
    ]
    assert any(made_by_teacher) == generated
    off_policy_only = _config(
        tmp_path / "off", "objective.type=jsd", "rollout.on_policy_fraction=0", "train.steps=3"
    )
    loop.run(off_policy_only, show_progress=False)
    assert [r["on_policy"] for r in _metrics(tmp_path / "off" / "run")] == [0.0, 0.0, 0.0]


def test_micro_batches_do_not_change_the_update(tmp_path):
    loop.run(_config(tmp_path / "a", "train.steps=2"), show_progress=False)
    loop.run(_config(tmp_path / "b", "train.steps=2", "train.micro_batch_size=3"), show_progress=False)
    a, b = _params(tmp_path / "a" / "run"), _params(tmp_path / "b" / "run")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)


def test_non_finite_loss_aborts_after_repeated_bad_steps(tmp_path):
    config = _config(tmp_path, "train.steps=10", "optim.lr=1e30")
    with pytest.raises(UserError, match="not finite for 3 steps in a row"):
        loop.run(config, show_progress=False)
    rows = _metrics(tmp_path / "run")
    finite = [math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows]
    assert finite[-3:] == [False] * 3 and len(rows) < 10  # every step is logged, the last three were skipped


def test_existing_run_is_never_overwritten(tmp_path):
    config = _config(tmp_path, "train.steps=1")
    loop.run(config, show_progress=False)
    with pytest.raises(UserError, match="already holds a run"):
        loop.run(config, show_progress=False)
    with pytest.raises(UserError, match="no checkpoint to resume"):
        loop.run(_config(tmp_path / "other", "train.steps=1"), resume=True, show_progress=False)


def test_learning_rate_schedule():
    config = load_config(
        None, ["optim.warmup_steps=2", "train.steps=12", "optim.min_lr_ratio=0.1", "optim.lr=1.0"]
    )
    assert loop.learning_rate(config, 0, 0) == 0.5
    assert loop.learning_rate(config, 2, 0) == pytest.approx(1.0)
    assert loop.learning_rate(config, 12, 0) == pytest.approx(0.1)
    timed = load_config(
        None, ["optim.warmup_steps=0", "train.steps=1000", "train.time_budget_s=10", "optim.lr=1.0"]
    )
    assert loop.learning_rate(timed, 1, 10.0) == pytest.approx(0.1)  # the clock, not the step, ends the decay
    costed = load_config(
        None, ["optim.warmup_steps=0", "train.steps=1000", "train.budget_flops=1e9", "optim.lr=1.0"]
    )
    assert loop.learning_rate(costed, 1, 0.0, 5e8) == pytest.approx(0.55)  # half the FLOPs: half the decay
    assert loop.learning_rate(costed, 1, 0.0, 1e9) == pytest.approx(0.1)


def test_flop_budget_ends_the_run_on_the_counted_flops(tmp_path):
    """A FLOP budget stops the run at the first step whose cumulative FLOPs (6N per trained token, 2N per
    sampled or prefilled token, 2N_teacher per scored token) reach it; metrics.jsonl carries the sums."""
    from opdistill.observe.flops import FlopCounter, parameters

    loop.run(_config(tmp_path / "one", "train.steps=1"), show_progress=False)
    student_n = parameters(load_model(ModelSpec(path=str(tmp_path / "one" / "run" / "final")))[0])
    teacher_n = parameters(load_model(ModelSpec(path=str(asset_dir("addition-teacher"))))[0])
    (first,) = _metrics(tmp_path / "one" / "run")
    sampled, trained = first["student_sampled_tokens"], first["student_train_tokens"]
    assert first["student_flops"] == 6 * student_n * trained + 2 * student_n * trained
    assert sampled < trained  # prompts: the prefill is trained - sampled
    assert first["teacher_flops"] == 2 * teacher_n * first["teacher_scored_tokens"]
    assert first["flops"] == first["student_flops"] + first["teacher_flops"]
    assert FlopCounter(student_n, teacher_n)(first) == {
        k: first[k] for k in ("student_flops", "teacher_flops", "flops")
    }

    budget = 2.5 * first["flops"]  # steps cost about the same: the budget is spent during step 3
    result = loop.run(
        _config(tmp_path, "train.steps=50", f"train.budget_flops={budget}"), show_progress=False
    )
    rows = _metrics(tmp_path / "run")
    assert result["steps"] == len(rows) < 50
    assert rows[-1]["flops"] >= budget > rows[-2]["flops"]


def test_sft_stabiliser_adds_coef_times_token_mean_cross_entropy(make_model, tokenizer):
    """With teacher = student the distillation gradient is zero, so an SGD(lr=1) step moves the weights by
    exactly -coef * ∇ CE(sft batch)."""
    import copy

    from opdistill.data.examples import left_pad, right_pad
    from opdistill.logits import completion_logits
    from opdistill.objectives.losses import token_logprobs
    from opdistill.teachers.local import LocalTeacher
    from opdistill.training.step import train_step
    from opdistill.types import Rollout, SignalRequest, StepBatch

    def rollout(prompts, completions):
        ids, mask = left_pad(prompts, tokenizer.pad_token_id)
        tokens, loss_mask = right_pad(completions, tokenizer.pad_token_id)
        return Rollout(
            ids, mask, tokens, loss_mask, torch.zeros(tokens.shape), torch.zeros(len(prompts)).bool()
        )

    student = make_model(seed=5, preset="d16l1").float().train()
    on_policy = rollout([[1, 5, 6], [1, 7]], [[8, 9, 2], [10, 2]])
    sft = rollout([[1, 5, 6], [1, 7]], [[11, 12, 13, 2], [14, 2]])
    signal = LocalTeacher(copy.deepcopy(student)).score(on_policy, SignalRequest(full=True))
    config = load_config(None, ["objective.type=full_rkl", "objective.sft_coef=0.5", "optim.grad_clip=0"])
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    reference = copy.deepcopy(student)
    optimizer = torch.optim.SGD(student.parameters(), lr=1.0)
    metrics = train_step(config, student, optimizer, StepBatch(on_policy, signal, {}, sft_rollout=sft))
    assert metrics["divergence"] == pytest.approx(0.0, abs=1e-6) and metrics["sft_nll"] > 0

    nll = -token_logprobs(completion_logits(reference, sft), sft.tokens_BT)
    (0.5 * nll[sft.loss_mask_BT].mean()).backward()
    for name, param in student.named_parameters():
        grad = dict(reference.named_parameters())[name].grad
        torch.testing.assert_close(before[name] - param.detach(), grad, atol=1e-6, rtol=1e-4)


def test_sft_stabiliser_in_a_run(tmp_path):
    config = _config(
        tmp_path,
        "objective.type=sampled_rkl",
        "objective.sft_coef=0.5",
        "train.steps=3",
        "data.completions=teacher",
    )
    loop.run(config, show_progress=False)
    rows = _metrics(tmp_path / "run")
    assert all(r["sft_nll"] > 0 for r in rows) and rows[-1]["teacher_generated_tokens"] > 0
    assert all(r["student_train_tokens"] > r["student_sampled_tokens"] for r in rows[:1])


def test_the_loss_is_normalised_by_the_generated_tokens_not_the_dataset_completions(tmp_path):
    """TRL's GKDTrainer divides by the token count of the dataset's completions even when it trains on the
    student's samples; here an on-policy step's normaliser is the number of sampled tokens with loss."""
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a), "completion": "9" * 40} for a in range(100, 140)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _config(
        tmp_path,
        f"data.train_file={data}",
        f"student.path={asset_dir('addition-student')}",
        "train.steps=2",
        "rollout.max_new_tokens=12",
    )
    loop.run(config, show_progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sampled = [records[0]["student_sampled_tokens"]] + [
        b["student_sampled_tokens"] - a["student_sampled_tokens"]
        for a, b in zip(records, records[1:], strict=False)
    ]
    assert [r["loss_tokens"] for r in records] == sampled
    assert all(r["loss_tokens"] <= 8 * 12 < 8 * 41 for r in records)


def test_metrics_say_where_each_steps_time_goes(tiny_run):
    config = tiny_run("train.steps=2", "train.diagnostics_every=1", "train.eval_every=2", "train.eval_size=4")
    loop.run(config, show_progress=False)
    run_dir = Path(config.train.out_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for (
        row
    ) in rows:  # every phase but the vLLM engine's weight sync (rollout.engine=vllm: tests/test_vllm.py)
        phases = [row[f"time_{phase}_s"] for phase in PHASES if phase != "sync"]
        assert all(s > 0 for s in phases) and sum(phases) <= row["step_s"]
        assert "time_sync_s" not in row
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert all(e["eval_s"] > 0 for e in evals)
