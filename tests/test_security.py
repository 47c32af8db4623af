"""Security defaults (docs/reliability.md): loading a model never runs code from its directory (safetensors
only; ``auto_map`` code only with ``trust_remote_code``, which warns), and a run writes only inside its run
directory. The teacher server's loopback bind and request bound are in test_server_abuse.py."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from opdistill.cli.app import main
from opdistill.config import ModelSpec
from opdistill.errors import UserError
from opdistill.models import load_model

ASSETS = Path(__file__).resolve().parents[1] / "src" / "opdistill" / "assets"


class Payload:
    """Unpickling this touches ``marker``: what a hostile pickled checkpoint could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "model"
    shutil.copytree(ASSETS / "addition-student", path)
    return path


def test_pickled_weights_are_refused_unread(tmp_path, tally):
    path, marker = _model_dir(tmp_path), tmp_path / "ran"
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Payload(marker)}))
    with pytest.raises(UserError, match="holds no .safetensors weights"):
        load_model(ModelSpec(path=str(path)))
    assert not marker.exists()
    tally["security_checks"] += 1


def _remote_code(tmp_path: Path) -> tuple[Path, Path]:
    """A model directory whose config asks for its own Python code, which would leave a marker file."""
    path, marker = _model_dir(tmp_path), tmp_path / "ran"
    (path / "hostile.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig\nclass HostileConfig(LlamaConfig):\n    pass\n"
    )
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "hostile.HostileConfig"}
    (path / "config.json").write_text(json.dumps(config))
    return path, marker


def test_code_in_a_model_directory_runs_only_when_trusted(tmp_path, monkeypatch, capsys, tally):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    path, marker = _remote_code(tmp_path)
    load_model(ModelSpec(path=str(path)))  # untrusted: transformers' own Llama classes, the file unread
    assert not marker.exists()
    assert "trust_remote_code" not in capsys.readouterr().err
    with contextlib.suppress(UserError):  # the hostile class is no working model: its code ran, announced
        load_model(ModelSpec(path=str(path), trust_remote_code=True))
    assert marker.exists()
    assert "warning: trust_remote_code is on: Python code in" in capsys.readouterr().err
    tally["security_checks"] += 1


RUNS = {  # features that keep files of their own: teacher pools, prompt selection, curriculum, cold start
    "pool": ["sft", "data.completions=teacher_pool", "data.pool_size=4"],
    "selection": ["distill", "data.pool_size=8", "data.select_fraction=0.5", "data.select_topk=2"],
    "curriculum": ["distill", "data.curriculum=true", "data.pool_size=4", "data.curriculum_samples=1"],
    "cold_start": ["distill", "cold_start.samples=2", "cold_start.steps=1", "cold_start.prompts_per_step=2"],
}


@pytest.mark.parametrize("name", list(RUNS))
def test_a_run_writes_only_inside_its_run_directory(tmp_path, name, tally):
    """A forked ``opd`` run with an empty working directory and HOME: afterwards, every file in either is
    under the run directory."""
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    command, *options = RUNS[name]
    argv = [
        command,
        f"student.path={ASSETS / 'addition-student'}",
        f"teacher.path={ASSETS / 'addition-teacher'}",
    ]
    argv += ["train.steps=2", "train.prompts_per_step=2", "train.eval_size=2", "train.out_dir=run", *options]
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.chdir(cwd)
            os.environ["HOME"] = str(home)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
            code = main(argv)
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    written = [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(p.parts[:2] == ("cwd", "run") for p in written), written
    tally["security_checks"] += 1
