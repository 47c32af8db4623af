"""OPSD's self-teacher (privileged context, response-position alignment, frozen / EMA / live weights) and
multi-teacher routing: the Scorer that decides who scores each row of a step."""

from __future__ import annotations

import json

import pytest
import torch

from opdistill.cli.demo import asset_dir
from opdistill.config import load_config
from opdistill.data.examples import Example, privileged_view, rollout_of
from opdistill.errors import UserError
from opdistill.teachers.local import LocalTeacher, ema_update
from opdistill.training import loop
from opdistill.training.batches import Scorer
from opdistill.types import SignalRequest

STUDENT, TEACHER = asset_dir("addition-student"), asset_dir("addition-teacher")


def test_privileged_view_rewrites_the_last_user_turn_and_can_add_a_system_turn():
    ex = Example(prompt="12+34=", privileged=">>")
    assert privileged_view(ex, "{privileged}{prompt}").prompt == ">>12+34="
    chat = Example(
        prompt=(("system", "be brief"), ("user", "hi"), ("assistant", "yo"), ("user", "sum")), privileged="46"
    )
    view = privileged_view(chat, "{prompt} (answer: {privileged})", system="Reference: {privileged}")
    assert view.prompt == (
        ("system", "Reference: 46"),
        ("system", "be brief"),
        ("user", "hi"),
        ("assistant", "yo"),
        ("user", "sum (answer: 46)"),
    )
    with pytest.raises(UserError, match="no user turn"):
        privileged_view(Example(prompt=(("system", "x"),), privileged="y"), "{privileged}{prompt}")


def _rows_and_rollout(tokenizer):
    rows = [
        Example(prompt="12+34=", privileged=">46,"),
        Example(prompt="1+2=", privileged=">>>>>>3,"),  # a teacher prompt much longer than the student's
        Example(prompt="123+45=", privileged=">"),
    ]
    prompts = [
        [tokenizer.bos_token_id] + tokenizer.encode(ex.prompt, add_special_tokens=False) for ex in rows
    ]
    completions = [
        tokenizer.encode(c, add_special_tokens=False) + [tokenizer.eos_token_id] for c in ("46", "3>3", "1")
    ]
    return rows, rollout_of(prompts, completions, tokenizer.pad_token_id)


def test_self_teacher_scores_line_up_with_the_student_by_response_position(make_model, tokenizer):
    model = make_model(seed=3, preset="d32l2")
    rows, rollout = _rows_and_rollout(tokenizer)
    config = load_config(None, ["opsd.teacher=frozen", "objective.type=jsd"])
    scorer = Scorer(config, tokenizer, model, {"": LocalTeacher(model)})
    signal, _ = scorer(rollout, rows, SignalRequest(full=True))
    for b, ex in enumerate(rows):
        # the teacher's sequence, built independently: BOS, privileged context, prompt, completion
        # (no padding)
        prompt = [tokenizer.bos_token_id] + tokenizer.encode(
            ex.privileged + ex.prompt, add_special_tokens=False
        )
        completion = rollout.tokens_BT[b][rollout.loss_mask_BT[b]].tolist()
        with torch.no_grad():
            logits_LV = model(torch.tensor([prompt + completion])).logits[0]
        expected_TV = torch.log_softmax(logits_LV[len(prompt) - 1 : len(prompt) - 1 + len(completion)], -1)
        T = len(completion)
        got_TV = torch.log_softmax(signal.full_logits.tensor()[b, :T], -1)
        torch.testing.assert_close(got_TV, expected_TV, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            signal.token_logp_BT[b, :T],
            expected_TV.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1),
            atol=1e-5,
            rtol=1e-5,
        )
    # the context changes the scores (else this test could not tell a teacher that ignores it)
    plain, _ = Scorer(load_config(None), tokenizer, model, {"": LocalTeacher(model)})(
        rollout, rows, SignalRequest()
    )
    assert not torch.allclose(plain.token_logp_BT, signal.token_logp_BT, atol=1e-3)


