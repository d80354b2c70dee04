"""The cohort report (`clam report`, `clam map --report`): what its pages hold, every file there, reruns reuse pictures."""

from __future__ import annotations

import csv
import json
import os
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import SimpleITK as sitk
from browser import Browser, find_chromium
from CLAMLib import report as report_module
from CLAMLib.cli import main
from CLAMLib.pictures import average_picture
from CLAMLib.qc import training_report
from cohort_data import MODULE_DIR, write_phantoms

UNSAFE = "<img src=x onerror=alert(1)>"
NAMES = ["Ünïcode scan 1", 'a&b "quoted" \'x\'', UNSAFE, *(f"plain-{i}" for i in range(5))]
FAILED = ("broken scan é", "cannot read <b>header</b>")


class Page(HTMLParser):
    """What a report page holds: the scans of its galleries, every link and image, its text."""

    def __init__(self) -> None:
        super().__init__()
        self.scans: list[str] = []
        self.urls: list[str] = []
        self.images: list[dict] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "figure" and "scan" in (a.get("class") or "").split():
            self.scans.append(a["data-id"])
        for key in ("src", "href"):
            if a.get(key):
                self.urls.append(a[key])
        if tag == "img":
            self.images.append(a)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _pages(report: Path) -> dict[str, Page]:
    """Every HTML page of a report, parsed."""
    pages = {}
    for path in sorted(report.glob("*.html")):
        page = Page()
        page.feed(path.read_text(encoding="utf-8"))
        pages[path.name] = page
    return pages


def _check_links(report: Path, pages: dict[str, Page]) -> None:
    """Every link and image is a relative path to a file inside the report folder (or an anchor)."""
    for name, page in pages.items():
        for url in page.urls:
            parts = urlsplit(url)
            assert not parts.scheme and not parts.netloc, f"{name}: {url} leaves the folder"
            if not parts.path:
                assert parts.fragment, url
                continue
            target = (report / unquote(parts.path)).resolve()
            assert report.resolve() in target.parents, f"{name}: {url} is outside the report"
            assert target.is_file(), f"{name}: {url} is a broken link"


