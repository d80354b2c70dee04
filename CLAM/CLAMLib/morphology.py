"""Grey-level opening and closing with a ball, equal to SimpleITK's (flat ball kernel, safe border) but faster.

SimpleITK's ball of radius r (voxels, per axis) holds the offsets d with sum((d_i / (r_i + 0.5))^2) <= 1. An
axis-aligned box [-p, p] lies in that ellipsoid when its corner p does, so the ball is the union of the boxes of
its corners that no other corner dominates, and the maximum over the ball is the largest of those boxes' maxima.
Each box maximum is separable: a running maximum along one axis after another, shared between boxes with the
same first axes. SimpleITK's safe border pads the image by the radius with the type's largest value (opening) or
its most negative one (closing); outside the padded image a running maximum looks at nothing.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

_FLOAT_MAX = float(np.finfo(np.float32).max)


def ball_corners(radius: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Corners p of the boxes [-p, p] whose union is the ball of `radius` (same axis order), none inside another."""
    inside = [p for p in itertools.product(*(range(r + 1) for r in radius))
              if sum((d / (r + 0.5)) ** 2 for d, r in zip(p, radius)) <= 1.0]
    return [p for p in inside if not any(q != p and all(a >= b for a, b in zip(q, p)) for q in inside)]


def grey_opening(values: np.ndarray, radius: list[int]) -> np.ndarray:
    """Opening (erosion, then dilation) of a float32 array (z-y-x) by the ball of `radius` (SimpleITK order)."""
    return _padded(values, radius, _FLOAT_MAX, lambda x, r: _dilate(-_dilate(-x, r), r))


def grey_closing(values: np.ndarray, radius: list[int]) -> np.ndarray:
    """Closing (dilation, then erosion) of a float32 array (z-y-x) by the ball of `radius` (SimpleITK order)."""
    return _padded(values, radius, -_FLOAT_MAX, lambda x, r: -_dilate(-_dilate(x, r), r))


def _padded(values: np.ndarray, radius: list[int], fill: float, op) -> np.ndarray:
    """op on the array padded by the radius with `fill`, cut back to the array's own voxels."""
    zyx = tuple(reversed(radius))
    x = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    padded = F.pad(x[None, None], [r for r in radius for _ in range(2)], value=fill)[0, 0]
    out = op(padded, zyx)
    return out[tuple(slice(r, r + n) for r, n in zip(zyx, x.shape))].contiguous().numpy()


def _dilate(x: torch.Tensor, radius: tuple[int, ...]) -> torch.Tensor:
    """Maximum over the ball of `radius` (x's axis order) around each voxel, within x."""
    done: dict[tuple[int, ...], torch.Tensor] = {(): x}

    def box(corner: tuple[int, ...]) -> torch.Tensor:
        if corner not in done:
            before, r = box(corner[:-1]), corner[-1]
            done[corner] = _running_max(before, len(corner) - 1, r) if r else before
        return done[corner]

    out = None
    for corner in ball_corners(radius):
        part = box(corner)
        out = part.clone() if out is None else torch.maximum(out, part, out=out)
    return out


def _running_max(x: torch.Tensor, axis: int, r: int) -> torch.Tensor:
    """Maximum over [i - r, i + r] along `axis` at each i, within x."""
    out = x.clone()
    n = x.shape[axis]
    for shift in range(1, min(r, n - 1) + 1):
        later = out.narrow(axis, shift, n - shift)
        torch.maximum(later, x.narrow(axis, 0, n - shift), out=later)
        earlier = out.narrow(axis, 0, n - shift)
        torch.maximum(earlier, x.narrow(axis, shift, n - shift), out=earlier)
    return out