def test_scorer_errors_name_the_example(make_model, tokenizer):
    model = make_model()
    rows, rollout = _rows_and_rollout(tokenizer)
    config = load_config(None, ["opsd.teacher=frozen"])
    rows[1] = Example(prompt="1+2=", id="row-1")
    with pytest.raises(UserError, match="needs a 'privileged' field on every example; 'row-1'"):
        Scorer(config, tokenizer, model, {"": LocalTeacher(model)})(rollout, rows, SignalRequest())
    rows[1] = Example(prompt="1+2=", teacher="big")
    with pytest.raises(UserError, match="names teacher 'big', which is not a key of teachers"):
        Scorer(load_config(None), tokenizer, model, {"": LocalTeacher(model)})(rollout, rows, SignalRequest())


def test_routing_scores_each_row_with_its_teacher_and_reports_per_teacher_metrics(make_model, tokenizer):
    small, big, student = make_model(seed=1), make_model(seed=2, preset="d32l2"), make_model(seed=3)
    rows, rollout = _rows_and_rollout(tokenizer)
    rows = [Example(prompt=ex.prompt, teacher=tag) for ex, tag in zip(rows, ["big", "", "big"], strict=True)]
    rollout.sampler_logp_BT = -torch.rand(rollout.tokens_BT.shape) * rollout.loss_mask_BT
    teachers = {"": LocalTeacher(small), "big": LocalTeacher(big)}
    request = SignalRequest(topk=4, full=True)
    signal, metrics = Scorer(load_config(None), tokenizer, student, teachers)(rollout, rows, request)
    for b, tag in enumerate(ex.teacher for ex in rows):
        alone = teachers[tag].score(rollout.select(slice(b, b + 1)), request)
        for name in ("token_logp_BT", "topk_ids_BTK", "topk_logp_BTK"):
            torch.testing.assert_close(getattr(signal, name)[b], getattr(alone, name)[0])
        torch.testing.assert_close(signal.full_logits[b : b + 1].tensor(), alone.full_logits.tensor())
    assert metrics["teacher_sequences/big"] == 2 and metrics["teacher_sequences/default"] == 1
    mask = rollout.loss_mask_BT[1]
    kl = (rollout.sampler_logp_BT[1] - signal.token_logp_BT[1])[mask].mean()
    assert metrics["teacher_kl/default"] == pytest.approx(float(kl), abs=1e-5)


def test_ema_update_moves_every_weight_once_including_tied_ones(make_model):
    teacher, student = make_model(seed=1), make_model(seed=2)
    assert teacher.get_input_embeddings().weight is teacher.get_output_embeddings().weight  # tied
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    ema_update(teacher, student, 0.9)
    for name, p in teacher.named_parameters():
        expected = 0.9 * before[name] + 0.1 * dict(student.named_parameters())[name].detach()
        torch.testing.assert_close(p.detach(), expected)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["objective.type=sft"], "use a distillation objective"),
        (["rollout.on_policy_fraction=0.5", "objective.type=jsd"], "rollout.on_policy_fraction=1"),
        (["teachers={big: {path: x}}"], "is the only teacher"),
        (["rollout.skd_topk=4"], "is the only teacher"),
        (["opsd.teacher=ema", "lora.rank=4"], "averages full, unsharded weights"),
        (["opsd.template=<{privileged}>"], "must contain {prompt}"),
        (["opsd.template='{prompt}{hint}'"], "may use only {privileged} and {prompt}"),
        (["opsd.template='{prompt}'"], "must contain {privileged}"),
    ],
)
def test_opsd_config_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, ["opsd.teacher=frozen", *overrides])


