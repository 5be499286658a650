"""Reporting for `translator.compare`: the markdown tables, the plots (matplotlib, imported when drawing), report.json.

    write_report(report, "docs/compare")  # report.md, report.json, *.png
    print(markdown_table(report) + arm_table(report))

With seeds grouped into arms (`Report.arm_rows`), the arm table shows mean ± standard deviation over the seeds and
the significance of each arm against the first; the curves show each arm's mean with a min-max band over its seeds,
the BLEU-by-length bars the mean with ± sd error bars.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from translator.compare import Report
from translator.significance import ALPHA
from translator.training_log import TrainingLog, seed_band


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def _f2(v: float) -> str:
    return f"{v:.2f}"


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


# (key, header, formatter; None: a paired-bootstrap result); a column shows only when some row has a value (training
# columns only when some checkpoint has logs, significance only when computed); KEY_sd, when present, adds "± sd"
_COLUMNS = [
    ("model", "model", str),
    ("testset", "test set", str),
    ("parameters", "params", _count),
    ("non_embedding_parameters", "non-emb params", _count),
    ("steps", "steps", str),
    ("bleu", "BLEU", _f2),
    ("bleu_bs", "ΔBLEU [95% CI] (p)", None),
    ("chrf", "chrF", _f2),
    ("chrf_bs", "ΔchrF [95% CI] (p)", None),
    ("ppl", "PPL", _f2),
    ("sent_per_s", "decode sent/s", lambda v: f"{v:.1f}"),
    ("train_tok_per_s", "train tok/s", lambda v: f"{v:,.0f}"),
    ("train_wall_s", "train time", _duration),
]
_RUN_COLUMN = {key: (key, header, fmt) for key, header, fmt in _COLUMNS}
_ARM_COLUMNS = [
    ("arm", "arm", str), _RUN_COLUMN["testset"], ("seeds", "seeds", str), _RUN_COLUMN["parameters"],
    ("steps", "steps", lambda v: f"{v:.0f}"),
    *(_RUN_COLUMN[key] for key in ("bleu", "bleu_bs", "chrf", "chrf_bs", "ppl", "train_wall_s")),
]


def _format_paired(p: dict[str, Any]) -> str:
    if p.get("delta") is None:
        return "baseline"
    lo, hi = p["delta_ci"]
    return f"{p['delta']:+.2f} [{lo:+.2f}, {hi:+.2f}] (p={p['p_value']:.3f})"


def table_columns(rows: list[dict[str, Any]], spec: list = _COLUMNS) -> list[str]:
    """The keys of `spec` that some row has a value for (so missing logs drop their columns)."""
    return [key for key, _, _ in spec if any(r.get(key) is not None for r in rows)]


def _table(rows: list[dict[str, Any]], spec: list) -> str:
    columns = table_columns(rows, spec)
    header = {key: (title, fmt) for key, title, fmt in spec}
    lines = ["| " + " | ".join(header[c][0] for c in columns) + " |",
             "|" + "|".join("---" if c in ("model", "arm", "testset") else "---:" for c in columns) + "|"]
    for r in rows:
        cells = []
        for c in columns:
            v, fmt, sd = r.get(c), header[c][1], r.get(f"{c}_sd")
            cell = "–" if v is None else _format_paired(v) if fmt is None else fmt(v)
            cells.append(cell if v is None or sd is None else f"{cell} ± {fmt(sd)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_table(report: Report) -> str:
    """One row per checkpoint and test set."""
    return _table(report.rows, _COLUMNS)


def arm_table(report: Report) -> str:
    """One row per arm and test set, mean ± sd over seeds; empty when every arm is one run."""
    return _table(report.arm_rows, _ARM_COLUMNS) if report.arm_rows else ""


def significance_lines(report: Report) -> list[str]:
    """Per test set and compared arm (or run, with one run per arm): which differences to the first have p < ALPHA."""
    rows, key = (report.arm_rows, "arm") if report.arm_rows else (report.rows, "model")
    baseline = {}
    lines = []
    for r in rows:
        baseline.setdefault(r["testset"], r[key])
        tests = [(m, r.get(f"{m.lower()}_bs")) for m in ("BLEU", "chrF")]
        parts = [f"{m} {p['delta']:+.2f}, p={p['p_value']:.3f}: "
                 + ("**significant**" if p["p_value"] < ALPHA else "not significant")
                 for m, p in tests if p and p.get("delta") is not None]
        if parts:
            lines.append(f"- {r['testset']}: {r[key]} vs {baseline[r['testset']]}: " + "; ".join(parts))
    return lines


def curve_table(arm_logs: dict[str, list[TrainingLog]], metric: str = "val/ppl", columns: int = 8) -> str | None:
    """`metric` at the steps that every arm logged (at most `columns` of them, evenly spread, the last kept), one row
    per arm: the mean ± sd over its runs. None when the arms share no logged step."""
    at: dict[str, dict[int, list[float]]] = {arm: {} for arm in arm_logs}
    for arm, logs in arm_logs.items():
        for lg in logs:
            for step, value in lg.curves.get(metric, []):
                at[arm].setdefault(step, []).append(value)
    steps = sorted(set.intersection(*(set(v) for v in at.values()))) if at else []
    if not steps:
        return None
    steps = [steps[i] for i in sorted({round(k * (len(steps) - 1) / max(columns - 1, 1)) for k in range(columns)})]
    lines = ["| arm | " + " | ".join(f"step {s:,}" for s in steps) + " |", "|---|" + "---:|" * len(steps)]
    for arm, values in at.items():
        cells = [f"{np.mean(values[s]):.2f}" + (f" ± {np.std(values[s], ddof=1):.2f}" if len(values[s]) > 1 else "")
                 for s in steps]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def search_text(settings: dict[str, Any]) -> str:
    """The beam search's length rule as the report states it; reports written before `penalty` and
    `early_stopping` were recorded used GNMT with early stopping."""
    form = settings.get("penalty", "gnmt")
    stop = "early stopping" if settings.get("early_stopping", True) else "no early stopping"
    return f"{settings['length_penalty']} ({form}, {stop})"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_curves(arms: dict[str, list[TrainingLog]], path: str | Path, against: str = "step") -> bool:
    """Validation perplexity and BLEU (those logged) of each arm, against step or wall time ("time"): one line per
    arm of one run; the mean with a min-max band for an arm of several runs (seeds). False when there is nothing to
    draw (no curve, or against="time" and no run logged time)."""
    bands = {(metric, name): band for metric in ("val/ppl", "val/bleu") for name, logs in arms.items()
             if (band := seed_band(logs, metric, against)) is not None}
    metrics = list(dict.fromkeys(metric for metric, _ in bands))
    if not metrics:
        return False
    fig = _figure(5.5 * len(metrics), 4)
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), k + 1)
        for name, logs in arms.items():
            if (metric, name) not in bands:
                continue
            xs, mean, lo, hi = bands[metric, name]
            xs = [x / 3600 for x in xs] if against == "time" else xs
            label = f"{name} (mean, min-max of {len(logs)} seeds)" if len(logs) > 1 else name
            (line,) = ax.plot(xs, mean, marker=".", label=label)
            if len(logs) > 1:
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
        ax.set_xlabel("training wall time (h)" if against == "time" else "step")
        ax.set_ylabel(metric)
        if metric == "val/ppl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    _save(fig, path)
    return True


def _length_rows(report: Report, testset: str) -> list[tuple[str, list[dict[str, Any]]]]:
    """(name, BLEU per bucket) of every arm (with seeds) or checkpoint on `testset`."""
    rows, key = (report.arm_rows, "arm") if report.arm_rows else (report.rows, "model")
    return [(r[key], r["bleu_by_length"]) for r in rows if r["testset"] == testset]


def plot_length_buckets(report: Report, testset: str, path: str | Path) -> None:
    """Grouped bars: BLEU per source-length bucket, one bar per checkpoint (per arm with seeds: mean, ± sd bars)."""
    rows = _length_rows(report, testset)
    buckets = rows[0][1]
    fig = _figure(max(6.0, 1.2 * len(buckets) * max(1, len(rows)) / 2), 4)
    ax = fig.add_subplot()
    width = 0.8 / len(rows)
    for k, (name, scores) in enumerate(rows):
        xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(buckets))]
        sds = [b.get("bleu_sd") or 0.0 for b in scores] if report.arm_rows else None
        ax.bar(xs, [b["bleu"] or 0.0 for b in scores], width, yerr=sds, capsize=2 if sds else 0, label=name)
    ax.set_xticks(range(len(buckets)), labels=[f"{b['bucket']}\n(n={b['sentences']})" for b in buckets])
    ax.set_xlabel("source length (words)")
    ax.set_ylabel("BLEU")
    ax.set_title(testset + (" (mean ± sd over seeds)" if report.arm_rows else ""), fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def write_report(report: Report, out_dir: str | os.PathLike, command: str | None = None) -> list[Path]:
    """Write report.json, the plots and report.md (which embeds them) into `out_dir`; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves: list[tuple[str, Path]] = []
    # one curve per run, or per arm (its seeds' band) when runs were grouped
    groups = report.arms if report.arm_rows else {name: [name] for name in report.logs}
    arm_logs = {arm: [report.logs[r] for r in runs if r in report.logs] for arm, runs in groups.items()}
    arm_logs = {arm: logs for arm, logs in arm_logs.items() if logs}
    if arm_logs:
        for against in ("step", "time"):
            path = out / f"curves_{against}.png"
            if plot_curves(arm_logs, path, against):
                curves.append(("training step" if against == "step" else "training wall time", path))
    buckets_png = {}
    for ts in report.testsets:
        buckets_png[ts["name"]] = out / f"bleu_by_length_{_slug(ts['name'])}.png"
        plot_length_buckets(report, ts["name"], buckets_png[ts["name"]])
    written = [p for _, p in curves] + list(buckets_png.values())

    data = {
        "command": command, "settings": report.settings, "signatures": report.signatures,
        "columns": table_columns(report.rows), "rows": report.rows, "checkpoints": report.checkpoints,
        "arms": report.arms, "arm_columns": table_columns(report.arm_rows, _ARM_COLUMNS), "arm_rows": report.arm_rows,
        "testsets": report.testsets, "examples": report.examples, "notes": report.notes,
        "training_logs": {n: asdict(lg) for n, lg in report.logs.items()},
    }
    text = json.dumps(data, indent=2, ensure_ascii=False, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    (out / "report.json").write_text(text + "\n", encoding="utf-8")
    written.append(out / "report.json")
    md = report_markdown(report, command, curves, buckets_png, curve_table(arm_logs))
    (out / "report.md").write_text(md, encoding="utf-8")
    written.append(out / "report.md")
    return written


def report_markdown(report: Report, command: str | None, curves: list[tuple[str, Path]],
                    buckets_png: dict[str, Path], ppl_by_step: str | None = None) -> str:
    """report.md: settings, the tables, significance, signatures, the plots, BLEU by length, examples, notes."""
    s = report.settings
    seeds = bool(report.arm_rows)
    tested = "paired_bs" in report.signatures
    md = ["# Checkpoint comparison", ""]
    if command:
        md += ["```", command, "```", ""]
    md += [
        (f"{s['date']}; device {s['device']} ({s['device_name']}), torch {s['torch']}; beam {s['beam']}, "
         f"length penalty {search_text(s)}, {s['batch_tokens']} source tokens per batch; shared tokenizer of "
         f"{s['tokenizer_pieces']} pieces (sha256 {s['tokenizer_sha256'][:12]})."), "",
        "Test sets: " + "; ".join(f"{t['name']} ({t['sentences']} pairs, {t['where']})" for t in report.testsets), "",
        markdown_table(report),
        "PPL: exp of the mean cross-entropy over the reference target tokens (`y1 .. yn </s>`) under teacher forcing. "
        "decode sent/s: wall time of beam search over the whole test set. "
        + ("Δ: difference to the first checkpoint with the 95% interval of the paired bootstrap resamples and "
           f"sacreBLEU's paired-bootstrap p-value ({s['bootstrap']} resamples). " if tested and not seeds else "")
        + "train tok/s: median of the logged `train/tok_per_s` (source + target tokens).", "",
    ]
    if seeds:
        md += ["## Arms (mean ± standard deviation over seeds)", "",
               "Runs named `ARM-seedN` (or `_seedN`, `/seedN`) are the seeds of one arm: "
               + "; ".join(f"{arm}: {', '.join(runs)}" for arm, runs in report.arms.items()) + ".", "",
               arm_table(report),
               "Mean and sample standard deviation over each arm's runs; PPL over the same reference tokens for every "
               "run. " + ("Δ: the arm's mean score minus the first arm's, with the 95% interval and p-value of a paired "
                          f"bootstrap over resampled sentences ({s['bootstrap']} resamples; every run scored on each "
                          "resample, an arm's score the mean over its seeds). Seed-to-seed variation is in the sd, "
                          "not in the p-value." if tested else ""), ""]
    if tested:
        md += [f"Differences to the first {'arm' if seeds else 'checkpoint'} (significant: p < {ALPHA}):", "",
               *significance_lines(report), ""]
    md += ["sacreBLEU signatures:", "", f"- BLEU `{report.signatures['BLEU']}`", f"- chrF `{report.signatures['chrF']}`"]
    for metric, sig in report.signatures.get("paired_bs", {}).items():
        md.append(f"- paired bootstrap, {metric} `{sig}`")
    md.append("")
    if ppl_by_step:
        md += ["## Validation perplexity by training step", "",
               ("Mean ± sd over each arm's seeds" if seeds else "Each run") + ", at the steps every "
               + ("arm" if seeds else "run") + " validated (the runs' own validation set and batches), numbered as "
               "`metrics.csv` logs them: the step count minus one.", "",
               ppl_by_step]
    for against, path in curves:
        md += [f"## Validation curves against {against}", "", f"![validation curves]({path.name})", ""]
    for ts in report.testsets:
        md += _length_section(report, ts["name"], buckets_png[ts["name"]])
        md += _examples_section(report, ts["name"])
    if report.notes:
        md += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    return "\n".join(md)


def _length_section(report: Report, testset: str, png: Path) -> list[str]:
    rows = _length_rows(report, testset)
    buckets = rows[0][1]
    md = [f"## BLEU by source length ({testset})" + (", mean ± sd over seeds" if report.arm_rows else ""), "",
          f"| {'arm' if report.arm_rows else 'model'} | " + " | ".join(f"{b['bucket']} (n={b['sentences']})"
                                                                    for b in buckets) + " |",
          "|---|" + "---:|" * len(buckets)]
    for name, scores in rows:
        md.append(f"| {name} | " + " | ".join(
            "–" if b["bleu"] is None else f"{b['bleu']:.1f}" + ("" if b.get("bleu_sd") is None else f" ± {b['bleu_sd']:.1f}")
            for b in scores) + " |")
    return md + ["", f"![BLEU by source length]({png.name})", ""]


def _examples_section(report: Report, testset: str) -> list[str]:
    if not report.examples.get(testset):
        return []
    names = [c["name"] for c in report.checkpoints]
    md = [f"## Example translations ({testset})", "", "| | " + " | ".join(["source", "reference", *names]) + " |",
          "|---|" + "---|" * (2 + len(names))]
    for i, ex in enumerate(report.examples[testset], 1):
        md.append(f"| {i} | " + " | ".join(_md_escape(ex[k]) for k in ["source", "reference", *names]) + " |")
    return md + [""]
