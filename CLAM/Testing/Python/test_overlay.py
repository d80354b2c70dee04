"""Overlays: uint8 maps with their scale in the header, read back right by SimpleITK, nibabel and Slicer's reader;
maps resampled to the input over the crop box alone, equal to resampling the whole volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from CLAMLib import preprocess as pp
from CLAMLib.overlay import SCALE, SCALE_KEY, native_map, quantise, read_map, write_map
from CLAMLib.simulate import make_phantom

STEP = 0.5 / 255 + 1e-6  # the largest rounding error of one 1/255 level


@pytest.fixture(scope="module")
def oblique() -> tuple[pp.Preprocessor, pp.Prepared, np.ndarray]:
    """An oblique, anisotropic phantom prepared on a 32 grid, and a random map on that grid."""
    ct, _ = make_phantom(seed=0)
    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    ct.SetDirection(rotation.ravel().tolist())
    ct.SetOrigin((-120.0, 35.5, 12.25))
    processor = pp.Preprocessor(pp.PreprocessConfig(grid=32)).fit([ct])
    grid_map = np.random.default_rng(0).random((32, 32, 32)).astype(np.float32)
    return processor, processor.transform(ct), grid_map


def whole_volume(processor: pp.Preprocessor, grid_map: np.ndarray, prepared: pp.Prepared) -> np.ndarray:
    """The map resampled onto every voxel of the input, as to_native did before it resampled the crop box only."""
    image = pp._image(grid_map, prepared.grid)
    return sitk.GetArrayFromImage(pp._resample(image, prepared.native, sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def test_crop_box_resampling_equals_whole_volume(oblique) -> None:
    processor, prepared, grid_map = oblique
    native = processor.to_native(grid_map, prepared)
    reference = whole_volume(processor, grid_map, prepared)
    values = sitk.GetArrayFromImage(native)
    assert pp.Geometry.from_image(native) == prepared.native
    assert np.abs(values - reference).max() < 1e-5  # float32 rounding: the maps are kept in steps of 1/255
    box, _ = processor.native_box(grid_map, prepared)
    assert 0 < box.size < values.size  # the crop box is part of the volume, and all the map is in it
    assert np.count_nonzero(values) == np.count_nonzero(reference)


def test_quantise_rounds_to_the_nearest_level() -> None:
    values = np.array([-0.2, 0.0, 0.4 / 255, 0.6 / 255, 0.5, 1.0, 1.3], np.float32)
    np.testing.assert_array_equal(quantise(values), [0, 0, 0, 1, 128, 255, 255])
    assert quantise(values).dtype == np.uint8


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".nii"])
def test_written_map_reads_back_within_one_level(oblique, tmp_path: Path, suffix: str) -> None:
    processor, prepared, grid_map = oblique
    overlay = native_map(processor, grid_map, prepared)
    assert overlay.GetPixelID() == sitk.sitkUInt8
    path = write_map(overlay, tmp_path / f"map{suffix}")
    back = read_map(path)
    reference = sitk.GetArrayFromImage(processor.to_native(grid_map, prepared))
    assert back.GetPixelID() == sitk.sitkFloat32
    assert np.abs(sitk.GetArrayFromImage(back) - reference).max() <= STEP
    assert pp.Geometry.from_image(back).matches(prepared.native, atol=1e-4)
    assert list(tmp_path.iterdir()) == [path]  # nothing left beside it


def test_nrrd_header_holds_the_scale(oblique, tmp_path: Path) -> None:
    processor, prepared, grid_map = oblique
    overlay = native_map(processor, grid_map, prepared)
    raw = sitk.ReadImage(str(write_map(overlay, tmp_path / "map.nrrd")))
    assert raw.GetPixelID() == sitk.sitkUInt8 and float(raw.GetMetaData(SCALE_KEY)) == SCALE
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(raw), sitk.GetArrayViewFromImage(overlay))
    assert sitk.GetArrayViewFromImage(raw).max() > 200


def test_nifti_scale_is_applied_by_simpleitk_and_nibabel(oblique, tmp_path: Path) -> None:
    nibabel = pytest.importorskip("nibabel")
    processor, prepared, grid_map = oblique
    overlay = native_map(processor, grid_map, prepared)
    expected = sitk.GetArrayFromImage(overlay) * SCALE
    path = write_map(overlay, tmp_path / "map.nii.gz")
    itk = sitk.ReadImage(str(path))  # ITK applies scl_slope and gives float32
    assert itk.GetPixelID() == sitk.sitkFloat32
    loaded = nibabel.load(str(path))
    assert loaded.get_data_dtype() == np.uint8 and loaded.dataobj.slope == pytest.approx(SCALE)
    values = np.asarray(loaded.get_fdata()).transpose(2, 1, 0)  # nibabel's x-y-z to z-y-x
    assert np.abs(values - expected).max() < 1e-6
    assert np.abs(sitk.GetArrayViewFromImage(itk) - expected).max() < 1e-6
    assert values.max() > 200 * SCALE


def test_slicer_reads_the_nifti_as_0_to_1_and_the_nrrd_as_0_to_255(oblique, tmp_path: Path) -> None:
    """Slicer's own volume reader (vtkMRMLVolumeArchetypeStorageNode, from the slicer-core wheel)."""
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("needs Slicer's MRML from the slicer-core wheel")
    import slicer.util

    processor, prepared, grid_map = oblique
    overlay = native_map(processor, grid_map, prepared)
    expected = sitk.GetArrayFromImage(overlay)
    scene = slicer.vtkMRMLScene()
    read = {}
    for name in ("map.nii.gz", "map.nrrd"):
        path = write_map(overlay, tmp_path / name)
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        scene.AddNode(storage)
        storage.SetFileName(str(path))
        assert storage.ReadData(node)
        read[name] = slicer.util.arrayFromVolume(node)
    assert read["map.nii.gz"].dtype == np.float32
    assert np.abs(read["map.nii.gz"] - expected * SCALE).max() < 1e-6
    assert read["map.nrrd"].dtype == np.uint8
    np.testing.assert_array_equal(read["map.nrrd"], expected)


