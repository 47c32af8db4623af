"""What the science experiments share: runs from the shipped addition assets, their curves in FLOPs, the
report header (command, commit, machine) and the plot setup. Each experiment is one script beside this file
(docs/science.md); `--smoke` runs its machinery at a tiny size (tests/test_science.py)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from opdistill.cli.demo import asset_dir
from opdistill.config import Config, ModelSpec, load_config
from opdistill.data.tasks import task_from_config
from opdistill.models import load_model
from opdistill.observe.evaluate import evaluate
from opdistill.training import loop

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "src" / "opdistill" / "recipes" / "demo.yaml"
THREADS = 2
OPD_STEP_FLOPS = (
    (8 * 33_504 + 2 * 133_008) * 64 * 53
)  # one OPD step of the shipped pair: 64 rows of 53 tokens


def parser(doc: str | None, name: str, smoke: str = "tiny: a few steps each") -> argparse.ArgumentParser:
    """The options every experiment takes (--seed, --out, --report, --override, --smoke). ``name`` is its
    script's: for s2_diversity the runs go to runs/science/s2 and the report to
    benchmarks/science/s2_diversity.md."""
    options = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_argument("--seed", type=int, default=0)
    options.add_argument(
        "--out",
        type=Path,
        default=Path("runs/science") / name.split("_")[0],
        help="the run directories; finished runs there are reused",
    )
    options.add_argument(
        "--report",
        type=Path,
        default=REPO / "benchmarks" / "science" / name,
        help="the Markdown report (REPORT.md) and its plot (REPORT.png)",
    )
    options.add_argument("--override", nargs="*", default=[], help="extra config overrides for every run")
    options.add_argument("--smoke", action="store_true", help=smoke)
    return options


def budget(flops: float, evals: int, step_flops: float = OPD_STEP_FLOPS) -> list[str]:
    """Overrides that stop a run at ``flops`` and evaluate it about ``evals`` times on the way, for a method
    whose step costs about ``step_flops``."""
    return [f"train.budget_flops={flops}", f"train.eval_every={max(1, round(flops / step_flops / evals))}"]


def assets() -> list[str]:
    """Overrides naming the shipped 34k-parameter student warm start and 133k-parameter teacher."""
    return [f"student.path={asset_dir('addition-student')}", f"teacher.path={asset_dir('addition-teacher')}"]


def config(out: Path, overrides: Sequence[str], base: Path = RECIPE) -> Config:
    """``base`` (the demo's recipe by default) with the shipped models, quiet logging and ``overrides``."""
    return load_config(
        base,
        [
            *assets(),
            "train.diagnostics_every=0",
            "train.save_every=0",
            f"train.threads={THREADS}",
            *overrides,
            f"train.out_dir={out}",
        ],
    )


@dataclass
class Run:
    name: str
    out: Path
    result: dict  # loop.run's summary, plus wall_s
    metrics: list[dict] = field(default_factory=list)  # metrics.jsonl
    evals: list[dict] = field(default_factory=list)  # eval.jsonl, each with the FLOPs spent by its step

    def final(self, key: str = "greedy_acc") -> float:
        return self.evals[-1][key]

    def best(self, key: str = "greedy_acc") -> float:
        return max(e[key] for e in self.evals)

    def first_reach(self, target: float, key: str = "greedy_acc") -> dict | None:
        """The first evaluation after step 0 at or above ``target``."""
        return next((e for e in self.evals if e["step"] > 0 and e[key] >= target), None)


def train(name: str, cfg: Config, show_progress: bool = False) -> Run:
    """Run ``cfg`` unless its run directory already holds a finished run (result.json), and read its logs."""
    out = Path(cfg.train.out_dir)
    done = out / "result.json"
    if not done.is_file():
        if out.exists():
            sys.exit(f"{out} holds an unfinished run: remove it or choose another --out.")
        started = time.perf_counter()
        result = loop.run(cfg, show_progress=show_progress)
        keep = ("steps", "elapsed_s", "final_eval", *loop.COUNTERS)
        result = {k: result[k] for k in keep} | {"wall_s": time.perf_counter() - started}
        done.write_text(json.dumps(result, indent=2))
    metrics = read_jsonl(out / "metrics.jsonl")
    by_step = {0: {"student_flops": 0.0, "teacher_flops": 0.0, "flops": 0.0}} | {
        m["step"]: m for m in metrics
    }
    evals = [
        e | {k: by_step[e["step"]].get(k, 0.0) for k in ("student_flops", "teacher_flops", "flops")}
        for e in read_jsonl(out / "eval.jsonl")
    ]
    return Run(name, out, json.loads(done.read_text()), metrics, evals)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def accuracy(model_dir: Path | str, cfg: Config, size: int, **options) -> dict:
    """Greedy (and, with ``samples``, sampled) accuracy of a model on the first ``size`` held-out problems of
    ``cfg``'s task."""
    model, tokenizer = load_model(ModelSpec(path=str(model_dir)))
    task = task_from_config(cfg.data, cfg.train.seed)
    return evaluate(
        model, tokenizer, task.test[:size], task.verify, max_new_tokens=cfg.rollout.max_new_tokens, **options
    )


def header(title: str, started: float) -> list[str]:
    """The report's first lines: the command, when, at which commit, on what machine, how long."""
    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return [
        f"# {title}",
        "",
        f"`{command}` at commit {commit or 'unknown'}{' (with local changes)' if dirty else ''}, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {(time.perf_counter() - started) / 60:.1f} min; "
        f"{machine()}; load average {os.getloadavg()[0]:.1f} at the end.",
        "",
    ]


def machine() -> str:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        cpu = models[0] if models else cpu
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {THREADS} threads"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish(fig, axes, xlabel: str, path: Path) -> None:
    """Every panel's x label, grid and legend, then the figure saved at ``path``."""
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(report: Path, title: str, started: float, summary: str, table: list[str]) -> None:
    """The Markdown report (header, ``summary``, ``table``, the PNG beside it); the table also to stdout."""
    report.parent.mkdir(parents=True, exist_ok=True)
    png = report.with_suffix(".png").name
    lines = [*header(title, started), summary, "", *table, "", f"![{title.split(':')[0]}]({png})"]
    report.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(table))
    print(f"wrote {report.with_suffix('.md')} and {report.with_suffix('.png')}")
