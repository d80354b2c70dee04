"""Tests of the simulated cohorts: determinism, scenarios, lesion placement, anatomy, base-CT path."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from CLAMLib.errors import InputError
from CLAMLib.simulate import (
    DEFAULT_SPACING,
    SCENARIOS,
    Cohort,
    LesionSpec,
    ScenarioParams,
    make_cohort,
    make_phantom,
)
from scipy import ndimage

LUNG1 = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "chest_ct" / "lung1_image.nrrd"
SMALL = {"size": (64, 64, 40), "spacing": (5.5, 5.5, 8.0)}


@pytest.fixture(scope="module")
def cohorts() -> dict[str, Cohort]:
    """One default-grid cohort of 3 subjects per cluster for each scenario."""
    return {sc: make_cohort(sc, n_per_cluster=3, seed=11) for sc in SCENARIOS}


def arr(image: sitk.Image) -> np.ndarray:
    """A copy of an image's voxels as a (z, y, x) array."""
    return sitk.GetArrayFromImage(image)


def equivalent_diameter(subject) -> float:
    """Diameter (mm) of the sphere with the lesion mask's volume."""
    volume = arr(subject.lesion).sum() * np.prod(subject.lesion.GetSpacing())
    return float((6.0 * volume / np.pi) ** (1.0 / 3.0))


def zone_fraction(subject) -> float:
    """Height of the lesion mask's centroid within its lung side's cranio-caudal extent (0 base, 1 apex)."""
    m, lung = arr(subject.lesion) > 0, arr(subject.lung) > 0
    k, _, i = (np.mean(a) for a in np.nonzero(m))
    cols = np.nonzero(lung)[2]
    side = cols < np.mean(cols) if i < np.mean(cols) else cols >= np.mean(cols)
    ks = np.nonzero(lung)[0][side]
    return float((k - ks.min()) / (ks.max() - ks.min()))


def test_same_seed_same_arrays_other_seed_differs() -> None:
    a = make_cohort("size", n_per_cluster=2, seed=3, **SMALL)
    b = make_cohort("size", n_per_cluster=2, seed=3, **SMALL)
    c = make_cohort("size", n_per_cluster=2, seed=4, **SMALL)
    for sa, sb in zip(a.subjects, b.subjects):
        assert sa.id == sb.id and sa.label == sb.label and sa.lesions == sb.lesions
        np.testing.assert_array_equal(arr(sa.image), arr(sb.image))
        np.testing.assert_array_equal(arr(sa.lesion), arr(sb.lesion))
    assert not np.array_equal(arr(a.subjects[0].image), arr(c.subjects[0].image))
    assert a.params == b.params and a.params != c.params


def test_labels_ids_geometry(cohorts: dict[str, Cohort]) -> None:
    for sc, cohort in cohorts.items():
        assert cohort.scenario == sc and len(cohort) == 6
        assert np.bincount(cohort.labels).tolist() == [3, 3]
        assert [s.id for s in cohort.subjects] == [f"{sc}-{i:03d}" for i in range(6)]
        for s in cohort.subjects:
            assert s.image.GetPixelID() == sitk.sitkInt16 and s.lesion.GetPixelID() == sitk.sitkUInt8
            assert s.image.GetSize() == (128, 128, 64)
            np.testing.assert_allclose(s.image.GetSpacing(), DEFAULT_SPACING)
            for other in (s.lesion, s.lung):
                assert other.GetSize() == s.image.GetSize() and other.GetOrigin() == s.image.GetOrigin()
                assert other.GetSpacing() == s.image.GetSpacing()
            a = arr(s.image)
            assert a.min() < -900 and a.max() > 300  # air and bone
        json.dumps(cohort.params)  # JSON-able


def test_lesions_fully_inside_lungs(cohorts: dict[str, Cohort]) -> None:
    in_plane = np.zeros((1, 3, 3), bool)
    in_plane[0] = True
    for cohort in cohorts.values():
        for s in cohort.subjects:
            m, lung = arr(s.lesion) > 0, arr(s.lung) > 0
            assert m.any() and len(s.lesions) == 1
            # one voxel (2.7 mm) beyond the lesion surface in-plane is still lung: margin 3 mm + soft edge
            assert not (ndimage.binary_dilation(m, in_plane) & ~lung).any()
            centre = s.image.TransformPhysicalPointToIndex(s.lesions[0]["centre_mm"])
            assert m[centre[2], centre[1], centre[0]]


