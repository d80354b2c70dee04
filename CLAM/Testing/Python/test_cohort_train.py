"""`clam train` on a cohort: an interrupted run resumes to the same weights; report and QC; two-rank DDP."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from CLAMLib import preprocess
from CLAMLib.cli import main
from CLAMLib.estimator import CLAMModel
from CLAMLib.imageio import read_image
from CLAMLib.preprocess import PreprocessConfig, Preprocessor, lung_mask
from CLAMLib.qc import lung_volume_litres
from CLAMLib.train import EXIT_AFTER_BATCHES_ENV, EXIT_CODE
from cohort_data import TRAIN_ARGS, run_clam, write_phantoms
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of eight phantom scans."""
    folder = tmp_path_factory.mktemp("phantoms")
    write_phantoms(folder)
    return folder


@pytest.fixture(scope="module")
def reference(scans: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("reference") / "bundle"
    done = run_clam(["train", str(scans), "--out", str(out), *[a for a in TRAIN_ARGS if a != "--no-qc"]])
    assert done.returncode == 0, done.stderr
    return out


def test_training_report_and_qc(reference: Path) -> None:
    report = reference / "report"
    assert (report / "loss_curves.png").stat().st_size > 1000
    assert (report / "k_selection.csv").read_text().startswith("k,silhouette")
    assert "cluster sizes" in (report / "report.md").read_text()
    assert len(list((report / "qc").glob("*.png"))) == 8
    assert not (reference / "checkpoint").exists()  # removed once the bundle is written
    rows = json.loads((report / "report.json").read_text())["scans"]
    assert all(r["status"] == "ok" and 2 < r["lung_volume_l"] < 8 for r in rows)


def test_training_reads_each_scan_once_and_prepares_it_as_before(scans: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cohort = tmp_path / "cohort"
    shutil.copytree(scans, cohort)
    paths = sorted(cohort.glob("*.nrrd"))
    shutil.copy(paths[0], cohort / "extra_label.nrrd")  # would be trained on without --exclude
    searches = []
    find = preprocess._lungs_from_air
    monkeypatch.setattr(preprocess, "_lungs_from_air", lambda *a: searches.append(1) or find(*a))
    out = tmp_path / "bundle"
    assert main(["train", str(cohort), "--exclude", "*_label.nrrd", "--out", str(out),
                 *[a for a in TRAIN_ARGS if a != "--no-qc"]]) == 0
    assert len(searches) == len(paths)  # QC, lung volume, fit and transform share one lung mask per scan
    monkeypatch.undo()
    images = [read_image(p) for p in paths]
    expected = Preprocessor(PreprocessConfig(grid=16)).fit(images)
    arrays = np.stack([expected.transform(image).array for image in images])
    model = CLAMModel.load(out)
    assert model.preprocessor_.scale_ == expected.scale_
    assert np.array_equal(model.cohort_mean_, arrays.mean(0).astype(np.float32))
    rows = json.loads((out / "report" / "report.json").read_text())["scans"]
    assert [r["id"] for r in rows] == [p.stem for p in paths]
    assert [r["lung_volume_l"] for r in rows] == [round(lung_volume_litres(lung_mask(im)), 3) for im in images]


def test_interrupted_training_resumes_to_the_same_weights(scans: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    args = ["train", str(scans), "--out", str(out), *TRAIN_ARGS]
    # 8 scans in batches of 3 = 3 steps per epoch, 3 epochs per restart, 2 restarts: step 4 is in restart 0, epoch 2
    first = run_clam(args, **{EXIT_AFTER_BATCHES_ENV: "4"})
    assert first.returncode == EXIT_CODE, first.stderr
    card = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    assert (card["stage"], card["epoch"], card["meta"]["restart"]) == ("pretrain", 1, 0)
    # resumed: 6 steps finish restart 0, 3 make restart 1's first epoch, step 10 falls in its second
    second = run_clam(args + ["--resume"], **{EXIT_AFTER_BATCHES_ENV: "10"})
    assert second.returncode == EXIT_CODE, second.stderr
    card = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    assert (card["stage"], card["epoch"], card["meta"]["restart"]) == ("pretrain", 1, 1)
    assert [r["restart"] for r in card["meta"]["restarts"]] == [0]
    # resumed: 6 steps finish restart 1, step 7 falls in fine-tuning epoch 1
    third = run_clam(args + ["--resume"], **{EXIT_AFTER_BATCHES_ENV: "7"})
    assert third.returncode == EXIT_CODE, third.stderr
    card = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    assert (card["stage"], card["epoch"]) == ("finetune", 0)
    last = run_clam(args + ["--resume"])
    assert last.returncode == 0, last.stderr
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name
    ta = json.loads((reference / "model.json").read_text())["training"]
    tb = json.loads((out / "model.json").read_text())["training"]
    assert ta["restarts"] == tb["restarts"] and len(ta["restarts"]) == 2
    assert ta["labels"] == tb["labels"] and ta["pretrain_loss"] == pytest.approx(tb["pretrain_loss"], abs=1e-7)


def test_resume_refuses_a_checkpoint_of_other_settings(scans: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    args = ["train", str(scans), "--out", str(out), *TRAIN_ARGS]
    assert run_clam(args, **{EXIT_AFTER_BATCHES_ENV: "4"}).returncode == EXIT_CODE
    other = run_clam(args + ["--seed", "5", "--resume"])
    assert other.returncode == 2 and re.search(r"other scans or training settings", other.stderr), other.stderr


def test_two_gloo_ranks_match_one_process_and_map_each_scan_once(scans: Path, reference: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    done = run_clam(["train", str(scans), "--out", str(out), *[a for a in TRAIN_ARGS if a != "--no-qc"]], torchrun=2)
    assert done.returncode == 0, done.stderr[-3000:]
    shares = dict(re.findall(r"rank (\d) of 2 read and preprocessed 4 of 8 scans: (size-\d+(?:, size-\d+)*)",
                             done.stderr))
    assert sorted(shares) == ["0", "1"], done.stderr[-3000:]  # each rank read its half of the scans
    halves = [set(shares[r].split(", ")) for r in ("0", "1")]
    assert not halves[0] & halves[1] and halves[0] | halves[1] == {p.stem for p in scans.glob("*.nrrd")}
    assert len(list((out / "report" / "qc").glob("*.png"))) == 8  # each rank drew its scans' QC pictures
    rows = json.loads((out / "report" / "report.json").read_text())["scans"]
    assert rows == json.loads((reference / "report" / "report.json").read_text())["scans"]
    assert json.loads((out / "model.json").read_text())["preprocess"] == \
        json.loads((reference / "model.json").read_text())["preprocess"]
    mean = load_file(str(out / "model.safetensors"))["extra.cohort_mean"]
    assert torch.equal(mean, load_file(str(reference / "model.safetensors"))["extra.cohort_mean"])  # same inputs
    single = json.loads((reference / "model.json").read_text())["training"]
    multi = json.loads((out / "model.json").read_text())["training"]
    assert multi["labels"] == single["labels"]
    assert multi["kmeans_labels"] == single["kmeans_labels"]
    assert multi["pretrain_loss"] == pytest.approx(single["pretrain_loss"], rel=1e-4)
    maps = tmp_path / "maps"
    mapped = run_clam(["map", str(out), str(scans), "--out", str(maps), "--device", "cpu", "--quiet", "--no-qc"],
                      torchrun=2)
    assert mapped.returncode == 0, mapped.stderr[-3000:]
    written = []
    for log in sorted(maps.glob("map-rank*.log")):
        written += re.findall(r" (\S+) done:", log.read_text())
    assert sorted(written) == sorted(p.stem for p in scans.glob("*.nrrd"))  # every scan, each exactly once
    assert len(list(maps.glob("map-rank*.log"))) == 2
    with open(maps / "assignments.csv") as f:
        assert len(f.read().splitlines()) == 9


def test_two_gloo_ranks_share_the_template_registration(scans: Path, tmp_path: Path) -> None:
    args = [*TRAIN_ARGS, "--register", "affine"]
    single = run_clam(["train", str(scans), "--out", str(tmp_path / "one"), *args])
    assert single.returncode == 0, single.stderr[-3000:]
    done = run_clam(["train", str(scans), "--out", str(tmp_path / "two"), *args], torchrun=2)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = re.findall(r"rank (\d) of 2 read and preprocessed 4 of 8 scans; registered (\d+) to the lung template",
                        done.stderr)
    assert sorted(counts) == [("0", "4"), ("1", "4")], done.stderr[-3000:]  # each rank registered its half
    one, two = CLAMModel.load(tmp_path / "one"), CLAMModel.load(tmp_path / "two")
    np.testing.assert_allclose(two.preprocessor_.template_.image, one.preprocessor_.template_.image, atol=1e-6)
    assert np.array_equal(two.preprocessor_.template_.lung, one.preprocessor_.template_.lung)
    single_run = json.loads((tmp_path / "one" / "model.json").read_text())["training"]
    assert json.loads((tmp_path / "two" / "model.json").read_text())["training"]["labels"] == single_run["labels"]
