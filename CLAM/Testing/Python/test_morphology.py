"""Grey opening and closing with a ball: equal, voxel for voxel, to SimpleITK's (flat ball kernel, safe border)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from CLAMLib.morphology import ball_corners, grey_closing, grey_opening
from CLAMLib.preprocess import _closing, linear_zoom


@pytest.mark.parametrize("radius", [[2, 2, 2], [2, 2, 3], [1, 2, 3], [0, 2, 2], [3, 3, 1], [3, 4]])
def test_opening_and_closing_equal_simpleitk(radius: list[int]) -> None:
    rng = np.random.default_rng(sum(radius))
    shape = (17, 23, 29)[-len(radius):]
    values = (rng.random(shape) * 1200 - 1000).astype(np.float32)
    values[..., :4] = -1000.0  # a flat part beside the noise, at the border
    image = sitk.GetImageFromArray(values)
    opened = sitk.GetArrayFromImage(sitk.GrayscaleMorphologicalOpening(image, radius, sitk.sitkBall))
    closed = sitk.GetArrayFromImage(sitk.GrayscaleMorphologicalClosing(image, radius, sitk.sitkBall))
    np.testing.assert_array_equal(grey_opening(values, radius), opened)
    np.testing.assert_array_equal(grey_closing(values, radius), closed)
    assert not np.array_equal(opened, values) and not np.array_equal(closed, values)


def test_input_is_left_as_it_was() -> None:
    values = np.random.default_rng(0).random((9, 10, 11)).astype(np.float32)
    kept = values.copy()
    grey_closing(grey_opening(values, [1, 1, 1]), [1, 1, 1])
    np.testing.assert_array_equal(values, kept)


def test_ball_is_the_union_of_its_corner_boxes() -> None:
    radius = (3, 2, 4)
    ball = {d for d in np.ndindex(*(2 * r + 1 for r in radius))
            if sum(((i - r) / (r + 0.5)) ** 2 for i, r in zip(d, radius)) <= 1}
    union = {tuple(i + r for i, r in zip(d, radius)) for p in ball_corners(radius)
             for d in np.ndindex(*(2 * c + 1 for c in p)) for d in [tuple(a - c for a, c in zip(d, p))]}
    assert union == ball


@pytest.mark.parametrize("size", [(250, 61, 97), (40, 30, 20), (20, 61, 97), (88, 88, 88)])
def test_linear_zoom_equals_trilinear_interpolation(size: tuple[int, int, int]) -> None:
    values = torch.from_numpy(np.random.default_rng(1).random((32, 24, 40)).astype(np.float32))
    expected = torch.nn.functional.interpolate(values[None, None], size=size, mode="trilinear", align_corners=False)
    assert float((linear_zoom(values, size) - expected[0, 0]).abs().max()) < 1e-5


@pytest.mark.parametrize("radius", [[3, 3, 4], [4, 2, 1], [2, 3, 0]])
def test_binary_closing_equals_simpleitk(radius: list[int]) -> None:
    """The lung mask's closing (preprocess._closing) against SimpleITK's with a ball and a safe border, for blobs
    with gaps and dents, one of them cut by the array's edge."""
    rng = np.random.default_rng(sum(radius))
    mask = np.zeros((20, 30, 34), bool)
    for _ in range(6):
        centre, size = rng.integers(0, (20, 30, 34)), rng.integers(2, 7, 3)
        mask[tuple(slice(max(0, c - s), c + s) for c, s in zip(centre, size))] = True
    mask[:, :, 0:3] |= rng.random((20, 30, 3)) < 0.5
    expected = sitk.GetArrayFromImage(sitk.BinaryMorphologicalClosing(
        sitk.GetImageFromArray(mask.astype(np.uint8)), radius, sitk.sitkBall, 1, True)) > 0
    closed = _closing(mask, radius)
    np.testing.assert_array_equal(closed, expected)
    assert closed.sum() > mask.sum()
