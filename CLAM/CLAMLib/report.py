"""The cohort report: a folder of plain HTML, CSS and PNG files, opened from disk in any browser, of `clam map` output.

Layout, inside the maps folder:
    report/index.html                    model card, clusters table, cluster averages, galleries, failed scans,
                                         association results and the training report when they exist
    report/cluster{c}-page{p}.html       further gallery pages of cluster c when it has more than PAGE scans
    report/report.css                    the page's style
    report/scans/<name>/                 each scan's map picture, its thumbnails and its QC picture
    report/clusters/, association/, training/   the pictures and tables the page shows
Files are hard links to the maps folder's own files where the file system allows, copies elsewhere; a rerun
replaces only what changed, so a large cohort's pictures are made once.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

from . import cohort_table
from .errors import CLAMError, InputError
from .paths import inside, is_safe_id, safe_id
from .pictures import THUMBNAILS

CARD = "model_card.json"
"""File in the maps folder, written by `clam map`: the model's card, its bundle folder and the map settings."""
PAGE = 200
"""Scans per gallery page: index.html holds each cluster's first page, cluster{c}-page{p}.html the others."""
UNCERTAIN = 0.6
"""A scan is uncertain when its highest soft assignment q is below this."""
PICTURES = ("map.png", *THUMBNAILS, "qc.png")
STYLE = """\
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ccc; } h3 { margin-top: 1.2em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f2f2f2; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; } dt { font-weight: bold; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
figure.scan { width: 172px; margin: 0; padding: 5px; border: 1px solid #ddd; border-radius: 4px; font-size: 0.8em; }
figure.scan img { display: block; background: #000; max-width: 160px; height: auto; }
figure.scan figcaption { overflow-wrap: anywhere; margin-top: 3px; }
figure.scan .id { font-weight: bold; } .uncertain { color: #b35900; font-weight: bold; }
.missing { width: 160px; height: 80px; background: #eee; color: #666; padding: 4px; box-sizing: border-box; }
details summary { cursor: pointer; color: #0645ad; } details img { margin-top: 4px; }
img.wide { max-width: min(100%, 900px); height: auto; } .pages a, .pages b { margin-right: 0.6em; } .note { color: #555; }
"""


@dataclass
class Row:
    """One scan of assignments.csv."""

    id: str
    status: str
    cluster: Optional[int]
    q: list[float]
    lung_volume_l: str
    reason: str
    folder: str = ""
    pictures: dict[str, str] = field(default_factory=dict)
    missing: str = ""

    @property
    def top(self) -> float:
        """The highest soft assignment (0 for a failed scan)."""
        return max(self.q) if self.q else 0.0


def read_assignments(maps: Path) -> tuple[int, list[Row]]:
    """k and the rows of a maps folder's assignments.csv; InputError naming what is wrong."""
    k, records = cohort_table.read_assignments(maps)
    if k == 0:
        raise InputError(f"{maps / 'assignments.csv'} has no q0.. columns: it is not `clam map` output")
    rows = []
    for r in records:
        ok = r["status"] == "ok" and r["cluster"] not in ("", None)
        rows.append(Row(r["id"], r["status"], int(r["cluster"]) if ok else None,
                        [float(r[f"q{c}"]) for c in range(k)] if ok else [], r.get("lung_volume_l") or "",
                        r.get("reason") or ""))
    return k, rows


def _name(scan_id: str) -> str:
    """The scan's folder name in the report: its id when that is a safe name, else a safe name made unique."""
    if is_safe_id(scan_id):
        return scan_id
    return f"{safe_id(scan_id)}_{hashlib.sha256(scan_id.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


def _place(source: Path, target: Path) -> bool:
    """Put `source` at `target` (hard link, else copy) unless an up-to-date one is there; False if no source."""
    if not source.is_file():
        return False
    if target.is_file():
        a, b = source.stat(), target.stat()
        if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) or (a.st_size == b.st_size and b.st_mtime >= a.st_mtime):
            return True
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, target)
    return True


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG file, from its header."""
    with open(path, "rb") as f:
        head = f.read(24)
    return struct.unpack(">II", head[16:24]) if head[:8] == b"\x89PNG\r\n\x1a\n" else (160, 160)


def scan_pictures_of(maps: Path, row: Row) -> str:
    """Make a mapped scan's map pictures when they are missing or older than its map; '' or why they cannot be."""
    from .imageio import read_image
    from .overlay import read_map
    from .pictures import scan_pictures

    folder = inside(maps, maps / "scans" / row.id)
    candidates = [folder / f"map_cluster{row.cluster}{suffix}" for suffix in (".nrrd", ".nii.gz")]
    values = next((p for p in candidates if p.is_file()), None)
    if values is None:
        return "no map file of its cluster"
    pictures = [folder / "map.png", *(folder / name for name in THUMBNAILS)]
    newest = values.stat().st_mtime
    if all(p.is_file() and p.stat().st_mtime >= newest for p in pictures[:2]):
        return ""
    try:
        source = json.loads((folder / ".done").read_text(encoding="utf-8")).get("source")
    except (OSError, json.JSONDecodeError):
        source = None
    if not source:
        return "the scan's source is not recorded"
    try:
        scan_pictures(read_image(source), read_map(values), folder,
                      f"{row.id}: map of cluster {row.cluster} (q {row.top:.2f})")
    except (CLAMError, RuntimeError, OSError) as exc:
        return f"its CT could not be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    return ""


