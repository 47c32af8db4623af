"""Config and command-line fuzzing through the real ``opd`` entry point (docs/reliability.md): every leaf of
every shipped config under wrong types, empty, negative, zero, huge, NaN/inf, unicode, paths outside the run
directory, lists and maps, deleted, unknown and mistyped keys; and every option of ``eval``, ``generate``,
``report``, ``serve-teacher`` and ``demo`` under the same values. Each mutant must run, or end with one
``opd <command>: error: ...`` line: never a traceback, never a hang (a run or server still going at the
deadline counts only once it has visibly started). The default suite plays a seeded sample of 300; the slow
tier plays them all."""

from __future__ import annotations

import collections
import random
import shutil
from pathlib import Path

import pytest
import yaml
from fuzzing import ASSETS, Mutant, bounded, config_mutants, option_mutants, play

import opdistill.cli.app
import opdistill.cli.demo
import opdistill.observe.report
import opdistill.teachers.server
from opdistill.config import describe

TEACHER, STUDENT = str(ASSETS / "addition-teacher"), str(ASSETS / "addition-student")
DEADLINE = 120.0  # seconds: a mutant still going then, with nothing started, is a hang
SAMPLE = {"config": 220, "eval": 24, "generate": 24, "report": 12, "serve-teacher": 12, "demo": 8}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A directory with an exported task file and one finished run (what ``report`` mutants read)."""
    assert opdistill.cli.app and opdistill.cli.demo and opdistill.observe.report and opdistill.teachers.server
    describe()  # imported and cached here, so each forked mutant starts warm
    root = tmp_path_factory.mktemp("fuzz")
    (root / "addition.jsonl").write_text(
        '{"prompt": "12+34=", "answer": "46"}\n{"prompt": "50+21=", "answer": "71"}\n'
    )
    config = bounded(
        yaml.safe_load((ASSETS.parents[2] / "configs" / "distill_addition.yaml").read_text()), root
    )
    outcome = play(
        Mutant("base", ("distill", "--config", "config.yaml"), yaml.safe_dump(config)), root, DEADLINE
    )
    assert outcome.kind == "ran", outcome.stderr
    return root


def commands(work: Path) -> dict[str, list[str]]:
    """A base command line per subcommand that runs in seconds (``report`` reads the finished run)."""
    data, run = work / "addition.jsonl", work / "run"
    lines = {
        "eval": f"eval --model {STUDENT} --task addition --task-option digits=2 --limit 4 "
        "--max-new-tokens 24 --n 2 --k 1,2 --temperature 1.0 --seed 0 --show 1",
        "eval-data": f"eval --model {STUDENT} --data {data} --answer-regex \\d+ --limit 2",
        "generate": f"generate --model {TEACHER} --task addition --task-option digits=2 --split train "
        "--limit 2 --out gen.jsonl --n 1 --temperature 0.5 --top-p 0.9 --max-new-tokens 24 --require > "
        "--max-retries 1 --seed 0",
        "generate-data": f"generate --model {TEACHER} --data {data} --out gen.jsonl --max-new-tokens 24",
        "report": f"report {run} --out report",
        "serve-teacher": f"serve-teacher --model {TEACHER} --host 127.0.0.1 --port 0 --max-tokens 512 "
        "--max-batch-tokens 1024 --max-topk 8 --chunk-tokens 256 --dtype float32 --device cpu",
        "demo": "demo --out demo --budget-flops 3e9 --eval-n 4 --prompts 8 --seed 0",
    }
    return {name: line.split() for name, line in lines.items()}


def campaign(work: Path, sample: dict[str, int] | None, seed: int) -> collections.Counter[str]:
    """Play the mutants (a seeded sample of each kind, or all) and count their outcomes; fails listing every
    mutant that ended in a traceback, a hang or an unclear exit, with the end of its stderr."""
    rng = random.Random(seed)
    pools = {"config": config_mutants(rng, work)}
    for mutant in option_mutants(commands(work)):
        pools.setdefault(mutant.argv[0], []).append(mutant)
    if sample is not None:
        pools = {kind: rng.sample(pool, min(sample[kind], len(pool))) for kind, pool in pools.items()}
    counts: collections.Counter[str] = collections.Counter()
    failures = []
    for kind, pool in pools.items():
        for i, mutant in enumerate(pool):
            where = work / "mutants" / f"{kind}-{i}"
            outcome = play(mutant, where, DEADLINE)
            counts[outcome.kind] += 1
            if outcome.kind not in ("ran", "error", "running"):
                failures.append(f"{outcome.kind}: {mutant.name}: {outcome.stderr.strip()[-600:]}")
            shutil.rmtree(where, ignore_errors=True)
    counts["failures"] = len(failures)
    assert not failures, "\n\n".join(failures)
    return counts


def _report(tally, counts: collections.Counter[str]) -> None:
    mutants = sum(counts[kind] for kind in ("ran", "error", "running", "traceback", "hang", "unclear"))
    tally["fuzz_mutants"] += mutants
    tally["tracebacks"] += counts["traceback"]
    tally["hangs"] += counts["hang"]
    print(f"fuzz: {mutants} mutants: {dict(counts)}")


def test_fuzzed_configs_and_options_run_or_fail_in_one_sentence(work, tally):
    counts = campaign(work, SAMPLE, seed=0)
    _report(tally, counts)
    assert sum(SAMPLE.values()) <= counts["ran"] + counts["error"] + counts["running"]
    assert counts["ran"] and counts["error"]  # the campaign reaches both outcomes, not just the validation


@pytest.mark.slow
def test_every_mutant_runs_or_fails_in_one_sentence(work, tally):
    _report(tally, campaign(work, None, seed=1))
