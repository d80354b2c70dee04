"""A `clam map` folder as a table of scans (with clinical columns joined): filter, sort, step through; no Slicer.

The Slicer cohort browser (CLAMCohort.py) shows this table and loads the scan of a selected row.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError
from .paths import is_inside, safe_id

MAP_SUFFIXES = (".nrrd", ".nii.gz")
UNCERTAIN_BELOW = 0.6
"""Default threshold of the "uncertain" filter: scans whose highest q is below it."""


def read_id_table(path: str | Path, id_column: str) -> tuple[list[str], dict[str, list[str]]]:
    """A CSV (comma, semicolon or tab separated) as its header and its rows by the text of `id_column`.

    Empty rows are dropped, short rows padded; a missing id column or a repeated id is an InputError.
    """
    source = Path(path)
    if not source.is_file():
        raise InputError(f"clinical table {source} not found; give a CSV file with one row per patient.")
    text = source.read_text(encoding="utf-8-sig", errors="replace")
    try:
        dialect = csv.Sniffer().sniff(text[:8192], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    rows = list(csv.reader(text.splitlines(), dialect))
    if len(rows) < 2:
        raise InputError(f"clinical table {source} has no data rows; it needs a header row and one row per patient.")
    header = [h.strip() or f"column {i + 1}" for i, h in enumerate(rows[0])]
    if id_column not in header:
        raise InputError(f"clinical table {source} has no column {id_column!r}; its columns are "
                         f"{', '.join(map(repr, header))}: name the id column with --id-column.")
    at = header.index(id_column)
    by_id: dict[str, list[str]] = {}
    duplicates = []
    for row in rows[1:]:
        if not any(cell.strip() for cell in row):
            continue
        row = [cell.strip() for cell in row] + [""] * (len(header) - len(row))
        if row[at] in by_id:
            duplicates.append(row[at])
        by_id[row[at]] = row
    if duplicates:
        raise InputError(f"clinical table {source} repeats the ids {sorted(set(duplicates))[:10]} in column "
                         f"{id_column!r}; give one row per scan.")
    return header, by_id


def match_ids(scan_ids: Sequence[str], by_id: dict[str, list[str]]) -> list[list[str] | None]:
    """The table row of each scan id: matched exactly, or as the id `clam map` makes of the table's id."""
    lookup = dict(by_id)
    for key, row in by_id.items():
        lookup.setdefault(safe_id(key), row)
    return [lookup.get(scan_id) for scan_id in scan_ids]