def _url(path: str) -> str:
    """A relative file path as an attribute value."""
    return escape(quote(path, safe="/"), quote=True)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[bool] = ()) -> str:
    """An HTML table of escaped cells."""
    out = ["<table><thead><tr>", *(f"<th>{escape(str(h))}</th>" for h in header), "</tr></thead><tbody>"]
    for row in rows:
        cells = [f'<td class="n">{escape(str(v))}</td>' if i < len(numeric) and numeric[i] else
                 f"<td>{escape(str(v))}</td>" for i, v in enumerate(row)]
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</tbody></table>"


def _fmt(value: Any) -> str:
    """Short text of a value from a card."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(_fmt, value))
    return "" if value is None else str(value)


def _card_section(card: dict, model: Optional[Path]) -> str:
    """The model card summary."""
    if not card and model is None:
        return ('<section id="model"><h2>Model</h2><p class="note">No model card: the maps folder has no '
                "model_card.json (written by `clam map` since the report exists); give --model BUNDLE.</p></section>")
    inner = card.get("card", {}) if isinstance(card.get("card"), dict) else {}
    items = [("model", model.name if model else ""), ("clusters (k)", inner.get("k")), ("model grid", inner.get("grid")),
             ("dimensions", inner.get("ndim")), ("registration", inner.get("register")),
             ("trained on", inner.get("trained_on")), ("cluster sizes in training", inner.get("cluster_sizes")),
             ("silhouette", inner.get("silhouette")), ("intended use", inner.get("intended_use")),
             ("not for", inner.get("not_for")), ("map method", card.get("method")),
             ("clusters mapped", card.get("clusters"))]
    body = "".join(f"<dt>{escape(k)}</dt><dd>{escape(_fmt(v))}</dd>" for k, v in items if _fmt(v))
    return f'<section id="model"><h2>Model</h2><dl>{body}</dl></section>'


def _clusters_section(k: int, rows: Sequence[Row], uncertain: float, pages: dict[int, int]) -> str:
    """The table of clusters: size, share, mean q, uncertain scans, and links to the galleries."""
    ok = [r for r in rows if r.status == "ok"]
    lines = []
    for c in range(k):
        members = [r for r in ok if r.cluster == c]
        n = len(members)
        unsure = sum(r.top < uncertain for r in members)
        mean_q = sum(r.q[c] for r in members) / n if n else float("nan")
        lines.append([f"cluster {c}", n, f"{100 * n / len(ok):.1f} %" if ok else "", f"{mean_q:.3f}" if n else "",
                      f"{unsure} ({100 * unsure / n:.0f} %)" if n else ""])
    table = _table(["cluster", "scans", "share of mapped scans", "mean q of its scans",
                    f"uncertain (highest q < {uncertain:g})"], lines, [False, True, True, True, True])
    links = " ".join(f'<a href="#cluster{c}">cluster {c}</a>' for c in range(k) if pages.get(c))
    failed = len(rows) - len(ok)
    note = f', {failed} failed (<a href="#failed">below</a>)' if failed else ""
    return (f'<section id="clusters"><h2>Clusters</h2>{table}<p>{len(ok)} of {len(rows)} scans mapped{note}. '
            f"Galleries: {links}</p></section>")


def _figure(row: Row, c: int, uncertain: float, report: Path) -> str:
    """One scan in a gallery: the axial thumbnail, its q values and links; coronal and sagittal on demand."""
    sid = escape(row.id, quote=True)
    qs = " · ".join((f"<b>q{i} {v:.2f}</b>" if i == c else f"q{i} {v:.2f}") for i, v in enumerate(row.q))
    flag = ' <span class="uncertain">uncertain</span>' if row.top < uncertain else ""
    base = f"scans/{row.folder}/"

    def img(name: str, view: str) -> str:
        width, height = _png_size(report / row.pictures[name])
        return (f'<img src="{_url(base + name)}" loading="lazy" width="{width}" height="{height}" '
                f'alt="{view} view of the map of {sid}">')

    if "map_axial.png" in row.pictures:
        shown = img("map_axial.png", "axial")
        if "map.png" in row.pictures:
            shown = f'<a href="{_url(base + "map.png")}">{shown}</a>'
    else:
        shown = f'<div class="missing">no map picture: {escape(row.missing or "not made")}</div>'
    links = [f'<a href="{_url(base + name)}">{label}</a>' for name, label in (("map.png", "map"), ("qc.png", "QC"))
             if name in row.pictures]
    extra = [img(n, v) for n, v in (("map_coronal.png", "coronal"), ("map_sagittal.png", "sagittal"))
             if n in row.pictures]
    more = f"<details><summary>coronal, sagittal</summary>{''.join(extra)}</details>" if extra else ""
    return (f'<figure class="scan" data-id="{sid}">{shown}<figcaption><span class="id">{escape(row.id)}</span>'
            f"{flag}<br>{qs}<br>{' · '.join(links)}</figcaption>{more}</figure>")


def _page_name(c: int, p: int) -> str:
    """File of page p (from 1) of cluster c's gallery."""
    return "index.html" if p == 1 else f"cluster{c}-page{p}.html"


