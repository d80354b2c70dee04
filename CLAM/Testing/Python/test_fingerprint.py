"""Input fingerprints: content hashes of image files, detached headers, DICOM folders and JSON values."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from CLAMLib.fingerprint import Fingerprint, canonical_json, content_hash, fingerprint, scan_files, sha256_json


def _image(value: int = 0) -> sitk.Image:
    return sitk.GetImageFromArray(np.full((4, 5, 6), value, np.int16))


def test_file_fingerprint_is_its_sha256_size_and_mtime(tmp_path: Path) -> None:
    path = tmp_path / "a.nrrd"
    sitk.WriteImage(_image(), str(path))
    fp = fingerprint(path)
    assert fp.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == content_hash(path)
    assert (fp.size, fp.mtime_ns) == (path.stat().st_size, path.stat().st_mtime_ns)
    assert Fingerprint.from_dict(fp.to_dict()) == fp
    os.utime(path, ns=(1, 1))
    touched = fingerprint(path)
    assert touched.sha256 == fp.sha256 and touched.mtime_ns == 1  # same content, other time
    sitk.WriteImage(_image(1), str(path))
    assert fingerprint(path).sha256 != fp.sha256


def test_detached_header_covers_its_data_file(tmp_path: Path) -> None:
    for suffix in (".mhd", ".nhdr"):
        header = tmp_path / f"b{suffix}"
        sitk.WriteImage(_image(), str(header))
        files = scan_files(header)
        assert files[0] == header and len(files) == 2 and files[1].is_file(), files
        before = content_hash(header)
        data = bytearray(files[1].read_bytes())
        data[-1] ^= 1
        files[1].write_bytes(bytes(data))
        assert content_hash(header) != before
        assert fingerprint(header).size == header.stat().st_size + files[1].stat().st_size


def test_folder_hash_covers_names_and_bytes_of_its_files(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.dcm").write_bytes(bytes([i]) * 10)
    (folder / ".DS_Store").write_bytes(b"x")
    (folder / "sub").mkdir()
    assert [p.name for p in scan_files(folder)] == ["0.dcm", "1.dcm", "2.dcm"]
    first = fingerprint(folder)
    assert first.size == 30
    (folder / "sub" / "x.dcm").write_bytes(b"y")  # other folders are other scans
    (folder / ".DS_Store").write_bytes(b"z")
    assert fingerprint(folder).sha256 == first.sha256
    (folder / "2.dcm").rename(folder / "3.dcm")
    assert content_hash(folder) != first.sha256
    (folder / "3.dcm").rename(folder / "2.dcm")
    (folder / "1.dcm").write_bytes(b"\1" * 9 + b"\2")
    assert content_hash(folder) != first.sha256


def test_canonical_json_ignores_key_order_and_layout() -> None:
    a = {"b": [1, 2.5, None], "a": {"y": "é", "x": float("nan")}}
    b = {"a": {"x": float("nan"), "y": "é"}, "b": [1, 2.5, None]}
    assert canonical_json(a) == canonical_json(b) == b'{"a":{"x":NaN,"y":"\\u00e9"},"b":[1,2.5,null]}'
    assert sha256_json(a) == hashlib.sha256(canonical_json(b)).hexdigest()
    assert sha256_json({"k": 1}) != sha256_json({"k": 1.0}) != sha256_json({"k": 2})
