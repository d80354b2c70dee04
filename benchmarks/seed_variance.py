"""Seed variance of a multi-patient cohort: which scans does the k-means start get wrong, from how many seeds?

    python benchmarks/seed_variance.py FOLDER [FOLDER ...] [--seeds 100 101 102 103] [--out results.json]

Each FOLDER is one cohort written by benchmarks/multi_patient.py (scans/, manifest.csv, truth.json and the
trained bundle in model/). The scans are prepared with that bundle's preprocessing, then autoencoders are
pretrained from each seed with the bundle's architecture and `clam train`'s defaults at the bundle's k, and k-means
on each normalised embedding gives the partition that fine-tuning starts from. Printed per seed: accuracy, ARI
against the true clusters and against the person, the silhouette, reconstruction R^2 and the people whose scans
are misassigned; then what two ways of choosing among the seeds would give: the highest silhouette (what
`--restarts` does) and the consensus (the seed whose partition agrees best, by ARI, with all the others). Also
printed per seed: the accuracy of k-means on the zone-pooled activations of the same autoencoder (the "zones" of
embedding_probe.py). Writes the rows as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CLAM"))

from CLAMLib.metrics import clustering_scores, correctly_assigned
from CLAMLib.train import TrainConfig, Trainer, _normalise_latent, as_batch, choose_k, embed, reconstruction_r2
from embedding_probe import feature_sets, read_cohort


def seed_rows(folder: Path, seeds: list[int]) -> list[dict]:
    """One row per seed: the k-means start's scores on the cohort in `folder`."""
    model, arrays, labels, people = read_cohort(folder)
    x, cpu = as_batch(arrays, model.architecture), torch.device("cpu")
    out = []
    for seed in seeds:
        start = time.perf_counter()
        trainer = Trainer(model.architecture, TrainConfig(k=model.k, seed=seed, device="cpu"), verbose=False)
        net = trainer.pretrained(arrays)[0].net
        with torch.no_grad():
            zn = _normalise_latent(net, embed(net, x, cpu)).numpy()
        k, table, fits = choose_k(zn, range(model.k, model.k + 1), seed)
        assigned = fits[k].labels_
        scores = clustering_scores(labels, assigned)
        zones = KMeans(k, n_init=20, random_state=seed).fit(feature_sets(net.encoder, x)["zones"]).labels_
        wrong = ~correctly_assigned(labels, assigned)
        out.append({"cohort": folder.name, "seed": seed, **scores,
                    "ari_patient": clustering_scores(people, assigned)["ari"],
                    "silhouette": table[0]["silhouette"], "reconstruction_r2": reconstruction_r2(net, x, cpu),
                    "misassigned": dict(Counter(people[wrong].tolist())), "labels": assigned.tolist(),
                    "zones_accuracy": clustering_scores(labels, zones)["accuracy"],
                    "seconds": time.perf_counter() - start})
        print(_line(out[-1]), flush=True)
    return out


def _line(r: dict) -> str:
    people = ", ".join(f"{name} ({n})" for name, n in sorted(r["misassigned"].items())) or "none"
    return (f"| {r['cohort']} | {r['seed']} | {r['accuracy']:.3f} | {r['ari']:.3f} | {r['ari_patient']:.3f} | "
            f"{r['silhouette']:.3f} | {r['reconstruction_r2']:.2f} | {people} | {r['zones_accuracy']:.3f} |")


def choices(rows: list[dict]) -> dict:
    """The seed the highest silhouette picks and the consensus seed, with their accuracy."""
    by_silhouette = max(rows, key=lambda r: r["silhouette"])
    agreement = [sum(adjusted_rand_score(r["labels"], o["labels"]) for o in rows if o is not r) for r in rows]
    consensus = rows[int(np.argmax(agreement))]
    return {"cohort": rows[0]["cohort"], "seeds": len(rows),
            "right": sum(r["accuracy"] == 1.0 for r in rows),
            "silhouette_seed": by_silhouette["seed"], "silhouette_accuracy": by_silhouette["accuracy"],
            "consensus_seed": consensus["seed"], "consensus_accuracy": consensus["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", help="cohort folders of benchmarks/multi_patient.py")
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102, 103])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "seed_variance.json")
    args = parser.parse_args()
    print("| cohort | seed | accuracy | ARI | ARI vs person | silhouette | R^2 | misassigned people (scans) "
          "| zones: accuracy |")
    print("|---|---|---|---|---|---|---|---|---|")
    per_cohort = [seed_rows(folder, args.seeds) for folder in args.folders]
    summary = [choices(rows) for rows in per_cohort]
    print("\n| cohort | seeds | seeds at accuracy 1 | highest silhouette: seed, accuracy | consensus: seed, accuracy |")
    print("|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['cohort']} | {s['seeds']} | {s['right']} | {s['silhouette_seed']}, {s['silhouette_accuracy']:.3f} | "
              f"{s['consensus_seed']}, {s['consensus_accuracy']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": [r for rows in per_cohort for r in rows], "choices": summary}, indent=1))


if __name__ == "__main__":
    main()
