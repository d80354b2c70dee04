"""How long `clam report` takes on a cohort of 1,000 mapped scans, and how light its page stays.

Lays out a synthetic `clam map` output folder of N scans (default 1,000; k = 3; 2 % failed) whose pictures
already exist, as `clam map` leaves them (map.png, three thumbnails and qc.png per scan, made once from one
phantom and copied), then times build_report cold (first build) and warm (rerun: nothing to redo), and counts
what index.html makes a browser load. With Chromium on PATH it also loads the page headless and counts the image
requests made before any scrolling (lazy loading) and the load time. Also times the pictures `clam map` now
makes per scan, on a 512 x 512 x 300 CT (a phantom resampled up; median of 3 calls after a warm-up). Writes JSON to --out.

    python benchmarks/report_1000.py [--scans 1000] [--out benchmarks/results/report_1000.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CLAM"))
sys.path.insert(0, str(ROOT / "CLAM" / "Testing" / "Python"))

import numpy as np
import SimpleITK as sitk

K = 3
GOAL_S = 60.0


class Images(HTMLParser):
    """Counts the img elements of a page and the lazy ones among them."""

    def __init__(self) -> None:
        super().__init__()
        self.total = self.lazy = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.total += 1
            self.lazy += dict(attrs).get("loading") == "lazy"


def phantom(size: tuple[int, int, int]) -> tuple[sitk.Image, sitk.Image]:
    """A phantom chest CT resampled to `size` voxels and a map with one blob in its right lung."""
    from CLAMLib.simulate import make_phantom

    ct, _ = make_phantom(seed=0)
    spacing = [s * n / m for s, n, m in zip(ct.GetSpacing(), ct.GetSize(), size)]
    ct = sitk.Resample(ct, list(size), sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(), spacing, ct.GetDirection(),
                       -1000, sitk.sitkInt16)
    z, y, x = np.indices(size[::-1], dtype=np.float32)
    cz, cy, cx = size[2] * 0.55, size[1] * 0.45, size[0] * 0.35
    blob = np.exp(-((z - cz) / (size[2] / 12)) ** 2 - ((y - cy) / (size[1] / 14)) ** 2 - ((x - cx) / (size[0] / 14)) ** 2)
    values = sitk.GetImageFromArray(blob.astype(np.float32))
    values.CopyInformation(ct)
    return ct, values


def lay_out(folder: Path, n: int, pictures: Path, seed: int = 0) -> None:
    """A `clam map` output folder of n scans whose pictures exist (copies of one scan's)."""
    rng = np.random.default_rng(seed)
    small = sitk.GetImageFromArray(np.zeros((4, 4, 4), np.float32))
    (folder / "clusters").mkdir(parents=True)
    sitk.WriteImage(small, str(folder / "small.nrrd"))
    rows = []
    for i in range(n):
        scan_id = f"subject-{i:04d}"
        if rng.random() < 0.02:
            rows.append([scan_id, "", *[""] * K, "", "failed", "no lungs found: the image holds no air-filled lungs"])
            continue
        q = rng.dirichlet(np.full(K, 0.7))
        c = int(np.argmax(q))
        target = folder / "scans" / scan_id
        target.mkdir(parents=True)
        shutil.copyfile(folder / "small.nrrd", target / f"map_cluster{c}.nrrd")
        for picture in pictures.glob("*.png"):
            shutil.copyfile(picture, target / picture.name)
        (target / ".done").write_text(json.dumps({"id": scan_id, "source": "/nonexistent/" + scan_id}))
        rows.append([scan_id, c, *[f"{v:.6f}" for v in q], f"{rng.uniform(3, 7):.3f}", "ok", ""])
    (folder / "small.nrrd").unlink()
    with open(folder / "assignments.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "cluster", *[f"q{c}" for c in range(K)], "lung_volume_l", "status", "reason"])
        w.writerows(rows)
    for c in range(K):
        shutil.copyfile(pictures / "map.png", folder / "clusters" / f"average_cluster{c}.png")


def browser_load(index: Path) -> dict:
    """Load time and requests of the page in headless Chromium, before any scrolling (None without Chromium)."""
    from browser import Browser, find_chromium

    executable = find_chromium()
    if executable is None:
        return {"chromium": None}
    with Browser(executable) as browser:
        start = time.perf_counter()
        browser.open(index.as_uri())
        seconds = time.perf_counter() - start
        time.sleep(1.0)
        browser.evaluate("1")
        images = [u for u in browser.requests() if u.endswith(".png")]
    return {"chromium": executable, "load_s": round(seconds, 3), "png_requests_before_scrolling": len(images)}


def main() -> None:
    """Run the benchmark and print a short table."""
    from CLAMLib.pictures import scan_pictures
    from CLAMLib.report import PAGE, build_report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "report_1000.json")
    parser.add_argument("--work", type=Path, default=None, help="folder for the synthetic cohort (default: a temp)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clam-report-bench-", dir=args.work))
    try:
        ct, values = phantom((512, 512, 300))
        scan_pictures(ct, values, work / "warm-up", "warm-up")  # matplotlib's imports and font cache, once a run
        times = []
        for _ in range(3):
            start = time.perf_counter()
            scan_pictures(ct, values, work / "pictures", "subject: map of cluster 0 (q 0.90)")
            times.append(time.perf_counter() - start)
        picture_s = float(np.median(times))
        (work / "pictures" / "qc.png").write_bytes((work / "pictures" / "map.png").read_bytes())
        del ct, values
        maps = work / "maps"
        start = time.perf_counter()
        lay_out(maps, args.scans, work / "pictures")
        layout_s = time.perf_counter() - start
        start = time.perf_counter()
        index = build_report(maps)
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        build_report(maps)
        warm_s = time.perf_counter() - start
        images = Images()
        images.feed(index.read_text(encoding="utf-8"))
        pages = sorted(p.name for p in index.parent.glob("*.html"))
        size = sum(p.stat().st_size for p in index.parent.rglob("*") if p.is_file())
        result = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "scans": args.scans, "k": K, "page": PAGE,
            "scan_pictures_512x512x300_s": round(picture_s, 3),
            "layout_s": round(layout_s, 2), "report_cold_s": round(cold_s, 2), "report_warm_s": round(warm_s, 2),
            "goal_s": GOAL_S, "pages": pages, "index_html_kb": round(index.stat().st_size / 1024, 1),
            "index_images": images.total, "index_lazy_images": images.lazy,
            "report_folder_mb_apparent": round(size / 2**20, 1), **browser_load(index),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"| scans | report, first build | rerun | goal | index.html | images in index (lazy) | pictures per scan |\n"
          f"|---|---|---|---|---|---|---|\n"
          f"| {args.scans} | {cold_s:.1f} s | {warm_s:.1f} s | < {GOAL_S:.0f} s | {result['index_html_kb']} kB | "
          f"{images.total} ({images.lazy}) | {picture_s:.2f} s (512 x 512 x 300) |")
    if result.get("chromium"):
        print(f"Chromium: load event after {result['load_s']} s, {result['png_requests_before_scrolling']} PNG "
              "requests before scrolling")
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
