"""What every mapped scan carries besides its image: acquisition (spacing, DICOM header fields) and anatomy measures.

These are the columns `clam associate` always tests against the clusters, because clusters that follow the scanner,
the protocol or body size rather than the disease show up there first.
"""

from __future__ import annotations

import math
from datetime import date
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

DICOM_TAGS = {
    "manufacturer": "0008|0070",
    "scanner_model": "0008|1090",
    "kernel": "0018|1210",
    "kvp": "0018|0060",
    "contrast_agent": "0018|0010",
    "study_date": "0008|0020",
    "slice_thickness_mm": "0018|0050",
}
"""Per-scan record field -> DICOM tag (group|element, SimpleITK's spelling) read from the scan's header."""

_TISSUE_HU = -400.0  # voxels above this are body (or table), below it air
_SOFT_HU = (-100.0, 300.0)  # soft tissue and blood, fat excluded, bone cortex mostly excluded
_ENHANCED_HU = 100.0  # soft tissue above this is mostly blood or organ enhanced by a contrast agent


def header_fields(image: sitk.Image) -> dict[str, Any]:
    """Whether the image's metadata is a DICOM header ('dicom'), and the fields of DICOM_TAGS it holds."""
    keys = set(image.GetMetaDataKeys())
    fields: dict[str, Any] = {"dicom": any(key.startswith("0008|") for key in keys)}
    for name, tag in DICOM_TAGS.items():
        if tag not in keys:
            continue
        text = image.GetMetaData(tag).strip().strip("\x00").strip()
        if name in ("kvp", "slice_thickness_mm"):
            value = _number(text)
            if value is not None:
                fields[name] = value
        elif name == "study_date":
            if _date(text):
                fields[name] = _date(text)
        else:
            fields[name] = text
    return fields


def _number(text: str) -> float | None:
    """A DICOM decimal string as a float, or None."""
    try:
        value = float(text.split("\\")[0])
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _date(text: str) -> str | None:
    """A DICOM date (YYYYMMDD) as ISO text, or None."""
    digits = text[:8]
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:8])).isoformat()
    except ValueError:
        return None


def geometry_fields(image: sitk.Image) -> dict[str, Any]:
    """In-plane pixel spacing, slice spacing and number of slices (mm, count) of a 2D or 3D image."""
    spacing = image.GetSpacing()
    fields: dict[str, Any] = {"pixel_spacing_mm": round(float(np.mean(spacing[:2])), 4)}
    if image.GetDimension() == 3:
        fields["slice_spacing_mm"] = round(float(spacing[2]), 4)
        fields["slices"] = int(image.GetSize()[2])
    return fields


def anatomy_fields(image: sitk.Image, coarse_mask: sitk.Image, factors: list[int]) -> dict[str, Any]:
    """Mean lung HU, the mean axial body cross-section and the enhanced share of soft tissue (a sign of a contrast
    agent: the share of voxels of -100..300 HU that lie above 100 HU) over the slices holding lung, at the mask's
    resolution.

    `coarse_mask` is the lung mask at preprocessing's working resolution (non-zero inside) and `factors` the shrink
    factors that made it from `image`; the CT is shrunk (averaged) by the same factors.
    """
    small = sitk.BinShrink(image, factors) if max(factors) > 1 else image
    ct = sitk.GetArrayViewFromImage(small).astype(np.float32)
    lung = sitk.GetArrayViewFromImage(coarse_mask) > 127
    if ct.ndim == 2:
        ct, lung = ct[None], lung[None]
    fields: dict[str, Any] = {}
    if lung.any():
        fields["mean_lung_hu"] = round(float(ct[lung].mean()), 2)
    pixel_cm2 = float(np.prod(small.GetSpacing()[:2])) / 100.0
    areas = [_body_area(ct[z]) * pixel_cm2 for z in np.nonzero(lung.any(axis=(1, 2)))[0]]
    if areas:
        fields["body_area_cm2"] = round(float(np.mean(areas)), 1)
    chest = ct[lung.any(axis=(1, 2))]
    soft = (chest > _SOFT_HU[0]) & (chest < _SOFT_HU[1])
    if soft.any():
        fields["enhanced_share"] = round(float((chest[soft] > _ENHANCED_HU).mean()), 4)
    return fields


def _body_area(slice_hu: np.ndarray) -> int:
    """Pixels of a slice's body: its largest tissue part with the air inside it (lungs, airways) filled in."""
    labels, count = ndimage.label(slice_hu > _TISSUE_HU)
    if count == 0:
        return 0
    largest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    return int(np.count_nonzero(ndimage.binary_fill_holes(labels == largest)))


def scan_record(image: sitk.Image, coarse_mask: sitk.Image | None = None,
                factors: list[int] | None = None) -> dict[str, Any]:
    """Every acquisition and anatomy field of one scan that its image, header and lung mask give."""
    record = geometry_fields(image)
    record.update(header_fields(image))
    if coarse_mask is not None and factors is not None:
        record.update(anatomy_fields(image, coarse_mask, factors))
    return record
