"""A self-contained HTML report (PNG plots embedded, opens offline) of one or several runs, overlaid.

It answers three questions without reading a log: did the student close the gap (accuracy, pass@k), did
diversity collapse (entropy and high-entropy-token rate of student vs teacher, alarms), and where along
the response the teacher's signal degrades (the per-position KL heat map, top-k overlap).
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from opdistill.config import Config, to_dict  # noqa: E402

XLABELS = {"elapsed_s": "training time (s)", "step": "step"}
# (heading, [(log, x, y, label suffix, line style)], y label) — one figure each, every run overlaid
LINE_FIGURES = [
    ("Held-out greedy accuracy", [("eval.jsonl", "elapsed_s", "greedy_acc", "", "-o")], "greedy accuracy"),
    ("Teacher KL (mean sampled reverse KL)", [("metrics.jsonl", "step", "teacher_kl", "", "-")], "nats"),
    ("Training loss", [("metrics.jsonl", "step", "loss", "", "-")], "loss"),
    (
        "High-entropy-token rate (> 0.8 nats): student vs teacher at the student's states",
        [
            ("metrics.jsonl", "step", "student_high_entropy_rate", " student", "-o"),
            ("metrics.jsonl", "step", "teacher_high_entropy_rate", " teacher", "--s"),
        ],
        "share of tokens",
    ),
    ("Student token entropy on its own rollouts", [("metrics.jsonl", "step", "entropy", "", "-")], "nats"),
    (
        "Top-k overlap and the mass each model puts on it",
        [
            ("metrics.jsonl", "step", "overlap", " overlap", "-o"),
            ("metrics.jsonl", "step", "overlap_mass_student", " student mass", "--"),
            ("metrics.jsonl", "step", "overlap_mass_teacher", " teacher mass", ":"),
        ],
        "share",
    ),
    ("Response length", [("metrics.jsonl", "step", "response_length", "", "-")], "tokens"),
    (
        "Truncation rate (responses that hit the length cap)",
        [("metrics.jsonl", "step", "truncation_rate", "", "-")],
        "share of responses",
    ),
]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def _embed(fig, path: Path, alt: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    encoded = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _lines(runs: dict[str, Path], series: list, ylabel: str, path: Path, alt: str) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=110)
    drawn = False
    for index, (name, run_dir) in enumerate(runs.items()):
        color = f"C{index}"
        for log, x, y, suffix, style in series:
            records = [r for r in read_jsonl(run_dir / log) if isinstance(r.get(y), int | float)]
            if records:
                ax.plot(
                    [r[x] for r in records],
                    [r[y] for r in records],
                    style,
                    color=color,
                    markersize=3,
                    label=name + suffix,
                )
                drawn = True
    if not drawn:
        plt.close(fig)
        return ""
    ax.set_xlabel(XLABELS[series[0][1]])
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _embed(fig, path, alt)


def _heat_map(name: str, run_dir: Path, path: Path) -> str:
    """Per-position sampled reverse KL (by decile of each response's length) at every diagnostics step."""
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "kl_by_position" in r]
    if not rows:
        return ""
    grid = [[math.nan if v is None else v for v in r["kl_by_position"]] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 2.8), dpi=110)
    image = ax.imshow(
        grid,
        aspect="auto",
        cmap="magma",
        origin="lower",
        extent=(0, 100, rows[0]["step"], rows[-1]["step"] + 1),
    )
    fig.colorbar(image, ax=ax, label="nats")
    ax.set_xlabel("position in the response (% of its length)")
    ax.set_ylabel("step")
    ax.set_title(name, fontsize=9)
    return _embed(fig, path, f"per-position KL of {name}")


