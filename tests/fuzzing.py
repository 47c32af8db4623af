"""The machinery of the CLI fuzz campaigns (test_fuzz_cli.py): mutants of the shipped configs and of each
subcommand's options, and a runner that plays one through the real ``opd`` entry point in a forked child
(the parent's imports are reused, so a mutant costs milliseconds unless it trains), under a deadline and a
memory limit, and sorts what came out."""

from __future__ import annotations

import copy
import os
import random
import re
import resource
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "opdistill" / "assets"
SHIPPED = sorted((ROOT / "configs").glob("*.yaml")) + [ROOT / "src" / "opdistill" / "recipes" / "demo.yaml"]
MEMORY_LIMIT = 8 << 30  # address space of one mutant: an absurd size fails inside it, not the machine
TRACEBACK = 99  # the child's exit code when an exception escaped the CLI

# Values a mutated leaf takes: wrong types, empty, negative, zero, huge, NaN/inf, unicode, a path outside the
# run directory, a list or a map where a scalar belongs, null, a bool, a fraction.
VALUES: dict[str, Any] = {
    "text": "abc",
    "empty": "",
    "negative": -1,
    "zero": 0,
    "huge": 10**12,
    "huge_float": 1e300,
    "nan": float("nan"),
    "inf": float("inf"),
    "nan_text": "nan",
    "inf_text": "-inf",
    "unicode": "Ωmega ✓ \u202e",
    "outside": "../../outside/x",
    "list": [1, 2],
    "map": {"a": 1},
    "null": None,
    "bool": True,
    "fraction": 0.5,
}
KEY_FAULTS = ("deleted", "unknown", "mistyped", "unknown_section")


@dataclass(frozen=True)
class Mutant:
    """One command line to play: ``argv`` for ``opd``, the config text it reads (if any), and a name saying
    what was changed."""

    name: str
    argv: tuple[str, ...]
    config: str = ""


@dataclass
class Outcome:
    """How a mutant ended: ``code`` (None when killed at the deadline), its stderr, and whether it had
    visibly started (its run directory, server or output) by then."""

    code: int | None
    stderr: str
    seconds: float
    started: bool

    @property
    def kind(self) -> str:
        if self.code == TRACEBACK or "Traceback (most recent call last)" in self.stderr:
            return "traceback"
        if self.code is None:
            return "running" if self.started else "hang"
        if self.code == 0:
            return "ran"
        if self.code == 2 and one_sentence_error(self.stderr):
            return "error"
        return "unclear"


def one_sentence_error(stderr: str) -> bool:
    """The last line is ``opd <command>: error: <message>`` (ours, or argparse's usage error)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    return bool(lines) and re.match(r"^(opd|opd [\w-]+): error: \S", lines[-1]) is not None


def leaves(tree: dict, prefix: str = "") -> Iterator[str]:
    """Dotted keys of the scalar (and list) leaves of a YAML mapping."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def _delete(tree: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for name in parents:
        tree = tree[name]
    tree.pop(leaf, None)


def bounded(raw: dict, work: Path) -> dict:
    """A shipped config made to run in seconds on the shipped tiny models: one step of two prompts of at most
    16 new tokens, small evaluations and pools, the run directory relative (each mutant runs in a directory
    of its own); a model or data file that is not on this machine replaced by the shipped assets or
    ``work/addition.jsonl``."""
    tree = copy.deepcopy(raw)
    specs = [tree.get("student") or {}, tree.get("teacher") or {}, *(tree.get("teachers") or {}).values()]
    assets = ["addition-student", "addition-teacher"] + ["addition-student"] * (len(specs) - 2)
    for spec, asset in zip(specs, assets, strict=True):
        if spec.get("path"):
            spec["path"] = str(ROOT / spec["path"] if (ROOT / spec["path"]).exists() else ASSETS / asset)
        if spec.get("url"):
            spec.update(retries=0, timeout_s=2.0)  # nothing listens there: the error comes at once
    data = tree.get("data") or {}
    for key in ("train_file", "eval_file"):
        if data.get(key):
            data[key] = str(ROOT / data[key] if (ROOT / data[key]).exists() else work / "addition.jsonl")
    if "pool_size" in data:
        data["pool_size"] = 8
    train = {
        "steps": 1,
        "prompts_per_step": 2,
        "eval_size": 2,
        "eval_every": 0,
        "threads": 1,
        "out_dir": "run",  # under the mutant's own directory
    }
    tree["train"] = {**(tree.get("train") or {}), **train}
    rollout = tree.get("rollout") or {}
    if rollout.get("max_new_tokens", 0) > 16:
        tree["rollout"] = {**rollout, "max_new_tokens": 16}
    if "cold_start" in tree:
        tree["cold_start"].update(samples=4, steps=1, prompts_per_step=2)
    return tree