def _pager(c: int, p: int, count: int) -> str:
    """Links to the pages of a cluster's gallery."""
    if count <= 1:
        return ""
    items = [f"<b>{i}</b>" if i == p else f'<a href="{_page_name(c, i)}#cluster{c}">{i}</a>'
             for i in range(1, count + 1)]
    return f'<p class="pages">pages of cluster {c}: {"".join(items)}</p>'


def _gallery(c: int, members: Sequence[Row], p: int, count: int, uncertain: float, report: Path,
             average: Optional[str]) -> str:
    """A cluster's section: its average map and one page of its scans."""
    head = (f'<section id="cluster{c}"><h2>Cluster {c}</h2><p>{len(members)} scans, sorted by q{c} '
            "(most typical first); click a thumbnail for the full-size map.</p>")
    if average and p == 1:
        head += (f'<h3>Mean map over the cluster</h3><a href="{_url(average)}"><img class="wide" '
                 f'src="{_url(average)}" alt="mean map of cluster {c}"></a><h3>Scans</h3>')
    shown = members[(p - 1) * PAGE: p * PAGE]
    cards = "".join(_figure(r, c, uncertain, report) for r in shown)
    pager = _pager(c, p, count)
    return f'{head}{pager}<div class="gallery">{cards}</div>{pager}</section>'


def _failed_section(rows: Sequence[Row]) -> str:
    """The scans that failed, with their reasons."""
    bad = [r for r in rows if r.status != "ok"]
    if not bad:
        return '<section id="failed"><h2>Failed scans</h2><p>None.</p></section>'
    return ('<section id="failed"><h2>Failed scans</h2>'
            + _table(["id", "reason"], [(r.id, r.reason) for r in bad]) + "</section>")


def _csv_table(path: Path) -> str:
    """A CSV file as an HTML table."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return _table(rows[0], rows[1:]) if rows else ""


def _association_section(maps: Path, report: Path) -> str:
    """`clam associate`'s table and plots, when it has run on this folder."""
    table = maps / "association.csv"
    plots = sorted((maps / "association").glob("*.png")) if (maps / "association").is_dir() else []
    if not table.is_file() and not plots:
        return ""
    parts = ['<section id="association"><h2>What the clusters are associated with</h2>']
    files = []
    for name in ("association.md", "association.csv", "association.json"):
        if _place(maps / name, report / "association" / name):
            files.append(f'<a href="{_url("association/" + name)}">{name}</a>')
    if files:
        parts.append(f"<p>From <code>clam associate</code>: {', '.join(files)}.</p>")
    if table.is_file():
        parts.append(_csv_table(table))
    for plot in sorted(plots, key=lambda p: ("overview" not in p.name, p.name)):
        _place(plot, report / "association" / "plots" / plot.name)
        src = _url(f"association/plots/{plot.name}")
        parts.append(f'<figure><img class="wide" src="{src}" loading="lazy" alt="{escape(plot.stem, quote=True)}">'
                     f"<figcaption>{escape(plot.stem)}</figcaption></figure>")
    return "".join(parts) + "</section>"


