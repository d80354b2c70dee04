"""`clam demo` end to end at a tiny size, and every command's --help."""

import json

import pytest
import SimpleITK as sitk
from CLAMLib.cli import LUNG_CLOSING, RESTARTS, build_parser, main
from CLAMLib.findings import VESSEL_MM
from CLAMLib.model import default_smooth
from CLAMLib.preprocess import PreprocessConfig
from CLAMLib.train import TrainConfig


def test_demo_writes_table_maps_and_figures(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--subjects", "3", "--epochs", "2", "--grid", "16", "--restarts", "2",
                 "--out", str(out), "--quiet", "--save-model", str(tmp_path / "model")]) == 0
    results = json.loads((out / "results.json").read_text())
    settings = results["settings"]
    assert settings["grid"] == 16 and settings["default_method"] == "ig"
    assert settings["smooth"] == default_smooth(16) == 1.0 and settings["restarts"] == 2
    assert settings["representation"] == "findings" and settings["vessel_mm"] == VESSEL_MM
    restarts = results["restarts"]["size"]
    assert [r["seed"] for r in restarts] == [0, 1] and sum(r["best"] for r in restarts) == 1
    assert settings["lung_closing_mm"] == LUNG_CLOSING
    assert settings["register"] == "none" and all(r["reconstruction_r2"] <= 1.0 for r in restarts)
    row = results["clustering"][0]
    assert row["scenario"] == "size" and row["k"] == 2 and 0.5 <= row["accuracy"] <= 1.0
    assert row["restart_seed"] == next(r["seed"] for r in restarts if r["best"])
    methods = {r["method"] for r in results["localisation"]}
    assert {"ig", "clam", "scorecam", "gradient", "occlusion", "random"} <= methods
    assert "| size | 2 |" in (out / "results.md").read_text()
    ig = next(r for r in results["localisation"] if r["method"] == "ig" and r["k"] == 2)
    assert f"| {ig['n_scored']}/6 |" in (out / "results.md").read_text()  # subjects scored of the 6
    subject = out / "maps" / "size" / "size-000"
    ct = sitk.ReadImage(str(subject / "ct.nrrd"))
    (overlay,) = subject.glob("ig_cluster*.nrrd")
    m = sitk.ReadImage(str(overlay))
    assert m.GetSize() == ct.GetSize() and m.GetSpacing() == ct.GetSpacing() and m.GetOrigin() == ct.GetOrigin()
    arr = sitk.GetArrayViewFromImage(m)
    assert 0.0 <= arr.min() and arr.max() <= 1.0
    assert (out / "figures" / "size_examples.png").stat().st_size > 1000
    assert (out / "figures" / "size_cluster_average.png").stat().st_size > 1000
    card = json.loads((tmp_path / "model" / "model.json").read_text())
    assert card["architecture"]["smooth"] == 1.0 and card["architecture"]["in_channels"] == 3
    assert card["preprocess"]["config"]["representation"] == "findings"
    assert "results.md" in capsys.readouterr().out


def test_demo_beside_the_true_k_maps_one_and_three_clusters(tmp_path) -> None:
    """Without --quick the demo also trains k = 1 and k = 3 and maps them (a one-cluster model has no evidence)."""
    out = tmp_path / "demo"
    assert main(["demo", "--scenarios", "size", "--no-sweep", "--subjects", "3", "--epochs", "2", "--grid", "16",
                 "--restarts", "1", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["k"] for r in results["clustering"]] == [1, 2, 3]
    assert results["clustering"][0]["accuracy"] == 0.5  # everyone in one cluster
    assert {r["k"] for r in results["localisation"] if r["method"] == "ig"} == {1, 2, 3}


def test_demo_registers_to_the_lung_template_when_asked(tmp_path) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--subjects", "3", "--epochs", "2", "--grid", "16", "--register", "affine",
                 "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["register"] == "affine" and "registration affine" in (out / "results.md").read_text()
    subject = out / "maps" / "size" / "size-000"
    ct = sitk.ReadImage(str(subject / "ct.nrrd"))
    (overlay,) = subject.glob("ig_cluster*.nrrd")
    m = sitk.ReadImage(str(overlay))
    assert m.GetSize() == ct.GetSize() and m.GetOrigin() == ct.GetOrigin()
    assert 0.0 < sitk.GetArrayViewFromImage(m).max() <= 1.0


@pytest.mark.parametrize("command", [[], ["demo"], ["train"], ["map"]])
def test_help_explains_each_command(command, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(command + ["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "usage: clam" in text and len(text) > 300


def test_command_line_defaults_are_the_api_defaults() -> None:
    assert RESTARTS == TrainConfig().restarts
    assert LUNG_CLOSING == PreprocessConfig().closing_mm
    for command in (["demo"], ["train", "scan.nrrd", "--out", "m"]):
        args = build_parser().parse_args(command)
        assert (args.representation, args.vessel_mm) == (PreprocessConfig().representation, PreprocessConfig().vessel_mm)
        assert args.smooth is None  # grid / 16, as CLAMModel's default architecture


def test_base_lesion_needs_a_base(tmp_path, capsys) -> None:
    status = main(["demo", "--quick", "--base-lesion", str(tmp_path / "tumour.nrrd"), "--out", str(tmp_path)])
    assert status != 0
    assert "--base CT" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()
