"""The evaluation report: accuracy table, feature metrics, plots and an HTML page.

Inputs are tidy frames, one row per run or per class:

- accuracy rows: ``method, ipc, student, protocol, gen_seed, train_seed,
  final_acc, best_acc`` (top-1 %), optionally ``ranking_acc`` (the best in the
  last fifth of training, which the DD-Ranking scores use; ``final_acc`` when
  absent). Full-data rows use ``method = "full_data"`` and any ``ipc`` (NaN is
  fine): they are the upper bound of every IPC.
- metric rows (optional): ``method, ipc, class, diversity, representativeness,
  cos_div, cos_rep`` (:func:`mgd3_core.metrics.per_class_metrics` plus the two
  keys), optionally with ``gen_seed``.
- t-SNE rows (optional): ``ipc, class, method, x, y``
  (:func:`mgd3_core.metrics.tsne_table` plus ``ipc``), ``method = "real"`` for
  real points.
- image grids (optional): ``{title: PIL.Image}`` from :func:`mgd3_core.images.image_grid`.

:func:`write_report` writes ``report.md``, ``results.csv`` (the run rows),
``metrics.csv``, ``summary.csv`` (the table's numbers), PNGs and a
self-contained ``index.html`` (PNGs embedded as base64) under one directory,
each file written to a temporary name and renamed. Plots use matplotlib's Agg
canvas directly (no pyplot, no global backend switch).
"""

from __future__ import annotations

import base64
import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from .files import atomic_write
from .images import png_bytes
from .metrics import aggregate, dd_ranking_scores, mean_over_classes
from .report_common import METHOD_ORDER  # noqa: F401  (re-exported)
from .report_common import figure_png as _figure_png
from .report_common import fmt as _fmt
from .report_common import slug as _slug

ACC_COLUMNS = ("method", "ipc", "student", "protocol", "gen_seed", "train_seed", "final_acc", "best_acc")
METRIC_COLUMNS = ("method", "ipc", "class", "diversity", "representativeness", "cos_div", "cos_rep")


@dataclass(frozen=True)
class Report:
    """Where the report went, and its table as Markdown (for logs and asset metadata)."""

    out_dir: Path
    markdown: Path
    html: Path
    results_csv: Path
    metrics_csv: Path | None
    summary_csv: Path
    pngs: dict[str, Path] = field(default_factory=dict)
    table_markdown: str = ""
    summary: pd.DataFrame | None = field(default=None, repr=False)
    variants_markdown: str = ""  # the ranked variant table; "" with only the base methods




# ---------------------------------------------------------------- table
def _method_rank(method: str, kinds: dict[str, str] | None = None) -> tuple[int, str]:
    """Sort key of a method: its base method's place in :data:`METHOD_ORDER` (``kinds``: variant ->
    base method), then its name; a base method's own name first."""
    kind = (kinds or {}).get(method, method)
    place = METHOD_ORDER.index(kind) if kind in METHOD_ORDER else len(METHOD_ORDER)
    return (place, "" if method == kind and kind in METHOD_ORDER else method)


