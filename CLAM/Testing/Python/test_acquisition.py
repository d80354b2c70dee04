"""What every mapped scan records: DICOM header fields (checked on real headers), geometry and anatomy measures."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from CLAMLib.acquisition import header_fields, scan_record
from CLAMLib.imageio import read_image
from CLAMLib.preprocess import find_lungs


def test_contrast_field_matches_the_siim_overview(data_dir: Path) -> None:
    """The SIIM slices' overview lists each file's contrast tag (NONE where the header has none)."""
    folder = data_dir / "chest_ct_slices" / "siim_contrast"
    with open(folder / "overview.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 100
    recorded = 0
    for row in rows:
        fields = header_fields(read_image(folder / "dicom_dir" / row["dicom_name"]))
        assert fields["dicom"] and fields["manufacturer"] and fields["study_date"][:2] in ("19", "20")
        expected = "" if row["ContrastTag"] == "NONE" else row["ContrastTag"].strip()
        assert fields.get("contrast_agent", "") == expected, (row["dicom_name"], fields, row["ContrastTag"])
        recorded += bool(expected)
    assert recorded == 12  # headers naming an agent: 12 of the 50 labelled with contrast (two more hold an empty tag)


def test_dicom_series_carries_its_scanner(data_dir: Path) -> None:
    a1 = read_image(data_dir / "chest_ct" / "Lung_Dx-A0001_dicom")
    a2 = read_image(data_dir / "chest_ct" / "Lung_Dx-A0002_dicom")
    r1, r2 = scan_record(a1), scan_record(a2)
    assert r1["manufacturer"].lower().startswith("philips") and "16" in r1["scanner_model"]
    assert r2["manufacturer"].lower().startswith("siemens") and "Sensation 10" in r2["scanner_model"]
    assert r2["kernel"].startswith("B40f")
    assert r1["slices"] == 64 and r2["slices"] == 30
    assert abs(r1["slice_spacing_mm"] - 5.0) < 0.01 and abs(r2["slice_spacing_mm"] - 8.0) < 0.01
    assert abs(r1["pixel_spacing_mm"] - 0.842) < 0.01 and r1["kvp"] > 0
    assert r1["study_date"] != r2["study_date"] or r1["study_date"]


def test_anatomy_of_a_real_chest_ct(data_dir: Path) -> None:
    image = read_image(data_dir / "chest_ct" / "lung1_image.nrrd")
    lungs = find_lungs(image)
    record = scan_record(image, lungs.coarse, lungs.factors)
    assert record["dicom"] is False and "manufacturer" not in record
    assert -950 < record["mean_lung_hu"] < -600, record
    assert 300 < record["body_area_cm2"] < 1500, record  # an adult chest, about 30 x 25 cm


def test_body_area_of_a_known_ellipse() -> None:
    """A 300 x 200 mm elliptic body with two air lungs inside: area pi/4 * 30 * 20 cm^2, lungs included."""
    z, y, x = np.mgrid[0:20, 0:160, 0:160]
    spacing = 2.5
    body = ((x - 80) * spacing / 150) ** 2 + ((y - 80) * spacing / 100) ** 2 <= 1
    lungs = ((np.abs(x - 80) - 25) * spacing / 40) ** 2 + ((y - 80) * spacing / 60) ** 2 <= 1
    array = np.where(body, 40, -1000).astype(np.int16)
    array[lungs & body] = -850
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((spacing, spacing, 5.0))
    found = find_lungs(image)
    record = scan_record(image, found.coarse, found.factors)
    assert abs(record["body_area_cm2"] - np.pi / 4 * 30 * 20) < 0.05 * np.pi / 4 * 30 * 20, record
    assert abs(record["mean_lung_hu"] + 850) < 60, record
    assert record["slices"] == 20 and record["slice_spacing_mm"] == 5.0


def test_the_preprocessing_cache_keeps_each_scans_record(tmp_path: Path, monkeypatch) -> None:
    """A scan served from the cache (not read again) has the same acquisition and anatomy record as when it was read."""
    from CLAMLib import batch
    from CLAMLib.cache import PreprocessCache
    from CLAMLib.cohort import Scan
    from CLAMLib.preprocess import PreprocessConfig, Preprocessor
    from cohort_data import write_phantoms

    path = write_phantoms(tmp_path / "scans", n_per_cluster=2)[0]
    scan, cache = Scan("one", path), PreprocessCache(tmp_path / "cache")
    first, second = {}, {}
    batch.gridded_scan(scan, Preprocessor(PreprocessConfig(grid=16)), None, cache, first)
    monkeypatch.setattr(batch, "checked_scan", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read again")))
    batch.gridded_scan(scan, Preprocessor(PreprocessConfig(grid=16)), None, cache, second)
    assert second == first and first["slices"] == 30 and first["mean_lung_hu"] < -500 and cache.hits == 1
