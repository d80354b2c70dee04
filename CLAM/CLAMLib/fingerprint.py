"""Fingerprints of inputs: content hashes of files, scans (a file or a DICOM series folder) and JSON values."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Union

PathLike = Union[str, "os.PathLike[str]"]

_CHUNK = 1 << 20
_DETACHED = {".mhd": re.compile(r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", re.MULTILINE),
             ".nhdr": re.compile(r"^\s*data ?file\s*:\s*(.+?)\s*$", re.MULTILINE | re.IGNORECASE)}
_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True)
class Fingerprint:
    """What identifies a scan's input: total size in bytes, latest modification time (ns) and content SHA-256."""

    size: int
    mtime_ns: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fingerprint:
        """Inverse of to_dict."""
        return cls(int(data["size"]), int(data["mtime_ns"]), str(data["sha256"]))


def sha256_file(path: PathLike) -> str:
    """SHA-256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(value: Any) -> bytes:
    """One byte string per JSON value: keys sorted, no spaces, ASCII escapes, shortest float repr."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def sha256_json(value: Any) -> str:
    """SHA-256 hex digest of a JSON value's canonical form."""
    return hashlib.sha256(canonical_json(value)).hexdigest()


def _detached_data(header: Path) -> list[Path]:
    """The data file named by a detached .mhd or .nhdr header, when it is one file beside the header."""
    pattern = _DETACHED.get(header.suffix.lower())
    if pattern is None:
        return []
    with open(header, "rb") as f:
        text = f.read(_HEADER_BYTES).decode("latin-1")
    match = pattern.search(text)
    if not match or match.group(1).upper() in ("LOCAL", "LIST") or "%" in match.group(1):
        return []
    data = header.parent / match.group(1)
    return [data] if data.is_file() else []


def scan_files(path: PathLike) -> list[Path]:
    """The files whose bytes make up a scan: an image file (plus a detached header's data file) or a DICOM folder's."""
    source = Path(path)
    if source.is_dir():
        return sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
    return [source, *_detached_data(source)]


def content_hash(path: PathLike) -> str:
    """SHA-256 of a scan's content: of the file itself, or of the names and bytes of every file of a folder."""
    source = Path(path)
    files = scan_files(source)
    if not source.is_dir() and len(files) == 1:
        return sha256_file(source)
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode("utf-8", "surrogateescape") + b"\0")
        h.update(bytes.fromhex(sha256_file(f)))
    return h.hexdigest()


def fingerprint(path: PathLike) -> Fingerprint:
    """Size, modification time and content hash of a scan's file or DICOM series folder."""
    files = scan_files(path)
    stats = [f.stat() for f in files]
    return Fingerprint(size=sum(s.st_size for s in stats), mtime_ns=max((s.st_mtime_ns for s in stats), default=0),
                       sha256=content_hash(path))
