"""Metrics for the simulation study: clustering agreement and localisation of maps.

Clustering (labels are any integers; the number of predicted clusters may differ from the truth):

- :func:`cluster_accuracy`: share of subjects correctly assigned under the best one-to-one matching
  of predicted to true clusters (Hungarian algorithm); subjects in unmatched clusters count wrong.
- :func:`correctly_assigned`: which subjects that matching puts in their true cluster.
- :func:`clustering_scores`: accuracy, adjusted Rand index and normalised mutual information.

Localisation of a map (``saliency``, any real values, 2D or 3D) against a ground-truth ``lesion``
mask, restricted to a ``lung`` mask (same shape; ``None`` means every voxel). Lesion voxels outside
the lung are ignored. Per subject:

- :func:`pointing_game`: 1.0 when the map's maximum inside the lungs (the first in C order on ties)
  lies within the lesion dilated by ``tolerance`` voxels (a Euclidean ball in voxel units), else 0.0.
- :func:`mass_in_lesion`: share of the map's positive mass inside the lungs that falls in the
  lesion, and that share divided by the lesion's share of the lung voxels ("times chance"; 1.0 for
  a uniform map). A map without positive mass in the lungs scores (0.0, 0.0).
- :func:`lesion_auc`: ROC-AUC of map values separating lesion voxels from other lung voxels
  (1.0 perfect, 0.5 chance or a constant map, 0.0 inverted).
- :func:`localisation_scores`: their means over subjects, skipping subjects with no lesion voxel
  in the lungs, and saying how many were scored.

:func:`random_map` gives a smooth random map, the "random map" baseline row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, roc_auc_score

from .errors import InputError

__all__ = [
    "cluster_accuracy",
    "correctly_assigned",
    "clustering_scores",
    "lesion_auc",
    "localisation_scores",
    "mass_in_lesion",
    "pointing_game",
    "random_map",
]

ArrayLike = Union[np.ndarray, Sequence]


# ----------------------------------------------------------------------------- clustering


def _labels(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate two label vectors of the same non-zero length."""
    t = np.asarray(y_true).ravel()
    p = np.asarray(y_pred).ravel()
    if t.size == 0 or t.size != p.size:
        raise InputError(f"y_true ({t.size}) and y_pred ({p.size}) need the same, non-zero number of labels")
    return t, p


