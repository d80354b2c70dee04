"""Cohort browser of the CLAM module: a `clam map` folder's scans one at a time, each with its map, in the scene.

Imports only MRML classes from ``slicer``, ``slicer.util``, vtk, numpy, SimpleITK, CLAMMRML and CLAMLib's
table and image reading (no qt, no slicer.app), so it runs under pytest against ``slicer-core`` as well as in
Slicer. Only one scan's nodes are in the scene at a time: showing another removes them, so memory stays bounded
over hundreds of scans.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import CLAMMRML
import numpy as np
import SimpleITK as sitk
import slicer
import slicer.util
from CLAMLib.cohort_table import CohortTable, ScanRow, step
from CLAMLib.errors import InputError
from CLAMLib.imageio import read_image

MAP_SCALE_KEY = "clam_map_scale"  # CLAMLib.overlay.SCALE_KEY
COHORT_ATTRIBUTE = "CLAM.Cohort"  # marks the nodes the browser made (removed when it shows another scan)


@dataclass
class ShownScan:
    """What the browser shows now: the scan (or cluster average), its map node and where the views are centred."""

    id: str
    ctNode: Any
    mapNode: Any
    cluster: int | None
    centre: np.ndarray | None
    row: ScanRow | None = None
    nodes: list = field(default_factory=list)


class CohortBrowser:
    """Open a `clam map` folder, filter and sort its scans, and show one scan (CT + one cluster's map) at a time."""

    def __init__(self, scene: Any = None, applicationLogic: Any = None) -> None:
        """A browser on a scene (default slicer.mrmlScene); with an application logic, views are fitted to each CT."""
        self.scene = scene
        self.applicationLogic = applicationLogic
        self.table: CohortTable | None = None
        self.order: list[str] = []
        self.shown: ShownScan | None = None
        self.opacity, self.threshold, self.colormap = 0.5, 0.2, "inferno"

    def _scene(self) -> Any:
        """The browser's scene, else slicer.mrmlScene."""
        return CLAMMRML._scene(self.scene)

    def open(self, folder: str | os.PathLike, clinical: str | os.PathLike | None = None,
             idColumn: str = "id") -> CohortTable:
        """Read the folder's table (and join a clinical CSV); every scan is in the list until a filter is set."""
        self.unload()
        self.table = CohortTable.read(folder, clinical, idColumn)
        self.order = [row.id for row in self.table.rows]
        return self.table

    def _require_table(self) -> CohortTable:
        """The open cohort's table; an error saying how to open one if none is open."""
        if self.table is None:
            raise InputError("no cohort is open: call openCohort(folder) with a `clam map` output folder first")
        return self.table

    def setFilter(self, cluster: int | None = None, status: str | None = None, uncertainBelow: float | None = None,
                  sortColumn: str | None = None, descending: bool = False) -> list[str]:
        """Restrict and order the list that next / previous walk; returns its ids."""
        table = self._require_table()
        rows = table.filtered(cluster, status, uncertainBelow)
        if sortColumn:
            rows = table.sorted(rows, sortColumn, descending)
        self.order = [row.id for row in rows]
        return self.order

    def rows(self) -> list[ScanRow]:
        """The rows of the current (filtered, sorted) list."""
        table = self._require_table()
        return [table.row(i) for i in self.order]

    def unload(self) -> None:
        """Remove every node the browser added for the scan shown (CT, map, their display and storage nodes)."""
        for node in list(self.shown.nodes if self.shown else []):
            self._remove(node)
        self.shown = None

    def _volume(self, image: sitk.Image, name: str, reference: Any = None) -> Any:
        """A volume node of the browser's (removed when it shows another scan)."""
        node = CLAMMRML.image_to_volume(image, name, reference=reference, scene=self._scene())
        node.SetAttribute(COHORT_ATTRIBUTE, "1")
        return node

    def showScan(self, scanId: str, cluster: int | None = None) -> ShownScan:
        """Load a scan from the path its output records, show a cluster's map (default: its own) over it, centre
        the views on the map's maximum, and remove the previous scan's nodes."""
        table = self._require_table()
        row = table.row(scanId)
        if not row.source:
            raise InputError(f"the output does not record where scan {scanId!r} was read from; map it again with "
                             "`clam map --redo` to record it")
        if not Path(row.source).exists():
            raise InputError(f"scan {scanId!r} is no longer at {row.source}; put it back, or map it again from its "
                             "new place")
        mapped = table.mapped_clusters(scanId)
        if cluster is None:
            cluster = row.cluster if row.cluster in mapped else (mapped[0] if mapped else None)
        elif cluster not in mapped:
            raise InputError(f"scan {scanId!r} has no map of cluster {cluster}; its maps: {mapped or 'none'}")
        self.unload()
        image = read_image(row.source)
        ct = self._volume(image, f"{scanId} CT")
        del image
        display = ct.GetDisplayNode() or (ct.CreateDefaultDisplayNodes() or ct.GetDisplayNode())
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(1500, -500)
        self.shown = ShownScan(scanId, ct, None, None, None, row, [ct])
        if cluster is not None:
            self._showMap(cluster)
        else:
            self._layers(ct, None)
        return self.shown

    def showCluster(self, cluster: int) -> ShownScan:
        """Show another cluster's map over the scan shown (replacing the map node)."""
        if self.shown is None or self.shown.row is None:
            raise InputError("no scan is shown: call showScan(id) first")
        table = self._require_table()
        if cluster not in table.mapped_clusters(self.shown.id):
            raise InputError(f"scan {self.shown.id!r} has no map of cluster {cluster}")
        return self._showMap(cluster)

    def _showMap(self, cluster: int) -> ShownScan:
        """Load one cluster's map of the scan shown, put it over the CT and centre the views on its maximum."""
        shown = self.shown
        table = self._require_table()
        image = read_overlay(table.map_path(shown.id, cluster))
        if shown.mapNode is not None:
            self._remove(shown.mapNode)
        node = self._volume(image, f"{shown.id} CLAM cluster {cluster}", reference=shown.ctNode)
        shown.mapNode, shown.cluster = node, cluster
        shown.nodes.append(node)
        self._layers(shown.ctNode, node)
        shown.centre = self.centreOnMaximum(node)
        return shown

    def _remove(self, node: Any) -> None:
        """Remove a node with its display and storage nodes."""
        scene = self._scene()
        displays = [node.GetNthDisplayNode(n) for n in range(node.GetNumberOfDisplayNodes())]
        # the volume first: a volume that loses its display node while in the scene gets a new one
        for extra in (node, *displays, node.GetStorageNode()):
            if extra is not None and extra.GetScene() is scene:
                scene.RemoveNode(extra)
        if self.shown and node in self.shown.nodes:
            self.shown.nodes.remove(node)

    def _layers(self, background: Any, foreground: Any) -> None:
        """CT as background, map as foreground in every slice view; fit the views when the application allows."""
        if foreground is not None:
            CLAMMRML.show_overlay(foreground, background, self.opacity, self.threshold, self.colormap)
        else:
            for composite in CLAMMRML.slice_composite_nodes(self._scene()):
                composite.SetBackgroundVolumeID(background.GetID())
                composite.SetForegroundVolumeID(None)
        if self.applicationLogic is not None:
            self.applicationLogic.FitSliceToAll()

    def centreOnMaximum(self, mapNode: Any) -> np.ndarray:
        """Centre every slice view on the map's highest voxel; returns that point (RAS)."""
        values = slicer.util.arrayFromVolume(mapNode)
        k, j, i = np.unravel_index(int(np.argmax(values)), values.shape)
        ras = (CLAMMRML.ijk_to_ras_array(mapNode) @ np.array([i, j, k, 1.0]))[:3]
        slicer.vtkMRMLSliceNode.JumpAllSlices(self._scene(), *map(float, ras),
                                              slicer.vtkMRMLSliceNode.CenteredJumpSlice)
        return ras

    def next(self, offset: int = 1) -> ShownScan | None:
        """Show the scan `offset` places on in the filtered list (wrapping); None when the list is empty."""
        target = step(self.order, self.shown.id if self.shown and self.shown.row else None, offset)
        return None if target is None else self.showScan(target)

    def previous(self) -> ShownScan | None:
        """Show the scan before the current one in the filtered list."""
        return self.next(-1)

    def showAverage(self, cluster: int) -> ShownScan:
        """The cluster-average map (model grid) over the model's cohort mean image, in place of a scan."""
        table = self._require_table()
        average = table.average_path(cluster)
        if average is None:
            raise InputError(f"no average map of cluster {cluster} in {table.folder / 'clusters'} (no scan was "
                             "assigned to it, or the mapping did not finish)")
        self.unload()
        mean_path = table.cohort_mean_path()
        mapImage = sitk.Cast(read_image(average), sitk.sitkFloat32)
        if mean_path is not None:
            base = self._volume(sitk.Cast(read_image(mean_path), sitk.sitkFloat32), "CLAM cohort mean")
        else:  # outputs made before the mean image was written: the map alone, over an empty grid
            base = self._volume(mapImage * 0, "CLAM cohort mean (not recorded)")
        display = base.GetDisplayNode() or (base.CreateDefaultDisplayNodes() or base.GetDisplayNode())
        display.SetAutoWindowLevel(True)
        node = self._volume(mapImage, f"CLAM cluster {cluster} average", reference=base)
        self.shown = ShownScan(f"average {cluster}", base, node, cluster, None, None, [base, node])
        self._layers(base, node)
        self.shown.centre = self.centreOnMaximum(node)
        return self.shown

    def qcPicture(self) -> Path | None:
        """The lung-mask QC picture of the scan shown, or None."""
        if self.shown is None or self.shown.row is None:
            return None
        return self._require_table().qc_path(self.shown.id)

    def setDisplay(self, opacity: float, threshold: float, colormap: str) -> None:
        """Opacity, threshold and colour map of the map shown (kept for the next scans)."""
        self.opacity, self.threshold, self.colormap = opacity, threshold, colormap
        if self.shown and self.shown.mapNode is not None:
            CLAMMRML.set_display([self.shown.mapNode], opacity, threshold, colormap)


def read_overlay(path: str | os.PathLike) -> sitk.Image:
    """A map file of `clam map` as float32 0..1, as CLAMLib.overlay.read_map reads it (uint8 NRRD files carry their
    scale under MAP_SCALE_KEY, NIfTI files in scl_slope, which ITK applies), without importing the engine's scipy."""
    image = sitk.ReadImage(str(path))
    if image.HasMetaDataKey(MAP_SCALE_KEY):
        image = sitk.Cast(image, sitk.sitkFloat32) * float(image.GetMetaData(MAP_SCALE_KEY))
    return sitk.Cast(image, sitk.sitkFloat32)


def map_command(bundle: str | os.PathLike, inputs: Sequence[str], out: str | os.PathLike,
                python: str, extra: Sequence[str] = ()) -> list[str]:
    """The `clam map` command line (run as `python -m CLAMLib.cli`) with JSON progress on stdout."""
    return [python, "-m", "CLAMLib.cli", "map", str(bundle), *map(str, inputs), "--out", str(out),
            "--progress-json", *extra]
