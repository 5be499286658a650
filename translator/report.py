"""Reporting for `translator.compare`: the markdown tables, the plots (matplotlib, imported when drawing), report.json.

    write_report(report, "docs/compare")  # report.md, report.json, *.png
    print(markdown_table(report))
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from translator.compare import Report
from translator.training_log import TrainingLog


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


# (key, header, formatter); training columns only when some checkpoint has them, significance only when computed
_COLUMNS = [
    ("model", "model", str),
    ("testset", "test set", str),
    ("parameters", "params", _count),
    ("non_embedding_parameters", "non-emb params", _count),
    ("steps", "steps", str),
    ("bleu", "BLEU", lambda v: f"{v:.2f}"),
    ("bleu_bs", "ΔBLEU [95% CI] (p)", None),
    ("chrf", "chrF", lambda v: f"{v:.2f}"),
    ("chrf_bs", "ΔchrF [95% CI] (p)", None),
    ("ppl", "PPL", lambda v: f"{v:.2f}"),
    ("sent_per_s", "decode sent/s", lambda v: f"{v:.1f}"),
    ("train_tok_per_s", "train tok/s", lambda v: f"{v:,.0f}"),
    ("train_wall_s", "train time", lambda v: f"{v / 3600:.2f} h" if v >= 3600 else f"{v / 60:.1f} min"),
]


def _format_paired(p: dict[str, Any]) -> str:
    if p.get("delta") is None:
        return "baseline"
    lo, hi = p["delta_ci"]
    return f"{p['delta']:+.2f} [{lo:+.2f}, {hi:+.2f}] (p={p['p_value']:.3f})"


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The keys of `_COLUMNS` that some row has a value for (so missing logs drop their columns)."""
    return [key for key, _, _ in _COLUMNS if any(r.get(key) is not None for r in rows)]


