"""The objective registry is the one place a name maps to its behaviour: what the config derives from it."""

import pytest

from opdistill.config import load_config
from opdistill.errors import UserError
from opdistill.objectives.registry import OBJECTIVES, names_where, signal_levels

# what each objective makes the teacher send at the defaults (math.md §1.3), written out by hand
EXPECTED_LEVELS = {
    "full_rkl": "L0 L2",
    "full_fkl": "L0 L2",
    "jsd": "L0 L2",
    "topk_rkl": "L0 L1s",  # the student's top-K support by default
    "sead": "L0 L2 H",
    "sampled_rkl": "L0",
    "k2": "L0",
    "minillm": "L0 L2",
    "scope": "L0",
    "dasd": "L0",
    "teacher_pick": "L0",
    "dpo": "L0",
    "sft": "",
}
GROUPS = ["rollout.n_per_prompt=4"]
VALID = {"dasd": GROUPS, "teacher_pick": GROUPS, "dpo": GROUPS, "minillm": ["objective.discount=1"]}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_the_config_asks_the_teacher_for_what_the_record_says(name):
    config = load_config(None, [f"objective.type={name}", *VALID.get(name, [])])
    assert signal_levels(config.teacher_request, OBJECTIVES[name].distills) == EXPECTED_LEVELS[name]


def test_teacher_support_asks_for_the_teachers_own_topk():
    config = load_config(None, ["objective.type=topk_rkl", "objective.topk_support=teacher"])
    assert signal_levels(config.teacher_request) == "L0 L1"
    assert config.objective.student_topk == 0


def test_an_unknown_objective_names_the_choices_and_the_closest():
    with pytest.raises(
        UserError, match=r"objective.type must be one of .*'full_rkl'.*Did you mean 'sampled_rkl'"
    ):
        load_config(None, ["objective.type=sampled_kl"])


def test_error_messages_list_the_objectives_a_setting_applies_to():
    assert names_where(lambda record: record.clippable) == "full_rkl, full_fkl, jsd and topk_rkl"
    with pytest.raises(UserError, match="applies to full_rkl, full_fkl, jsd and topk_rkl"):
        load_config(None, ["objective.type=sampled_rkl", "objective.token_clip=1"])
    with pytest.raises(UserError, match="policy-gradient types: sampled_rkl, minillm, scope and dasd"):
        load_config(None, ["objective.type=k2", "objective.pg_clip=0.2"])


def test_an_objectives_own_check_runs_from_the_config():
    with pytest.raises(UserError, match="set objective.discount"):
        load_config(None, ["objective.type=minillm"])
    with pytest.raises(UserError, match="do not apply to objective.type=scope"):
        load_config(None, ["objective.type=scope", "objective.kl_coef=2"])
