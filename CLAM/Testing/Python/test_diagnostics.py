"""Training diagnostics: outlier clusters and clusters that follow anatomy or acquisition are named."""

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from CLAMLib.acquisition import scan_record
from CLAMLib.diagnostics import assess, association, eta_squared
from CLAMLib.errors import InputError
from CLAMLib.imageio import read_image
from CLAMLib.preprocess import find_lungs
from CLAMLib.qc import training_report
from scipy import stats


def test_eta_squared_is_the_one_way_anova_share_of_variance():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 10)
    values = rng.normal(size=30) + labels
    eta2 = eta_squared(values, labels)
    f, _ = stats.f_oneway(*[values[labels == g] for g in range(3)])
    assert eta2 == pytest.approx(f * 2 / (f * 2 + 27))  # eta^2 = F df_b / (F df_b + df_w)
    assert eta_squared(np.ones(30), labels) == 0.0


def test_association_finds_a_planted_difference_and_not_a_null_one():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 12)
    planted = rng.normal(size=24) + 3 * labels
    eta2, p = association(planted, labels, permutations=500)
    assert eta2 > 0.6 and p < 0.01
    _, p_null = association(rng.normal(size=24), labels, permutations=500)
    assert p_null > 0.05


def test_assess_names_lung_volume_and_a_cluster_of_outliers():
    rng = np.random.default_rng(2)
    labels = [0] * 12 + [1] * 12 + [2] * 2
    rows = [{"id": f"s{i}", "lung_volume_l": 3.0 + 2.0 * (lab == 1) + rng.normal(0, 0.2),
             "slice_spacing_mm": 5.0, "mean_lung_hu": -850 + rng.normal(0, 10)} for i, lab in enumerate(labels)]
    found = assess(rows, labels, 3)
    assert list(found["outlier_clusters"]) == [2] and found["outlier_clusters"][2] == ["s24", "s25"]
    text = " ".join(found["warnings"])
    assert "lung volume" in text and "attenuation" not in text and "s24, s25" in text
    assert {a["descriptor"] for a in found["associations"]} == {"lung_volume_l", "mean_lung_hu", "slice_spacing_mm"}


def test_assess_names_a_scanner_that_separates_the_clusters_by_cramers_v():
    labels = [0] * 10 + [1] * 10
    rows = [{"id": f"s{i}", "manufacturer": "A" if lab == 0 else "B", "kernel": "B30f",
             "scanner_model": ("X", "Y")[i % 2]} for i, lab in enumerate(labels)]
    found = assess(rows, labels, 2)
    by_name = {a["descriptor"]: a for a in found["associations"]}
    assert by_name["manufacturer"]["effect_name"] == "Cramer's V" and by_name["manufacturer"]["effect"] == 1.0
    assert by_name["manufacturer"]["per_cluster"] == {0: "A", 1: "B"}
    assert by_name["scanner_model"]["effect"] < 0.5 and "kernel" not in by_name  # one kernel: nothing to test
    assert found["warnings"] == [w for w in found["warnings"] if "scanner manufacturer" in w] and found["warnings"]


def test_the_report_section(tmp_path):
    rows = [{"id": f"s{i}", "lung_volume_l": float(i % 2 * 3 + 1), "status": "ok"} for i in range(16)]
    diagnosis = assess(rows, [i % 2 for i in range(16)], 2)
    summary = SimpleNamespace(to_dict=lambda: {"k": 2, "cluster_sizes": [8, 8]})
    training_report(summary, tmp_path, rows, diagnosis)
    report = (tmp_path / "report.md").read_text()
    assert "## what the clusters follow" in report and "**warning:** the clusters differ mainly in lung volume" in report
    assert "| lung volume (L) | epsilon^2 1.00 |" in report
    assert json.loads((tmp_path / "report.json").read_text())["diagnosis"]["warnings"]


def test_clusters_that_follow_contrast_on_the_siim_slices_are_named(data_dir: Path):
    """100 real slices, half with a contrast agent (only 12 headers say so): clusters equal to the contrast label are
    flagged by the image's enhanced soft tissue; the same clusters shuffled are not."""
    folder = data_dir / "chest_ct_slices" / "siim_contrast"
    with open(folder / "overview.csv", newline="") as f:
        overview = list(csv.DictReader(f))
    rows, labels = [], []
    for row in overview:
        image = read_image(folder / "dicom_dir" / row["dicom_name"])
        try:
            lungs = find_lungs(image)
            record = scan_record(image, lungs.coarse, lungs.factors)
        except InputError:  # no lungs found on this slice: its header and geometry only
            record = scan_record(image)
        rows.append({"id": row["id"], **record})
        labels.append(int(row["Contrast"] == "True"))
    followed = assess(rows, labels, 2)
    assert any("contrast agent" in w for w in followed["warnings"]), followed["associations"]
    shuffled = assess(rows, list(np.random.default_rng(0).permutation(labels)), 2)
    assert not any("contrast agent" in w for w in shuffled["warnings"])


def test_people_told_apart_by_several_descriptors_at_once_are_named():
    """Six people of four scans each, split three against three: no descriptor alone separates the clusters, the
    record together does; clusters unrelated to the people give no warning."""
    rng = np.random.default_rng(3)
    people = [(rng.uniform(2.5, 6.0), rng.uniform(-880, -780), rng.uniform(400, 700)) for _ in range(6)]
    rows = [{"id": f"p{p}-{i}", "lung_volume_l": people[p][0] + rng.normal(0, 0.05),
             "mean_lung_hu": people[p][1] + rng.normal(0, 3), "body_area_cm2": people[p][2] + rng.normal(0, 5)}
            for p in range(6) for i in range(4)]
    by_person = [int(p in (0, 2, 4)) for p in range(6) for _ in range(4)]
    volumes = np.array([r["lung_volume_l"] for r in rows])
    assert eta_squared(stats.rankdata(volumes), np.array(by_person)) < 0.5  # not decisive alone
    found = assess(rows, by_person, 2)
    assert found["predictability"]["balanced_accuracy"] >= 0.8 and found["predictability"]["p"] < 0.01
    assert any("predicts their cluster" in w for w in found["warnings"])
    within = [i % 2 for p in range(6) for i in range(4)]  # each person's scans split evenly between the clusters
    assert not any("predicts" in w for w in assess(rows, within, 2)["warnings"])
