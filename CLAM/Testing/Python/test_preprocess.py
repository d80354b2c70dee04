"""Tests of lung masking, the model grid, registration and the way back to the native image."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk
from CLAMLib.errors import BundleError, InputError
from CLAMLib.imageio import read_image
from CLAMLib.preprocess import (
    LUNG_CLOSING_MM,
    Geometry,
    NotFittedError,
    PreprocessConfig,
    Preprocessor,
    find_lungs,
    lung_mask,
)

LESION = (22, 28, 20)  # x, y, z index of the lesion in the left lung of chest()


def rotation(axis: tuple[float, float, float], degrees: float) -> tuple[float, ...]:
    """Row-major 3x3 rotation about an axis."""
    transform = sitk.VersorTransform(axis, np.radians(degrees))
    return tuple(transform.GetMatrix())


OBLIQUE = rotation((1.0, 1.0, 0.5), 25.0)


def chest(
    size=(64, 56, 40),
    spacing=(3.0, 3.5, 5.0),
    direction=OBLIQUE,
    origin=(-90.0, 40.0, 300.0),
    scale=1.0,
    shift=(0.0, 0.0, 0.0),
    lesion: tuple[int, int, int] | None = None,
    seed=0,
) -> sitk.Image:
    """Synthetic int16 chest CT: air outside, body ellipse (40 HU), two lung ellipsoids (-850 HU), a lesion."""
    nx, ny, nz = size
    sx, sy, sz = spacing
    axes = [np.arange(n) * s - (n - 1) * s / 2 for n, s in ((nz, sz), (ny, sy), (nx, sx))]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    ex, ey, ez = nx * sx, ny * sy, nz * sz
    values = np.full(z.shape, -1000.0)
    values[(x / (0.42 * ex)) ** 2 + (y / (0.36 * ey)) ** 2 <= 1] = 40.0
    for side in (-1, 1):
        dx = (x - side * 0.2 * ex * scale - shift[0]) / (0.13 * ex * scale)
        dy = (y - shift[1]) / (0.25 * ey * scale)
        dz = (z - shift[2]) / (0.4 * ez * scale)
        values[dx**2 + dy**2 + dz**2 <= 1] = -850.0
    if lesion is not None:
        distance = np.sqrt(sum((c - c[lesion[::-1]]) ** 2 for c in (x, y, z)))
        values[distance <= 8.0] = 60.0
    values += np.random.default_rng(seed).normal(0, 15, values.shape)
    image = sitk.GetImageFromArray(values.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def lesion_mask(image: sitk.Image) -> sitk.Image:
    """The lesion of chest(lesion=LESION) as a binary mask on the image's geometry."""
    values = (sitk.GetArrayFromImage(image) > 0) & _near_lesion(image)
    mask = sitk.GetImageFromArray(values.astype(np.uint8))
    mask.CopyInformation(image)
    return mask


def _near_lesion(image: sitk.Image) -> np.ndarray:
    """Voxels within 12 mm of the lesion centre."""
    nz, ny, nx = image.GetSize()[::-1]
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    sx, sy, sz = image.GetSpacing()
    lx, ly, lz = LESION
    return ((x - lx) * sx) ** 2 + ((y - ly) * sy) ** 2 + ((z - lz) * sz) ** 2 <= 144


def fingerprint(image: sitk.Image) -> str:
    """Hash of an image's voxels and geometry."""
    digest = hashlib.sha256(sitk.GetArrayViewFromImage(image).tobytes())
    digest.update(repr(Geometry.from_image(image)).encode())
    return digest.hexdigest()


def same_geometry(image: sitk.Image, reference: sitk.Image) -> None:
    """Assert exactly the same size, spacing, origin and direction."""
    assert image.GetSize() == reference.GetSize()
    assert image.GetSpacing() == reference.GetSpacing()
    assert image.GetOrigin() == reference.GetOrigin()
    assert image.GetDirection() == reference.GetDirection()
    assert image.GetPixelID() == sitk.sitkFloat32


def blob(shape: tuple[int, ...], centre_zyx, sigma=0.8) -> np.ndarray:
    """Gaussian blob on a grid."""
    grids = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return np.exp(-sum((g - c) ** 2 for g, c in zip(grids, centre_zyx)) / (2 * sigma**2)).astype(np.float32)


def peak_point(image: sitk.Image) -> np.ndarray:
    """Physical point of an image's largest voxel."""
    zyx = np.unravel_index(np.argmax(sitk.GetArrayViewFromImage(image)), image.GetSize()[::-1])
    return np.array(image.TransformIndexToPhysicalPoint([int(i) for i in zyx[::-1]]))


def lesion_point(image: sitk.Image) -> np.ndarray:
    """Physical centre of the lesion."""
    return np.array(image.TransformContinuousIndexToPhysicalPoint([float(i) for i in LESION]))


