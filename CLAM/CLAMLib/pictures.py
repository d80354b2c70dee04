"""Pictures of maps: a scan's map over its CT (full size and thumbnails), a cluster's mean map over the cohort mean."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .imageio import atomic_path

HU_WINDOW = (-1000.0, 400.0)
"""CT values shown from black to white when the image is in Hounsfield units (lung to soft tissue)."""
LARGEST = 256
"""Most voxels along any axis of the CT a scan's picture is drawn from (larger scans are binned down)."""
THUMBNAIL = 160
"""Pixels of a thumbnail's longer side."""
OPACITY = 0.8
"""Opacity of the map's colour where the map is at its top; it fades to clear where the map is zero."""
COLORMAP = "inferno"
VIEWS = ("axial", "coronal", "sagittal")
ORIENTATION = "axial seen from the feet, the patient's right on the left"
THUMBNAILS = tuple(f"map_{name}.png" for name in VIEWS)
"""File names of a scan's thumbnails, beside its full-size picture map.png."""


@dataclass
class View:
    """One slice of an image and of its map, with the pixel size (rows, columns) in mm."""

    name: str
    background: np.ndarray
    values: np.ndarray
    pixel: tuple[float, float]
    index: int
    count: int


def _figure(width: float, height: float) -> Any:
    """A matplotlib figure drawn by the Agg canvas, without pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def reduced(image: sitk.Image, largest: int = LARGEST) -> sitk.Image:
    """The image binned to at most `largest` voxels along each axis and, in 3D, turned to LPS (as a viewer shows it).

    Two images of one geometry give two reduced images of one geometry, so a CT and its map stay aligned.
    """
    factors = [max(1, int(np.ceil(n / largest))) for n in image.GetSize()]
    small = sitk.BinShrink(image, factors) if any(f > 1 for f in factors) else image
    if small.GetDimension() == 3:
        small = sitk.DICOMOrient(small, "LPS")
    return small


def window(values: np.ndarray) -> tuple[float, float]:
    """Grey levels to show: the HU window for CT in Hounsfield units, else the 1st to 99th percentile."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    if finite.min() < -500:
        return HU_WINDOW
    low, high = np.percentile(finite, [1, 99])
    return float(low), float(high) if high > low else float(low) + 1.0


def _slices(values: np.ndarray, background: np.ndarray, at: Sequence[int],
            spacing: tuple[float, float, float]) -> list[View]:
    """Axial, coronal and sagittal views of z-y-x arrays through the voxel `at`; spacing is (x, y, z) in mm."""
    sx, sy, sz = spacing
    z, y, x = at
    nz, ny, nx = values.shape
    if nz == 1:
        return [View("axial", background[0], values[0], (sy, sx), 0, 1)]
    return [View("axial", background[z], values[z], (sy, sx), z, nz),
            View("coronal", background[:, y, :], values[:, y, :], (sz, sx), y, ny),
            View("sagittal", background[:, :, x], values[:, :, x], (sz, sy), x, nx)]


def scan_views(ct: sitk.Image, values: sitk.Image) -> list[View]:
    """Views of a scan through its map's maximum (one view for a single slice); both images share one geometry."""
    m = np.asarray(sitk.GetArrayFromImage(values), dtype=np.float32)
    b = np.asarray(sitk.GetArrayFromImage(ct), dtype=np.float32)
    if m.ndim == 2:
        m, b = m[None], b[None]
    spacing = tuple(ct.GetSpacing()) + (1.0,) * (3 - ct.GetDimension())
    at = np.unravel_index(int(np.argmax(m)), m.shape) if m.size else (0, 0, 0)
    return _slices(m, b, [int(i) for i in at], spacing)


def mass_views(values: np.ndarray, background: np.ndarray | None = None) -> list[View]:
    """Views of a model-grid map through the slices that hold most of it (not the grid's centre)."""
    m = np.clip(np.asarray(values, dtype=np.float32), 0, None)
    b = np.zeros_like(m) if background is None else np.asarray(background, dtype=np.float32)
    if m.ndim == 2:
        m, b = m[None], b[None]
    at = [int(np.argmax(m.sum(axis=tuple(a for a in range(3) if a != axis)))) for axis in range(3)]
    return _slices(m, b, at, (1.0, 1.0, 1.0))


