"""A teacher with another tokenizer (math.md §18): alignment by text into spans, the teacher's scores at the
student's positions, the same loss as one tokenizer when both are the same, and whole runs (resume, LoRA, a
remote teacher, diagnostics) with tokenizers built in-process, and a real pair: SmolLM2 against Gemma 3."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from opdistill.alignment import align, prefix_projection, shared_vocabulary, token_ends
from opdistill.config import ModelSpec, load_config
from opdistill.data.examples import Example, rollout_of
from opdistill.data.rendering import encode_completion, encode_prompts
from opdistill.data.tasks import corpus_text, load_task
from opdistill.errors import UserError
from opdistill.logits import CompletionLogits
from opdistill.models import CHAR_CHAT_TEMPLATE, bpe_tokenizer, load_tokenizer, save_model, tiny_model
from opdistill.objectives.registry import objective_loss
from opdistill.teachers.base import make_teacher
from opdistill.teachers.cross import CrossTokenizerTeacher
from opdistill.teachers.local import LocalTeacher
from opdistill.teachers.server import ScoringServer
from opdistill.training import loop
from opdistill.types import SignalRequest, StepBatch, TeacherSignal

SPECIALS = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}


def merged(*merges: tuple[str, str]) -> PreTrainedTokenizerFast:
    """A BPE tokenizer over "0-9 + = , >" whose only merges are ``merges``."""
    vocab = dict(SPECIALS)
    for token in [*"0123456789+=,>", *(a + b for a, b in merges)]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAR_CHAT_TEMPLATE
    return tokenizer


def test_spans_close_where_both_tokenizations_end():
    # "12+34=": student 12|+|34|=, teacher 1|2+|34|=; they share the ends 3, 5 and 6
    assert align([2, 3, 5, 6], [1, 3, 5, 6], 6) == ([0, 0, 1, 2], [0, 0, 1, 2])
    # no shared end but the text's: one span; an end that is not a prefix (None) closes nothing
    assert align([2, None, 4], [1, 3, 4], 4) == ([0, 0, 0], [0, 0, 0])
    # a token that adds no text after the last shared end joins the last span
    assert align([1, 2, 2], [1, 2], 2) == ([0, 1, 1], [0, 1])
    assert align([], [], 0) == ([], [])


class Recorded:
    """A teacher over its own ids that gives teacher token j of each row log-prob -(j + 1) / 10 (and, when
    asked, entropy j and top-2 ids [j, j + 1]): pure logic, so where each score lands is checked by hand."""

    def __init__(self):
        self.seen = None

    def score(self, rollout, request, ids_BTK=None):
        self.seen = rollout
        B, T = rollout.tokens_BT.shape
        j_BT = torch.arange(T, dtype=torch.float).expand(B, T)
        ids_BTK = torch.stack([j_BT.long(), j_BT.long() + 1], -1)
        return TeacherSignal(
            token_logp_BT=-(j_BT + 1) / 10 * rollout.loss_mask_BT,
            topk_ids_BTK=ids_BTK if request.topk else None,
            topk_logp_BTK=torch.full((B, T, 2), -0.7) if request.topk else None,
            entropy_BT=j_BT.clone() if request.entropy else None,
        )


def test_a_hand_aligned_row_gets_span_log_probs_at_span_ends_and_states_at_span_starts():
    student, teacher = merged(("1", "2"), ("3", "4")), merged(("2", "+"), ("3", "4"))
    example = Example(prompt="12+34=")
    prompt = encode_prompts(student, [example])
    rollout = rollout_of(prompt, [encode_completion(student, "12+34=")], student.pad_token_id)
    assert student.convert_ids_to_tokens(rollout.tokens_BT[0].tolist()) == ["12", "+", "34", "=", "<eos>"]
    inner = Recorded()
    cross = CrossTokenizerTeacher(inner, student, teacher, chunk_tokens=64)
    signal = cross.score(rollout, SignalRequest(topk=2, entropy=True), rows=[example])
    assert teacher.convert_ids_to_tokens(inner.seen.tokens_BT[0].tolist()) == ["1", "2+", "34", "=", "<eos>"]
    assert inner.seen.prompt_ids_BP[0].tolist() == encode_prompts(teacher, [example])[0]
    spans = signal.spans
    assert spans is not None
    assert spans.span_BT[0].tolist() == [0, 0, 1, 2, 3]
    # span 0 = teacher tokens 0 and 1: -0.1 - 0.2, at the student's last token of it; then one token each
    torch.testing.assert_close(signal.token_logp_BT[0], torch.tensor([0.0, -0.3, -0.3, -0.4, -0.5]))
    assert spans.start_BT[0].tolist() == [True, False, True, True, True]
    assert spans.one_to_one_BT[0].tolist() == [False, False, True, True, True]
    # state-level scores: the teacher's at the first token of each span (teacher positions 0, 2, 3, 4)
    assert signal.entropy_BT is not None and signal.topk_ids_BTK is not None
    assert signal.entropy_BT[0].tolist() == [0.0, 0.0, 2.0, 3.0, 4.0]
    names = [[teacher.convert_ids_to_tokens(j) for j in (p, p + 1)] for p in (0, 2, 3, 4)]
    for position, (first, second) in zip((0, 2, 3, 4), names, strict=True):
        expected = [student.get_vocab().get(first, -1), student.get_vocab().get(second, -1)]
        assert signal.topk_ids_BTK[0, position].tolist() == expected
    assert signal.topk_ids_BTK[0, 1].tolist() == [-1, -1]


def test_the_shared_vocabulary_pairs_tokens_of_the_same_text_and_the_end_tokens():
    student, teacher = merged(("1", "2")), merged(("2", "+"))
    mine, theirs = shared_vocabulary(student, teacher)
    pairs = {
        student.convert_ids_to_tokens(a): teacher.convert_ids_to_tokens(b)
        for a, b in zip(mine, theirs, strict=True)
    }
    assert pairs["7"] == "7" and pairs["<eos>"] == "<eos>" and pairs["<pad>"] == "<pad>"
    assert "12" not in pairs and "2+" not in pairs.values()
    assert shared_vocabulary(student, student) == (list(range(len(student))), list(range(len(student))))


def _problem_rollout(tokenizer, n: int = 6):
    task = load_task(task="addition", seed=3)
    rows = [task.train[i] for i in range(n)]
    answers = [str(int(ex.answer) + (i % 3 == 0)) for i, ex in enumerate(rows)]  # some wrong, lengths vary
    completions = [encode_completion(tokenizer, a)[: 2 + i] for i, a in enumerate(answers)]
    rollout = rollout_of(encode_prompts(tokenizer, rows), completions, tokenizer.pad_token_id)
    rollout.sampler_logp_BT = -torch.rand(rollout.tokens_BT.shape) * rollout.loss_mask_BT
    return rollout, rows


@pytest.mark.parametrize(
    "objective,vocabulary",
    [("sampled_rkl", "prefix"), ("full_rkl", "prefix"), ("full_rkl", "shared"), ("jsd", "prefix")],
)
def test_one_tokenizer_through_the_cross_path_gives_the_same_loss_and_gradient(
    tokenizer, make_model, objective, vocabulary
):
    config = load_config(None, [f"objective.type={objective}", "objective.jsd_beta=0.3"])
    student, teacher = make_model(seed=0), make_model(seed=1)
    rollout, rows = _problem_rollout(tokenizer)
    request = config.teacher_request
    same = LocalTeacher(teacher).score(rollout, request)
    cross = CrossTokenizerTeacher(LocalTeacher(teacher), tokenizer, tokenizer, 64, vocabulary).score(
        rollout, request, rows=rows
    )
    assert cross.spans is not None and bool((cross.spans.one_to_one_BT == rollout.loss_mask_BT).all())
    results = []
    for signal in (same, cross):
        student.zero_grad()
        logits_BTV = student(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask.long()).logits
        logits_BTV = logits_BTV[:, rollout.prompt_ids_BP.shape[1] - 1 : -1]
        loss_BT, _ = objective_loss(config, logits_BTV, StepBatch(rollout, signal, {}))
        loss = (loss_BT * rollout.loss_mask_BT).sum()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads_a)


@pytest.fixture(scope="module")
def bpe_teacher(tmp_path_factory) -> Path:
    """A fresh tiny teacher whose tokenizer is a BPE learnt on the addition task (40 merges): the same text
    as the character student's, in other tokens."""
    tokenizer = bpe_tokenizer(corpus_text(load_task(task="addition", seed=0), 500), merges=40)
    out = tmp_path_factory.mktemp("bpe") / "teacher"
    save_model(tiny_model(ModelSpec(preset="d16l1"), tokenizer, seed=1), tokenizer, out)
    return out


