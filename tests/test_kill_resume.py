"""Kill anywhere (docs/reliability.md): a run killed with SIGKILL during a step, a checkpoint write (before
the state file, mid-way through the weights file, before the rename), an evaluation, a log line or the final
model's write, or at a random moment, then resumed with ``--resume`` (and killed again, and resumed), ends
with the weights, optimizer state and logs of a run never interrupted, bit for bit. After every kill, every
checkpoint on disk loads and ``latest`` names a whole one."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
import transformers.modeling_utils as modeling
from safetensors.torch import load_file

from opdistill.config import ModelSpec, load_config
from opdistill.models import load_model
from opdistill.observe import runlog
from opdistill.training import checkpoint, loop

ASSETS = Path(__file__).resolve().parents[1] / "src" / "opdistill" / "assets"
TIMING = {"step_s", "tokens_per_s", "elapsed_s", "eval_s"}
KILLED = -signal.SIGKILL


def _config(run_dir: Path):
    return load_config(
        None,
        [
            f"student.path={ASSETS / 'addition-student'}",
            f"teacher.path={ASSETS / 'addition-teacher'}",
            "train.steps=6",
            "train.prompts_per_step=4",
            "train.eval_every=2",
            "train.eval_size=4",
            "train.save_every=1",
            "train.keep_checkpoints=2",
            "train.diagnostics_every=2",
            "train.threads=1",
            f"train.out_dir={run_dir}",
        ],
    )


def _arm(point: str, n: int) -> None:
    """In the child: SIGKILL this process at the ``n``-th pass through ``point``."""
    calls = [0]

    def due() -> bool:
        calls[0] += 1
        return calls[0] == n

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def before(module, name):  # killed on entering the function
        original = getattr(module, name)
        setattr(module, name, lambda *a, **k: die() if due() else original(*a, **k))

    if point == "step":
        before(loop, "train_step")
    elif point == "eval":
        before(loop, "evaluate")
    elif point == "state_file":  # the checkpoint's weights are written, its trainer state not yet
        before(checkpoint.torch, "save")
    elif point == "rename":  # a checkpoint (or the latest pointer, or a cut log) complete but not in place
        before(checkpoint.os, "replace")
    elif point == "final":  # the final model's directory, on entering its write
        before(loop, "save_model")
    elif point == "weights_file":  # half a safetensors file on disk
        original = modeling.safe_save_file  # pyright: ignore[reportPrivateImportUsage] (save_pretrained's)

        def torn(tensors, filename, *args, **kwargs):
            original(tensors, filename, *args, **kwargs)
            if due():
                with open(filename, "r+b") as handle:
                    handle.truncate(os.path.getsize(filename) // 2)
                die()

        modeling.safe_save_file = torn  # pyright: ignore[reportPrivateImportUsage]
    elif point == "log_line":  # half a JSON line in metrics.jsonl / eval.jsonl
        original_write = runlog.Log.write

        def torn_write(self, name, record):
            if due():
                with (self.run_dir / f"{name}.jsonl").open("a") as handle:
                    handle.write(json.dumps(record)[:25])
                die()
            original_write(self, name, record)

        runlog.Log.write = torn_write
    else:
        raise ValueError(point)


def _play(run_dir: Path, resume: bool, point: str = "", n: int = 0, after_s: float = 0.0) -> int:
    """Run (or resume) in a forked child, killed at ``point``'s ``n``-th pass or after ``after_s`` seconds;
    returns its exit code (``KILLED`` when killed)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            if point:
                _arm(point, n)
            loop.run(_config(run_dir), resume=resume, show_progress=False)
            code = 0
        except BaseException as err:
            os.write(1, f"child failed: {err!r}\n".encode())
        finally:
            os._exit(code)
    deadline = time.perf_counter() + (after_s or 3600.0)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.perf_counter() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)