@pytest.fixture(scope="module")
def cohort() -> list[sitk.Image]:
    """Three chests of different lung sizes and positions, plus one with a lesion."""
    others = [chest(scale=s, shift=(4 * s - 4, 3 - 3 * s, 0), seed=i) for i, s in enumerate((0.88, 1.0, 1.1))]
    return [*others, chest(lesion=LESION, seed=5)]


@pytest.fixture(scope="module")
def affine(cohort) -> tuple[Preprocessor, list]:
    """A preprocessor with affine registration fitted on the cohort, and its prepared images."""
    processor = Preprocessor(PreprocessConfig(grid=32, register="affine"))
    return processor, processor.fit_transform(cohort)


def test_lung_mask_synthetic_volume_and_geometry():
    image = chest()
    mask = lung_mask(image)
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert Geometry.from_image(mask) == Geometry.from_image(image)
    values = sitk.GetArrayViewFromImage(mask)
    ex, ey, ez = (n * s for n, s in zip(image.GetSize(), image.GetSpacing()))
    truth = 2 * 4 / 3 * np.pi * (0.13 * ex) * (0.25 * ey) * (0.4 * ez)
    assert values.sum() * np.prod(image.GetSpacing()) == pytest.approx(truth, rel=0.15)
    assert values[:, :, :32].sum() == pytest.approx(values[:, :, 32:].sum(), rel=0.2)


def true_lungs(image: sitk.Image) -> np.ndarray:
    """The lung voxels chest() drew (-850 HU, with its noise)."""
    return np.abs(sitk.GetArrayFromImage(image) + 850) < 80


def test_each_lung_is_closed_alone():
    """chest()'s lungs are 27 mm apart: one 20 mm closing of both would fill the mediastinum between them."""
    image = chest()
    gap = np.s_[:, :, 29:35]  # index columns between the two lungs
    assert not true_lungs(image)[gap].any()
    assert not sitk.GetArrayFromImage(lung_mask(image))[gap].any()


def test_a_lesion_touching_the_pleura_is_taken_in():
    image, plain = chest(lesion=(13, 28, 20)), chest()
    lesion = (sitk.GetArrayFromImage(image) > 0) & true_lungs(plain)  # the lesion's voxels inside the lung
    assert lesion.sum() > 30
    inside = {mm: sitk.GetArrayFromImage(lung_mask(image, mm))[lesion].mean() for mm in (6.0, 20.0)}
    assert inside[6.0] < 0.5 < 0.95 < inside[20.0]


def test_lung_mask_of_a_scan_cropped_through_the_lungs():
    """Lungs cut by the crop's anterior edge are air reaching the slice's edge, yet inside the body."""
    crop = chest()[:, 20:, :]
    lungs = true_lungs(crop)
    assert lungs[:, 0].any()  # the crop cuts the lungs
    mask = sitk.GetArrayFromImage(lung_mask(crop)).astype(bool)
    assert mask[lungs].mean() > 0.95 and lungs[mask].mean() > 0.95


def test_lung_mask_2d_and_no_lungs():
    flat = chest(size=(96, 88, 1), spacing=(2.0, 2.0, 5.0))[:, :, 0]
    assert 0 < sitk.GetArrayFromImage(lung_mask(flat)).sum() < 96 * 88 / 2
    values = sitk.GetArrayFromImage(chest())
    values[values < -500] = 40
    values[:, :, :3] = -1000
    body = sitk.GetImageFromArray(values)
    with pytest.raises(InputError, match="no lungs found"):
        lung_mask(body)


def test_lungs_found_once_prepare_the_same_as_found_again(cohort):
    processor = Preprocessor(PreprocessConfig(grid=32)).fit(cohort)
    image = cohort[3]
    lungs = find_lungs(image)
    assert sitk.GetArrayViewFromImage(lungs.full()).tobytes() == sitk.GetArrayViewFromImage(lung_mask(image)).tobytes()
    given, found = processor.transform(image, lungs), processor.transform(image)
    assert np.array_equal(given.array, found.array) and np.array_equal(given.lung, found.lung)
    assert (given.native, given.grid) == (found.native, found.grid)
    with pytest.raises(InputError, match="another geometry"):
        processor.transform(chest(origin=(-80.0, 40.0, 300.0)), lungs)
    with pytest.raises(InputError, match="closing_mm=6"):
        processor.transform(image, find_lungs(image, 6.0))


def test_config_is_checked():
    with pytest.raises(InputError, match="multiple of 8"):
        PreprocessConfig(grid=90)
    with pytest.raises(InputError, match="register must be one of"):
        PreprocessConfig(register="rigid")
    with pytest.raises(InputError, match="hu_max"):
        PreprocessConfig(hu_min=100, hu_max=0)
    with pytest.raises(InputError, match="closing_mm must be 0 or more"):
        PreprocessConfig(closing_mm=-1.0)