def config_mutants(rng: random.Random, work: Path) -> list[Mutant]:
    """Every leaf of every shipped config under every value and key fault, as a YAML file or as a
    ``section.field=value`` override (chosen at random): mutants of ``opd sft`` / ``opd distill``."""
    mutants = []
    for path in SHIPPED:
        raw = yaml.safe_load(path.read_text())
        command = "sft" if (raw.get("objective") or {}).get("type") == "sft" else "distill"
        base = bounded(raw, work)
        for key in leaves(raw):
            for fault in [*VALUES, *KEY_FAULTS]:
                tree, extra = copy.deepcopy(base), []
                as_override = fault in VALUES and rng.random() < 0.5
                if fault == "deleted":
                    _delete(tree, key)
                elif fault == "unknown":
                    _set(tree, key.rsplit(".", 1)[0] + ".no_such_key", 1)
                elif fault == "mistyped":
                    leaf = key.rsplit(".", 1)
                    typo = leaf[-1][:-1] or "x"
                    _set(tree, ".".join([*leaf[:-1], typo]), 1)
                elif fault == "unknown_section":
                    tree["no_such_section"] = {"x": 1}
                elif as_override:
                    extra = [f"{key}={_override_text(VALUES[fault])}"]
                else:
                    _set(tree, key, VALUES[fault])
                name = f"{path.stem}:{key}:{fault}{':override' if as_override else ''}"
                argv = (command, "--config", "config.yaml", *extra)
                mutants.append(Mutant(name, argv, yaml.safe_dump(tree)))
    return mutants


def _override_text(value: Any) -> str:
    if isinstance(value, float) and value != value:
        return ".nan"
    if value == float("inf"):
        return ".inf"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")


def option_mutants(commands: dict[str, list[str]]) -> list[Mutant]:
    """Each option of each base command line given every value fault as text, dropped (with its value), or
    joined by an unknown option."""
    mutants = []
    for name, argv in commands.items():
        options = [i for i, arg in enumerate(argv) if arg.startswith("--")]
        positionals = [
            i for i in range(1, len(argv)) if not argv[i].startswith("--") and i - 1 not in options
        ]
        for i in options + positionals:
            value_at = i + 1 if i in options else i
            for fault, value in VALUES.items():
                changed = list(argv)
                changed[value_at] = _override_text(value) if not isinstance(value, str) else value
                mutants.append(Mutant(f"{name}:{argv[i]}:{fault}", tuple(changed)))
            if i in options:
                dropped = argv[:i] + argv[i + 2 :]
                mutants.append(Mutant(f"{name}:{argv[i]}:deleted", tuple(dropped)))
        mutants.append(Mutant(f"{name}:unknown_option", (*argv, "--no-such-option", "1")))
    return mutants


def started(work: Path) -> bool:
    """The mutant visibly got going: a run (or its cold start) logged a step, a progress bar moved
    (``opd generate``'s), or the teacher server is listening."""
    out, err = work / "stdout.txt", work / "stderr.txt"
    serving = out.exists() and "Ctrl-C stops" in out.read_text(errors="replace")
    text = err.read_text(errors="replace") if err.exists() else ""
    moving = re.search(r" step (?:[1-9]\d*/\d+|\d+/\d+ .*retry [1-9])", text)  # steps or redraws counted
    return serving or bool(moving) or any(work.rglob("*metrics.jsonl"))


def play(mutant: Mutant, work: Path, deadline: float, patience: float = 8.0) -> Outcome:
    """Run ``opd *mutant.argv`` in a forked child with ``work`` as its directory. It is killed at ``deadline``
    seconds, or once it has visibly started and run ``patience`` seconds (a config asking for 10^12 steps
    trains until stopped), or at once when it is serving (``serve-teacher`` runs until stopped)."""
    work.mkdir(parents=True, exist_ok=True)
    if mutant.config:
        (work / "config.yaml").write_text(mutant.config)
    err_path = work / "stderr.txt"
    begin = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        _child(mutant.argv, work, err_path)
    code: int | None = None
    wait = 0.0 if mutant.argv[0] == "serve-teacher" else patience
    while (elapsed := time.perf_counter() - begin) < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            break
        if elapsed > wait and started(work):
            break
        time.sleep(0.01)
    if code is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    stderr = err_path.read_text(errors="replace")
    return Outcome(code, stderr, time.perf_counter() - begin, started(work))


def _child(argv: tuple[str, ...], work: Path, err_path: Path) -> None:
    code = TRACEBACK
    try:
        os.chdir(work)
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        out = os.open(work / "stdout.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from opdistill.cli.app import main

        try:
            code = main(list(argv))
        except SystemExit as exit_:  # argparse: usage errors exit 2, --help exits 0
            code = exit_.code if isinstance(exit_.code, int) else 2
    except BaseException:
        traceback.print_exc()
        code = TRACEBACK
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
