"""Plots (PNG) and a self-contained HTML report of one or several runs, overlaid."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def _plot(runs: dict[str, Path], log: str, x: str, y: str, ylabel: str, out: Path) -> Path | None:
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    drawn = False
    for name, run_dir in runs.items():
        records = [r for r in read_jsonl(run_dir / log) if y in r]
        if records:
            ax.plot([r[x] for r in records], [r[y] for r in records], marker="o" if log == "eval.jsonl" else None,
                    markersize=3, label=name)  # fmt: skip
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel({"elapsed_s": "training time (s)", "step": "step"}[x])
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def write_report(
    runs: dict[str, Path], out_dir: Path, title: str = "opdistill report", table: str = ""
) -> Path:
    """Write ``out_dir/report.html`` (PNGs embedded) and ``out_dir/plots/*.png`` for the named runs."""
    plots = out_dir / "plots"
    figures = [
        ("Held-out accuracy vs training time", "eval.jsonl", "elapsed_s", "greedy_acc", "greedy accuracy"),
        (
            "Teacher KL (mean sampled reverse KL) vs step",
            "metrics.jsonl",
            "step",
            "teacher_kl",
            "teacher_kl (nats)",
        ),
        ("Training loss vs step", "metrics.jsonl", "step", "loss", "loss"),
    ]
    sections = []
    for caption, log, x, y, ylabel in figures:
        png = _plot(runs, log, x, y, ylabel, plots / f"{y}_vs_{x}.png")
        if png is not None:
            data = base64.b64encode(png.read_bytes()).decode()
            sections.append(
                f'<h2>{html.escape(caption)}</h2><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            )
    listing = "".join(f"<li><b>{html.escape(n)}</b>: {html.escape(str(p))}</li>" for n, p in runs.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:820px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
th:first-child,td:first-child{{text-align:left}}img{{max-width:100%}}</style></head><body>
<h1>{html.escape(title)}</h1>{table}<h2>Runs</h2><ul>{listing}</ul>{"".join(sections)}</body></html>"""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.html"
    path.write_text(page)
    return path