def test_size_scenario_differs_only_in_diameter(cohorts: dict[str, Cohort]) -> None:
    p = ScenarioParams.default("size")
    assert p.clusters[0].hu == p.clusters[1].hu and p.clusters[0].zone == p.clusters[1].zone
    assert p.clusters[0].side == p.clusters[1].side
    for s in cohorts["size"].subjects:
        rec = s.lesions[0]
        lo, hi = (10.0, 12.0) if s.label == 0 else (28.0, 30.0)
        assert lo <= rec["diameter_mm"] <= hi and 20.0 <= rec["hu"] <= 40.0
        d = equivalent_diameter(s)
        assert (d < 16.0) if s.label == 0 else (24.0 < d < 34.0)
        if s.label == 1:
            assert abs(np.median(arr(s.image)[arr(s.lesion) > 0]) - rec["hu"]) < 25.0


def test_location_scenario_differs_only_in_site(cohorts: dict[str, Cohort]) -> None:
    p = ScenarioParams.default("location")
    assert p.clusters[0].diameter_mm == p.clusters[1].diameter_mm and p.clusters[0].hu == p.clusters[1].hu
    assert (p.clusters[0].zone, p.clusters[1].zone) == ("upper", "lower")
    for s in cohorts["location"].subjects:
        rec = s.lesions[0]
        assert 24.0 <= rec["diameter_mm"] <= 26.0 and 20.0 <= rec["hu"] <= 40.0
        assert 20.0 < equivalent_diameter(s) < 30.0
        assert rec["zone"] == ("upper" if s.label == 0 else "lower")
        frac = zone_fraction(s)
        assert (frac > 0.6) if s.label == 0 else (frac < 0.4)


def test_intensity_scenario_differs_only_in_hu(cohorts: dict[str, Cohort]) -> None:
    p = ScenarioParams.default("intensity")
    assert p.clusters[0].diameter_mm == p.clusters[1].diameter_mm and p.clusters[0].zone == p.clusters[1].zone
    for s in cohorts["intensity"].subjects:
        rec = s.lesions[0]
        assert 34.0 <= rec["diameter_mm"] <= 36.0 and 30.0 < equivalent_diameter(s) < 40.0
        measured = float(np.median(arr(s.image)[arr(s.lesion) > 0]))
        expected = -450.0 if s.label == 0 else 30.0
        assert abs(rec["hu"] - expected) <= 10.0
        assert abs(measured - expected) < 40.0


def test_anatomy_variation_zero_fixes_lungs_one_varies_them() -> None:
    fixed = make_cohort("intensity", n_per_cluster=2, seed=1, anatomy_variation=0.0, **SMALL)
    lungs = [arr(s.lung) for s in fixed.subjects]
    for other in lungs[1:]:
        np.testing.assert_array_equal(lungs[0], other)
    varied = make_cohort("intensity", n_per_cluster=2, seed=1, anatomy_variation=1.0, **SMALL)
    lungs = [arr(s.lung) > 0 for s in varied.subjects]
    volumes = [m.sum() for m in lungs]
    assert len(set(volumes)) == len(volumes)
    dice = 2 * (lungs[0] & lungs[1]).sum() / (volumes[0] + volumes[1])
    assert dice < 0.97


def test_several_lesions_and_custom_params_regenerate() -> None:
    params = ScenarioParams(clusters=(LesionSpec((8.0, 9.0), (-700.0, -690.0), side="right"),
                                      LesionSpec((14.0, 15.0), (60.0, 70.0), side="left")), n_lesions=3)
    cohort = make_cohort("size", n_per_cluster=2, seed=2, params=params)
    for s in cohort.subjects:
        assert len(s.lesions) == 3
        assert ndimage.label(arr(s.lesion))[1] == 3
        assert {r["side"] for r in s.lesions} == {"right" if s.label == 0 else "left"}
    p = json.loads(json.dumps(cohort.params))
    again = make_cohort(p["scenario"], p["n_per_cluster"], p["seed"], p["anatomy_variation"],
                        params=ScenarioParams.from_dict(p["scenario_params"]), size=p["size"], spacing=p["spacing"])
    np.testing.assert_array_equal(arr(cohort.subjects[-1].image), arr(again.subjects[-1].image))