def _ct(path: Path, seed: int) -> Path:
    """A small CT-like volume in HU (air, a body, two lungs)."""
    rng = np.random.default_rng(seed)
    values = np.full((12, 28, 32), -1000, np.int16)
    values[:, 4:24, 3:29] = 40
    values[1:11, 7:21, 5:14] = -850
    values[1:11, 7:21, 18:27] = -850
    values += rng.integers(-20, 20, values.shape).astype(np.int16)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((10.0, 10.0, 20.0))
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def maps(tmp_path: Path) -> Path:
    """A `clam map` folder (k = 2) whose scans have names with spaces, non-ASCII and HTML; pictures not yet made."""
    out = tmp_path / "maps ü folder"
    model = tmp_path / "model"
    training_report({"k": 2, "n_subjects": 7, "cluster_sizes": [4, 3], "pretrain_loss": [1.0, 0.5],
                     "finetune_loss": [0.4, 0.3], "k_table": [{"k": 2, "silhouette": 0.7, "chosen": True},
                                                              {"k": 3, "silhouette": 0.5, "chosen": False}]},
                    model / "report")
    (out / "clusters").mkdir(parents=True)
    rows = []
    for i, name in enumerate(NAMES):
        folder = out / "scans" / name
        folder.mkdir(parents=True)
        ct = _ct(tmp_path / f"ct{i}.nrrd", i)
        blob = np.zeros((12, 28, 32), np.float32)
        blob[3 + i % 5, 10:14, 8 + i:12 + i] = 1.0
        c = i % 2
        m = sitk.GetImageFromArray(blob)
        m.CopyInformation(sitk.ReadImage(str(ct)))
        sitk.WriteImage(m, str(folder / f"map_cluster{c}.nrrd"))
        (folder / ".done").write_text(json.dumps({"id": name, "source": str(ct)}))
        from matplotlib.image import imsave

        imsave(str(folder / "qc.png"), np.zeros((8, 8)))
        q = 0.55 if i == 3 else 0.9 - 0.02 * i
        rows.append([name, c, *((q, 1 - q) if c == 0 else (1 - q, q)), "4.2", "ok", ""])
    rows.append([FAILED[0], "", "", "", "", "failed", FAILED[1]])
    with open(out / "assignments.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "cluster", "q0", "q1", "lung_volume_l", "status", "reason"])
        w.writerows(rows)
    for c in range(2):
        average_picture(np.random.default_rng(c).random((8, 8, 8)), out / "clusters" / f"average_cluster{c}.png",
                        f"cluster {c}", np.ones((8, 8, 8)))
    (out / "model_card.json").write_text(json.dumps({"model": str(model), "method": "default", "clusters": "all",
                                                     "card": {"k": 2, "grid": 32, "trained_on": "7 scans <test>"}}))
    (out / "association").mkdir()
    (out / "association.csv").write_text("column,test,p_adjusted\nage,Kruskal-Wallis,0.004\nsex <m/f>,chi-square,0.5\n")
    from matplotlib.image import imsave

    for name in ("overview", "age"):
        imsave(str(out / "association" / f"{name}.png"), np.ones((10, 20)))
    return out


def test_report_holds_every_scan_once_with_every_file_and_escapes_names(maps: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report_module, "PAGE", 3)  # each cluster (4 scans) has two gallery pages
    index = report_module.build_report(maps)
    report = maps / "report"
    assert index == report / "index.html"
    pages = _pages(report)
    assert set(pages) == {"index.html", "cluster0-page2.html", "cluster1-page2.html"}
    shown = [s for page in pages.values() for s in page.scans]
    assert sorted(shown) == sorted(NAMES)  # every mapped scan once, names intact
    _check_links(report, pages)
    html = "".join(p.read_text(encoding="utf-8") for p in report.glob("*.html"))
    assert UNSAFE not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<b>header</b>" not in html and "<script" not in html
    text = " ".join(pages["index.html"].text)
    assert FAILED[0] in text and FAILED[1] in text  # the failed scan and its reason
    assert "7 scans <test>" in text and "Kruskal-Wallis" in text and "sex <m/f>" in text  # card, association
    assert "uncertain" in text  # the scan at q 0.55
    images = [i for p in pages.values() for i in p.images]
    for name in NAMES:  # each scan's axial thumbnail, and coronal and sagittal on demand
        views = {i["alt"].split(" view")[0] for i in images if i.get("alt", "").endswith(f"map of {name}")}
        assert views == {"axial", "coronal", "sagittal"}, name
    thumbs = [i for i in images if "view of the map" in i.get("alt", "")]
    assert all(i.get("loading") == "lazy" and int(i["width"]) <= 160 for i in thumbs)
    srcs = {i["src"] for i in pages["index.html"].images}
    assert {"clusters/average_cluster0.png", "clusters/average_cluster1.png", "training/loss_curves.png",
            "association/plots/overview.png", "association/plots/age.png"} <= srcs
    for name in NAMES:  # map pictures are also written beside the scan's maps
        assert (maps / "scans" / name / "map.png").stat().st_size > 1000


def test_rerun_reuses_pictures_and_remakes_changed_ones(maps: Path) -> None:
    report_module.build_report(maps)
    pictures = sorted(maps.glob("scans/*/map*.png")) + sorted((maps / "report").rglob("*.png"))
    before = {p: p.stat().st_mtime_ns for p in pictures}
    report_module.build_report(maps)
    assert {p: p.stat().st_mtime_ns for p in pictures} == before
    changed = maps / "scans" / NAMES[0] / "map_cluster0.nrrd"
    picture = maps / "scans" / NAMES[0] / "map.png"
    later = picture.stat().st_mtime + 5
    os.utime(changed, (later, later))  # as if the scan was mapped again after its picture was made
    report_module.build_report(maps)
    remade = {p for p in pictures if p.stat().st_mtime_ns != before[p]}
    copy = next(p for p in (maps / "report" / "scans").glob("*/map.png") if p.read_bytes() == picture.read_bytes())
    assert picture in remade and copy in remade
    assert {p.parent for p in remade} == {picture.parent, copy.parent}  # only that scan's pictures


def test_scan_without_a_source_shows_why_it_has_no_picture(maps: Path) -> None:
    (maps / "scans" / "plain-2" / ".done").unlink()
    report_module.build_report(maps)
    text = (maps / "report" / "index.html").read_text(encoding="utf-8")
    assert "no map picture: the scan&#x27;s source is not recorded" in text
    _check_links(maps / "report", _pages(maps / "report"))


def test_report_of_a_folder_that_is_not_map_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "assignments.csv not found" in capsys.readouterr().err


def test_clam_map_report_on_phantoms(tmp_path: Path) -> None:
    paths = write_phantoms(tmp_path / "scans ü", n_per_cluster=2)
    spaced = paths[0].with_name("patient ü 1.nrrd")
    paths[0].rename(spaced)
    out = tmp_path / "maps ü"
    bundle = MODULE_DIR.parent / "models" / "clam-demo"
    assert main(["map", str(bundle), str(tmp_path / "scans ü"), "--out", str(out), "--device", "cpu", "--quiet",
                 "--report"]) == 0
    with open(out / "assignments.csv", newline="", encoding="utf-8") as f:
        ids = [r["id"] for r in csv.DictReader(f)]
    assert len(ids) == 4
    for scan_id in ids:
        assert (out / "scans" / scan_id / "map.png").stat().st_size > 1000
    pages = _pages(out / "report")
    assert sorted(s for p in pages.values() for s in p.scans) == sorted(ids)
    _check_links(out / "report", pages)
    text = " ".join(pages["index.html"].text)
    assert "40 simulated chest CT phantoms" in text  # the model card, from the bundle clam map used
    files = sorted((out / "report").rglob("*.png"))
    before = {p: p.stat().st_mtime_ns for p in files}
    assert main(["report", str(out), "--quiet"]) == 0
    assert {p: p.stat().st_mtime_ns for p in files} == before  # nothing made again
    for picture in out.glob("scans/*/map*.png"):
        picture.unlink()
    assert main(["map", str(bundle), str(tmp_path / "scans ü"), "--out", str(out), "--device", "cpu", "--quiet",
                 "--redo"]) == 0  # scans from the preprocessing cache: read again for their pictures
    assert any((out / "cache").iterdir())
    for scan_id in ids:
        assert (out / "scans" / scan_id / "map.png").stat().st_size > 1000
        assert (out / "scans" / scan_id / "map_axial.png").is_file()


def test_report_in_headless_chromium(maps: Path, tmp_path: Path) -> None:
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium); the DOM tests above ran without it")
    report_module.build_report(maps)
    report = (maps / "report").resolve()
    with Browser(executable) as browser:
        browser.open((report / "index.html").as_uri())
        assert browser.screenshot(tmp_path / "report.png").stat().st_size > 10_000
        ids = browser.evaluate("Array.from(document.querySelectorAll('figure.scan')).map(f => f.dataset.id)")
        assert sorted(ids) == sorted(NAMES)
        assert browser.evaluate("document.querySelectorAll('script').length") == 0
        broken = browser.evaluate(
            "(async () => { document.querySelectorAll('details').forEach(d => d.open = true);"
            " const images = Array.from(document.images); images.forEach(i => i.loading = 'eager');"
            " await Promise.all(images.map(i => i.decode().catch(() => null)));"
            " return images.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src); })()")
        assert broken == []
        requests = browser.requests()
        assert len(requests) > 3 * len(NAMES)
        assert all(url.startswith(report.as_uri() + "/") for url in requests), requests
        assert browser.failures() == []
