"""MRML layer of the CLAM module: volume nodes <-> SimpleITK images, overlays, tables, subject hierarchy.

Imports only MRML classes from ``slicer``, ``slicer.util``, vtk, numpy, SimpleITK and the standard
library (no qt, ctk, slicer.app or ScriptedLoadableModule), so it runs under pytest against the
``slicer-core`` wheel as well as inside the Slicer application.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk
import slicer
import slicer.util
import vtk

logger = logging.getLogger(__name__)

# Node attributes and references that mark CLAM outputs (found again on re-run, never duplicated).
ROLE_ATTRIBUTE = "CLAM.Role"
CLUSTER_ATTRIBUTE = "CLAM.Cluster"
COLORMAP_ATTRIBUTE = "CLAM.Colormap"
INPUT_REFERENCE_ROLE = "CLAMInput"
ROLE_MAP = "map"
ROLE_TABLE = "table"

# Perceptual colour maps: 17 evenly spaced samples of matplotlib's maps, interpolated to 256 entries.
COLORMAPS: dict[str, tuple[str, ...]] = {
    "inferno": ("#000004", "#0b0724", "#210c4a", "#3d0965", "#57106e", "#71196e", "#8a226a", "#a32c61",
                "#bc3754", "#d24644", "#e45a31", "#f1731d", "#f98e09", "#fcac11", "#f9cb35", "#f2ea69",
                "#fcffa4"),
    "viridis": ("#440154", "#48186a", "#472d7b", "#424086", "#3b528b", "#33638d", "#2c728e", "#26828e",
                "#21918c", "#1fa088", "#28ae80", "#3fbc73", "#5ec962", "#84d44b", "#addc30", "#d8e219",
                "#fde725"),
    "magma": ("#000004", "#0a0822", "#1d1147", "#36106b", "#51127c", "#6a1c81", "#832681", "#9c2e7f",
              "#b73779", "#d0416f", "#e75263", "#f56b5c", "#fc8961", "#fea772", "#fec488", "#fde2a3",
              "#fcfdbf"),
    "plasma": ("#0d0887", "#310597", "#4c02a1", "#6600a7", "#7e03a8", "#9511a1", "#aa2395", "#bc3587",
               "#cc4778", "#da5a6a", "#e66c5c", "#f0804e", "#f89540", "#fdac33", "#fdc527", "#f8df25",
               "#f0f921"),
}

# RAS <-> LPS: Slicer works in RAS, ITK in LPS; the two differ by the sign of the first two axes.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class CLAMResult:
    """What one CLAM run produced in the scene: assignment, soft assignment and output nodes."""

    assignment: int
    probabilities: np.ndarray
    mapNodes: dict[int, Any] = field(default_factory=dict)
    tableNode: Any = None

    @property
    def k(self) -> int:
        """Number of clusters of the model."""
        return len(self.probabilities)


def _scene(scene: Any = None) -> Any:
    """The given scene, else slicer.mrmlScene; raises if neither exists."""
    scene = scene if scene is not None else getattr(slicer, "mrmlScene", None)
    if scene is None:
        raise RuntimeError("No MRML scene: set slicer.mrmlScene or pass scene=")
    return scene


# --- geometry ------------------------------------------------------------------------------------

def ijk_to_ras_array(volumeNode: Any) -> np.ndarray:
    """The node's IJK-to-RAS matrix as a 4x4 numpy array."""
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m).copy()


def volume_to_image(volumeNode: Any) -> sitk.Image:
    """A SimpleITK image (LPS geometry) holding a COPY of the node's voxels; the node is not touched."""
    imageData = volumeNode.GetImageData() if volumeNode is not None else None
    if imageData is None or imageData.GetNumberOfPoints() == 0:
        raise ValueError(f"Volume '{volumeNode.GetName() if volumeNode else None}' has no voxels")
    if imageData.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"Volume '{volumeNode.GetName()}' is not a scalar volume (CT expected)")
    array = slicer.util.arrayFromVolume(volumeNode)  # view, shape (K, J, I); GetImageFromArray copies
    image = sitk.GetImageFromArray(array)
    ijkToRas = ijk_to_ras_array(volumeNode)
    spacing = np.linalg.norm(ijkToRas[:3, :3], axis=0)
    directionRas = ijkToRas[:3, :3] / spacing
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in _RAS_TO_LPS @ ijkToRas[:3, 3]])
    image.SetDirection([float(v) for v in (_RAS_TO_LPS @ directionRas).ravel()])
    return image


