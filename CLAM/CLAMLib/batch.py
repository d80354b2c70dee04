"""Cohort mapping: per-scan maps on the native grid, an assignments CSV, per-cluster average maps; resumable.

Layout of the output folder:
    assignments.csv                  id, cluster, q0..q{k-1}, lung_volume_l, status, reason (one row per scan)
    model_card.json                  the model's card, its bundle folder and the map settings
    map.log (map-rank{r}.log)        one line per scan: done, skipped or failed with the reason
    scans/<id>/map_cluster{c}.nrrd   map of cluster c on the scan's exact geometry (or .nii.gz), uint8 0..255 with
                                     the scale 1/255 in the header (overlay.read_map gives 0..1)
    scans/<id>/qc.png                lung-mask outline on three orthogonal slices
    scans/<id>/map.png               the assigned cluster's map over the CT through the map's maximum (three views)
    scans/<id>/map_axial.png ...     thumbnails of those views (map_axial, map_coronal, map_sagittal)
    scans/<id>/result.json           soft assignment, cluster, lung volume, source path, acquisition and anatomy
    scans/<id>/grid_maps.safetensors maps on the model grid (for the cluster averages)
    scans/<id>/.done                 written last: the scan is complete for this bundle
    clusters/average_cluster{c}.nrrd|.png  mean map of cluster c over the scans assigned to it (model grid)
    clusters/cohort_mean.nrrd        the model's cohort mean image (model grid; findings channels summed), under the averages
"""

from __future__ import annotations

import csv
import json
import shutil
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .acquisition import scan_record
from .cache import CachedScan, PreprocessCache
from .cohort import Scan
from .distributed import SINGLE, DistContext
from .errors import CLAMError, InputError
from .fingerprint import Fingerprint, content_hash, fingerprint, scan_files
from .imageio import LUNG_VOLUME_L, atomic_path, check_image, read_image, remove_partial, write_image
from .overlay import SCALE, native_map, write_map
from .paths import output_path
from .pictures import average_picture, reduced, scan_pictures
from .preprocess import LUNG_CLOSING_MM, Gridded, LungMask, Preprocessor, find_lungs
from .qc import lung_volume_litres, qc_picture
from .report import CARD

FORMATS = {"nrrd": ".nrrd", "nifti": ".nii.gz"}
DONE = ".done"


@dataclass
class ScanResult:
    """What mapping one scan gave: status ok or failed, and for ok scans the soft assignment."""

    id: str
    status: str
    cluster: int | None = None
    q: list[float] = field(default_factory=list)
    lung_volume_l: float | None = None
    reason: str = ""
    seconds: float = 0.0
    rank: int = 0
    source: str = ""
    acquisition: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return dict(self.__dict__)


def checked_scan(scan: Scan, ndim: int, qc_path: Path | None = None,
                 closing_mm: float = LUNG_CLOSING_MM) -> tuple[sitk.Image, LungMask | None, float]:
    """Read a scan, check it suits an `ndim`-D model and has lungs; write its QC picture; return it, lungs and litres.

    The lungs (None for a 2D model) go to Preprocessor.transform or to_grid, which then need not find them again.
    """
    image = read_image(scan.path)
    check_image(image, ndim)
    if ndim != 3:
        return image, None, float("nan")
    lungs = find_lungs(image, closing_mm)
    mask = lungs.full()
    volume = lung_volume_litres(mask)
    if qc_path is not None:
        qc_picture(image, mask, qc_path, title=scan.id)
    if not LUNG_VOLUME_L[0] <= volume <= LUNG_VOLUME_L[1]:
        raise InputError(f"the lung mask measures {volume:.3g} L, outside the {LUNG_VOLUME_L[0]:g}-{LUNG_VOLUME_L[1]:g} "
                         f"L of a chest CT's lungs; check the voxel spacing in the header and that the scan covers "
                         f"the chest (the QC picture shows the mask)")
    return image, lungs, volume


