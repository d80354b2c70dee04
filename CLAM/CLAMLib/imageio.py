"""Reading, checking and atomically writing medical images and other output files."""

from __future__ import annotations

import gzip
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

MIN_AXIS = 16
"""Smallest number of voxels along an axis that the network's field accepts."""
SPACING_MM = (0.2, 10.0)
"""Voxel spacing (mm) along each axis that a chest CT may have; a scan outside it is refused."""
LUNG_VOLUME_L = (0.5, 12.0)
"""Lung volume (litres) that a chest CT's lung mask may measure; a scan outside it is refused."""

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
    if source.is_file():
        _check_stream(source)
    failure = None
    with _library_messages() as said:
        try:
            image = _read_series(source) if source.is_dir() else _read_file(source)
        except InputError as err:
            failure = err
    if failure is not None:
        raise InputError(f"{failure} (the reader said: {'; '.join(said)})" if said else str(failure)) from None
    if said:
        warnings.warn(f"reading {source}: {'; '.join(said)}", stacklevel=2)
    return _to_grey(image, source)


@contextmanager
def _library_messages() -> Iterator[list[str]]:
    """Collect what ITK, GDCM and MetaIO print on stderr inside the block (filled in when the block ends)."""
    said: list[str] = []
    display = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield said
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sitk.ProcessObject.SetGlobalWarningDisplay(display)
            sink.seek(0)
            said.extend(_library_lines(sink.read().decode("utf-8", "replace")))


def _library_lines(text: str) -> list[str]:
    """The telling lines of a library's stderr output (no blank lines, no source file locations)."""
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith(("WARNING: In ", "ERROR: In ", "Description:"))
            ][:3] or ([] if not text.strip() else [" ".join(text.split())[:200]])


def _check_stream(path: Path) -> None:
    """Refuse a gzip file that ends early or fails its checksum, and NIfTI voxels that are NaN or infinite.

    ITK reads a truncated .nii.gz with the missing slices as 0, and NaN or infinite NIfTI voxels as 0, so both are
    checked on the file's own bytes, in one pass.
    """
    name = path.name.lower()
    compressed, nifti = name.endswith(".gz"), name.endswith((".nii", ".nii.gz"))
    if not (compressed or nifti):
        return
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            dtype, offset = _nifti_float(f.read(544)) if nifti else (None, 0)
            if dtype is not None:
                f.seek(offset)
            tail = b""
            for chunk in iter(lambda: f.read(1 << 22), b""):
                if dtype is None:
                    continue
                data = tail + chunk
                usable = len(data) - len(data) % dtype.itemsize
                tail = data[usable:]
                if not np.isfinite(np.frombuffer(data[:usable], dtype)).all():
                    raise InputError(f"image {path} holds NaN or infinite voxels (read as 0 by the NIfTI reader); "
                                     f"replace them by finite Hounsfield units (e.g. -1000 HU, air) before using CLAM")
    except (EOFError, OSError, zlib.error) as err:
        raise InputError(f"cannot read image {path}: its compressed data ends early or is damaged ({err}); the file "
                         f"is truncated or corrupt: copy or export it again") from None


def _nifti_float(header: bytes) -> tuple[np.dtype | None, int]:
    """The voxel type of a NIfTI-1 or NIfTI-2 header when it is floating point, and where the voxels start."""
    for order in ("<", ">"):
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            code, offset = struct.unpack(order + "h", header[70:72])[0], struct.unpack(order + "f", header[108:112])[0]
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            code, offset = struct.unpack(order + "h", header[12:14])[0], struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None, 0
    kinds = {16: "f4", 64: "f8", 32: "f4", 1792: "f8"}  # float32, float64, complex64 and complex128 as pairs
    return (np.dtype(order + kinds[code]), int(offset)) if code in kinds and offset >= 348 else (None, 0)


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


def remove_partial(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders that atomic_path leaves under `folder` when a process is killed mid-write."""
    found = [p for p in Path(folder).rglob(".*.tmp") if p.is_dir()]
    for tmp in found:
        shutil.rmtree(tmp, ignore_errors=True)
    return found


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
        if len(axes) > 3:
            hint = f"give one {ndim}D volume: this image holds several (e.g. a time series); export a single one"
        elif ndim == 3:
            hint = "give a 3D volume (a DICOM series folder or a volume file, not a single slice)"
        else:
            hint = "give a single 2D slice, or use a 3D model"
        raise InputError(f"image is {len(axes)}D (size {_size_text(size)}) but the model is {ndim}D; {hint}")
    if min(axes) < MIN_AXIS:
        raise InputError(
            f"image is too small (size {_size_text(size)}): every axis needs at least {MIN_AXIS} voxels "
            "for the network's field; give the whole chest scan, not a small crop"
        )
    spacing = image.GetSpacing()[: len(axes)]
    if not all(SPACING_MM[0] <= s <= SPACING_MM[1] for s in spacing):
        raise InputError(
            f"voxel spacing {' x '.join(f'{s:.4g}' for s in spacing)} mm is outside {SPACING_MM[0]:g}-{SPACING_MM[1]:g} "
            "mm, which no chest CT has; fix the spacing in the file's header (it may be in cm or m, or missing)"
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
    if len(series) > 1:
        sizes = sorted((len(reader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in series), reverse=True)
        shown = ", ".join(map(str, sizes[:5])) + (", ..." if len(sizes) > 5 else "")
        raise InputError(
            f"folder {folder} holds {len(series)} DICOM series ({shown} files), not one scan; put the files of each "
            f"series in a folder of its own"
        )
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
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
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.startswith("Reason:")]
    prefix = re.compile(r"^(ITK ERROR|itk::ERROR|sitk::ERROR): (\w+\(0x[0-9a-fA-F]+\): )?")
    itk = [prefix.sub("", line) for line in lines if prefix.match(line)]
    if itk:
        detail = lines[-1] if lines[-1].startswith("[") else ""
        return f"{itk[-1].rstrip(':')}: {detail}" if detail else itk[-1]
    errors = [line for line in lines if "ERROR" in line or "Unable" in line or "error" in line]
    return (errors or lines or ["unknown error"])[-1]
