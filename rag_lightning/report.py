"""A picture of a run: loss and metric curves from the CSV log, the summary's before / after / test numbers.

Written next to the logs as `report.png` at the end of training (and by evaluation), with matplotlib's
Agg backend (offline, no display); the same image goes to W&B when a W&B logger is on.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from collections import defaultdict
from pathlib import Path

Curves = dict[str, list[tuple[int, float]]]  # metric name -> [(step, value)]
PLAIN = ("loss", "p_entropy", "top1_distinct", "nll")  # not fractions: plotted as they are


def read_curves(metrics_csv: str | Path) -> Curves:
    """Every numeric column of a Lightning CSVLogger file as (step, value) points, blank cells skipped."""
    curves: Curves = defaultdict(list)
    with open(metrics_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for key, cell in row.items():
                if key in ("step", "epoch") or not cell:
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    continue
                if math.isfinite(value):
                    curves[key].append((int(float(step)), value))
    return dict(curves)


def _is_fraction(name: str) -> bool:
    return name.rsplit("/", 1)[-1] not in PLAIN


def _pooled_val(names: list[str]) -> list[str]:
    """`val/<metric>` keys (all sets pooled), not the per-set `val/<set>/<metric>` ones."""
    return [n for n in names if n.startswith("val/") and n.count("/") == 1]


def write_report(
    out: str | Path,
    curves: Curves,
    before: dict[str, float],
    after: dict[str, float],
    test: dict[str, float],
    title: str = "rag-lightning run",
) -> Path:
    """Draw the report and write it atomically to OUT (a .png). Panels: training / validation loss over
    steps; the validation metrics over steps (fractions, in %); before / after / test bars for every metric
    the summary has; the summary's numbers as a table."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    fig.suptitle(title)

    ax = axes[0, 0]
    for name in ("train/loss", "val/loss"):
        pts = curves.get(name)
        if pts:
            steps, values = zip(*pts, strict=True)
            ax.plot(steps, values, marker="o" if name.startswith("val") else None, ms=4, lw=1, label=name)
    ax.set(title="loss", xlabel="optimizer step", ylabel="NLL per example")
    ax.legend(loc="best") if ax.lines else ax.text(0.5, 0.5, "no loss logged", ha="center")

    ax = axes[0, 1]
    for name in _pooled_val(sorted(curves)):
        if name == "val/loss" or not _is_fraction(name):
            continue
        steps, values = zip(*curves[name], strict=True)
        ax.plot(steps, [100 * v for v in values], marker="o", ms=4, lw=1, label=name)
    ax.set(title="validation metrics", xlabel="optimizer step", ylabel="%")
    ax.legend(loc="best", fontsize=8) if ax.lines else ax.text(0.5, 0.5, "no metric logged", ha="center")

    names = [n for n in _pooled_val(list(dict.fromkeys([*before, *after]))) if _is_fraction(n)]
    columns = [("before", before, "val/"), ("after", after, "val/"), ("test", test, "test/")]
    columns = [c for c in columns if c[1]]
    ax = axes[1, 0]
    width = 0.8 / max(len(columns), 1)
    for i, (label, values, prefix) in enumerate(columns):
        ys = [100 * values.get(prefix + n.split("/", 1)[1], math.nan) for n in names]
        ax.bar([j + i * width for j in range(len(names))], ys, width, label=label)
    ax.set_xticks([j + width * (len(columns) - 1) / 2 for j in range(len(names))])
    ax.set_xticklabels([n.split("/", 1)[1] for n in names], rotation=30, ha="right")
    ax.set(title="before -> after training", ylabel="%")
    if names:
        ax.legend(loc="best")

    ax = axes[1, 1]
    ax.axis("off")
    rows = _pooled_val(list(dict.fromkeys([*before, *after])))
    cells = []
    for n in rows:
        key = n.split("/", 1)[1]
        cells.append([n] + [_fmt(v.get(p + key), n) for _, v, p in columns])
    if cells:
        table = ax.table(cellText=cells, colLabels=["metric"] + [c[0] for c in columns], loc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(9)
        table.scale(1, 1.3)
    ax.set_title("summary")

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-report-", suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def _fmt(v: float | None, name: str) -> str:
    if v is None:
        return "-"
    if name.endswith("top1_distinct"):
        return f"{v:.0f}"
    return f"{100 * v:.1f}%" if _is_fraction(name) else f"{v:.3f}"


def report_run(
    output_dir: str | Path, loggers: list, before: dict, after: dict, test: dict, title: str
) -> Path | None:
    """The run's report from its CSV log (flushed first) to `<output_dir>/report.png`, also sent to W&B;
    None when no CSV logger is on (the curves come from its file)."""
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    csv_loggers = [lg for lg in loggers if isinstance(lg, CSVLogger)]
    if not csv_loggers:
        return None
    lg = csv_loggers[0]
    lg.save()
    path = Path(lg.experiment.metrics_file_path)
    curves = read_curves(path) if path.is_file() else {}
    out = write_report(Path(output_dir) / "report.png", curves, before, after, test, title)
    for wb in (lg for lg in loggers if isinstance(lg, WandbLogger)):
        wb.log_image(key="report", images=[str(out)])
    return out