def gridded_scan(scan: Scan, preprocessor: Preprocessor, qc_path: Path | None = None,
                 cache: PreprocessCache | None = None, record: dict[str, Any] | None = None,
                 seen: Callable[[sitk.Image], None] | None = None) -> tuple[Gridded, float]:
    """A scan on its model grid and its lung volume in litres, taken from the cache when it holds them (then the
    scan is not read again), else made by checked_scan and to_grid and kept there; the QC picture is written.

    A `record` dict given is filled with the scan's acquisition and anatomy fields (acquisition.scan_record), which
    the cache keeps beside the grid; an entry made without them counts as absent then. `seen` is given the
    image when the scan is read.
    """
    config = preprocessor.config
    key = cache.key(scan.path, config) if cache is not None and cache.folder is not None else None
    entry = cache.load(key) if key is not None else None
    if (entry is not None and (qc_path is None or (entry.qc_png is not None and entry.scan_id == scan.id))
            and (record is None or entry.acquisition is not None)):
        if qc_path is not None:
            with atomic_path(qc_path) as tmp:
                Path(tmp).write_bytes(entry.qc_png)
        if record is not None:
            record.update(entry.acquisition)
        return entry.grid, entry.lung_volume_l
    image, lungs, volume = checked_scan(scan, config.ndim, qc_path, config.closing_mm)
    fields = scan_record(image, *((lungs.coarse, lungs.factors) if lungs is not None else ()))
    if record is not None:
        record.update(fields)
    if seen is not None:
        seen(image)
    grid = preprocessor.to_grid(image, lungs)
    if key is not None:
        qc = qc_path.read_bytes() if qc_path is not None and qc_path.is_file() else None
        cache.store(key, CachedScan(grid, volume, scan.id, qc, fields))
    return grid, volume