def image_ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """IJK-to-RAS 4x4 matrix of a SimpleITK image (LPS physical space)."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = _RAS_TO_LPS @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = _RAS_TO_LPS @ np.array(image.GetOrigin(), dtype=float)
    return matrix


def image_to_volume(image: sitk.Image, name: str, reference: Any = None, node: Any = None,
                    scene: Any = None) -> Any:
    """A scalar volume node with the image's voxels and geometry (the reference's exact matrix if given).

    With ``node``, that node is updated in place; otherwise a new node is added to the scene.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("image_to_volume expects a 3D scalar image")
    ijkToRas = image_ijk_to_ras(image)
    if reference is not None:
        refMatrix = ijk_to_ras_array(reference)
        refDims = reference.GetImageData().GetDimensions() if reference.GetImageData() else None
        if refDims is not None and tuple(refDims) != tuple(image.GetSize()):
            raise ValueError(f"Map size {image.GetSize()} differs from the input volume's {tuple(refDims)}")
        tolerance = 1e-4 * max(1.0, float(np.abs(refMatrix).max()))
        if not np.allclose(refMatrix, ijkToRas, atol=tolerance):
            raise ValueError("Map geometry differs from the input volume's geometry (IJK to RAS)")
        ijkToRas = refMatrix  # exactly the input's matrix, no round-off
    scene = _scene(scene)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    else:
        node.SetName(name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijkToRas))
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayViewFromImage(image))
    if reference is not None:
        node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
    return node


# --- colours and display -------------------------------------------------------------------------

def _hex_to_rgb(code: str) -> tuple[float, float, float]:
    """'#rrggbb' to floats in 0..1."""
    code = code.lstrip("#")
    return tuple(int(code[i:i + 2], 16) / 255.0 for i in (0, 2, 4))  # type: ignore[return-value]


def colormap_node(name: str = "inferno", scene: Any = None) -> Any:
    """Slicer's own colour table of that name when the scene has it, else a 256-entry copy made once per scene."""
    key = name.lower()
    if key not in COLORMAPS:
        raise ValueError(f"Unknown colour map '{name}'; choose one of {sorted(COLORMAPS)}")
    scene = _scene(scene)
    slicers = scene.GetNodeByID(f"vtkMRMLColorTableNodeFile{key.capitalize()}.txt")  # Slicer's file-based tables
    if slicers is not None:
        return slicers
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        candidate = scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode")
        if candidate.GetAttribute(COLORMAP_ATTRIBUTE) == key:
            return candidate
    anchors = np.array([_hex_to_rgb(c) for c in COLORMAPS[key]])
    positions = np.linspace(0.0, 1.0, len(anchors))
    samples = np.linspace(0.0, 1.0, 256)
    rgb = np.stack([np.interp(samples, positions, anchors[:, c]) for c in range(3)], axis=1)
    table = slicer.vtkMRMLColorTableNode()
    table.SetTypeToUser()
    table.SetNumberOfColors(256)
    for i, (r, g, b) in enumerate(rgb):
        table.SetColor(i, "", float(r), float(g), float(b), 1.0)
    table.SetName(f"CLAM {key.capitalize()}")
    table.SetAttribute(COLORMAP_ATTRIBUTE, key)
    table.SetHideFromEditors(False)
    scene.AddNode(table)
    return table


def slice_composite_nodes(scene: Any = None) -> list:
    """Every slice composite node of the scene (one per slice view)."""
    scene = _scene(scene)
    return [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]


def style_overlay(mapNode: Any, threshold: float = 0.2, colormap: str = "inferno") -> Any:
    """Give a map node its display: colour map, window/level 0..1, values below threshold hidden."""
    scene = mapNode.GetScene()
    if mapNode.GetDisplayNode() is None:
        mapNode.CreateDefaultDisplayNodes()
    display = mapNode.GetDisplayNode()
    wasModifying = display.StartModify()
    display.SetAndObserveColorNodeID(colormap_node(colormap, scene).GetID())
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.SetAutoThreshold(False)
    display.SetApplyThreshold(True)
    display.SetThreshold(float(threshold), 1.0e6)
    display.SetInterpolate(True)
    display.EndModify(wasModifying)
    return display


