"""Map overlays on a scan's own grid as 8-bit files: 0..1 in steps of 1/255, the scale in the header.

A 0..1 map needs no more than 256 levels (a colour map shows fewer), so the overlay is stored as uint8 with its
scale in the header: a quarter of float32's size before compression and about a tenth after it. NIfTI carries
the scale in its standard scl_slope field, which SimpleITK (ITK), nibabel and 3D Slicer apply on reading, so they
read the 0..1 values back as float32. NRRD has no standard scale field: the key `clam_map_scale` holds it
(read_map applies it), and readers that do not know the key (3D Slicer among them) show the map times 255.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .imageio import atomic_path, write_image
from .preprocess import Prepared, Preprocessor, box_slices

LEVELS = 255
SCALE = 1.0 / LEVELS
SCALE_KEY = "clam_map_scale"
_NIFTI_SLOPE_OFFSET = 112  # scl_slope and scl_inter, two float32 in a NIfTI-1 header
_GZIP_LEVEL = 1  # mostly zeros outside the lungs: level 1 is nearly as small as the default and several times faster


def quantise(values: np.ndarray) -> np.ndarray:
    """0..1 values as uint8 0..255, rounded to the nearest level (values outside 0..1 clip)."""
    return _quantised(torch.tensor(values, dtype=torch.float32))


def _quantised(values: torch.Tensor) -> np.ndarray:
    """quantise of a float32 tensor, computed in its place."""
    return values.clamp_(0.0, 1.0).mul_(LEVELS).add_(0.5).to(torch.uint8).numpy()


def native_map(preprocessor: Preprocessor, grid_map: np.ndarray, prepared: Prepared) -> sitk.Image:
    """A 0..1 map on the model grid as a uint8 overlay (0..255, its scale under SCALE_KEY) on exactly the input's
    geometry, resampled over the crop box alone (the map is zero outside it)."""
    values, index = preprocessor.native_box(grid_map, prepared)
    native = prepared.native
    full = np.zeros(tuple(reversed(native.size)), np.uint8)
    box = full.reshape(full.shape[-values.ndim:]) if full.ndim > values.ndim else full  # 2D map, one-slice scan
    box[box_slices(index, values.shape)] = _quantised(torch.from_numpy(values))
    image = sitk.GetImageFromArray(full)
    image.SetSpacing(native.spacing)
    image.SetOrigin(native.origin)
    image.SetDirection(native.direction)
    image.SetMetaData(SCALE_KEY, repr(SCALE))
    return image


def write_map(image: sitk.Image, path: str | os.PathLike) -> Path:
    """Write a uint8 overlay from native_map as NRRD (.nrrd: scale under the key clam_map_scale) or NIfTI (.nii,
    .nii.gz: scale in scl_slope), so that the target is either the old or the complete new file."""
    target = Path(path)
    name = target.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        _write_nifti(image, target)
    else:
        if not (image.HasMetaDataKey(SCALE_KEY) and image.GetMetaData(SCALE_KEY) == repr(SCALE)):
            image = sitk.Image(image)
            image.SetMetaData(SCALE_KEY, repr(SCALE))
        write_image(image, target)
    return target


def read_map(path: str | os.PathLike) -> sitk.Image:
    """An overlay written by write_map as a float32 0..1 map (NIfTI's scl_slope is applied by ITK itself)."""
    image = sitk.ReadImage(str(path))
    if image.HasMetaDataKey(SCALE_KEY):
        scale = float(image.GetMetaData(SCALE_KEY))
        image = sitk.Cast(image, sitk.sitkFloat32) * scale
    return sitk.Cast(image, sitk.sitkFloat32)


def _write_nifti(image: sitk.Image, target: Path) -> None:
    """NIfTI through SimpleITK (which writes scl_slope 1), the scale then put into the header, then gzip."""
    with atomic_path(target) as tmp:
        plain = tmp.parent / "uncompressed.nii"  # beside tmp in atomic_path's own folder; gone before it ends
        sitk.WriteImage(image, str(plain), useCompression=False)
        with open(plain, "r+b") as f:
            order = "<" if struct.unpack("<i", f.read(4))[0] == 348 else ">"
            f.seek(_NIFTI_SLOPE_OFFSET)
            f.write(struct.pack(order + "ff", SCALE, 0.0))
        if tmp.name.lower().endswith(".gz"):
            with open(plain, "rb") as src, gzip.GzipFile(tmp, "wb", compresslevel=_GZIP_LEVEL, mtime=0) as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
            plain.unlink()
        else:
            os.replace(plain, tmp)
