"""Resource faults (docs/reliability.md): a disk that fills during a checkpoint write (a writer failing with
ENOSPC, and a real file-size limit), an unwritable run directory, a teacher server that answers garbage, and
NaN/inf injected into losses and gradients. Each ends in a one-sentence error or a skipped step with an
alarm, and the last good checkpoint stays whole and resumable."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opdistill.cli.app import main
from opdistill.config import ModelSpec
from opdistill.errors import UserError
from opdistill.models import load_model
from opdistill.teachers.server import ScoringServer
from opdistill.training import checkpoint, loop, step

ASSETS = Path(__file__).resolve().parents[1] / "src" / "opdistill" / "assets"


def _rows(run_dir: Path, name: str) -> list[dict]:
    path = run_dir / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _intact(run_dir: Path, step_number: int) -> None:
    """``latest`` names ``step_N``, which loads, and no half-written checkpoint is left beside it."""
    latest = checkpoint.latest_checkpoint(run_dir)
    assert latest.name == f"step_{step_number}"
    load_model(ModelSpec(path=str(latest)))
    assert checkpoint.load_state(latest)["step"] == step_number
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))


def test_a_full_disk_during_a_checkpoint_keeps_the_last_one_and_resumes(tiny_run, monkeypatch, tally):
    config = tiny_run("train.steps=4", "train.save_every=1")
    real_save, calls = torch.save, []

    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the third checkpoint's trainer state
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(UserError, match="step_3 .No space left on device.; the checkpoints written before"):
        loop.run(config, show_progress=False)
    run_dir = Path(config.train.out_dir)
    _intact(run_dir, 2)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert loop.run(config, resume=True, show_progress=False)["steps"] == 4
    tally["faults_survived"] += 1


def test_a_file_size_limit_stops_the_run_in_one_sentence(tmp_path, tally):
    """A real OS fault: the kernel refuses writes past 100 kB (the weights are 136 kB), in a forked CLI."""
    argv = [
        "distill",
        f"student.path={ASSETS / 'addition-student'}",
        f"teacher.path={ASSETS / 'addition-teacher'}",
    ]
    argv += ["train.steps=2", "train.prompts_per_step=2", "train.eval_every=0", "train.eval_size=2"]
    argv += ["train.save_every=1", f"train.out_dir={tmp_path / 'run'}"]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            sys.stderr = os.fdopen(write, "w", buffering=1)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
            code = main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    stderr = os.fdopen(read).read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 2, stderr
    assert stderr.strip().splitlines()[-1].startswith("opd distill: error: cannot write ")
    assert "File too large" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()  # no checkpoint that loads wrongly
    tally["faults_survived"] += 1


@pytest.mark.parametrize("where", ["a file", "/proc"])
def test_an_unwritable_run_directory_is_one_sentence(tiny_run, tmp_path, where, tally):
    if where == "a file":
        (tmp_path / "a-file").write_text("")
        out = tmp_path / "a-file" / "run"
    else:
        out = Path("/proc/opd-run")
    with pytest.raises(UserError, match=f"cannot write the run directory {out}"):
        loop.run(tiny_run(f"train.out_dir={out}"), show_progress=False)
    tally["faults_survived"] += 1


GARBAGE = {
    "not JSON": b"<html>oops</html>",
    "a list": b"[1, 2]",
    "no sequences": b'{"result": 1}',
    "sequences not a list": b'{"sequences": 5}',
    "too few sequences": b'{"sequences": []}',
    "a sequence not an object": b'{"sequences": [1, 2]}',
    "missing fields": b'{"sequences": [{}, {}]}',
    "strings for numbers": None,  # built from a real answer below
    "too many positions": None,
    "ragged top-K rows": None,
    "top-K ids out of range": None,
}


def _corrupt(kind: str, answer: dict) -> bytes:
    seqs = answer["sequences"]
    if kind == "strings for numbers":
        seqs[0]["token_logprobs"] = ["x"] * len(seqs[0]["token_logprobs"])
    elif kind == "too many positions":
        seqs[0]["token_logprobs"] += [0.0] * 500
    elif kind == "ragged top-K rows":
        seqs[0]["topk_logprobs"][0] = seqs[0]["topk_logprobs"][0][:1]
    elif kind == "top-K ids out of range":
        seqs[0]["topk_ids"][0][0] = 10**6
    elif kind == "NaN":
        seqs[0]["topk_logprobs"] = [[float("nan")] * len(row) for row in seqs[0]["topk_logprobs"]]
    return json.dumps(answer).encode()


class GarbageTeacher:
    """A real HTTP server on loopback in front of a real teacher server: it passes ``/info`` and the first
    ``good`` answers of ``/score`` through, then corrupts every answer as ``kind`` says."""

    def __init__(self, upstream: ScoringServer, kind: str, good: int):
        outer = self
        self.calls = 0

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self._send(json.dumps(upstream.info).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                answer = upstream.submit(body)
                outer.calls += 1
                if outer.calls <= good:
                    self._send(json.dumps(answer).encode())
                else:
                    self._send(GARBAGE.get(kind) or _corrupt(kind, answer))

            def _send(self, payload: bytes):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def upstream():
    teacher, tokenizer = load_model(ModelSpec(path=str(ASSETS / "addition-teacher")))
    with ScoringServer(teacher, tokenizer, port=0) as server:
        yield server


def _remote_run(tiny_run, url: str, *overrides: str):
    return tiny_run(
        f"student.path={ASSETS / 'addition-student'}",
        f"teacher.url={url}",
        "teacher.retries=0",
        "objective.type=topk_rkl",
        "objective.topk=4",
        "objective.topk_support=teacher",
        "train.steps=4",
        "train.save_every=1",
        "train.keep_checkpoints=0",
        *overrides,
    )


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_a_teacher_answering_garbage_stops_in_one_sentence(tiny_run, upstream, kind, tally):
    garbage = GarbageTeacher(upstream, kind, good=2)  # steps 1 and 2 are scored well
    try:
        config = _remote_run(tiny_run, garbage.url)
        with pytest.raises(UserError, match=f"the teacher at {garbage.url} "):
            loop.run(config, show_progress=False)
    finally:
        garbage.close()
    _intact(Path(config.train.out_dir), 2)
    tally["faults_survived"] += 1


def test_a_teacher_sending_nan_skips_steps_with_an_alarm_then_stops(tiny_run, upstream, tally):
    garbage = GarbageTeacher(upstream, "NaN", good=2)
    try:
        config = _remote_run(tiny_run, garbage.url, "train.steps=8", "train.max_bad_steps=3")
        with pytest.raises(UserError, match="not finite for 3 steps in a row .steps 3-5, skipped"):
            loop.run(config, show_progress=False)
    finally:
        garbage.close()
    run_dir = Path(config.train.out_dir)
    assert [r["step"] for r in _rows(run_dir, "alarms.jsonl") if "not finite" in r["alarm"]] == [3]
    _intact(run_dir, 4)  # steps 3 and 4 were skipped: their checkpoints hold step 2's weights
    weights = [load_file(run_dir / "checkpoints" / f"step_{n}" / "model.safetensors") for n in (2, 4)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    tally["faults_survived"] += 3


class NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("fault", ["nan loss", "inf loss", "nan gradient"])
def test_a_non_finite_step_is_skipped_with_an_alarm(tiny_run, monkeypatch, fault, tally):
    real, calls = step.micro_batch_loss, []

    def injected(config, model, batch):
        loss_BT, metrics = real(config, model, batch)
        calls.append(1)
        if len(calls) == 2:  # step 2
            if fault == "nan gradient":
                return NanGradient.apply(loss_BT), metrics
            return loss_BT * float("nan" if fault == "nan loss" else "inf"), metrics
        return loss_BT, metrics

    monkeypatch.setattr(step, "micro_batch_loss", injected)
    config = tiny_run("train.steps=3", "train.save_every=1", "train.keep_checkpoints=0")
    loop.run(config, show_progress=False)
    run_dir = Path(config.train.out_dir)
    rows = _rows(run_dir, "metrics.jsonl")
    finite = [
        all(map(lambda v: v == v and abs(v) != float("inf"), (r["loss"], r["grad_norm"]))) for r in rows
    ]
    assert finite == [True, False, True]
    assert any(a["step"] == 2 and "not finite" in a["alarm"] for a in _rows(run_dir, "alarms.jsonl"))
    before, after = (load_file(run_dir / "checkpoints" / f"step_{n}" / "model.safetensors") for n in (1, 2))
    assert all(torch.equal(before[name], after[name]) for name in before)  # the update was skipped
    tally["faults_survived"] += 1