@pytest.mark.parametrize("kwargs, words", [
    ({"scenario": "shape"}, "use one of"),
    ({"n_per_cluster": 1}, "at least 2"),
    ({"anatomy_variation": -0.5}, "use 0"),
    ({"size": (8, 8, 8)}, "at least 16"),
    ({"params": ScenarioParams(clusters=(LesionSpec(),))}, "at least 2"),
    ({"params": ScenarioParams(clusters=(LesionSpec(zone="apex"), LesionSpec()))}, "use one of"),
])
def test_bad_arguments_say_the_fix(kwargs: dict, words: str) -> None:
    with pytest.raises(InputError, match=words):
        make_cohort(**kwargs)


def test_no_room_for_lesion_is_an_input_error() -> None:
    params = ScenarioParams(clusters=(LesionSpec((150.0, 150.0)), LesionSpec()))
    with pytest.raises(InputError, match="no room"):
        make_cohort("size", n_per_cluster=2, params=params, **SMALL)


def test_generation_is_fast() -> None:
    t = time.perf_counter()
    cohort = make_cohort("size", n_per_cluster=2, seed=0)
    per_subject = (time.perf_counter() - t) / len(cohort)
    assert per_subject < 0.6, f"{per_subject:.2f} s per subject (target < 0.3 s)"


def test_phantom_looks_like_a_chest() -> None:
    image, lung = make_phantom(seed=0, anatomy_variation=0.0)
    a, m = arr(image), arr(lung) > 0
    assert -900 < np.median(a[m]) < -780  # aerated lung
    assert a[0, 0, 0] < -900  # air outside the body
    ix = np.asarray(np.nonzero(m)[2])
    assert (ix < 64).any() and (ix > 64).any()  # two lungs either side of the mediastinum
    assert not m[:, :, 62:66].any()  # mediastinum between them


def test_base_ct_path_on_a_synthetic_base() -> None:
    base, base_lung = make_phantom(seed=5, size=(96, 96, 40), spacing=(3.6, 3.6, 8.0))
    cohort = make_cohort("location", n_per_cluster=2, seed=0, base=base, base_lung=base_lung, size=(64, 64, 40))
    assert cohort.params["base"]["grid_size"] == [64, 64, 40]  # downsampled in-plane, z kept
    first = arr(cohort.subjects[0].image)
    for s in cohort.subjects:
        m, lung = arr(s.lesion) > 0, arr(s.lung) > 0
        assert m.any() and not (m & ~lung).any()
        assert s.lesions[0]["zone"] == ("upper" if s.label == 0 else "lower")
        assert s.image.GetSize() == (64, 64, 40)
    assert not np.array_equal(first, arr(cohort.subjects[1].image))  # deformed differently
    still = make_cohort("size", n_per_cluster=2, seed=0, base=base, base_lung=base_lung, anatomy_variation=0.0,
                        size=(96, 96, 40))
    lungs = [arr(s.lung) for s in still.subjects]
    np.testing.assert_array_equal(lungs[0], lungs[-1])
    np.testing.assert_array_equal(lungs[0], arr(base_lung))


def test_base_lesion_is_replaced_by_lung_and_the_base_kept() -> None:
    base, base_lung = make_phantom(seed=5, size=(96, 96, 40), spacing=(3.6, 3.6, 8.0))
    values = arr(base).copy()
    z, y, x = (np.asarray(c) for c in np.nonzero(arr(base_lung)))
    centre = (int(np.median(z)), int(np.median(y)), int(np.median(x)))
    tumour = np.zeros(values.shape, dtype=np.uint8)
    tumour[centre[0] - 1 : centre[0] + 2, centre[1] - 4 : centre[1] + 5, centre[2] - 4 : centre[2] + 5] = 1
    values[tumour > 0] = 40  # a solid tumour in the base's lung
    with_tumour = sitk.GetImageFromArray(values)
    with_tumour.CopyInformation(base)
    lesion = sitk.GetImageFromArray(tumour)
    lesion.CopyInformation(base)
    before = arr(with_tumour).copy()
    kwargs = dict(n_per_cluster=2, seed=0, base=with_tumour, base_lung=base_lung, anatomy_variation=0.0,
                  size=(96, 96, 40))
    plain, cleaned = make_cohort("size", **kwargs), make_cohort("size", base_lesion=lesion, **kwargs)
    np.testing.assert_array_equal(arr(with_tumour), before)  # the caller's base is not touched
    assert cleaned.params["base"]["base_lesion_voxels"] == int(tumour.sum())
    site = tumour > 0
    for p, c in zip(plain.subjects, cleaned.subjects):
        keep = site & (arr(p.lesion) == 0) & (arr(c.lesion) == 0)  # the site, where no simulated lesion fell
        assert keep.sum() > 100
        assert np.median(arr(p.image)[keep]) > -100 and np.median(arr(c.image)[keep]) < -700
    moved = sitk.GetImageFromArray(tumour)
    with pytest.raises(InputError, match="exact grid"):
        make_cohort("size", base_lesion=moved, **kwargs)


