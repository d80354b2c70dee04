"""`clam associate`: which clinical, acquisition and anatomy columns differ between the clusters of a mapped cohort.

Continuous columns: Kruskal-Wallis (ANOVA beside it for reference), epsilon^2 (and eta^2), per-cluster median and
IQR. Categorical columns: chi-square, or Fisher's exact test for a 2 x 2 table with an expected count under 5, and
Cramer's V. P-values are adjusted over every column tested (Benjamini-Hochberg false discovery rate). Missing values
are counted per column and cluster; ids, constant and free-text columns are skipped with their reason.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from .cohort_table import match_ids, read_assignments, read_id_table
from .errors import InputError
from .imageio import atomic_path
from .paths import is_inside, output_path, safe_id

MISSING = {"", "na", "n/a", "nan", "none", "null", "?", ".", "-", "missing", "not available"}
"""Cell texts (lower case, stripped) that mean a missing value."""
MAX_LEVELS = 20
"""Categorical columns with more distinct values than this are skipped as free text."""
ALPHA = 0.05
"""Adjusted p-value under which an association counts as found (for the acquisition warning)."""
SOURCES = ("clinical", "acquisition", "anatomy")


@dataclass
class Column:
    """One column to test: its name, where it comes from, one value per mapped scan (None: missing)."""

    name: str
    source: str
    values: list[Any]
    kind: str | None = None  # "continuous", "categorical", or None to infer from the values


@dataclass
class Outcome:
    """The test of one column against the clusters, or why it was skipped."""

    name: str
    source: str
    kind: str = ""
    test: str = ""
    statistic: float | None = None
    p: float | None = None
    p_adjusted: float | None = None
    effect_name: str = ""
    effect: float | None = None
    n: int = 0
    missing: int = 0
    skipped: str = ""
    note: str = ""
    reference: dict[str, Any] = field(default_factory=dict)
    groups: list[dict[str, Any]] = field(default_factory=list)
    values: list[Any] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (without the raw values)."""
        data = asdict(self)
        data.pop("values")
        return data


