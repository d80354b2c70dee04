"""The whole cohort path on the phantom demo's cohort: train, map, associate, browse (headless MRML), in one command.

    python CLAM/Testing/Python/cohort_walkthrough.py --out cohort-output     (or: make cohort)

1. Simulated chest CTs of the `clam demo` size scenario (two clusters: small or large nodule) as NRRD files, and a
   clinical table made from the true clusters: FVC (% predicted, lower with the large nodule), a visual nodule
   score, age (no relation) and sex (no relation).
2. `clam train` (k = 2), `clam map`, `clam associate --clinical clinical.csv --id-column patient`.
3. The cohort browser (CLAMCohort) on Slicer's real MRML (slicer-core): the cohort opened, filtered to the large-
   nodule cluster, its first scan shown with its map centred on the map's maximum; the three slice views are
   rendered to OUT/browser.png beside the browser's table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MODULE_DIR = HERE.parents[1]
for folder in (MODULE_DIR, HERE):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import CLAMCohort
import render_screenshot as rs
from CLAMLib.cli import main as clam
from vtk.util import numpy_support


def write_cohort(folder: Path, n_per_cluster: int, seed: int) -> tuple[Path, Path]:
    """Phantom scans (NRRD) and a clinical CSV whose FVC and nodule score follow the true clusters."""
    from CLAMLib.imageio import write_image
    from CLAMLib.simulate import make_cohort

    cohort = make_cohort("size", n_per_cluster=n_per_cluster, seed=seed)
    scans = folder / "scans"
    scans.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = ["patient,FVC,nodule score,age,sex"]
    for s in cohort.subjects:
        write_image(s.image, scans / f"{s.id}.nrrd")
        fvc = rng.normal(92 - 14 * s.label, 8)
        score = int(np.clip(round(1 + 2 * s.label + rng.normal(0, 0.7)), 0, 4))
        lines.append(f"{s.id},{fvc:.1f},{score},{rng.integers(35, 80)},{rng.choice(['F', 'M'])}")
    clinical = folder / "clinical.csv"
    clinical.write_text("\n".join(lines) + "\n")
    return scans, clinical


def render_views(viewer: rs.Viewer, size: int) -> list[np.ndarray]:
    """RGB of the red, yellow and green slice views as they are (rows top to bottom)."""
    images = []
    for name in ("Red", "Yellow", "Green"):
        logic = viewer.sliceLogics[name]
        logic.GetSliceNode().SetDimensions(size, size, 1)
        blend = logic.GetBlend()
        blend.Update()
        output = blend.GetOutput()
        nx, ny, _ = output.GetDimensions()
        rgba = numpy_support.vtk_to_numpy(output.GetPointData().GetScalars()).reshape(ny, nx, -1)
        images.append(rgba[::-1, :, :3].copy())
    return images


def browse(maps: Path, clinical: Path, out: Path, size: int = 320) -> Path:
    """Open the cohort in the browser on real MRML, show the large-nodule cluster's first scan; save a picture."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    viewer = rs.make_viewer()
    try:
        for name in viewer.sliceLogics:
            viewer.sliceLogics[name].GetSliceNode().SetDimensions(size, size, 1)
        browser = CLAMCohort.CohortBrowser(viewer.scene)
        table = browser.open(maps, clinical, "patient")
        big = max(range(table.k), key=lambda c: np.mean([float(r.clinical.get("nodule score") or 0)
                                                         for r in table.rows if r.cluster == c] or [0]))
        order = browser.setFilter(cluster=big, sortColumn="q max", descending=True)
        shown = browser.next()
        for logic in viewer.sliceLogics.values():
            logic.FitSliceToAll()
        browser.centreOnMaximum(shown.mapNode)
        views = render_views(viewer, size)
        rows = browser.rows()[:8]
        columns = ["id", "cluster", "q max", "lung volume (L)", "FVC", "nodule score"]
        cells = [[table.text(r, c) for c in columns] for r in rows]
        count = viewer.scene.GetNumberOfNodes()
    finally:
        viewer.close()
    fig = Figure(figsize=(13, 7.2), dpi=100)
    FigureCanvasAgg(fig)
    for i, (image, title) in enumerate(zip(views, ("axial", "sagittal", "coronal"))):
        ax = fig.add_axes([0.01 + i * 0.33, 0.36, 0.31, 0.56])
        ax.imshow(image)
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    ax = fig.add_axes([0.03, 0.02, 0.94, 0.3])
    ax.set_axis_off()
    grid = ax.table(cellText=cells, colLabels=columns, loc="upper center", cellLoc="center")
    grid.scale(1, 1.2)
    for c in range(len(columns)):
        grid[1, c].set_facecolor("#ffe9a8")
    fig.suptitle(f"CLAM cohort browser: cluster {big} ({len(order)} scans, sorted by q), {shown.id} shown with the "
                 f"map of cluster {shown.cluster} centred on its maximum ({count} nodes in the scene)", fontsize=10)
    target = out / "browser.png"
    fig.savefig(str(target))
    return target


def main(argv: list | None = None) -> int:
    """Train, map, associate and browse; print where everything went."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("cohort-output"))
    parser.add_argument("--subjects", type=int, default=12, help="phantoms per cluster (default: 12)")
    parser.add_argument("--grid", type=int, default=32, help="model grid (default: 32)")
    parser.add_argument("--epochs", type=int, default=40, help="autoencoder pretraining epochs (default: 40)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out: Path = args.out
    scans, clinical = write_cohort(out, args.subjects, args.seed)
    quiet = ["--device", "cpu", "--quiet"]
    steps = [["train", str(scans), "--out", str(out / "model"), "--k", "2", "--grid", str(args.grid),
              "--epochs", str(args.epochs), "--finetune-epochs", str(max(1, args.epochs // 2)), "--smooth", "1.5",
              "--seed", str(args.seed), *quiet],
             ["map", str(out / "model"), str(scans), "--out", str(out / "maps"), *quiet],
             ["associate", str(out / "maps"), "--clinical", str(clinical), "--id-column", "patient"]]
    for step in steps:
        print("clam " + " ".join(step), file=sys.stderr)
        code = clam(step)
        if code != 0:
            return code
    picture = browse(out / "maps", clinical, out)
    print(f"model in {out / 'model'}, maps and association.md in {out / 'maps'}, browser picture {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