def summary_table(accuracy: pd.DataFrame, metrics: pd.DataFrame | None = None,
                  kinds: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per (protocol, student, ipc, method): accuracy mean/std/n, best, DD-Ranking, metrics.

    Ordered by protocol, student, then the full-data row, then per IPC the
    methods in :data:`METHOD_ORDER` (others after, alphabetically); ``kinds`` (variant ->
    base method) places each variant with its base method.
    """
    keys = ["method", "ipc", "student", "protocol"]
    acc = accuracy.copy()
    acc["ipc"] = acc["ipc"].astype(float)
    acc.loc[acc["method"] == "full_data", "ipc"] = np.nan  # one bound for every IPC
    final = aggregate(acc, keys, "final_acc")
    best = aggregate(acc, keys, "best_acc").rename(columns={"mean": "best_mean", "std": "best_std"})
    table = final.merge(best.drop(columns="n"), on=keys, how="left")
    table = table.merge(dd_ranking_scores(acc, value=ranking_value(acc)), on=keys, how="left")
    if metrics is not None and len(metrics):
        table = table.merge(mean_over_classes(metrics, by=("method", "ipc")), on=["method", "ipc"], how="left")
    table["_ipc"] = table["ipc"].fillna(-1)
    table["_rank"] = [_method_rank(m, kinds) for m in table["method"]]
    table = table.sort_values(["protocol", "student", "_ipc", "_rank"], kind="stable")
    return table.drop(columns=["_ipc", "_rank"]).reset_index(drop=True)


def ranking_value(accuracy: pd.DataFrame) -> str:
    """The accuracy column DD-Ranking scores use: ``ranking_acc`` when every run has it."""
    has = "ranking_acc" in accuracy.columns and accuracy["ranking_acc"].notna().all()
    return "ranking_acc" if has else "final_acc"


def table_markdown(summary: pd.DataFrame, split: str = "test") -> str:
    """The summary as a Markdown table: final top-1 mean ± std (n runs), best, DD-Ranking, metrics;
    ``split``: where the students were scored, named in the header unless it is the test split."""
    has_metrics = "diversity" in summary.columns
    scored = "" if split == "test" else f"{split} "
    head = ["Protocol", "Student", "IPC", "Method", f"Final {scored}top-1 % (mean ± std)", "n", f"Best {scored}top-1 %",
            "HLR", "IOR", "LRS %"]
    if has_metrics:
        head += ["Diversity ↑", "Represent. dist ↓", "cos div ↑", "cos rep ↑"]

    def num(v, digits=2):
        return "–" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary.itertuples(index=False):
        ipc = "all" if not np.isfinite(r.ipc) else str(int(r.ipc))
        cells = [r.protocol, r.student, ipc, r.method, _fmt(r.mean, r.std), str(r.n),
                 _fmt(r.best_mean, r.best_std), num(r.hlr), num(r.ior), num(r.lrs, 1)]
        if has_metrics:
            cells += [num(r.diversity, 3), num(r.representativeness, 3), num(r.cos_div, 3), num(r.cos_rep, 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- plots
def accuracy_plot(summary: pd.DataFrame) -> bytes:
    """Bars of final top-1 (mean ± std) per method, one panel per (protocol, student, ipc); full data dashed."""
    groups = summary[summary["method"] != "full_data"].groupby(["protocol", "student", "ipc"], sort=False)
    bars = max((len(g) for _, g in groups), default=1)  # a grid's many variants: wider panels
    fig = Figure(figsize=(max(5.0, max(4.5, 0.45 * bars) * max(groups.ngroups, 1)), 3.8))
    for i, ((protocol, student, ipc), g) in enumerate(groups):
        ax = fig.add_subplot(1, groups.ngroups, i + 1)
        ax.bar(range(len(g)), g["mean"], yerr=g["std"], capsize=3, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(g)), g["method"], rotation=35, ha="right", fontsize=8)
        full = summary[(summary["method"] == "full_data") & (summary["protocol"] == protocol)
                       & (summary["student"] == student)]
        low = float(np.nanmin(g["mean"] - g["std"]))
        if len(full):
            ax.axhline(float(full["mean"].iloc[0]), ls="--", color="k", lw=1, label="full data")
            ax.legend(fontsize=8, loc="lower right")
        top = max(float(np.nanmax(g["mean"] + g["std"])), float(full["mean"].max()) if len(full) else 0)
        ax.set_ylim(max(0.0, low - 5), min(100.0, top + 2))
        ax.set_title(f"{student}, {protocol} labels, IPC {int(ipc)}", fontsize=9)
        ax.set_ylabel("final top-1 (%)")
    return _figure_png(fig)


def div_rep_plot(metrics: pd.DataFrame, ipc) -> bytes:
    """Per-class diversity (y) vs representativeness distance (x), one panel per method (Fig. 8)."""
    m = metrics[metrics["ipc"] == ipc]
    m = m.groupby(["method", "class"], sort=False)[["diversity", "representativeness"]].mean().reset_index()
    methods = sorted(m["method"].unique(), key=_method_rank)
    ncols = min(4, len(methods))
    nrows = math.ceil(len(methods) / ncols)
    fig = Figure(figsize=(3.2 * ncols, 3.0 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, method in zip(axes, methods):
        g = m[m["method"] == method]
        ax.scatter(g["representativeness"], g["diversity"], s=18)
        for c, x, y in zip(g["class"], g["representativeness"], g["diversity"]):
            ax.annotate(str(c), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_title(method, fontsize=9)
        ax.tick_params(labelbottom=True)  # sharex hides them above the empty last-row cells
    for ax in axes[len(methods):]:
        ax.set_visible(False)
    fig.supxlabel("representativeness: mean distance to k nearest real (lower = closer to the data)", fontsize=8)
    fig.supylabel("diversity: distance to nearest other synthetic", fontsize=8)
    fig.suptitle(f"Per-class diversity vs representativeness, IPC {int(ipc)} (one point per class)", fontsize=10)
    return _figure_png(fig)


def tsne_plot(tsne: pd.DataFrame) -> bytes:
    """Rows = methods, columns = classes: real points grey, synthetic points coloured (Fig. 5)."""
    classes = list(dict.fromkeys(tsne["class"]))
    methods = sorted((m for m in tsne["method"].unique() if m != "real"), key=_method_rank)
    fig = Figure(figsize=(2.8 * len(classes), 2.6 * max(len(methods), 1)))
    axes = fig.subplots(max(len(methods), 1), len(classes), squeeze=False)
    for j, c in enumerate(classes):
        t = tsne[tsne["class"] == c]
        real = t[t["method"] == "real"]
        for i, method in enumerate(methods):
            ax = axes[i][j]
            ax.scatter(real["x"], real["y"], s=4, c="0.75", label="real")
            syn = t[t["method"] == method]
            ax.scatter(syn["x"], syn["y"], s=22, c="tab:red", marker="*", label="synthetic")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(f"class {c}", fontsize=9)
            if j == 0:
                ax.set_ylabel(method, fontsize=9)
    return _figure_png(fig)


# ---------------------------------------------------------------- the report
def _check_columns(df: pd.DataFrame, required, name: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"write_report: {name} is missing column(s) {missing}; required: {list(required)}")


def _explain(accuracy: pd.DataFrame, split: str) -> str:
    """The paragraphs under the title: what the numbers are, where the students were scored."""
    n_gen = accuracy["gen_seed"].nunique()
    n_train = accuracy["train_seed"].nunique()
    if ranking_value(accuracy) == "ranking_acc":
        ranking_rule = ("Each run enters them with its best test accuracy over the evaluations in the last fifth "
                        "of training, as DD-Ranking does (`evaluation.ranking_evaluations`; 1 = the final epoch).")
    else:
        ranking_rule = "Each run enters them with its final-epoch accuracy (these runs have no ranking column)."
    if split == "test":
        where, full = "on the real test split", "the whole training split"
    else:
        where = (f"on the **{split}** split (`evaluation.split`): the images held out of each class's training "
                 "split (`dataset.validation_fraction`); the modes, real-image baselines, teacher and full-data "
                 "runs use the rest of it (the fit split) and the test split is never read,")
        full = "the fit split"
    return (
        f"Accuracy: top-1 {where} after the **final** epoch, mean ± sample std (ddof 1) "
        f"over n runs ({n_gen} generation seed(s) × {n_train} training seed(s)); \"best\" is the maximum over "
        f"the periodic evaluations and is optimistic. Full data: the same student and protocol trained on "
        f"{full} (IPC \"all\").\n\n"
        "DD-Ranking (Li et al. 2025): HLR = full-data − synthetic accuracy, both hard labels (lower is better); "
        "IOR = synthetic − random-real accuracy at the same IPC and protocol (higher is better); "
        f"LRS = (e^α − e^−1)/(e − e^−1) × 100 with α = ½·IOR − ½·HLR (as fractions). {ranking_rule}\n\n"
        "Feature metrics (real-trained teacher's penultimate features, per class, averaged over classes): "
        "diversity = mean distance to the nearest other synthetic image; representativeness = mean distance "
        "to the k nearest real images (lower = closer to the data); cos div = 1 − mean max cosine to another "
        "synthetic image; cos rep = mean max cosine to a real image."
    )


def _html_table(table: str) -> str:
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split(" | ")) + "</tr>"
        for line in table.splitlines()[2:])
    head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in table.splitlines()[0].strip("|").split(" | "))
    return f"<table><tr>{head}</tr>{rows}</table>"


def _html_page(title: str, notes: str, explain: str, tables: list[tuple[str, str]],
               figures: list[tuple[str, str, bytes]]) -> str:
    def b64(data: bytes) -> str:
        return "data:image/png;base64," + base64.b64encode(data).decode("ascii")

    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
        "<style>body{font-family:sans-serif;max-width:1400px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(notes)}</p>"
        + "".join(f"<p>{html.escape(p)}</p>" for p in explain.split("\n\n"))
        + "".join((f"<h2>{html.escape(heading)}</h2>" if heading else "")
                  + "".join(_html_table(b) if b.startswith("|") else f"<p>{html.escape(b)}</p>" for b in md.split("\n\n"))
                  for heading, md in tables)
        + "".join(f"<h2>{html.escape(caption)}</h2><img alt='{html.escape(caption)}' src='{b64(data)}'>"
                  for _, caption, data in figures)
        + "</body></html>"
    )


def _figures(summary: pd.DataFrame, metrics, tsne, image_grids, variants, split: str) -> list[tuple[str, str, bytes]]:
    """(file name, caption, PNG bytes) of every plot and image grid of the report."""
    from .report_grid import has_variants, sweep_kinds, sweep_plot

    figures = [("accuracy.png", "Final top-1 accuracy (mean ± std over seeds)", accuracy_plot(summary))]
    if has_variants(variants):
        for kind, varied in sweep_kinds(variants).items():
            caption = (f"{kind}: final {split} top-1 against {' and '.join(varied)} (mean ± std over seeds), "
                       "the other methods as dotted lines")
            figures.append((f"sweep_{_slug(kind)}.png", caption, sweep_plot(summary, variants, kind, split)))
    if metrics is not None and len(metrics):
        for ipc in sorted(metrics["ipc"].dropna().unique()):
            figures.append((f"div_rep_ipc{int(ipc)}.png", f"Diversity vs representativeness per class, IPC {int(ipc)}",
                            div_rep_plot(metrics, ipc)))
    if tsne is not None and len(tsne):
        for ipc in sorted(tsne["ipc"].dropna().unique()):
            caption = f"t-SNE of real (grey) and synthetic (red) features, IPC {int(ipc)}"
            figures.append((f"tsne_ipc{int(ipc)}.png", caption, tsne_plot(tsne[tsne["ipc"] == ipc])))
    for name, img in (image_grids or {}).items():
        figures.append((f"grid_{_slug(name)}.png", f"Images: {name}", png_bytes(img)))
    return figures


def write_report(out_dir: str | os.PathLike, accuracy: pd.DataFrame, metrics: pd.DataFrame | None = None, *,
                 tsne: pd.DataFrame | None = None, image_grids: dict[str, Image.Image] | None = None,
                 title: str = "MGD³ evaluation", notes: str = "", split: str = "test",
                 variants: dict[str, tuple[str, dict]] | None = None) -> Report:
    """Write the report files under ``out_dir`` and return their paths and the table.

    See the module docstring for the input frames. ``notes`` (Markdown) goes
    under the title, e.g. the config name and backbone fingerprint. ``split``: where the
    students were scored ("test" or "validation"), named with every table. ``variants``:
    ``{method: (base method, {setting: value})}`` (:mod:`mgd3_core.report_grid`); when the
    methods are more than the base names, a ranked table of them and sweep plots are added.
    """
    from .report_grid import has_variants, pivot_markdown, sweep_kinds, variant_markdown, variant_table

    _check_columns(accuracy, ACC_COLUMNS, "accuracy")
    if not len(accuracy):
        raise ValueError("write_report: accuracy has no rows")
    if metrics is not None:
        _check_columns(metrics, METRIC_COLUMNS, "metrics")
    if tsne is not None:
        _check_columns(tsne, ("ipc", "class", "method", "x", "y"), "tsne")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    kinds = {m: kind for m, (kind, _) in (variants or {}).items()}
    summary = summary_table(accuracy, metrics, kinds)
    table = table_markdown(summary, split)
    variants_md = ""
    if has_variants(variants):  # the ranked variants, then each base method's grid as a table
        variants_md = "\n\n".join([variant_markdown(variant_table(summary, variants), variants, split),
                                     *(pivot_markdown(summary, variants, kind, split) for kind in sweep_kinds(variants))])
    results_csv = atomic_write(out / "results.csv", accuracy.to_csv(index=False))
    summary_csv = atomic_write(out / "summary.csv", summary.to_csv(index=False))
    metrics_csv = atomic_write(out / "metrics.csv", metrics.to_csv(index=False)) if metrics is not None else None
    figures = _figures(summary, metrics, tsne, image_grids, variants, split)
    pngs = {fname: atomic_write(out / fname, data) for fname, _, data in figures}

    explain = _explain(accuracy, split)
    ranked = "Variants by base method, ranked by final top-1 (1 = best)"
    md = [f"# {title}", "", notes, "", explain, "", table, ""]
    if variants_md:
        md += [f"## {ranked}", "", variants_md, ""]
    md += [f"## {caption}\n\n![{caption}]({fname})\n" for fname, caption, _ in figures]
    md += ["Files: `results.csv` (one row per run), `summary.csv` (this table's numbers)"
           + (", `metrics.csv` (one row per method, IPC and class)." if metrics_csv else ".")]
    markdown = atomic_write(out / "report.md", "\n".join(md))
    tables = [("", table)] + ([(ranked, variants_md)] if variants_md else [])
    index = atomic_write(out / "index.html", _html_page(title, notes, explain, tables, figures))
    return Report(out_dir=out, markdown=markdown, html=index, results_csv=results_csv, metrics_csv=metrics_csv,
                  summary_csv=summary_csv, pngs=pngs, table_markdown=table, summary=summary,
                  variants_markdown=variants_md)
