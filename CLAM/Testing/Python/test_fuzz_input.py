"""Fuzz: `clam map` and `clam train` over good scans mixed with more than 40 kinds of bad input."""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import pytest
from CLAMLib.cli import main
from cohort_data import TRAIN_ARGS, write_fuzz_scans, write_phantoms
from safetensors.numpy import load_file


def listing(folder: Path) -> set[str]:
    """Every path under a folder, relative to it."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under a folder."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


def rows(out: Path) -> dict[str, dict]:
    with open(out / "assignments.csv", newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def test_good_scans_come_out_as_alone_and_every_bad_one_is_named(tmp_path: Path,
                                                                 capfd: pytest.CaptureFixture) -> None:
    work = tmp_path / "work"
    good = write_phantoms(work / "good", n_per_cluster=2)
    mixed = work / "mixed"
    shutil.copytree(work / "good", mixed)
    bad = write_fuzz_scans(mixed, good[0])
    assert len(bad) >= 40
    before, hashes = listing(tmp_path), digests(work)
    alone, together = work / "out" / "alone", work / "out" / "together"
    train_args = [*TRAIN_ARGS[:TRAIN_ARGS.index("--restarts")], "--restarts", "1",
                  *TRAIN_ARGS[TRAIN_ARGS.index("--restarts") + 2:]]
    assert main(["train", str(work / "good"), "--out", str(alone / "bundle"), *train_args]) == 0
    assert main(["train", str(mixed), "--out", str(together / "bundle"), *train_args]) == 0
    train_err = capfd.readouterr().err
    a, b = load_file(str(alone / "bundle" / "model.safetensors")), load_file(str(together / "bundle" /
                                                                                 "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    for name in bad:
        assert f"clam train: skipping {name}: " in train_err, name
    map_args = ["--device", "cpu", "--quiet", "--no-qc", "--clusters", "assigned"]
    assert main(["map", str(alone / "bundle"), str(work / "good"), "--out", str(alone / "maps"), *map_args]) == 0
    assert main(["map", str(alone / "bundle"), str(mixed), "--out", str(together / "maps"), *map_args]) == 3
    map_err = capfd.readouterr().err
    by_id = rows(together / "maps")
    for name, words in bad.items():
        assert by_id[name]["status"] == "failed" and words in by_id[name]["reason"], (name, by_id[name])
        assert f"clam map: {name} failed: " in map_err
    for scan_id, row in rows(alone / "maps").items():
        assert by_id[scan_id] == row
        for m in (alone / "maps" / "scans" / scan_id).glob("map_cluster*"):
            assert m.read_bytes() == (together / "maps" / "scans" / scan_id / m.name).read_bytes()
    for err in (train_err, map_err):
        assert "Traceback" not in err and "ITK ERROR" not in err and "WARNING: In" not in err
        assert all(line.startswith(("clam ", "clam: warning: ", "bundle written")) for line in err.splitlines()), err
    assert {p for p in listing(tmp_path) if not p.startswith("work/out")} == before - {"work/out"}
    assert digests(work) == {**hashes, **{k: v for k, v in digests(work).items() if k.startswith("out/")}}
