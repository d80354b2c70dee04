"""Pictures of `clam associate`: a box plot (continuous) or stacked bar chart (categorical) per column, and an overview."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .qc import _figure, _save

MAX_OVERVIEW = 40
"""Most columns drawn in the overview figure (those with the smallest adjusted p)."""
_MISSING_COLOUR = "0.8"


def _title(outcome: Any) -> str:
    """Column name, test, adjusted p and effect size in two lines."""
    p = outcome.p_adjusted
    shown = "< 0.0001" if p < 1e-4 else f"{p:.3g}"
    return f"{outcome.name}\n{outcome.test}: adj. p {shown}, {outcome.effect_name} {outcome.effect:.2f}"


def draw_column(ax: Any, outcome: Any, clusters: Sequence[int], k: int, small: bool = False) -> None:
    """One column's picture on an axis: box plots per cluster with the points, or stacked shares per cluster."""
    clusters = np.asarray(clusters, dtype=int)
    present = [c for c in range(k) if any(g["cluster"] == c and g["n"] for g in outcome.groups)]
    if outcome.kind == "continuous":
        values = np.array([np.nan if v is None else v for v in outcome.values], dtype=float)
        data = [values[(clusters == c) & ~np.isnan(values)] for c in present]
        ax.boxplot(data, positions=range(len(present)), widths=0.6, showfliers=False)
        rng = np.random.default_rng(0)
        for i, d in enumerate(data):
            ax.plot(i + rng.uniform(-0.15, 0.15, d.size), d, "o", ms=2 if small else 3, alpha=0.5, color="tab:blue")
    else:
        levels = list(outcome.groups[0]["counts"]) if outcome.groups else []
        colours = [_colour(j, len(levels)) for j in range(len(levels))]
        bottom = np.zeros(len(present))
        totals = np.array([next(g["n"] + g["missing"] for g in outcome.groups if g["cluster"] == c)
                           for c in present], dtype=float)
        totals[totals == 0] = 1
        for j, level in enumerate(levels):
            share = np.array([next(g["counts"][level] for g in outcome.groups if g["cluster"] == c)
                              for c in present]) / totals
            ax.bar(range(len(present)), share, bottom=bottom, color=colours[j], label=level, width=0.7)
            bottom += share
        missing = np.array([next(g["missing"] for g in outcome.groups if g["cluster"] == c) for c in present])
        if missing.any():
            ax.bar(range(len(present)), missing / totals, bottom=bottom, color=_MISSING_COLOUR, label="missing",
                   width=0.7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of scans", fontsize=7 if small else 9)
        if not small or len(levels) <= 4:
            ax.legend(fontsize=6 if small else 8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    counts = [sum(g["n"] for g in outcome.groups if g["cluster"] == c) for c in present]
    ax.set_xticks(range(len(present)))
    ax.set_xticklabels([f"{c}\n(n {n})" for c, n in zip(present, counts)], fontsize=7 if small else 9)
    ax.set_xlabel("cluster", fontsize=7 if small else 9)
    ax.set_title(_title(outcome), fontsize=7 if small else 10)
    ax.tick_params(labelsize=7 if small else 9)


def _colour(j: int, n: int) -> tuple:
    """The j-th of n distinct colours."""
    from matplotlib import colormaps

    return colormaps["tab20" if n > 10 else "tab10"](j % 20)


def column_plot(outcome: Any, clusters: Sequence[int], k: int, path: str | Path) -> Path:
    """One column's PNG."""
    fig = _figure(6.5 if outcome.kind == "categorical" else 5, 4)
    draw_column(fig.add_subplot(1, 1, 1), outcome, clusters, k)
    fig.tight_layout()
    return _save(fig, path)


def overview_plot(outcomes: Sequence[Any], clusters: Sequence[int], k: int, path: str | Path) -> Path:
    """Every tested column (the MAX_OVERVIEW with the smallest adjusted p) in one PNG, in that order."""
    shown = list(outcomes)[:MAX_OVERVIEW]
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig = _figure(4.2 * cols, 3.3 * rows + 0.5)
    for i, outcome in enumerate(shown):
        draw_column(fig.add_subplot(rows, cols, i + 1), outcome, clusters, k, small=True)
    more = f" (the {len(shown)} smallest adjusted p of {len(outcomes)})" if len(outcomes) > len(shown) else ""
    fig.suptitle(f"clusters against every column tested{more}", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)