@contextmanager
def warnings_of(scan: Scan, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Collect the warnings raised for one scan: each one logged; CLAM's own passed on once, as 'ID: message'."""
    own, kept = Path(__file__).parent, []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            seen = set()
            for w in caught:
                text = " ".join(str(w.message).split())
                if log is not None:
                    log(f"{scan.id} warning: {text}")
                if Path(w.filename).parent == own and text not in seen:
                    seen.add(text)
                    kept.append((f"{scan.id}: {text}", w.category))
    for text, category in kept:
        warnings.warn(text, category, stacklevel=3)


def _reason(exc: BaseException) -> str:
    """One line naming what went wrong."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if isinstance(exc, CLAMError) else f"{type(exc).__name__}: {text}"


class CohortMapper:
    """Maps the scans of a cohort with a fitted CLAMModel into an output folder; safe to rerun and to shard."""

    def __init__(self, model: Any, out: str | Path, fmt: str = "nrrd", method: str = "default",
                 clusters: str = "all", qc: bool = True, device: str | None = None,
                 dist: DistContext | None = None, verbose: bool = True, cache: PreprocessCache | None = None,
                 bundle: str | Path | None = None) -> None:
        if fmt not in FORMATS:
            raise InputError(f"unknown map format {fmt!r}; use one of {', '.join(FORMATS)}.")
        self.model, self.out, self.fmt, self.method = model, Path(out), fmt, method
        self.clusters, self.qc, self.device = clusters, qc, device
        self.dist = dist or SINGLE
        self.verbose = verbose
        self.cache = cache
        self.bundle = None if bundle is None else Path(bundle).resolve()
        self.model_id = _model_id(model)
        self.mapped = self.skipped = 0
        self.log_path = output_path(self.out, "map.log" if not self.dist.active else f"map-rank{self.dist.rank}.log")

    def folder(self, scan: Scan) -> Path:
        """Output folder of one scan, checked to lie inside the output folder."""
        return output_path(self.out, "scans", scan.id)

    def is_done(self, scan: Scan) -> bool:
        """True when the scan was completed earlier with the same bundle and settings, from the same input."""
        marker = self.folder(scan) / DONE
        if not marker.is_file() or not (self.folder(scan) / "result.json").is_file():
            return False
        try:
            done = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return done.get("model") == self.model_id + self._settings() and _same_input(scan.path, done.get("input"))

    def other_models(self) -> list[str]:
        """Ids of the scan folders under OUT/scans that a done marker says another model wrote."""
        found = []
        for marker in sorted(self.out.glob(f"scans/*/{DONE}")):
            try:
                model = str(json.loads(marker.read_text()).get("model", "")).split("|")[0]
            except (OSError, json.JSONDecodeError, AttributeError):
                continue
            if model != self.model_id:
                found.append(marker.parent.name)
        return found

    def _clear(self, redo: bool) -> None:
        """Refuse (or, with redo, remove) another model's outputs; remove partial files of an interrupted run."""
        others = self.other_models()
        if others and not redo:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise InputError(f"{self.out} holds maps of another model ({len(others)} scans: {shown}); choose "
                             f"another --out, or add --redo to remove them and map again with this model")
        self.dist.barrier()  # every rank has looked before rank 0 removes anything
        if self.dist.main:
            for name in others:  # their cluster averages go when this run writes its own
                shutil.rmtree(output_path(self.out, "scans", name))
            remove_partial(self.out)
        self.dist.barrier()

    def _settings(self) -> str:
        return f"|{self.method}|{self.clusters}|{self.fmt}"

    def _log(self, text: str) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(f"{datetime.now().isoformat(timespec='seconds')} {text}\n")

    def map_scan(self, scan: Scan) -> ScanResult:
        """Map one scan, writing its outputs (done marker last); a bad scan gives a failed result, not an error."""
        start = time.perf_counter()
        folder = self.folder(scan)
        source = None
        with warnings_of(scan, self._log):
            try:
                source = fingerprint(scan.path)
                result = self._map(scan, folder)
            except (CLAMError, RuntimeError, OSError, ValueError, MemoryError) as exc:
                result = ScanResult(scan.id, "failed", reason=_reason(exc), rank=self.dist.rank,
                                    source=str(Path(scan.path).absolute()))
                if not isinstance(exc, CLAMError):
                    self._log(f"{scan.id} traceback: {traceback.format_exc(limit=3)!r}")
        result.seconds = round(time.perf_counter() - start, 3)
        with atomic_path(folder / "result.json") as tmp:
            Path(tmp).write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        if result.status == "ok":
            with atomic_path(folder / DONE) as tmp:
                Path(tmp).write_text(json.dumps({"model": self.model_id + self._settings(), "id": scan.id,
                                                 "source": str(scan.path), "input": source.to_dict()}) + "\n")
            self._log(f"{scan.id} done: cluster {result.cluster}, lung {result.lung_volume_l:.2f} L, "
                      f"{result.seconds:.1f} s, rank {self.dist.rank}")
        else:
            (folder / DONE).unlink(missing_ok=True)
            self._log(f"{scan.id} FAILED: {result.reason} (source {scan.path})")
        return result

    def _map(self, scan: Scan, folder: Path) -> ScanResult:
        from safetensors.numpy import save_file

        from .explain import normalise_map

        model = self.model
        (folder / DONE).unlink(missing_ok=True)
        for old in [*folder.glob("map_cluster*"), folder / "qc.png", folder / "grid_maps.safetensors"]:
            old.unlink(missing_ok=True)  # of an earlier model, input or --format
        record: dict[str, Any] = {}
        anatomy: list[sitk.Image] = []  # the scan as read, binned, for its map picture
        grid, volume = gridded_scan(scan, model.preprocessor_, folder / "qc.png" if self.qc else None, self.cache,
                                    record, seen=lambda image: anatomy.append(reduced(image)))
        prepared = model.preprocessor_.finish(grid)  # maps are resampled from the prepared geometry alone
        q, maps = model.explain([prepared], self.method, self.device)
        q, maps = q[0], maps[0]
        assignment = int(q.argmax())
        chosen = model.chosen_clusters(self.clusters, assignment)
        grid = {}
        for c in chosen:
            m = normalise_map(maps[c])
            grid[f"cluster{c}"] = m.astype(np.float16)
            overlay = native_map(model.preprocessor_, m, prepared)
            write_map(overlay, folder / f"map_cluster{c}{FORMATS[self.fmt]}")
            if c == assignment:
                ct = anatomy[0] if anatomy else reduced(read_image(scan.path))  # a cached scan was not read
                scan_pictures(ct, sitk.Cast(reduced(overlay), sitk.sitkFloat32) * SCALE, folder,
                              f"{scan.id}: map of cluster {c} (q {q[c]:.2f})")
            del overlay
        with atomic_path(folder / "grid_maps.safetensors") as tmp:
            save_file(grid, str(tmp))
        return ScanResult(scan.id, "ok", assignment, [float(v) for v in q], float(volume), rank=self.dist.rank,
                          source=str(Path(scan.path).absolute()), acquisition=record)

    def run(self, scans: Sequence[Scan], redo: bool = False,
            progress: Callable[[float, str, str], None] | None = None) -> list[ScanResult]:
        """Map this rank's share of the scans (skipping done ones), then on rank 0 write the CSV and averages.

        progress(fraction, stage, message) is called after each scan of this rank and before the averages.
        """
        for scan in scans:  # every scan's folder is checked before anything is written
            self.folder(scan)
        self.out.mkdir(parents=True, exist_ok=True)
        self._clear(redo)
        mine = self.dist.shard(scans)
        mapped = skipped = 0
        from tqdm.auto import tqdm

        with tqdm(total=len(mine), desc="mapping scans", disable=not (self.verbose and self.dist.main),
                  dynamic_ncols=True) as bar:
            for n, scan in enumerate(mine):
                if not redo and self.is_done(scan):
                    self._log(f"{scan.id} skipped: done earlier")
                    message = f"{scan.id}: done earlier"
                    skipped += 1
                else:
                    r = self.map_scan(scan)
                    mapped += 1
                    message = f"{scan.id}: {r.status}"
                    bar.set_postfix_str(message)
                bar.update()
                if progress is not None:
                    progress(0.95 * (n + 1) / len(mine), "mapping", message)
        counts = self.dist.unshard([(mapped, skipped)], self.dist.world)
        self.mapped, self.skipped = sum(c[0] for c in counts), sum(c[1] for c in counts)
        self.dist.barrier()
        results = [self._result(s) for s in scans]
        if self.dist.main:
            if progress is not None:
                progress(0.95, "averages", "writing assignments.csv and the cluster averages")
            self.write_table(results)
            self.write_averages(scans, results)
            self.write_card()
        self.dist.barrier()
        return results

    def _result(self, scan: Scan) -> ScanResult:
        try:
            return ScanResult(**json.loads((self.folder(scan) / "result.json").read_text()))
        except (OSError, json.JSONDecodeError, TypeError):
            return ScanResult(scan.id, "failed", reason="no result was written (the run was interrupted?)")

    def write_table(self, results: Sequence[ScanResult]) -> Path:
        """assignments.csv: id, cluster, q per cluster, lung volume, status and reason for every scan."""
        k = self.model.k
        path = output_path(self.out, "assignments.csv")
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "cluster", *[f"q{c}" for c in range(k)], "lung_volume_l", "status", "reason"])
            for r in results:
                qs = [f"{v:.6f}" for v in r.q] if r.q else [""] * k
                vol = "" if r.lung_volume_l is None else f"{r.lung_volume_l:.3f}"
                w.writerow([r.id, "" if r.cluster is None else r.cluster, *qs, vol, r.status, r.reason])
        return path

    def write_card(self) -> Path:
        """model_card.json: the model's card, where its bundle is and the map settings, for the cohort report."""
        card = {"model": None if self.bundle is None else str(self.bundle), "card": self.model.card,
                "method": self.method, "clusters": self.clusters, "format": self.fmt}
        path = output_path(self.out, CARD)
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(card, indent=1, default=str) + "\n")
        return path

    def write_averages(self, scans: Sequence[Scan], results: Sequence[ScanResult]) -> list[Path]:
        """Mean map of each cluster over the scans assigned to it, on the model grid (NRRD and PNG)."""
        from safetensors.numpy import load_file

        k, written = self.model.k, []
        sums: dict[int, np.ndarray] = {}
        counts = np.zeros(k, dtype=int)
        for scan, r in zip(scans, results):
            if r.status != "ok":
                continue
            path = self.folder(scan) / "grid_maps.safetensors"
            if not path.is_file():
                continue
            maps = load_file(str(path))
            key = f"cluster{r.cluster}"
            if key in maps:
                sums[r.cluster] = sums.get(r.cluster, 0) + maps[key].astype(np.float32)
                counts[r.cluster] += 1
        kept = {f"average_cluster{c}{suffix}" for c in sums for suffix in (".nrrd", ".png")}
        for old in self.out.glob("clusters/average_cluster*"):
            if old.name not in kept:
                old.unlink()  # a cluster without scans this time
        base = getattr(self.model, "cohort_mean_", None)
        if base is not None:
            base = np.asarray(base, dtype=np.float32)
            if base.ndim == self.model.preprocessor_.config.ndim + 1:  # findings channels: shown summed
                base = base.sum(0)
        for c, total in sorted(sums.items()):
            mean = (total / counts[c]).astype(np.float32)
            target = output_path(self.out, "clusters", f"average_cluster{c}.nrrd")
            write_image(sitk.GetImageFromArray(mean), target)
            average_picture(mean, target.with_suffix(".png"), f"cluster {c}: mean map over {counts[c]} scans", base)
            written.append(target)
        if base is not None and written:
            target = output_path(self.out, "clusters", "cohort_mean.nrrd")
            write_image(sitk.GetImageFromArray(base), target)
        return written


def _same_input(path: Path, recorded: Any) -> bool:
    """True when a scan's input is the one a done marker recorded: same size and time, or else the same content."""
    try:
        then = Fingerprint.from_dict(recorded)
        stats = [f.stat() for f in scan_files(path)]
        size, mtime = sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)
        if size != then.size:
            return False
        return mtime == then.mtime_ns or content_hash(path) == then.sha256
    except (OSError, KeyError, ValueError, TypeError):
        return False


def _model_id(model: Any) -> str:
    """An identity of the fitted model: its bundle's hash, or the SHA-256 of its weights and preprocessing constants."""
    import hashlib

    if getattr(model, "bundle_sha256_", None):
        return model.bundle_sha256_[:16]
    h = hashlib.sha256()
    for name, value in model.net_.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().numpy().tobytes())
    h.update(json.dumps(model.preprocessor_.state()[0], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]
