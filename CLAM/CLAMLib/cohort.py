"""Finding the scans of a cohort: image files and DICOM series folders, or a CSV manifest, each with a stable id."""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterable, Sequence, Union

from .errors import InputError
from .paths import safe_id

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass(frozen=True)
class Scan:
    """One scan of a cohort: a stable id, safe as one folder name (made so on creation), and where it is."""

    id: str
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", safe_id(self.id, fallback=_stem(Path(self.path).name)))


def _stem(name: str) -> str:
    """A file or folder name (or a relative path) without its image suffix."""
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _scan_id(path: Path, root: Path) -> str:
    rel = path.relative_to(root) if path != root and root in path.parents else Path(path.name)
    return safe_id(_stem(str(rel)))


def _is_dicom_folder(folder: Path) -> bool:
    for f in folder.iterdir():
        if f.is_file():
            if f.suffix.lower() == ".dcm":
                return True
            with open(f, "rb") as fh:
                head = fh.read(132)
            if head[128:132] == b"DICM":
                return True
    return False


def _from_folder(folder: Path, outputs: Sequence[Path] = ()) -> list[Scan]:
    scans = []
    skipped = [o.resolve() for o in outputs]
    for path in sorted(folder.rglob("*")):
        if any(o == path.resolve() or o in path.resolve().parents for o in skipped):
            continue
        if path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES):
            scans.append(Scan(_scan_id(path, folder), path))
        elif path.is_dir() and _is_dicom_folder(path):
            scans.append(Scan(_scan_id(path, folder), path))
    if _is_dicom_folder(folder):
        scans.append(Scan(_scan_id(folder, folder.parent), folder))
    return scans


def _from_manifest(path: Path) -> list[Scan]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"id", "path"} <= set(rows[0]):
        raise InputError(f"manifest {path} needs a header with the columns 'id' and 'path' and one row per scan.")
    scans = []
    for line, row in enumerate(rows, start=2):
        given, where = (row.get("id") or "").strip(), (row.get("path") or "").strip()
        if not where:
            raise InputError(f"manifest {path}, line {line}: the path is empty; give each row an id and a path.")
        scan = Scan(given, (path.parent / where).resolve())
        if scan.id != given:
            warnings.warn(f"manifest {path}, line {line}: id {given!r} is not a safe folder name (letters, digits, "
                          f"'.', '_' and '-', not empty, no leading dot); using {scan.id!r}", stacklevel=2)
        scans.append(scan)
    return scans


def _excluded(scan: Scan, root: Path | None, exclude: Sequence[str]) -> bool:
    """True when the scan's file or folder name, or its path under `root` (else as given), matches a pattern."""
    shown = (scan.path.relative_to(root) if root is not None else scan.path).as_posix()
    return any(fnmatch(scan.path.name, pattern) or fnmatch(shown, pattern) for pattern in exclude)


def find_scans(inputs: Iterable[Union[str, Path]], exclude: Sequence[str] = (),
               outputs: Sequence[Union[str, Path]] = ()) -> list[Scan]:
    """Scans named by files, DICOM series folders, folders searched recursively, or CSV manifests (id, path).

    Scans whose file or folder name, or path under a folder given, matches an `exclude` pattern (fnmatch style,
    e.g. '*_label.nrrd') are left out, and so are the `outputs` folders (e.g. --out inside an input folder).
    """
    items = [Path(item) for item in inputs]
    scans: list[Scan] = []
    for item in items:
        if not item.exists():
            raise InputError(f"{item} does not exist; give image files, DICOM folders, folders of scans or a CSV.")
        root = None
        if item.is_file() and item.suffix.lower() == ".csv":
            found = _from_manifest(item)
        elif item.is_file():
            found = [Scan(_scan_id(item, item.parent), item)]
        else:
            if any(Path(o).resolve() == item.resolve() for o in outputs):
                raise InputError(f"the output folder is the input folder {item}: the outputs would be read as scans "
                                 f"on the next run; choose another --out (a folder inside {item} is fine)")
            found, root = _from_folder(item, [Path(o) for o in outputs]), item
            if not found:
                raise InputError(f"no scans (NIfTI, NRRD, MHA or DICOM series) found under {item}.")
        scans.extend(scan for scan in found if not _excluded(scan, root, exclude))
    if exclude and not scans:
        raise InputError(f"no scans left: every scan found matches an exclude pattern "
                         f"({', '.join(map(repr, exclude))}); loosen or remove the patterns.")
    ids = [s.id for s in scans]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        manifests = any(item.suffix.lower() == ".csv" for item in items)
        fix = ("give each row of the manifest a distinct id" if manifests else
               "give each scan a distinct name, or list them in a CSV manifest with columns id,path")
        raise InputError(f"scan ids {dupes} occur more than once (the output folders are named by id); {fix}.")
    return scans