def is_missing(value: Any) -> bool:
    """True for None, NaN and the texts of MISSING."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return str(value).strip().lower() in MISSING


def _as_float(value: Any) -> float | None:
    """A value as a finite float, or None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def bh_adjust(p_values: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (false discovery rate), in the order given."""
    p = np.asarray(p_values, dtype=float)
    if p.size == 0:
        return p
    if hasattr(stats, "false_discovery_control"):
        return np.asarray(stats.false_discovery_control(p, method="bh"))
    order = np.argsort(p)
    ranked = p[order] * p.size / np.arange(1, p.size + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty_like(p)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def _kind_of(column: Column, present: list[Any]) -> tuple[str, str]:
    """The column's kind and, if it cannot be tested, the reason ('' when it can)."""
    numbers = [_as_float(v) for v in present]
    numeric = all(v is not None for v in numbers)
    distinct = {str(v).strip() for v in present}
    if len(distinct) < 2:
        shown = next(iter(distinct)) if distinct else ""
        return "", "no values" if not distinct else f"constant (every value is {shown!r})"
    kind = column.kind or ("continuous" if numeric and len(set(numbers)) > 2 else "categorical")
    if kind == "continuous" and not numeric:
        bad = next(v for v, x in zip(present, numbers) if x is None)
        return "", f"declared continuous but holds the non-number {bad!r}"
    if numeric and len(set(numbers)) == len(present) >= 5 and all(float(x).is_integer() for x in numbers):
        ints = sorted(int(x) for x in numbers)
        if ints[-1] - ints[0] == len(ints) - 1:
            return "", "consecutive whole numbers, all different: looks like an id or row number"
    if kind == "categorical" and not numeric and len(distinct) == len(present) >= 5:
        return "", "every value differs: looks like an id or free text"
    if kind == "categorical" and len(distinct) > MAX_LEVELS:
        return "", f"{len(distinct)} different values: too many categories (free text?); declare it continuous"
    return kind, ""


def analyse_column(column: Column, clusters: Sequence[int], k: int) -> Outcome:
    """Test one column against the clusters (one value per scan, clusters[i] the cluster of scan i)."""
    if len(column.values) != len(clusters):
        raise ValueError(f"column {column.name!r} has {len(column.values)} values for {len(clusters)} scans")
    outcome = Outcome(column.name, column.source)
    clusters = np.asarray(clusters, dtype=int)
    keep = np.array([not is_missing(v) for v in column.values], dtype=bool)
    outcome.missing = int((~keep).sum())
    outcome.n = int(keep.sum())
    present = [v for v, ok in zip(column.values, keep) if ok]
    kind, reason = _kind_of(column, present)
    outcome.kind = kind
    if not reason:
        used = sorted({int(c) for c in clusters[keep]})
        if len(used) < 2:
            reason = "values in fewer than two clusters"
        elif outcome.n <= len(used):
            reason = f"only {outcome.n} values for {len(used)} clusters"
    if reason:
        outcome.skipped = reason
        return outcome
    if kind == "continuous":
        values = np.array([_as_float(v) for v in present], dtype=float)
        _continuous(outcome, values, clusters[keep], clusters, keep, k)
        outcome.values = [_as_float(v) if ok else None for v, ok in zip(column.values, keep)]
    else:
        levels = [str(v).strip() for v in present]
        _categorical(outcome, levels, clusters[keep], clusters, keep, k)
        outcome.values = [str(v).strip() if ok else None for v, ok in zip(column.values, keep)]
    return outcome


def _continuous(outcome: Outcome, values: np.ndarray, groups_of: np.ndarray, clusters: np.ndarray,
                keep: np.ndarray, k: int) -> None:
    """Kruskal-Wallis with epsilon^2, one-way ANOVA with eta^2, per-cluster median and IQR."""
    groups = [values[groups_of == c] for c in range(k)]
    used = [g for g in groups if g.size]
    n = values.size
    outcome.test = "Kruskal-Wallis"
    try:
        h, p = stats.kruskal(*used)
    except ValueError as exc:  # e.g. all values equal across the clusters
        outcome.skipped = f"Kruskal-Wallis not defined: {exc}"
        return
    outcome.statistic, outcome.p = float(h), float(p)
    outcome.effect_name, outcome.effect = "epsilon^2", float(h / (n - 1))
    grand = values.mean()
    total = float(((values - grand) ** 2).sum())
    between = float(sum(g.size * (g.mean() - grand) ** 2 for g in used))
    f, p_anova = stats.f_oneway(*used) if n > len(used) else (math.nan, math.nan)
    outcome.reference = {"test": "one-way ANOVA", "statistic": _as_float(f), "p": _as_float(p_anova),
                         "effect_name": "eta^2", "effect": between / total if total > 0 else None}
    for c in range(k):
        g = groups[c]
        q1, median, q3 = (float(v) for v in np.percentile(g, [25, 50, 75])) if g.size else (None, None, None)
        outcome.groups.append({"cluster": c, "n": int(g.size), "missing": int((~keep & (clusters == c)).sum()),
                               "median": median, "q1": q1, "q3": q3,
                               "mean": float(g.mean()) if g.size else None})


def _categorical(outcome: Outcome, levels: list[str], groups_of: np.ndarray, clusters: np.ndarray,
                 keep: np.ndarray, k: int) -> None:
    """Chi-square (Fisher's exact for a sparse 2 x 2 table) and Cramer's V on the cluster x level table."""
    names = sorted(set(levels), key=_level_key)
    table = np.zeros((k, len(names)), dtype=int)
    index = {name: j for j, name in enumerate(names)}
    for level, c in zip(levels, groups_of):
        table[int(c), index[level]] += 1
    rows = table.sum(axis=1) > 0
    used = table[rows]
    chi2, p_chi2, dof, expected = stats.chi2_contingency(used, correction=False)
    v = float(stats.contingency.association(used, method="cramer"))
    outcome.effect_name, outcome.effect = "Cramer's V", v
    if used.shape == (2, 2) and expected.min() < 5:
        outcome.test = "Fisher's exact"
        odds, p = stats.fisher_exact(used)
        outcome.statistic, outcome.p = _as_float(odds), float(p)
        outcome.reference = {"test": "chi-square", "statistic": float(chi2), "p": float(p_chi2), "dof": int(dof)}
    else:
        outcome.test = "chi-square"
        outcome.statistic, outcome.p = float(chi2), float(p_chi2)
        outcome.reference = {"dof": int(dof)}
        sparse = float((expected < 5).mean())
        if sparse > 0.2:
            outcome.note = f"{sparse:.0%} of expected counts under 5: the chi-square p-value is approximate"
    for c in range(k):
        outcome.groups.append({"cluster": c, "n": int(table[c].sum()), "missing": int((~keep & (clusters == c)).sum()),
                               "counts": {name: int(table[c, j]) for j, name in enumerate(names)}})


def _level_key(text: str) -> tuple:
    """Sort key for category names: numbers by value, then texts."""
    number = _as_float(text)
    return (0, number, "") if number is not None else (1, 0.0, text)


def analyse_columns(columns: Sequence[Column], clusters: Sequence[int], k: int) -> list[Outcome]:
    """Test every column and adjust the p-values of those tested over their number (Benjamini-Hochberg)."""
    outcomes = [analyse_column(column, clusters, k) for column in columns]
    tested = [o for o in outcomes if not o.skipped]
    for o, adjusted in zip(tested, bh_adjust([o.p for o in tested])):
        o.p_adjusted = float(adjusted)
    return outcomes


def acquisition_warning(outcomes: Sequence[Outcome], alpha: float = ALPHA) -> str:
    """A warning when an acquisition or anatomy column is associated (adjusted p < alpha) more strongly than any
    clinical column (smaller adjusted p), else ''."""
    tested = [o for o in outcomes if not o.skipped]
    scan = sorted((o for o in tested if o.source != "clinical"), key=lambda o: o.p_adjusted)
    clinical = sorted((o for o in tested if o.source == "clinical"), key=lambda o: o.p_adjusted)
    if not scan or scan[0].p_adjusted >= alpha:
        return ""
    top = scan[0]
    if clinical and clinical[0].p_adjusted <= top.p_adjusted:
        return ""
    versus = (f"the strongest clinical column, {clinical[0].name}, has adjusted p = {_p(clinical[0].p_adjusted)}"
              if clinical else "no clinical column was tested")
    return (f"The clusters are associated with {top.name} ({top.source}; adjusted p = {_p(top.p_adjusted)}, "
            f"{top.effect_name} = {top.effect:.2f}) more strongly than with any clinical column ({versus}): the "
            f"clusters may follow the scanner, the protocol or the body rather than the disease. Check the plots, and "
            f"consider harmonising acquisition or registering (clam train --register) before reading the clusters.")


def _p(value: float | None) -> str:
    """A p-value as short text."""
    if value is None:
        return ""
    return "< 0.0001" if value < 1e-4 else f"{value:.4f}"


# --- reading a mapped cohort and a clinical table -------------------------------------------------

@dataclass
class Cohort:
    """The mapped scans of a `clam map` folder: ids and clusters of the scans mapped, and the others."""

    ids: list[str]
    clusters: list[int]
    k: int
    records: list[dict[str, Any]]
    failed: list[str]


def read_cohort(folder: str | Path) -> Cohort:
    """Ids, clusters and per-scan records (result.json) of the scans a `clam map` folder mapped."""
    root = Path(folder)
    k, rows = read_assignments(root)
    table = root / "assignments.csv"
    ids, clusters, records, failed = [], [], [], []
    for row in rows:
        if row["status"] != "ok" or not row["cluster"].strip():
            failed.append(row["id"])
            continue
        ids.append(row["id"])
        clusters.append(int(row["cluster"]))
        record: dict[str, Any] = {}
        result = root / "scans" / row["id"] / "result.json"
        if is_inside(result, root / "scans") and result.is_file():
            try:
                record = json.loads(result.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                record = {}
        record["lung_volume_l"] = _as_float(row.get("lung_volume_l"))
        records.append(record)
    if not ids:
        raise InputError(f"{table} has no mapped scans (status ok); run `clam map` first or check its log.")
    return Cohort(ids, clusters, max(k, max(clusters) + 1), records, failed)


def _study_year(text: Any) -> float | None:
    """An ISO date as a decimal year."""
    try:
        day = date.fromisoformat(str(text))
    except ValueError:
        return None
    return round(day.year + (day.timetuple().tm_yday - 1) / 365.25, 3)


SCAN_COLUMNS = (
    # (column name, source, kind, value from a scan's record)
    ("lung volume (L)", "anatomy", "continuous", lambda r: r.get("lung_volume_l")),
    ("mean lung HU", "anatomy", "continuous", lambda r: r.get("acquisition", {}).get("mean_lung_hu")),
    ("body cross-section (cm^2)", "anatomy", "continuous", lambda r: r.get("acquisition", {}).get("body_area_cm2")),
    ("enhanced soft-tissue share", "acquisition", "continuous",
     lambda r: r.get("acquisition", {}).get("enhanced_share")),
    ("pixel spacing (mm)", "acquisition", "continuous", lambda r: r.get("acquisition", {}).get("pixel_spacing_mm")),
    ("slice thickness (mm)", "acquisition", "continuous",
     lambda r: r.get("acquisition", {}).get("slice_thickness_mm", r.get("acquisition", {}).get("slice_spacing_mm"))),
    ("slices", "acquisition", "continuous", lambda r: r.get("acquisition", {}).get("slices")),
    ("manufacturer", "acquisition", "categorical", lambda r: r.get("acquisition", {}).get("manufacturer")),
    ("scanner model", "acquisition", "categorical", lambda r: r.get("acquisition", {}).get("scanner_model")),
    ("reconstruction kernel", "acquisition", "categorical", lambda r: r.get("acquisition", {}).get("kernel")),
    ("kVp", "acquisition", "categorical", lambda r: r.get("acquisition", {}).get("kvp")),
    ("contrast agent", "acquisition", "categorical",
     lambda r: (("yes" if str(r["acquisition"].get("contrast_agent") or "").strip() else "no")
                if r.get("acquisition", {}).get("dicom") else None)),
    ("study date (year)", "acquisition", "continuous",
     lambda r: _study_year(r.get("acquisition", {}).get("study_date"))),
)
"""The columns every mapped scan carries, tested always (missing where a scan's record lacks them)."""


def scan_columns(cohort: Cohort) -> list[Column]:
    """The acquisition and anatomy columns of a cohort, from the scans' records."""
    return [Column(name, source, [get(r) for r in cohort.records], kind)
            for name, source, kind, get in SCAN_COLUMNS]


@dataclass
class Clinical:
    """A clinical table joined to the mapped scans: its columns and the ids that did not match."""

    columns: list[Column]
    id_column: str
    not_mapped: list[str]
    not_in_table: list[str]


def read_clinical(path: str | Path, id_column: str, cohort: Cohort, categorical: Sequence[str] = (),
                  continuous: Sequence[str] = ()) -> Clinical:
    """The clinical CSV's columns as one value per mapped scan, matched by `id_column` (exactly, or as the id
    `clam map` makes of a name); ids found on one side only are listed."""
    source = Path(path)
    header, by_id = read_id_table(source, id_column)
    for name in (*categorical, *continuous):
        if name not in header:
            raise InputError(f"--categorical/--continuous name {name!r}, which is not a column of {source}.")
    both = set(categorical) & set(continuous)
    if both:
        raise InputError(f"columns {sorted(both)} are declared both categorical and continuous; choose one.")
    at = header.index(id_column)
    matched = match_ids(cohort.ids, by_id)
    used_keys = {row[at] for row in matched if row is not None}
    columns = []
    for j, name in enumerate(header):
        if j == at:
            continue
        kind = "categorical" if name in categorical else "continuous" if name in continuous else None
        values = [row[j] if row is not None else None for row in matched]
        columns.append(Column(name, "clinical", values, kind))
    return Clinical(columns, id_column, sorted(k for k in by_id if k not in used_keys),
                    [scan_id for scan_id, row in zip(cohort.ids, matched) if row is None])


# --- outputs --------------------------------------------------------------------------------------

@dataclass
class Association:
    """Everything `clam associate` found, ready to write."""

    k: int
    n_scans: int
    outcomes: list[Outcome]
    warning: str
    not_mapped: list[str] = field(default_factory=list)
    not_in_table: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    clinical_table: str = ""
    id_column: str = ""
    clusters: list[int] = field(default_factory=list, repr=False)

    @property
    def tested(self) -> list[Outcome]:
        """Tested columns, smallest adjusted p first."""
        return sorted((o for o in self.outcomes if not o.skipped), key=lambda o: (o.p_adjusted, o.name))

    def adjustment(self) -> str:
        """How the p-values were adjusted, in words."""
        return (f"Benjamini-Hochberg (false discovery rate) over the {len(self.tested)} columns tested "
                "(clinical, acquisition and anatomy together)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"clusters": self.k, "scans": self.n_scans, "clinical_table": self.clinical_table,
                "id_column": self.id_column, "adjustment": self.adjustment(), "warning": self.warning,
                "columns": [o.to_dict() for o in self.tested],
                "skipped": [{"name": o.name, "source": o.source, "reason": o.skipped, "missing": o.missing}
                            for o in self.outcomes if o.skipped],
                "ids": {"in_table_not_mapped": self.not_mapped, "mapped_not_in_table": self.not_in_table,
                        "failed_in_mapping": self.failed}}


def associate(maps: str | Path, clinical: str | Path | None = None, id_column: str = "id",
              categorical: Sequence[str] = (), continuous: Sequence[str] = ()) -> Association:
    """Test the clinical table's columns (if any) and the scans' own columns against the clusters of a map folder."""
    cohort = read_cohort(maps)
    columns, table = [], None
    if clinical is not None:
        table = read_clinical(clinical, id_column, cohort, categorical, continuous)
        columns = table.columns
    columns = [*columns, *scan_columns(cohort)]
    outcomes = analyse_columns(columns, cohort.clusters, cohort.k)
    return Association(cohort.k, len(cohort.ids), outcomes, acquisition_warning(outcomes),
                       table.not_mapped if table else [], table.not_in_table if table else [], cohort.failed,
                       str(clinical) if clinical is not None else "", id_column if clinical is not None else "",
                       list(cohort.clusters))


def write_association(result: Association, out: str | Path, plots: bool = True) -> list[Path]:
    """association.md, .csv and .json, and association/<column>.png plus association/overview.png, into `out`."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    pictures = _picture_names(result.tested) if plots else {}
    written = [_write_csv(result, output_path(root, "association.csv"))]
    data = result.to_dict()
    for column in data["columns"]:
        column["plot"] = f"association/{pictures[column['name']]}" if column["name"] in pictures else ""
    target = output_path(root, "association.json")
    with atomic_path(target) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    written.append(target)
    if plots:
        from .association_plots import column_plot, overview_plot

        for o in result.tested:
            written.append(column_plot(o, result.clusters, result.k, output_path(root, "association",
                                                                                  pictures[o.name])))
        if result.tested:
            written.append(overview_plot(result.tested, result.clusters, result.k,
                                         output_path(root, "association", "overview.png")))
    written.append(_write_markdown(result, output_path(root, "association.md"), pictures))
    return written


def _picture_names(outcomes: Sequence[Outcome]) -> dict[str, str]:
    """A distinct, safe PNG file name per column."""
    names: dict[str, str] = {}
    taken = {"overview.png"}
    for o in outcomes:
        base = safe_id(f"{o.source}_{o.name}", "column")
        name, i = f"{base}.png", 2
        while name in taken:
            name, i = f"{base}_{i}.png", i + 1
        taken.add(name)
        names[o.name] = name
    return names


def _number(value: float | None, digits: int = 4) -> str:
    """A number as short text ('' for None)."""
    return "" if value is None else f"{value:.{digits}g}"


def _summary(o: Outcome) -> str:
    """Per-cluster summary: median [Q1, Q3] for continuous, counts per level for categorical."""
    parts = []
    for g in o.groups:
        if o.kind == "continuous":
            text = (f"{_number(g['median'])} [{_number(g['q1'])}, {_number(g['q3'])}]" if g["n"] else "-")
        else:
            text = ", ".join(f"{level} {count}" for level, count in g["counts"].items() if count) or "-"
        extra = f"; {g['missing']} missing" if g["missing"] else ""
        parts.append(f"c{g['cluster']} (n {g['n']}{extra}): {text}")
    return "; ".join(parts)


def _write_csv(result: Association, path: Path) -> Path:
    """One row per column: test, statistic, p, adjusted p, effect, n, missing, per-cluster summary or skip reason."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["column", "source", "kind", "test", "statistic", "p", "p_adjusted_bh", "effect_name", "effect",
                    "reference_test", "reference_p", "reference_effect", "n", "missing", "per_cluster", "skipped",
                    "note"])
        for o in [*result.tested, *(o for o in result.outcomes if o.skipped)]:
            ref = o.reference if o.kind == "continuous" else {}
            w.writerow([o.name, o.source, o.kind, o.test, _number(o.statistic, 6), _number(o.p, 6),
                        _number(o.p_adjusted, 6), o.effect_name, _number(o.effect, 4), ref.get("test", ""),
                        _number(ref.get("p"), 6), _number(ref.get("effect"), 4), o.n, o.missing,
                        _summary(o) if not o.skipped else "", o.skipped, o.note])
    return path


