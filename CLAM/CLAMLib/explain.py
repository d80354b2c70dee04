"""Cluster explanation maps: CLAM (Ryan et al. 2022) and the methods it is compared with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .model import ClusterNet, GaussianSmoothing


@dataclass
class ExplainContext:
    """What a map method may need beyond the network and the image."""

    baseline: Optional[torch.Tensor] = None  # cohort mean image (1, C, *grid)
    batch_size: int = 64  # masked inputs per pass on the CPU; on CUDA the size is chosen from free memory
    seed: int = 0
    bf16: bool = False  # bf16 autocast of the masked passes, CUDA only (maps within tolerance: benchmarks/README.md)
    features: Optional[torch.Tensor] = None  # last-block activations of the current image, set by explain()
    present_only: bool = False  # default map only where the image itself holds a finding (findings inputs)


PRESENCE = 0.05
"""Findings input (units of 1000 HU, summed over channels) at which a place counts as fully holding a finding."""


def presence(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """0..1 weight (1, *grid) of where a findings input (1, C, *grid) holds a finding, smoothed like the maps."""
    return (smooth(x.abs().sum(1), sigma) / PRESENCE).clamp(0.0, 1.0)


def _upsample(a: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Linear (bi/trilinear) upsampling of (B, C, *a) activations to the input grid."""
    mode = "trilinear" if len(size) == 3 else "bilinear"
    return F.interpolate(a, size=size, mode=mode, align_corners=False)


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """fn over slices of x along its first axis, concatenated; no host synchronisation between slices."""
    if len(x) <= batch_size:
        return fn(x)
    return torch.cat([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


_PASS_BYTES_FACTOR = 6  # bytes of one masked pass over the bytes of its input: input, mask, activations, slack


def _masked_batch_size(net: ClusterNet, x: torch.Tensor, channels: int, ctx: ExplainContext) -> int:
    """Masked inputs per pass: ctx.batch_size on the CPU; on CUDA as many as half the free memory holds."""
    if x.device.type != "cuda":
        return ctx.batch_size
    free, _ = torch.cuda.mem_get_info(x.device)
    first = net.arch.filters[0] / net.arch.stride**net.arch.ndim  # first block's activations per input voxel
    per_input = x[0].numel() * 4 * (_PASS_BYTES_FACTOR + 2 * first)
    return max(1, min(channels, int(free // 2 // per_input)))


def channel_masks(net: ClusterNet, x: torch.Tensor, a: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-block activations A (C, *a) of one image and their min-max normalised upsampled masks H (C, *grid)."""
    a = net.encoder.features(x) if a is None else a
    u = _upsample(a, tuple(x.shape[2:]))[0]
    flat = u.flatten(1)
    lo, hi = flat.amin(1), flat.amax(1)  # two amin/amax passes beat one aminmax(dim) here
    shape = (-1,) + (1,) * (u.ndim - 1)
    scale = torch.where(hi > lo, 1.0 / torch.where(hi > lo, hi - lo, torch.ones_like(hi)), torch.zeros_like(hi))
    h = u.sub_(lo.view(shape)).mul_(scale.view(shape))  # in place: a constant channel gives an all-zero mask
    return a[0], h


def masked_scores(net: ClusterNet, x: torch.Tensor, ctx: ExplainContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations A (C, *a) and q(x * H_k) for every channel k: (C, k), from one batched set of passes."""
    a, h = channel_masks(net, x, ctx.features)
    size = _masked_batch_size(net, x, len(h), ctx)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ctx.bf16 and x.device.type == "cuda"):
        scores = _batched(lambda hb: net.soft_assign(x * hb.unsqueeze(1)), h, size)
    return a, scores.float()


def combine(a: torch.Tensor, weights: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """ReLU(sum_k w_kc Up(A_k)) for every cluster c at once: (k, *grid); combined before upsampling (Up is linear)."""
    cam = torch.einsum("c...,ck->k...", a, weights)
    return torch.relu(_upsample(cam.unsqueeze(0), size)[0])


def clam(net: ClusterNet, x: torch.Tensor, ctx: ExplainContext) -> torch.Tensor:
    """CLAM, faithful to Ryan et al. 2022: channel weights w_kc = q_c(x * H_k), every channel of the last block."""
    a, scores = masked_scores(net, x, ctx)
    return combine(a, scores, tuple(x.shape[2:]))


def scorecam(net: ClusterNet, x: torch.Tensor, ctx: ExplainContext) -> torch.Tensor:
    """Score-CAM weighting (Wang et al. 2020): softmax over channels of q_c(x * H_k)."""
    a, scores = masked_scores(net, x, ctx)
    return combine(a, torch.softmax(scores, dim=0), tuple(x.shape[2:]))


def gradient(net: ClusterNet, x: torch.Tensor, ctx: ExplainContext) -> torch.Tensor:
    """Gradient saliency (Simonyan et al. 2014): |dq_c / dx| for every cluster c, one batched backward pass."""
    k = net.k
    with torch.enable_grad():
        xk = x.detach().repeat(k, *[1] * (x.ndim - 1)).requires_grad_(True)
        q = net.soft_assign(xk)
        (grad,) = torch.autograd.grad(q.diagonal().sum(), xk)
    return grad.abs().sum(1)


def occlusion(net: ClusterNet, x: torch.Tensor, ctx: ExplainContext, patch: Optional[int] = None) -> torch.Tensor:
    """Occlusion (Zeiler and Fergus 2014) with the cohort mean image: drop in q_c when a patch is replaced by it."""
    grid = tuple(x.shape[2:])
    patch = patch or grid[0] // net.arch.feature_grid
    baseline = ctx.baseline if ctx.baseline is not None else torch.full_like(x, float(x.mean()))
    cells = [range(0, g, patch) for g in grid]
    starts = torch.cartesian_prod(*[torch.tensor(list(c)) for c in cells]).view(-1, len(grid))
    q0 = net.soft_assign(x)[0]

    def occluded(batch: torch.Tensor) -> torch.Tensor:
        xs = x.repeat(len(batch), *[1] * (x.ndim - 1))
        for i, s in enumerate(batch.tolist()):
            sl = (i, slice(None)) + tuple(slice(v, v + patch) for v in s)
            xs[sl] = baseline[(0, slice(None)) + sl[2:]]
        return net.soft_assign(xs)

    drops = q0 - _batched(occluded, starts, ctx.batch_size)  # (P, k)
    coarse = drops.T.reshape(net.k, *[len(c) for c in cells])
    up = coarse
    for axis in range(1, coarse.ndim):
        up = up.repeat_interleave(patch, dim=axis)
    return torch.relu(up[(slice(None),) + tuple(slice(0, g) for g in grid)])


def random_map(net: ClusterNet, x: torch.Tensor, ctx: ExplainContext) -> torch.Tensor:
    """A smooth random map at the activation grid's resolution: the chance baseline for every metric."""
    gen = torch.Generator().manual_seed(ctx.seed)
    coarse = torch.rand((1, net.k) + (net.arch.feature_grid,) * net.arch.ndim, generator=gen).to(x.device)
    return _upsample(coarse, tuple(x.shape[2:]))[0]


def _log_odds(q: torch.Tensor) -> torch.Tensor:
    """log q_c - log(1 - q_c): evidence for each cluster against all the others."""
    q = q.clamp(1e-7, 1 - 1e-7)
    return torch.log(q) - torch.log1p(-q)


def smooth(m: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Separable Gaussian smoothing (sigma in grid voxels) of maps (B, *grid)."""
    radius = max(1, int(round(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=m.dtype, device=m.device)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    ndim = m.ndim - 1
    conv = F.conv3d if ndim == 3 else F.conv2d
    out = m.unsqueeze(1)
    for axis in range(ndim):
        shape = [1, 1] + [1] * ndim
        shape[2 + axis] = -1
        pad = [0] * ndim
        pad[axis] = radius
        out = conv(out, g.view(shape), padding=tuple(pad))
    return out[:, 0]


def _baseline(x: torch.Tensor, ctx: ExplainContext) -> torch.Tensor:
    return ctx.baseline if ctx.baseline is not None else torch.zeros_like(x)


def _odds_slope(q: torch.Tensor) -> torch.Tensor:
    """d log-odds / dq of _log_odds: 1 / (q (1 - q)) inside its clamp, 0 where the clamp holds q."""
    inside = (q >= 1e-7) & (q <= 1 - 1e-7)
    qc = q.clamp(1e-7, 1 - 1e-7)
    return torch.where(inside, 1.0 / qc + 1.0 / (1.0 - qc), torch.zeros_like(q))


def _first_step(net: ClusterNet, bias: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """The encoder's affine first step: its input smoothing (linear) and first convolution, before any activation;
    without the bias, its linear part."""
    conv = net.encoder.blocks[0][0]
    fn = F.conv3d if net.arch.ndim == 3 else F.conv2d
    return lambda v: fn(net.encoder.smooth(v), conv.weight, conv.bias if bias else None, conv.stride, conv.padding)


def _first_step_adjoint(net: ClusterNet, g: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The transpose of the first step's linear part applied to gradients g at its outputs: inputs of `shape`."""
    conv = net.encoder.blocks[0][0]
    back = torch.nn.grad.conv3d_input if net.arch.ndim == 3 else torch.nn.grad.conv2d_input
    v = back(list(shape), conv.weight, g, conv.stride, conv.padding)
    smooth = net.encoder.smooth
    return smooth.adjoint(v) if isinstance(smooth, GaussianSmoothing) else v


def _after_first_step(net: ClusterNet, h: torch.Tensor) -> torch.Tensor:
    """Soft assignment q from the first convolution's outputs (before its activation)."""
    a = net.encoder.blocks[0][1:](h)
    for block in net.encoder.blocks[1:]:
        a = block(a)
    return net.soft_assign_features(a)


def ig_attribution(net: ClusterNet, x: torch.Tensor, base: Union[torch.Tensor, Sequence[torch.Tensor]],
                   steps: int = 16) -> torch.Tensor:
    """Signed integrated-gradients attribution (k, C, *grid) of each cluster's log-odds along base -> x (midpoint
    rule, `steps` per baseline), averaged over the baselines when several are given.

    One forward pass over the path points of every baseline and k - 1 backward passes: the q sum to 1, so the last
    cluster's gradient of q is minus the sum of the others' (for k = 2 one backward pass gives both), and the
    gradient of a log-odds is that of q times 1 / (q (1 - q)). The encoder's first step is affine, so along a
    straight path its outputs are those at the baseline plus alpha times its linear part applied to x - baseline
    (one pass per baseline and one for the differences instead of one per path point), and the weighted sums of the
    path points' gradients go back through its transpose once per baseline and cluster: the same attribution as
    Captum's. The path points run channels-last, which the CPU's convolutions take faster.
    """
    if net.k == 1:  # q is 1 everywhere: its log-odds, clamped, do not change
        return torch.zeros((1, *x.shape[1:]), device=x.device, dtype=x.dtype)
    bases = [base] if isinstance(base, torch.Tensor) else list(base)
    n = len(bases)
    alphas = ((torch.arange(steps, device=x.device, dtype=x.dtype) + 0.5) / steps).view(-1, *[1] * (x.ndim - 1))
    deltas = torch.cat([x - b for b in bases])  # (n, C, *grid)
    with torch.no_grad():
        at_base = _first_step(net)(torch.cat(bases))
        along = _first_step(net, bias=False)(deltas)
        h = (at_base.unsqueeze(1) + alphas * along.unsqueeze(1)).flatten(0, 1)
    layout = torch.channels_last_3d if x.ndim == 5 else torch.channels_last
    h = h.contiguous(memory_format=layout).requires_grad_(True)
    with torch.enable_grad():
        q = _after_first_step(net, h)  # (n * steps, k)
        slope = _odds_slope(q.detach()).T.reshape(net.k, n, steps) / (steps * n)
        weights = slope.transpose(0, 1)  # (n, k, steps)
        own, last = [], 0  # per cluster c < k - 1, its weighted gradient sums per baseline; then the last cluster's
        for c in range(net.k - 1):  # each gradient is used for its own cluster and for the last, then freed
            (g,) = torch.autograd.grad(q[:, c].sum(), h, retain_graph=c < net.k - 2)
            g = g.movedim(1, -1)  # channels last: a view without copying
            both = torch.bmm(weights[:, [c, net.k - 1]], g.reshape(n, steps, -1))  # (n, 2, voxels x channels)
            own.append(both[:, 0])
            last = last - both[:, 1]
    with torch.no_grad():
        grads = torch.cat(own + [last]).view(net.k * n, *g.shape[1:]).movedim(-1, 1)  # cluster by cluster
        back = _first_step_adjoint(net, grads.contiguous(), (len(grads), *x.shape[1:])).view(net.k, n, *x.shape[1:])
        out = (back * deltas).sum(1)
    return out


def integrated_gradients(net: ClusterNet, x: torch.Tensor, ctx: ExplainContext, steps: int = 16,
                         sigma: float = 1.0) -> torch.Tensor:
    """Integrated gradients (Sundararajan et al. 2017) of each cluster's log-odds: the evidence for each cluster.

    The attribution is averaged over two baselines, the cohort mean image and the empty lung (zero: the lung
    mean everywhere), steps / 2 each, in one call; its positive part is smoothed over about one grid voxel. From the mean
    alone, a finding missing where the other cluster has one can outweigh the finding present; from the empty
    lung alone, a faint finding carries little weight. CLAM's default map: unlike the faithful CLAM map it finds
    the lesions, and unlike |attribution| it changes when the weights are randomised. With ctx.present_only (findings
    inputs) the map is weighted by where the image itself holds a finding: a finding absent here but present in
    the other cluster is evidence, yet not something to point at.
    """
    empty = torch.zeros_like(x)
    if ctx.baseline is None:
        attribution = ig_attribution(net, x, empty, steps)
    else:
        attribution = ig_attribution(net, x, [ctx.baseline, empty], max(1, steps // 2))
    result = smooth(attribution.sum(1), sigma).clamp_min(0)
    return result * presence(x, sigma) if ctx.present_only else result


def gradient_x_input(net: ClusterNet, x: torch.Tensor, ctx: ExplainContext, sigma: float = 1.0) -> torch.Tensor:
    """Gradient x input (Shrikumar et al. 2016) of each cluster's log-odds, absolute and smoothed; one pass."""
    with torch.enable_grad():
        xk = x.detach().repeat(net.k, *[1] * (x.ndim - 1)).requires_grad_(True)
        odds = _log_odds(net.soft_assign(xk))
        (grad,) = torch.autograd.grad(odds.diagonal().sum(), xk)
    return smooth((grad * x).abs().sum(1).detach(), sigma)


def rise(net: ClusterNet, x: torch.Tensor, ctx: ExplainContext, masks: int = 192, p: float = 0.5) -> torch.Tensor:
    """RISE (Petsiuk et al. 2018): random coarse masks over the cohort mean image, weighted by centred log-odds."""
    grid, cells = tuple(x.shape[2:]), net.arch.feature_grid + 2
    gen = torch.Generator().manual_seed(ctx.seed)
    coarse = (torch.rand((masks, 1) + (cells,) * len(grid), generator=gen) < p).float().to(x.device)
    step = grid[0] // (cells - 1)
    big = _upsample(coarse, tuple(g + step for g in grid))
    shifts = torch.randint(0, step, (masks, len(grid)), generator=gen).tolist()
    m = torch.stack([big[i][(slice(None),) + tuple(slice(s, s + g) for s, g in zip(sh, grid))]
                     for i, sh in enumerate(shifts)])
    base = _baseline(x, ctx)
    odds = _batched(lambda mb: _log_odds(net.soft_assign(base + mb * (x - base))), m, ctx.batch_size)
    weights = odds - odds.mean(0)
    return torch.relu(torch.einsum("nk,n...->k...", weights, m[:, 0]) / (masks * p))


METHODS: dict[str, Callable[[ClusterNet, torch.Tensor, ExplainContext], torch.Tensor]] = {
    "ig": integrated_gradients,
    "clam": clam,
    "scorecam": scorecam,
    "gradient": gradient,
    "gradxinput": gradient_x_input,
    "occlusion": occlusion,
    "rise": rise,
    "random": random_map,
}
DEFAULT_METHOD = "ig"


def resolve_method(method: str) -> str:
    """Canonical method name; 'default' is the product's map."""
    method = DEFAULT_METHOD if method == "default" else method
    if method not in METHODS:
        raise InputError(f"unknown map method {method!r}; choose one of: default, {', '.join(METHODS)}.")
    return method


_NO_GRAD_METHODS = frozenset({"clam", "scorecam", "occlusion", "rise", "random"})  # safe under torch.inference_mode
_FLUSH_EVERY = 16  # images per activations pass; their results stay on the device until one copy to the host


@torch.no_grad()
def explain(net: ClusterNet, x: torch.Tensor, method: str = "default", ctx: Optional[ExplainContext] = None,
            progress: Optional[Callable[[int], None]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Soft assignments (N, k) and maps (N, k, *grid) of a batch (N, C, *grid), every cluster at once."""
    name = resolve_method(method)
    fn = METHODS[name]
    ctx = ctx or ExplainContext()
    net.eval()
    device = next(net.parameters()).device
    if ctx.baseline is not None:
        ctx.baseline = ctx.baseline.to(device)
    qs, maps = [], []
    try:
        with torch.inference_mode(name in _NO_GRAD_METHODS):
            for start in range(0, len(x), _FLUSH_EVERY):
                xc = x[start : start + _FLUSH_EVERY].to(device, non_blocking=True)
                feats = net.encoder.features(xc)  # one batched pass gives q and, for CLAM, the activations
                chunk = []
                for j in range(len(xc)):
                    ctx.features = feats[j : j + 1]
                    chunk.append(fn(net, xc[j : j + 1], ctx).float())
                    if progress is not None:
                        progress(1)
                qs.append(net.soft_assign_features(feats).cpu())  # one host copy per chunk, not per image
                maps.append(torch.stack(chunk).cpu())
    finally:
        ctx.features = None
    if not qs:
        return np.zeros((0, net.k), np.float32), np.zeros((0, net.k, *x.shape[2:]), np.float32)
    return torch.cat(qs).numpy(), torch.cat(maps).numpy()


def normalise_map(m: np.ndarray) -> np.ndarray:
    """A map scaled to 0..1 by its maximum (all zeros stays zeros)."""
    top = float(np.max(m)) if m.size else 0.0
    return (np.clip(m, 0, None) / top).astype(np.float32) if top > 0 else np.zeros_like(m, dtype=np.float32)