def _training_section(model: Optional[Path], report: Path) -> str:
    """The training report's loss curves and k table, when the model folder has one."""
    folder = None if model is None else model / "report"
    if folder is None or not folder.is_dir():
        return ""
    parts = ['<section id="training"><h2>Training</h2>']
    if _place(folder / "loss_curves.png", report / "training" / "loss_curves.png"):
        parts.append('<img class="wide" src="training/loss_curves.png" alt="training loss curves and cluster sizes">')
    if (folder / "k_selection.csv").is_file():
        parts.append("<h3>Choice of k (highest silhouette)</h3>" + _csv_table(folder / "k_selection.csv"))
    if _place(folder / "report.md", report / "training" / "report.md"):
        parts.append('<p>The whole training report: <a href="training/report.md">report.md</a>.</p>')
    return "".join(parts) + "</section>"


def _page(title: str, body: str) -> str:
    """A whole HTML page."""
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{escape(title)}</title><link rel="stylesheet" href="report.css"></head>'
            f"<body>{body}</body></html>\n")


def _write(path: Path, text: str) -> None:
    """Write a text file so that it is either the old or the complete new one."""
    from .imageio import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def build_report(maps: str | os.PathLike, model: str | os.PathLike | None = None, uncertain: float = UNCERTAIN,
                 verbose: bool = False) -> Path:
    """Write MAPS/report/ from a `clam map` output folder (pictures made once, reused on rerun); the index path."""
    from tqdm.auto import tqdm

    maps = Path(maps)
    if not maps.is_dir():
        raise InputError(f"{maps} is not a folder: give the --out folder of a `clam map` run")
    k, rows = read_assignments(maps)
    report = inside(maps, maps / "report")
    try:
        card = json.loads((maps / CARD).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        card = {}
    bundle = Path(model) if model is not None else Path(card["model"]) if card.get("model") else None
    names = set()
    for row in tqdm(rows, desc="report", disable=not verbose, dynamic_ncols=True):
        if row.status != "ok":
            continue
        row.folder = _name(row.id)
        names.add(row.folder)
        row.missing = scan_pictures_of(maps, row)
        source = inside(maps, maps / "scans" / row.id)
        target = inside(report, report / "scans" / row.folder)
        row.pictures = {n: f"scans/{row.folder}/{n}" for n in PICTURES if _place(source / n, target / n)}
    if (report / "scans").is_dir():
        for old in (report / "scans").iterdir():
            if old.name not in names:
                shutil.rmtree(old, ignore_errors=True)
    averages = {}
    for c in range(k):
        if _place(maps / "clusters" / f"average_cluster{c}.png", report / "clusters" / f"average_cluster{c}.png"):
            averages[c] = f"clusters/average_cluster{c}.png"
    members = {c: sorted((r for r in rows if r.cluster == c), key=lambda r: -r.q[c]) for c in range(k)}
    pages = {c: max(1, -(-len(m) // PAGE)) if m else 0 for c, m in members.items()}
    _write(report / "report.css", STYLE)
    ok = sum(r.status == "ok" for r in rows)
    header = (f"<h1>CLAM cohort report</h1><p>{len(rows)} scans from <code>{escape(maps.resolve().name)}</code>, "
              f"{ok} mapped, k = {k}; made {datetime.now().isoformat(timespec='minutes')}. Each scan's picture "
              "shows the map of its own cluster over its CT through the map's maximum; q is the soft assignment "
              "to each cluster.</p>")
    nav = ('<nav><a href="#model">model</a> · <a href="#clusters">clusters</a> · '
           + " · ".join(f'<a href="#cluster{c}">cluster {c}</a>' for c in range(k) if pages[c])
           + ' · <a href="#failed">failed scans</a></nav>')
    body = [header, nav, _card_section(card, bundle), _clusters_section(k, rows, uncertain, pages)]
    body += [_gallery(c, members[c], 1, pages[c], uncertain, report, averages.get(c)) for c in range(k) if pages[c]]
    body += [_failed_section(rows), _association_section(maps, report), _training_section(bundle, report)]
    index = report / "index.html"
    _write(index, _page("CLAM cohort report", "".join(body)))
    written = set()
    for c in range(k):
        for p in range(2, pages[c] + 1):
            gallery = _gallery(c, members[c], p, pages[c], uncertain, report, None)
            _write(report / _page_name(c, p), _page(f"CLAM cohort report: cluster {c}, page {p}",
                                                    f'<p><a href="index.html">back to the report</a></p>{gallery}'))
            written.add(_page_name(c, p))
    for old in report.glob("cluster*-page*.html"):
        if old.name not in written:
            old.unlink()
    return index