def test_unfitted_use_is_refused():
    with pytest.raises(NotFittedError, match="not fitted"):
        Preprocessor().transform(chest())
    with pytest.raises(InputError, match="at least one image"):
        Preprocessor().fit([])


def scalar(prepared) -> np.ndarray:
    """A prepared input as one array on the grid: the findings channels summed, or the CT input itself."""
    return prepared.array.sum(0) if prepared.array.ndim == prepared.lung.ndim + 1 else prepared.array


def test_blob_at_physical_point_lands_on_oblique_anisotropic_native():
    image = chest(lesion=LESION)
    before = fingerprint(image)
    processor = Preprocessor(PreprocessConfig(grid=32))
    prepared = processor.fit_transform([image])[0]
    assert prepared.array.shape == (3, 32, 32, 32) and prepared.array.dtype == np.float32
    assert prepared.lung.dtype == bool and 0.1 < prepared.lung.mean() < 0.9
    assert prepared.native == Geometry.from_image(image)
    assert prepared.grid.direction == Geometry.from_image(image).direction
    assert prepared.array.min() >= 0.0 and np.unique(scalar(prepared)[~prepared.lung]).size == 1
    reference = sitk.Image(list(prepared.grid.size), sitk.sitkUInt8)
    reference.SetSpacing(prepared.grid.spacing)
    reference.SetOrigin(prepared.grid.origin)
    reference.SetDirection(prepared.grid.direction)
    target = lesion_point(image)
    xyz = reference.TransformPhysicalPointToContinuousIndex(target.tolist())
    native = processor.to_native(blob(prepared.lung.shape, xyz[::-1]), prepared)
    same_geometry(native, image)
    assert np.linalg.norm(peak_point(native) - target) <= max(image.GetSpacing())
    found = np.unravel_index(np.argmax(np.where(prepared.lung, scalar(prepared), 0)), prepared.lung.shape)
    # the lesion sits where the grid geometry puts its physical centre
    assert np.linalg.norm(np.array(found) - np.array(xyz[::-1])) <= 1.5
    on_grid = processor.grid_mask(lesion_mask(image), prepared)
    centroid = np.argwhere(on_grid).mean(axis=0)
    assert np.linalg.norm(centroid - np.array(xyz[::-1])) <= 1.0
    assert fingerprint(image) == before


def test_affine_registration_round_trip(cohort, affine):
    processor, prepared = affine
    assert all(isinstance(p.transform, sitk.AffineTransform) for p in prepared)
    subject, image = prepared[-1], cohort[-1]
    found = np.unravel_index(np.argmax(np.where(subject.lung, scalar(subject), 0)), subject.lung.shape)
    native = processor.to_native(blob(subject.lung.shape, found), subject)
    same_geometry(native, image)
    grid_step = max(subject.grid.spacing)
    assert np.linalg.norm(peak_point(native) - lesion_point(image)) <= grid_step
    on_grid = processor.grid_mask(lesion_mask(image), subject)
    assert np.linalg.norm(np.argwhere(on_grid).mean(axis=0) - np.array(found)) <= 1.5


def test_registration_keeps_lungs_aligned(cohort, affine):
    _, registered = affine
    plain = Preprocessor(PreprocessConfig(grid=32)).fit_transform(cohort[:3])

    def overlap(items):
        pairs = [(a.lung, b.lung) for i, a in enumerate(items) for b in items[i + 1 :]]
        return np.mean([2 * (a & b).sum() / (a.sum() + b.sum()) for a, b in pairs])

    assert overlap(registered[:3]) >= overlap(plain) - 0.01


def test_state_round_trip(cohort, affine):
    processor, prepared = affine
    meta, arrays = processor.state()
    json.dumps(meta)
    restored = Preprocessor.from_state(json.loads(json.dumps(meta)), arrays)
    again = restored.transform(cohort[-1])
    np.testing.assert_allclose(again.array, prepared[-1].array, atol=1e-5)
    with pytest.raises(BundleError, match="version"):
        Preprocessor.from_state({**meta, "version": 99}, arrays)
    with pytest.raises(BundleError, match="template"):
        Preprocessor.from_state(meta, {})
    assert restored.config.closing_mm == processor.config.closing_mm == 20.0
    former = {**meta, "config": {k: v for k, v in meta["config"].items() if k != "closing_mm"}}
    assert Preprocessor.from_state(former, arrays).config.closing_mm == 6.0  # fitted before it was recorded


