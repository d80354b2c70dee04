"""Preprocessing cache: keyed by scan content and settings, atomic entries, and train, map and --resume reading each
unchanged scan once."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from CLAMLib import preprocess
from CLAMLib.cache import CachedScan, PreprocessCache
from CLAMLib.cli import main
from CLAMLib.imageio import read_image
from CLAMLib.overlay import read_map
from CLAMLib.preprocess import PreprocessConfig, Preprocessor
from cohort_data import TRAIN_ARGS, write_phantoms


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of four phantom scans."""
    folder = tmp_path_factory.mktemp("phantoms")
    write_phantoms(folder, n_per_cluster=2)
    return folder


@pytest.fixture
def searches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per lung search (the heart of preprocessing a scan)."""
    found: list[int] = []
    find = preprocess._lungs_from_air
    monkeypatch.setattr(preprocess, "_lungs_from_air", lambda *a: found.append(1) or find(*a))
    return found


def test_entry_round_trip_and_keys(scans: Path, tmp_path: Path) -> None:
    path = sorted(scans.glob("*.nrrd"))[0]
    config = PreprocessConfig(grid=16)
    grid = Preprocessor(config).to_grid(read_image(path))
    cache = PreprocessCache(tmp_path / "cache")
    key = cache.key(path, config)
    assert cache.load(key) is None and cache.misses == 1
    cache.store(key, CachedScan(grid, 3.25, "first", b"\x89PNG picture"))
    entry = cache.load(key)
    assert entry is not None and cache.hits == 1
    np.testing.assert_array_equal(entry.grid.array, grid.array)
    np.testing.assert_array_equal(entry.grid.lung, grid.lung)
    assert (entry.grid.native, entry.grid.grid) == (grid.native, grid.grid)
    assert (entry.lung_volume_l, entry.scan_id, entry.qc_png) == (3.25, "first", b"\x89PNG picture")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{key}.safetensors"]  # nothing left beside it

    copy = tmp_path / "renamed.nrrd"
    shutil.copy(path, copy)
    assert cache.key(copy, config) == key  # the content counts, not the name
    assert cache.key(path, PreprocessConfig(grid=24)) != key
    assert cache.key(path, PreprocessConfig(grid=16, closing_mm=6.0)) != key
    assert cache.key(path, PreprocessConfig(grid=16, representation="ct")) != key  # a CT entry is no findings entry
    assert cache.key(path, PreprocessConfig(grid=16, vessel_mm=2.0)) != key
    assert entry.grid.array.shape == (3, 16, 16, 16)  # findings channels kept whole
    image = read_image(copy)
    image[0, 0, 0] = image[0, 0, 0] + 1
    sitk.WriteImage(image, str(copy))
    assert cache.key(copy, config) != key

    cache.path(key).write_bytes(cache.path(key).read_bytes()[:100])  # a damaged entry counts as absent
    assert cache.load(key) is None


def test_key_covers_the_code_preprocessing_runs() -> None:
    """Modules that preprocessing uses through another module (morphology, through findings) are in the key too."""
    from CLAMLib import cache

    assert {"CLAMLib.preprocess", "CLAMLib.findings", "CLAMLib.morphology"} <= set(cache._code_modules())
    assert "CLAMLib.explain" not in cache._code_modules()


def test_no_cache_keeps_nothing(scans: Path, tmp_path: Path) -> None:
    cache = PreprocessCache(None)
    grid = Preprocessor(PreprocessConfig(grid=16)).to_grid(read_image(sorted(scans.glob("*.nrrd"))[0]))
    cache.store("key", CachedScan(grid, 1.0, "a"))
    assert cache.load("key") is None and cache.hits == cache.misses == 0


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "assignments.csv", newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def test_train_then_map_preprocess_each_scan_once(scans: Path, tmp_path: Path, searches: list[int]) -> None:
    cache = tmp_path / "cache"
    n = len(list(scans.glob("*.nrrd")))
    args = [a for a in TRAIN_ARGS if a != "--no-qc"]
    assert main(["train", str(scans), "--out", str(tmp_path / "bundle"), "--cache", str(cache), *args]) == 0
    assert len(searches) == n and len(list(cache.glob("*.safetensors"))) == n
    qc = sorted((tmp_path / "bundle" / "report" / "qc").glob("*.png"))
    assert len(qc) == n

    again = tmp_path / "again"
    assert main(["train", str(scans), "--out", str(again), "--cache", str(cache), *args]) == 0
    assert len(searches) == n  # a second training preprocesses nothing, QC pictures included
    assert [p.read_bytes() for p in sorted((again / "report" / "qc").glob("*.png"))] == [p.read_bytes() for p in qc]

    mapped, fresh = tmp_path / "maps", tmp_path / "fresh"
    common = ["--device", "cpu", "--quiet"]
    assert main(["map", str(tmp_path / "bundle"), str(scans), "--out", str(mapped), "--cache", str(cache),
                 *common]) == 0
    assert len(searches) == n  # mapping the training scans finds them in the cache
    assert main(["map", str(tmp_path / "bundle"), str(scans), "--out", str(fresh), "--no-cache", *common]) == 0
    assert len(searches) == 2 * n and not (fresh / "cache").exists()
    assert _rows(mapped) == _rows(fresh)  # the same assignments as preprocessing afresh
    for folder in sorted((fresh / "scans").iterdir()):
        for c in (0, 1):
            a = read_map(mapped / "scans" / folder.name / f"map_cluster{c}.nrrd")
            b = read_map(folder / f"map_cluster{c}.nrrd")
            np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))


def test_map_caches_in_its_output_folder_by_default(scans: Path, tmp_path: Path, searches: list[int]) -> None:
    bundle = tmp_path / "bundle"
    assert main(["train", str(scans), "--out", str(bundle), "--no-cache", *TRAIN_ARGS]) == 0
    n = len(searches)
    out = tmp_path / "maps"
    assert main(["map", str(bundle), str(scans), "--out", str(out), "--device", "cpu", "--quiet", "--no-qc"]) == 0
    assert len(searches) == 2 * n and len(list((out / "cache").glob("*.safetensors"))) == n
    assert main(["map", str(bundle), str(scans), "--out", str(out), "--device", "cpu", "--quiet", "--no-qc",
                 "--redo"]) == 0
    assert len(searches) == 2 * n  # redone from the cache
