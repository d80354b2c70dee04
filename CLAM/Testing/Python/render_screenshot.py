"""Render CLAM's overlay on a synthetic chest CT through real MRML (slicer-core), headless.

    python CLAM/Testing/Python/render_screenshot.py --out CLAM/Resources/Screenshots/CLAM_screenshot.png

The red (axial) slice through a simulated lesion is composited by vtkMRMLSliceLogic: the CT as
background, the CLAM map of the assigned cluster as foreground (colour map, opacity, threshold).
With --bundle, the map comes from that trained model (the engine, CLAMLib); without it, from an
engine-like map peaked at the lesion. The helpers here are shared with test_slicer_mrml.py.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
MODULE_DIR = HERE.parents[1]  # CLAM/ (holds CLAMMRML.py and CLAMLib)
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

import CLAMMRML
import slicer
import slicer.util
import vtk
from vtk.util import numpy_support

SHAPE_KJI = (36, 64, 72)  # array order (slices, rows, columns)
LESION_IJK = (50.0, 30.0, 20.0)


@dataclass
class Viewer:
    """A headless MRML scene with Red/Yellow/Green slice logics."""

    scene: Any
    appLogic: Any
    sliceLogics: dict = field(default_factory=dict)

    def close(self) -> None:
        """Detach logics and clear the scene (avoids a crash at interpreter exit)."""
        for logic in self.sliceLogics.values():
            logic.SetMRMLScene(None)
        self.appLogic.SetMRMLScene(None)
        self.scene.Clear(1)
        if getattr(slicer, "mrmlScene", None) is self.scene:
            slicer.mrmlScene = None


def make_viewer() -> Viewer:
    """A fresh scene (set as slicer.mrmlScene) with default colours and three slice views."""
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    appLogic = slicer.vtkMRMLApplicationLogic()
    appLogic.SetMRMLScene(scene)
    colorLogic = slicer.vtkMRMLColorLogic()
    colorLogic.SetMRMLScene(scene)
    colorLogic.AddDefaultColorNodes()
    colorLogic.SetMRMLScene(None)
    viewer = Viewer(scene, appLogic)
    for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLApplicationLogic(appLogic)
        logic.SetMRMLScene(scene)
        sliceNode = logic.AddSliceNode(name)
        sliceNode.SetOrientation(orientation)
        viewer.sliceLogics[name] = logic
    return viewer


def oblique_ijk_to_ras(angle_deg: float = 20.0, spacing=(0.8, 0.7, 2.5), origin=(-100.0, 120.0, -50.0)) -> np.ndarray:
    """An oblique, anisotropic IJK-to-RAS matrix like a tilted-gantry CT (I, J flipped as in LPS scans)."""
    a, b = math.radians(angle_deg), math.radians(angle_deg / 2)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    matrix = np.eye(4)
    matrix[:3, :3] = rz @ rx @ np.diag([-spacing[0], -spacing[1], spacing[2]])
    matrix[:3, 3] = origin
    return matrix


def phantom_ct(shape=SHAPE_KJI, lesion_ijk=LESION_IJK) -> np.ndarray:
    """A chest-like int16 CT array (K, J, I): soft-tissue body, two lungs, one dense lesion."""
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    nk, nj, ni = shape
    ct = np.full(shape, -1000, np.int16)
    body = ((i - ni / 2) / (ni * 0.47)) ** 2 + ((j - nj / 2) / (nj * 0.42)) ** 2 <= 1
    ct[body] = 40
    for side in (-1, 1):
        lung = (((i - ni / 2 - side * ni * 0.2) / (ni * 0.16)) ** 2 + ((j - nj / 2) / (nj * 0.3)) ** 2
                + ((k - nk / 2) / (nk * 0.6)) ** 2) <= 1
        ct[lung] = -850
    li, lj, lk = lesion_ijk
    lesion = ((i - li) ** 2 + (j - lj) ** 2 + ((k - lk) * 3) ** 2) <= 16
    ct[lesion] = 30
    return ct


def add_ct(scene: Any, ijkToRas: np.ndarray | None = None, name: str = "chest CT") -> Any:
    """Add the phantom CT with the given (default oblique) geometry and a lung window."""
    node = slicer.util.addVolumeFromArray(phantom_ct(), oblique_ijk_to_ras() if ijkToRas is None else ijkToRas,
                                          name=name)
    display = node.GetDisplayNode()
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(1500, -500)
    return node


def ijk_to_ras_point(node: Any, ijk) -> np.ndarray:
    """RAS coordinates of a (possibly fractional) IJK index of a volume node."""
    return (CLAMMRML.ijk_to_ras_array(node) @ np.array([*ijk, 1.0]))[:3]


@dataclass
class FakeExplanation:
    """Engine-like explanation: soft assignment, assigned cluster, maps on the input's geometry."""

    probabilities: np.ndarray
    assignment: int
    maps: dict


