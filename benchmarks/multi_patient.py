"""Multi-patient benchmark: do `clam train` / `clam map` with defaults cluster the findings, not the people?

    python benchmarks/multi_patient.py [--seeds 0] [--scenarios size location intensity] [--grid 64]
                                       [--per-patient 2] [--size 128 128 64] [--out DIR] [-- further clam train options]

Each cohort mixes six people: the four whole-chest CTs of ../shared/data (each with its own tumour replaced by lung)
and two phantom anatomies. Every person gives the same number of subjects to each cluster; each subject is a randomly
deformed, intensity-jittered and noised copy with one simulated lesion that alone defines its cluster (size,
location or intensity, as `clam demo`). The scans are written as files with a manifest, and the README's two commands
run on them as a user would (`clam train MANIFEST --k 2 --grid G`, `clam map MODEL MANIFEST`). Scored: accuracy and
ARI against the true clusters, ARI against the person, and the default map of the assigned cluster on the model grid
(pointing game, ROC-AUC, mass ratio, subjects scored). Prints a Markdown table and writes results.json into --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CLAM"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from CLAMLib.estimator import load_bundle
from CLAMLib.imageio import read_image, write_image
from CLAMLib.metrics import clustering_scores, correctly_assigned, localisation_scores
from CLAMLib.simulate import SCENARIOS, make_cohort, make_phantom
from real_anatomy import BASES, DATA, lesion_mask

PHANTOMS = {"phantom-101": 101, "phantom-102": 102}
PHANTOM_VARIATION = 1.5  # each phantom person further from the generator's mean than a typical subject
FIELD_MM, SLICE_MM = 350.0, 5.0


def people(out: Path, size: tuple[int, int, int]) -> dict[str, dict]:
    """Base CT, own-lesion mask and lung mask (phantoms only) of every person."""
    spacing = (FIELD_MM / size[0], FIELD_MM / size[1], SLICE_MM)
    found = {}
    for name in BASES:
        found[name] = {"base": read_image(DATA / BASES[name][0]), "base_lesion": read_image(lesion_mask(name, out))}
    for name, seed in PHANTOMS.items():
        image, lung = make_phantom(seed=seed, anatomy_variation=PHANTOM_VARIATION, size=size, spacing=spacing)
        found[name] = {"base": image, "base_lung": lung}
    return found


def write_cohort(scenario: str, seed: int, persons: dict[str, dict], folder: Path, per_patient: int,
                 size: tuple[int, int, int], site_margin: float) -> dict[str, dict]:
    """Scans, lesion masks and a manifest of one cohort; returns id -> {label, patient}."""
    truth, rows = {}, []
    for j, (name, parts) in enumerate(persons.items()):
        cohort = make_cohort(scenario, n_per_cluster=per_patient, seed=1000 * seed + j, size=size,
                             site_margin_mm=site_margin, **parts)
        for i, subject in enumerate(cohort.subjects):
            sid = f"{name}-{i:02d}"
            write_image(subject.image, folder / "scans" / f"{sid}.nrrd")
            write_image(subject.lesion, folder / "lesions" / f"{sid}.nrrd")
            truth[sid] = {"label": subject.label, "patient": name}
            rows.append((sid, f"scans/{sid}.nrrd"))
    with open(folder / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([("id", "path"), *rows])
    (folder / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth


def clam(*args: str, log: Path) -> None:
    """Run the clam command line as a user would."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "CLAM")}
    with open(log, "a") as out:
        subprocess.run([sys.executable, "-m", "CLAMLib.cli", *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                       check=True)


def score(folder: Path, truth: dict[str, dict]) -> dict:
    """Clustering and default-map localisation scores of a mapped cohort."""
    from safetensors.numpy import load_file

    with open(folder / "maps" / "assignments.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    ids = [r["id"] for r in rows]
    assigned = np.array([int(r["cluster"]) for r in rows])
    labels = np.array([truth[i]["label"] for i in ids])
    patients = np.unique([truth[i]["patient"] for i in ids], return_inverse=True)[1]
    model = load_bundle(folder / "model", device="cpu")
    pre = model.preprocessor_
    maps, lesions, lungs = [], [], []
    for sid, c in zip(ids, assigned):
        prepared = pre.transform(read_image(folder / "scans" / f"{sid}.nrrd"))
        lesions.append(pre.grid_mask(read_image(folder / "lesions" / f"{sid}.nrrd"), prepared))
        lungs.append(prepared.lung)
        maps.append(load_file(str(folder / "maps" / "scans" / sid / "grid_maps.safetensors"))[f"cluster{c}"]
                    .astype(np.float32))
    tolerance = model.architecture.grid // model.architecture.feature_grid
    r2 = json.loads((folder / "model" / "model.json").read_text()).get("training", {}).get("reconstruction_r2")
    return {"n": len(ids), "failed": len(truth) - len(ids), **clustering_scores(labels, assigned),
            "ari_patient": clustering_scores(patients, assigned)["ari"],
            "misassigned": dict(Counter(f"{truth[i]['patient']} (cluster {truth[i]['label']})"
                                        for i, right in zip(ids, correctly_assigned(labels, assigned)) if not right)),
            "cluster_sizes": np.bincount(assigned, minlength=model.k).tolist(),
            "reconstruction_r2": r2,
            **localisation_scores(maps, lesions, lungs, tolerance=tolerance)}


def table(results: list[dict]) -> str:
    """Markdown table of every cohort's scores."""
    lines = ["| scenario | seed | accuracy | ARI | ARI vs person | pointing game | ROC-AUC | mass ratio | scored | R^2 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        r2 = "" if r["reconstruction_r2"] is None else f"{r['reconstruction_r2']:.2f}"
        lines.append(f"| {r['scenario']} | {r['seed']} | {r['accuracy']:.3f} | {r['ari']:.3f} | {r['ari_patient']:.3f} | "
                     f"{r['pointing_game']:.2f} | {r['auc']:.3f} | {r['mass_ratio']:.1f} | "
                     f"{r['n_scored']}/{r['n_scored'] + r['n_skipped']} | {r2} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--grid", type=int, default=64)
    parser.add_argument("--per-patient", type=int, default=2, help="subjects per person and cluster (default: 2)")
    parser.add_argument("--size", type=int, nargs=3, default=[128, 128, 64], help="simulated scan size (x y z)")
    parser.add_argument("--site-margin", type=float, default=0.0,
                        help="depth (mm) asked beyond a lesion's room at each cluster's site (default: 0)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "multi_patient")
    parser.add_argument("extra", nargs="*", help="further clam train options, after --")
    args = parser.parse_args()
    size = tuple(args.size)
    args.out.mkdir(parents=True, exist_ok=True)
    persons = people(args.out, size)
    results = []
    for seed in args.seeds:
        for scenario in args.scenarios:
            folder = args.out / f"{scenario}_seed{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            truth = write_cohort(scenario, seed, persons, folder, args.per_patient, size, args.site_margin)
            log = folder / "clam.log"
            log.unlink(missing_ok=True)
            manifest = str(folder / "manifest.csv")
            clam("train", manifest, "--k", "2", "--grid", str(args.grid), "--seed", str(seed), "--quiet",
                 "--out", str(folder / "model"), *args.extra, log=log)
            clam("map", str(folder / "model"), manifest, "--out", str(folder / "maps"), "--quiet", log=log)
            row = {"scenario": scenario, "seed": seed, **score(folder, truth),
                   "seconds": time.perf_counter() - start}
            results.append(row)
            (folder / "result.json").write_text(json.dumps(row, indent=1, default=float))
            print(table([row]).splitlines()[-1], flush=True)
    settings = {"grid": args.grid, "per_patient": args.per_patient, "size": size, "site_margin_mm": args.site_margin,
                "people": list(persons), "extra": args.extra}
    (args.out / "results.json").write_text(json.dumps({"settings": settings, "results": results}, indent=1,
                                                      default=float))
    print(f"\nSix people ({', '.join(persons)}), {args.per_patient} subjects per person and cluster, simulated size "
          f"{size}, `clam train --k 2 --grid {args.grid}` defaults{' ' + ' '.join(args.extra) if args.extra else ''}\n")
    print(table(results))


if __name__ == "__main__":
    main()
