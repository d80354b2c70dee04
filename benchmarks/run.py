"""CLAM speed and memory: against pytorch-grad-cam's Score-CAM (2D), the compute floor, and 3D end to end.

One command, run inside the peer's venv so that both use the same torch (benchmarks/README.md):

    python benchmarks/run.py [--quick] [--out benchmarks/results] [--device cpu|cuda]

Prints a Markdown table and writes JSON (machine, versions, every timing, medians over repeats, ratios).
Timings of CLAM, the peer and the floor are interleaved in each repeat (the order rotates), so that load
from other processes falls on all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CLAM"))

from CLAMLib import explain as ex
from CLAMLib.model import Architecture, ClusterNet

GRID_2D = 256
KS = (2, 3, 4)
E2E_SIZE = (512, 512, 300)  # SimpleITK order (x, y, z)
E2E_GRID = 88
E2E_K = 3
MAP_TOL_SAME_MASKS = {"cpu": 1e-4, "cuda": 1e-3}  # max |ours - peer|, 0..1 maps, the peer's masks and post-processing
# (CUDA convolutions run in TF32 by default, and the peer's first pass batches the images while ours does not)
MAP_TOL_PRODUCT = 0.05  # max |ours - peer| on 0..1 maps, product maps (see README for what differs)
BF16_TOL = 2e-2  # max |bf16 - fp32| on 0..1 maps for bf16 autocast to count as keeping the maps


# -- helpers -------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for queued device work (outside timed loops only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock seconds of fn(), device work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def machine(device: torch.device) -> dict[str, Any]:
    """Machine and versions for the JSON record."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "numpy": np.__version__, "device": str(device),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        from importlib.metadata import version
        info["grad_cam"] = version("grad-cam")
    except Exception:  # noqa: BLE001 - the peer is optional
        info["grad_cam"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def summary(times: list[float]) -> dict[str, Any]:
    """Median, min and max of a list of seconds."""
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": times}


# -- the 2D model and slices ---------------------------------------------------------------------------------


def phantom_slices(n: int, seed: int = 0) -> torch.Tensor:
    """n axial 256 x 256 phantom slices (0..1, lung-like), from simulate.make_phantom."""
    import SimpleITK as sitk
    from CLAMLib.simulate import make_phantom

    out = []
    for i in range(n):
        ct, _ = make_phantom(seed=seed + i, size=(GRID_2D, GRID_2D, 16), spacing=(350 / GRID_2D,) * 2 + (20.0,))
        arr = sitk.GetArrayFromImage(ct)[8].astype(np.float32)
        out.append((np.clip(arr, -1000, 200) + 1000) / 1200)
    return torch.from_numpy(np.stack(out))[:, None]


def random_slices(n: int, seed: int = 0) -> torch.Tensor:
    """n smooth random 256 x 256 images (used where SimpleITK is missing)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 16, 16, generator=gen)
    return F.interpolate(coarse, size=(GRID_2D, GRID_2D), mode="bicubic", align_corners=False).clamp(0, 1)


def smooth_volumes(n: int, channels: int, seed: int) -> torch.Tensor:
    """n smooth random (channels, 88, 88, 88) volumes in 0..1: uniform noise on an 11^3 grid, trilinearly zoomed."""
    coarse = torch.rand((n, channels) + (11,) * 3, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(E2E_GRID,) * 3, mode="trilinear", align_corners=False)


def make_net_2d(k: int, pool: torch.Tensor, seed: int = 0) -> ClusterNet:
    """Seeded random-initialised 2D ClusterNet (same encoder for every k); centroids at k pool images' embeddings."""
    torch.manual_seed(seed)
    net = ClusterNet(Architecture(ndim=2, grid=GRID_2D), k).eval()
    with torch.no_grad():
        z = net.encoder(pool)
        net.head.center.copy_(z.mean(0))
        net.head.scale.fill_(float((z - z.mean(0)).norm(dim=1).mean()) or 1.0)
        net.head.centroids.copy_(net.head.normalise(z[:k]))
    return net


class SoftAssignment(torch.nn.Module):
    """The ClusterNet as the peer sees it: images in, soft assignment q (B, k) out."""

    def __init__(self, net: ClusterNet) -> None:
        """Wrap a ClusterNet."""
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """q of a batch."""
        return self.net.soft_assign(x)


# -- the three contenders ------------------------------------------------------------------------------------


def ours(net: ClusterNet, x: torch.Tensor, ctx: ex.ExplainContext) -> np.ndarray:
    """CLAM's Score-CAM maps of every cluster, one call: (N, k, H, W)."""
    return ex.explain(net, x, "scorecam", ctx)[1]


class _NoProgress:
    """Stands in for the tqdm module inside the peer: tqdm.tqdm(iterable) is the iterable."""

    @staticmethod
    def tqdm(iterable: Any, *args: Any, **kwargs: Any) -> Any:
        """The iterable itself."""
        return iterable


def peer(net: ClusterNet, x: torch.Tensor, batch_size: int) -> np.ndarray:
    """pytorch-grad-cam ScoreCAM, run once per cluster: (N, k, H, W)."""
    from pytorch_grad_cam import ScoreCAM, score_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    score_cam.tqdm = _NoProgress  # its per-batch progress bars cost time and flood the output
    maps = []
    with ScoreCAM(model=SoftAssignment(net), target_layers=[net.encoder.blocks[-1]]) as cam:
        cam.batch_size = batch_size  # the same as ours: like for like (its default is 16)
        for c in range(net.k):
            maps.append(cam(input_tensor=x, targets=[ClassifierOutputTarget(c)] * len(x)))
    return np.stack(maps, 1)


def floor_passes(net: ClusterNet, x: torch.Tensor, masked: list[torch.Tensor], batch_size: int) -> None:
    """The unavoidable passes alone: one encoder pass over the images, one per channel of prebuilt masked inputs."""
    with torch.inference_mode():
        net.encoder.features(x)  # all images in one pass, as the peer's first pass and ours do
        for i in range(len(x)):
            for j in range(0, len(masked[i]), batch_size):
                net.soft_assign(masked[i][j : j + batch_size])


def masked_inputs(net: ClusterNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Each image's C masked inputs (C, 1, H, W), built outside the floor's timing."""
    with torch.inference_mode():
        return [x[i : i + 1] * ex.channel_masks(net, x[i : i + 1])[1].unsqueeze(1) for i in range(len(x))]


# -- agreement with the peer ---------------------------------------------------------------------------------


@contextmanager
def peer_upsampling() -> Iterator[None]:
    """Make our masks use the peer's upsampling (bilinear, align_corners=True) for a like-for-like check."""
    saved = ex._upsample
    ex._upsample = lambda a, size: F.interpolate(a, size=size, mode="bilinear", align_corners=True)
    try:
        yield
    finally:
        ex._upsample = saved


def minmax(m: np.ndarray) -> np.ndarray:
    """The peer's normalisation of each map: (m - min) / (max - min)."""
    axes = tuple(range(m.ndim - 2, m.ndim))
    lo, hi = m.min(axes, keepdims=True), m.max(axes, keepdims=True)
    return (m - lo) / np.maximum(hi - lo, 1e-7)


def agreement(net: ClusterNet, x: torch.Tensor, batch_size: int) -> dict[str, Any]:
    """How our Score-CAM maps compare with the peer's, with its masks and post-processing and without."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    ctx = ex.ExplainContext(batch_size=batch_size)
    ref = peer(net, x, batch_size)
    product = minmax(ours(net, x, ctx))
    with peer_upsampling(), torch.inference_mode():
        same = []
        for i in range(len(x)):
            a, scores = ex.masked_scores(net, x[i : i + 1], ctx)
            cam = torch.relu(torch.einsum("c...,ck->k...", a, torch.softmax(scores, 0))).cpu().numpy()
            same.append(scale_cam_image(scale_cam_image(cam, (GRID_2D, GRID_2D))))  # the peer's min-max, resize, min-max
    same_masks = np.stack(same)

    def diff(m: np.ndarray) -> dict[str, float]:
        d = np.abs(m - ref)
        r = np.corrcoef(m.ravel(), ref.ravel())[0, 1]
        return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "pearson_r": float(r)}

    out = {"same_masks_and_postprocessing": diff(same_masks), "product_map": diff(product)}
    out["same_masks_tolerance"] = MAP_TOL_SAME_MASKS[x.device.type]
    out["same_masks_ok"] = out["same_masks_and_postprocessing"]["max_abs"] <= out["same_masks_tolerance"]
    out["product_ok"] = out["product_map"]["max_abs"] <= MAP_TOL_PRODUCT
    return out


# -- 2D benchmark --------------------------------------------------------------------------------------------


def bench_2d(device: torch.device, n_images: int, repeats: int, batch_size: int, with_peer: bool,
             use_phantoms: bool) -> dict[str, Any]:
    """Ours (all k clusters, one call) against the peer run k times and the compute floor, k = 2, 3, 4."""
    pool = phantom_slices(8) if use_phantoms else random_slices(8)
    x = pool[:n_images].to(device)
    nets = {k: make_net_2d(k, pool).to(device) for k in KS}
    ctx = ex.ExplainContext(batch_size=batch_size)
    masked = masked_inputs(nets[KS[0]], x)  # the encoder is the same for every k
    contenders: dict[str, Callable[[int], Any]] = {
        "ours": lambda k: ours(nets[k], x, ctx),
        "floor": lambda k: floor_passes(nets[k], x, masked, batch_size),
    }
    if with_peer:
        contenders["peer"] = lambda k: peer(nets[k], x, batch_size)
    for k in KS:  # warm-up
        for fn in contenders.values():
            fn(k)
    runs: dict[str, dict[int, list[float]]] = {name: {k: [] for k in KS} for name in contenders}
    names = list(contenders)
    for r in range(repeats):
        for k in KS:
            for name in names[r % len(names):] + names[: r % len(names)]:
                runs[name][k].append(timed(lambda n=name, kk=k: contenders[n](kk), device))
    result: dict[str, Any] = {"n_images": n_images, "grid": GRID_2D, "batch_size": batch_size,
                              "channels": nets[KS[0]].arch.filters[-1], "repeats": repeats,
                              "images": "phantom slices" if use_phantoms else "smooth random images",
                              "model": "seeded random-initialised 2D ClusterNet, centroids at embeddings of pool images",
                              "per_k": {}}
    for k in KS:
        row = {name: summary(runs[name][k]) for name in names}
        row["ours_over_floor"] = row["ours"]["median"] / row["floor"]["median"]
        row["ours_over_floor_per_repeat"] = statistics.median(
            o / f for o, f in zip(runs["ours"][k], runs["floor"][k]))
        if with_peer:
            row["peer_over_ours"] = row["peer"]["median"] / row["ours"]["median"]
            row["peer_over_ours_per_repeat"] = statistics.median(
                p / o for p, o in zip(runs["peer"][k], runs["ours"][k]))
        result["per_k"][k] = row
    if with_peer:
        result["agreement"] = agreement(nets[3], x.to(device), batch_size)
    return result


# -- the default map (integrated gradients) against Captum ---------------------------------------------------

IG_STEPS = 16  # the default map's steps (8 per baseline)
IG_3D_GRID = 88


def make_net(ndim: int, grid: int, k: int, pool: torch.Tensor, seed: int = 0) -> ClusterNet:
    """Seeded random-initialised ClusterNet whose centroids sit at k pool images' embeddings (same encoder for every k)."""
    torch.manual_seed(seed)
    net = ClusterNet(Architecture(ndim=ndim, grid=grid), k).eval()
    with torch.no_grad():
        z = net.encoder(pool)
        net.head.center.copy_(z.mean(0))
        net.head.scale.copy_(z.std(0).clamp_min(1e-6))
        net.head.centroids.copy_(net.head.normalise(z[:k]))
    return net


def captum_maps(net: ClusterNet, x: torch.Tensor, base: torch.Tensor, steps: int) -> torch.Tensor:
    """The default map with Captum's IntegratedGradients run once per cluster, both baselines in each call (the
    image twice, one baseline each, steps / 2 each, internal_batch_size = steps: one forward and one backward pass
    per call), then the same channel sum, smoothing and positive part as ours: (k, *grid)."""
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(lambda inp: ex._log_odds(net.soft_assign(inp)))
    pair, bases = torch.cat([x, x]), torch.cat([base, torch.zeros_like(x)])
    half = steps // 2
    attr = torch.stack([ig.attribute(pair, baselines=bases, target=c, n_steps=half, method="riemann_middle",
                                     internal_batch_size=steps).mean(0) for c in range(net.k)])
    return ex.smooth(attr.sum(1)).clamp_min(0)


def ig_passes(net: ClusterNet, path: torch.Tensor, backward: int) -> None:
    """The compute floor's passes: one forward over the path batch, then `backward` backward passes."""
    with torch.enable_grad():
        p = path.detach().requires_grad_(True)
        q = net.soft_assign(p)
        for c in range(backward):
            torch.autograd.grad(q[:, c].sum(), p, retain_graph=c < backward - 1)


def bench_ig(device: torch.device, repeats: int) -> dict[str, Any]:
    """Default maps of all k clusters in one call against Captum run k times, and the IG floor, 2D 256 and 3D 88."""
    out: dict[str, Any] = {"steps": IG_STEPS, "repeats": repeats}
    for ndim, grid in ((2, GRID_2D), (3, IG_3D_GRID)):
        out[f"{ndim}d_{grid}"] = _bench_ig_input(device, ndim, grid, repeats)
    return out


def _bench_ig_input(device: torch.device, ndim: int, grid: int, repeats: int) -> dict[str, Any]:
    """bench_ig on one smooth random image of grid^ndim voxels, k = 2, 3, 4, contenders interleaved per repeat."""
    gen = torch.Generator().manual_seed(ndim)
    coarse = torch.rand((6, 1) + (8,) * ndim, generator=gen)
    pool = F.interpolate(coarse, size=(grid,) * ndim, mode="bilinear" if ndim == 2 else "trilinear",
                         align_corners=False).to(device)
    x, base = pool[-1:], pool.mean(0, keepdim=True)
    half = IG_STEPS // 2
    alphas = ((torch.arange(half, device=device) + 0.5) / half).view(-1, *[1] * (ndim + 1))
    path = torch.cat([b + alphas * (x - b) for b in (base, torch.zeros_like(x))])
    nets = {k: make_net(ndim, grid, k, pool).to(device) for k in KS}
    ctx = ex.ExplainContext(baseline=base)
    contenders: dict[str, Callable[[int], Any]] = {
        "ours": lambda k: ex.integrated_gradients(nets[k], x, ctx, IG_STEPS),
        "captum": lambda k: captum_maps(nets[k], x, base, IG_STEPS),
        "forward": lambda k: ig_passes(nets[k], path, 0),
        "forward_backward": lambda k: ig_passes(nets[k], path, 1),
    }
    res: dict[str, Any] = {"max_abs_map_diff": {}, "per_k": {}}
    for k in KS:  # warm-up, and the maps must agree
        res["max_abs_map_diff"][k] = float((contenders["ours"](k) - contenders["captum"](k)).abs().max())
    runs: dict[str, dict[int, list[float]]] = {name: {k: [] for k in KS} for name in contenders}
    names = list(contenders)
    for r in range(repeats):
        for k in KS:
            for name in names[r % len(names):] + names[: r % len(names)]:
                runs[name][k].append(timed(lambda n=name, kk=k: contenders[n](kk), device))
    for k in KS:
        row: dict[str, Any] = {name: summary(runs[name][k]) for name in names}
        fwd = row["forward"]["median"]
        bwd = max(row["forward_backward"]["median"] - fwd, 1e-9)
        floor = fwd + (k - 1) * bwd
        row.update(F_s=fwd, B_s=bwd, floor_s=floor, bound=k * (fwd + bwd) / floor,
                   captum_over_ours=row["captum"]["median"] / row["ours"]["median"],
                   ours_over_floor=row["ours"]["median"] / floor)
        row["share_of_bound"] = row["captum_over_ours"] / row["bound"]
        per_repeat = []  # the same ratios within each repeat, where the load on the machine was alike
        for o, c, f, fb in zip(*(runs[n][k] for n in names)):
            b_r = max(fb - f, 1e-9)
            floor_r = f + (k - 1) * b_r
            per_repeat.append((o / floor_r, (c / o) / (k * (f + b_r) / floor_r)))
        row["ours_over_floor_per_repeat"] = statistics.median(r[0] for r in per_repeat)
        row["share_of_bound_per_repeat"] = statistics.median(r[1] for r in per_repeat)
        res["per_k"][k] = row
    return res


# -- bf16 on CUDA --------------------------------------------------------------------------------------------


def bench_bf16(device: torch.device, repeats: int) -> dict[str, Any]:
    """fp32 against bf16-autocast masked passes on CUDA: time and map difference, 2D 256 and 3D 88."""
    out: dict[str, Any] = {}
    for ndim, grid in ((2, GRID_2D), (3, E2E_GRID)):
        torch.manual_seed(0)
        net = ClusterNet(Architecture(ndim=ndim, grid=grid), E2E_K).to(device).eval()
        x = torch.rand((2, 1) + (grid,) * ndim, device=device)
        with torch.no_grad():
            z = net.encoder(x)
            net.head.center.copy_(z.mean(0))
            net.head.centroids.normal_(0, 1)
        fp32, bf16 = ex.ExplainContext(), ex.ExplainContext(bf16=True)
        m32, m16 = ex.explain(net, x, "clam", fp32)[1], ex.explain(net, x, "clam", bf16)[1]
        n32 = np.stack([[ex.normalise_map(c) for c in m] for m in m32])
        n16 = np.stack([[ex.normalise_map(c) for c in m] for m in m16])
        t32, t16 = [], []
        for _ in range(repeats):
            t32.append(timed(lambda n=net, xx=x, c=fp32: ex.explain(n, xx, "clam", c), device))
            t16.append(timed(lambda n=net, xx=x, c=bf16: ex.explain(n, xx, "clam", c), device))
        err = float(np.abs(n32 - n16).max())
        out[f"{ndim}d_{grid}"] = {"fp32": summary(t32), "bf16": summary(t16), "max_abs_map_diff": err,
                                  "within_tolerance": err <= BF16_TOL, "tolerance": BF16_TOL}
    return out


# -- torch.compile of the default map ------------------------------------------------------------------------


def bench_compile(device: torch.device, repeats: int) -> dict[str, Any]:
    """The default map of all clusters (3D grid 88, k = 3, the default model) eager against its encoder blocks and
    head under torch.compile (mode reduce-overhead on CUDA, which captures CUDA graphs): the first call, which
    compiles, and warm medians."""
    import copy

    from CLAMLib.estimator import CLAMModel

    torch.manual_seed(0)
    arch = CLAMModel(k=E2E_K, grid=E2E_GRID, verbose=False).architecture
    net = ClusterNet(arch, E2E_K).to(device).eval()
    x, base = smooth_volumes(2, arch.in_channels, seed=1).to(device).split(1)
    with torch.no_grad():
        net.head.center.copy_(net.head_input(net.encoder.features(torch.cat([x, base]))).mean(0))
    ctx = ex.ExplainContext(baseline=base, present_only=arch.in_channels > 1)
    compiled = copy.deepcopy(net)
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    for block in compiled.encoder.blocks:
        block.compile(mode=mode)
    compiled.head.compile(mode=mode)

    def run(model: ClusterNet) -> torch.Tensor:
        with torch.no_grad():
            return ex.integrated_gradients(model, x, ctx)

    reference = run(net)
    first = timed(lambda: run(compiled), device)
    diff = float((run(compiled) - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for r in range(repeats):
        for name in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):
            times[name].append(timed(lambda m=net if name == "eager" else compiled: run(m), device))
    eager, warm = statistics.median(times["eager"]), statistics.median(times["compiled"])
    return {"mode": mode, "repeats": repeats, "first_call_s": first, "eager": summary(times["eager"]),
            "compiled": summary(times["compiled"]), "compiled_over_eager": warm / eager, "max_rel_diff": diff}


# -- 3D end to end -------------------------------------------------------------------------------------------


def make_ct(path: Path, size: tuple[int, int, int] = E2E_SIZE) -> str:
    """A CT file of `size` voxels: the shared real chest CT resampled, or an upscaled phantom without it."""
    import SimpleITK as sitk

    src = ROOT.parent / "shared" / "data" / "chest_ct" / "lung1_image.nrrd"
    if src.exists():
        image, what = sitk.ReadImage(str(src)), f"real chest CT {src.name} resampled"
    else:
        from CLAMLib.simulate import make_phantom
        image, what = make_phantom(seed=0)[0], "phantom (simulate.make_phantom) resampled"
    extent = [n * s for n, s in zip(image.GetSize(), image.GetSpacing())]
    spacing = [e / n for e, n in zip(extent, size)]
    origin = image.TransformContinuousIndexToPhysicalPoint([-0.5 + 0.5 * s / o for s, o in
                                                            zip(spacing, image.GetSpacing())])
    out = sitk.Resample(image, list(size), sitk.Transform(), sitk.sitkLinear, origin, spacing,
                        image.GetDirection(), -1000.0, sitk.sitkInt16)
    sitk.WriteImage(out, str(path), useCompression=True)
    return what


def make_bundle(ct_path: Path, path: Path) -> str:
    """A k = 3, grid 88 bundle: seeded random-initialised network, preprocessing fitted on the CT itself."""
    import SimpleITK as sitk
    from CLAMLib.estimator import CLAMModel
    from CLAMLib.preprocess import PreprocessConfig, Preprocessor
    from CLAMLib.train import as_batch

    image = sitk.ReadImage(str(ct_path))
    model = CLAMModel(k=E2E_K, grid=E2E_GRID, verbose=False)
    model.preprocessor_ = Preprocessor(PreprocessConfig(grid=E2E_GRID)).fit([image])
    prepared = model.preprocessor_.transform(image)
    torch.manual_seed(0)
    net = ClusterNet(model.architecture, E2E_K).eval()
    with torch.no_grad():
        z = net.head_input(net.encoder.features(as_batch(prepared.array[None], model.architecture)))
        net.head.center.copy_(z[0])
        net.head.centroids.normal_(0, 1)
    model.net_, model.cohort_mean_ = net, prepared.array
    model.save(path)
    return (f"seeded random-initialised 3D ClusterNet (grid 88, k 3, head {model.architecture.head}); "
            "preprocessing fitted on the CT")


def tree_bundle(tree: Path, ct: Path, bundle: Path) -> str:
    """make_bundle of the checkout at `tree`, run with that checkout's code (bundles of one version may not load in
    another), in a fresh process; returns its description."""
    code = (f"import sys; sys.path.insert(0, {str(tree / 'benchmarks')!r}); import run; from pathlib import Path; "
            f"print(run.make_bundle(Path({str(ct)!r}), Path({str(bundle)!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"making the bundle of {tree} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


def e2e_child(ct: Path, bundle: Path, out: Path, device: str) -> dict[str, Any]:
    """One end-to-end run in this fresh process, as `clam map` does it: read, preprocess, default maps of every
    cluster, resample back over the crop box, write one uint8 overlay per cluster."""
    marks = [("start", time.perf_counter())]
    from CLAMLib.estimator import load_bundle
    from CLAMLib.explain import normalise_map
    from CLAMLib.imageio import read_image
    from CLAMLib.overlay import native_map, write_map
    marks.append(("import", time.perf_counter()))
    model = load_bundle(bundle, device=device)
    marks.append(("load bundle", time.perf_counter()))
    image = read_image(ct)
    marks.append(("read CT", time.perf_counter()))
    prepared = model.prepare([image])[0]
    del image
    marks.append(("preprocess", time.perf_counter()))
    q, maps = model.explain([prepared], "default", device)
    sync(torch.device(device))
    marks.append(("default maps (all clusters)", time.perf_counter()))
    overlays = {c: native_map(model.preprocessor_, normalise_map(m), prepared) for c, m in enumerate(maps[0])}
    marks.append(("resample back", time.perf_counter()))
    paths = [write_map(o, out / f"map_cluster{c}.nrrd") for c, o in overlays.items()]
    marks.append(("write overlays", time.perf_counter()))
    times = {name: t - marks[i][1] for i, (name, t) in enumerate(marks[1:])}
    return {"stages": times, "total_s": sum(v for k, v in times.items() if k != "import"),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "n_overlays": len(paths), "overlay_mb": sum(p.stat().st_size for p in paths) / 2**20,
            "size": list(overlays[0].GetSize())}


def bench_3d(out: Path, repeats: int, device: str, before: Path | None = None) -> dict[str, Any]:
    """3D end to end, each repeat in a fresh subprocess (for a clean peak-memory reading), after one untimed run;
    with `before` (a checkout of earlier code) its own end-to-end run alternates with ours in every repeat, on the
    same CT, each checkout with a bundle that its own code made with its own defaults."""
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    ct = cache / "ct_512x512x300.nrrd"
    what = json.loads((cache / "what.json").read_text()) if (cache / "what.json").exists() else {}
    if not ct.exists():
        what["ct"] = make_ct(ct)
    trees = {"now": ROOT} | ({"before": before.resolve()} if before else {})
    bundles = {name: cache / f"bundle_k3_g88_{name}" for name in trees}
    for name, tree in trees.items():  # each checkout runs its own default model: the product path it shipped
        if what.get(f"bundle_{name}_tree") != str(tree) or not any(bundles[name].glob("*.json")):
            shutil.rmtree(bundles[name], ignore_errors=True)
            what[f"bundle_{name}"], what[f"bundle_{name}_tree"] = tree_bundle(tree, ct, bundles[name]), str(tree)
    (cache / "what.json").write_text(json.dumps(what))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}

    def child(name: str) -> dict[str, Any]:
        folder = out / f"overlays_{name}"
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(trees[name] / "benchmarks" / "run.py"), "--e2e-child", str(ct), str(bundles[name]),
               str(folder), device]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"end-to-end run ({name}) failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result.setdefault("overlay_mb", sum(p.stat().st_size for p in folder.glob("map_cluster*")) / 2**20)
        return result

    for name in trees:  # untimed: the file cache and compiled bytecode, as after any earlier run
        child(name)
    for r in range(repeats):
        for name in list(trees)[r % len(trees):] + list(trees)[: r % len(trees)]:
            runs[name].append(child(name))
    res: dict[str, Any] = {**what, "device": device, "repeats": repeats, "before": str(before) if before else None}
    for name, rs in runs.items():
        stages = {k: statistics.median(r["stages"][k] for r in rs) for k in rs[0]["stages"]}
        total = statistics.median(r["total_s"] for r in rs)
        res[name] = {"stages_median_s": stages, "total_median_s": total,
                     "share": {k: v / total for k, v in stages.items() if k != "import"},
                     "peak_rss_mb_max": max(r["peak_rss_mb"] for r in rs),
                     "overlay_mb": statistics.median(r["overlay_mb"] for r in rs), "runs": rs}
    if before:
        res["now_over_before"] = res["now"]["total_median_s"] / res["before"]["total_median_s"]
        res["now_over_before_per_repeat"] = statistics.median(
            n["total_s"] / b["total_s"] for n, b in zip(runs["now"], runs["before"]))
    return res


# -- clam train throughput -----------------------------------------------------------------------------------

TRAIN_SIZE = (512, 512, 200)  # SimpleITK order
TRAIN_COHORT = 100
TRAIN_EPOCHS = (60, 30)  # clam train's defaults: pretraining and fine-tuning epochs


def bench_train(out: Path, repeats: int, device: str, scans_per_epoch: int = 16) -> dict[str, Any]:
    """`clam train` throughput at grid 88: preprocessing per scan (first time, and from the cache) and training per
    epoch (pretraining and fine-tuning, on `scans_per_epoch` prepared scans), extrapolated to a cohort."""
    from CLAMLib.batch import gridded_scan
    from CLAMLib.cache import PreprocessCache
    from CLAMLib.cohort import Scan
    from CLAMLib.estimator import CLAMModel
    from CLAMLib.preprocess import PreprocessConfig, Preprocessor
    from CLAMLib.train import TrainConfig, Trainer

    cache_dir = out / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    ct = cache_dir / "ct_512x512x200.nrrd"
    what = make_ct(ct, TRAIN_SIZE) if not ct.exists() else "resampled as make_ct does"
    scan, config = Scan("ct", ct), PreprocessConfig(grid=E2E_GRID)
    cold, warm = [], []
    for r in range(repeats):
        cache = PreprocessCache(out / f"train_cache_{r}")
        shutil.rmtree(cache.folder, ignore_errors=True)
        cold.append(timed(lambda c=cache: gridded_scan(scan, Preprocessor(config), None, c), torch.device("cpu")))
        warm.append(timed(lambda c=cache: gridded_scan(scan, Preprocessor(config), None, c), torch.device("cpu")))
        assert cache.hits == 1 and cache.misses == 1
        shutil.rmtree(cache.folder, ignore_errors=True)
    arch = CLAMModel(k=E2E_K, grid=E2E_GRID, verbose=False).architecture  # `clam train`'s default model
    arrays = smooth_volumes(scans_per_epoch, arch.in_channels, seed=0).numpy() - 0.5
    stamps: dict[str, list[float]] = {"pretrain": [], "finetune": []}

    def progress(fraction: float, stage: str, message: str) -> None:
        if stage in stamps:
            sync(torch.device(device))
            stamps[stage].append(time.perf_counter())

    epochs = repeats + 1  # the first epoch of each stage (set-up) is not counted
    trainer = Trainer(arch, TrainConfig(k=E2E_K, pretrain_epochs=epochs,
                      finetune_epochs=epochs, tol=0.0, device=device), progress=progress, verbose=False)
    trainer.fit(arrays)
    per_epoch = {stage: statistics.median(np.diff(t)) for stage, t in stamps.items()}
    per_scan = {stage: v / scans_per_epoch for stage, v in per_epoch.items()}
    prep_cold, prep_warm = statistics.median(cold), statistics.median(warm)
    train_per_scan = TRAIN_EPOCHS[0] * per_scan["pretrain"] + TRAIN_EPOCHS[1] * per_scan["finetune"]
    cohort_s = TRAIN_COHORT * (prep_cold + train_per_scan)
    return {"ct": what, "size": list(TRAIN_SIZE), "grid": E2E_GRID, "device": device, "repeats": repeats,
            "architecture": arch.to_dict(),
            "scans_per_epoch": scans_per_epoch, "epochs": list(TRAIN_EPOCHS), "k": E2E_K,
            "preprocess_first_s": summary(cold), "preprocess_cached_s": summary(warm),
            "epoch_s": per_epoch, "epoch_per_scan_s": per_scan, "train_per_scan_s": train_per_scan,
            "cohort": TRAIN_COHORT, "cohort_hours": cohort_s / 3600,
            "scans_per_hour": TRAIN_COHORT / (cohort_s / 3600),
            "hours_per_1000_scans": 1000 * (prep_cold + train_per_scan) / 3600,
            "hours_per_1000_scans_cached": 1000 * (prep_warm + train_per_scan) / 3600}


# -- report --------------------------------------------------------------------------------------------------


def table(res: dict[str, Any]) -> str:
    """Markdown tables of the results."""
    lines = []
    if "bench_2d" in res:
        b = res["bench_2d"]
        peer_on = "peer" in b["per_k"][KS[0]]
        lines += [(f"2D, {b['n_images']} slices of {b['grid']} x {b['grid']}, C = {b['channels']} channels, "
                  f"median of {b['repeats']} interleaved repeats ({res['machine']['device']}):"), "",
                  "| k | CLAM, all k (s) | peer x k (s) | floor (s) | peer / CLAM (goal >= k) | CLAM / floor (goal <= 1.3) |",
                  "|---|---|---|---|---|---|"]
        for k, row in b["per_k"].items():
            p = f"{row['peer']['median']:.3f}" if peer_on else "-"
            ratio = f"{row['peer_over_ours']:.2f}" if peer_on else "-"
            lines.append(f"| {k} | {row['ours']['median']:.3f} | {p} | {row['floor']['median']:.3f} | {ratio} | "
                         f"{row['ours_over_floor']:.2f} |")
        if "agreement" in b:
            a = b["agreement"]
            s, p = a["same_masks_and_postprocessing"], a["product_map"]
            lines += ["", (f"Agreement with the peer's ScoreCAM (k = 3, 0..1 maps): with its masks and post-processing "
                      f"max |diff| {s['max_abs']:.1e} (tolerance {a['same_masks_tolerance']:g}); product maps max |diff| "
                      f"{p['max_abs']:.3f}, mean {p['mean_abs']:.4f}, r = {p['pearson_r']:.4f} "
                      f"(tolerance {MAP_TOL_PRODUCT:g}).")]
    if "compile" in res:
        c = res["compile"]
        lines += ["", (f"Default map, 3D grid {E2E_GRID}, k = {E2E_K}, default model, eager against torch.compile "
                       f"(mode {c['mode']}), median of {c['repeats']} interleaved repeats ({res['machine']['device']}):"),
                  "", "| eager (s) | compiled (s) | compiled / eager | first compiled call (s) | max relative diff |",
                  "|---|---|---|---|---|",
                  (f"| {c['eager']['median']:.3f} | {c['compiled']['median']:.3f} | {c['compiled_over_eager']:.2f} | "
                   f"{c['first_call_s']:.1f} | {c['max_rel_diff']:.1e} |")]
    if "bench_3d" in res:
        e = res["bench_3d"]
        lines += ["", (f"3D end to end, 512 x 512 x 300 CT, k = {E2E_K}, grid {E2E_GRID}, median of {e['repeats']} "
                  f"fresh processes each ({e['device']}):"), ""]
        names = [n for n in ("before", "now") if n in e]
        lines += ["| stage | " + " | ".join(f"{n} (s)" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
        for stage in dict.fromkeys(k for n in names for k in e[n]["stages_median_s"]):
            cells = [e[n]["stages_median_s"].get(stage) for n in names]
            lines.append(f"| {stage}{' (not counted)' if stage == 'import' else ''} | "
                         + " | ".join("-" if v is None else f"{v:.2f}" for v in cells) + " |")
        lines.append("| total | " + " | ".join(f"{e[n]['total_median_s']:.2f}" for n in names) + " |")
        lines.append("| peak RSS (GB) | " + " | ".join(f"{e[n]['peak_rss_mb_max'] / 1024:.2f}" for n in names) + " |")
        lines.append("| overlays on disk (MB) | " + " | ".join(f"{e[n]['overlay_mb']:.1f}" for n in names) + " |")
        if "now_over_before" in e:
            lines += ["", (f"now / before: {e['now_over_before']:.2f} (medians), {e['now_over_before_per_repeat']:.2f} "
                      "(median of per-repeat ratios; goal <= 0.5).")]
    if "train" in res:
        t = res["train"]
        lines += ["", (f"`clam train` throughput ({t['device']}), {t['size'][0]} x {t['size'][1]} x {t['size'][2]} CT, "
                  f"grid {t['grid']}, k = {t['k']}, {t['epochs'][0]} + {t['epochs'][1]} epochs, medians of "
                  f"{t['repeats']}:"), "", "| part | s |", "|---|---|",
                  f"| preprocess one scan, first time | {t['preprocess_first_s']['median']:.2f} |",
                  f"| preprocess one scan, from the cache | {t['preprocess_cached_s']['median']:.2f} |",
                  f"| pretraining epoch, per scan | {t['epoch_per_scan_s']['pretrain']:.3f} |",
                  f"| fine-tuning epoch, per scan | {t['epoch_per_scan_s']['finetune']:.3f} |",
                  f"| training, all epochs, per scan | {t['train_per_scan_s']:.1f} |", "",
                  (f"Cohort of {t['cohort']}: {t['cohort_hours']:.2f} h, {t['scans_per_hour']:.0f} scans per hour; "
                   f"1,000 scans: {t['hours_per_1000_scans']:.1f} h ({t['hours_per_1000_scans_cached']:.1f} h with "
                   "every scan already in the cache).")]
    if "ig" in res:
        g = res["ig"]
        for name, b in ((n, v) for n, v in g.items() if isinstance(v, dict) and "per_k" in v):
            lines += ["", (f"Default map (IG, {g['steps']} steps, both baselines), {name.replace('_', ' grid ')}, one "
                      f"image, median of {g['repeats']} interleaved repeats ({res['machine']['device']}):"), "",
                      "| k | ours, all k (s) | Captum x k (s) | F (s) | B (s) | floor F+(k-1)B (s) | ours / floor "
                      "(goal <= 1.3) | Captum / ours | bound k(F+B)/floor | share of bound (goal >= 0.9) | "
                      "max map diff |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            for k, row in b["per_k"].items():
                lines.append(f"| {k} | {row['ours']['median']:.3f} | {row['captum']['median']:.3f} | "
                             f"{row['F_s']:.3f} | {row['B_s']:.3f} | {row['floor_s']:.3f} | "
                             f"{row['ours_over_floor']:.2f} ({row['ours_over_floor_per_repeat']:.2f}) | "
                             f"{row['captum_over_ours']:.2f} | {row['bound']:.2f} | {row['share_of_bound']:.2f} "
                             f"({row['share_of_bound_per_repeat']:.2f}) | {b['max_abs_map_diff'][k]:.1e} |")
            lines += ["", "Ratios of medians; in brackets the median of the same ratio within each repeat."]
    if "bf16" in res:
        lines += ["", "| CUDA, 2 images | fp32 (s) | bf16 (s) | max map diff | within tolerance |", "|---|---|---|---|---|"]
        for name, v in res["bf16"].items():
            lines.append(f"| {name} | {v['fp32']['median']:.4f} | {v['bf16']['median']:.4f} | "
                         f"{v['max_abs_map_diff']:.1e} | {v['within_tolerance']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks, print the table, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer images and repeats (a smoke run)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--images", type=int, default=None, help="2D slices per batch")
    ap.add_argument("--batch-size", type=int, default=64, help="masked inputs per pass (ours, peer, floor)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--only", choices=("2d", "ig", "3d", "train", "bf16", "compile"), action="append",
                    help="run only these parts")
    ap.add_argument("--no-peer", action="store_true", help="skip pytorch-grad-cam")
    ap.add_argument("--random-images", action="store_true", help="smooth random images instead of phantom slices")
    ap.add_argument("--before", type=Path, default=None, metavar="DIR",
                    help="3d: also run the end to end of an earlier checkout of CLAM (e.g. `git worktree add DIR "
                         "COMMIT`), alternating with this one, and print the ratio")
    ap.add_argument("--e2e-repeats", type=int, default=None, help="3d: fresh processes per checkout (default 3)")
    ap.add_argument("--e2e-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.e2e_child:
        ct, bundle, out, device = args.e2e_child
        print(json.dumps(e2e_child(Path(ct), Path(bundle), Path(out), device)))
        return 0
    device = torch.device(args.device)
    repeats = args.repeats or (3 if args.quick else 7)
    parts = args.only or (["2d", "ig", "3d", "train"] + (["bf16"] if device.type == "cuda" else []))
    res: dict[str, Any] = {"machine": machine(device), "command": " ".join([Path(sys.executable).name] + sys.argv),
                           "quick": args.quick}
    if "2d" in parts:
        res["bench_2d"] = bench_2d(device, args.images or (2 if args.quick else 4), repeats, args.batch_size,
                                   not args.no_peer, not args.random_images)
    if "ig" in parts:
        res["ig"] = bench_ig(device, repeats)
    if "3d" in parts:
        res["bench_3d"] = bench_3d(args.out, args.e2e_repeats or (1 if args.quick else 3), args.device, args.before)
    if "train" in parts:
        res["train"] = bench_train(args.out, 1 if args.quick else 3, args.device)
    if "bf16" in parts:
        res["bf16"] = bench_bf16(device, repeats)
    if "compile" in parts:
        res["compile"] = bench_compile(device, repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_{device.type}{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps(res, indent=1, default=str))
    print(table(res))
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
