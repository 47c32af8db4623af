"""torchrun with two CPU ranks (gloo): DDP and FSDP2 match one process on the same global batch, and a
checkpoint written by two ranks resumes on two ranks exactly. Real launcher, real process group; the FSDP2
runs score with a real `opd serve-teacher` server on loopback, the path of the GPU recipe in
docs/scaling.md."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from opdistill.config import ModelSpec, load_config
from opdistill.data.tasks import corpus_text, load_task
from opdistill.models import bpe_tokenizer, load_model, save_model, tiny_model
from opdistill.teachers.server import ScoringServer
from opdistill.training import loop

ASSETS = Path(__file__).resolve().parents[1] / "src" / "opdistill" / "assets"
CONFIG = {
    "student": {"path": str(ASSETS / "addition-student")},
    "teacher": {"path": str(ASSETS / "addition-teacher")},
    "data": {"task": "addition", "task_options": {"digits": 4}},
    # long enough that rows end at different steps: FSDP2 ranks must still run the same forwards
    "rollout": {"max_new_tokens": 64},
    # the teacher's top-K with a tail bucket (L1): what a remote teacher sends
    "objective": {"type": "topk_rkl", "topk": 8, "topk_support": "teacher", "topk_variant": "tail"},
    "optim": {"warmup_steps": 1},
    "train": {
        "steps": 4,
        "prompts_per_step": 8,
        "micro_batch_size": 2,
        "eval_every": 0,
        "eval_size": 8,
        "diagnostics_every": 2,
        "save_every": 2,
        "keep_checkpoints": 0,
        "threads": 1,
    },
}


def _torchrun(config_path: Path, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "opdistill.cli", "distill", "--config", str(config_path), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _weights(run: Path, where: str = "final") -> dict[str, torch.Tensor]:
    return load_file(run / where / "model.safetensors")


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(CONFIG))
    one = root / "one"
    loop.run(load_config(config_path, [f"train.out_dir={one}"]), show_progress=False)
    out = {"one": one, "ddp": root / "ddp", "fsdp": root / "fsdp", "config": config_path}
    _torchrun(config_path, f"train.out_dir={out['ddp']}")
    teacher, tokenizer = load_model(ModelSpec(path=CONFIG["teacher"]["path"]))
    with ScoringServer(teacher, tokenizer, port=0) as server:
        _torchrun(
            config_path, f"train.out_dir={out['fsdp']}", "train.parallel=fsdp", f"teacher.url={server.url}"
        )
        assert server.requests > 0
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_train_the_same_parameters_as_one_process(runs, parallel):
    one, two = _weights(runs["one"]), _weights(runs[parallel])
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=2e-5, rtol=1e-4, msg=name)
    assert not any(torch.equal(one[name], _weights(runs["one"], "checkpoints/step_2")[name]) for name in one)
    # rank 0 alone logs: one record per step, the step's global counts
    assert _losses(runs[parallel]) == pytest.approx(_losses(runs["one"]), rel=1e-4)
    records = [json.loads(line) for line in (runs[parallel] / "metrics.jsonl").read_text().splitlines()]
    singles = [json.loads(line) for line in (runs["one"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss_tokens"] for r in records] == [r["loss_tokens"] for r in singles]
    # Adam and clipping would hide a gradient off by the world size; the logged norm does not
    assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in singles], rel=1e-4)
    assert records[-1]["student_sampled_tokens"] == singles[-1]["student_sampled_tokens"]


def test_a_checkpoint_written_by_two_ranks_resumes_on_two_ranks_exactly(runs, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["fsdp"], resumed)
    shutil.rmtree(resumed / "final")
    (resumed / "checkpoints" / "latest").write_text("step_2")  # as if the run had stopped after step 2
    teacher, tokenizer = load_model(ModelSpec(path=CONFIG["teacher"]["path"]))
    with ScoringServer(teacher, tokenizer, port=0) as server:
        _torchrun(
            runs["config"],
            "--resume",
            f"train.out_dir={resumed}",
            "train.parallel=fsdp",
            f"teacher.url={server.url}",
        )
    straight, again = _weights(runs["fsdp"]), _weights(resumed)
    assert all(torch.equal(straight[name], again[name]) for name in straight)
    assert _losses(resumed) == _losses(runs["fsdp"])


def test_fsdp2_in_bf16_gathers_bf16_copies_and_keeps_fp32_weights(runs, tmp_path):
    """train.precision=bf16 under FSDP2 (MixedPrecisionPolicy: bf16 forwards, fp32 gradient reduction): the
    run trains, its weights stay fp32, and its losses track the fp32 run's."""
    out = tmp_path / "fsdp_bf16"
    _torchrun(
        runs["config"], f"train.out_dir={out}", "train.parallel=fsdp", "train.precision=bf16", "train.steps=2"
    )
    weights = _weights(out)
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert not all(
        torch.equal(weights[name], _weights(runs["one"], "checkpoints/step_2")[name]) for name in weights
    )
    assert _losses(out) == pytest.approx(_losses(runs["one"])[:2], rel=0.05)


def test_ddp_plays_episodes_on_every_rank(runs, tmp_path):
    """Multi-turn episodes under torchrun: each rank plays its share in its own environments, rank 0 logs
    the step's global counts (the environment's tokens never in the loss's)."""
    out = tmp_path / "episodes"
    _torchrun(
        runs["config"],
        f"train.out_dir={out}",
        "env.name=calculator",
        "objective.type=full_rkl",
        "rollout.max_new_tokens=12",
        "train.steps=2",
        "train.save_every=0",
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["turns"] >= 1 for r in records)
    previous = {"student_sampled_tokens": 0, "teacher_scored_tokens": 0}
    for record in records:  # the counters are the run's totals; a step adds its global counts
        sampled = record["student_sampled_tokens"] - previous["student_sampled_tokens"]
        scored = record["teacher_scored_tokens"] - previous["teacher_scored_tokens"]
        assert record["loss_tokens"] == sampled < scored
        previous = record


def test_two_ranks_distil_across_tokenizers_as_one_process(runs, tmp_path):
    """A teacher with another tokenizer (a BPE over the task's text) under torchrun: each rank re-tokenizes
    and aligns its own rows, and the two ranks train the same student as one process."""
    tokenizer = bpe_tokenizer(corpus_text(load_task(task="addition", seed=0), 500), merges=40)
    teacher = tmp_path / "bpe_teacher"
    save_model(tiny_model(ModelSpec(preset="d16l1"), tokenizer, seed=1), tokenizer, teacher)
    overrides = [
        f"teacher.path={teacher}",
        "objective.type=sampled_rkl",
        "rollout.max_new_tokens=12",
        "train.steps=2",
        "train.save_every=0",
        "train.diagnostics_every=0",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    loop.run(load_config(runs["config"], [*overrides, f"train.out_dir={one}"]), show_progress=False)
    _torchrun(runs["config"], *overrides, f"train.out_dir={two}")
    records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert all(r["align_tokens_per_span"] > 1.0 for r in records)
    single, double = _weights(one), _weights(two)
    for name in single:
        torch.testing.assert_close(double[name], single[name], atol=2e-5, rtol=1e-4, msg=name)