def test_two_d_model_overlay_on_a_single_slice_image(tmp_path: Path) -> None:
    ct, _ = make_phantom(seed=1, size=(128, 128, 16), spacing=(2.7, 2.7, 20.0))
    slice_ = ct[:, :, 8:9]
    processor = pp.Preprocessor(pp.PreprocessConfig(grid=32, ndim=2)).fit([slice_])
    prepared = processor.transform(slice_)
    grid_map = np.random.default_rng(1).random((32, 32)).astype(np.float32)
    overlay = native_map(processor, grid_map, prepared)
    assert overlay.GetSize() == slice_.GetSize()
    reference = sitk.GetArrayFromImage(processor.to_native(grid_map, prepared))
    back = sitk.GetArrayFromImage(read_map(write_map(overlay, tmp_path / "map.nrrd")))
    assert np.abs(back - reference).max() <= STEP and reference.max() > 0.5


def test_lung_mask_on_a_box_equals_resampling_it() -> None:
    """The coarse lung mask zoomed onto a box of the CT equals SimpleITK's linear resampling of it there, also
    where the CT's size is not a whole number of coarse voxels and the box reaches the CT's end."""
    ct, _ = make_phantom(seed=2, size=(275, 263, 45), spacing=(1.3, 1.3, 6.0))
    lungs = pp.find_lungs(ct)
    assert max(lungs.factors) > 1 and any(n % f for n, f in zip(ct.GetSize(), lungs.factors))
    for index, size in (([0, 0, 0], list(ct.GetSize())), ([7, 20, 3], [268, 243, 42]), ([51, 9, 11], [80, 61, 20])):
        box = sitk.RegionOfInterest(ct, size, index)
        resampled = pp._resample(lungs.coarse, pp.Geometry.from_image(box), sitk.sitkLinear, 0, sitk.sitkUInt8)
        np.testing.assert_array_equal(pp._lung_on_box(lungs, index, size), sitk.GetArrayFromImage(resampled) > 127)
