"""Simulated chest-CT cohorts whose clusters differ only by their abnormalities.

In the spirit of the simulation study of Ryan et al. (J. Med. Imaging 9(2):026001, 2022), whose
exact design is not public (this one is our own): every subject is a chest CT in Hounsfield units
(HU) with one or more lesions inside the lungs, and the true cluster of a subject decides only the
lesions' properties. Anatomy, noise, vessels and lesion positions are drawn the same way for every
cluster, so a clustering can only succeed by looking at the lesions.

Scenarios (defaults from :meth:`ScenarioParams.default`; ranges are uniform draws per lesion). Every lesion
sits at a fixed site of the right lung (fractions of its bounding box), its centre jittered within 5 mm, so
that the clusters differ by the lesions alone, not by where in the lungs they happen to fall:

``"size"``
    Mid-lung site. Cluster 0: small nodule, diameter 10-12 mm. Cluster 1: large nodule / mass, 28-30 mm.
    Both solid (20-40 HU).
``"location"``
    Both 24-26 mm, solid (20-40 HU). Cluster 0: upper zone (78 % of the lung's cranio-caudal extent, as in
    upper-zone-predominant diseases such as sarcoidosis, silicosis or post-primary tuberculosis). Cluster 1:
    lower zone (22 %, as in basal diseases such as usual interstitial pneumonia or aspiration).
``"intensity"``
    Both 34-36 mm opacities at the mid-lung site. Cluster 0: ground-glass opacity, -460 to -440 HU.
    Cluster 1: consolidation, 20-40 HU.

Parameters of :func:`make_cohort`:

- ``scenario``: one of the three above (names the default :class:`ScenarioParams`).
- ``n_per_cluster``: subjects per cluster (>= 2); labels come in a seeded random order.
- ``seed``: everything is drawn from ``numpy.random.default_rng`` seeded from it; the same
  arguments give identical arrays.
- ``anatomy_variation``: 0 gives the same lungs, body, heart and spine in every subject (only
  vessels, noise, intensity jitter and lesions change); 1 gives adult-like variation: lung size
  +-10 % per axis (plus +-4 % left/right asymmetry), whole-patient shift +-10 mm per axis, lung
  shifts +-4 mm each, body size +-7 %, heart size +-8 % and position +-6 mm, diaphragm dome height
  +-10 mm, and a perturbed lung outline. Values above 1 exaggerate it (scales are clipped to
  0.6-1.5). With a ``base`` CT it scales a random affine (rotation +-3 degrees, scale +-4 %,
  translation +-5 mm) and a smooth B-spline displacement (4 mm standard deviation per control
  point on a 3 x 3 x 3 mesh).
- ``base``: optional real chest CT in HU; every subject is then a deformed copy of it (downsampled
  first so that no axis exceeds ``size``) with lesions inside its lung mask, which comes from
  ``base_lung`` when given and from :func:`CLAMLib.preprocess.lung_mask` otherwise.
- ``base_lesion``: optional mask of the base's own lesion on the base's grid; its voxels are set to
  the median of the base's aerated lung first, so that the subjects do not all share that lesion.
  With a base, each cluster's site is one point of the base's anatomy: the point of the base lung nearest
  the bounding-box site that has room for the largest lesion plus the jitter and 5 mm of deformation (else
  the deepest point of the cluster's zone and side), mapped into every deformed subject. Sites set by each
  subject's own bounding box would fall on different anatomy when the box site lies near the pleura, and the
  clusters would then differ by position as well as by lesion. ``params["base"]["sites_mm"]`` holds the points
  and each lesion record its ``base_centre_mm``.
- ``params``: a :class:`ScenarioParams` overriding the scenario's defaults (lesion diameter in mm,
  attenuation in HU, zone and side per cluster; lesions per subject; soft edge, lung margin, noise
  and intensity jitter).
- ``size`` / ``spacing``: the phantom's grid, in voxels (x, y, z) and mm; the default
  128 x 128 x 64 voxels of 2.734 x 2.734 x 5 mm is a 350 mm field of view with 5 mm slices.

The phantom (:func:`make_phantom`): air -1000 HU; body ellipse about 330 x 240 mm (soft tissue
40 HU, 10 mm subcutaneous fat -100 HU); two lungs (-860 HU, up to +50 HU posteriorly, smooth
+-15 HU texture; each about 110 x 160 x 230 mm, apex dome, diaphragm dome, perturbed outline, a
cardiac notch); a mediastinum of fat (-80 HU) holding the heart, aorta and superior vena cava
(40 HU) and the trachea (air); ribs, vertebral bodies (cancellous 250 HU, cortex 600 HU, discs
80 HU) and posterior arches (500 HU); a handful of branching vessels per lung (40 HU, 3.5 mm
tapering to 1 mm radius); Gaussian noise (20 HU). Coordinates are LPS (DICOM, SimpleITK): x
towards the patient's left, y posterior, z superior, so the right lung has negative x.

Lesions are ellipsoids of random orientation (axis ratios within +-8 %, volume of a sphere of the
drawn diameter) with a linear soft edge (2 mm), replacing whatever lies there; the mask holds the
voxels within the nominal surface, and the lesion with its soft edge lies at least ``margin_mm``
(3 mm) inside the lung mask. Centres are drawn uniformly among lung voxels (within the cluster's
zone and side) deep enough for the largest lesion of any cluster, so that sites are distributed
alike in every cluster. Zones are thirds of each lung's cranio-caudal extent; the left/right split
is the emptiest column between the lungs. Order per subject: anatomy, intensity jitter (scale
+-2 %, offset +-10 HU), lesions at their exact HU, then noise; images are int16 HU.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import InputError

__all__ = [
    "DEFAULT_SIZE",
    "DEFAULT_SPACING",
    "SCENARIOS",
    "SIDES",
    "ZONES",
    "Cohort",
    "LesionSpec",
    "ScenarioParams",
    "Subject",
    "make_cohort",
    "make_phantom",
]

SCENARIOS = ("size", "location", "intensity")
ZONES = ("any", "upper", "middle", "lower")
SIDES = ("any", "right", "left")
DEFAULT_SIZE = (128, 128, 64)
DEFAULT_SPACING = (350.0 / 128, 350.0 / 128, 5.0)

AIR_HU = -1000.0
DEFORMATION_MM = 5.0
"""Extra depth asked of a base CT's lesion site, for the subjects' deformation to leave room there."""
HU_MIN, HU_MAX = -1024.0, 3071.0


@dataclass(frozen=True)
class LesionSpec:
    """Lesions of one cluster: diameter range (mm), attenuation range (HU), lung zone and side, optional site.

    ``site`` places the lesion centre near a point given as fractions of the chosen lung's bounding box
    (lateral to medial, anterior to posterior, inferior to superior), jittered uniformly within
    ``jitter_mm``; without it the centre may fall anywhere in the allowed zone and side.
    """

    diameter_mm: tuple[float, float] = (24.0, 26.0)
    hu: tuple[float, float] = (20.0, 40.0)
    zone: str = "any"
    side: str = "any"
    site: tuple[float, float, float] | None = None
    jitter_mm: float = 5.0

    def check(self) -> None:
        """Raise InputError when a value is out of range."""
        lo, hi = self.diameter_mm
        if not (0 < lo <= hi):
            raise InputError(f"diameter_mm {self.diameter_mm}: give (min, max) with 0 < min <= max, in mm")
        if not (self.hu[0] <= self.hu[1]):
            raise InputError(f"hu {self.hu}: give (min, max) with min <= max, in HU")
        if self.zone not in ZONES:
            raise InputError(f"zone {self.zone!r}: use one of {ZONES}")
        if self.side not in SIDES:
            raise InputError(f"side {self.side!r}: use one of {SIDES}")
        if self.site is not None and (len(self.site) != 3 or not all(0.0 <= f <= 1.0 for f in self.site)):
            raise InputError(f"site {self.site}: give three fractions in 0..1 (lateral-medial, anterior-posterior, "
                             "inferior-superior) of the lung's bounding box, or None")
        if self.jitter_mm < 0:
            raise InputError(f"jitter_mm={self.jitter_mm}: must be >= 0")


@dataclass(frozen=True)
class ScenarioParams:
    """Lesion specs per cluster and the acquisition settings of a simulated cohort."""

    clusters: tuple[LesionSpec, ...]
    n_lesions: int = 1
    edge_mm: float = 2.0
    margin_mm: float = 3.0
    noise_hu: float = 20.0
    hu_scale_jitter: float = 0.02
    hu_offset_jitter: float = 10.0
    shape_jitter: float = 0.08

    @classmethod
    def default(cls, scenario: str) -> ScenarioParams:
        """The default parameters of a scenario ("size", "location" or "intensity")."""
        solid = (20.0, 40.0)
        middle, upper, lower = (0.5, 0.5, 0.5), (0.5, 0.5, 0.78), (0.5, 0.5, 0.22)
        if scenario == "size":
            clusters = (LesionSpec((10.0, 12.0), solid, side="right", site=middle),
                        LesionSpec((28.0, 30.0), solid, side="right", site=middle))
        elif scenario == "location":
            clusters = (
                LesionSpec((24.0, 26.0), solid, zone="upper", side="right", site=upper),
                LesionSpec((24.0, 26.0), solid, zone="lower", side="right", site=lower),
            )
        elif scenario == "intensity":
            clusters = (LesionSpec((34.0, 36.0), (-460.0, -440.0), side="right", site=middle),
                        LesionSpec((34.0, 36.0), solid, side="right", site=middle))
        else:
            raise InputError(f"unknown scenario {scenario!r}: use one of {SCENARIOS}")
        return cls(clusters=clusters)

    def check(self) -> None:
        """Raise InputError when a value is out of range."""
        if len(self.clusters) < 2:
            raise InputError("ScenarioParams.clusters needs at least 2 LesionSpec entries, one per cluster")
        for spec in self.clusters:
            spec.check()
        if int(self.n_lesions) < 1:
            raise InputError(f"n_lesions={self.n_lesions}: give at least 1 lesion per subject")
        for name in ("edge_mm", "margin_mm", "noise_hu", "hu_scale_jitter", "hu_offset_jitter", "shape_jitter"):
            if getattr(self, name) < 0:
                raise InputError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.shape_jitter >= 0.5:
            raise InputError(f"shape_jitter={self.shape_jitter}: keep it below 0.5 (axis ratio jitter)")

    def to_dict(self) -> dict:
        """JSON-able dictionary; ScenarioParams.from_dict inverts it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ScenarioParams:
        """Rebuild from ScenarioParams.to_dict output (lists accepted for tuples)."""
        d = dict(d)
        clusters = tuple(
            LesionSpec(
                diameter_mm=tuple(float(v) for v in c["diameter_mm"]),
                hu=tuple(float(v) for v in c["hu"]),
                zone=c.get("zone", "any"),
                side=c.get("side", "any"),
                site=tuple(float(v) for v in c["site"]) if c.get("site") is not None else None,
                jitter_mm=float(c.get("jitter_mm", 5.0)),
            )
            for c in d.pop("clusters")
        )
        return cls(clusters=clusters, **d)


