"""`clam demo` end to end at a tiny size, and every command's --help."""

import json

import pytest
import SimpleITK as sitk
from CLAMLib.cli import main


def test_demo_writes_table_maps_and_figures(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--subjects", "3", "--epochs", "2", "--grid", "16", "--out", str(out),
                 "--quiet", "--save-model", str(tmp_path / "model")]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["grid"] == 16 and results["settings"]["default_method"] == "ig"
    row = results["clustering"][0]
    assert row["scenario"] == "size" and row["k"] == 2 and 0.5 <= row["accuracy"] <= 1.0
    methods = {r["method"] for r in results["localisation"]}
    assert {"ig", "clam", "scorecam", "gradient", "occlusion", "random"} <= methods
    assert "| size | 2 |" in (out / "results.md").read_text()
    subject = out / "maps" / "size" / "size-000"
    ct = sitk.ReadImage(str(subject / "ct.nrrd"))
    (overlay,) = subject.glob("ig_cluster*.nrrd")
    m = sitk.ReadImage(str(overlay))
    assert m.GetSize() == ct.GetSize() and m.GetSpacing() == ct.GetSpacing() and m.GetOrigin() == ct.GetOrigin()
    arr = sitk.GetArrayViewFromImage(m)
    assert 0.0 <= arr.min() and arr.max() <= 1.0
    assert (out / "figures" / "size_examples.png").stat().st_size > 1000
    assert (out / "figures" / "size_cluster_average.png").stat().st_size > 1000
    assert (tmp_path / "model" / "model.json").is_file()
    assert "results.md" in capsys.readouterr().out


@pytest.mark.parametrize("command", [[], ["demo"], ["train"], ["map"]])
def test_help_explains_each_command(command, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(command + ["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "usage: clam" in text and len(text) > 300
