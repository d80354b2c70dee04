"""`clam map` over a cohort: native-grid maps, assignments CSV with bad scans, QC, averages, resumable reruns."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from CLAMLib import preprocess
from CLAMLib.cli import main
from CLAMLib.cohort import find_scans
from CLAMLib.errors import InputError
from CLAMLib.estimator import CLAMModel
from CLAMLib.imageio import read_image
from CLAMLib.overlay import read_map
from CLAMLib.train import TrainConfig
from cohort_data import write_bad_scans, write_phantoms


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Phantom scans, bad scans and a tiny bundle trained on the phantoms (grid 16)."""
    root = tmp_path_factory.mktemp("cohort")
    paths = write_phantoms(root / "good")
    bad = write_bad_scans(root / "bad", paths[0])
    model = CLAMModel(grid=16, train=TrainConfig(k=2, pretrain_epochs=3, finetune_epochs=2, batch_size=4,
                                                 device="cpu"), verbose=False)
    model.fit([read_image(p) for p in paths])
    model.save(root / "bundle")
    return {"root": root, "good": paths, "bad": bad, "bundle": root / "bundle"}


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "assignments.csv", newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def _same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5))


def test_map_cohort_reports_bad_scans_and_writes_everything(cohort: dict, tmp_path: Path) -> None:
    out = tmp_path / "maps"
    rc = main(["map", str(cohort["bundle"]), str(cohort["root"] / "good"), str(cohort["root"] / "bad"),
               "--out", str(out), "--device", "cpu", "--quiet"])
    assert rc == 3  # some scans failed, the others completed
    rows = _rows(out)
    assert set(rows) == {p.stem for p in cohort["good"]} | set(cohort["bad"])
    assert list(next(iter(rows.values()))) == ["id", "cluster", "q0", "q1", "lung_volume_l", "status", "reason"]
    for name, word in cohort["bad"].items():
        assert rows[name]["status"] == "failed" and word.lower() in rows[name]["reason"].lower(), rows[name]
        assert name in (out / "map.log").read_text()
    for path in cohort["good"]:
        row = rows[path.stem]
        assert row["status"] == "ok" and row["reason"] == ""
        q = [float(row["q0"]), float(row["q1"])]
        assert abs(sum(q) - 1) < 1e-4 and int(row["cluster"]) == int(np.argmax(q))
        assert 2.0 < float(row["lung_volume_l"]) < 8.0
        image = read_image(path)
        for c in (0, 1):
            written = out / "scans" / path.stem / f"map_cluster{c}.nrrd"
            assert sitk.ReadImage(str(written)).GetPixelID() == sitk.sitkUInt8  # 0..255, the scale in the header
            m = read_map(written)
            assert _same_geometry(m, image)
            values = sitk.GetArrayViewFromImage(m)
            assert m.GetPixelID() == sitk.sitkFloat32 and 0 <= values.min() and 0 < values.max() <= 1
        assert (out / "scans" / path.stem / "qc.png").stat().st_size > 1000
        assert (out / "scans" / path.stem / ".done").is_file()
    clusters = {int(rows[p.stem]["cluster"]) for p in cohort["good"]}
    for c in clusters:
        avg = sitk.ReadImage(str(out / "clusters" / f"average_cluster{c}.nrrd"))
        assert avg.GetSize() == (16, 16, 16)
        assert (out / "clusters" / f"average_cluster{c}.png").is_file()
    assert not list(out.rglob("*.tmp"))  # atomic writes leave nothing behind
    record = json.loads((out / "scans" / cohort["good"][0].stem / "result.json").read_text())
    assert record["source"] == str(cohort["good"][0].absolute())
    assert record["acquisition"]["dicom"] is False and record["acquisition"]["slices"] == 30
    assert -1000 < record["acquisition"]["mean_lung_hu"] < -500 and record["acquisition"]["body_area_cm2"] > 100

    clinical = tmp_path / "clinical.csv"
    ok = [p.stem for p in cohort["good"]]
    clinical.write_text("scan,score\n" + "".join(f"{i},{int(rows[i]['cluster']) * 10 + n}\n"
                                                  for n, i in enumerate(ok[1:])) + "extra,3\n")
    assert main(["associate", str(out), "--clinical", str(clinical), "--id-column", "scan"]) == 0
    data = json.loads((out / "association.json").read_text())
    assert data["ids"]["mapped_not_in_table"] == [ok[0]] and data["ids"]["in_table_not_mapped"] == ["extra"]
    assert set(data["ids"]["failed_in_mapping"]) == set(cohort["bad"])
    tested = {c["name"]: c for c in data["columns"]}
    assert tested["score"]["test"] == "Kruskal-Wallis" and tested["score"]["n"] == len(ok) - 1
    assert {"lung volume (L)", "mean lung HU", "body cross-section (cm^2)"} <= set(tested)
    assert (out / "association.md").is_file() and (out / "association" / "overview.png").is_file()