def _run_config(tmp_path, *overrides):
    return load_config(
        None,
        [
            f"student.path={STUDENT}",
            "data.task_options={privileged: rule}",
            "objective.type=jsd",
            "train.prompts_per_step=16",
            "rollout.max_new_tokens=52",
            "train.eval_every=0",
            "train.eval_size=20",
            "optim.lr=1e-3",
            "optim.warmup_steps=2",
            f"train.out_dir={tmp_path / 'run'}",
            *overrides,
        ],
    )


@pytest.mark.parametrize(
    "mode,objective,target",
    [
        ("frozen", "jsd", "divergence"),
        ("ema", "jsd", "divergence"),
        ("live", "jsd", "divergence"),
        ("frozen", "sampled_rkl train.steps=40", "teacher_kl"),  # the paper's Eq. 9: sampled, noisier
        (
            "frozen",
            "jsd objective.token_clip=0.5 objective.token_clip_soft=true train.steps=40",
            "divergence",
        ),
    ],
)
def test_an_opsd_run_lowers_its_divergence(tmp_path, mode, objective, target):
    """The shipped student, shown the shared rule `>>` as its teacher: the rule-free student moves toward
    it."""
    overrides = [f"opsd.teacher={mode}", "train.steps=20", *f"objective.type={objective}".split()]
    loop.run(_run_config(tmp_path, *overrides), show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    values = [r[target] for r in rows]
    assert len(values) == len(rows) >= 20 and values[0] > 1e-3
    assert sum(values[-4:]) / 4 < 0.7 * sum(values[:3]) / 3, values
    if "token_clip" in objective:  # math.md §6.2's per-token clip is active on some tokens
        assert any(r["token_clip_frac"] > 0 for r in rows)


def test_multi_teacher_run_logs_per_teacher_metrics(tmp_path):
    data = tmp_path / "tagged.jsonl"
    lines = [
        {"prompt": f"{a:04d}+{a * 7 % 10000:04d}=", "teacher": "big" if a % 2 else ""} for a in range(1, 40)
    ]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = load_config(
        None,
        [
            f"student.path={STUDENT}",
            f"teacher.path={STUDENT}",
            f"teachers={{big: {{path: {TEACHER}}}}}",
            f"data.train_file={data}",
            "train.prompts_per_step=16",
            "train.steps=20",
            "rollout.max_new_tokens=52",
            "train.eval_every=0",
            "optim.warmup_steps=2",
            f"train.out_dir={tmp_path / 'run'}",
        ],
    )
    loop.run(config, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["teacher_sequences/big"] + r["teacher_sequences/default"] == 16 for r in rows)
    # step 1 samples from the initial student, which the default teacher (the same weights) scores as itself
    assert abs(rows[0]["teacher_kl/default"]) < 1e-4 and rows[0]["teacher_kl/big"] > 0.01
    big = [r["teacher_kl/big"] for r in rows]  # the student moves toward the teacher it learns from most
    assert sum(big[-4:]) / 4 < 0.7 * sum(big[:3]) / 3, big


def test_addition_regime_options():
    from opdistill.data.tasks import load_task

    rule = load_task("addition", {"privileged": "rule"})
    ex = rule.test[0]
    assert ex.privileged == ">>" and ex.completion.endswith(">" + ex.answer)
    plain_answer = str(sum(int(x) for x in ex.prompt.rstrip("=").split("+")))
    assert ex.answer == plain_answer[::-1] and rule.verify(ex.completion, ex)
    shown = load_task("addition", {"privileged": "rule", "shown": True}).test[0]
    assert shown.prompt == ">>" + ex.prompt and not shown.privileged and shown.answer == ex.answer
    hint = load_task("addition", {"privileged": "answer", "chain": False}).test[0]
    assert hint.privileged == f">{plain_answer}," and hint.completion == ">" + plain_answer
    mixed = load_task("addition", {"privileged": "answer", "shown": True, "mix_plain": 0.5}).train
    shown_share = sum(mixed[i].prompt.startswith(">") for i in range(2000)) / 2000
    assert 0.45 < shown_share < 0.55
