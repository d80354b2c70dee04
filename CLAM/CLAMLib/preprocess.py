"""Chest CT preprocessing for CLAM: lung mask, crop to the lungs, model grid, template registration, normalisation.

Defaults (PreprocessConfig):
- grid 88: the paper's cube; divisible by 8 because the encoder halves the grid three times.
- hu_min -1000, hu_max 200: air to soft tissue. Lung parenchyma (-950 to -500), ground glass, nodules and
  consolidation (about -300 to 100) keep their contrast; bone and contrast agent, irrelevant in the lungs, clip.
- margin_mm 10: keeps the pleura and chest wall next to the lungs in the crop.
- closing_mm 20: each lung's mask is closed with a 20 mm ball, the left and right lung apart, and the closing adds
  nothing nearer the midline than the lung's most medial voxel in the same image row: solid lesions at the pleura
  and the diaphragm come in (with one 6 mm closing, most of lung2's tumour was left out, and simulated lesions
  touching the pleura were erased) while the hila and the mediastinum stay out, as they do not in a plain 20 mm
  closing, where whether they come in changes from scan to scan and drives the clusters.
- register "none": cropping to the lungs already removes most size and position differences; "affine" and
  "bspline" register each scan's lungs on the grid to a lung template built from the training cohort (the mean
  lung mask after affine alignment); registration matches lung masks, since the normalised image carries no lung
  outline (voxels outside the lungs hold the lung mean).
- representation "findings": the model sees three channels of how far each lung voxel departs from the scan's own
  normal parenchyma (low attenuation, ground glass, solid; see findings.py), computed at the lung mask's working
  resolution after vessels are removed, in units of 1000 HU, zero outside the lungs. Raw intensities carry the
  person (anatomy, vessel tree, scanner calibration) and cluster people, not findings, on cohorts of different
  people. "ct" is the paper's input: one channel of clipped HU, normalised as below.
- centre True ("ct" only): intensities are (HU - hu_min) / scale (scale: the cohort's maximum, as in the paper) with voxels
  outside the lungs set to the lung mean (done at native resolution, before resampling, so the lung border leaves
  no bright rim); centring then subtracts that mean, so a scan's overall attenuation offset (scanner calibration,
  inspiration level) is not what the clustering sees. centre False gives the paper's normalisation exactly.

Registration works in grid index space (unit spacing, zero origin, identity direction), where every subject's
crop box and the template coincide; `Prepared.transform` maps template index points to subject grid index points.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage

from . import findings as _findings
from .errors import BundleError, CLAMError, InputError
from .imageio import check_image

_MASK_SPACING_MM = 2.0  # working resolution of lung_mask
_AIR_HU = -400.0  # voxels below this count as air
LUNG_CLOSING_MM = 20.0  # default radius of the closing of each lung: takes in vessels and lesions at the pleura
_ZOOM_SLICES = 16  # output slices per step of linear_zoom
_FORMER_CLOSING_MM = 6.0  # the closing of preprocessing states that do not record theirs
_AIRWAY_AREA_MM2 = 600.0  # trachea and main bronchi cross-sections are smaller than this
_AIRWAY_BAND = 0.15  # fraction of the lungs' width either side of their centre where airways lie
_MIDLINE_BAND = 0.2  # fraction of the lungs' width either side of their centre searched for the gap between them
_KEEP_FRACTION = 0.1  # air components at least this fraction of the largest count as lung
_MIN_LUNG = {3: 20_000.0, 2: 400.0}  # smallest lung volume (mm^3) or area (mm^2) accepted
_BSPLINE_MESH = 4  # B-spline control mesh cells per axis
_REGISTRATION_RIM = 2  # grid voxels around the template's lungs where the metric is computed
_STATE_VERSION = 1
_INPLANE = np.zeros((3, 3, 3), dtype=bool)
_INPLANE[1] = ndimage.generate_binary_structure(2, 1)
REGISTRATIONS = ("none", "affine", "bspline")
REPRESENTATIONS = ("findings", "ct")


class NotFittedError(CLAMError, RuntimeError):
    """A Preprocessor used before fit or from_state."""


@dataclass(frozen=True)
class Geometry:
    """Physical geometry of an image: size, spacing, origin and direction (SimpleITK order)."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def from_image(cls, image: sitk.Image) -> Geometry:
        """Geometry of a SimpleITK image."""
        return cls(
            tuple(int(n) for n in image.GetSize()),
            tuple(float(v) for v in image.GetSpacing()),
            tuple(float(v) for v in image.GetOrigin()),
            tuple(float(v) for v in image.GetDirection()),
        )

    def matches(self, other: Geometry, atol: float = 1e-3) -> bool:
        """Same size, and spacing, origin and direction equal within atol (mm, and direction cosines)."""
        return self.size == other.size and np.allclose(
            self.spacing + self.origin + self.direction, other.spacing + other.origin + other.direction, atol=atol
        )

    def to_dict(self) -> dict[str, list]:
        """JSON-able form."""
        return {key: list(value) for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Geometry:
        """Inverse of to_dict."""
        return cls(
            tuple(int(n) for n in data["size"]),
            tuple(float(v) for v in data["spacing"]),
            tuple(float(v) for v in data["origin"]),
            tuple(float(v) for v in data["direction"]),
        )


@dataclass
class Prepared:
    """One image ready for the model, with what is needed to map results back onto it."""

    array: np.ndarray  # float32, (grid,) * ndim ("ct") or (channels, *grid) ("findings"), z-y-x; template space when registered
    lung: np.ndarray  # bool lung mask on the same grid
    native: Geometry  # geometry of the input image
    grid: Geometry  # physical geometry of the subject's model grid (lung box plus margin)
    transform: sitk.Transform | None  # template grid index -> subject grid index; None without registration


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing settings; the module docstring gives the reasons for the defaults."""

    grid: int = 88
    ndim: int = 3
    hu_min: float = -1000.0
    hu_max: float = 200.0
    margin_mm: float = 10.0
    register: str = "none"
    centre: bool = True
    closing_mm: float = LUNG_CLOSING_MM
    representation: str = "findings"
    vessel_mm: float = _findings.VESSEL_MM

    @property
    def channels(self) -> int:
        """Number of model input channels this representation gives."""
        return len(_findings.CHANNELS) if self.representation == "findings" else 1

    def __post_init__(self) -> None:
        """Refuse settings that cannot work."""
        if not isinstance(self.grid, int) or self.grid < 16 or self.grid % 8:
            raise InputError(
                f"grid must be a multiple of 8 and at least 16, got {self.grid}; use e.g. 48 or 88"
            )
        if self.ndim not in (2, 3):
            raise InputError(f"ndim must be 2 or 3, got {self.ndim}")
        if not self.hu_max > self.hu_min:
            raise InputError(f"hu_max ({self.hu_max}) must exceed hu_min ({self.hu_min}); e.g. -1000 and 200")
        if not self.margin_mm >= 0:
            raise InputError(f"margin_mm must be 0 or more, got {self.margin_mm}")
        if self.register not in REGISTRATIONS:
            raise InputError(f"register must be one of {', '.join(REGISTRATIONS)}, got {self.register!r}")
        if not (math.isfinite(self.closing_mm) and self.closing_mm >= 0):
            raise InputError(f"closing_mm must be 0 or more (mm), got {self.closing_mm}; the default is {LUNG_CLOSING_MM:g}")
        if self.representation not in REPRESENTATIONS:
            raise InputError(f"representation must be one of {', '.join(REPRESENTATIONS)}, got {self.representation!r}")
        if not (math.isfinite(self.vessel_mm) and self.vessel_mm >= 0):
            raise InputError(f"vessel_mm must be 0 or more (mm), got {self.vessel_mm}; the default is "
                             f"{_findings.VESSEL_MM:g}")


@dataclass
class LungMask:
    """A CT's lung mask as preprocessing finds it: 0/255 uint8 at about 2 mm, the shrink factors, the CT's geometry."""

    coarse: sitk.Image
    factors: list[int]
    source: Geometry
    closing_mm: float = LUNG_CLOSING_MM

    def full(self) -> sitk.Image:
        """Binary lung mask (uint8) on the CT's own geometry."""
        full = _resample(self.coarse, self.source, sitk.sitkLinear, 0, sitk.sitkUInt8)
        return sitk.Cast(full > 127, sitk.sitkUInt8)


def lung_mask(image: sitk.Image, closing_mm: float = LUNG_CLOSING_MM) -> sitk.Image:
    """Binary lung mask (uint8, the input's geometry) of a 2D or 3D chest CT in Hounsfield units."""
    return find_lungs(image, closing_mm).full()


def find_lungs(image: sitk.Image, closing_mm: float = LUNG_CLOSING_MM) -> LungMask:
    """The lungs of a 2D or 3D chest CT in Hounsfield units, at the resolution preprocessing works at.

    closing_mm is the radius of the closing of each lung, which takes vessels and solid lesions touching the pleura or
    the diaphragm into the mask but adds nothing medial to the lung (hila, mediastinum); 6 mm leaves most such
    lesions out.
    """
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("lung_mask needs a grey-scale CT; convert colour images to grey first")
    flat = image.GetDimension() == 2
    factors = [
        max(1, min(n, round(_MASK_SPACING_MM / s))) for s, n in zip(image.GetSpacing(), image.GetSize())
    ]
    small = sitk.BinShrink(image, factors) if max(factors) > 1 else image
    air = sitk.GetArrayViewFromImage(small) < _AIR_HU
    spacing = tuple(reversed(small.GetSpacing()))
    if flat:
        air, spacing = air[None], (math.inf, *spacing)
    mask = _lungs_from_air(air, spacing, closing_mm)
    coarse = sitk.GetImageFromArray((mask[0] if flat else mask).astype(np.uint8) * 255)
    coarse.CopyInformation(small)
    return LungMask(coarse, factors, Geometry.from_image(image), closing_mm)


class Preprocessor:
    """Turns chest CTs into model inputs and model-grid maps back into maps on the CTs (fit / transform)."""

    def __init__(self, config: PreprocessConfig | None = None) -> None:
        """Unfitted preprocessor with the given settings."""
        self.config = config or PreprocessConfig()
        self.scale_: float | None = None
        self.template_: _Template | None = None

    def fit(self, images: Iterable[sitk.Image]) -> Preprocessor:
        """Learn the cohort's normalisation constant and, when registering, its template."""
        return self.fit_grids(self.to_grid(image) for image in images)

    def fit_transform(self, images: Iterable[sitk.Image]) -> list[Prepared]:
        """Fit on the images and prepare each of them."""
        grids = [self.to_grid(image) for image in images]
        self.fit_grids(grids)
        return [self.finish(grid) for grid in grids]

    def transform(self, image: sitk.Image, lungs: LungMask | None = None) -> Prepared:
        """Prepare one CT for the model (with its lungs from find_lungs when already found)."""
        self._check_fitted()
        return self.finish(self.to_grid(image, lungs))

    def to_native(self, grid_map: np.ndarray, prepared: Prepared) -> sitk.Image:
        """Float32 map on exactly the input image's geometry from a map on the model grid; zero outside the crop."""
        values, index = self.native_box(grid_map, prepared)
        full = np.zeros(tuple(reversed(_model_geometry(prepared.native, self.config.ndim).size)), np.float32)
        full[box_slices(index, values.shape)] = values
        return _image(full.reshape(tuple(reversed(prepared.native.size))), prepared.native)

    def native_box(self, grid_map: np.ndarray, prepared: Prepared) -> tuple[np.ndarray, list[int]]:
        """A map on the model grid resampled onto the input's voxels inside the crop box alone (outside it the map is
        zero): float32 values (z-y-x) and the box's first voxel index (SimpleITK order) in the input's model geometry."""
        values = np.asarray(grid_map, dtype=np.float32)
        shape = (self.config.grid,) * self.config.ndim
        if values.shape != shape:
            raise InputError(
                f"map has shape {values.shape} but the model grid is {shape}; give a map on the grid"
            )
        if prepared.transform is not None:
            values = _warp(values, _inverse(prepared.transform, shape), 0.0)
        box, index = _crop_box(_model_geometry(prepared.native, self.config.ndim), prepared.grid)
        extent = np.array(prepared.grid.spacing) * np.array(prepared.grid.size)
        if np.allclose(extent, np.array(box.spacing) * np.array(box.size), rtol=1e-6, atol=0):
            # the grid covers the box exactly, on the same axes: resampling is a linear zoom (half-voxel centres)
            return linear_zoom(torch.from_numpy(values), tuple(reversed(box.size))).numpy(), index
        mapped = _resample(_image(values, prepared.grid), box, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        return sitk.GetArrayFromImage(mapped), index

    def grid_mask(self, mask: sitk.Image, prepared: Prepared) -> np.ndarray:
        """A binary mask on the input's geometry (e.g. a lesion) as a bool array on the model grid."""
        if not Geometry.from_image(mask).matches(prepared.native):
            raise InputError(
                "mask geometry differs from the image's; give the mask that belongs to this image"
            )
        work = _model_image(sitk.Cast(mask != 0, sitk.sitkUInt8), self.config.ndim)
        values = sitk.GetArrayFromImage(
            _resample(work, prepared.grid, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        )
        if prepared.transform is not None:
            values = _warp(values, prepared.transform, 0.0)
        return values > 0.5

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """JSON-able constants and arrays that restore this fitted preprocessor."""
        self._check_fitted()
        meta = {"version": _STATE_VERSION, "config": asdict(self.config), "scale": self.scale_}
        template = self.template_
        if template is None:
            return meta, {}
        return meta, {"template": template.image, "template_lung": template.lung.astype(np.uint8)}

    @classmethod
    def from_state(cls, meta: dict, arrays: dict[str, np.ndarray]) -> Preprocessor:
        """Fitted preprocessor from the output of state()."""
        fix = "re-export the model bundle with this version of CLAM"
        if meta.get("version") != _STATE_VERSION:
            raise BundleError(
                f"preprocessing state version {meta.get('version')!r} is not {_STATE_VERSION}; {fix}"
            )
        try:
            # states written before closing_mm was recorded were fitted with a 6 mm closing, and those before
            # representation was recorded saw the CT itself
            config = PreprocessConfig(**{"closing_mm": _FORMER_CLOSING_MM, "representation": "ct", **meta["config"]})
            scale = float(meta["scale"])
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(f"preprocessing state is incomplete or invalid ({err}); {fix}") from err
        if not scale > 0:
            raise BundleError(f"preprocessing scale must be positive, got {scale}; {fix}")
        processor = cls(config)
        processor.scale_ = scale
        if config.register != "none":
            shape = (config.grid,) * config.ndim
            image, lung = arrays.get("template"), arrays.get("template_lung")
            if image is None or lung is None or image.shape != shape or lung.shape != shape:
                raise BundleError(
                    f"registration template missing or of the wrong shape (need {shape}); {fix}"
                )
            processor.template_ = _Template(np.asarray(image, dtype=np.float32), np.asarray(lung, dtype=bool))
        return processor

    def _check_fitted(self) -> None:
        """Raise NotFittedError unless fit or from_state has run."""
        if self.scale_ is None or (self.config.register != "none" and self.template_ is None):
            raise NotFittedError(
                "Preprocessor is not fitted: call fit(images) on the cohort, or load it with from_state()"
            )

    def to_grid(self, image: sitk.Image, lungs: LungMask | None = None) -> Gridded:
        """Check, mask, crop and resample one image onto its model grid (clipped HU); the first step of transform."""
        config = self.config
        check_image(image, config.ndim)
        work = _model_image(image, config.ndim)
        if lungs is None:
            lungs = find_lungs(work, config.closing_mm)
        elif lungs.source != Geometry.from_image(work):
            raise InputError("the lung mask is of an image with another geometry; give find_lungs(image) of this image")
        elif lungs.closing_mm != config.closing_mm:
            raise InputError(f"the lung mask was found with closing_mm={lungs.closing_mm:g}, this preprocessing uses "
                             f"{config.closing_mm:g}; give find_lungs(image, {config.closing_mm:g})")
        index, size = _lung_box(lungs.coarse, lungs.factors, work, config.margin_mm)
        grid = _grid_geometry(work, index, size, config.grid)
        crop = sitk.Clamp(
            sitk.RegionOfInterest(work, size, index), sitk.sitkFloat32, config.hu_min, config.hu_max
        )
        lung = sitk.GetArrayFromImage(_resample(lungs.coarse, grid, sitk.sitkLinear, 0.0, sitk.sitkFloat32)) > 127.5
        if config.representation == "findings":
            return Gridded(self._findings(crop, lungs, grid), lung, Geometry.from_image(image), grid)
        crop = _outside_to_lung_mean(crop, lungs, index)
        crop = _antialias(crop, grid.spacing)
        array = sitk.GetArrayFromImage(
            _resample(crop, grid, sitk.sitkLinear, config.hu_min, sitk.sitkFloat32)
        )
        return Gridded(array, lung, Geometry.from_image(image), grid)

    def _findings(self, crop: sitk.Image, lungs: LungMask, grid: Geometry) -> np.ndarray:
        """Findings channels (C, *grid) in HU of a clipped crop: found at the lung mask's resolution, then gridded."""
        small = sitk.BinShrink(crop, lungs.factors) if max(lungs.factors) > 1 else crop
        lung = sitk.GetArrayFromImage(
            _resample(lungs.coarse, Geometry.from_image(small), sitk.sitkLinear, 0, sitk.sitkFloat32)) > 127.5
        volume = lung if lung.ndim == 3 else lung[None]
        split = _midline(volume)
        sides = np.broadcast_to(np.arange(lung.shape[-1]) >= split, lung.shape)
        channels = _findings.findings(small, lung, sides, self.config.vessel_mm)
        out = []
        for values in channels:
            image = sitk.GetImageFromArray(values)
            image.CopyInformation(small)
            image = _antialias(image, grid.spacing)
            out.append(sitk.GetArrayFromImage(_resample(image, grid, sitk.sitkLinear, 0.0, sitk.sitkFloat32)))
        return np.stack(out)

    def fit_grids(self, grids: Iterable[Gridded], shard: Callable[[list], list] = list,
                  total: Callable[[np.ndarray], np.ndarray] = np.asarray) -> Preprocessor:
        """Learn the normalisation constant and, when registering, the template from the cohort's to_grid results.

        Under torchrun, ``shard`` gives this rank's part of a list and ``total`` sums an array over the ranks, so
        each rank registers only its part of the cohort to the template.
        """
        config = self.config
        findings = config.representation == "findings"
        scale, count, kept, squares, voxels = -math.inf, 0, [], 0.0, 0
        for grid in grids:
            if findings:
                squares += float(np.square(grid.array[:, grid.lung], dtype=np.float64).sum())
                voxels += int(grid.lung.sum()) * grid.array.shape[0]
            else:
                scale = max(scale, float(grid.array.max()) - config.hu_min)
            count += 1
            if config.register != "none":
                kept.append(grid)
        if count == 0:
            raise InputError("fit needs at least one image; give the training cohort's CTs")
        if findings:
            scale = _findings.lung_scale(squares, voxels)
        if not scale > 0:
            raise InputError(
                "every image is at or below hu_min on the model grid; give CTs in Hounsfield units"
            )
        template = template_lung = None
        if kept:
            first = _mean([g.lung.astype(np.float32) for g in kept])
            fixed = _Template(first, first > 0.5)
            warped = np.zeros(first.shape, dtype=np.float64)
            for g in shard(kept):
                lung = g.lung.astype(np.float32)
                warped += _warp(lung, _register(fixed, lung, "affine"), 0.0)
            template = (total(warped) / len(kept)).astype(np.float32)
            template_lung = template > 0.5
        self.scale_ = scale
        self.template_ = None if template is None else _Template(template, template_lung)
        return self

    def finish(self, grid: Gridded) -> Prepared:
        """Register (when configured) and normalise one to_grid result of a fitted preprocessor."""
        self._check_fitted()
        config = self.config
        array, lung, transform = grid.array, grid.lung, None
        findings = config.representation == "findings"
        if self.template_ is not None:
            transform = _register(self.template_, lung.astype(np.float32), config.register)
            if findings:
                array = np.stack([_warp(channel, transform, 0.0) for channel in array])
            else:
                array = _warp(array, transform, config.hu_min)
            lung = _warp(lung.astype(np.float32), transform, 0.0) > 0.5
        if not lung.any():
            raise InputError("no lung voxels left on the model grid; check the scan covers the lungs")
        if findings:
            values = array / np.float32(self.scale_)
            values[:, ~lung] = 0.0
            return Prepared(values.astype(np.float32, copy=False), lung, grid.native, grid.grid, transform)
        values = (array - np.float32(config.hu_min)) / np.float32(self.scale_)
        lung_mean = values[lung].mean()
        values[~lung] = lung_mean
        if config.centre:  # remove the scan's overall attenuation offset: the lungs average 0, outside is 0
            values -= lung_mean
        return Prepared(values.astype(np.float32, copy=False), lung, grid.native, grid.grid, transform)


@dataclass
class _Template:
    """The cohort's lung template: mean aligned lung mask (probability) and its > 0.5 mask."""

    image: np.ndarray
    lung: np.ndarray


@dataclass
class Gridded:
    """An image on its model grid before registration and normalisation."""

    array: np.ndarray
    lung: np.ndarray
    native: Geometry
    grid: Geometry


def _outside_to_lung_mean(crop: sitk.Image, lungs: LungMask, index: list[int]) -> sitk.Image:
    """The crop (first voxel `index` of the CT) with every voxel outside the lungs set to the lungs' mean, before
    resampling (no bright rim)."""
    lung = _lung_on_box(lungs, index, list(crop.GetSize()))
    if not lung.any():
        raise InputError("no lung voxels inside the crop; check the scan covers the lungs")
    mean = float(np.mean(sitk.GetArrayViewFromImage(crop), where=lung, dtype=np.float64))
    mask = sitk.GetImageFromArray(lung.view(np.uint8))
    mask.CopyInformation(crop)
    return sitk.Mask(crop, mask, outsideValue=mean)


def _lung_on_box(lungs: LungMask, index: list[int], size: list[int]) -> np.ndarray:
    """The coarse lung mask linearly interpolated onto the CT's voxels in a box and cut at half (z-y-x bool), as
    resampling it there gives: the coarse grid is the CT's shrunk by whole factors, so this is a linear zoom of the
    coarse voxels around the box (with one coarse voxel of margin, so that edges clamp only where the mask's do)."""
    coarse = sitk.GetArrayViewFromImage(lungs.coarse)
    factors = list(reversed(lungs.factors))
    first, last = list(reversed(index)), [i + n for i, n in zip(reversed(index), reversed(size))]
    low = [max(0, f // k - 1) for f, k in zip(first, factors)]
    high = [min(n, -(-e // k) + 1) for e, k, n in zip(last, factors, coarse.shape)]
    block = torch.from_numpy(coarse[tuple(slice(a, b) for a, b in zip(low, high))].astype(np.float32))
    zoomed = linear_zoom(block, tuple(n * k for n, k in zip(block.shape, factors)))
    # voxels past the last whole coarse voxel lie outside the mask
    covered = [max(0, min(e, n * k) - f) for f, e, n, k in zip(first, last, coarse.shape, factors)]
    inside = np.zeros([e - f for f, e in zip(first, last)], dtype=bool)
    cut = zoomed[tuple(slice(f - a * k, f - a * k + c) for f, a, k, c in zip(first, low, factors, covered))]
    inside[tuple(slice(0, c) for c in covered)] = (cut >= 128).numpy()  # the resampled uint8 mask above 127
    return inside


def _lungs_from_air(air: np.ndarray, spacing: tuple[float, float, float], closing_mm: float) -> np.ndarray:
    """Lung mask (z, y, x bool) from an air mask: keep large parts inside the body, cut airways, close each lung."""
    voxel = spacing[1] * spacing[2] * (1.0 if math.isinf(spacing[0]) else spacing[0])
    flat = math.isinf(spacing[0])
    mask = _largest(_inside_body(air), _KEEP_FRACTION)
    mask = _drop_airways(mask, spacing)
    radius = [0 if math.isinf(s) else round(closing_mm / s) for s in reversed(spacing)]
    mask = _close_each_lung(mask, radius)
    # fill holes enclosed by lung: in-slice for 2D; in 3D otherwise, so that the diaphragm's dome, enclosed by
    # lung only within axial slices, stays out while lesions and vessels inside the lung come in
    filled = mask | _inner(~mask) if flat else ndimage.binary_fill_holes(mask)
    mask = _largest(filled, _KEEP_FRACTION / 2)
    if mask.sum() * voxel < _MIN_LUNG[2 if flat else 3]:
        raise InputError(
            "no lungs found: too little air inside the body; give a chest CT in Hounsfield units that covers the "
            "lungs"
        )
    return mask


def _close_each_lung(mask: np.ndarray, radius: list[int]) -> np.ndarray:
    """Closing of each lung by itself, kept lateral to the lung's most medial voxel in each row: it fills dents
    at the pleura and the diaphragm (solid lesions there) while the hila and the mediastinum stay out."""
    split = _midline(mask)
    closed = np.zeros_like(mask)
    columns = np.arange(mask.shape[2])
    for side, sign in ((np.s_[..., :split], 1), (np.s_[..., split:], -1)):
        lung = mask[side]
        if not lung.any():
            continue
        part = _closing(lung, radius)
        inward = sign * columns[side[-1]]  # grows towards the midline
        edge = np.where(lung, inward, np.iinfo(np.int64).min).max(axis=2, keepdims=True)
        edge[~lung.any(axis=2, keepdims=True)] = np.iinfo(np.int64).max  # rows without lung: no limit
        closed[side] = part & (inward <= edge)
    return closed


def _closing(mask: np.ndarray, radius: list[int]) -> np.ndarray:
    """Binary closing, as SimpleITK's with a ball and a safe border, over the mask's bounding box grown by the radius
    (the closing adds nothing farther out). The ball of radius r (per axis, SimpleITK order) holds the offsets d with
    sum((d_i / (r_i + 0.5))^2) <= 1, never = 1 for whole d, so two exact distance transforms in units of those
    semi-axes give the dilation and then the erosion."""
    zyx = list(reversed(radius))
    used = [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis))) for axis in range(mask.ndim)]
    box = tuple(slice(max(0, u[0] - r), min(n, u[-1] + r + 1)) for u, r, n in zip(used, zyx, mask.shape))
    part = np.pad(mask[box], [(r + 1, r + 1) for r in zyx])  # background all round, beyond the ball's reach
    units = [1.0 / (r + 0.5) for r in zyx]
    grown = ndimage.distance_transform_edt(~part, sampling=units) <= 1.0
    closed = np.zeros_like(mask)
    closed[box] = (ndimage.distance_transform_edt(grown, sampling=units) > 1.0)[
        tuple(slice(r + 1, n - r - 1) for r, n in zip(zyx, part.shape))]
    return closed


def _midline(mask: np.ndarray) -> int:
    """Column (last axis) between the lungs: the one with the fewest lung voxels near the lungs' centre."""
    profile = mask.sum(axis=(0, 1))
    used = np.flatnonzero(profile)
    if used.size == 0:
        return mask.shape[2] // 2
    middle, width = (used[0] + used[-1]) / 2, used[-1] - used[0] + 1
    low = max(0, math.floor(middle - _MIDLINE_BAND * width))
    high = min(mask.shape[2], math.ceil(middle + _MIDLINE_BAND * width) + 1)
    return low + int(np.argmin(profile[low:high]))


def _inside_body(air: np.ndarray) -> np.ndarray:
    """Air inside the body: air enclosed within its slice, and air reaching a slice's edge whose 3D part lies
    mostly within the slices' body outline (lungs cut by the edge of a cropped scan, not the air around the body)."""
    enclosed = _inner(air)
    labels, count = ndimage.label(air & ~enclosed)
    if count == 0:
        return enclosed
    within = np.zeros(count + 1)
    for piece, part in zip(air, labels):
        found = part > 0
        if not found.any():
            continue
        spans = _body_hull(~piece)
        if spans is None:
            continue
        rows, cols = np.nonzero(found)
        inside = (spans[0][rows] <= cols) & (cols <= spans[1][rows])
        within += np.bincount(part[found][inside], minlength=count + 1)
    keep = within >= 0.5 * np.bincount(labels.ravel(), minlength=count + 1)
    keep[0] = False
    return enclosed | keep[labels]


def _body_hull(tissue: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Per row, the first and last column inside the convex hull of a slice's largest tissue part (the body
    without the table), or None where that hull has no area."""
    from scipy.spatial import ConvexHull, QhullError

    labels, count = ndimage.label(tissue)
    if count == 0:
        return None
    body = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    try:
        facets = ConvexHull(np.argwhere(body & ~ndimage.binary_erosion(body))).equations
    except QhullError:  # a line or a point
        return None
    # inside: a * row + b * column + c <= 0.5 for every facet; solve each for the column, row by row
    a, b, c = facets.T
    limit = -(np.outer(np.arange(tissue.shape[0]), a) + c - 0.5)  # b * column <= limit
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = limit / b
    last = np.where(b > 1e-9, bound, np.inf).min(axis=1)
    first = np.where(b < -1e-9, bound, -np.inf).max(axis=1)
    last[((np.abs(b) <= 1e-9) & (limit < 0)).any(axis=1)] = -np.inf  # rows beyond the hull's top or bottom
    return first, last


def _inner(mask: np.ndarray) -> np.ndarray:
    """Parts of a (z, y, x) mask not connected, within their slice, to the slice's edge."""
    labels, count = ndimage.label(mask, _INPLANE)
    edge = np.concatenate(
        [labels[:, 0].ravel(), labels[:, -1].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]
    )
    keep = np.ones(count + 1, dtype=bool)
    keep[0] = False
    keep[edge] = False
    return keep[labels]


def _largest(mask: np.ndarray, fraction: float) -> np.ndarray:
    """Connected components at least `fraction` of the largest one."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = sizes >= fraction * sizes.max()
    keep[0] = False
    return keep[labels]


def _drop_airways(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Remove small in-slice components near the lungs' left-right centre (trachea, main bronchi)."""
    labels, count = ndimage.label(mask, _INPLANE)
    if count == 0:
        return mask
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=count + 1)
    columns = np.broadcast_to(np.arange(mask.shape[2], dtype=np.float32), mask.shape).ravel()
    centres = np.bincount(flat, weights=columns, minlength=count + 1) / np.maximum(counts, 1)
    used = np.flatnonzero(mask.any(axis=(0, 1)))
    middle, width = (used[0] + used[-1]) / 2, used[-1] - used[0] + 1
    airway = (counts * spacing[1] * spacing[2] < _AIRWAY_AREA_MM2) & (
        np.abs(centres - middle) < _AIRWAY_BAND * width
    )
    airway[0] = False
    return mask & ~airway[labels]


def _lung_box(
    coarse: sitk.Image, factors: list[int], image: sitk.Image, margin_mm: float
) -> tuple[list[int], list[int]]:
    """Index and size (SimpleITK order) in `image` of the lungs' bounding box plus a margin, within the image."""
    values = sitk.GetArrayViewFromImage(coarse)
    index, size = [], []
    for axis, (factor, spacing, extent) in enumerate(zip(factors, image.GetSpacing(), image.GetSize())):
        other = tuple(a for a in range(values.ndim) if a != values.ndim - 1 - axis)
        used = np.flatnonzero(values.any(axis=other))
        margin = math.ceil(margin_mm / spacing)
        low = max(0, int(used[0]) * factor - margin)
        high = min(extent, (int(used[-1]) + 1) * factor + margin)
        index.append(low)
        size.append(high - low)
    return index, size


def _grid_geometry(image: sitk.Image, index: list[int], size: list[int], grid: int) -> Geometry:
    """Geometry of a grid^ndim cube that exactly covers the box `index`, `size` of `image`."""
    spacing = [s * n / grid for s, n in zip(image.GetSpacing(), size)]
    corner = [i - 0.5 + 0.5 * g / s for i, g, s in zip(index, spacing, image.GetSpacing())]
    origin = image.TransformContinuousIndexToPhysicalPoint(corner)
    return Geometry(
        (grid,) * image.GetDimension(), tuple(spacing), tuple(origin), tuple(image.GetDirection())
    )


def _antialias(image: sitk.Image, target: tuple[float, ...]) -> sitk.Image:
    """Average blocks of voxels on the axes that will be downsampled at least twofold, against aliasing."""
    factors = [max(1, int(goal // spacing)) for spacing, goal in zip(image.GetSpacing(), target)]
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def _resample(
    image: sitk.Image, geometry: Geometry, interpolator: int, default: float, pixel: int
) -> sitk.Image:
    """Resample an image onto a geometry without allocating a reference image."""
    identity = sitk.Transform(image.GetDimension(), sitk.sitkIdentity)
    return sitk.Resample(
        image,
        list(geometry.size),
        identity,
        interpolator,
        geometry.origin,
        geometry.spacing,
        geometry.direction,
        default,
        pixel,
    )


def _image(values: np.ndarray, geometry: Geometry) -> sitk.Image:
    """SimpleITK image of an array with a given geometry."""
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def _crop_box(work: Geometry, grid: Geometry) -> tuple[Geometry, list[int]]:
    """The voxels of `work` that the model grid covers (its crop box): their geometry and first index."""
    direction = np.array(work.direction).reshape(len(work.size), -1)
    spacing, grid_spacing = np.array(work.spacing), np.array(grid.spacing)
    first = direction.T @ (np.array(grid.origin) - np.array(work.origin)) / spacing - 0.5 * grid_spacing / spacing
    low = np.clip(np.round(first + 0.5).astype(int), 0, work.size)
    high = np.clip(np.round(first + 0.5 + np.array(grid.size) * grid_spacing / spacing).astype(int), low, work.size)
    origin = np.array(work.origin) + direction @ (spacing * low)
    box = Geometry(tuple(int(n) for n in high - low), work.spacing, tuple(origin.tolist()), work.direction)
    return box, [int(i) for i in low]


def linear_zoom(values: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Linear interpolation of a 2D or 3D array onto `size` voxels over the same extent (voxel centres at half-voxel
    offsets, edges clamped, as F.interpolate with align_corners=False): in 3D, bilinear within each slice and then
    linear across slices, which reads each output voxel's two neighbours instead of eight."""
    if values.ndim == 2:
        return F.interpolate(values[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    inplane = F.interpolate(values[None], size=size[1:], mode="bilinear", align_corners=False)[0]
    count, depth = values.shape[0], size[0]
    where = ((torch.arange(depth, dtype=torch.float64) + 0.5) * (count / depth) - 0.5).clamp_min(0)
    low = where.floor().long().clamp_max(count - 1)
    high = (low + 1).clamp_max(count - 1)
    weight = (where - low).to(values.dtype).view(-1, 1, 1)
    out = torch.empty((depth, *size[1:]), dtype=values.dtype)
    for start in range(0, depth, _ZOOM_SLICES):  # in slabs: two gathered slabs at a time, not two whole volumes
        part = slice(start, start + _ZOOM_SLICES)
        torch.lerp(inplane.index_select(0, low[part]), inplane.index_select(0, high[part]), weight[part], out=out[part])
    return out


def box_slices(index: list[int], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Array (z-y-x) slices of a box given by its first index (SimpleITK order) and its array shape."""
    return tuple(slice(i, i + n) for i, n in zip(reversed(index), shape))


def _model_geometry(native: Geometry, ndim: int) -> Geometry:
    """Geometry the model works on: the native one, or the in-plane part of a single-slice 3D image."""
    if len(native.size) == ndim:
        return native
    direction = np.array(native.direction).reshape(3, 3)[:2, :2]
    if abs(abs(np.linalg.det(direction)) - 1) > 1e-3:
        direction, origin = np.eye(2), (0.0, 0.0)
    else:
        origin = native.origin[:2]
    return Geometry(native.size[:2], native.spacing[:2], tuple(origin), tuple(direction.ravel().tolist()))


def _model_image(image: sitk.Image, ndim: int) -> sitk.Image:
    """The image itself, or its single slice as a 2D image for a 2D model."""
    if image.GetDimension() == ndim:
        return image
    return _image(sitk.GetArrayViewFromImage(image)[0], _model_geometry(Geometry.from_image(image), ndim))


def _canonical(values: np.ndarray) -> sitk.Image:
    """Image of a grid array in grid index space (unit spacing, zero origin, identity direction)."""
    return sitk.GetImageFromArray(values.astype(np.float32, copy=False))


def _mean(arrays: list[np.ndarray]) -> np.ndarray:
    """Voxel-wise mean of equally shaped arrays, as float32."""
    total = np.zeros(arrays[0].shape, dtype=np.float64)
    for values in arrays:
        total += values
    return (total / len(arrays)).astype(np.float32)


def _warp(values: np.ndarray, transform: sitk.Transform, default: float) -> np.ndarray:
    """Resample a grid array through a transform (output index point -> input index point)."""
    image = _canonical(values)
    return sitk.GetArrayFromImage(
        sitk.Resample(image, image, transform, sitk.sitkLinear, default, sitk.sitkFloat32)
    )


def _registration(template: _Template, shrinks: list[int], sampling: float) -> sitk.ImageRegistrationMethod:
    """Mean-squares registration restricted to the template's lungs and their surroundings."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMeanSquares()
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(sampling, 7)
    method.SetInterpolator(sitk.sitkLinear)
    region = sitk.BinaryDilate(
        sitk.GetImageFromArray(template.lung.astype(np.uint8)), [_REGISTRATION_RIM] * template.lung.ndim
    )
    method.SetMetricFixedMask(region)
    method.SetShrinkFactorsPerLevel(shrinks)
    method.SetSmoothingSigmasPerLevel([max(0, shrink - 1) for shrink in shrinks])
    return method


def _register(template: _Template, moving: np.ndarray, mode: str) -> sitk.Transform:
    """Transform from template to subject grid index space: affine, then an optional coarse B-spline."""
    fixed, image = _canonical(template.image), _canonical(moving)
    ndim = fixed.GetDimension()
    affine = sitk.AffineTransform(ndim)
    affine.SetCenter([(n - 1) / 2 for n in fixed.GetSize()])
    method = _registration(template, [2, 1], 0.25)
    method.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, 40, 0.5, 1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetInitialTransform(affine, inPlace=True)
    try:
        method.Execute(fixed, image)
        if mode == "affine":
            return affine
        bspline = sitk.BSplineTransformInitializer(fixed, [_BSPLINE_MESH] * ndim)
        method = _registration(template, [2], 0.1)
        method.SetOptimizerAsLBFGSB(1e-5, 10, 5, 30)
        method.SetMovingInitialTransform(affine)
        method.SetInitialTransform(bspline, inPlace=True)
        method.Execute(fixed, image)
    except RuntimeError as err:
        raise InputError(
            f"registration to the template failed ({str(err).splitlines()[-1]}); use register='none' or check "
            "that the scan covers both lungs"
        ) from err
    return sitk.CompositeTransform([affine, bspline])


def _inverse(transform: sitk.Transform, shape: tuple[int, ...]) -> sitk.Transform:
    """Inverse of a registration transform; the B-spline part is inverted through a displacement field."""
    if not isinstance(transform, sitk.CompositeTransform):
        return transform.GetInverse()
    affine = transform.GetNthTransform(0).Downcast()
    ndim = len(shape)
    field = sitk.TransformToDisplacementField(
        transform.GetNthTransform(1),
        sitk.sitkVectorFloat64,
        list(reversed(shape)),
        [0.0] * ndim,
        [1.0] * ndim,
        np.eye(ndim).ravel().tolist(),
    )
    inverse = sitk.InvertDisplacementField(field, 20, 0.05, 0.001, False)
    return sitk.CompositeTransform([sitk.DisplacementFieldTransform(inverse), affine.GetInverse()])