@dataclass
class Subject:
    """One simulated scan: image (HU), lesion mask, true cluster label and lesion records.

    ``lesions`` holds one dict per lesion: ``centre_mm`` (physical x, y, z, LPS), ``diameter_mm``,
    ``hu``, ``side`` ("right"/"left") and ``zone`` ("upper"/"middle"/"lower", of the centre); with a base CT
    also ``base_centre_mm``, the centre in the undeformed base.
    ``lung`` is the ground-truth lung mask (uint8, same geometry) the lesions were placed in.
    """

    id: str
    image: sitk.Image
    lesion: sitk.Image
    label: int
    lesions: list[dict] = field(default_factory=list)
    lung: sitk.Image | None = None


@dataclass
class Cohort:
    """A simulated cohort: scenario name, subjects and the JSON-able parameters that regenerate it."""

    scenario: str
    subjects: list[Subject]
    params: dict

    @property
    def labels(self) -> np.ndarray:
        """True cluster labels, one per subject, as an int64 array."""
        return np.array([s.label for s in self.subjects], dtype=np.int64)

    def __len__(self) -> int:
        """Number of subjects."""
        return len(self.subjects)


# ----------------------------------------------------------------------------- geometry helpers


def _check_grid(size: Sequence[int], spacing: Sequence[float]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Validate and normalise a 3D grid size (voxels) and spacing (mm)."""
    if len(size) != 3 or len(spacing) != 3:
        raise InputError(f"size {size} and spacing {spacing}: give 3 values each (x, y, z)")
    size_t = tuple(int(s) for s in size)
    spacing_t = tuple(float(s) for s in spacing)
    if min(size_t) < 16:
        raise InputError(f"size {size_t}: use at least 16 voxels per axis")
    if min(spacing_t) <= 0:
        raise InputError(f"spacing {spacing_t}: must be positive, in mm")
    return size_t, spacing_t


def _phys_coords(image: sitk.Image, flat_idx: np.ndarray) -> np.ndarray:
    """Physical (x, y, z) in mm of flat indices into the image's (z, y, x) array."""
    nx, ny, nz = image.GetSize()
    k, j, i = np.unravel_index(flat_idx, (nz, ny, nx))
    ijk = np.stack([i, j, k], axis=1).astype(np.float64) * np.asarray(image.GetSpacing())
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    return np.asarray(image.GetOrigin()) + ijk @ d.T


def _from_array(arr: np.ndarray, ref: sitk.Image) -> sitk.Image:
    """SimpleITK image of a (z, y, x) array with the geometry of ref."""
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ref)
    return img


