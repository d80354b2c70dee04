"""The semi-synthetic benchmark on real anatomy: `clam demo --base` on the four whole-chest CTs of ../shared/data.

    python benchmarks/real_anatomy.py [--seed 0] [--jobs 2] [--bases lung1 lung2 ...] [--out DIR] [-- demo options]

Each base's own tumour is first turned into a mask (lung1, lung2: their label masks; Lung_Dx: the union of the
annotated tumour boxes over the annotated slices, limited to solid voxels inside the lung mask) and passed as
`--base-lesion`, so that the subjects share no real tumour and differ only by the simulated lesion and the random
deformation. Prints a Markdown table (accuracy at the true k, default map localisation) and writes it with every
demo's results.json into --out (default benchmarks/results/real_anatomy).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CLAM"))

from CLAMLib.demo import scored
from CLAMLib.imageio import atomic_path, read_image, write_image
from CLAMLib.preprocess import lung_mask

DATA = ROOT.parent / "shared" / "data" / "chest_ct"
BASES = {
    "lung1": ("lung1_image.nrrd", "lung1_label.nrrd"),
    "lung2": ("lung2_image.nrrd", "lung2_label.nrrd"),
    "Lung_Dx-A0001": ("Lung_Dx-A0001_dicom", "Lung_Dx_annotation/A0001"),
    "Lung_Dx-A0002": ("Lung_Dx-A0002_dicom", "Lung_Dx_annotation/A0002"),
}
DEMO = ["--no-sweep", "--register", "bspline", "--smooth", "0", "--restarts", "5"]


def box_mask(image: sitk.Image, series: Path, boxes: Path) -> sitk.Image:
    """Tumour mask of a DICOM series from per-slice boxes (XML named by SOP instance UID)."""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series))
    slice_of = {}
    for z, name in enumerate(files):
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        reader.ReadImageInformation()
        slice_of[reader.GetMetaData("0008|0018").strip()] = z
    found = []
    for xml in sorted(boxes.glob("*.xml")):
        if xml.stem in slice_of:
            text = xml.read_text()
            corners = [int(re.search(f"<{tag}>(\\d+)</{tag}>", text).group(1)) for tag in ("xmin", "ymin", "xmax", "ymax")]
            found.append((slice_of[xml.stem], corners))
    if not found:
        raise SystemExit(f"no tumour box of {boxes} belongs to a slice of {series}")
    zs = [z for z, _ in found]
    x0, y0 = min(c[0] for _, c in found), min(c[1] for _, c in found)
    x1, y1 = max(c[2] for _, c in found), max(c[3] for _, c in found)
    region = np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=bool)
    region[max(0, min(zs) - 1) : max(zs) + 2, y0 : y1 + 1, x0 : x1 + 1] = True
    solid = sitk.GetArrayFromImage(image) > -400
    lungs = sitk.GetArrayFromImage(lung_mask(image)) > 0
    mask = sitk.GetImageFromArray((region & solid & lungs).astype(np.uint8))
    mask.CopyInformation(image)
    return mask


def lesion_mask(name: str, out: Path) -> Path:
    """Write the base's own tumour mask into out and return its path."""
    image_name, lesion_name = BASES[name]
    target = out / "base_lesions" / f"{name}.nrrd"
    target.parent.mkdir(parents=True, exist_ok=True)
    if lesion_name.endswith(".nrrd"):
        mask = sitk.Cast(read_image(DATA / lesion_name) != 0, sitk.sitkUInt8)
    else:
        mask = box_mask(read_image(DATA / image_name), DATA / image_name, DATA / lesion_name)
    write_image(mask, target)
    return target


def run_base(name: str, lesion: Path, seed: int, out: Path, extra: list[str], threads: int) -> dict:
    """Run clam demo on one base and return its results.json."""
    folder = out / f"{name}_seed{seed}"
    command = [sys.executable, "-m", "CLAMLib.cli", "demo", "--base", str(DATA / BASES[name][0]),
               "--base-lesion", str(lesion), "--seed", str(seed), "--quiet", "--out", str(folder), *DEMO, *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "CLAM"), "OMP_NUM_THREADS": str(threads)}
    with open(out / f"{name}_seed{seed}.log", "w") as log:
        subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return json.loads((folder / "results.json").read_text())


def table(results: dict[str, dict], seed: int) -> str:
    """Markdown rows: accuracy at the true k and the default map's localisation, per base and scenario."""
    lines = [f"Seed {seed}; `clam demo --base <CT> --base-lesion <its tumour> {' '.join(DEMO)}`", "",
             "| base | scenario | accuracy | ARI | default map: pointing game | ROC-AUC | mass ratio | scored |",
             "|---|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        true_k = result["settings"]["true_k"]
        default = result["settings"]["default_method"]
        for row in result["clustering"]:
            if row["k"] != true_k:
                continue
            loc = next(r for r in result["localisation"] if r["scenario"] == row["scenario"] and r["k"] == true_k
                       and r["method"] == default)
            lines.append(f"| {name} | {row['scenario']} | {row['accuracy']:.3f} | {row['ari']:.3f} | "
                         f"{loc['pointing_game']:.2f} | {loc['auc']:.3f} | {loc['mass_ratio']:.1f} | {scored(loc)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bases", nargs="+", choices=list(BASES), default=list(BASES))
    parser.add_argument("--jobs", type=int, default=1, help="bases run at once (each with its share of the cores)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "real_anatomy")
    parser.add_argument("extra", nargs="*", help="further clam demo options, after --")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"needs the real CTs in {DATA}")
    args.out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    lesions = {name: lesion_mask(name, args.out) for name in args.bases}  # SimpleITK work stays in this thread
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {name: pool.submit(run_base, name, lesions[name], args.seed, args.out, args.extra, threads)
                   for name in args.bases}
        results = {name: future.result() for name, future in futures.items()}
    text = table(results, args.seed)
    print(text)
    with atomic_path(args.out / f"summary_seed{args.seed}.json") as tmp:
        Path(tmp).write_text(json.dumps({"seed": args.seed, "demo_options": DEMO + args.extra, "table": text,
                                         "results": results}, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