def _pass_at_k_curve(runs: dict[str, Path], path: Path) -> str:
    """pass@k against k at each run's last evaluation that sampled (math.md §13.2): a curve that rises
    less over k than another run's has less diversity to offer, whatever its pass@1."""
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=110)
    drawn = False
    for name, run_dir in runs.items():
        sampled = [r for r in read_jsonl(run_dir / "eval.jsonl") if any(k.startswith("pass@") for k in r)]
        if sampled:
            ks = sorted(int(k[5:]) for k in sampled[-1] if k.startswith("pass@"))
            ax.plot(
                ks,
                [sampled[-1][f"pass@{k}"] for k in ks],
                "-o",
                markersize=3,
                label=f"{name} (step {sampled[-1]['step']})",
            )
            drawn = True
    if not drawn:
        plt.close(fig)
        return ""
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("pass@k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return "<h3>pass@k at the last evaluation</h3>" + _embed(fig, path, "pass@k curve")


def _config_rows(runs: dict[str, Path]) -> str:
    """What each run changed from the defaults (objective, weighting, rollout, optimiser)."""
    defaults = to_dict(Config())
    body = []
    for name, run_dir in runs.items():
        path = run_dir / "config.yaml"
        config = yaml.safe_load(path.read_text()) if path.is_file() else {}
        changed = [
            f"{section}.{key}={value}"
            for section in ("objective", "weighting", "rollout", "optim", "data")
            for key, value in (config.get(section) or {}).items()
            if value != defaults[section].get(key) and key not in ("train_file", "eval_file")
        ]
        objective = (config.get("objective") or {}).get("type", "?")
        body.append(
            f"<tr><td>{html.escape(name)}</td><td>{html.escape(objective)}</td>"
            f"<td>{html.escape(', '.join(changed) or 'defaults')}</td></tr>"
        )
    return (
        "<table><tr><th>run</th><th>objective</th><th>settings changed from the defaults</th></tr>"
        + "".join(body)
        + "</table>"
    )


def _final_eval_rows(runs: dict[str, Path]) -> str:
    """The last evaluation of each run: accuracy, pass@k and diversity when sampled."""
    lasts = {name: (read_jsonl(d / "eval.jsonl") or [{}])[-1] for name, d in runs.items()}
    keys = sorted(
        {k for r in lasts.values() for k in r if k.startswith(("greedy", "avg@", "pass@", "distinct"))},
        key=lambda k: (not k.startswith("greedy"), len(k), k),
    )
    if not keys:
        return ""
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["run", "step", *keys])
    body = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{r.get('step', '')}</td>"
        + "".join(f"<td>{r[k]:.3f}</td>" if k in r else "<td></td>" for k in keys)
        + "</tr>"
        for n, r in lasts.items()
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _alarm_rows(runs: dict[str, Path]) -> str:
    rows = [(n, a) for n, d in runs.items() for a in read_jsonl(d / "alarms.jsonl")]
    if not rows:
        return "<p>No alarm tripped.</p>"
    body = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{a['step']}</td><td>{html.escape(a['alarm'])}</td></tr>"
        for n, a in rows
    )
    return f"<table><tr><th>run</th><th>step</th><th>alarm</th></tr>{body}</table>"


def write_report(
    runs: dict[str, Path], out_dir: Path, title: str = "opdistill report", table: str = ""
) -> Path:
    """Write ``out_dir/report.html`` (PNGs embedded) and ``out_dir/plots/*.png`` for the named runs."""
    plots = out_dir / "plots"
    figures = {
        heading: _lines(runs, series, ylabel, plots / f"{series[0][2]}.png", heading)
        for heading, series, ylabel in LINE_FIGURES
    }

    def section(heading: str) -> str:
        return f"<h3>{html.escape(heading)}</h3>{figures[heading]}" if figures[heading] else ""

    heat_maps = "".join(
        _heat_map(n, d, plots / f"kl_by_position_{i}.png") for i, (n, d) in enumerate(runs.items())
    )
    gap = "".join(
        section(h)
        for h in ("Held-out greedy accuracy", "Teacher KL (mean sampled reverse KL)", "Training loss")
    )
    diversity = "".join(section(h) for h, _, _ in LINE_FIGURES[3:5])
    signal = heat_maps + "".join(section(h) for h, _, _ in LINE_FIGURES[5:])
    pass_at_k = _pass_at_k_curve(runs, plots / "pass_at_k.png")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:860px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:0.5em 0}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
th:first-child,td:first-child,td:nth-child(3){{text-align:left}}img{{max-width:100%}}</style></head><body>
<h1>{html.escape(title)}</h1>{table}
<h2>Runs</h2>{_config_rows(runs)}
<h2>Did the student close the gap?</h2>{_final_eval_rows(runs)}{pass_at_k}{gap}
<h2>Did diversity collapse?</h2>{diversity or "<p>No diagnostics logged (train.diagnostics_every=0).</p>"}
<h2>Alarms</h2>{_alarm_rows(runs)}
<h2>Where does the teacher's signal degrade?</h2>
<p>Mean sampled reverse KL by position (decile of each response's length) at every diagnostics step: a bright
band that stays late in the response while the rest darkens is where the teacher's signal is left.</p>
{signal}</body></html>"""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.html"
    path.write_text(page)
    return path