def _rows(run: Path) -> list[dict]:
    """Each step's metrics but the clocks."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    clocks = ("step_s", "tokens_per_s", "elapsed_s")
    return [{k: v for k, v in row.items() if k not in clocks and not k.startswith("time_")} for row in rows]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {
        name: tensor
        for file in sorted((run / "final").glob("*.safetensors"))
        for name, tensor in load_file(file).items()
    }


@pytest.mark.parametrize(
    "overrides",
    [
        ("objective.type=sampled_rkl", "train.diagnostics_every=2"),
        ("objective.type=full_rkl", "lora.rank=2"),
        ("objective.type=dpo", "rollout.n_per_prompt=2"),
    ],
)
def test_runs_across_tokenizers_log_the_alignment_and_resume_exactly(
    tiny_run, bpe_teacher, tmp_path, overrides
):
    settings = (f"teacher.path={bpe_teacher}", "train.steps=4", "train.save_every=2", *overrides)
    whole, split = tiny_run(*settings, out="whole"), tiny_run(*settings, out="split")
    loop.run(whole, show_progress=False)
    loop.run(split, stop_after=2, show_progress=False)
    loop.run(split, resume=True, show_progress=False)
    rows = _rows(tmp_path / "whole")
    assert rows == _rows(tmp_path / "split")
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    assert all(1.0 < row["align_tokens_per_span"] < 3.0 and 0 < row["align_one_to_one"] < 1 for row in rows)
    assert all(row["loss"] == row["loss"] for row in rows)  # finite, not NaN
    if (
        "objective.type=full_rkl" in overrides
    ):  # divergences at span starts, the span's sampled term elsewhere
        assert all(0 < row["divergence_frac"] < 1 and row["is_ratio_max"] > 0 for row in rows)
    if "train.diagnostics_every=2" in overrides:
        diagnosed = [row for row in rows if "kl_by_position" in row]
        assert diagnosed and all(row["teacher_entropy"] >= 0 for row in diagnosed)


@pytest.mark.parametrize(
    "override,named",
    [
        ("objective.type=topk_rkl", "objective.type=topk_rkl"),
        ("rollout.skd_topk=2", "rollout.skd_topk"),
        ("trd.mode=prefix", "trd.mode=prefix"),
        ("weighting.position_decay=3", "weighting.*"),
        ("objective.discount=0.9", "objective.discount"),
        ("data.completions=teacher", "data.completions=teacher"),
    ],
)
def test_what_needs_one_vocabulary_is_refused_before_step_one(tiny_run, bpe_teacher, override, named):
    with pytest.raises(UserError, match="tokenizer differs") as err:
        loop.run(tiny_run(f"teacher.path={bpe_teacher}", "train.steps=1", override), show_progress=False)
    assert named in str(err.value)


def test_a_remote_teacher_with_another_tokenizer_scores_as_the_local_one(tokenizer, bpe_teacher):
    rollout, rows = _problem_rollout(tokenizer)
    request = SignalRequest(topk=3, entropy=True)
    local = make_teacher(ModelSpec(path=str(bpe_teacher)), tokenizer)
    model, teacher_tokenizer = LocalTeacher(local.inner.model).model, load_tokenizer(bpe_teacher)
    with ScoringServer(model, teacher_tokenizer, port=0) as server:
        with pytest.raises(UserError, match="teacher.tokenizer"):
            make_teacher(ModelSpec(url=server.url), tokenizer)
        remote = make_teacher(ModelSpec(url=server.url, tokenizer=str(bpe_teacher)), tokenizer, [request])
        assert isinstance(remote, CrossTokenizerTeacher)
        there = remote.score(rollout, request, rows=rows)
    here = local.score(rollout, request, rows=rows)
    for name in ("token_logp_BT", "topk_ids_BTK", "topk_logp_BTK", "entropy_BT"):
        torch.testing.assert_close(getattr(there, name), getattr(here, name), atol=1e-5, rtol=1e-5, msg=name)
    assert there.spans is not None and here.spans is not None
    assert torch.equal(there.spans.span_BT, here.spans.span_BT)


REAL_TEXT = (
    "The answer is 12 + 7 = 19, isn't it? Größe, naïve café — ✓ 日本語のテキスト.\n"
    "def f(x):\n    return x ** 2  # two  spaces\n"
)


def test_a_real_pair_smollm2_and_gemma3_align_on_real_text(smollm2, gemma_tokenizer_dir):
    student, teacher = load_tokenizer(smollm2), load_tokenizer(gemma_tokenizer_dir)
    assert (len(student), len(teacher)) == (49152, 262144)
    mine = student(REAL_TEXT, add_special_tokens=False)["input_ids"]
    theirs = teacher(REAL_TEXT, add_special_tokens=False)["input_ids"]
    assert mine != theirs
    mine_ends, their_ends = token_ends(student, mine, REAL_TEXT), token_ends(teacher, theirs, REAL_TEXT)
    assert None in mine_ends  # byte-level BPE cuts the CJK characters inside a character
    mine_span, their_span = align(mine_ends, their_ends, len(REAL_TEXT))
    assert mine_span[-1] == their_span[-1] and len(set(mine_span)) > 0.6 * len(mine)

    def texts(tokenizer, ids, spans):
        return [
            tokenizer.decode([i for i, s in zip(ids, spans, strict=True) if s == j])
            for j in range(spans[-1] + 1)
        ]

    # each span is the same text on both sides, and the spans together are the text
    assert texts(student, mine, mine_span) == texts(teacher, theirs, their_span)
    assert "".join(texts(student, mine, mine_span)) == REAL_TEXT
    shared_student, shared_teacher = shared_vocabulary(student, teacher)
    assert 40_000 < len(shared_student) < 49_152
    assert student.decode(shared_student[1000:1010]) == teacher.decode(shared_teacher[1000:1010])


def test_the_prefix_projection_sums_each_teacher_token_onto_its_first_character(tokenizer):
    teacher = merged(("1", "2"), ("+", "5"), ("12", "3"))
    projection = prefix_projection(tokenizer, teacher)
    name = tokenizer.convert_ids_to_tokens
    assert {
        t: name(projection[teacher.convert_tokens_to_ids(t)]) for t in ("12", "+5", "123", "7", "<eos>")
    } == {
        "12": "1",
        "+5": "+",
        "123": "1",
        "7": "7",
        "<eos>": "<eos>",
    }
    logits_11V = torch.randn(1, 1, len(teacher))
    cross = CrossTokenizerTeacher(None, tokenizer, teacher, 64, "prefix")
    projected_11W, _ = cross.student_vocabulary_logits(CompletionLogits.of(logits_11V))
    p_V = logits_11V[0, 0].softmax(-1)
    first = {i: teacher.convert_ids_to_tokens(i)[0] for i in range(len(teacher))}
    for char in "1+7":
        marginal = sum(float(p_V[i]) for i, c in first.items() if c == char and i >= len(SPECIALS))
        assert math.isclose(
            float(projected_11W[0, 0, tokenizer.convert_tokens_to_ids(char)].exp()), marginal, rel_tol=1e-5
        )
    assert math.isclose(float(projected_11W[0, 0].exp().sum()), 1.0, rel_tol=1e-4)


@pytest.mark.slow  # 22 s: decoding both real vocabularies, a 262k-wide student, SmolLM2's forwards
def test_one_step_from_the_real_smollm2_into_a_student_with_gemma3s_tokenizer(
    tiny_run, smollm2, gemma_tokenizer_dir, tmp_path
):
    """A fresh tiny student over Gemma 3's 262,144 ids (no chat template: plain-text prompts) distilled for
    two steps from the real SmolLM2-135M-Instruct (ChatML): the student's samples are arbitrary Unicode, and
    every span still lines up."""
    config = tiny_run(
        f"student.tokenizer={gemma_tokenizer_dir}",
        f"teacher.path={smollm2}",
        "objective.type=sampled_rkl",
        "rollout.max_new_tokens=16",
        "train.steps=2",
        "train.prompts_per_step=2",
        "train.diagnostics_every=1",
    )
    loop.run(config, show_progress=False)
    rows = _rows(tmp_path / "run")
    assert len(rows) == 2 and all(row["loss"] == row["loss"] for row in rows)
    assert all(row["align_tokens_per_span"] >= 1.0 for row in rows)