def test_bspline_round_trip(cohort):
    processor = Preprocessor(PreprocessConfig(grid=32, register="bspline"))
    processor.fit(cohort[:3])
    image = cohort[-1]
    before = fingerprint(image)
    subject = processor.transform(image)
    assert isinstance(subject.transform, sitk.CompositeTransform)
    found = np.unravel_index(np.argmax(np.where(subject.lung, scalar(subject), 0)), subject.lung.shape)
    native = processor.to_native(blob(subject.lung.shape, found), subject)
    same_geometry(native, image)
    assert np.linalg.norm(peak_point(native) - lesion_point(image)) <= 1.5 * max(subject.grid.spacing)
    assert fingerprint(image) == before


@pytest.mark.parametrize("single_slice", [False, True])
def test_2d_model(single_slice):
    volume = chest(size=(96, 88, 1), spacing=(2.0, 2.0, 5.0))
    image = volume if single_slice else volume[:, :, 0]
    processor = Preprocessor(PreprocessConfig(grid=32, ndim=2))
    prepared = processor.fit_transform([image])[0]
    assert prepared.array.shape == (3, 32, 32)
    native = processor.to_native(np.ones((32, 32), np.float32), prepared)
    same_geometry(native, image)
    assert 0 < sitk.GetArrayViewFromImage(native).mean() < 1
    with pytest.raises(InputError, match="model grid"):
        processor.to_native(np.ones((32, 32, 32)), prepared)


def test_wrong_inputs_to_transform():
    processor = Preprocessor(PreprocessConfig(grid=32)).fit(iter([chest()]))
    with pytest.raises(InputError, match="2D"):
        processor.transform(chest()[:, :, 5])
    prepared = processor.transform(chest())
    with pytest.raises(InputError, match="mask geometry"):
        processor.grid_mask(sitk.Image([10, 10, 10], sitk.sitkUInt8), prepared)


REAL_SCANS = ["lung1_image.nrrd", "lung2_image.nrrd", "Lung_Dx-A0001_dicom", "Lung_Dx-A0002_dicom"]


@pytest.mark.parametrize("name", REAL_SCANS)
def test_lung_mask_on_real_chests(data_dir, name):
    image = read_image(data_dir / "chest_ct" / name)
    mask = sitk.GetArrayFromImage(lung_mask(image)).astype(bool)
    litres = mask.sum() * np.prod(image.GetSpacing()) / 1e6
    assert 1.5 <= litres <= 9.0
    body = np.flatnonzero((sitk.GetArrayViewFromImage(image) > -300).any(axis=(0, 1)))
    middle = (body[0] + body[-1]) // 2
    share = mask[:, :, :middle].sum() / mask.sum()
    assert 0.3 <= share <= 0.7


def test_the_default_mask_takes_in_a_tumour_at_the_lungs_edge(data_dir):
    """lung2's tumour (its label mask) lies at the lung's edge: a 6 mm closing leaves it out, the default takes it in."""
    image = read_image(data_dir / "chest_ct" / "lung2_image.nrrd")
    tumour = sitk.GetArrayFromImage(read_image(data_dir / "chest_ct" / "lung2_label.nrrd")) > 0
    inside = {mm: sitk.GetArrayFromImage(lung_mask(image, mm))[tumour].mean() for mm in (6.0, LUNG_CLOSING_MM)}
    assert inside[6.0] < 0.1 and inside[LUNG_CLOSING_MM] > 0.6
    assert PreprocessConfig().closing_mm == LUNG_CLOSING_MM == 20.0


@pytest.mark.parametrize("name", ["totalseg_pulmonary_ct_cropped.nii.gz", "totalseg_aorta_ct_cropped.nii.gz"])
def test_lung_mask_on_scans_cropped_through_the_lungs(data_dir, name):
    """Crops around the heart cut the lungs at the image's edge: the mask still holds nearly all their air."""
    image = read_image(data_dir / "chest_ct" / name)
    air = sitk.GetArrayFromImage(image) < -400
    mask = sitk.GetArrayFromImage(lung_mask(image)).astype(bool)
    assert air[mask].mean() > 0.85  # the mask is lung, not the tissue around it
    assert mask[air].mean() > 0.85  # nearly all the air in these crops is lung


def test_real_chest_back_to_native(data_dir):
    image = read_image(data_dir / "chest_ct" / "lung1_image.nrrd")
    before = fingerprint(image)
    processor = Preprocessor(PreprocessConfig(grid=32))
    prepared = processor.fit_transform([image])[0]
    native = processor.to_native(prepared.lung.astype(np.float32), prepared)
    same_geometry(native, image)
    lungs = sitk.GetArrayFromImage(lung_mask(image)).astype(bool)
    back = sitk.GetArrayViewFromImage(native) > 0.5
    assert (lungs & back).sum() / (lungs | back).sum() > 0.8
    assert fingerprint(image) == before