def engine_like_result(image: sitk.Image, lesion_ras, k: int = 3, assignment: int = 1,
                       sigma_mm: float = 6.0, clusters=None) -> FakeExplanation:
    """Maps with a Gaussian blob at a RAS point, computed from the image's own LPS geometry."""
    size = np.array(image.GetSize())  # (I, J, K)
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in size[::-1]], indexing="ij")[::-1])
    direction = np.array(image.GetDirection()).reshape(3, 3)
    physical = (direction @ np.diag(image.GetSpacing()) @ idx.reshape(3, -1)).T + np.array(image.GetOrigin())
    lesion_lps = np.array([-lesion_ras[0], -lesion_ras[1], lesion_ras[2]])
    d2 = ((physical - lesion_lps) ** 2).sum(1).reshape(size[::-1])
    maps = {}
    for c in (range(k) if clusters is None else clusters):
        blob = np.exp(-d2 / (2 * sigma_mm ** 2)) * (1.0 if c == assignment else 0.5)
        array = blob.astype(np.float32)
        mapImage = sitk.GetImageFromArray(array)
        mapImage.CopyInformation(image)
        maps[c] = mapImage
    probabilities = np.full(k, 0.2 / max(k - 1, 1))
    probabilities[assignment] = 0.8
    return FakeExplanation(probabilities, assignment, maps)


def render_red_slice(viewer: Viewer, ras_point, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """RGBA (rows top to bottom) of the composited axial slice through a RAS point, and the point's (x, y)."""
    logic = viewer.sliceLogics["Red"]
    sliceNode = logic.GetSliceNode()
    sliceNode.SetDimensions(size, size, 1)
    logic.FitSliceToAll()
    sliceNode.JumpSliceByCentering(*[float(v) for v in ras_point])
    logic.SetSliceOffset(float(ras_point[2]))
    blend = logic.GetBlend()
    blend.Update()
    output = blend.GetOutput()
    nx, ny, _ = output.GetDimensions()
    rgba = numpy_support.vtk_to_numpy(output.GetPointData().GetScalars()).reshape(ny, nx, -1)
    rasToXy = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Invert(sliceNode.GetXYToRAS(), rasToXy)
    xy = np.array(rasToXy.MultiplyPoint([*map(float, ras_point), 1.0])[:2])
    # vtk image rows run bottom-up; flip so row 0 is the top of the view, as on screen
    return rgba[::-1].copy(), np.array([xy[0], ny - 1 - xy[1]])


def overlay_mask(rgba: np.ndarray, min_chroma: int = 40) -> np.ndarray:
    """Pixels carrying overlay colour (the CT alone renders grey: equal red, green, blue)."""
    rgb = rgba[..., :3].astype(int)
    return (rgb.max(-1) - rgb.min(-1)) >= min_chroma


def add_simulated_ct(seed: int = 0) -> tuple[Any, np.ndarray]:
    """A simulated chest CT with a large nodule (clam demo's size scenario) as a volume node, and the lesion's RAS."""
    from CLAMLib.simulate import make_cohort

    cohort = make_cohort("size", n_per_cluster=2, seed=seed)
    subject = next(s for s in cohort.subjects if s.label == 1)
    node = CLAMMRML.image_to_volume(subject.image, "chest CT (simulated)")
    display = node.GetDisplayNode() or (node.CreateDefaultDisplayNodes() or node.GetDisplayNode())
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(1500, -500)
    x, y, z = subject.lesions[0]["centre_mm"]
    return node, np.array([-x, -y, z])


def build_demo(viewer: Viewer, bundle: str | None = None, colormap: str = "inferno"):
    """CT + CLAM outputs in the viewer's scene; returns (ctNode, CLAMResult, lesion RAS).

    With a bundle, the CT is a simulated subject like those the demo model was trained on.
    """
    if bundle:
        from CLAMLib import load_bundle

        ct, lesion_ras = add_simulated_ct()
        explanation = load_bundle(bundle).explain_image(CLAMMRML.volume_to_image(ct), clusters="all")
    else:
        ct = add_ct(viewer.scene)
        lesion_ras = ijk_to_ras_point(ct, LESION_IJK)
        image = CLAMMRML.volume_to_image(ct)
        explanation = engine_like_result(image, lesion_ras)
    result = CLAMMRML.apply_result(ct, explanation, opacity=0.6, threshold=0.2, colormap=colormap)
    return ct, result, lesion_ras


def main(argv: list | None = None) -> int:
    """Write the composited red slice as a PNG (upscaled, lesion centred)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(MODULE_DIR / "Resources" / "Screenshots" / "CLAM_screenshot.png"))
    parser.add_argument("--bundle", default=None, help="model bundle folder (default: engine-like map)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--colormap", default="inferno", choices=sorted(CLAMMRML.COLORMAPS))
    args = parser.parse_args(argv)
    viewer = make_viewer()
    try:
        _, result, lesion_ras = build_demo(viewer, args.bundle, args.colormap)
        rgba, _ = render_red_slice(viewer, lesion_ras, args.size)
    finally:
        viewer.close()
    writer = vtk.vtkPNGWriter()
    image = vtk.vtkImageData()
    image.SetDimensions(rgba.shape[1], rgba.shape[0], 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(rgba[::-1, :, :3].reshape(-1, 3).copy(), deep=True))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    writer.SetFileName(str(args.out))
    writer.SetInputData(image)
    writer.Write()
    q = ", ".join(f"{p:.2f}" for p in result.probabilities)
    print(f"wrote {args.out}: assigned cluster {result.assignment}, q = [{q}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
