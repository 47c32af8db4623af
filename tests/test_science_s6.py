"""S6 (benchmarks/science/s6_correction.py): the addition task's ``corrections`` option, the forced misleading
prefixes, and the experiment's machinery at a tiny size. Its outcome is measured by the script, not here."""

from __future__ import annotations

import hashlib
import json
import random
import re

import pytest

from opdistill.data.tasks import load_task
from opdistill.data.tasks.addition import problem, with_corrections, wrong_sum
from opdistill.errors import UserError

STEP = re.compile(r"(\d)\+(\d)\+(\d)=(?:(\d\d)=)?(\d\d)")  # a step, with its wrong sum if corrected


@pytest.fixture(scope="module")
def s6(science):
    return science("s6_correction")


def _digest(stream, n: int = 2000) -> str:
    text = "".join(
        stream[i].prompt + stream[i].completion + stream[i].answer + stream[i].privileged for i in range(n)
    )
    return hashlib.sha256(text.encode()).hexdigest()


def test_no_corrections_is_the_task_as_it_was():
    """The default and corrections=0 give the stream the task gave before the option existed (digests taken
    at commit 30625bc): the shipped assets and every earlier result were trained on it."""
    plain = load_task(task="addition", seed=0).train
    assert [plain[i].completion for i in range(3)] == [
        "5+2+0=07,6+0+0=06,7+4+0=11,1+0+1=02>2167",
        "0+7+0=07,4+8+0=12,0+4+1=05,2+7+0=09>9527",
        "5+6+0=11,8+2+1=11,7+1+1=09,4+1+0=05>5911",
    ]
    head = "ac59c5f03fd1392db9e916d7c1971f4f6adabfc5e85521ceba9f34142a9ab18d"
    assert _digest(plain) == head
    assert _digest(load_task(task="addition", task_options={"corrections": 0.0}, seed=0).train) == head
    rule = load_task(task="addition", task_options={"privileged": "rule", "mix_plain": 0.5}, seed=3).train
    assert _digest(rule) == "16b35806c5cc95e93c45c71f07fc424e4218b5e8fe54fcf22cb3b771ddb4bfe8"


def test_every_correction_fixes_the_wrong_sum_before_it_and_every_completion_still_verifies():
    options = {"digits": 4, "corrections": 0.5, "test_size": 50}
    task = load_task(task="addition", task_options=options, seed=7)
    plain = load_task(task="addition", task_options={"digits": 4, "test_size": 50}, seed=7)
    corrected = steps = 0
    for i in range(400):
        ex = task.train[i]
        assert ex == task.train[i] and ex.prompt == plain.train[i].prompt  # same problems, deterministic
        assert task.verify(ex.completion, ex)
        chain, _, answer = ex.completion.partition(">")
        carry = 0
        for written in chain.split(","):
            step = STEP.fullmatch(written)
            assert step is not None, written
            a, b, c, wrong, right = step.groups()
            assert int(c) == carry and int(right) == int(a) + int(b) + carry  # the carry is the right one
            if wrong is not None:
                assert wrong != right and 0 <= int(wrong) <= 19
                corrected += 1
            carry, steps = int(right) // 10, steps + 1
        assert answer == ex.answer == plain.train[i].answer
        # dropping each "wrong=" gives the plain completion back
        assert re.sub(r"=\d\d=", "=", ex.completion) == plain.train[i].completion
    assert 0.45 < corrected / steps < 0.55
    assert task.test == plain.test  # held-out problems and their completions are untouched


def test_wrong_sums_cover_every_other_sum_and_never_the_right_one():
    rng = random.Random(0)
    for total in range(20):
        drawn = {wrong_sum(rng, total) for _ in range(400)}
        assert drawn == set(range(20)) - {total}
    ex = problem(4721, 389, 4)
    assert with_corrections(ex, rng, 0.0) == ex
    every = with_corrections(ex, rng, 1.0)
    assert every.completion.count("=") == 8 and every.answer == "5110"


def test_bad_corrections_are_refused():
    with pytest.raises(UserError, match="corrections"):
        load_task(task="addition", task_options={"corrections": 1.5})
    with pytest.raises(UserError, match="chain=true"):
        load_task(task="addition", task_options={"corrections": 0.1, "chain": False})


def test_a_forced_prefix_writes_the_first_step_wrong_and_expects_its_correction(s6):
    task = load_task(task="addition", seed=0)
    ex = s6.misled(problem(4721, 389, 4))
    assert re.fullmatch(r"4721\+0389=1\+9\+0=\d\d", ex.prompt) and ex.prompt[-2:] != "10"
    assert ex.completion == "=10,2+8+1=11,7+3+1=11,4+0+1=05>5110" and ex.answer == "5110"
    assert task.verify(ex.completion, ex) and s6.misled(problem(4721, 389, 4)) == ex  # seeded by the prompt
    for original in task.test[:200]:
        forced = s6.misled(original)
        assert isinstance(forced.prompt, str) and isinstance(original.prompt, str)
        wrong, right = forced.prompt[-2:], forced.completion[1:3]
        assert wrong != right and forced.answer == original.answer
        assert forced.prompt[:-2] + right + forced.completion[3:] == original.prompt + original.completion
    wrong_sums = {s6.misled(original).prompt[-2:] for original in task.test[:200]}
    assert len(wrong_sums) > 10  # drawn, not one fixed slip


def test_s6_runs_end_to_end_at_a_tiny_size_and_reuses_finished_runs(s6, tmp_path):
    args = ["--smoke", "--threads", "1", "--out", str(tmp_path / "runs"), "--report", str(tmp_path / "s6")]
    result = s6.main(args)
    report = (tmp_path / "s6.md").read_text()
    assert report.count("\n| ") == 1 + 3 + 1 + 6 and "recovering teacher" in report  # two tables
    tables = [block.splitlines() for block in report.split("\n\n") if block.startswith("|")]
    assert [len({row.count("|") for row in table}) for table in tables] == [1, 1]  # every row fills its table
    assert (tmp_path / "s6.png").stat().st_size > 0
    runs = tmp_path / "runs"
    teacher = (runs / "teacher" / "config.yaml").read_text()
    assert "corrections: 0.3" in teacher and "type: sft" in teacher and "addition-teacher" in teacher
    configs = {d.name: (d / "config.yaml").read_text() for d in runs.iterdir() if d.name != "teacher"}
    assert sorted(configs) == sorted(f"{m}-{o}" for m in ("opd", "skd", "trd") for o in ("rkl", "fkl"))
    for name, text in configs.items():
        method, objective = name.split("-")
        assert f"path: {runs / 'teacher' / 'final'}" in text and f"type: full_{objective}" in text, name
        assert ("skd_topk: 2" in text) == (method == "skd") and ("mode: prefix" in text) == (method == "trd")
        points = result["curves"][name]
        assert points[0] == {"step": 0, "flops": 0.0, **result["models"]["student warm start"]}
        assert points[-1]["step"] == result["runs"][name].result["steps"] and points[-1]["flops"] > 0
        assert all(0 <= p[k] <= 1 for p in points for k in s6.SHARES + ("onset_p", "after_onset"))
    assert "cut_topk: 2" in configs["trd-rkl"]
    assert result["models"]["student warm start"]["onset"] == 0.0  # it never saw a correction
    stamp = {d.name: (d / "result.json").stat().st_mtime for d in runs.iterdir()}
    again = s6.main(args)
    assert {d.name: (d / "result.json").stat().st_mtime for d in runs.iterdir()} == stamp  # nothing retrained
    assert again["curves"] == json.loads(json.dumps(result["curves"]))
