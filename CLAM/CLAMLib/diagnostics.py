"""What the clusters follow: outlier clusters, and association with what every scan carries but no finding should drive.

A clustering of different people can group anatomy (lung volume, body size), acquisition (voxel size, slice
thickness, number of slices, scanner, kernel, contrast) or calibration and inspiration (mean lung attenuation)
instead of findings. Each such descriptor of the per-scan record (acquisition.scan_record, plus the lung volume) is
tested against the clusters: a number with epsilon^2 (Kruskal-Wallis: the share of its ranks' variance between
clusters, so one extreme scan cannot make it) and a permutation p-value, a category with Cramer's V and the chi-square (or Fisher's exact) p-value of `clam associate`. The training
report warns when one of them separates the clusters, or when all the numeric ones together predict the cluster (a
cross-validated nearest-neighbour classifier): people differ in several descriptors at once, none of them alone
decisive.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from .associate import Column, _as_float, analyse_column

DESCRIPTORS = {
    "lung_volume_l": "lung volume (L)",
    "mean_lung_hu": "mean lung attenuation (HU)",
    "body_area_cm2": "mean body cross-section (cm^2)",
    "enhanced_share": "share of soft tissue above 100 HU (contrast agent)",
    "pixel_spacing_mm": "in-plane voxel size (mm)",
    "slice_spacing_mm": "slice spacing (mm)",
    "slice_thickness_mm": "slice thickness (mm)",
    "slices": "number of slices",
    "kvp": "tube voltage (kVp)",
}
"""Numeric descriptors (per-scan record field -> name in the report)."""
CATEGORIES = {
    "manufacturer": "scanner manufacturer",
    "scanner_model": "scanner model",
    "kernel": "reconstruction kernel",
    "contrast_agent": "contrast agent",
}
"""Categorical descriptors (DICOM header fields of the record)."""
OUTLIER_SHARE, OUTLIER_COUNT = 0.05, 3  # a cluster under 5 % of the scans, or of fewer than 3, is flagged
WARN_EFFECT, WARN_P = 0.5, 0.01  # a descriptor is named when its effect (epsilon^2, Cramer's V) is 0.5 or more, p below 1 %
WARN_ACCURACY = 0.8  # ... or when the descriptors together predict the cluster this well (balanced accuracy)
PERMUTATIONS = 2000
PREDICT_FOLDS, PREDICT_PERMUTATIONS, PREDICT_MIN_SCANS = 4, 200, 12


def eta_squared(values: np.ndarray, labels: np.ndarray) -> float:
    """Share of the variance of values that lies between the groups of labels (0 when values are constant)."""
    total = float(((values - values.mean()) ** 2).sum())
    if total <= 0:
        return 0.0
    between = sum(float((labels == g).sum() * (values[labels == g].mean() - values.mean()) ** 2)
                  for g in np.unique(labels))
    return between / total


def association(values: np.ndarray, labels: np.ndarray, permutations: int = PERMUTATIONS,
                seed: int = 0) -> tuple[float, float]:
    """epsilon^2 (eta^2 of the ranks) of values between clusters and its permutation p-value (labels shuffled)."""
    values = stats.rankdata(values)
    observed = eta_squared(values, labels)
    rng = np.random.default_rng(seed)
    beaten = sum(eta_squared(values, rng.permutation(labels)) >= observed - 1e-12 for _ in range(permutations))
    return observed, (beaten + 1) / (permutations + 1)


def _numeric(key: str, name: str, rows: Sequence[dict[str, Any]], labels: np.ndarray) -> dict[str, Any] | None:
    """epsilon^2, permutation p and per-cluster medians of one numeric descriptor, or None when too few scans hold it."""
    raw = np.array([_as_float(r.get(key)) for r in rows], dtype=float)
    known = np.isfinite(raw)
    if known.sum() < 3 or len(np.unique(labels[known])) < 2:
        return None
    eta2, p = association(raw[known], labels[known])
    medians = {int(c): float(np.median(raw[known][labels[known] == c])) for c in np.unique(labels[known])}
    return {"descriptor": key, "name": name, "effect_name": "epsilon^2", "effect": eta2, "p": p, "n": int(known.sum()),
            "per_cluster": {c: f"{v:.4g}" for c, v in medians.items()}}


def _categorical(key: str, name: str, rows: Sequence[dict[str, Any]], labels: np.ndarray,
                 k: int) -> dict[str, Any] | None:
    """Cramer's V, p-value and per-cluster commonest level of one categorical descriptor (clam associate's test)."""
    outcome = analyse_column(Column(key, "acquisition", [r.get(key) for r in rows], "categorical"), labels, k)
    if outcome.skipped or outcome.effect is None or outcome.p is None:
        return None
    commonest = {g["cluster"]: max(g["counts"], key=g["counts"].get) for g in outcome.groups if g["n"]}
    return {"descriptor": key, "name": name, "effect_name": outcome.effect_name, "effect": outcome.effect,
            "p": outcome.p, "n": outcome.n, "per_cluster": commonest}


def predictability(rows: Sequence[dict[str, Any]], labels: np.ndarray, seed: int = 0) -> dict[str, Any] | None:
    """How well the numeric descriptors together predict the cluster: cross-validated balanced accuracy of a
    3-nearest-neighbour classifier on the standardised descriptors, with its permutation p-value (None under 12 scans,
    or without a descriptor that varies)."""
    from sklearn.model_selection import StratifiedKFold, permutation_test_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    table = np.array([[_as_float(r.get(key)) for key in DESCRIPTORS] for r in rows], dtype=float)
    table = table.reshape(len(rows), len(DESCRIPTORS))
    usable = np.isfinite(table).all(0) & (np.ptp(np.where(np.isfinite(table), table, 0), axis=0) > 0)
    present, counts = np.unique(labels, return_counts=True)
    folds = min(PREDICT_FOLDS, int(counts.min())) if len(present) > 1 else 0
    if not usable.any() or folds < 2 or len(rows) < PREDICT_MIN_SCANS:
        return None
    classifier = make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=3))
    score, _, p = permutation_test_score(
        classifier, table[:, usable], labels, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
        scoring="balanced_accuracy", n_permutations=PREDICT_PERMUTATIONS, random_state=seed)
    return {"balanced_accuracy": float(score), "p": float(p), "k": len(present), "folds": folds,
            "descriptors": [key for key, used in zip(DESCRIPTORS, usable) if used]}


def assess(rows: Sequence[dict[str, Any]], labels: Sequence[int], k: int) -> dict[str, Any]:
    """Outlier clusters and descriptor associations of the scans used in training (rows in label order)."""
    labels = np.asarray(labels, dtype=int)
    n = len(labels)
    sizes = np.bincount(labels, minlength=k)
    small = [c for c in range(k) if sizes[c] < max(OUTLIER_COUNT, OUTLIER_SHARE * n)]
    outliers = {c: [r["id"] for r, lab in zip(rows, labels) if lab == c] for c in small}
    found = [_numeric(key, name, rows, labels) for key, name in DESCRIPTORS.items()]
    found += [_categorical(key, name, rows, labels, k) for key, name in CATEGORIES.items()]
    found = [a for a in found if a is not None]
    warnings = [f"the clusters differ mainly in {a['name']} ({a['effect_name']} {a['effect']:.2f}, p {a['p']:.3g}): "
                "they may group anatomy or acquisition, not findings"
                for a in found if a["effect"] >= WARN_EFFECT and a["p"] < WARN_P]
    together = predictability(rows, labels)
    if together is not None and together["balanced_accuracy"] >= WARN_ACCURACY and together["p"] < WARN_P:
        warnings.append(f"the scans' record ({', '.join(DESCRIPTORS[d] for d in together['descriptors'])}) predicts "
                        f"their cluster (balanced accuracy {together['balanced_accuracy']:.2f}, chance "
                        f"{1 / together['k']:.2f}, p {together['p']:.3g}): the clusters may group people or "
                        "scanners, not findings")
    for c, ids in outliers.items():
        warnings.append(f"cluster {c} holds {len(ids)} of {n} scans, probably outliers: {', '.join(ids)}")
    return {"associations": found, "predictability": together, "outlier_clusters": outliers, "warnings": warnings}