def _empty_image(size: tuple[int, ...], spacing: tuple[float, ...]) -> sitk.Image:
    """A geometry-only reference image centred on the origin, identity direction."""
    ref = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    ref.SetSpacing(spacing)
    ref.SetOrigin([-(n - 1) * s / 2.0 for n, s in zip(size, spacing)])
    return ref


# ----------------------------------------------------------------------------- phantom anatomy

# Fixed lung-outline harmonics: (order k, amplitude, phase, cranio-caudal twist) per lung.
_OUTLINE = {
    -1: ((2, 0.035, 0.4, 0.8), (3, 0.025, 1.9, -1.1), (4, 0.015, 3.0, 1.6), (5, 0.010, 0.7, -2.0)),
    1: ((2, 0.030, 2.2, -0.7), (3, 0.030, 0.3, 1.3), (4, 0.015, 4.1, -1.5), (5, 0.010, 5.2, 1.8)),
}


def _sample_anatomy(rng: np.random.Generator, v: float) -> dict:
    """Draw one subject's anatomy; v = anatomy_variation (0 gives the reference anatomy)."""

    def u(scale: float, n: int | None = None) -> Any:
        """Uniform draw in +-scale * v (n values, or a scalar)."""
        return rng.uniform(-1.0, 1.0, n) * scale * v

    shift = u(10.0, 3)
    lung_scale = 1.0 + u(0.10, 3)
    lungs = []
    for side in (-1, 1):  # -1: right lung (negative x in LPS), +1: left lung
        scale = np.clip(lung_scale + u(0.04, 3), 0.6, 1.5)
        semi = np.array([55.0, 80.0, 115.0]) * scale
        centre = np.array([side * 75.0, 5.0, 10.0]) + shift + u(4.0, 3)
        dome = (38.0 if side < 0 else 30.0) + u(10.0)
        outline = [(k, a + u(0.5 * a), ph + u(1.0), tw + u(0.5)) for k, a, ph, tw in _OUTLINE[side]]
        lungs.append({"side": side, "centre": centre, "semi": semi, "dome": dome, "outline": outline})
    body_scale = np.clip(1.0 + 0.5 * (lung_scale[:2] - 1.0) + u(0.05, 2), 0.6, 1.5)
    heart_scale = float(np.clip(1.0 + u(0.08), 0.6, 1.5))
    return {
        "shift": shift,
        "body_semi": np.array([165.0, 120.0]) * body_scale,
        "lungs": lungs,
        "heart_centre": np.array([25.0, -25.0, -45.0]) + shift + u(6.0, 3),
        "heart_semi": np.array([62.0, 50.0, 55.0]) * heart_scale,
        "spine_phase": float(u(15.0)),
    }