def _overlay(view: View, top: float, grey: tuple[float, float]) -> np.ndarray:
    """RGB pixels of a view: the map's colour over the grey image, more opaque where the map is higher."""
    from matplotlib import colormaps

    base = np.clip((view.background - grey[0]) / (grey[1] - grey[0]), 0, 1)[..., None]
    level = np.clip(view.values / top, 0, 1) if top > 0 else np.zeros_like(view.values)
    colour = colormaps[COLORMAP](level)[..., :3]
    alpha = OPACITY * level[..., None]
    return np.clip((1 - alpha) * base + alpha * colour, 0, 1)


def views_figure(views: Sequence[View], path: str | Path, title: str, top: float = 1.0,
                 label: str = "map (1 = the scan's maximum)", under: str = "the CT", note: str = "") -> Path:
    """PNG of the views side by side with titles, the slice numbers, a colour bar and the anatomy under the map."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    grey = window(np.concatenate([v.background.ravel() for v in views]))
    n = len(views)
    fig = _figure(3.4 * n + 1.0, 4.2)
    width = 0.86 / n  # the panels share the left 88 % of the width, the colour bar the rest; fixed, so fast to draw
    for i, view in enumerate(views):
        ax = fig.add_axes((0.01 + i * (width + 0.005), 0.02, width, 0.76))
        ax.imshow(_overlay(view, top, grey), origin="upper" if view.name == "axial" else "lower",
                  aspect=view.pixel[0] / view.pixel[1], interpolation="bilinear")
        ax.set_title(f"{view.name}, slice {view.index + 1} of {view.count}", fontsize=9)
        ax.set_axis_off()
    bar = fig.colorbar(ScalarMappable(Normalize(0, top), COLORMAP), cax=fig.add_axes((0.905, 0.12, 0.015, 0.6)))
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle(f"{title}\nover {under}" + (f"; {note}" if note else ""), fontsize=9, y=0.97)
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(str(tmp), format="png")
    return target


def thumbnail(view: View, path: str | Path, top: float = 1.0, size: int = THUMBNAIL) -> Path:
    """A small PNG of one view (map over the anatomy, true proportions), without axes or text."""
    from matplotlib.image import imsave
    from scipy.ndimage import zoom

    grey = window(view.background)
    pixels = _overlay(view, top, grey)
    if view.name != "axial":
        pixels = pixels[::-1]
    height, width = pixels.shape[0] * view.pixel[0], pixels.shape[1] * view.pixel[1]
    scale = size / max(height, width)
    factors = (height * scale / pixels.shape[0], width * scale / pixels.shape[1], 1)
    small = np.clip(zoom(pixels, factors, order=1), 0, 1)
    target = Path(path)
    with atomic_path(target) as tmp:
        imsave(str(tmp), small, format="png")
    return target


def scan_pictures(ct: sitk.Image, values: sitk.Image, folder: str | Path, title: str) -> list[Path]:
    """A scan's map over its CT: map.png (all views, titled, colour bar) and one thumbnail per view, into `folder`."""
    small_ct, small_map = reduced(ct), reduced(values)
    views = scan_views(small_ct, small_map)
    out = Path(folder)
    written = [views_figure(views, out / "map.png", title, note=ORIENTATION)]
    written += [thumbnail(view, out / f"map_{view.name}.png") for view in views]
    return written


def average_picture(values: np.ndarray, path: str | Path, title: str,
                    background: np.ndarray | None = None) -> Path:
    """A cluster's mean map on the model grid over the cohort mean image, at the slices that hold most of the map."""
    top = float(np.max(values)) if np.size(values) and np.max(values) > 0 else 1.0
    under = "the cohort's mean model input" if background is not None else "an empty grid"
    return views_figure(mass_views(values, background), path, title, top, label="mean map", under=under)
