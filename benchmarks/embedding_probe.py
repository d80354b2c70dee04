"""Embedding probe: would k-means find the true clusters of a multi-patient cohort in other features of its network?

    python benchmarks/embedding_probe.py FOLDER [FOLDER ...] [--out results.json]

Each FOLDER is one cohort written by benchmarks/multi_patient.py, with its trained bundle in model/. The scans are
prepared with that bundle's preprocessing and passed through its encoder; k-means (the bundle's k, 20 starts) then
runs on four feature sets of the same network, each dimension standardised:

- ``embedding``: the dense embedding the clustering head uses (what `clam train` clusters);
- ``pooled 1``: the last encoder block's activations averaged over the whole volume (one value per filter);
- ``pooled 2``: the same activations averaged over each of the 2^d octants of the model grid;
- ``zones``: the same activations averaged over the upper and the lower half of the grid (3D models only), so that
  a finding counts by its cranio-caudal zone, wherever it lies within the zone's slices;
- ``dense+zones``: the embedding and the zones side by side, each part divided by the square root of its
  dimensions so that both weigh the same (what `clam train`'s default head reads for 3D scans).

Printed per cohort and feature set: accuracy, ARI against the true clusters and against the person. Nothing is
trained; the bundles are read as they are. Writes the rows as JSON to --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CLAM"))

from CLAMLib.estimator import CLAMModel, load_bundle
from CLAMLib.imageio import read_image
from CLAMLib.metrics import clustering_scores
from CLAMLib.train import as_batch

FEATURES = ("embedding", "pooled 1", "pooled 2", "zones", "dense+zones")


def read_cohort(folder: Path) -> tuple[CLAMModel, np.ndarray, np.ndarray, np.ndarray]:
    """The trained bundle of a multi-patient cohort folder, its scans prepared by it (in manifest order), their true
    labels and their people."""
    model = load_bundle(folder / "model", device="cpu")
    truth = json.loads((folder / "truth.json").read_text())
    with open(folder / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    arrays = np.stack([model.prepare([read_image(folder / r["path"])])[0].array for r in rows])
    labels = np.array([truth[r["id"]]["label"] for r in rows])
    people = np.array([truth[r["id"]]["patient"] for r in rows])
    return model, arrays, labels, people


def features(folder: Path) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, int]:
    """Standardised feature sets of every scan, true labels, people and k of the cohort in `folder`."""
    model, arrays, labels, people = read_cohort(folder)
    return feature_sets(model.net_.encoder, as_batch(arrays, model.architecture)), labels, people, model.k


def feature_sets(encoder: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The standardised feature sets of FEATURES of a batch x under an encoder (zones ones for 3D inputs only)."""
    encoder.eval()
    ndim = x.ndim - 2
    pool = F.adaptive_avg_pool3d if ndim == 3 else F.adaptive_avg_pool2d
    with torch.no_grad():
        acts = torch.cat([encoder.features(x[i : i + 4]) for i in range(0, len(x), 4)])
        sets = {"embedding": encoder.embed(acts.flatten(1)), "pooled 1": pool(acts, 1).flatten(1),
                "pooled 2": pool(acts, 2).flatten(1)}
        if ndim == 3:  # grid axes z-y-x: halves of the first axis are the upper and lower zones
            sets["zones"] = pool(acts, (2, 1, 1)).flatten(1)
    out = {}
    for name, values in sets.items():
        v = values.numpy().astype(np.float64)
        out[name] = (v - v.mean(0)) / np.maximum(v.std(0), 1e-8)
    if "zones" in out:
        out["dense+zones"] = np.hstack([out[n] / np.sqrt(out[n].shape[1]) for n in ("embedding", "zones")])
    return out


def probe(folder: Path) -> list[dict]:
    """One row per feature set: k-means scores against the truth and the person."""
    sets, labels, people, k = features(folder)
    rows = []
    for name in [n for n in FEATURES if n in sets]:
        assigned = KMeans(k, n_init=20, random_state=0).fit(sets[name]).labels_
        rows.append({"cohort": folder.name, "features": name, "dimensions": sets[name].shape[1],
                     **clustering_scores(labels, assigned), "ari_patient": clustering_scores(people, assigned)["ari"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", help="cohort folders of benchmarks/multi_patient.py")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "embedding_probe.json")
    args = parser.parse_args()
    print("| cohort | " + " | ".join(f"{name}: accuracy, ARI vs person" for name in FEATURES) + " |")
    print("|---|" + "---|" * len(FEATURES))
    rows = []
    for folder in args.folders:
        found = probe(folder)
        rows += found
        by_name = {r["features"]: r for r in found}
        cells = [f"{by_name[n]['accuracy']:.3f}, {by_name[n]['ari_patient']:.3f}" if n in by_name else "-"
                 for n in FEATURES]
        print(f"| {folder.name} | " + " | ".join(cells) + " |", flush=True)
    right = {name: sum(r["accuracy"] == 1.0 for r in rows if r["features"] == name) for name in FEATURES}
    print("\ncohorts at accuracy 1: " + ", ".join(f"{name} {n}/{len(args.folders)}" for name, n in right.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "at_accuracy_1": right}, indent=1))


if __name__ == "__main__":
    main()
