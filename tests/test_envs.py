"""Multi-turn episodes (envs/, sampling/episodes.py, docs/agents.md): the environment protocol, the built-in
environments, rendering turns through chat templates, and the masking that keeps environment tokens out of
the loss — checked on the gradient, and with the teacher reading them as context."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_chat_tokenizers import LAYOUTS, chat_tokenizer

from opdistill.cli.demo import asset_dir
from opdistill.config import ModelSpec, load_config
from opdistill.data.tasks import load_task
from opdistill.envs import Step, make_env
from opdistill.envs.calculator import Calculator
from opdistill.envs.guess import Guess
from opdistill.errors import UserError
from opdistill.logits import completion_logits
from opdistill.models import load_model
from opdistill.objectives import losses
from opdistill.objectives.registry import objective_loss
from opdistill.sampling import episodes
from opdistill.teachers.local import LocalTeacher
from opdistill.teachers.remote import RemoteTeacher
from opdistill.teachers.server import ScoringServer
from opdistill.training import batches, loop
from opdistill.types import SignalRequest, StepBatch

TEACHER = str(asset_dir("addition-teacher"))


@pytest.fixture(scope="module")
def teacher():
    return load_model(ModelSpec(path=TEACHER))


def _demonstrated(tokenizer, n: int = 3):
    examples = [load_task("addition").train[i] for i in range(n)]
    started = episodes.start(tokenizer, examples, Calculator)
    return episodes.demonstrated(tokenizer, started, [Calculator.demonstration(ex) for ex in examples])


def test_the_calculator_answers_calls_and_grades_the_answer():
    env = Calculator()
    example = load_task("addition").train[0]
    assert env.reset(example) == example.prompt
    assert env.step("1+9+0=") == Step(observation="10")
    assert env.step(",7+3+1=") == Step(observation="11")
    assert env.step(f">{example.answer}") == Step(reward=1.0, done=True)
    assert env.step(">0") == Step(reward=0.0, done=True)
    assert env.step("hello") == Step(done=True)  # neither a call nor an answer ends it, unsolved


def test_bisection_finds_every_secret_within_the_turns_guess_allows():
    task = load_task("guess")
    assert len(task.test) == 100
    for example in task.test:
        env = Guess()
        env.reset(example)
        turns = Guess.demonstration(example)
        outcomes = [env.step(turn) for turn in turns]
        assert len(turns) <= 7 and outcomes[-1] == Step(reward=1.0, done=True)
        assert all(o.observation in "<>" and not o.done for o in outcomes[:-1])


def test_environments_are_checked_before_training():
    with pytest.raises(UserError, match="neither a built-in environment"):
        make_env("nowhere")
    with pytest.raises(UserError, match="bad env.options"):
        make_env("guess", {"secret": 3})
    with pytest.raises(UserError, match="must have reset"):
        make_env("opdistill.envs:Step")
    with pytest.raises(UserError, match="set data.task=guess"):
        load_config(None, ["env.name=guess"])
    with pytest.raises(UserError, match="does not combine with train.parallel=fsdp"):
        load_config(None, ["env.name=calculator", "train.parallel=fsdp"])
    with pytest.raises(UserError, match="does not combine with weighting.position_decay"):
        load_config(None, ["env.name=calculator", "weighting.position_decay=2"])
    with pytest.raises(UserError, match="with env.mask_observations=false use a full-vocabulary"):
        load_config(None, ["env.name=calculator", "env.mask_observations=false", "objective.type=k2"])
    with pytest.raises(UserError, match="takeover is TRD for multi-turn episodes"):
        load_config(None, ["trd.mode=takeover"])


def test_a_demonstrated_episode_interleaves_turns_and_observations(teacher):
    _, tokenizer = teacher
    episode = _demonstrated(tokenizer, 1)[0]
    assert episode.done and episode.reward == 1.0 and episode.turns == 5
    text = tokenizer.decode(episode.ids)
    assert text.count("<eos>") == 5  # each of the student's turns ends with its end token
    mine = tokenizer.decode([i for i, m in zip(episode.ids, episode.mine, strict=True) if m])
    theirs = tokenizer.decode([i for i, m in zip(episode.ids, episode.mine, strict=True) if not m])
    assert ">" in mine and all(len(m["content"]) == 2 for m in episode.messages[2::2])
    assert theirs == "".join(m["content"] for m in episode.messages[2::2])  # the calculator's sums


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_observations_render_as_the_chat_template_continues_the_conversation(layout):
    tokenizer, turn_end = chat_tokenizer(layout)
    messages = [{"role": "user", "content": "2+3?"}]
    turn_ids = [*tokenizer.encode("call 5", add_special_tokens=False), turn_end]
    observed = episodes.observation_ids(tokenizer, messages, "call 5", "result 5")
    conversation = [
        *messages,
        {"role": "assistant", "content": "call 5"},
        {"role": "user", "content": "result 5"},
    ]
    whole = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # prompt ⊕ the turn as sampled (through its end token) ⊕ the observation = the template's rendering
    rendered = tokenizer.decode(tokenizer.encode(prompt, add_special_tokens=False) + turn_ids + observed)
    assert rendered.replace(" ", "") == whole.replace(" ", "") or rendered == whole
    assert "result 5" in tokenizer.decode(observed)


def _episode_batch(config, teacher_model, tokenizer):
    rollout = episodes.as_rollout(_demonstrated(tokenizer), tokenizer.pad_token_id)
    signal = batches.score(config, teacher_model, LocalTeacher(teacher_model), rollout)
    return rollout, StepBatch(rollout, signal, {})


@pytest.mark.parametrize("objective", ["full_rkl", "sampled_rkl", "topk_rkl", "jsd", "k2", "minillm"])
def test_environment_tokens_get_no_gradient_and_do_not_count(teacher, objective):
    teacher_model, tokenizer = teacher
    student, _ = load_model(ModelSpec(path=str(asset_dir("addition-student"))))
    overrides = [f"objective.type={objective}"] + ["objective.discount=1"] * (objective == "minillm")
    config = load_config(None, overrides)
    rollout, batch = _episode_batch(config, teacher_model, tokenizer)
    assert rollout.observed_BT is not None and rollout.observed_BT.any()
    logits_BTV = completion_logits(student, rollout).detach().requires_grad_(True)
    per_token_BT, _ = objective_loss(config, logits_BTV, batch)
    mask_BT = rollout.loss_mask_BT
    losses.Normalizer("token-mean", float(mask_BT.sum()), len(mask_BT))(per_token_BT, mask_BT).backward()
    grad_BT = logits_BTV.grad.abs().sum(-1)
    assert float(grad_BT[rollout.observed_BT].max()) == 0.0
    assert float(grad_BT[mask_BT].max()) > 0
    # and the teacher's signal on them is zero too: no diagnostic or normaliser reads an observation
    assert float(batch.signal.token_logp_BT[rollout.observed_BT].abs().max()) == 0.0


def test_the_teacher_scores_the_students_turns_in_the_full_context(teacher):
    teacher_model, tokenizer = teacher
    rollout = episodes.as_rollout(_demonstrated(tokenizer), tokenizer.pad_token_id)
    scored = LocalTeacher(teacher_model).score(rollout, SignalRequest()).token_logp_BT
    for b in range(len(rollout.tokens_BT)):  # one plain forward over prompt ⊕ turns ⊕ observations
        prompt = rollout.prompt_ids_BP[b][rollout.prompt_mask_BP[b]]
        region = rollout.tokens_BT[b][rollout.real_BT[b]]
        ids = torch.cat([prompt, region])[None]
        with torch.no_grad():
            logp = teacher_model(ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        expected = logp.gather(-1, region[:, None]).squeeze(-1)
        mine = rollout.loss_mask_BT[b][rollout.real_BT[b]]
        torch.testing.assert_close(scored[b][rollout.loss_mask_BT[b]], expected[mine], atol=1e-5, rtol=1e-5)
    # what the teacher reads in an observation matters: a different calculator result changes its scores
    changed = rollout.tokens_BT.clone()
    first_observed = rollout.observed_BT[0].nonzero()[0, 0]
    changed[0, first_observed] = tokenizer.convert_tokens_to_ids("9")
    other = LocalTeacher(teacher_model).score(
        type(rollout)(**{**vars(rollout), "tokens_BT": changed}), SignalRequest()
    )
    assert not torch.allclose(other.token_logp_BT[0], scored[0])


def test_a_remote_teacher_scores_episodes_as_the_local_one_does(teacher):
    teacher_model, tokenizer = teacher
    rollout = episodes.as_rollout(_demonstrated(tokenizer), tokenizer.pad_token_id)
    request = SignalRequest(topk=4, entropy=True)
    local = LocalTeacher(teacher_model).score(rollout, request)
    with ScoringServer(teacher_model, tokenizer, port=0) as server:
        remote = RemoteTeacher(server.url, tokenizer).score(rollout, request)
    mask_BT = rollout.loss_mask_BT
    torch.testing.assert_close(remote.token_logp_BT, local.token_logp_BT, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(remote.entropy_BT, local.entropy_BT, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        remote.topk_logp_BTK[mask_BT], local.topk_logp_BTK[mask_BT], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    "overrides",
    [
        ("objective.type=full_rkl",),
        ("objective.type=sampled_rkl", "rollout.n_per_prompt=2", "objective.grpo_coef=1"),
        ("objective.type=dpo", "rollout.n_per_prompt=2", "objective.rank_by=verifier+teacher"),
        ("objective.type=full_rkl", "lora.rank=4"),
        ("objective.type=jsd", "rollout.skd_topk=2"),
        ("objective.type=full_rkl", "trd.mode=takeover", "trd.select=always"),
    ],
)
def test_an_opd_run_plays_episodes_and_logs_them(tiny_run, tmp_path, overrides):
    config = tiny_run(
        "env.name=calculator",
        f"student.path={asset_dir('addition-student')}",
        "rollout.max_new_tokens=12",
        "train.steps=2",
        "train.eval_every=2",
        *overrides,
    )
    loop.run(config, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert len(rows) == 2 and all(r["turns"] >= 1 and 0 <= r["episode_reward"] <= 1 for r in rows)
    # the loss counts only the student's tokens: fewer than the teacher scored (it read the observations)
    assert all(r["loss_tokens"] <= r["student_sampled_tokens"] < r["teacher_scored_tokens"] for r in rows)
    evaluated = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").open()]
    assert [e["step"] for e in evaluated] == [0, 2] and all(0 <= e["greedy_acc"] <= 1 for e in evaluated)
    if "trd.mode=takeover" in overrides:  # the shipped student fails every episode at 12 tokens a turn
        assert all(r["takeover_tried"] == 1.0 for r in rows)


class Counter:
    """A stateful environment: the n-th turn is answered with n; solved when a turn says 3."""

    def __init__(self):
        self.seen = 0

    def reset(self, example) -> str:
        self.seen = 0
        return example.prompt

    def step(self, turn: str) -> Step:
        self.seen += 1
        if turn.strip() == "3":
            return Step(reward=1.0, done=self.seen == 3)
        return Step(observation=str(self.seen))


def test_a_cut_episode_replays_its_kept_turns_into_a_fresh_environment(teacher):
    _, tokenizer = teacher
    example = load_task("addition").train[0]
    episode = episodes.demonstrated(
        tokenizer, episodes.start(tokenizer, [example], Counter), [["1", "2", "3"]]
    )[0]
    assert episode.done and episode.reward == 1.0 and len(episode.starts) == 3
    kept = episodes.cut_at_turn(episode, 2, Counter, example)
    assert kept.env.seen == 2 and kept.turns == 2 and not kept.over  # the environment is where it was
    assert kept.ids == episode.ids[: episode.starts[2]] and kept.messages == episode.messages[:5]
    assert kept.env.step("3") == Step(reward=1.0, done=True)
    assert episodes.cut_at_turn(episode, 0, Counter, example).ids == []
    # a prompt of several messages (a system turn first) keeps them, and replays only the model's turns
    told = dataclasses.replace(example, prompt=(("system", "count"), ("user", example.prompt)))
    episode = episodes.demonstrated(tokenizer, episodes.start(tokenizer, [told], Counter), [["1", "2", "3"]])[
        0
    ]
    kept = episodes.cut_at_turn(episode, 2, Counter, told)
    assert (
        kept.env.seen == 2 and kept.messages == episode.messages[:6] and kept.messages[0]["role"] == "system"
    )


def test_the_masking_ablation_gives_the_environments_tokens_loss(teacher):
    _, tokenizer = teacher
    played = _demonstrated(tokenizer)
    masked = episodes.as_rollout(played, tokenizer.pad_token_id)
    unmasked = episodes.as_rollout(played, tokenizer.pad_token_id, mask_observations=False)
    assert torch.equal(unmasked.loss_mask_BT, masked.real_BT) and not unmasked.observed_BT.any()
    assert torch.equal(unmasked.attention_mask, masked.attention_mask)


def test_sft_on_demonstrations_teaches_the_tool_calls(tiny_run, tmp_path):
    config = tiny_run(
        "objective.type=sft",
        "env.name=calculator",
        f"student.path={TEACHER}",
        "rollout.max_new_tokens=12",
        "train.steps=30",
        "train.prompts_per_step=16",
        "optim.lr=2e-3",
    )
    loop.run(config, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    # the shipped teacher never ends a turn after "=": the calls are new to it, then learnt
    assert rows[0]["nll"] > 1.0 and rows[-1]["nll"] < 0.5 * rows[0]["nll"], [r["nll"] for r in rows]


def test_resume_is_exact_with_episodes(tiny_run, tmp_path):
    args = ("env.name=calculator", "rollout.max_new_tokens=12", "train.steps=4", "objective.type=full_rkl")
    loop.run(tiny_run(*args, out="a"), show_progress=False)
    split = tiny_run(*args, out="b")
    loop.run(split, stop_after=2, show_progress=False)
    loop.run(split, resume=True, show_progress=False)
    a, b = ([json.loads(line) for line in (tmp_path / d / "metrics.jsonl").open()] for d in "ab")
    drop = ("step_s", "tokens_per_s", "elapsed_s")
    assert [{k: v for k, v in r.items() if k not in drop and not k.startswith("time_")} for r in a] == [
        {k: v for k, v in r.items() if k not in drop and not k.startswith("time_")} for r in b
    ]