def _number(text: Any) -> float | None:
    """Text as a finite float, or None."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_assignments(folder: Path, verb: str = "give") -> tuple[int, list[dict[str, str]]]:
    """The number of clusters (q columns) and the rows of a `clam map` folder's assignments.csv."""
    table = folder / "assignments.csv"
    if not table.is_file():
        raise InputError(f"{table} not found: {verb} the --out folder of `clam map` (it holds assignments.csv).")
    with open(table, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        rows = list(reader)
    if not {"id", "cluster", "status"} <= set(header):
        raise InputError(f"{table} lacks the columns id, cluster and status: is it the assignments.csv of `clam map`?")
    return sum(1 for name in header if name.startswith("q") and name[1:].isdigit()), rows


@dataclass
class ScanRow:
    """One scan of a mapped cohort: what assignments.csv and result.json say, and its clinical values."""

    id: str
    cluster: int | None
    q: list[float]
    lung_volume_l: float | None
    status: str
    reason: str
    source: str = ""
    clinical: dict[str, str] = field(default_factory=dict)

    @property
    def q_max(self) -> float | None:
        """The highest soft assignment (how sure the model is of the cluster)."""
        return max(self.q) if self.q else None


class CohortTable:
    """The scans of a `clam map` output folder, their files, and the table's filters and sorting."""

    def __init__(self, folder: Path, k: int, rows: list[ScanRow], clinical_columns: list[str]) -> None:
        """A table; use CohortTable.read(folder) to make one from disk."""
        self.folder, self.k, self.rows, self.clinical_columns = folder, k, rows, clinical_columns
        self._by_id = {row.id: row for row in rows}

    @classmethod
    def read(cls, folder: str | Path, clinical: str | Path | None = None, id_column: str = "id") -> CohortTable:
        """Read assignments.csv and each scan's result.json; join a clinical CSV on `id_column` if given."""
        root = Path(folder)
        k, records = read_assignments(root, "open")
        rows = []
        for r in records:
            q = [_number(r.get(f"q{c}")) for c in range(k)]
            cluster = r["cluster"].strip()
            rows.append(ScanRow(r["id"], int(cluster) if cluster else None,
                                [v for v in q if v is not None] if all(v is not None for v in q) else [],
                                _number(r.get("lung_volume_l")), r["status"], r.get("reason", ""),
                                _source(root, r["id"])))
        columns: list[str] = []
        if clinical is not None:
            names, by_id = read_id_table(clinical, id_column)
            at = names.index(id_column)
            columns = [name for j, name in enumerate(names) if j != at]
            for row, found in zip(rows, match_ids([row.id for row in rows], by_id)):
                if found is not None:
                    row.clinical = {name: found[j] for j, name in enumerate(names) if j != at}
        return cls(root, k, rows, columns)

    def row(self, scan_id: str) -> ScanRow:
        """The row of a scan id; KeyError naming the id if the cohort has none."""
        if scan_id not in self._by_id:
            raise KeyError(f"no scan {scan_id!r} in {self.folder}")
        return self._by_id[scan_id]

    def columns(self) -> list[str]:
        """Column names of the table, in display order."""
        return ["id", "cluster", *[f"q{c}" for c in range(self.k)], "q max", "lung volume (L)", "status", "reason",
                *self.clinical_columns]

    def value(self, row: ScanRow, column: str) -> Any:
        """A cell's value: a number where it is one, else text; None when empty."""
        if column == "id":
            return row.id
        if column == "cluster":
            return row.cluster
        if column.startswith("q") and column[1:].isdigit():
            c = int(column[1:])
            return row.q[c] if c < len(row.q) else None
        if column == "q max":
            return row.q_max
        if column == "lung volume (L)":
            return row.lung_volume_l
        if column in ("status", "reason"):
            return getattr(row, column) or None
        text = row.clinical.get(column, "")
        number = _number(text)
        return number if number is not None else (text or None)

    def text(self, row: ScanRow, column: str) -> str:
        """A cell as shown: numbers with up to 3 decimals, empty for missing."""
        value = self.value(row, column)
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.3f}".rstrip("0").rstrip(".") if column != "lung volume (L)" else f"{value:.2f}"
        return str(value)

    def filtered(self, cluster: int | None = None, status: str | None = None,
                 uncertain_below: float | None = None) -> list[ScanRow]:
        """Rows of one cluster and/or status; with uncertain_below, only those whose highest q is below it."""
        rows = self.rows
        if cluster is not None:
            rows = [r for r in rows if r.cluster == cluster]
        if status:
            rows = [r for r in rows if r.status == status]
        if uncertain_below is not None:
            rows = [r for r in rows if r.q_max is not None and r.q_max < uncertain_below]
        return rows

    def sorted(self, rows: Sequence[ScanRow], column: str, descending: bool = False) -> list[ScanRow]:
        """Rows sorted by a column: numbers by value before texts, empty cells last either way."""
        def key(row: ScanRow) -> tuple:
            value = self.value(row, column)
            if isinstance(value, (int, float)):
                return (0, float(value), "")
            return (1, 0.0, str(value))

        present = [r for r in rows if self.value(r, column) is not None]
        empty = [r for r in rows if self.value(r, column) is None]
        return sorted(present, key=key, reverse=descending) + empty

    def scan_folder(self, scan_id: str) -> Path:
        """The scan's output folder (scans/ID), checked to lie inside the cohort folder."""
        folder = self.folder / "scans" / scan_id
        if not is_inside(folder, self.folder / "scans"):
            raise InputError(f"scan id {scan_id!r} points outside {self.folder / 'scans'}; the output was altered")
        return folder

    def map_path(self, scan_id: str, cluster: int) -> Path | None:
        """The scan's map of a cluster on its own grid, or None if it was not written."""
        for suffix in MAP_SUFFIXES:
            path = self.scan_folder(scan_id) / f"map_cluster{cluster}{suffix}"
            if path.is_file():
                return path
        return None

    def mapped_clusters(self, scan_id: str) -> list[int]:
        """The clusters whose maps the scan has."""
        return [c for c in range(self.k) if self.map_path(scan_id, c) is not None]

    def qc_path(self, scan_id: str) -> Path | None:
        """The scan's lung-mask QC picture, or None."""
        path = self.scan_folder(scan_id) / "qc.png"
        return path if path.is_file() else None

    def average_path(self, cluster: int) -> Path | None:
        """The cluster-average map (model grid), or None."""
        path = self.folder / "clusters" / f"average_cluster{cluster}.nrrd"
        return path if path.is_file() else None

    def cohort_mean_path(self) -> Path | None:
        """The model's cohort mean image on the model grid, or None (maps made before it was written)."""
        path = self.folder / "clusters" / "cohort_mean.nrrd"
        return path if path.is_file() else None


def _source(root: Path, scan_id: str) -> str:
    """Where the scan was read from, as its result.json (or, for older outputs, its done marker) records."""
    folder = root / "scans" / scan_id
    if not is_inside(folder, root / "scans"):
        return ""
    for name in ("result.json", ".done"):
        try:
            source = json.loads((folder / name).read_text(encoding="utf-8")).get("source", "")
        except (OSError, ValueError, AttributeError):
            continue
        if source:
            return str(source)
    return ""


def step(ids: Sequence[str], current: str | None, offset: int) -> str | None:
    """The id `offset` places from `current` in `ids` (wrapping around); the first id when current is not in it."""
    if not ids:
        return None
    if current not in ids:
        return ids[0] if offset >= 0 else ids[-1]
    return ids[(list(ids).index(current) + offset) % len(ids)]
