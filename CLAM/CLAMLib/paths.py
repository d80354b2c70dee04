"""Path safety: scan ids that are safe folder names, and output paths that stay inside the output folder."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Union

from .errors import InputError

PathLike = Union[str, "os.PathLike[str]"]

MAX_ID_LENGTH = 120
"""Longest scan id; longer names keep their first characters and gain a short hash, so they stay distinct."""

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def safe_id(text: str, fallback: str = "scan") -> str:
    """`text` as a scan id usable as one folder name on any system: [A-Za-z0-9._-], no leading dot, never empty."""
    name = _UNSAFE.sub("_", str(text)).lstrip("._").rstrip("._")
    if not name:
        return safe_id(fallback) if fallback else "scan"
    if len(name) > MAX_ID_LENGTH:
        digest = hashlib.sha256(str(text).encode("utf-8", "surrogateescape")).hexdigest()[:8]
        name = f"{name[: MAX_ID_LENGTH - 9].rstrip('._')}_{digest}"
    if name.split(".")[0].upper() in _RESERVED:
        name += "_"
    return name


def is_safe_id(text: str) -> bool:
    """True when `text` is already a safe scan id (safe_id leaves it unchanged)."""
    return bool(text) and safe_id(text) == text


def is_inside(path: PathLike, root: PathLike) -> bool:
    """True when `path` (following links and '..') lies inside the folder `root` or is `root` itself."""
    target, folder = Path(path).resolve(), Path(root).resolve()
    return target == folder or folder in target.parents


def inside(root: PathLike, path: PathLike) -> Path:
    """`path` unchanged, after checking that it lies inside the output folder `root`; InputError if not."""
    if not is_inside(path, root):
        raise InputError(f"refusing to write {path}: it lies outside the output folder {root} (through '..', an "
                         f"absolute path or a link); CLAM writes only inside --out: remove the link or choose "
                         f"another --out")
    return Path(path)


def output_path(root: PathLike, *parts: str) -> Path:
    """root / parts, checked to lie inside `root`."""
    return inside(root, Path(root).joinpath(*parts))