def test_base_ct_path_segments_the_lungs_itself() -> None:
    pytest.importorskip("CLAMLib.preprocess", reason="CLAMLib.preprocess (lung_mask) is not in this tree yet")
    base, _ = make_phantom(seed=6, size=(96, 96, 40), spacing=(3.6, 3.6, 8.0))
    cohort = make_cohort("intensity", n_per_cluster=2, seed=0, base=base)
    assert cohort.params["base"]["base_lung_given"] is False
    for s in cohort.subjects:
        assert not ((arr(s.lesion) > 0) & (arr(s.lung) == 0)).any()


def test_base_must_be_in_hu() -> None:
    base, lung = make_phantom(seed=0, **SMALL)
    shifted = sitk.Cast(base, sitk.sitkFloat32) + 1024.0
    with pytest.raises(InputError, match="HU"):
        make_cohort("size", n_per_cluster=2, base=shifted, base_lung=lung)


def test_base_ct_path_on_a_real_ct() -> None:
    if not LUNG1.is_file():
        pytest.skip(f"real chest CT not found at {LUNG1} (a fresh clone has no ../shared/data)")
    pytest.importorskip("CLAMLib.preprocess", reason="CLAMLib.preprocess (lung_mask) is not in this tree yet")
    base = sitk.ReadImage(str(LUNG1))
    cohort = make_cohort("size", n_per_cluster=2, seed=0, base=base)
    assert cohort.params["base"]["grid_size"] == [128, 128, 48]
    for s in cohort.subjects:
        m, lung = arr(s.lesion) > 0, arr(s.lung) > 0
        assert m.any() and not (m & ~lung).any()
        assert (equivalent_diameter(s) < 16.0) if s.label == 0 else (equivalent_diameter(s) > 22.0)


def test_base_ct_lesions_share_one_anatomical_site_where_the_box_site_has_no_room() -> None:
    base, base_lung = make_phantom(seed=5, size=(96, 96, 40), spacing=(3.6, 3.6, 8.0))
    near_pleura = (0.05, 0.5, 0.5)  # the lung's lateral edge: no room for a 25 mm lesion there
    spec = LesionSpec((24.0, 26.0), (20.0, 40.0), side="right", site=near_pleura)
    params = ScenarioParams(clusters=(spec, replace(spec, hu=(-460.0, -440.0))))
    cohort = make_cohort("intensity", n_per_cluster=4, seed=3, base=base, base_lung=base_lung, params=params,
                         size=(96, 96, 40))
    sites = {int(k): np.asarray(v) for k, v in cohort.params["base"]["sites_mm"].items()}
    assert sites[0] == pytest.approx(sites[1])  # both clusters' lesions are placed alike
    lung = arr(base_lung) > 0
    depth = ndimage.distance_transform_edt(lung, sampling=(8.0, 3.6, 3.6))
    index = base.TransformPhysicalPointToIndex(sites[0].tolist())
    assert depth[index[::-1]] >= 12.5  # room for the lesion at the site in the base
    for s in cohort.subjects:
        moved = np.asarray(s.lesions[0]["base_centre_mm"])  # the lesion centre in the undeformed base
        assert np.linalg.norm(moved - sites[s.label]) <= spec.jitter_mm + 2.0
        m, lung_s = arr(s.lesion) > 0, arr(s.lung) > 0
        assert m.any() and not (m & ~lung_s).any()
