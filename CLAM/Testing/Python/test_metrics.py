"""Tests of the clustering and localisation metrics on hand-made cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from CLAMLib.errors import InputError
from CLAMLib.metrics import (
    cluster_accuracy,
    clustering_scores,
    correctly_assigned,
    lesion_auc,
    localisation_scores,
    mass_in_lesion,
    pointing_game,
    random_map,
)


def case3d() -> tuple[np.ndarray, np.ndarray]:
    """A 10^3 lung box (inner 8^3 = 512 voxels) with a 2^3 = 8 voxel lesion at [4:6, 4:6, 4:6]."""
    lung = np.zeros((10, 10, 10), bool)
    lung[1:9, 1:9, 1:9] = True
    lesion = np.zeros_like(lung)
    lesion[4:6, 4:6, 4:6] = True
    return lesion, lung


# ----------------------------------------------------------------------------- clustering


def test_permuted_perfect_clustering_scores_one() -> None:
    truth = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    pred = [2, 2, 2, 0, 0, 0, 1, 1, 1]
    assert cluster_accuracy(truth, pred) == 1.0
    assert clustering_scores(truth, pred) == pytest.approx({"accuracy": 1.0, "ari": 1.0, "nmi": 1.0})
    assert cluster_accuracy(["a", "a", "b", "b"], [7, 7, -1, -1]) == 1.0


def test_accuracy_with_more_or_fewer_predicted_clusters() -> None:
    assert cluster_accuracy([0, 0, 0, 1, 1, 1], [0, 0, 2, 1, 1, 1]) == pytest.approx(5 / 6)  # k = true + 1
    assert cluster_accuracy([0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 1, 1]) == pytest.approx(4 / 6)  # k = true - 1
    assert cluster_accuracy([0, 1, 0, 1], [0, 0, 0, 0]) == 0.5
    assert cluster_accuracy([0, 0, 1, 1], [1, 0, 0, 1]) == 0.5


def test_correctly_assigned_names_the_subjects_outside_their_matched_cluster() -> None:
    # predicted cluster 5 matches true "b", 3 matches "a"; the fifth subject is a "b" put with the "a"s
    mask = correctly_assigned(["a", "a", "b", "b", "b"], [3, 3, 5, 5, 3])
    assert mask.tolist() == [True, True, True, True, False]
    # a predicted cluster left without a match counts wrong, as in cluster_accuracy
    assert correctly_assigned([0, 0, 0, 1, 1, 1], [0, 0, 2, 1, 1, 1]).tolist() == [True, True, False, True, True, True]
    assert correctly_assigned([0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 1, 1]).sum() == 4


def test_clustering_label_errors() -> None:
    with pytest.raises(InputError, match="same"):
        cluster_accuracy([0, 1], [0, 1, 1])
    with pytest.raises(InputError):
        clustering_scores([], [])


# ----------------------------------------------------------------------------- localisation


def test_pointing_game_hit_miss_and_tolerance() -> None:
    lesion, lung = case3d()
    sal = np.zeros(lesion.shape)
    sal[5, 5, 5] = 1.0
    assert pointing_game(sal, lesion, lung, 0) == 1.0
    sal = np.zeros(lesion.shape)
    sal[5, 5, 7] = 1.0  # two voxels beyond the lesion's edge at x = 5
    assert pointing_game(sal, lesion, lung, 0) == 0.0
    assert pointing_game(sal, lesion, lung, 1) == 0.0
    assert pointing_game(sal, lesion, lung, 2) == 1.0
    sal = np.zeros(lesion.shape)
    sal[7, 7, 7] = 1.0  # diagonal: (2, 2, 2) from the lesion corner, beyond a Euclidean ball of radius 2
    assert pointing_game(sal, lesion, lung, 2) == 0.0
    assert pointing_game(sal, lesion, lung, 4) == 1.0


def test_pointing_game_ignores_outside_lung_and_takes_first_tie() -> None:
    lesion, lung = case3d()
    sal = np.zeros(lesion.shape)
    sal[0, 0, 0] = 100.0  # outside the lungs
    sal[4, 4, 4] = 1.0
    assert pointing_game(sal, lesion, lung, 0) == 1.0
    flat = np.ones(lesion.shape)  # ties everywhere: the first lung voxel (1, 1, 1) is not in the lesion
    assert pointing_game(flat, lesion, lung, 0) == 0.0
    flat[1, 1, 1] = 0.0
    flat[4:6, 4:6, 4:6] = 1.0
    flat[lung & ~lesion] = 0.5
    flat[4, 4, 4] = flat[5, 5, 5] = 2.0  # tie between two lesion voxels
    assert pointing_game(flat, lesion, lung, 0) == 1.0


def test_auc_perfect_inverse_and_constant_maps() -> None:
    lesion, lung = case3d()
    perfect = lesion.astype(float) + 0.01 * np.arange(lesion.size).reshape(lesion.shape) / lesion.size
    assert lesion_auc(perfect, lesion, lung) == 1.0
    assert lesion_auc(-perfect, lesion, lung) == 0.0
    assert lesion_auc(np.full(lesion.shape, 3.0), lesion, lung) == 0.5
    # only lung voxels count: a high value outside the lungs does not change the answer
    outside = perfect.copy()
    outside[0, 0, 0] = 10.0
    assert lesion_auc(outside, lesion, lung) == 1.0


def test_mass_in_lesion_uniform_perfect_zero_and_negative_maps() -> None:
    lesion, lung = case3d()
    share, ratio = mass_in_lesion(np.ones(lesion.shape), lesion, lung)
    assert share == pytest.approx(8 / 512) and ratio == pytest.approx(1.0)
    share, ratio = mass_in_lesion(lesion.astype(float), lesion, lung)
    assert share == pytest.approx(1.0) and ratio == pytest.approx(512 / 8)
    assert mass_in_lesion(np.zeros(lesion.shape), lesion, lung) == (0.0, 0.0)
    signed = np.where(lesion, 1.0, -5.0)  # negative values carry no mass
    assert mass_in_lesion(signed, lesion, lung)[0] == pytest.approx(1.0)


def test_two_dimensional_maps_and_no_lung_mask() -> None:
    lesion = np.zeros((20, 20), bool)
    lesion[5:10, 5:10] = True
    sal = np.zeros((20, 20))
    sal[7, 7] = 1.0
    assert pointing_game(sal, lesion, None, 0) == 1.0
    assert mass_in_lesion(np.ones((20, 20)), lesion, None)[1] == pytest.approx(1.0)
    assert lesion_auc(lesion.astype(float), lesion, None) == 1.0


def test_localisation_input_errors() -> None:
    lesion, lung = case3d()
    with pytest.raises(InputError, match="shape"):
        pointing_game(np.zeros((5, 5, 5)), lesion, lung, 0)
    bad = np.zeros(lesion.shape)
    bad[4, 4, 4] = np.nan
    with pytest.raises(InputError, match="NaN"):
        lesion_auc(bad, lesion, lung)
    with pytest.raises(InputError, match="no voxel inside the lungs"):
        mass_in_lesion(np.ones(lesion.shape), np.zeros_like(lesion), lung)
    with pytest.raises(InputError, match="tolerance"):
        pointing_game(np.ones(lesion.shape), lesion, lung, -1)


def test_localisation_scores_means_and_skips() -> None:
    lesion, lung = case3d()
    perfect = lesion.astype(float)
    uniform = np.ones(lesion.shape)
    uniform[1, 1, 1] = 1.0 + 1e-9  # the peak lies outside the lesion
    scores = localisation_scores([perfect, uniform, perfect], [lesion, lesion, np.zeros_like(lesion)],
                                 [lung, lung, lung], tolerance=0)
    assert scores["n_scored"] == 2 and scores["n_skipped"] == 1
    assert scores["pointing_game"] == pytest.approx(0.5)
    assert scores["auc"] == pytest.approx((1.0 + 0.5) / 2, abs=1e-3)  # one raised non-lesion voxel
    assert scores["mass_ratio"] == pytest.approx((64.0 + 1.0) / 2, rel=1e-6)
    assert scores["mass_share"] == pytest.approx((1.0 + 8 / 512) / 2, rel=1e-6)
    with pytest.raises(InputError, match="one of each"):
        localisation_scores([perfect], [lesion, lesion])


def test_random_map_is_smooth_seeded_and_scores_near_chance() -> None:
    a = random_map((32, 32, 32), seed=1, smooth=3.0)
    assert a.shape == (32, 32, 32) and a.dtype == np.float32
    assert a.min() == 0.0 and a.max() == 1.0
    np.testing.assert_array_equal(a, random_map((32, 32, 32), seed=1, smooth=3.0))
    assert not np.array_equal(a, random_map((32, 32, 32), seed=2, smooth=3.0))
    neighbours = np.corrcoef(a[:, :, :-1].ravel(), a[:, :, 1:].ravel())[0, 1]
    assert neighbours > 0.8  # smooth
    lesion, lung = case3d()
    aucs = [lesion_auc(random_map(lesion.shape, seed=s, smooth=1.0), lesion, lung) for s in range(40)]
    assert 0.35 < np.mean(aucs) < 0.65
    assert random_map((16, 16), seed=0, smooth=(1.0, 2.0)).shape == (16, 16)