def markdown_table(report: Report) -> str:
    columns = table_columns(report.rows)
    spec = {key: (header, fmt) for key, header, fmt in _COLUMNS}
    lines = ["| " + " | ".join(spec[c][0] for c in columns) + " |",
             "|" + "|".join("---" if c in ("model", "testset") else "---:" for c in columns) + "|"]
    for r in report.rows:
        cells = []
        for c in columns:
            v, fmt = r.get(c), spec[c][1]
            cells.append("–" if v is None else _format_paired(v) if fmt is None else fmt(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_curves(logs: dict[str, TrainingLog], path: str | Path, against: str = "step") -> bool:
    """Validation perplexity and BLEU (those logged) of each run, against step or wall time ("time"); False when
    there is nothing to draw."""
    metrics = [m for m in ("val/ppl", "val/bleu") if any(m in lg.curves for lg in logs.values())]
    runs = {n: lg for n, lg in logs.items() if against == "step" or lg.elapsed}
    if not metrics or not runs:
        return False
    fig = _figure(5.5 * len(metrics), 4)
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), k + 1)
        for name, lg in runs.items():
            points = lg.curves.get(metric)
            if not points:
                continue
            steps, values = zip(*points)
            xs = [t / 3600 for t in lg.seconds_at(list(steps))] if against == "time" else steps
            ax.plot(xs, values, marker=".", label=name)
        ax.set_xlabel("training wall time (h)" if against == "time" else "step")
        ax.set_ylabel(metric)
        if metric == "val/ppl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def plot_length_buckets(report: Report, testset: str, path: str | Path) -> None:
    """Grouped bars: BLEU per source-length bucket, one bar per checkpoint."""
    rows = [r for r in report.rows if r["testset"] == testset]
    buckets = rows[0]["bleu_by_length"]
    fig = _figure(max(6.0, 1.2 * len(buckets) * max(1, len(rows)) / 2), 4)
    ax = fig.add_subplot()
    width = 0.8 / len(rows)
    for k, r in enumerate(rows):
        xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(buckets))]
        ax.bar(xs, [b["bleu"] or 0.0 for b in r["bleu_by_length"]], width, label=r["model"])
    ax.set_xticks(range(len(buckets)), labels=[f"{b['bucket']}\n(n={b['sentences']})" for b in buckets])
    ax.set_xlabel("source length (words)")
    ax.set_ylabel("BLEU")
    ax.set_title(testset, fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def write_report(report: Report, out_dir: str | os.PathLike, command: str | None = None) -> list[Path]:
    """Write report.json, the plots and report.md (which embeds them) into `out_dir`; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves: list[tuple[str, Path]] = []
    if report.logs:
        for against in ("step", "time"):
            path = out / f"curves_{against}.png"
            if plot_curves(report.logs, path, against):
                curves.append(("training step" if against == "step" else "training wall time", path))
    buckets_png = {}
    for ts in report.testsets:
        buckets_png[ts["name"]] = out / f"bleu_by_length_{_slug(ts['name'])}.png"
        plot_length_buckets(report, ts["name"], buckets_png[ts["name"]])
    written = [p for _, p in curves] + list(buckets_png.values())

    data = {
        "command": command, "settings": report.settings, "signatures": report.signatures,
        "columns": table_columns(report.rows), "rows": report.rows, "checkpoints": report.checkpoints,
        "testsets": report.testsets, "examples": report.examples, "notes": report.notes,
        "training_logs": {n: asdict(lg) for n, lg in report.logs.items()},
    }
    text = json.dumps(data, indent=2, ensure_ascii=False, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    (out / "report.json").write_text(text + "\n", encoding="utf-8")
    written.append(out / "report.json")

    s = report.settings
    md = ["# Checkpoint comparison", ""]
    if command:
        md += ["```", command, "```", ""]
    md += [
        (f"{s['date']}; device {s['device']} ({s['device_name']}), torch {s['torch']}; beam {s['beam']}, "
         f"length penalty {s['length_penalty']}, {s['batch_tokens']} source tokens per batch; shared tokenizer of "
         f"{s['tokenizer_pieces']} pieces (sha256 {s['tokenizer_sha256'][:12]})."), "",
        "Test sets: " + "; ".join(f"{t['name']} ({t['sentences']} pairs, {t['where']})" for t in report.testsets), "",
        markdown_table(report),
        "PPL: exp of the mean cross-entropy over the reference target tokens (`y1 .. yn </s>`) under teacher forcing. "
        "decode sent/s: wall time of beam search over the whole test set. "
        + ("Δ: difference to the first checkpoint with the 95% interval of the paired bootstrap resamples and "
           f"sacreBLEU's paired-bootstrap p-value ({s['bootstrap']} resamples). " if "paired_bs" in report.signatures
           else "")
        + "train tok/s: median of the logged `train/tok_per_s` (source + target tokens).", "",
        "sacreBLEU signatures:", "",
        f"- BLEU `{report.signatures['BLEU']}`",
        f"- chrF `{report.signatures['chrF']}`",
    ]
    for metric, sig in report.signatures.get("paired_bs", {}).items():
        md.append(f"- paired bootstrap, {metric} `{sig}`")
    md.append("")
    for against, path in curves:
        md += [f"## Validation curves against {against}", "", f"![validation curves]({path.name})", ""]
    for ts in report.testsets:
        rows = [r for r in report.rows if r["testset"] == ts["name"]]
        buckets = [b["bucket"] for b in rows[0]["bleu_by_length"]]
        md += [f"## BLEU by source length ({ts['name']})", "",
               "| model | " + " | ".join(f"{b} (n={x['sentences']})" for b, x in zip(buckets, rows[0]["bleu_by_length"])) + " |",
               "|---|" + "---:|" * len(buckets)]
        for r in rows:
            md.append(f"| {r['model']} | " + " | ".join("–" if b["bleu"] is None else f"{b['bleu']:.1f}"
                                                       for b in r["bleu_by_length"]) + " |")
        md += ["", f"![BLEU by source length]({buckets_png[ts['name']].name})", ""]
        if report.examples.get(ts["name"]):
            names = [c["name"] for c in report.checkpoints]
            md += [f"## Example translations ({ts['name']})", "", "| | " + " | ".join(["source", "reference", *names]) + " |",
                   "|---|" + "---|" * (2 + len(names))]
            for i, ex in enumerate(report.examples[ts["name"]], 1):
                md.append(f"| {i} | " + " | ".join(_md_escape(ex[k]) for k in ["source", "reference", *names]) + " |")
            md.append("")
    if report.notes:
        md += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    written.append(out / "report.md")
    return written
