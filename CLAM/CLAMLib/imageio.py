"""Reading, checking and atomically writing medical images and other output files."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

MIN_AXIS = 16
"""Smallest number of voxels along an axis that the network's field accepts."""

_FORMATS = "NIfTI (.nii, .nii.gz), NRRD (.nrrd), MetaImage (.mha, .mhd), PNG or DICOM"
_POSITION_TAG = "0020|0032"
_SPACING_TOLERANCE = 0.1  # relative deviation of a slice gap from the median that counts as a gap


class CTRangeWarning(UserWarning):
    """An image whose intensities do not look like CT in Hounsfield units."""


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read a grey image file, a single DICOM file or a folder holding a DICOM series."""
    source = Path(path)
    if not source.exists():
        raise InputError(f"image not found: {source}; check the path (a file, or a folder of DICOM files)")
    image = _read_series(source) if source.is_dir() else _read_file(source)
    return _to_grey(image, source)


def write_image(image: sitk.Image, path: str | os.PathLike) -> None:
    """Write an image, compressed, so that the target is either the old or the complete new file."""
    target = Path(path)
    with atomic_path(target) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=True)
        except RuntimeError as err:
            raise InputError(
                f"cannot write image {target}: {_first_line(err)}; use a writable folder and one of {_FORMATS}"
            ) from err


def _file_mode(target: Path) -> int:
    """Permissions for a file written in place of target: target's own, or the usual ones for a new file."""
    if target.exists():
        return target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path that replaces `path` when the block succeeds and vanishes when it fails."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        tmp = folder / target.name
        yield tmp
        for companion in folder.iterdir():  # e.g. the .raw file beside a .mhd header
            if companion != tmp:
                os.replace(companion, target.parent / companion.name)
        os.chmod(tmp, _file_mode(target))
        os.replace(tmp, target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check_image(image: sitk.Image, ndim: int) -> None:
    """Raise InputError for an image a `ndim`-D model cannot use; warn if it does not look like CT in HU."""
    if ndim not in (2, 3):
        raise InputError(f"model dimension must be 2 or 3, got {ndim}; use a 2D or a 3D model")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"image has {image.GetNumberOfComponentsPerPixel()} components per voxel; give a grey-scale CT"
        )
    size = image.GetSize()
    if image.GetNumberOfPixels() == 0:
        raise InputError(f"image is empty (size {_size_text(size)}); give an image with voxels")
    axes = size[:2] if image.GetDimension() == 3 and size[2] == 1 else size
    if len(axes) != ndim:
        hint = (
            "give a 3D volume (a DICOM series folder or a volume file, not a single slice)"
            if ndim == 3
            else "give a single 2D slice, or use a 3D model"
        )
        raise InputError(f"image is {len(axes)}D (size {_size_text(size)}) but the model is {ndim}D; {hint}")
    if min(axes) < MIN_AXIS:
        raise InputError(
            f"image is too small (size {_size_text(size)}): every axis needs at least {MIN_AXIS} voxels "
            "for the network's field; give the whole chest scan, not a small crop"
        )
    values = sitk.GetArrayViewFromImage(image)
    low, high = float(values.min()), float(values.max())
    if math.isnan(low) or math.isnan(high):
        raise InputError("image holds NaN voxels; replace them (e.g. by -1000 HU, air) before using CLAM")
    if math.isinf(low) or math.isinf(high):
        raise InputError(
            "image holds infinite voxels; replace them by finite Hounsfield units before using CLAM"
        )
    if low == high:
        raise InputError(f"image is constant ({low:g} everywhere); give a real CT scan")
    if low > -500 or high < 0 or high - low < 300:
        warnings.warn(
            f"intensities range from {low:g} to {high:g}, which does not look like CT: CLAM expects Hounsfield "
            "units (air about -1000, soft tissue 0 to 100); apply the rescale slope/intercept if missing",
            CTRangeWarning,
            stacklevel=2,
        )


def _read_file(path: Path) -> sitk.Image:
    """Read one image file."""
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise InputError(
            f"cannot read image {path}: {_first_line(err)}; check that it is a complete {_FORMATS} file"
        ) from err


def _read_series(folder: Path) -> sitk.Image:
    """Read the largest DICOM series of a folder, refusing series with missing slices."""
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(
            f"no DICOM series found in folder {folder}; point to a folder holding the DICOM files of one scan, "
            f"or to an image file ({_FORMATS})"
        )
    files = {uid: reader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series}
    chosen = max(series, key=lambda uid: len(files[uid]))
    if len(series) > 1:
        warnings.warn(
            f"folder {folder} holds {len(series)} DICOM series; reading the largest ({len(files[chosen])} files, "
            f"series {chosen}); put one series per folder to choose another",
            stacklevel=3,
        )
    reader.SetFileNames(files[chosen])
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise InputError(
            f"cannot read the DICOM series in {folder}: {_first_line(err)}; check that its files are complete"
        ) from err
    _check_slice_gaps(reader, image, folder)
    for key in reader.GetMetaDataKeys(0):  # the series carries its first file's header, as a single file does
        image.SetMetaData(key, reader.GetMetaData(0, key))
    return image


def _check_slice_gaps(reader: sitk.ImageSeriesReader, image: sitk.Image, folder: Path) -> None:
    """Raise InputError when the slices of a series are not evenly spaced."""
    count = len(reader.GetFileNames())
    if image.GetDimension() != 3 or count < 3:
        return
    normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
    heights = []
    for i in range(count):
        if not reader.HasMetaDataKey(i, _POSITION_TAG):
            return
        position = [float(v) for v in reader.GetMetaData(i, _POSITION_TAG).split("\\")]
        heights.append(float(np.dot(position, normal)))
    gaps = np.diff(np.sort(heights))
    median = float(np.median(gaps))
    if median <= 0 or float(np.max(np.abs(gaps - median))) > _SPACING_TOLERANCE * median:
        raise InputError(
            f"DICOM series in {folder} has missing or unevenly spaced slices (gaps from {gaps.min():.3g} to "
            f"{gaps.max():.3g} mm); export the complete series again"
        )


def _to_grey(image: sitk.Image, path: Path) -> sitk.Image:
    """Turn an RGB(A) or grey+alpha image into a grey float image with the same geometry."""
    components = image.GetNumberOfComponentsPerPixel()
    if components == 1:
        return image
    if components == 2:
        return sitk.VectorIndexSelectionCast(image, 0)
    if components not in (3, 4):
        raise InputError(
            f"image {path} has {components} components per voxel; give a grey-scale or RGB image"
        )
    weights = (0.299, 0.587, 0.114)
    channels = [sitk.VectorIndexSelectionCast(image, i, sitk.sitkFloat32) * w for i, w in enumerate(weights)]
    return channels[0] + channels[1] + channels[2]


def _size_text(size: tuple[int, ...]) -> str:
    """Format an image size as AxBxC."""
    return "x".join(str(n) for n in size)


def _first_line(err: Exception) -> str:
    """The most telling line of a SimpleITK error message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    errors = [line for line in lines if "ERROR" in line or "Unable" in line or "error" in line]
    return (errors or lines or ["unknown error"])[-1]
