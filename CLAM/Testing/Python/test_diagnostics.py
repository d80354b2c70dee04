"""Training diagnostics: outlier clusters and clusters that follow anatomy or acquisition are named."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from CLAMLib.diagnostics import assess, association, eta_squared
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
    assert "| lung volume (L) | eta^2 1.00 |" in report
    assert json.loads((tmp_path / "report.json").read_text())["diagnosis"]["warnings"]