def _tube(weight: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray, a: np.ndarray, b: np.ndarray,
          ra: float, rb: float, soft: float) -> None:
    """Max-accumulate a soft tapered tube from a (radius ra) to b (radius rb), mm, into weight."""
    pad = max(ra, rb) + soft
    lo, hi = np.minimum(a, b) - pad, np.maximum(a, b) + pad
    sl = []
    for ax in (x, y, z):
        step = ax[1] - ax[0]
        i0 = int(np.clip(np.floor((lo[len(sl)] - ax[0]) / step), 0, len(ax)))
        i1 = int(np.clip(np.ceil((hi[len(sl)] - ax[0]) / step) + 1, 0, len(ax)))
        sl.append(slice(i0, i1))
    if any(s.stop <= s.start for s in sl):
        return
    px = x[sl[0]][None, None, :] - a[0]
    py = y[sl[1]][None, :, None] - a[1]
    pz = z[sl[2]][:, None, None] - a[2]
    ab = b - a
    t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / max(float(ab @ ab), 1e-6), 0.0, 1.0)
    dist = np.sqrt((px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (pz - t * ab[2]) ** 2)
    w = np.clip((ra + (rb - ra) * t - dist) / soft + 0.5, 0.0, 1.0).astype(np.float32)
    view = weight[sl[2], sl[1], sl[0]]
    np.maximum(view, w, out=view)


def _phantom_arrays(size: tuple[int, ...], spacing: tuple[float, ...], anat: dict,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free phantom (float32 HU) and lung mask (bool), both (z, y, x), for one anatomy."""
    nx, ny, nz = size
    x = (np.arange(nx) - (nx - 1) / 2.0) * spacing[0]
    y = (np.arange(ny) - (ny - 1) / 2.0) * spacing[1]
    z = (np.arange(nz) - (nz - 1) / 2.0) * spacing[2]
    X2, Y2 = x[None, :], y[:, None]
    Z3 = z[:, None, None]
    cx0, cy0, _ = anat["shift"]
    bx, by = anat["body_semi"]

    def ell(cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
        """Normalised squared radius of an axial ellipse (below 1 inside)."""
        return ((X2 - cx) / ax) ** 2 + ((Y2 - cy) / ay) ** 2

    # --- z-invariant cross-section: body, fat, mediastinum, spine
    sl = np.full((ny, nx), AIR_HU, np.float32)
    fat = 10.0
    sl[ell(cx0, cy0, bx, by) < 1] = -100.0
    sl[ell(cx0, cy0, bx - fat, by - fat) < 1] = 40.0
    cavity = ell(cx0, cy0, bx - 26.0, by - 26.0) < 1
    rib_band = (ell(cx0, cy0, bx - 16.0, by - 16.0) < 1) & ~cavity
    medi = ell(cx0 + 5.0, cy0 - 10.0, 38.0, 95.0) < 1
    sl[medi] = -80.0
    sl[ell(cx0 + 22.0, cy0 + 45.0, 12.0, 12.0) < 1] = 40.0  # descending aorta
    sy = cy0 + 65.0
    r_vb = np.sqrt(ell(cx0, sy, 1.0, 1.0))
    r_canal = np.sqrt(ell(cx0, sy + 27.0, 1.0, 1.0))
    spine_zone = (r_vb < 28.0) | ((Y2 > sy) & (np.abs(X2 - cx0) < 32.0))
    arch = (r_canal < 13.0) | (ell(cx0, sy + 41.0, 5.0, 8.0) < 1)
    sl[arch] = 500.0
    sl[r_canal < 8.0] = 15.0
    img = np.broadcast_to(sl, (nz, ny, nx)).copy()

    # vertebral bodies with discs every 30 mm
    vb = r_vb < 17.0
    disc = ((z - anat["spine_phase"]) % 30.0) < 6.0
    vb_hu = np.where(r_vb < 14.5, 250.0, 600.0).astype(np.float32)[vb]
    img[:, vb] = np.where(disc[:, None], 80.0, vb_hu[None, :])

    # ribs: bands sloping down anteriorly, every 26 mm
    iy, ix = np.nonzero(rib_band)
    anterior = np.clip((cy0 - Y2[iy, 0]) / by * 0.5 + 0.5, 0.0, 1.0)
    phase = ((z[:, None] + 40.0 * anterior[None, :]) / 26.0) % 1.0
    lung_z = [lung["centre"][2] for lung in anat["lungs"]]
    in_cage = (z > min(lung_z) - 130.0)[:, None]
    img[:, iy, ix] = np.where((phase < 0.3) & in_cage, 450.0, img[:, iy, ix])

    # trachea (air) above the carina, ascending aorta and superior vena cava above the heart
    hc, hs = anat["heart_centre"], anat["heart_semi"]
    carina = max(lung_z) + 20.0
    top_heart = hc[2] + 0.8 * hs[2]
    for (dx, dy, r, z0, hu) in ((5.0, -30.0, 15.0, top_heart, 40.0), (-20.0, -30.0, 10.0, top_heart, 40.0),
                                (0.0, 15.0, 9.0, carina, AIR_HU)):
        disk = ell(cx0 + dx, cy0 + dy, r, r) < 1
        zi = np.nonzero(z > z0)[0]
        if zi.size:
            img[zi[0]:zi[-1] + 1][:, disk] = hu
    # heart
    hx, hy = ((X2 - hc[0]) / hs[0]) ** 2, ((Y2 - hc[1]) / hs[1]) ** 2
    heart_r = hx[None] + hy[None] + ((Z3 - hc[2]) / hs[2]) ** 2
    img[heart_r < 1] = 40.0
    heart_zone = (((X2 - hc[0]) / (hs[0] + 6)) ** 2)[None] + (((Y2 - hc[1]) / (hs[1] + 6)) ** 2)[None] \
        + ((Z3 - hc[2]) / (hs[2] + 6)) ** 2 < 1

    # --- lungs
    lung = np.zeros((nz, ny, nx), bool)
    for L in anat["lungs"]:
        cx, cy, cz = L["centre"]
        ax, ay, az = L["semi"]
        zeta = (z - cz) / az
        taper = np.where(zeta > 0, np.sqrt(np.clip(1.0 - zeta ** 2, 0.0, None)), 1.0)
        u, w = (X2 - cx) / ax, (Y2 - cy) / ay
        rho = np.sqrt(u ** 2 + w ** 2)
        theta = np.arctan2(w, u)
        outline = np.ones((nz, ny, nx), np.float32)
        for k, amp, ph, tw in L["outline"]:
            c2, s2 = np.cos(k * theta + ph), np.sin(k * theta + ph)
            outline += amp * (c2[None] * np.cos(tw * zeta)[:, None, None] - s2[None] * np.sin(tw * zeta)[:, None, None])
        base = cz - az + L["dome"] * np.clip(1.0 - rho ** 2, 0.0, 1.0)
        inside = (rho[None] < taper[:, None, None] * outline) & (Z3 > base[None]) & (zeta < 1.0)[:, None, None]
        lung |= inside
    lung &= (cavity & ~medi & ~spine_zone)[None]
    lung &= ~heart_zone

    # lung parenchyma: posterior (dependent) gradient, smooth texture, vessels
    dependent = np.clip((Y2 - (cy0 - 80.0)) / 170.0, 0.0, 1.0).astype(np.float32)
    coarse = rng.standard_normal((max(nz // 2, 2), max(ny // 4, 2), max(nx // 4, 2)), dtype=np.float32)
    texture = ndimage.zoom(coarse, (nz / coarse.shape[0], ny / coarse.shape[1], nx / coarse.shape[2]), order=1)
    texture = texture[:nz, :ny, :nx]
    lung_hu = -860.0 + 50.0 * dependent[None] + 12.0 * texture
    vessel = np.zeros((nz, ny, nx), np.float32)
    soft = float(min(spacing[0], spacing[1]))
    for L in anat["lungs"]:
        c, s = np.asarray(L["centre"]), np.asarray(L["semi"])
        hilum = c + np.array([-L["side"] * 0.55 * s[0], -0.1 * s[1], -0.1 * s[2]])
        for _ in range(5):
            d = rng.standard_normal(3)
            d[0] = L["side"] * abs(d[0]) + 0.3 * L["side"]  # point laterally, away from the hilum
            end = c + s * 0.85 * d / np.linalg.norm(d)
            _tube(vessel, x, y, z, hilum, end, 3.5, 1.2, soft)
            t = rng.uniform(0.3, 0.6)
            mid = hilum + t * (end - hilum)
            d2 = rng.standard_normal(3)
            end2 = c + s * 0.8 * d2 / np.linalg.norm(d2)
            _tube(vessel, x, y, z, mid, end2, 3.5 - 2.3 * t, 1.0, soft)
    lung_hu = lung_hu * (1.0 - vessel) + 40.0 * vessel
    img[lung] = lung_hu[lung]
    return img, lung


def make_phantom(seed: int = 0, anatomy_variation: float = 1.0, size: Sequence[int] = DEFAULT_SIZE,
                 spacing: Sequence[float] = DEFAULT_SPACING, noise_hu: float = 20.0) -> tuple[sitk.Image, sitk.Image]:
    """A lesion-free chest phantom (int16 HU) and its lung mask (uint8), seeded."""
    size_t, spacing_t = _check_grid(size, spacing)
    if anatomy_variation < 0:
        raise InputError(f"anatomy_variation={anatomy_variation}: use 0 (identical anatomy), 1 (adult-like) or more")
    rng = np.random.default_rng(seed)
    anat = _sample_anatomy(rng, float(anatomy_variation))
    arr, lung = _phantom_arrays(size_t, spacing_t, anat, rng)
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(noise_hu)
    ref = _empty_image(size_t, spacing_t)
    return _from_array(_to_int16(arr), ref), _from_array(lung.astype(np.uint8), ref)


def _to_int16(arr: np.ndarray) -> np.ndarray:
    """Round and clip HU to the int16 CT range."""
    return np.clip(np.rint(arr), HU_MIN, HU_MAX).astype(np.int16)


# ----------------------------------------------------------------------------- lesions


class _LungInfo:
    """Per-subject lung geometry used to place lesions: distance map, side and zone of each voxel."""

    def __init__(self, lung: np.ndarray, ref: sitk.Image):
        """Analyse a (z, y, x) boolean lung mask on the grid of ref."""
        self.lung = lung
        self.ref = ref
        sp = ref.GetSpacing()
        idx = np.nonzero(lung)
        if idx[0].size == 0:
            raise InputError("the lung mask is empty: lesions need lung voxels (check the base CT is a chest CT in HU)")
        lo = [max(int(a.min()) - 1, 0) for a in idx]
        hi = [int(a.max()) + 2 for a in idx]
        crop = tuple(slice(a, b) for a, b in zip(lo, hi))
        self.dist = np.zeros(lung.shape, np.float32)
        self.dist[crop] = ndimage.distance_transform_edt(lung[crop], sampling=(sp[2], sp[1], sp[0]))
        flat = np.flatnonzero(lung)
        self.flat = flat
        pts = _phys_coords(ref, flat)
        self.pts = pts
        # split left/right at the emptiest x column near the middle of the lungs
        xs = pts[:, 0]
        lo_x, hi_x = np.percentile(xs, [2, 98])
        edges = np.linspace(lo_x, hi_x, 41)
        hist, _ = np.histogram(xs, edges)
        mid = slice(12, 29)  # the central 40 %
        j = int(np.argmin(hist[mid])) + mid.start
        self.midline = 0.5 * (edges[j] + edges[j + 1])
        self.side = np.where(xs < self.midline, "right", "left")
        self.zfrac = np.zeros(flat.size)
        for s in ("right", "left"):
            m = self.side == s
            if not m.any():
                continue
            zmin, zmax = pts[m, 2].min(), pts[m, 2].max()
            self.zfrac[m] = (pts[m, 2] - zmin) / max(zmax - zmin, 1e-6)
        self.zone = np.where(self.zfrac >= 2 / 3, "upper", np.where(self.zfrac <= 1 / 3, "lower", "middle"))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3D rotation matrix."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _site_point(info: _LungInfo, spec: LesionSpec, side: str) -> np.ndarray:
    """Physical point (mm) at the spec's site fractions of one lung's bounding box."""
    on_side = info.side == side
    lo, hi = info.pts[on_side].min(0), info.pts[on_side].max(0)
    frac = np.asarray(spec.site, dtype=float)
    if side == "left":  # lateral is +x for the left lung, -x for the right (LPS)
        frac[0] = 1.0 - frac[0]
    return lo + frac * (hi - lo)


def _site_distance(info: _LungInfo, spec: LesionSpec, rng: np.random.Generator,
                   anchor: np.ndarray | None = None) -> np.ndarray:
    """Distance (mm) of every lung voxel to the spec's site (or to anchor) in one lung; inf elsewhere."""
    side = spec.side if spec.side != "any" else ("right", "left")[int(rng.integers(2))]
    point = anchor if anchor is not None else _site_point(info, spec, side)
    return np.where(info.side == side, np.linalg.norm(info.pts - point, axis=1), np.inf)


def _room(p: ScenarioParams) -> float:
    """Depth (mm) inside the lung that a lesion centre needs: that of the largest lesion of any cluster.

    Every cluster places its centres by it, so that lesion sites are distributed alike in all clusters
    (small lesions are not allowed nearer the pleura than large ones).
    """
    widest = max(c.diameter_mm[1] for c in p.clusters) / 2.0 * math.exp(4.0 * p.shape_jitter / 3.0)
    return widest + p.edge_mm / 2.0 + p.margin_mm


def _allowed(info: _LungInfo, spec: LesionSpec) -> np.ndarray:
    """Lung voxels in the spec's zone and side."""
    allowed = np.ones(info.flat.size, bool)
    if spec.zone != "any":
        allowed &= info.zone == spec.zone
    if spec.side != "any":
        allowed &= info.side == spec.side
    return allowed


def _base_sites(info: _LungInfo, p: ScenarioParams, margin_mm: float | None = None) -> dict[int, np.ndarray]:
    """Per cluster with a site on a fixed side: the base lung's point nearest that site with room for the lesions.

    Room there is asked for the lesions plus margin_mm (default: the whole jitter and a deformation's worth); a lung without that much gets the
    deepest point of the cluster's zone and side. Mapped into each deformed subject, the point gives every
    subject the same anatomical site, also in lungs whose bounding-box site lies too near the pleura for the
    lesion.
    """
    depth = info.dist.ravel()[info.flat]
    sites = {}
    for i, spec in enumerate(p.clusters):
        if spec.site is None or spec.side == "any":
            continue
        to_site = np.where(_allowed(info, spec), np.linalg.norm(info.pts - _site_point(info, spec, spec.side), axis=1),
                           np.inf)
        extra = spec.jitter_mm + DEFORMATION_MM if margin_mm is None else margin_mm
        d = np.where(depth >= _room(p) + extra, to_site, np.inf)
        if np.isfinite(d.min()):
            sites[i] = info.pts[int(np.argmin(d))]
        elif np.isfinite(to_site.min()):  # no such room: the deepest point of the zone and side
            sites[i] = info.pts[int(np.argmax(np.where(np.isfinite(to_site), depth, -np.inf)))]
    return sites


def _to_subject(tx: sitk.Transform, point: np.ndarray, iterations: int = 20) -> np.ndarray:
    """The subject point that tx (subject to base, as used to resample the base) maps onto a base point."""
    q = np.asarray(point, float)
    for _ in range(iterations):
        step = np.asarray(point) - np.asarray(tx.TransformPoint(q.tolist()))
        q = q + step
        if np.linalg.norm(step) < 0.01:
            break
    return q


def _insert_lesions(img: np.ndarray, info: _LungInfo, spec: LesionSpec, p: ScenarioParams,
                    rng: np.random.Generator, anchor: np.ndarray | None = None) -> tuple[np.ndarray, list[dict]]:
    """Insert p.n_lesions lesions of spec into img (in place); return the mask and lesion records.

    ``anchor`` (physical mm) replaces the site's bounding-box point when given.
    """
    ref = info.ref
    sp = np.asarray(ref.GetSpacing())
    nx, ny, nz = ref.GetSize()
    d_mat = np.asarray(ref.GetDirection()).reshape(3, 3)
    mask = np.zeros(img.shape, bool)
    allowed = _allowed(info, spec)
    dist = info.dist.ravel()[info.flat]
    room = _room(p)
    records: list[dict] = []
    for _ in range(int(p.n_lesions)):
        diameter = float(rng.uniform(*spec.diameter_mm))
        hu = float(rng.uniform(*spec.hu))
        j = p.shape_jitter
        axes = np.exp(rng.uniform(-j, j, 3))
        axes /= np.prod(axes) ** (1 / 3)
        radius = diameter / 2.0
        need = radius * axes.max() + p.edge_mm / 2.0 + p.margin_mm
        cand = allowed & (dist >= room)
        if spec.site is not None:  # within the jitter of the site, or the nearest places that have room
            to_site = np.where(cand, _site_distance(info, spec, rng, anchor), np.inf)
            cand &= to_site <= max(spec.jitter_mm, float(np.min(to_site)) + 1e-6)
        for rec in records:  # keep lesions apart
            gap = np.linalg.norm(info.pts - np.asarray(rec["_centre"]), axis=1)
            cand &= gap >= rec["_reach"] + need + 2.0
        choices = np.flatnonzero(cand)
        if choices.size == 0:
            raise InputError(
                f"no room for a {diameter:.1f} mm lesion (zone {spec.zone!r}, side {spec.side!r}) inside the lungs: "
                "use smaller diameter_mm, margin_mm or n_lesions, or less anatomy_variation"
            )
        c = choices[rng.integers(choices.size)]
        centre = info.pts[c]
        rot = _random_rotation(rng)
        # local grid in the index frame, offsets in mm along the image axes
        k0, j0, i0 = np.unravel_index(info.flat[c], img.shape)
        reach = radius * axes.max() + p.edge_mm
        half = np.ceil(reach / sp).astype(int)
        sl = (slice(max(k0 - half[2], 0), min(k0 + half[2] + 1, nz)),
              slice(max(j0 - half[1], 0), min(j0 + half[1] + 1, ny)),
              slice(max(i0 - half[0], 0), min(i0 + half[0] + 1, nx)))
        oi = (np.arange(sl[2].start, sl[2].stop) - i0) * sp[0]
        oj = (np.arange(sl[1].start, sl[1].stop) - j0) * sp[1]
        ok = (np.arange(sl[0].start, sl[0].stop) - k0) * sp[2]
        # physical offsets = D @ (index offsets * spacing); rotate into the lesion frame
        m = rot.T @ d_mat
        comps = [m[r, 0] * oi[None, None, :] + m[r, 1] * oj[None, :, None] + m[r, 2] * ok[:, None, None]
                 for r in range(3)]
        rn = np.sqrt(sum((cmp / a) ** 2 for cmp, a in zip(comps, axes)))
        w = np.clip((radius - rn) / max(p.edge_mm, 1e-6) + 0.5, 0.0, 1.0) if p.edge_mm > 0 \
            else (rn <= radius).astype(np.float64)
        region = img[sl]
        region[...] = region * (1.0 - w) + hu * w
        mask[sl] |= rn <= radius
        zfrac = float(info.zfrac[c])
        records.append({
            "centre_mm": [float(v) for v in centre],
            "diameter_mm": diameter,
            "hu": hu,
            "side": str(info.side[c]),
            "zone": str(info.zone[c]),
            "zone_fraction": zfrac,
            "_centre": centre,
            "_reach": reach,
        })
    for rec in records:
        del rec["_centre"], rec["_reach"]
    return mask, records


# ----------------------------------------------------------------------------- base CT path


def _prepare_base(base: sitk.Image, max_size: tuple[int, ...]) -> sitk.Image:
    """Check a base CT and downsample it (anti-aliased) so no axis exceeds max_size; float32 HU."""
    if not isinstance(base, sitk.Image) or base.GetDimension() != 3:
        raise InputError("base must be a 3D SimpleITK image of a chest CT in HU (e.g. sitk.ReadImage('ct.nrrd'))")
    img = sitk.Cast(base, sitk.sitkFloat32)
    arr = sitk.GetArrayViewFromImage(img)
    if float(arr.min()) > -500.0:
        raise InputError(
            f"base minimum is {float(arr.min()):.0f}: the base must be in HU with air near -1000 "
            "(apply the DICOM rescale slope/intercept first)"
        )
    size = np.asarray(img.GetSize())
    sp = np.asarray(img.GetSpacing())
    new_sp = np.maximum(sp, sp * size / np.asarray(max_size, float))
    if np.allclose(new_sp, sp):
        return img
    # Gaussian of half the new spacing along each axis that shrinks (in voxels, array order z, y, x)
    sigma_vox = [0.5 * n / s if n > s * 1.01 else 0.0 for n, s in zip(new_sp, sp)][::-1]
    smooth = sitk.GetImageFromArray(ndimage.gaussian_filter(sitk.GetArrayFromImage(img), sigma_vox))
    smooth.CopyInformation(img)
    new_size = [int(max(1, round(n * s / ns))) for n, s, ns in zip(size, sp, new_sp)]
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    origin = np.asarray(img.GetOrigin()) + d @ ((new_sp - sp) / 2.0)
    return sitk.Resample(smooth, new_size, sitk.Transform(), sitk.sitkLinear, origin.tolist(),
                         new_sp.tolist(), img.GetDirection(), AIR_HU, sitk.sitkFloat32)


def _base_transform(ref: sitk.Image, v: float, rng: np.random.Generator) -> sitk.Transform:
    """Random small affine plus smooth B-spline displacement about the image centre, scaled by v."""
    size = np.asarray(ref.GetSize())
    centre = ref.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2.0).tolist())
    ang = np.deg2rad(rng.uniform(-3.0, 3.0, 3) * v)
    cx, cy, cz = np.cos(ang)
    sx, sy, sz = np.sin(ang)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    mat = rz @ ry @ rx @ np.diag(1.0 + rng.uniform(-0.04, 0.04, 3) * v)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(centre)
    affine.SetMatrix(mat.ravel().tolist())
    affine.SetTranslation((rng.uniform(-5.0, 5.0, 3) * v).tolist())
    bspline = sitk.BSplineTransformInitializer(ref, [3, 3, 3], 3)
    n = len(bspline.GetParameters())
    bspline.SetParameters((rng.normal(0.0, 4.0 * v, n)).tolist())
    composite = sitk.CompositeTransform([affine, bspline])
    # evaluate the smooth transform once on a coarse grid covering the image (4x cheaper per axis)
    step = np.asarray(ref.GetSpacing()) * 4.0
    coarse = [int(np.ceil((n - 1) / 4.0)) + 2 for n in size]
    field = sitk.TransformToDisplacementField(composite, sitk.sitkVectorFloat64, coarse, ref.GetOrigin(),
                                              step.tolist(), ref.GetDirection())
    return sitk.DisplacementFieldTransform(field)