def _logs(run_dir: Path) -> dict[str, list[dict]]:
    logs = {}
    for name in loop.LOGS:
        path = run_dir / name
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        logs[name] = [
            {k: v for k, v in r.items() if k not in TIMING and not k.startswith("time_")} for r in rows
        ]
    return logs


def _final(run_dir: Path) -> tuple[dict, dict, dict]:
    """(weights of final/, optimizer state and step of the last checkpoint, the logs)."""
    weights = load_file(run_dir / "final" / "model.safetensors")
    saved = checkpoint.load_state(checkpoint.latest_checkpoint(run_dir))
    return weights, {"step": saved["step"], "optimizer": saved["optimizer"]}, _logs(run_dir)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _checkpoints_load(run_dir: Path) -> None:
    """Every checkpoint on disk is whole, and ``latest`` (if any) names one."""
    root = run_dir / "checkpoints"
    for path in sorted(root.glob("step_*")) if root.exists() else []:
        load_model(ModelSpec(path=str(path)))
        assert checkpoint.load_state(path)["step"] == int(path.name.removeprefix("step_"))
    if (root / "latest").exists():
        checkpoint.latest_checkpoint(run_dir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[tuple[dict, dict, dict], float]:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    started = time.perf_counter()
    assert _play(run_dir, resume=False) == 0
    return _final(run_dir), time.perf_counter() - started


def _survives(run_dir: Path, reference, kills: list[tuple[str, int, float]]) -> int:
    """Kill the run at each of ``kills`` in turn (resuming after each), then let it finish; returns how many
    kills landed, after asserting the result equals ``reference``."""
    landed = 0
    for i, (point, n, after_s) in enumerate(kills):
        code = _play(run_dir, resume=i > 0, point=point, n=n, after_s=after_s)
        assert code in (0, KILLED), f"kill at {point or f'{after_s:.2f} s'}: exit {code}"
        if code == KILLED:
            landed += 1
            _checkpoints_load(run_dir)
    if not (run_dir / "final").exists() or landed:
        assert _play(run_dir, resume=True) == 0
    assert _same(_final(run_dir), reference)
    return landed


POINTS = [("step", 2), ("step", 5), ("eval", 2), ("state_file", 3), ("rename", 4), ("weights_file", 2),
          ("log_line", 3), ("log_line", 1), ("final", 1), ("rename", 13)]  # fmt: skip


def test_killed_at_each_kind_of_point_resumes_bit_identical(tmp_path, reference, tally):
    (expected, _), landed = reference, 0
    for i, (point, n) in enumerate(POINTS):
        landed += _survives(tmp_path / f"{point}-{n}-{i}", expected, [(point, n, 0.0)])
    tally["kill_points_survived"] += landed
    print(f"kill anywhere: {landed} kills landed and resumed bit-identical")
    assert landed == len(POINTS)


def test_killed_at_random_moments_resumes_bit_identical(tmp_path, reference, tally):
    (expected, seconds), rng = reference, random.Random(0)
    kills = [("", 0, rng.uniform(0.05, 0.4) * seconds)] * 3  # the reference's first fork runs slowest
    landed = _survives(tmp_path / "random", expected, kills)
    tally["kill_points_survived"] += landed
    assert landed >= 1  # the first lands well before a whole run's time


@pytest.mark.slow
def test_many_kills_resume_bit_identical(tmp_path, reference, tally):
    """The long campaign: 40 runs, each killed 1-4 times at random points and moments."""
    (expected, seconds), rng, landed = reference, random.Random(1), 0
    kinds = ["step", "eval", "state_file", "rename", "weights_file", "log_line", "final"]
    for i in range(40):
        kills = [
            (rng.choice(kinds), rng.randint(1, 8), 0.0)
            if rng.random() < 0.6
            else ("", 0, rng.uniform(0.05, 0.8) * seconds)
            for _ in range(rng.randint(1, 4))
        ]
        landed += _survives(tmp_path / f"run{i}", expected, kills)
    tally["kill_points_survived"] += landed
    print(f"kill anywhere (slow): {landed} kills landed and resumed bit-identical")
