"""`clam` under bad input: one clear line and the right exit code, nothing written outside --out, inputs unchanged."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from CLAMLib.cli import main
from CLAMLib.estimator import CLAMModel
from CLAMLib.imageio import read_image
from CLAMLib.train import EXIT_AFTER_BATCHES_ENV, EXIT_CODE, TrainConfig
from cohort_data import TRAIN_ARGS, run_clam, write_broken_scans, write_phantoms


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Eight phantom scans and a tiny bundle trained on them (grid 16)."""
    root = tmp_path_factory.mktemp("bad_input")
    paths = write_phantoms(root / "good")
    model = CLAMModel(grid=16, train=TrainConfig(k=2, pretrain_epochs=2, finetune_epochs=1, batch_size=4,
                                                 device="cpu"), verbose=False)
    images = [read_image(p) for p in paths]
    model.fit(images)
    model.save(root / "bundle")
    other = CLAMModel(grid=16, train=TrainConfig(k=3, pretrain_epochs=1, finetune_epochs=1, batch_size=4, seed=1,
                                                 device="cpu"), verbose=False)
    other.fit(images)
    other.save(root / "other")
    return {"root": root, "good": paths, "bundle": root / "bundle", "other": root / "other"}


def listing(folder: Path) -> set[str]:
    """Every path under a folder, relative to it."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def digests(paths: list[Path]) -> dict[Path, str]:
    """SHA-256 of every file under the given files and folders."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def one_error(err: str, command: str) -> str:
    """The one error line of a command's stderr (asserting there is exactly one and no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"clam {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


class Sandbox:
    """A work folder whose parent's listing and whose inputs' hashes are compared before and after a command."""

    def __init__(self, tmp_path: Path, inputs: list[Path]) -> None:
        self.parent, self.work = tmp_path, tmp_path / "work"
        self.work.mkdir(exist_ok=True)
        self.out = self.work / "out"
        self.inputs = inputs
        self.before, self.hashes = None, None

    def __enter__(self) -> Sandbox:
        self.before = listing(self.parent)
        self.hashes = digests(self.inputs)
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            return
        after = {p for p in listing(self.parent) if not (p == "work/out" or p.startswith("work/out/"))}
        assert after == self.before, sorted(after ^ self.before)
        assert digests(self.inputs) == self.hashes


UNSAFE_IDS = ["../escape", "../../../x", "/abs/path", ""]


def unsafe_manifest(folder: Path, good: list[Path]) -> Path:
    """A manifest whose ids would lead out of --out (or into OUT/scans itself) if used as folder names."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [f"{name},{path}" for name, path in zip(UNSAFE_IDS, good)]
    rows += [f"ok{i},{path}" for i, path in enumerate(good[len(UNSAFE_IDS):])]
    manifest = folder / "cohort.csv"
    manifest.write_text("id,path\n" + "\n".join(rows) + "\n")
    return manifest


