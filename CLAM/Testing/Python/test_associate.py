"""`clam associate`: known-answer cohorts (planted effects found, null ones not, effect sizes near the truth),
agreement with scipy's tests run directly, skipped columns, unmatched ids, the acquisition warning and the outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from CLAMLib.associate import Column, analyse_column, analyse_columns, associate, bh_adjust, read_clinical, read_cohort
from CLAMLib.cli import main
from CLAMLib.errors import InputError
from scipy import stats

DELTA = {"strong": 1.0, "weak": 0.3, "none": 0.0}
P_LEVEL_A = (0.7, 0.3)  # share of level "A" in cluster 0 and cluster 1


def synthetic(seed: int, n_per_cluster: int = 100) -> tuple[np.ndarray, list[Column]]:
    """Two clusters; continuous columns shifted by DELTA (unit noise), a categorical one, one with missing values."""
    rng = np.random.default_rng(seed)
    clusters = np.repeat([0, 1], n_per_cluster)
    rng.shuffle(clusters)
    columns = [Column(name, "clinical", list(rng.normal(0, 1, clusters.size) + d * clusters))
               for name, d in DELTA.items()]
    a = rng.random(clusters.size) < np.where(clusters == 0, *P_LEVEL_A)
    columns.append(Column("category", "clinical", ["A" if x else "B" for x in a]))
    gappy = [float(v) if rng.random() > 0.2 else None for v in rng.normal(0, 1, clusters.size) + 1.0 * clusters]
    columns.append(Column("with gaps", "clinical", gappy))
    return clusters, columns


def by_name(outcomes) -> dict:
    return {o.name: o for o in outcomes}


def test_planted_effects_are_found_with_effect_sizes_near_the_truth() -> None:
    effects: dict[str, list[float]] = {"epsilon^2": [], "eta^2": [], "V": []}
    for seed in range(20):
        clusters, columns = synthetic(seed=seed, n_per_cluster=200)
        result = by_name(analyse_columns(columns, clusters, 2))
        assert result["strong"].p_adjusted < 0.01 and result["with gaps"].p_adjusted < 0.01
        assert result["category"].p_adjusted < 0.01 and result["category"].test == "chi-square"
        assert result["strong"].effect_name == "epsilon^2" and result["category"].effect_name == "Cramer's V"
        effects["epsilon^2"].append(result["strong"].effect)
        effects["eta^2"].append(result["strong"].reference["effect"])
        effects["V"].append(result["category"].effect)
        gaps = result["with gaps"]
        assert gaps.missing == sum(v is None for v in columns[-1].values) > 0
        assert gaps.n + gaps.missing == clusters.size
        assert sum(g["missing"] for g in gaps.groups) == gaps.missing
    d = DELTA["strong"]
    superiority = stats.norm.cdf(d / np.sqrt(2))  # P(a cluster-1 value exceeds a cluster-0 value)
    pa = np.mean(P_LEVEL_A)
    truth = {"epsilon^2": 0.75 * (2 * superiority - 1) ** 2,  # Kruskal-Wallis H / (n - 1), two equal groups
             "eta^2": (d ** 2 / 4) / (d ** 2 / 4 + 1),  # means d apart, unit variance within
             "V": (P_LEVEL_A[0] - P_LEVEL_A[1]) / 4 / np.sqrt(0.25 * pa * (1 - pa))}  # phi of the population table
    for name, values in effects.items():  # one draw scatters by about 0.04; the mean of 20 by about 0.01
        assert abs(np.mean(values) - truth[name]) < 0.025, (name, np.mean(values), truth[name])


def test_null_column_is_not_found_in_95_of_100_seeds() -> None:
    found_raw = found_adjusted = 0
    for seed in range(100):
        clusters, columns = synthetic(seed=1000 + seed, n_per_cluster=60)
        null = by_name(analyse_columns(columns, clusters, 2))["none"]
        found_raw += null.p < 0.05
        found_adjusted += null.p_adjusted < 0.05
    assert 100 - found_adjusted >= 95, found_adjusted
    assert found_raw <= 12, found_raw  # the raw test keeps about its 5 % level


def test_results_equal_scipys_tests_run_directly() -> None:
    rng = np.random.default_rng(3)
    clusters = rng.integers(0, 3, 90)
    values = rng.normal(0, 1, 90) + 0.5 * clusters
    out = analyse_column(Column("x", "clinical", list(values)), clusters, 3)
    groups = [values[clusters == c] for c in range(3)]
    h, p = stats.kruskal(*groups)
    f, p_f = stats.f_oneway(*groups)
    assert out.test == "Kruskal-Wallis" and out.statistic == pytest.approx(h) and out.p == pytest.approx(p)
    assert out.effect == pytest.approx(h / (90 - 1))
    assert out.reference["statistic"] == pytest.approx(f) and out.reference["p"] == pytest.approx(p_f)
    for c in range(3):
        g = out.groups[c]
        assert g["median"] == pytest.approx(np.median(groups[c]))
        assert (g["q1"], g["q3"]) == pytest.approx(tuple(np.percentile(groups[c], [25, 75])))
    levels = rng.choice(["x", "y", "z"], 90)
    out = analyse_column(Column("c", "clinical", list(levels)), clusters, 3)
    table = np.array([[np.sum((clusters == c) & (levels == v)) for v in "xyz"] for c in range(3)])
    chi2, p, _, _ = stats.chi2_contingency(table, correction=False)
    assert out.test == "chi-square" and out.p == pytest.approx(p) and out.statistic == pytest.approx(chi2)
    assert out.effect == pytest.approx(np.sqrt(chi2 / (90 * 2)))
    two = np.array([0] * 6 + [1] * 6)
    small = ["a", "a", "a", "a", "a", "b", "b", "b", "b", "b", "b", "a"]
    out = analyse_column(Column("s", "clinical", small), two, 2)
    assert out.test == "Fisher's exact"
    assert out.p == pytest.approx(stats.fisher_exact([[5, 1], [1, 5]])[1])
    p_values = [0.01, 0.04, 0.03, 0.2, 0.001]
    assert bh_adjust(p_values) == pytest.approx(stats.false_discovery_control(p_values))


def test_ids_constant_free_text_and_thin_columns_are_skipped_with_reasons() -> None:
    clusters = np.array([0, 1] * 10)
    columns = [Column("row", "clinical", list(range(20))), Column("same", "clinical", ["x"] * 20),
               Column("note", "clinical", [f"note {i}" for i in range(20)]),
               Column("empty", "clinical", [""] * 20),
               Column("one cluster", "clinical", [float(i) if c == 0 else "NA" for i, c in enumerate(clusters)]),
               Column("age", "clinical", [40 + 3 * i for i in range(20)])]
    out = by_name(analyse_columns(columns, clusters, 2))
    assert "id" in out["row"].skipped and "constant" in out["same"].skipped
    assert "free text" in out["note"].skipped and out["empty"].skipped == "no values"
    assert out["empty"].missing == 20 and "fewer than two clusters" in out["one cluster"].skipped
    assert not out["age"].skipped and out["age"].p_adjusted is not None  # spaced by 3: not consecutive


def write_maps(folder: Path, clusters: np.ndarray, acquisition: list[dict]) -> list[str]:
    """A `clam map` output folder: assignments.csv and per-scan result.json files (one failed scan)."""
    ids = [f"scan_{i:03d}" for i in range(len(clusters))]
    folder.mkdir(parents=True)
    with open(folder / "assignments.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "cluster", "q0", "q1", "lung_volume_l", "status", "reason"])
        for i, c in zip(ids, clusters):
            w.writerow([i, c, 0.9 if c == 0 else 0.1, 0.1 if c == 0 else 0.9, "4.5", "ok", ""])
        w.writerow(["broken", "", "", "", "", "failed", "cannot read image"])
    for i, c, record in zip(ids, clusters, acquisition):
        (folder / "scans" / i).mkdir(parents=True)
        (folder / "scans" / i / "result.json").write_text(json.dumps({
            "id": i, "status": "ok", "cluster": int(c), "acquisition": record}))
    return ids


def test_clam_associate_writes_tables_plots_and_lists_unmatched_ids(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    clusters = np.repeat([0, 1], 30)
    acquisition = [{"dicom": True, "manufacturer": rng.choice(["GE", "SIEMENS"]), "kvp": 120.0,
                    "pixel_spacing_mm": 0.7, "slices": int(rng.integers(100, 300)), "contrast_agent": ""}
                   for _ in clusters]
    ids = write_maps(tmp_path / "maps", clusters, acquisition)
    with open(tmp_path / "clinical.csv", "w", newline="") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(["Patient", "FVC", "fibrosis", "sex"])
        for i, c in zip(ids[2:], clusters[2:]):
            w.writerow([i, f"{80 - 15 * c + rng.normal(0, 5):.1f}", "yes" if c else "no", rng.choice(["F", "M"])])
        w.writerow(["someone_else", "70", "no", "F"])
    rc = main(["associate", str(tmp_path / "maps"), "--clinical", str(tmp_path / "clinical.csv"),
               "--id-column", "Patient"])
    assert rc == 0
    data = json.loads((tmp_path / "maps" / "association.json").read_text())
    assert data["ids"] == {"in_table_not_mapped": ["someone_else"], "mapped_not_in_table": ids[:2],
                           "failed_in_mapping": ["broken"]}
    tested = {c["name"]: c for c in data["columns"]}
    assert tested["FVC"]["p_adjusted"] < 0.01 and tested["FVC"]["missing"] == 2
    assert tested["fibrosis"]["effect"] == pytest.approx(1.0)
    assert data["columns"][0]["name"] in ("FVC", "fibrosis")  # smallest adjusted p first
    assert "Benjamini-Hochberg" in data["adjustment"] and data["warning"] == ""
    skipped = {c["name"]: c["reason"] for c in data["skipped"]}
    assert "constant" in skipped["kVp"] and "constant" in skipped["contrast agent"]
    assert "no values" == skipped["scanner model"]
    for column in data["columns"]:
        assert (tmp_path / "maps" / column["plot"]).stat().st_size > 2000
    assert (tmp_path / "maps" / "association" / "overview.png").stat().st_size > 5000
    text = (tmp_path / "maps" / "association.md").read_text()
    assert "someone_else" in text and "scan_000, scan_001" in text and "Benjamini-Hochberg" in text
    with open(tmp_path / "maps" / "association.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["column"] for r in rows} == set(tested) | set(skipped)


def test_warning_when_the_scanner_goes_with_the_clusters_more_than_the_clinic(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    clusters = np.repeat([0, 1], 25)
    acquisition = [{"dicom": True, "manufacturer": "GE" if c else "SIEMENS", "pixel_spacing_mm": 0.7 + 0.01 * i}
                   for i, c in enumerate(clusters)]
    ids = write_maps(tmp_path / "maps", clusters, acquisition)
    with open(tmp_path / "clinical.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "FVC"])
        w.writerows([i, f"{rng.normal(80, 10):.1f}"] for i in ids)
    result = associate(tmp_path / "maps", tmp_path / "clinical.csv")
    assert "manufacturer" in result.warning and "scanner" in result.warning
    acquisition = [{"dicom": True, "manufacturer": rng.choice(["GE", "SIEMENS"])} for _ in clusters]
    ids = write_maps(tmp_path / "maps2", clusters, acquisition)
    with open(tmp_path / "clinical2.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "FVC"])
        w.writerows([i, f"{80 - 20 * c + rng.normal(0, 5):.1f}"] for i, c in zip(ids, clusters))
    assert associate(tmp_path / "maps2", tmp_path / "clinical2.csv").warning == ""


def test_bad_inputs_give_one_clear_error(tmp_path: Path) -> None:
    clusters = np.array([0, 1] * 5)
    write_maps(tmp_path / "maps", clusters, [{}] * 10)
    cohort = read_cohort(tmp_path / "maps")
    (tmp_path / "c.csv").write_text("ID,age\nscan_000,50\nscan_000,60\n")
    with pytest.raises(InputError, match="repeats the ids"):
        read_clinical(tmp_path / "c.csv", "ID", cohort)
    with pytest.raises(InputError, match="no column 'Patient'.*--id-column"):
        read_clinical(tmp_path / "c.csv", "Patient", cohort)
    with pytest.raises(InputError, match="assignments.csv"):
        read_cohort(tmp_path)
    assert main(["associate", str(tmp_path / "nowhere")]) == 2