def correctly_assigned(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """Boolean mask of the subjects in their true cluster under the best one-to-one matching of the clusters."""
    t, p = _labels(y_true, y_pred)
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    counts = np.zeros((pi.max() + 1, ti.max() + 1), dtype=np.int64)
    np.add.at(counts, (pi, ti), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    matched = np.full(pi.max() + 1, -1)
    matched[rows] = cols
    return matched[pi] == ti


def cluster_accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Accuracy under the best one-to-one matching of predicted to true clusters."""
    return float(correctly_assigned(y_true, y_pred).mean())


def clustering_scores(y_true: ArrayLike, y_pred: ArrayLike) -> dict:
    """Cluster accuracy, adjusted Rand index (ari) and normalised mutual information (nmi)."""
    t, p = _labels(y_true, y_pred)
    return {
        "accuracy": cluster_accuracy(t, p),
        "ari": float(adjusted_rand_score(t, p)),
        "nmi": float(normalized_mutual_info_score(t, p)),
    }


# ----------------------------------------------------------------------------- localisation


def _prepare(saliency: np.ndarray, lesion: np.ndarray, lung: np.ndarray | None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate shapes and values; return float map, lesion-in-lung and lung as booleans."""
    s = np.asarray(saliency)
    les = np.asarray(lesion)
    if s.ndim not in (2, 3):
        raise InputError(f"saliency has {s.ndim} dimensions: give a 2D or 3D map")
    if les.shape != s.shape:
        raise InputError(f"lesion shape {les.shape} differs from saliency shape {s.shape}: resample to one grid")
    lu = np.ones(s.shape, bool) if lung is None else np.asarray(lung) != 0
    if lu.shape != s.shape:
        raise InputError(f"lung shape {lu.shape} differs from saliency shape {s.shape}: resample to one grid")
    s = s.astype(np.float64, copy=False)
    if not np.isfinite(s[lu]).all():
        raise InputError("saliency has NaN or infinite values inside the lungs: replace them (np.nan_to_num)")
    if not lu.any():
        raise InputError("the lung mask is empty: give a mask with the lung voxels set")
    les = (les != 0) & lu
    if not les.any():
        raise InputError("the lesion mask has no voxel inside the lungs: nothing to localise")
    return s, les, lu


def pointing_game(saliency: np.ndarray, lesion: np.ndarray, lung: np.ndarray | None, tolerance: int = 0) -> float:
    """1.0 if the map's maximum inside the lungs lies in the lesion dilated by tolerance voxels, else 0.0."""
    if int(tolerance) != tolerance or tolerance < 0:
        raise InputError(f"tolerance={tolerance}: give a whole number of voxels >= 0")
    s, les, lu = _prepare(saliency, lesion, lung)
    masked = np.where(lu, s, -np.inf)
    peak = np.unravel_index(int(np.argmax(masked)), s.shape)
    # inside the lesion dilated by a Euclidean ball of radius tolerance = within tolerance of a lesion voxel
    nearest = np.sqrt(((np.argwhere(les) - np.asarray(peak)) ** 2).sum(axis=1).min())
    return 1.0 if nearest <= tolerance else 0.0


def mass_in_lesion(saliency: np.ndarray, lesion: np.ndarray, lung: np.ndarray | None) -> tuple[float, float]:
    """Share of the positive map mass in the lungs lying in the lesion, and that share over chance."""
    s, les, lu = _prepare(saliency, lesion, lung)
    pos = np.clip(s[lu], 0.0, None)
    total = float(pos.sum())
    if total <= 0:
        return 0.0, 0.0
    share = float(pos[les[lu]].sum()) / total
    chance = float(les.sum()) / float(lu.sum())
    return share, share / chance


def lesion_auc(saliency: np.ndarray, lesion: np.ndarray, lung: np.ndarray | None) -> float:
    """ROC-AUC of map values: lesion voxels against the other lung voxels."""
    s, les, lu = _prepare(saliency, lesion, lung)
    y = les[lu]
    if y.all():
        raise InputError("the lesion fills the whole lung mask: the AUC needs non-lesion lung voxels")
    return float(roc_auc_score(y, s[lu]))


def localisation_scores(maps: Sequence[np.ndarray], lesions: Sequence[np.ndarray],
                        lungs: Sequence[np.ndarray | None] | None = None, tolerance: int = 0) -> dict:
    """Means over subjects of pointing game, AUC, mass share and mass ratio; skips lesion-free subjects."""
    maps, lesions = list(maps), list(lesions)
    lungs = [None] * len(maps) if lungs is None else list(lungs)
    if not (len(maps) == len(lesions) == len(lungs)) or not maps:
        raise InputError(
            f"maps ({len(maps)}), lesions ({len(lesions)}) and lungs ({len(lungs)}): give one of each per subject"
        )
    pg, auc, share, ratio = [], [], [], []
    for s, les, lu in zip(maps, lesions, lungs):
        les_in = np.asarray(les) != 0
        if lu is not None:
            if np.shape(lu) != les_in.shape:
                raise InputError(f"lung shape {np.shape(lu)} differs from lesion shape {les_in.shape}")
            les_in &= np.asarray(lu) != 0
            n_lung = int(np.count_nonzero(lu))
        else:
            n_lung = les_in.size
        if not les_in.any() or int(les_in.sum()) == n_lung:
            continue
        pg.append(pointing_game(s, les, lu, tolerance))
        auc.append(lesion_auc(s, les, lu))
        a, b = mass_in_lesion(s, les, lu)
        share.append(a)
        ratio.append(b)
    n = len(pg)

    def mean(v: list) -> float:
        """Mean, or NaN when nothing was scored."""
        return float(np.mean(v)) if v else float("nan")

    return {
        "pointing_game": mean(pg),
        "auc": mean(auc),
        "mass_share": mean(share),
        "mass_ratio": mean(ratio),
        "n_scored": n,
        "n_skipped": len(maps) - n,
        "tolerance": int(tolerance),
    }


def random_map(shape: Sequence[int], seed: int = 0, smooth: float | Sequence[float] = 4.0) -> np.ndarray:
    """A smooth random map in [0, 1]: white noise blurred by a Gaussian of `smooth` voxels (per axis)."""
    shape_t = tuple(int(n) for n in shape)
    if not shape_t or min(shape_t) < 1:
        raise InputError(f"shape {shape}: give positive sizes")
    sig = np.broadcast_to(np.asarray(smooth, float), (len(shape_t),))
    if (sig < 0).any():
        raise InputError(f"smooth={smooth}: give a Gaussian sigma >= 0 in voxels")
    rng = np.random.default_rng(seed)
    m = ndimage.gaussian_filter(rng.standard_normal(shape_t), sigma=tuple(sig), mode="wrap")
    lo, hi = m.min(), m.max()
    return ((m - lo) / (hi - lo) if hi > lo else np.zeros(shape_t)).astype(np.float32)
