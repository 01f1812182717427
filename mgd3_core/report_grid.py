"""Method variants in the evaluation report: a ranked table grouped by base method, and sweep plots.

A config's ``methods`` may name variants of the six base methods (a grid of λ × t_stop, another
mode finder): ``variants`` maps each variant name to ``(kind, settings)``, ``kind`` its base
method and ``settings`` ``{setting: value}`` over the settings any variant changes, the value the
variant runs with (None where its kind does not use the setting, e.g. λ for random real images).
With only the six base names and no changed setting there is nothing to add
(:func:`has_variants`) and the report stays as it was.

- :func:`variant_table`: per (protocol, student, IPC) every variant, grouped under its base
  method (baselines first, :data:`mgd3_core.report_common.METHOD_ORDER`), best first within a group,
  with its overall rank and its settings as columns;
- :func:`sweep_plot`: for a base method whose variants differ in one or two settings, accuracy
  against the first (one line per value of the second), the other methods as horizontal lines.
"""

from __future__ import annotations

import numbers

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .report_common import METHOD_ORDER, figure_png, fmt

Variants = dict[str, tuple[str, dict]]


def has_variants(variants: Variants | None) -> bool:
    """Whether the methods are more than the six base names at their defaults."""
    return bool(variants) and any(name != kind or settings for name, (kind, settings) in variants.items())


def settings_columns(variants: Variants) -> list[str]:
    """Every setting some variant changes, in the order they first appear."""
    return list(dict.fromkeys(k for _, settings in variants.values() for k in settings))


def varied_settings(variants: Variants, kind: str) -> list[str]:
    """The settings whose values differ between the variants of one base method."""
    mine = [settings for k, settings in variants.values() if k == kind]
    return [s for s in settings_columns(variants)
            if len({repr(v.get(s)) for v in mine if v.get(s) is not None}) > 1]


def _kind_rank(kind: str) -> int:
    return METHOD_ORDER.index(kind) if kind in METHOD_ORDER else len(METHOD_ORDER)