def test_rerun_skips_done_scans_and_redoes_unfinished_ones(cohort: dict, tmp_path: Path) -> None:
    out = tmp_path / "maps"
    scans = [str(p) for p in cohort["good"][:3]]
    assert main(["map", str(cohort["bundle"]), *scans, "--out", str(out), "--device", "cpu", "--quiet",
                 "--no-qc", "--format", "nifti"]) == 0
    first = {p: p.stat().st_mtime_ns for p in out.glob("scans/*/map_cluster*.nii.gz")}
    assert len(first) == 6
    image = read_image(cohort["good"][0])
    assert _same_geometry(sitk.ReadImage(str(out / "scans" / cohort["good"][0].stem / "map_cluster0.nii.gz")), image)
    victim = cohort["good"][1].stem
    (out / "scans" / victim / ".done").unlink()  # as if interrupted before its marker was written
    before = _rows(out)
    assert main(["map", str(cohort["bundle"]), *scans, "--out", str(out), "--device", "cpu", "--quiet",
                 "--no-qc", "--format", "nifti"]) == 0
    changed = {p for p in first if p.stat().st_mtime_ns != first[p]}
    assert {p.parent.name for p in changed} == {victim}
    log = (out / "map.log").read_text()
    assert log.count("skipped: done earlier") == 2
    assert _rows(out) == before


def test_map_finds_each_scans_lungs_once(cohort: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    searches = []
    find = preprocess._lungs_from_air
    monkeypatch.setattr(preprocess, "_lungs_from_air", lambda *a: searches.append(1) or find(*a))
    scans = [str(p) for p in cohort["good"][:2]]
    assert main(["map", str(cohort["bundle"]), *scans, "--out", str(tmp_path / "maps"), "--device", "cpu",
                 "--quiet"]) == 0
    assert len(searches) == 2  # the lung volume, the QC picture and the model input share one lung mask


def test_find_scans_excludes_names_and_paths(cohort: dict, tmp_path: Path) -> None:
    folder = tmp_path / "cohort"
    for name in ("a.nrrd", "a_label.nrrd", "sub/b.nrrd", "sub/b_label.nrrd", "sub/old/c.nrrd"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(cohort["good"][0].read_bytes())
    assert len(find_scans([folder])) == 5
    assert [s.id for s in find_scans([folder], exclude=["*_label.nrrd"])] == ["a", "sub_b", "sub_old_c"]
    assert [s.id for s in find_scans([folder], exclude=["*_label.nrrd", "sub/old/*"])] == ["a", "sub_b"]
    assert [s.id for s in find_scans([folder / "a.nrrd", folder / "a_label.nrrd"], exclude=["*_label*"])] == ["a"]
    with pytest.raises(InputError, match=r"no scans left.*'\*\.nrrd'"):
        find_scans([folder], exclude=["*.nrrd"])
    out = tmp_path / "maps"
    assert main(["map", str(cohort["bundle"]), str(folder), "--exclude", "*_label.nrrd", "--exclude", "*/old/*",
                 "--out", str(out), "--device", "cpu", "--quiet", "--no-qc"]) == 0
    assert set(_rows(out)) == {"a", "sub_b"}
    assert main(["map", str(cohort["bundle"]), str(folder), "--exclude", "*.nrrd", "--out", str(out)]) == 2


def test_find_scans_folder_dicom_and_manifest(cohort: dict, tmp_path: Path) -> None:
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("id,path\n" + "".join(f"subject{i},{p}\n" for i, p in enumerate(cohort["good"][:2])))
    scans = find_scans([manifest, cohort["root"] / "bad"])
    assert [s.id for s in scans[:2]] == ["subject0", "subject1"]
    assert {"broken", "slice2d", "nolungs", "gappy_dicom"} <= {s.id for s in scans}


REAL = ["lung1_image.nrrd", "lung2_image.nrrd", "Lung_Dx-A0001_dicom", "Lung_Dx-A0002_dicom"]


def test_map_real_chest_cts_keeps_each_geometry(cohort: dict, data_dir: Path, tmp_path: Path) -> None:
    paths = [data_dir / "chest_ct" / name for name in REAL]
    out = tmp_path / "real"
    assert main(["map", str(cohort["bundle"]), *map(str, paths), "--out", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    rows = _rows(out)
    for path in paths:
        scan = find_scans([path])[0]
        row = rows[scan.id]
        assert row["status"] == "ok", row
        assert 2.0 < float(row["lung_volume_l"]) < 8.0, row  # plausible adult lungs (partly covered scans)
        image = read_image(path)
        for c in (0, 1):
            m = sitk.ReadImage(str(out / "scans" / scan.id / f"map_cluster{c}.nrrd"))
            assert m.GetSize() == image.GetSize() and m.GetSpacing() == image.GetSpacing()
            assert m.GetOrigin() == image.GetOrigin() and m.GetDirection() == image.GetDirection()
        assert (out / "scans" / scan.id / "qc.png").is_file()
        acquisition = json.loads((out / "scans" / scan.id / "result.json").read_text())["acquisition"]
        assert acquisition["dicom"] == path.is_dir() and -950 < acquisition["mean_lung_hu"] < -600
    assert main(["associate", str(out)]) == 0  # the scans' own columns without a clinical table
    tested = {c["name"]: c for c in json.loads((out / "association.json").read_text())["columns"]}
    assert tested["slices"]["n"] == 4 and "manufacturer" not in tested  # two of four scans are DICOM
