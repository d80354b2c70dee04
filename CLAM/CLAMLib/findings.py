"""Findings maps: how far each lung voxel departs from the scan's own normal parenchyma, in three channels.

A CT's raw intensities carry the person: body and lung shape, the vessel tree, airways, the scanner's
calibration. Clustering them groups people. The findings map keeps what a radiologist reads as abnormal:

1. Outside the lungs is set to the lungs' median, so the chest wall does not enter the morphology below.
2. A grey opening with a ball of ``vessel_mm`` removes bright structures thinner than the ball (vessels, fissures);
   a grey closing removes dark ones (small airways). Lesions wider than the ball stay.
3. Each lung's normal level is a robust linear fit of the cleaned attenuation over position (the gravity-dependent
   gradient and the apex-to-base change), fitted to the voxels within ``FIT_BAND_HU`` of the previous fit.
4. The departure from that level, less a dead zone of ``NORMAL_BAND_HU`` either side (noise, inspiration), splits
   into low attenuation (emphysema, air trapping), ground glass (above the level but below ``SOLID_HU``) and solid
   (nodules, masses, consolidation), with a ramp of ``SOLID_RAMP_HU`` between the last two.

Every channel is in HU and zero outside the lungs. Preprocessing divides by ``lung_scale`` of the training cohort,
so that a typical lung voxel's finding is about ``TYPICAL`` on the model grid whatever the cohort's disease burden.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from .morphology import grey_closing, grey_opening

CHANNELS = ("low attenuation", "ground glass", "solid")
VESSEL_MM = 5.0  # radius of the ball that removes vessels: bright structures up to about 2 x 5 mm wide
NORMAL_BAND_HU = 50.0  # departures from the lung's own level within this band count as normal
SOLID_HU = -300.0  # attenuation where ground glass turns solid
SOLID_RAMP_HU = 100.0  # half-width of the ramp between ground glass and solid
SCALE_HU = 1000.0  # scale of a cohort without any finding
TYPICAL = 1.0 / 3.0  # root-mean-square finding over the training cohort's lungs on the model grid
FIT_BAND_HU = 100.0  # voxels within this of the current fit refine it
_FIT_ROUNDS = 3


def ball_radius(spacing: tuple[float, ...], mm: float) -> list[int]:
    """Per-axis ball radius in voxels (SimpleITK order) for a radius in mm; 0 on axes coarser than 4/3 of it."""
    return [int(mm / s + 0.5) if mm / s >= 0.75 else 0 for s in spacing]


def parenchyma_level(hu: np.ndarray, lung: np.ndarray, sides: np.ndarray) -> np.ndarray:
    """Expected normal attenuation at every voxel: per lung side, a robust linear fit of HU over voxel position."""
    level = np.zeros(hu.shape, dtype=np.float32)
    coords = np.indices(hu.shape, dtype=np.float32)
    for side in np.unique(sides[lung]):
        where = lung & (sides == side)
        values = hu[where].astype(np.float64)
        design = np.column_stack([np.ones(values.size)] + [c[where] for c in coords])
        centre = design[:, 1:].mean(0)
        design[:, 1:] -= centre
        fit = np.zeros(design.shape[1])
        fit[0] = np.median(values)
        for _ in range(_FIT_ROUNDS):
            keep = np.abs(values - design @ fit) < FIT_BAND_HU
            if keep.sum() < design.shape[1] * 10:
                break
            fit, *_ = np.linalg.lstsq(design[keep], values[keep], rcond=None)
        full = np.full(hu.shape, fit[0])  # the fitted plane over the whole region, axis by axis
        for axis, (size, mean, slope) in enumerate(zip(hu.shape, centre, fit[1:])):
            full += ((np.arange(size) - mean) * slope).reshape([-1 if a == axis else 1 for a in range(hu.ndim)])
        level[sides == side] = full[sides == side]
    return level


def findings(hu: sitk.Image, lung: np.ndarray, sides: np.ndarray, vessel_mm: float = VESSEL_MM) -> np.ndarray:
    """Findings map (3, *shape) in HU of a CT region (HU) with its lung mask and side labels (same shape)."""
    values = sitk.GetArrayFromImage(sitk.Cast(hu, sitk.sitkFloat32))
    if not lung.any():
        return np.zeros((len(CHANNELS), *values.shape), dtype=np.float32)
    values[~lung] = np.median(values[lung])
    radius = ball_radius(hu.GetSpacing(), vessel_mm)
    if max(radius) > 0:
        values = grey_closing(grey_opening(values, radius), radius)
    departure = values - parenchyma_level(values, lung, sides)
    low = np.clip(-departure - NORMAL_BAND_HU, 0, None)
    high = np.clip(departure - NORMAL_BAND_HU, 0, None)
    solid = np.clip((values - (SOLID_HU - SOLID_RAMP_HU)) / (2 * SOLID_RAMP_HU), 0.0, 1.0)
    out = np.stack([low, high * (1 - solid), high * solid]).astype(np.float32)
    out[:, ~lung] = 0.0
    return out


def lung_scale(sum_squares: float, count: int) -> float:
    """Divisor (HU) that makes the root-mean-square finding over ``count`` lung voxels equal ``TYPICAL``."""
    rms = math.sqrt(sum_squares / count) if count else 0.0
    return rms / TYPICAL if rms > 0 else SCALE_HU