def _value(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return f"{v:g}" if isinstance(v, float) else str(v)


def variant_table(summary: pd.DataFrame, variants: Variants) -> pd.DataFrame:
    """Rows of ``summary`` (:func:`mgd3_core.report.summary_table`) for the variants, with ``kind``,
    ``rank`` (1 = best mean within its protocol, student and IPC) and one column per setting."""
    s = summary[summary["method"].isin(list(variants))].copy()
    s["kind"] = [variants[m][0] for m in s["method"]]
    s["rank"] = (s.groupby(["protocol", "student", "ipc"], dropna=False)["mean"]
                 .rank(ascending=False, method="min").astype(int))
    for col in settings_columns(variants):
        s[col] = [variants[m][1].get(col) for m in s["method"]]
    s["_kind"] = [_kind_rank(k) for k in s["kind"]]
    s = s.sort_values(["protocol", "student", "ipc", "_kind", "kind", "rank", "method"], kind="stable")
    return s.drop(columns="_kind").reset_index(drop=True)


def variant_markdown(table: pd.DataFrame, variants: Variants, split: str = "test") -> str:
    """The variant table as Markdown: rank, base method, variant, settings, accuracy, n."""
    cols = settings_columns(variants)
    head = ["Protocol", "Student", "IPC", "Rank", "Base method", "Variant", *cols,
            f"Final {split} top-1 % (mean ± std)", "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        ipc = "all" if not np.isfinite(r["ipc"]) else str(int(r["ipc"]))
        cells = [r["protocol"], r["student"], ipc, str(r["rank"]), r["kind"], r["method"],
                 *(_value(r[c]) for c in cols), fmt(r["mean"], r["std"]), str(r["n"])]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def sweep_kinds(variants: Variants) -> dict[str, list[str]]:
    """{base method: its one or two varied settings} for every base method with a plottable sweep."""
    kinds = dict.fromkeys(k for k, _ in variants.values())
    return {k: v for k in kinds if 1 <= len(v := varied_settings(variants, k)) <= 2}


def _numeric(values: list) -> bool:
    return all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)


def sweep_plot(summary: pd.DataFrame, variants: Variants, kind: str, split: str = "test") -> bytes:
    """Final top-1 of ``kind``'s variants against its first varied setting, one line (± std) per
    value of the second; every other method (full data aside) a dotted horizontal line. One panel
    per (protocol, student, IPC)."""
    axes_settings = varied_settings(variants, kind)
    x_key, line_key = axes_settings[0], (axes_settings[1] if len(axes_settings) > 1 else None)
    mine = {m: s for m, (k, s) in variants.items() if k == kind and s.get(x_key) is not None}
    xs = list(dict.fromkeys(s[x_key] for s in mine.values()))
    numeric = _numeric(xs)
    xs = sorted(xs) if numeric else xs
    pos = {x: (x if numeric else i) for i, x in enumerate(xs)}
    groups = summary[summary["method"] != "full_data"].groupby(["protocol", "student", "ipc"], sort=False)
    fig = Figure(figsize=(6.4 * max(groups.ngroups, 1) + 2.6, 4.2), layout="constrained")
    axes = fig.subplots(1, max(groups.ngroups, 1), squeeze=False)[0]
    for ax, ((protocol, student, ipc), g) in zip(axes, groups):
        g = g.set_index("method")
        lines = list(dict.fromkeys(s.get(line_key) for s in mine.values())) if line_key else [None]
        for value in (sorted(lines) if line_key and _numeric(lines) else lines):
            pts = sorted((pos[s[x_key]], g.loc[m, "mean"], g.loc[m, "std"]) for m, s in mine.items()
                         if m in g.index and (line_key is None or s.get(line_key) == value))
            if pts:
                x, y, e = map(np.asarray, zip(*pts))
                ax.errorbar(x, y, yerr=np.nan_to_num(e), marker="o", capsize=3,
                            label=f"{kind}" if line_key is None else f"{kind}, {line_key} = {_value(value)}")
        others = [m for m in g.index if m not in mine]
        for i, m in enumerate(others):
            ax.axhline(g.loc[m, "mean"], ls=":", lw=1.4, color=f"C{(i + 5) % 10}",
                       label=f"{m} ({g.loc[m, 'mean']:.2f})")
        if not numeric:
            ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_xlabel(x_key)
        ax.set_ylabel(f"final {split} top-1 (%)")
        ax.set_title(f"{kind}: {student}, {protocol} labels, IPC {int(ipc)}", fontsize=9)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure_png(fig)


def pivot_markdown(summary: pd.DataFrame, variants: Variants, kind: str, split: str = "test") -> str:
    """``kind``'s variants as a grid: one row per value of the first varied setting, one column per
    value of the second (or one column), cells final top-1 mean ± std; one table per (protocol,
    student, IPC). Variants that leave a cell's settings to another value are not in it."""
    varied = varied_settings(variants, kind)
    row_key, col_key = varied[0], (varied[1] if len(varied) > 1 else None)
    mine = {m: s for m, (k, s) in variants.items() if k == kind and s.get(row_key) is not None}

    def ordered(values):
        values = list(dict.fromkeys(values))
        return sorted(values) if _numeric(values) else values

    rows = ordered(s[row_key] for s in mine.values())
    cols = ordered(s.get(col_key) for s in mine.values()) if col_key else [None]
    out = []
    for (protocol, student, ipc), g in summary[summary["method"].isin(list(mine))].groupby(
            ["protocol", "student", "ipc"], sort=False):
        g = g.set_index("method")
        cell = {(mine[m][row_key], mine[m].get(col_key) if col_key else None): fmt(g.loc[m, "mean"], g.loc[m, "std"])
                for m in g.index}
        head = [f"{row_key} \\ {col_key}" if col_key else row_key,
                *(f"{col_key} {_value(c)}" if col_key else f"final {split} top-1 %" for c in cols)]
        lines = [f"{kind}, {student}, {protocol} labels, IPC {int(ipc)}: final {split} top-1 % (mean ± std)", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join([_value(r), *(cell.get((r, c), "") for c in cols)]) + " |" for r in rows]
        out.append("\n".join(lines))
    return "\n\n".join(out)
