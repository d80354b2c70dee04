"""Tests of image reading, checking and atomic writing."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from CLAMLib.errors import InputError
from CLAMLib.imageio import CTRangeWarning, atomic_path, check_image, read_image, write_image

OBLIQUE = (0.9, -0.3, 0.3162, 0.3, 0.95, 0.0837, -0.3156, 0.0, 0.9489)


def ct(shape=(20, 24, 28), low=-1000.0, high=300.0, dtype=np.int16, seed=0) -> sitk.Image:
    """Random CT-like volume (z, y, x) with an oblique, anisotropic geometry."""
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray(rng.uniform(low, high, shape).astype(dtype))
    if image.GetDimension() == 3:
        image.SetSpacing((0.7, 0.8, 2.5))
        image.SetOrigin((-10.0, 20.5, 300.0))
        image.SetDirection(_orthonormal(OBLIQUE))
    return image


def _orthonormal(direction):
    """Nearest rotation to a rough 3x3 direction."""
    u, _, vt = np.linalg.svd(np.array(direction).reshape(3, 3))
    return tuple((u @ vt).ravel())


def same_image(a: sitk.Image, b: sitk.Image) -> None:
    """Assert equal voxels and geometry."""
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary files or folders left in a folder."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("name", ["a.nii.gz", "a.nii", "a.nrrd", "a.mha", "sub/dir/a.mhd"])
def test_round_trip_keeps_voxels_and_geometry(tmp_path, name):
    image = ct()
    write_image(image, tmp_path / name)
    same_image(read_image(tmp_path / name), image)
    assert leftovers((tmp_path / name).parent) == []


def test_rgb_png_becomes_grey(tmp_path):
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 100, 200, 50
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "rgb.png"))
    grey = read_image(tmp_path / "rgb.png")
    assert grey.GetNumberOfComponentsPerPixel() == 1 and grey.GetSize() == (30, 20)
    np.testing.assert_allclose(
        sitk.GetArrayViewFromImage(grey), 0.299 * 100 + 0.587 * 200 + 0.114 * 50, atol=1e-3
    )


def write_series(folder: Path, image: sitk.Image, uid: str, skip: int | None = None) -> None:
    """Write a 3D int16 image as a DICOM CT series, optionally leaving one slice out."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    orientation = "\\".join(
        str(v) for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7])
    )
    for z in range(image.GetDepth()):
        if z == skip:
            continue
        piece = image[:, :, z]
        position = image.TransformIndexToPhysicalPoint((0, 0, z))
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": uid,
            "0020|0013": str(z + 1),
            "0020|0032": "\\".join(str(v) for v in position),
            "0020|0037": orientation,
            "0018|0050": str(image.GetSpacing()[2]),
            "0008|0018": f"{uid}.{z + 1}",
        }
        for key, value in tags.items():
            piece.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(piece)


def test_dicom_series_folder(tmp_path):
    image = ct(shape=(6, 20, 24))
    write_series(tmp_path / "series", image, "1.2.3.4.1")
    same_image(read_image(tmp_path / "series"), image)
    single = read_image(tmp_path / "series" / "slice002.dcm")
    assert single.GetSize()[:2] == (24, 20)


def test_dicom_folder_of_two_series_is_refused(tmp_path):
    big, small = ct(shape=(6, 20, 24)), ct(shape=(3, 20, 24), seed=1)
    write_series(tmp_path / "mixed", big, "1.2.3.4.1")
    write_series(tmp_path / "mixed" / "..", small, "1.2.3.4.2")  # same folder, other file names below
    for path in tmp_path.glob("slice*.dcm"):
        os.replace(path, tmp_path / "mixed" / f"b{path.name}")
    with pytest.raises(InputError, match=r"holds 2 DICOM series \(6, 3 files\), not one scan; put the files of each"):
        read_image(tmp_path / "mixed")


def test_dicom_missing_slice_is_refused(tmp_path):
    write_series(tmp_path / "gap", ct(shape=(6, 20, 24)), "1.2.3.4.1", skip=3)
    with pytest.raises(InputError, match="missing or unevenly spaced"):
        read_image(tmp_path / "gap")


def test_read_errors_name_the_path(tmp_path):
    with pytest.raises(InputError, match="not found.*nowhere.nii.gz"):
        read_image(tmp_path / "nowhere.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no DICOM series found in folder"):
        read_image(tmp_path / "empty")
    (tmp_path / "bad.nii.gz").write_bytes(b"not an image at all" * 10)
    with pytest.raises(InputError, match="cannot read image .*bad.nii.gz"):
        read_image(tmp_path / "bad.nii.gz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="cannot read image"):
        read_image(tmp_path / "notes.txt")
    write_image(ct(), tmp_path / "cut.nrrd")
    data = (tmp_path / "cut.nrrd").read_bytes()
    (tmp_path / "cut.nrrd").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.nrrd"):
        read_image(tmp_path / "cut.nrrd")


def test_failed_write_keeps_old_file_and_no_temp(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    with pytest.raises(InputError, match="cannot write image"):
        write_image(ct(dtype=np.float32), target)  # PNG cannot hold a float 3D volume
    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_atomic_path_replaces_on_success_only(tmp_path):
    target = tmp_path / "deep" / "table.csv"
    with atomic_path(target) as tmp:
        assert tmp.parent.parent == target.parent
        tmp.write_text("new")
        assert not target.exists()
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "new"
    assert leftovers(target.parent) == []


def test_check_accepts_ct_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_image(ct(), 3)
        check_image(ct(shape=(1, 20, 20)), 2)
        check_image(ct(shape=(20, 20)), 2)


@pytest.mark.parametrize(
    ("image", "ndim", "message"),
    [
        (ct(shape=(20, 20)), 3, "2D .* model is 3D"),
        (ct(shape=(1, 20, 20)), 3, "2D .* model is 3D"),
        (ct(), 2, "3D .* model is 2D"),
        (ct(shape=(20, 10, 20)), 3, "too small"),
        (ct(shape=(20, 20, 15)), 3, "too small"),
        (ct(shape=(12, 20)), 2, "too small"),
        (sitk.Image([0, 20, 20], sitk.sitkInt16), 3, "empty"),
        (sitk.Image([20, 20, 20], sitk.sitkInt16), 3, "constant"),
        (sitk.Image([20, 20, 20], sitk.sitkVectorFloat32, 3), 3, "components"),
        (ct(), 4, "must be 2 or 3"),
    ],
)
def test_check_refuses(image, ndim, message):
    with pytest.raises(InputError, match=message):
        check_image(image, ndim)


@pytest.mark.parametrize(("value", "message"), [(np.nan, "NaN"), (np.inf, "infinite"), (-np.inf, "infinite")])
def test_check_refuses_non_finite(value, message):
    values = sitk.GetArrayFromImage(ct(dtype=np.float32))
    values[3, 4, 5] = value
    with pytest.raises(InputError, match=message):
        check_image(sitk.GetImageFromArray(values), 3)


@pytest.mark.parametrize(("low", "high"), [(0.0, 4000.0), (-2000.0, -100.0), (-100.0, 100.0)])
def test_check_warns_outside_hounsfield_range(low, high):
    with pytest.warns(CTRangeWarning, match="Hounsfield"):
        check_image(ct(low=low, high=high, dtype=np.float32), 3)
