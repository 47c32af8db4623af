"""Config: YAML + dotted overrides, types, and errors that name the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from opdistill.config import Config, describe, load_config, save_config
from opdistill.errors import UserError
from opdistill.types import SignalRequest

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_yaml_and_overrides_compose(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {steps: 7, seed: 3}\noptim: {lr: 1}\n")
    config = load_config(path, ["train.steps=9", "optim.betas=[0.8, 0.9]", "data.task_options.digits=6"])
    assert config.train.steps == 9 and config.train.seed == 3
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.optim.betas == (0.8, 0.9)
    assert config.data.task == "addition" and config.data.task_options == {"digits": 6}


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, ["rollout.temperature=0.7", "objective.type=sampled_rkl"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert load_config() == Config()


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.step=5", "unknown config key 'train.step'. Did you mean train.steps?"),
        ("optimm.lr=1", "unknown config key 'optimm'. Did you mean optim?"),
        ("train.steps=many", "train.steps must be a int"),
        ("objective.type=kl", "objective.type must be one of"),
        ("optim.betas=[0.9]", "optim.betas must be a list of 2 values"),
        ("trainsteps", "must look like section.field=value"),
        ("rollout.top_p=0", "rollout.top_p in (0, 1]"),
        ("student.preset=big", "is not of the form d<hidden>l<layers>"),
        ("lora.target_modules=,", "lora.target_modules must name modules"),
        ("train.steps=[", "the value is not valid YAML"),
        ("train.parallel=zero", "train.parallel must be one of"),
    ],
)
def test_bad_keys_and_values_name_the_fix(override, message):
    with pytest.raises(UserError) as err:
        load_config(None, [override])
    assert message in str(err.value)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), Config)


def test_a_remote_teacher_cannot_generate_completions():
    with pytest.raises(UserError, match="a remote teacher \\(teacher.url\\) only scores"):
        load_config(
            None, ["teacher.url=http://127.0.0.1:8000", "objective.type=sft", "data.completions=teacher"]
        )


def test_bad_yaml_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")


def test_a_train_file_replaces_the_default_task():
    assert load_config(None, ["data.train_file=x.jsonl"]).data.task == ""
    with pytest.raises(UserError, match="give data.task"):
        load_config(None, ["data.task="])


def test_help_lists_every_key_with_its_default_and_comment():
    lines = describe().splitlines()
    assert "  train.steps=200  optimizer steps (the schedule spans them)" in lines
    sections = [getattr(Config(), name) for name in Config.__dataclass_fields__]
    assert len(lines) == sum(len(getattr(s, "__dataclass_fields__", "x")) for s in sections)  # teachers: 1
    assert "  teachers={}  more teachers by tag (examples' `teacher`)" in lines
    assert all("  " in line.strip() for line in lines), [line for line in lines if "  " not in line.strip()]


def test_sampled_estimators_refuse_off_policy_batches():
    with pytest.raises(UserError, match="use a full-vocabulary objective"):
        load_config(None, ["objective.type=sampled_rkl", "rollout.on_policy_fraction=0.5"])
    assert (
        load_config(None, ["objective.type=jsd", "rollout.on_policy_fraction=0.5"]).rollout.on_policy_fraction
        == 0.5
    )


@pytest.mark.parametrize(
    "overrides,signal",
    [
        (["objective.type=sampled_rkl"], SignalRequest()),
        (["objective.type=k2"], SignalRequest()),
        (["objective.type=sampled_rkl", "objective.baseline=vopd"], SignalRequest(full=True)),
        (
            ["objective.type=sampled_rkl", "objective.baseline=vopd", "objective.baseline_topk=8"],
            SignalRequest(at_ids=True),
        ),
        (["objective.type=full_rkl"], SignalRequest(full=True)),
        (["objective.type=jsd"], SignalRequest(full=True)),
        (["objective.type=topk_rkl", "objective.topk=4"], SignalRequest(at_ids=True)),
        (["objective.type=topk_rkl", "objective.topk_support=teacher"], SignalRequest(topk=16)),
        (["objective.type=topk_rkl", "objective.topk_support=intersect"], SignalRequest(topk=16)),
        (["objective.type=topk_rkl", "objective.topk_support=union"], SignalRequest(topk=16, at_ids=True)),
    ],
)
def test_teacher_is_asked_only_for_the_signal_the_objective_needs(overrides, signal):
    assert load_config(None, overrides).teacher_request == signal


def test_token_clip_applies_to_full_vocabulary_objectives_only():
    with pytest.raises(UserError, match="token_clip must be >= 0 and applies to full_rkl"):
        load_config(None, ["objective.type=sampled_rkl", "objective.token_clip=0.1"])
    assert load_config(None, ["objective.type=jsd", "objective.token_clip=0.1"]).objective.token_clip == 0.1


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["objective.type=sampled_rkl", "objective.grpo_coef=1"], "GRPO advantage is 0 with one sample"),
        (
            ["objective.type=jsd", "objective.grpo_coef=1", "rollout.n_per_prompt=4"],
            "grpo_coef must be >= 0 and applies",
        ),
        (
            ["objective.type=scope", "rollout.on_policy_fraction=0.5"],
            "sampled_rkl estimates|student's own samples",
        ),
        (["objective.type=sft", "weighting.tip_ratio=0.5"], "apply to distillation objectives"),
        (
            ["objective.type=jsd", "weighting.kat=true", "rollout.on_policy_fraction=0.5"],
            "sampling log-probs",
        ),
        (
            ["objective.type=jsd", "weighting.iw_opd_gamma=0.5", "rollout.skd_topk=4"],
            "not with rollout.skd_topk",
        ),
        (
            ["objective.type=sampled_rkl", "trd.mode=prefix"],
            "own samples; with trd.mode use a full-vocabulary",
        ),
        (
            ["objective.type=jsd", "objective.grpo_coef=1", "rollout.n_per_prompt=4", "rollout.skd_topk=0"],
            "grpo_coef must",
        ),
        (
            ["objective.type=full_rkl", "objective.route_opd=failed_only", "trd.mode=prefix"],
            "apply to objective.type=sampled_rkl",
        ),
        (
            ["rollout.skd_topk=4", "teacher.url=http://x:1"],
            "rollout.skd_topk runs the teacher model in this process",
        ),
        (
            ["cold_start.samples=8", "teachers={b: {path: x}}"],
            "cold_start.samples uses the one default teacher",
        ),
        (["rollout.skd_topk=-2"], "rollout.skd_topk must be -1"),
        (["trd.mode=prompt", "trd.template='{prompt}'"], "trd.template must contain {draft}"),
        (["cold_start.require=("], "cold_start.require='\\(' does not compile"),
        (["data.select_fraction=1.5"], "data.select_fraction and data.select_mix must be in"),
        (["data.select_fraction=0.5", "data.curriculum=true"], "each choose the prompts: use one"),
        (["objective.type=sft", "cold_start.samples=8"], "apply to distillation objectives"),
        (
            ["objective.type=jsd", "data.select_fraction=0.5", "rollout.on_policy_fraction=0.5"],
            "keep rollout.on_policy_fraction=1",
        ),
        (
            ["objective.type=topk_rkl", "objective.temperature=2"],
            "temperature applies to full_rkl, full_fkl and jsd",
        ),
        (["objective.type=minillm"], "set objective.discount in"),
        (
            ["objective.type=minillm", "objective.discount=1", "rollout.on_policy_fraction=0.5"],
            "student's own samples",
        ),
        (
            ["objective.type=jsd", "objective.ref_kl_coef=0.1", "rollout.on_policy_fraction=0.5"],
            "student's own samples",
        ),
        (["objective.type=sampled_rkl", "objective.baseline_topk=8"], "set objective.baseline=vopd"),
        (["objective.type=sft", "objective.ref_kl_coef=0.1"], "apply to distillation objectives"),
        (["objective.type=sft", "data.curriculum=true"], "apply to distillation objectives"),
        (
            ["objective.type=jsd", "data.curriculum=true", "rollout.on_policy_fraction=0.5"],
            "prompts the student samples",
        ),
        (["objective.type=jsd", "weighting.kat=true"], "can only trap responses of at least"),
        (["objective.type=scope", "objective.discount=0.5"], "do not apply to objective.type=scope"),
        (["objective.type=jsd", "objective.pg_clip=0.2"], "pg_clip applies to the policy-gradient types"),
        (["weighting.tip_ratio=2"], "tip_ratio and prune_eta must be in"),
    ],
)
def test_objective_and_weighting_pairings_are_clear_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_routing_without_a_grpo_term_needs_no_group():
    config = load_config(None, ["objective.type=sampled_rkl", "objective.route_opd=failed_only"])
    assert config.objective.needs_reward and config.rollout.n_per_prompt == 1


def test_k1_intersection_warns_as_its_loss_is_identically_zero():
    with pytest.warns(UserWarning, match="identically 0"):
        load_config(
            None,
            [
                "objective.type=topk_rkl",
                "objective.topk=1",
                "objective.topk_variant=renorm",
                "objective.topk_support=intersect",
            ],
        )


def test_string_values_on_the_command_line_stay_strings():
    config = load_config(None, ["opsd.system={privileged}", "train.out_dir=123", "data.task=null"])
    assert (config.opsd.system, config.train.out_dir, config.data.task) == ("{privileged}", "123", "null")
    assert load_config(None, ["train.steps=7"]).train.steps == 7  # other types still parse as YAML


def test_learning_rate_left_at_zero_is_chosen_by_the_students_size():
    from opdistill.config import OptimConfig

    auto = OptimConfig()
    assert auto.for_student(34_000, lora=False).lr == 1e-3  # the tiny models
    assert auto.for_student(134_515_008, lora=False).lr == 1e-5  # a pretrained LM in full
    assert auto.for_student(134_515_008, lora=True).lr == 1e-4  # through LoRA adapters
    assert OptimConfig(lr=3e-4).for_student(134_515_008, lora=False).lr == 3e-4  # the user's choice stands
    with pytest.raises(UserError, match="must be positive"):
        OptimConfig(lr=-1.0)
