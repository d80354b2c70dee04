"""`clam` under bad input: one clear line and the right exit code, nothing written outside --out, inputs unchanged."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from CLAMLib.cli import main
from CLAMLib.estimator import CLAMModel
from CLAMLib.imageio import read_image
from CLAMLib.train import TrainConfig
from cohort_data import TRAIN_ARGS, write_phantoms


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Eight phantom scans and a tiny bundle trained on them (grid 16)."""
    root = tmp_path_factory.mktemp("bad_input")
    paths = write_phantoms(root / "good")
    model = CLAMModel(grid=16, train=TrainConfig(k=2, pretrain_epochs=2, finetune_epochs=1, batch_size=4,
                                                 device="cpu"), verbose=False)
    model.fit([read_image(p) for p in paths])
    model.save(root / "bundle")
    return {"root": root, "good": paths, "bundle": root / "bundle"}


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