def _base_lung(base_small: sitk.Image, base_lung: sitk.Image | None) -> sitk.Image:
    """The base's lung mask on the downsampled grid (given, or from preprocess.lung_mask)."""
    if base_lung is None:
        try:
            from .preprocess import lung_mask
        except ImportError as exc:  # pragma: no cover - depends on the engine's build
            raise InputError(f"cannot segment the base's lungs ({exc}): pass base_lung=<uint8 lung mask>") from exc
        mask = lung_mask(base_small)
    else:
        if not isinstance(base_lung, sitk.Image) or base_lung.GetDimension() != 3:
            raise InputError("base_lung must be a 3D SimpleITK mask (non-zero inside the lungs) on the base's grid")
        mask = base_lung
    mask = sitk.Resample(sitk.Cast(mask != 0, sitk.sitkUInt8), base_small, sitk.Transform(),
                         sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    if not sitk.GetArrayViewFromImage(mask).any():
        raise InputError("the base's lung mask is empty: give a chest CT in HU, or pass base_lung explicitly")
    return mask


def _without_lesion(base: sitk.Image, lesion: sitk.Image) -> sitk.Image:
    """The base CT with its own lesion's voxels set to the median of its aerated lung (float32 HU, a copy)."""
    from .preprocess import Geometry, lung_mask

    if not isinstance(lesion, sitk.Image) or not Geometry.from_image(lesion).matches(Geometry.from_image(base)):
        raise InputError("base_lesion must be a mask on the base CT's exact grid (size, spacing, origin, direction); "
                         "resample it onto the base first")
    hu = sitk.GetArrayFromImage(sitk.Cast(base, sitk.sitkFloat32))
    inside = sitk.GetArrayViewFromImage(lesion) != 0
    if not inside.any():
        raise InputError("base_lesion is empty: give the mask of the base's own lesion (non-zero inside it)")
    aerated = (sitk.GetArrayFromImage(lung_mask(base)) > 0) & (hu < -400.0) & ~inside
    hu[inside] = np.median(hu[aerated]) if aerated.any() else -850.0
    clean = sitk.GetImageFromArray(hu)
    clean.CopyInformation(base)
    return clean


def _image_digest(image: sitk.Image) -> str:
    """SHA-256 of an image's voxels and geometry (to recognise the same base later)."""
    h = hashlib.sha256(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).tobytes())
    h.update(repr((image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- cohort


def make_cohort(scenario: str = "size", n_per_cluster: int = 20, seed: int = 0, anatomy_variation: float = 1.0,
                base: sitk.Image | None = None, params: ScenarioParams | None = None,
                size: Sequence[int] = DEFAULT_SIZE, spacing: Sequence[float] = DEFAULT_SPACING,
                base_lung: sitk.Image | None = None, base_lesion: sitk.Image | None = None,
                site_margin_mm: float | None = None) -> Cohort:
    """Simulate a seeded cohort whose clusters differ only by their lesions (see the module docstring).

    With a base, site_margin_mm is the depth asked beyond a lesion's own room at each cluster's site (default: the
    site jitter plus DEFORMATION_MM; 0 keeps sites nearer the asked place in small lungs).
    """
    if scenario not in SCENARIOS:
        raise InputError(f"unknown scenario {scenario!r}: use one of {SCENARIOS}")
    if int(n_per_cluster) != n_per_cluster or n_per_cluster < 2:
        raise InputError(f"n_per_cluster={n_per_cluster}: use an integer of at least 2 subjects per cluster")
    v = float(anatomy_variation)
    if not math.isfinite(v) or v < 0:
        raise InputError(f"anatomy_variation={anatomy_variation}: use 0 (identical anatomy), 1 (adult-like) or more")
    size_t, spacing_t = _check_grid(size, spacing)
    p = params if params is not None else ScenarioParams.default(scenario)
    if not isinstance(p, ScenarioParams):
        raise InputError("params must be a ScenarioParams (e.g. ScenarioParams.default('size'))")
    p.check()
    k = len(p.clusters)
    n = int(n_per_cluster)

    root = np.random.SeedSequence(int(seed))
    order_rng = np.random.default_rng(root.spawn(1)[0])
    labels = order_rng.permutation(np.repeat(np.arange(k), n))
    child_seeds = root.spawn(labels.size)

    run_params: dict = {
        "scenario": scenario,
        "n_per_cluster": n,
        "seed": int(seed),
        "anatomy_variation": v,
        "size": list(size_t),
        "spacing": list(spacing_t),
        "scenario_params": p.to_dict(),
        "base": None,
    }
    if base is not None:
        small = _prepare_base(_without_lesion(base, base_lesion) if base_lesion is not None else base, size_t)
        lung_ref = _base_lung(small, base_lung)
        sites = _base_sites(_LungInfo(sitk.GetArrayFromImage(lung_ref) > 0, small), p, site_margin_mm)
        run_params["base"] = {
            "sha256": _image_digest(base),
            "size": list(base.GetSize()),
            "spacing": list(base.GetSpacing()),
            "grid_size": list(small.GetSize()),
            "grid_spacing": list(small.GetSpacing()),
            "base_lung_given": base_lung is not None,
            "sites_mm": {str(i): [float(c) for c in point] for i, point in sites.items()},
            "base_lesion_voxels": None if base_lesion is None else int(np.count_nonzero(
                sitk.GetArrayViewFromImage(base_lesion))),
        }
    subjects: list[Subject] = []
    for i, (label, ss) in enumerate(zip(labels, child_seeds)):
        rng = np.random.default_rng(ss)
        anchor = None
        if base is None:
            anat = _sample_anatomy(rng, v)
            ref = _empty_image(size_t, spacing_t)
            arr, lung = _phantom_arrays(size_t, spacing_t, anat, rng)
        else:
            ref = small
            anchor = sites.get(int(label))
            if v > 0:
                tx = _base_transform(small, v, rng)
                img_s = sitk.Resample(small, small, tx, sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
                lung_s = sitk.Resample(lung_ref, small, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
                anchor = None if anchor is None else _to_subject(tx, anchor)
            else:
                img_s, lung_s = small, lung_ref
            arr = sitk.GetArrayFromImage(img_s).astype(np.float32)
            lung = sitk.GetArrayViewFromImage(lung_s) > 0
        # acquisition: intensity scale / offset, then lesions (exact HU), then noise
        arr *= np.float32(1.0 + rng.uniform(-1.0, 1.0) * p.hu_scale_jitter)
        arr += np.float32(rng.uniform(-1.0, 1.0) * p.hu_offset_jitter)
        info = _LungInfo(lung, ref)
        mask, records = _insert_lesions(arr, info, p.clusters[int(label)], p, rng, anchor)
        if base is not None:
            for rec in records:
                where = tx.TransformPoint(rec["centre_mm"]) if v > 0 else rec["centre_mm"]
                rec["base_centre_mm"] = [float(c) for c in where]
        arr += rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(p.noise_hu)
        subjects.append(Subject(
            id=f"{scenario}-{i:03d}",
            image=_from_array(_to_int16(arr), ref),
            lesion=_from_array(mask.astype(np.uint8), ref),
            label=int(label),
            lesions=records,
            lung=_from_array(lung.astype(np.uint8), ref),
        ))
    return Cohort(scenario=scenario, subjects=subjects, params=run_params)