def show_overlay(mapNode: Any, ctNode: Any, opacity: float = 0.5, threshold: float = 0.2,
                 colormap: str = "inferno") -> None:
    """Style the map and show it as foreground over the CT in every slice view (CT node untouched)."""
    style_overlay(mapNode, threshold, colormap)
    for composite in slice_composite_nodes(mapNode.GetScene()):
        wasModifying = composite.StartModify()
        if ctNode is not None:
            composite.SetBackgroundVolumeID(ctNode.GetID())
        composite.SetForegroundVolumeID(mapNode.GetID())
        composite.SetForegroundOpacity(float(opacity))
        composite.EndModify(wasModifying)


def set_display(mapNodes: Iterable[Any], opacity: float, threshold: float, colormap: str) -> None:
    """Live display update: threshold and colour map of the maps, opacity of the slice views showing one of them."""
    mapNodes = list(mapNodes)
    for node in mapNodes:
        style_overlay(node, threshold, colormap)
    ids = {node.GetID() for node in mapNodes}
    if mapNodes:
        for composite in slice_composite_nodes(mapNodes[0].GetScene()):
            if composite.GetForegroundVolumeID() in ids:
                composite.SetForegroundOpacity(float(opacity))


# --- table ---------------------------------------------------------------------------------------

def write_assignments_table(probabilities: Sequence[float], assignment: int, node: Any = None,
                            name: str = "CLAM assignments", scene: Any = None) -> Any:
    """A table node with one row per cluster: cluster, soft assignment q, assigned (updated in place)."""
    probabilities = np.asarray(probabilities, dtype=float).ravel()
    if node is None:
        node = _scene(scene).AddNewNodeByClass("vtkMRMLTableNode", name)
    else:
        node.SetName(name)
    table = vtk.vtkTable()
    cluster = vtk.vtkIntArray()
    cluster.SetName("cluster")
    q = vtk.vtkDoubleArray()
    q.SetName("q")
    assigned = vtk.vtkStringArray()
    assigned.SetName("assigned")
    for c, value in enumerate(probabilities):
        cluster.InsertNextValue(c)
        q.InsertNextValue(float(value))
        assigned.InsertNextValue("yes" if c == int(assignment) else "")
    for column in (cluster, q, assigned):
        table.AddColumn(column)
    node.SetAndObserveTable(table)
    for column, title in (("cluster", "Cluster"), ("q", "Soft assignment q"), ("assigned", "Assigned")):
        node.SetColumnTitle(column, title)
    node.SetColumnDescription("q", "Student-t soft assignment of this scan to the cluster (sums to 1)")
    node.SetUseColumnTitleAsColumnHeader(True)
    node.SetAttribute("CLAM.Assignment", str(int(assignment)))
    return node


# --- finding outputs again, subject hierarchy ----------------------------------------------------

def find_outputs(ctNode: Any, role: str) -> list:
    """CLAM output nodes of the given role ('map' or 'table') made for this input node."""
    scene = ctNode.GetScene()
    className = "vtkMRMLScalarVolumeNode" if role == ROLE_MAP else "vtkMRMLTableNode"
    found = []
    for i in range(scene.GetNumberOfNodesByClass(className)):
        node = scene.GetNthNodeByClass(i, className)
        if node.GetAttribute(ROLE_ATTRIBUTE) == role and node.GetNodeReference(INPUT_REFERENCE_ROLE) is ctNode:
            found.append(node)
    return found


def output_node_ids(scene: Any) -> list[str]:
    """IDs of every CLAM output node of the scene (maps and tables), to keep them out of input selectors."""
    nodes = (scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes()))
    return [node.GetID() for node in nodes if node.GetAttribute(ROLE_ATTRIBUTE)]