def test_map_keeps_manifest_ids_inside_out(cohort: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    manifest = unsafe_manifest(tmp_path / "work" / "in", cohort["good"][:5])
    with Sandbox(tmp_path, [manifest, *cohort["good"]]) as box:
        rc = main(["map", str(cohort["bundle"]), str(manifest), "--out", str(box.out), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert sorted(p.name for p in (box.out / "scans").iterdir()) == sorted(["escape", "x", "abs_path",
                                                                           cohort["good"][3].stem, "ok0"])
    assert not [p for p in (box.out / "scans").iterdir() if p.is_file()]  # nothing straight into OUT/scans
    warning = next(line for line in err.splitlines() if "'../escape'" in line)
    assert warning.startswith("clam: warning: manifest ") and "is not a safe folder name" in warning
    assert warning.endswith("using 'escape'")


def test_train_keeps_qc_pictures_inside_out(cohort: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    manifest = unsafe_manifest(tmp_path / "work" / "in", cohort["good"])
    args = [a for a in TRAIN_ARGS if a != "--no-qc"]
    with Sandbox(tmp_path, [manifest, *cohort["good"]]) as box:
        rc = main(["train", str(manifest), "--out", str(box.out), *args])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert {p.name for p in (box.out / "report" / "qc").iterdir()} >= {"escape.png", "x.png", "abs_path.png"}


def test_duplicate_manifest_ids_name_the_manifest_fix(cohort: dict, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    manifest = tmp_path / "work" / "cohort.csv"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(f"id,path\na/b,{cohort['good'][0]}\na_b,{cohort['good'][1]}\n")
    with Sandbox(tmp_path, [manifest, *cohort["good"]]) as box:
        rc = main(["map", str(cohort["bundle"]), str(manifest), "--out", str(box.out), "--device", "cpu"])
    line = one_error(capsys.readouterr().err, "map")
    assert rc == 2
    assert "['a_b'] occur more than once" in line and "give each row of the manifest a distinct id" in line
    assert "use a manifest" not in line


def test_links_out_of_the_output_folder_are_refused(cohort: dict, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with Sandbox(tmp_path, [*cohort["good"]]) as box:
        (box.out / "scans").mkdir(parents=True)
        os.symlink(elsewhere, box.out / "scans" / cohort["good"][0].stem)
        rc = main(["map", str(cohort["bundle"]), str(cohort["good"][0]), "--out", str(box.out), "--device", "cpu",
                   "--quiet"])
    line = one_error(capsys.readouterr().err, "map")
    assert rc == 2 and "lies outside the output folder" in line and "choose another --out" in line
    assert not list(elsewhere.iterdir())


@pytest.mark.parametrize("option, values, words", [
    ("--batch-size", ["0"], "argument --batch-size: must be at least 1, not 0"),
    ("--epochs", ["0"], "argument --epochs: must be at least 1, not 0"),
    ("--epochs", ["-1"], "argument --epochs: must be at least 1, not -1"),
    ("--finetune-epochs", ["0"], "argument --finetune-epochs: must be at least 1, not 0"),
    ("--grid", ["20"], "argument --grid: must be a multiple of 8 from 16 to 256, not 20; try 16"),
    ("--grid", ["x"], "argument --grid: 'x' is not a whole number"),
    ("--k-range", ["5", "2"], "argument --k-range: MIN 5 is above MAX 2; give them in order, e.g. --k-range 2 5"),
    ("--k-range", ["1", "4"], "argument --k-range: must be at least 2, not 1"),
    ("--device", ["tpu"], "argument --device: invalid choice: 'tpu'"),
])
def test_train_options_are_checked_when_parsed(cohort: dict, tmp_path: Path, capsys: pytest.CaptureFixture,
                                               option: str, values: list[str], words: str) -> None:
    with Sandbox(tmp_path, cohort["good"]) as box, pytest.raises(SystemExit) as stop:
        main(["train", str(cohort["root"] / "good"), "--out", str(box.out), option, *values])
    assert stop.value.code == 2
    assert words in one_error(capsys.readouterr().err, "train")
    assert not box.out.exists()


def test_demo_subjects_are_checked_when_parsed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with Sandbox(tmp_path, []) as box, pytest.raises(SystemExit) as stop:
        main(["demo", "--subjects", "1", "--out", str(box.out)])
    assert stop.value.code == 2
    line = one_error(capsys.readouterr().err, "demo")
    assert "argument --subjects: must be at least 2, not 1" in line and "n_per_cluster" not in line


@pytest.mark.parametrize("command", ["map", "train"])
@pytest.mark.parametrize("below", [False, True], ids=["out-is-a-file", "out-below-a-file"])
def test_out_blocked_by_a_file_is_one_line(cohort: dict, tmp_path: Path, capsys: pytest.CaptureFixture,
                                           command: str, below: bool) -> None:
    blocker = tmp_path / "work" / "taken.txt"
    blocker.parent.mkdir()
    blocker.write_text("not a folder\n")
    out = blocker / "out" if below else blocker
    with Sandbox(tmp_path, [*cohort["good"], blocker]):
        lead = [str(cohort["bundle"])] if command == "map" else []
        rc = main([command, *lead, str(cohort["root"] / "good"), "--out", str(out), *TRAIN_ARGS[-4:]])
    assert rc == 2
    expected = (f"cannot write into --out {out} (Not a directory); choose a folder you can write to" if below
                else f"--out {out} is a file, not a folder; give a folder")
    assert expected in one_error(capsys.readouterr().err, command)


@pytest.mark.parametrize("command", ["map", "train"])
def test_unwritable_out_is_one_line(cohort: dict, tmp_path: Path, capsys: pytest.CaptureFixture,
                                    monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    import tempfile

    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    out = tmp_path / "work" / "locked"
    out.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "TemporaryFile", refused)  # what a read-only folder does to a user who is not root
    with Sandbox(tmp_path, cohort["good"]):
        lead = [str(cohort["bundle"])] if command == "map" else []
        rc = main([command, *lead, str(cohort["root"] / "good"), "--out", str(out), "--device", "cpu"])
    assert rc == 2
    line = one_error(capsys.readouterr().err, command)
    assert f"cannot write into --out {out} (Permission denied); choose a folder you can write to" in line
    assert not list(out.iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_read_only_out_is_one_line(cohort: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "work" / "locked"
    out.mkdir(parents=True)
    out.chmod(0o555)
    try:
        rc = main(["map", str(cohort["bundle"]), str(cohort["good"][0]), "--out", str(out), "--device", "cpu"])
    finally:
        out.chmod(0o755)
    assert rc == 2
    assert "(Permission denied); choose a folder you can write to" in one_error(capsys.readouterr().err, "map")
    assert not list(out.iterdir())


@pytest.mark.parametrize("command", ["map", "train"])
@pytest.mark.parametrize("device", ["cuda", "gpu"])
def test_missing_gpu_fails_once_before_any_scan(cohort: dict, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch, command: str, device: str) -> None:
    import torch
    from CLAMLib import imageio

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(imageio, "read_image", lambda *a: pytest.fail("a scan was read"))
    with Sandbox(tmp_path, cohort["good"]) as box:
        lead = [str(cohort["bundle"])] if command == "map" else []
        rc = main([command, *lead, str(cohort["root"] / "good"), "--out", str(box.out), "--device", device])
    line = one_error(capsys.readouterr().err, command)
    assert rc == 2 and f"device '{device}' was asked for" in line and "--device auto or cpu" in line
    assert "'mps'" not in line
    assert not (box.out / "scans").exists()


def test_out_inside_the_input_folder_is_not_read_as_scans(cohort: dict, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "work" / "cohort"
    shutil.copytree(cohort["root"] / "good", folder)
    out = folder / "maps"
    args = ["map", str(cohort["bundle"]), str(folder), "--out", str(out), "--device", "cpu", "--quiet", "--no-qc",
            "--clusters", "assigned"]
    hashes = digests([folder])
    assert main(args) == 0
    assert main(args) == 0
    assert {f: h for f, h in digests([folder]).items() if out not in f.parents} == hashes
    capsys.readouterr()
    with open(out / "assignments.csv") as f:
        assert len(f.readlines()) == 1 + len(cohort["good"])
    assert main(["map", str(cohort["bundle"]), str(folder), "--out", str(folder), "--device", "cpu"]) == 2
    line = one_error(capsys.readouterr().err, "map")
    assert "the output folder is the input folder" in line and "choose another --out" in line


def test_checkpoint_is_never_discarded_silently(cohort: dict, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    args = ["train", str(cohort["root"] / "good"), "--out", str(out), *TRAIN_ARGS]
    # 8 scans in batches of 3 = 3 steps per epoch: step 4 falls in restart 0's second epoch
    assert run_clam(args, **{EXIT_AFTER_BATCHES_ENV: "4"}).returncode == EXIT_CODE
    card = (out / "checkpoint" / "checkpoint.json").read_bytes()
    again = run_clam(args)
    assert again.returncode == 2
    line = one_error(again.stderr, "train")
    assert "holds the checkpoint of an earlier, unfinished run; add --resume to continue it, or --restart" in line
    assert (out / "checkpoint" / "checkpoint.json").read_bytes() == card
    resumed = run_clam(args + ["--resume"], **{EXIT_AFTER_BATCHES_ENV: "1"})
    assert resumed.returncode == EXIT_CODE, resumed.stderr
    assert (f"clam train: resuming from the checkpoint in {out / 'checkpoint'}: autoencoder pretraining, restart 1, "
            "1 epoch done") in resumed.stderr
    restarted = run_clam(args + ["--restart"])
    assert restarted.returncode == 0, restarted.stderr
    assert "resuming" not in restarted.stderr and not (out / "checkpoint").exists()


def test_resume_without_a_checkpoint_stops(cohort: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with Sandbox(tmp_path, cohort["good"]) as box:
        rc = main(["train", str(cohort["root"] / "good"), "--out", str(box.out), *TRAIN_ARGS, "--resume"])
    assert rc == 2
    line = one_error(capsys.readouterr().err, "train")
    assert f"--resume: there is no checkpoint in {box.out / 'checkpoint'} to continue; run without --resume" in line
    assert not (box.out / "model.json").exists()


def test_interrupted_training_prints_the_command_to_resume(cohort: dict, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from CLAMLib.train import Checkpoint

    save = Checkpoint.save

    def save_then_stop(self: Checkpoint, *args: object, **kwargs: object) -> None:
        save(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "save", save_then_stop)
    out = tmp_path / "bundle"
    args = ["train", str(cohort["root"] / "good"), "--out", str(out), *TRAIN_ARGS]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"clam train: interrupted; the checkpoint in {out / 'checkpoint'} keeps the last finished epoch; to continue "
        f"run: clam {' '.join(args)} --resume")


def test_broken_scans_are_refused_with_their_cause(cohort: dict, tmp_path: Path,
                                                   capfd: pytest.CaptureFixture) -> None:
    import csv

    broken = write_broken_scans(tmp_path / "work" / "broken", cohort["good"][0])
    good = cohort["good"][:2]
    with Sandbox(tmp_path, [tmp_path / "work" / "broken", *good]) as box:
        rc = main(["map", str(cohort["bundle"]), *map(str, good), str(tmp_path / "work" / "broken"),
                   "--out", str(box.out), "--device", "cpu", "--quiet", "--no-qc"])
    out, err = capfd.readouterr()
    assert rc == 3, err
    with open(box.out / "assignments.csv", newline="") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(broken) | {p.stem for p in good}
    for name, words in broken.items():
        assert rows[name]["status"] == "failed" and words in rows[name]["reason"], rows[name]
        assert f"clam map: {name} failed: " in err
    assert all(rows[p.stem]["status"] == "ok" for p in good)
    assert "Traceback" not in err and "WARNING: In " not in err and "MetaImage:" not in err and "GDCM" not in err


def test_warnings_are_single_clam_lines_in_map_and_train(cohort: dict, tmp_path: Path,
                                                        capfd: pytest.CaptureFixture) -> None:
    import numpy as np
    import SimpleITK as sitk

    folder = tmp_path / "work" / "cohort"
    shutil.copytree(cohort["root"] / "good", folder)
    image = sitk.ReadImage(str(cohort["good"][0]))
    dark = sitk.GetImageFromArray(np.minimum(sitk.GetArrayFromImage(image), -1))  # no voxel above 0 HU
    dark.CopyInformation(image)
    sitk.WriteImage(dark, str(folder / "dark.nrrd"))
    with Sandbox(tmp_path, [folder]) as box:
        rc_map = main(["map", str(cohort["bundle"]), str(folder), "--out", str(box.out / "maps"), "--device", "cpu",
                       "--quiet", "--no-qc", "--clusters", "assigned"])
        map_err = capfd.readouterr().err
        rc_train = main(["train", str(folder), "--out", str(box.out / "bundle"), *TRAIN_ARGS])
        train_err = capfd.readouterr().err
    assert rc_map == 0 and rc_train == 0, map_err + train_err
    for err, prefix in ((map_err, "clam: warning: dark: "), (train_err, "clam: warning: dark: ")):
        lines = [line for line in err.splitlines() if "does not look like CT" in line]
        assert len(lines) == 1 and lines[0].startswith(prefix + "intensities range from"), err
        assert "CTRangeWarning" not in err and ".py:" not in err
    assert "dark warning: intensities range" in (box.out / "maps" / "map.log").read_text()


def test_a_4d_image_is_named_as_several_volumes(cohort: dict, tmp_path: Path) -> None:
    import numpy as np
    import SimpleITK as sitk
    from CLAMLib.errors import InputError
    from CLAMLib.imageio import check_image

    volumes = sitk.JoinSeries([sitk.ReadImage(str(cohort["good"][0]))] * 2)
    with pytest.raises(InputError) as refused:
        check_image(volumes, 3)
    assert "image is 4D" in str(refused.value) and "holds several (e.g. a time series); export a single one" in str(
        refused.value) and "single slice" not in str(refused.value)
    assert np.prod(volumes.GetSize()) > 0


def map_args(bundle: Path, scans: list[Path], out: Path, *extra: str) -> list[str]:
    """A quick `clam map` command line."""
    return ["map", str(bundle), *map(str, scans), "--out", str(out), "--device", "cpu", "--quiet", "--no-qc", *extra]


def test_changed_input_is_mapped_again(cohort: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    folder = tmp_path / "work" / "in"
    folder.mkdir(parents=True)
    scans = [folder / p.name for p in cohort["good"][:2]]
    for src, dst in zip(cohort["good"], scans):
        shutil.copy(src, dst)
    out = tmp_path / "work" / "out"
    assert main(map_args(cohort["bundle"], scans, out)) == 0
    first = json.loads((out / "scans" / scans[0].stem / ".done").read_text())["input"]
    capsys.readouterr()
    os.utime(scans[1], ns=(1, 1))  # touched only: same content, still done
    shutil.copy(cohort["good"][5], scans[0])  # new content under the old name
    assert main(map_args(cohort["bundle"], scans, out)) == 0
    assert "clam map: mapped 1 of 2 scans now, 1 done earlier were skipped; 2 ok, 0 failed" in capsys.readouterr().err
    again = json.loads((out / "scans" / scans[0].stem / ".done").read_text())["input"]
    assert again["sha256"] != first["sha256"] and again["sha256"] == hashlib.sha256(scans[0].read_bytes()).hexdigest()
    log = (out / "map.log").read_text()
    assert f"{scans[1].stem} skipped: done earlier" in log and f"{scans[0].stem} skipped" not in log


def test_a_rerun_that_skips_everything_says_so(cohort: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    scans, out = cohort["good"][:2], tmp_path / "out"
    assert main(map_args(cohort["bundle"], scans, out)) == 0
    assert "clam map: mapped 2 of 2 scans now; 2 ok, 0 failed" in capsys.readouterr().err
    assert main(map_args(cohort["bundle"], scans, out)) == 0
    assert "clam map: mapped 0 of 2 scans now, 2 done earlier were skipped; 2 ok" in capsys.readouterr().err


def test_another_models_outputs_are_refused_or_replaced(cohort: dict, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    import json

    scans = cohort["good"][:3]
    with Sandbox(tmp_path, [*cohort["good"], cohort["bundle"], cohort["other"]]) as box:
        assert main(map_args(cohort["other"], scans, box.out)) == 0  # k = 3
        capsys.readouterr()
        assert main(map_args(cohort["bundle"], scans[:2], box.out)) == 2
        line = one_error(capsys.readouterr().err, "map")
        assert "holds maps of another model (3 scans: " in line and "add --redo to remove them" in line
        assert main(map_args(cohort["bundle"], scans[:2], box.out, "--redo")) == 0
    assert sorted(p.name for p in (box.out / "scans").iterdir()) == sorted(p.stem for p in scans[:2])
    models = {json.loads(m.read_text())["model"] for m in box.out.glob("scans/*/.done")}
    assert len(models) == 1
    assert not list(box.out.glob("scans/*/map_cluster2.nrrd"))  # k = 2 now
    assert {p.name for p in (box.out / "clusters").glob("average_cluster*")} <= {
        f"average_cluster{c}.{x}" for c in (0, 1) for x in ("nrrd", "png")}


def test_partial_files_of_a_killed_run_are_removed(cohort: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    partial = out / "scans" / cohort["good"][0].stem / ".map_cluster0.nrrd.x1y2.tmp"
    partial.mkdir(parents=True)
    (partial / "map_cluster0.nrrd").write_bytes(b"NRRD0004\n")
    assert main(map_args(cohort["bundle"], cohort["good"][:1], out)) == 0
    assert not partial.exists() and not list(out.rglob("*.tmp"))
    bundle = tmp_path / "bundle"
    stale = bundle / ".model.safetensors.a1b2.tmp"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    assert main(["train", str(cohort["root"] / "good"), "--out", str(bundle), *TRAIN_ARGS]) == 0
    assert not stale.exists() and not list(bundle.rglob("*.tmp"))