def _write_markdown(result: Association, path: Path, pictures: dict[str, str]) -> Path:
    """The report as Markdown: warning, results table, skipped columns, unmatched ids, plots."""
    lines = ["# What the clusters are associated with", "",
             f"{result.n_scans} mapped scans in {result.k} clusters"
             + (f"; clinical table {Path(result.clinical_table).name} joined on {result.id_column!r}"
                if result.clinical_table else "; no clinical table given") + ".",
             f"P-values adjusted: {result.adjustment()}. Continuous columns: Kruskal-Wallis with epsilon^2 "
             "(ANOVA's p and eta^2 for reference); categorical: chi-square, or Fisher's exact test for a sparse "
             "2 x 2 table, with Cramer's V. Per cluster: median [Q1, Q3] or counts.", ""]
    if result.warning:
        lines += [f"> **Warning.** {result.warning}", ""]
    lines += ["| column | source | test | p | adjusted p | effect | n | missing | per cluster |",
              "|---|---|---|---|---|---|---|---|---|"]
    for o in result.tested:
        ref = (f"; ANOVA p {_p(o.reference.get('p'))}, eta^2 {_number(o.reference.get('effect'), 2)}"
               if o.kind == "continuous" else "")
        lines.append(f"| {_cell(o.name)} | {o.source} | {o.test} | {_p(o.p)} | {_p(o.p_adjusted)} | "
                     f"{o.effect_name} {o.effect:.2f}{ref} | {o.n} | {o.missing} | {_cell(_summary(o))} |")
    skipped = [o for o in result.outcomes if o.skipped]
    if skipped:
        lines += ["", "## Not tested", "", "| column | source | reason |", "|---|---|---|"]
        lines += [f"| {_cell(o.name)} | {o.source} | {_cell(o.skipped)} |" for o in skipped]
    notes = [o for o in result.tested if o.note]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {o.name}: {o.note}" for o in notes]
    if result.clinical_table:
        lines += ["", "## Ids", "", f"- in the clinical table but not mapped ({len(result.not_mapped)}): "
                  f"{', '.join(result.not_mapped) or 'none'}",
                  f"- mapped but not in the clinical table ({len(result.not_in_table)}): "
                  f"{', '.join(result.not_in_table) or 'none'}"]
    if result.failed:
        lines += [f"- failed in mapping, left out ({len(result.failed)}): {', '.join(result.failed)}"]
    if pictures:
        lines += ["", "## Plots", "", "![overview](association/overview.png)", ""]
        lines += [f"![{_cell(o.name)}](association/{pictures[o.name]})" for o in result.tested]
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")