def input_volumes(scene: Any) -> list:
    """Scalar volume nodes of the scene that are not CLAM outputs: the candidates for the input CT."""
    nodes = (scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
             for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")))
    return [node for node in nodes if not node.GetAttribute(ROLE_ATTRIBUTE)]


def is_stale_demo_path(path: str | os.PathLike, demo: str | os.PathLike) -> bool:
    """A saved path to the demo model of another installation (Slicer updated, extension moved) that is gone."""
    path = Path(path)
    if path == Path(demo) or (path / "model.json").is_file():
        return False
    return path.parts[-3:] == ("Resources", "Models", "clam-demo") or path.parts[-2:] == ("models", "clam-demo")


def _mark_output(node: Any, ctNode: Any, role: str, cluster: int | None = None) -> None:
    """Tag an output node so that a re-run finds and updates it (the reference survives scene reload)."""
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    if cluster is not None:
        node.SetAttribute(CLUSTER_ATTRIBUTE, str(int(cluster)))
    node.SetNodeReferenceID(INPUT_REFERENCE_ROLE, ctNode.GetID())


def place_beside(nodes: Iterable[Any], ctNode: Any) -> bool:
    """Put output nodes under the input's parent in the subject hierarchy; False if there is no hierarchy."""
    scene = ctNode.GetScene()
    getter = getattr(slicer, "vtkMRMLSubjectHierarchyNode", None)
    shNode = getter.GetSubjectHierarchyNode(scene) if getter is not None else None
    if shNode is None:
        logger.info("CLAM: no subject hierarchy in this scene; outputs are left at the scene level")
        return False
    inputItem = shNode.GetItemByDataNode(ctNode)
    invalid = shNode.GetInvalidItemID()
    parent = shNode.GetItemParent(inputItem) if inputItem != invalid else shNode.GetSceneItemID()
    if parent == invalid:
        parent = shNode.GetSceneItemID()
    for node in nodes:
        item = shNode.GetItemByDataNode(node)
        if item == invalid:
            item = shNode.CreateItem(parent, node)
        elif shNode.GetItemParent(item) != parent:
            shNode.SetItemParent(item, parent)
    return True


def apply_result(ctNode: Any, result: Any, opacity: float = 0.5, threshold: float = 0.2,
                 colormap: str = "inferno", shownCluster: int | None = None) -> CLAMResult:
    """Create or update in place one overlay per mapped cluster and one table; show one map over the CT.

    ``result`` is the engine's explanation (``maps``: {cluster: sitk.Image on the input's geometry},
    ``probabilities``, ``assignment``). Maps of earlier runs for clusters not in this result are removed.
    The input node is never modified.
    """
    scene = ctNode.GetScene()
    maps: Mapping[int, sitk.Image] = getattr(result, "maps", None) or {}
    probabilities = np.asarray(result.probabilities, dtype=float).ravel()
    assignment = int(result.assignment)
    existing = {int(n.GetAttribute(CLUSTER_ATTRIBUTE)): n for n in find_outputs(ctNode, ROLE_MAP)
                if (n.GetAttribute(CLUSTER_ATTRIBUTE) or "").lstrip("-").isdigit()}
    mapNodes: dict[int, Any] = {}
    for cluster in sorted(maps):
        image = maps[cluster]
        if image.GetPixelID() != sitk.sitkFloat32:
            image = sitk.Cast(image, sitk.sitkFloat32)
        name = f"{ctNode.GetName()} CLAM cluster {int(cluster)}"
        node = image_to_volume(image, name, reference=ctNode, node=existing.pop(int(cluster), None), scene=scene)
        _mark_output(node, ctNode, ROLE_MAP, int(cluster))
        style_overlay(node, threshold, colormap)
        mapNodes[int(cluster)] = node
    for stale in existing.values():
        scene.RemoveNode(stale)
    tables = find_outputs(ctNode, ROLE_TABLE)
    for extra in tables[1:]:
        scene.RemoveNode(extra)
    tableNode = write_assignments_table(probabilities, assignment, node=tables[0] if tables else None,
                                        name=f"{ctNode.GetName()} CLAM assignments", scene=scene)
    _mark_output(tableNode, ctNode, ROLE_TABLE)
    place_beside([*mapNodes.values(), tableNode], ctNode)
    if mapNodes:
        shown = shownCluster if shownCluster in mapNodes else (assignment if assignment in mapNodes
                                                               else next(iter(mapNodes)))
        show_overlay(mapNodes[shown], ctNode, opacity, threshold, colormap)
    return CLAMResult(assignment=assignment, probabilities=probabilities, mapNodes=mapNodes, tableNode=tableNode)


# --- model card, training in a background process (standard library only) ----------------------

def model_card_summary(path: str | os.PathLike) -> str:
    """One-paragraph summary of a bundle's card (k, grid, what it was trained on), from model.json only."""
    file = Path(path) / "model.json"
    if not file.is_file():
        return f"No model bundle at {path} (model.json missing)."
    try:
        card = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"Unreadable model.json in {path}: {error}"
    extra = card.get("card") or {}
    grid = (card.get("architecture") or {}).get("grid")
    parts = [f"k = {card.get('k', '?')}", f"grid {grid}" if grid else None,
             f"trained on {extra['trained_on']}" if extra.get("trained_on") else None,
             f"created {str(card['created'])[:10]}" if card.get("created") else None]
    text = "; ".join(p for p in parts if p) + "."
    for key in ("summary", "intended_use", "not_for"):
        if extra.get(key):
            text += f" {extra[key]}"
    return text


def export_volumes(volumeNodes: Iterable[Any], folder: str | os.PathLike) -> list[str]:
    """Write volume nodes as NRRD files (LPS geometry) for a `clam train` run; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, node in enumerate(volumeNodes):
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in node.GetName()) or "volume"
        path = folder / f"{index:03d}_{safe}.nrrd"
        sitk.WriteImage(volume_to_image(node), str(path), useCompression=True)
        paths.append(str(path))
    return paths


def train_command(inputs: Sequence[str], k: int, out: str | os.PathLike, python: str | None = None,
                  extra: Sequence[str] = ()) -> list[str]:
    """The `clam train` command line (run as `python -m CLAMLib.cli`) with JSON progress on stdout."""
    return [python or sys.executable, "-m", "CLAMLib.cli", "train", *map(str, inputs), "--k", str(int(k)),
            "--out", str(out), "--progress-json", *extra]


def popen_options(windows: bool | None = None) -> dict[str, Any]:
    """Its own process group (so that cancel reaches its children) and, on Windows, no console window.

    The console is hidden as slicer.util.launchConsoleProcess hides it (STARTF_USESHOWWINDOW, SW_HIDE).
    """
    if not (os.name == "nt" if windows is None else windows):
        return {"start_new_session": True}
    info = subprocess.STARTUPINFO()  # type: ignore[attr-defined]
    info.dwFlags |= 1  # STARTF_USESHOWWINDOW
    info.wShowWindow = 0  # SW_HIDE
    return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP, "startupinfo": info}  # type: ignore[attr-defined]


class BackgroundProcess:
    """A child process whose stdout is read by a thread; poll() from a GUI timer, cancel() kills its tree."""

    def __init__(self, command: Sequence[str], cwd: str | None = None, env: dict | None = None) -> None:
        """Start the command at once (own process group, so cancel reaches its children)."""
        self.command = list(command)
        self.progress = 0.0
        self.stage = ""
        self.message = ""
        self.cancelled = False
        self._lines: list[str] = []
        self._lock = threading.Lock()
        # any byte the child prints is read (undecodable ones replaced), so the pipe is always drained
        self.process = subprocess.Popen(self.command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                        encoding="utf-8", errors="replace", bufsize=1, **popen_options())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        """Reader thread: collect stdout lines until the pipe closes."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._lock:
                self._lines.append(line.rstrip("\n"))

    def poll(self) -> tuple[list[str], int | None]:
        """New log lines since the last poll (progress fields updated) and the exit code (None if running)."""
        with self._lock:
            lines, self._lines = self._lines, []
        log = []
        for line in lines:
            record = None
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
            if isinstance(record, dict) and "progress" in record:
                self.progress = float(record.get("progress") or 0.0)
                self.stage = str(record.get("stage", self.stage))
                self.message = str(record.get("message", ""))
                log.append(f"[{self.stage}] {self.message}" if self.message else f"[{self.stage}]")
            else:
                log.append(line)
        code = self.process.poll()
        if code is not None and self._reader.is_alive():
            return log, None  # wait for the reader to drain the pipe before reporting the end
        return log, code

    def cancel(self, grace: float = 5.0) -> None:
        """Stop the process and every child it started (terminate, then kill after a grace period)."""
        self.cancelled = True
        if self.process.poll() is not None:
            return
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)], check=False,
                           capture_output=True)
        else:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.process.pid, sig)  # the group: children die with the parent
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
        self.process.wait()


ProgressCallback = Callable[[float, str], None]
