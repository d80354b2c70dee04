"""Preprocessing cache: each scan on its model grid, kept under a key made of the scan's content and the settings.

`clam train`, `clam map` and `clam train --resume` read a scan, find its lungs, crop and resample it once; later runs
with the same scan content, preprocessing settings and preprocessing code find the result under the same key and
skip all of that. The key is the SHA-256 of the scan's content hash (fingerprint.content_hash: a renamed or copied
file hits, an edited one misses), the PreprocessConfig and the sources of the preprocessing module and the modules it uses, so a change to
any of them is a new key. Entries are safetensors files (arrays, geometry and lung volume in its metadata, never a
pickle), written atomically; an unreadable entry counts as absent and is written again.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from . import preprocess
from .fingerprint import content_hash, sha256_file, sha256_json
from .imageio import atomic_path
from .preprocess import Geometry, Gridded, PreprocessConfig

FORMAT = 1
SUFFIX = ".safetensors"


def _code_modules() -> list[str]:
    """The preprocessing module and this package's modules it uses, directly or through one another."""
    package = __name__.rpartition(".")[0]
    names, todo = set(), [preprocess.__name__]
    while todo:
        module = todo.pop()
        if module in names:
            continue
        names.add(module)
        for value in vars(sys.modules[module]).values():
            name = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
            if isinstance(name, str) and name.startswith(package + ".") and name in sys.modules:
                todo.append(name)
    return sorted(names)


def _code_hash() -> str:
    """SHA-256 of the sources of _code_modules."""
    return sha256_json({name: sha256_file(sys.modules[name].__file__) for name in _code_modules()})


_CODE = _code_hash()


@dataclass
class CachedScan:
    """A scan's preprocessing up to the model grid (before registration and normalisation), its lung volume in
    litres (NaN for 2D models), the scan id it was made under, its lung-mask QC picture (PNG), if one was made, and
    its acquisition and anatomy fields (acquisition.scan_record), if they were recorded."""

    grid: Gridded
    lung_volume_l: float
    scan_id: str
    qc_png: Optional[bytes] = None
    acquisition: Optional[dict] = None


class PreprocessCache:
    """A folder of CachedScan entries, or a cache that keeps nothing when folder is None (--no-cache)."""

    def __init__(self, folder: Optional[Union[str, os.PathLike]]) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.hits = 0
        self.misses = 0

    def key(self, scan_path: Union[str, os.PathLike], config: PreprocessConfig) -> str:
        """The entry key of a scan under these settings (reads the whole scan once, to hash it)."""
        return sha256_json({"format": FORMAT, "scan": content_hash(scan_path), "config": asdict(config),
                            "code": _CODE})

    def path(self, key: str) -> Path:
        """The file of an entry."""
        if self.folder is None:
            raise ValueError("this cache keeps nothing")
        return self.folder / f"{key}{SUFFIX}"

    def load(self, key: str) -> Optional[CachedScan]:
        """The entry under key, or None when there is none (or the cache is off, or the entry cannot be read)."""
        if self.folder is None or not self.path(key).is_file():
            self.misses += self.folder is not None
            return None
        try:
            with safe_open(str(self.path(key)), framework="numpy") as f:
                meta = f.metadata() or {}
                names = set(f.keys())
                array, lung = f.get_tensor("array"), f.get_tensor("lung").astype(bool)
                qc = f.get_tensor("qc_png").tobytes() if "qc_png" in names else None
            if meta.get("key") != key or int(meta.get("format", -1)) != FORMAT:
                raise ValueError("the entry is not the one its name says")
            grid = Gridded(array, lung, Geometry.from_dict(json.loads(meta["native"])),
                           Geometry.from_dict(json.loads(meta["grid"])))
            acquisition = json.loads(meta["acquisition"]) if "acquisition" in meta else None
            entry = CachedScan(grid, float(meta["lung_volume_l"]), meta["scan_id"], qc, acquisition)
        except (OSError, SafetensorError, KeyError, ValueError, TypeError):
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def store(self, key: str, entry: CachedScan) -> None:
        """Write an entry atomically (nothing when the cache is off)."""
        if self.folder is None:
            return
        tensors = {"array": np.ascontiguousarray(entry.grid.array, dtype=np.float32),
                   "lung": np.ascontiguousarray(entry.grid.lung, dtype=np.uint8)}
        if entry.qc_png is not None:
            tensors["qc_png"] = np.frombuffer(entry.qc_png, dtype=np.uint8).copy()
        volume = entry.lung_volume_l
        meta = {"format": str(FORMAT), "key": key, "scan_id": entry.scan_id,
                "lung_volume_l": "nan" if math.isnan(volume) else repr(volume),
                "native": json.dumps(entry.grid.native.to_dict()), "grid": json.dumps(entry.grid.grid.to_dict())}
        if entry.acquisition is not None:
            meta["acquisition"] = json.dumps(entry.acquisition)
        with atomic_path(self.path(key)) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
