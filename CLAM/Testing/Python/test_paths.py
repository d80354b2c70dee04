"""Path safety: scan ids are safe folder names, and output paths are checked to lie inside the output folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from CLAMLib.errors import InputError
from CLAMLib.paths import MAX_ID_LENGTH, inside, is_inside, is_safe_id, output_path, safe_id


@pytest.mark.parametrize("text, expected", [
    ("subject-01", "subject-01"), ("scan.v2", "scan.v2"), ("../escape", "escape"), ("../../../x", "x"),
    ("/abs/path", "abs_path"), ("a/b\\c", "a_b_c"), ("..", "scan"), ("", "scan"), (".", "scan"), ("   ", "scan"),
    (".hidden", "hidden"), ("trailing.", "trailing"), ("Müller 7", "M_ller_7"), ("NUL", "NUL_"), ("con.txt", "con.txt_"),
    ("a\0b", "a_b"), ("C:\\Users\\x", "C_Users_x"),
])
def test_safe_id_makes_one_harmless_path_component(text: str, expected: str) -> None:
    got = safe_id(text)
    assert got == expected
    assert is_safe_id(got) and got not in ("", ".", "..") and "/" not in got and "\\" not in got


def test_safe_id_falls_back_and_keeps_long_names_distinct() -> None:
    assert safe_id("", fallback="lung1") == "lung1"
    assert safe_id("///", fallback="../x") == "x"
    a, b = safe_id("a" * 300 + "1"), safe_id("a" * 300 + "2")
    assert a != b and len(a) == len(b) == MAX_ID_LENGTH and is_safe_id(a)
    assert not is_safe_id("../x") and not is_safe_id("")


def test_inside_refuses_paths_that_leave_the_output_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    assert inside(out, out / "scans" / "a" / "map.nrrd") == out / "scans" / "a" / "map.nrrd"
    assert output_path(out, "scans", "a") == out / "scans" / "a"
    assert is_inside(out, out)
    for bad in (out / ".." / "escape", out / "scans" / ".." / ".." / "x", tmp_path / "elsewhere", Path("/abs/path")):
        with pytest.raises(InputError, match=r"outside the output folder .*choose another --out"):
            inside(out, bad)
    with pytest.raises(InputError):
        output_path(out, "scans", "../../x")
    with pytest.raises(InputError):
        output_path(out, "/abs/path")


def test_inside_follows_links(tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (out / "scans").mkdir(parents=True)
    elsewhere.mkdir()
    os.symlink(elsewhere, out / "scans" / "linked")
    with pytest.raises(InputError, match="link"):
        inside(out, out / "scans" / "linked" / "map.nrrd")
