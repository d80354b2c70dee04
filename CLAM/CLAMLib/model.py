"""The convolutional autoencoder of DCEC/CLAM (2D or 3D) and its Student-t clustering head."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import InputError

SMOOTH_PER_GRID = 16
HEADS = ("dense", "zones", "dense+zones")


def default_head(ndim: int) -> str:
    """Clustering head used unless one is asked for: "dense+zones" for 3D models, the paper's "dense" for 2D ones."""
    return "dense+zones" if ndim == 3 else "dense"


def default_smooth(grid: int) -> float:
    """Input smoothing (sigma, grid voxels) used unless one is asked for: grid / 16, 4 voxels at grid 64."""
    return grid / SMOOTH_PER_GRID


@dataclass
class Architecture:
    """Shape of the autoencoder; the defaults are the paper's (three stride-2 blocks, 60-d embedding).

    ``smooth`` > 0 puts a fixed Gaussian of that sigma (model-grid voxels) in front of the encoder, and the
    autoencoder reconstructs the smoothed input: clusters then tolerate lesions that lie a voxel or two apart
    between scans, while maps are still computed on the unsmoothed input.
    """

    ndim: int = 3
    grid: int = 88
    filters: tuple[int, ...] = (16, 32, 64)
    kernel: int = 4
    stride: int = 2
    embedding: int = 60
    negative_slope: float = 0.1
    in_channels: int = 1
    smooth: float = 0.0
    head: str = "dense"

    def __post_init__(self) -> None:
        self.filters = tuple(int(f) for f in self.filters)
        if self.head not in HEADS:
            raise InputError(f"head must be one of {', '.join(HEADS)}, not {self.head!r}.")
        if not (math.isfinite(self.smooth) and self.smooth >= 0):
            raise InputError(f"smooth must be 0 (off) or a Gaussian sigma in grid voxels, not {self.smooth}.")
        if self.ndim not in (2, 3):
            raise InputError(f"ndim must be 2 or 3, not {self.ndim}.")
        if (self.kernel - self.stride) % 2:
            raise InputError(
                f"kernel {self.kernel} and stride {self.stride} must differ by an even number so that "
                "each block divides the grid exactly; use kernel 4 with stride 2 (the paper's)."
            )
        factor = self.stride ** len(self.filters)
        if self.grid % factor or self.grid < factor:
            raise InputError(
                f"grid {self.grid} must be a multiple of {factor} (stride {self.stride} over "
                f"{len(self.filters)} blocks); try {max(factor, round(self.grid / factor) * factor)}."
            )

    @property
    def feature_grid(self) -> int:
        """Side of the last encoder block's activation grid."""
        return self.grid // self.stride ** len(self.filters)

    @property
    def head_blocks(self) -> tuple[int, ...]:
        """Sizes of the parts of what the clustering head reads (the embedding, the zone means), in order."""
        return {"dense": (self.embedding,), "zones": (2 * self.filters[-1],),
                "dense+zones": (self.embedding, 2 * self.filters[-1])}[self.head]

    @property
    def head_inputs(self) -> int:
        """Number of values the clustering head reads per image."""
        return sum(self.head_blocks)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one model input without the batch axis."""
        return (self.in_channels,) + (self.grid,) * self.ndim

    def to_dict(self) -> dict:
        """JSON-able form."""
        d = asdict(self)
        d["filters"] = list(self.filters)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Architecture:
        """Inverse of to_dict."""
        return cls(**{k: (tuple(v) if k == "filters" else v) for k, v in d.items()})


def _conv(ndim: int):
    return nn.Conv3d if ndim == 3 else nn.Conv2d


def _deconv(ndim: int):
    return nn.ConvTranspose3d if ndim == 3 else nn.ConvTranspose2d


class GaussianSmoothing(nn.Module):
    """Fixed Gaussian of sigma voxels along every spatial axis of a (grid,)*ndim input (edges replicated, truncated
    at 4 sigma), applied as one small matrix per axis."""

    def __init__(self, sigma: float, ndim: int, grid: int) -> None:
        super().__init__()
        radius = max(1, int(4.0 * sigma + 0.5))
        offsets = torch.arange(-radius, radius + 1)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = kernel / kernel.sum()
        matrix = torch.zeros(grid, grid)
        rows = torch.arange(grid)
        for offset, weight in zip(offsets.tolist(), kernel.tolist()):
            matrix[rows, (rows + offset).clamp(0, grid - 1)] += weight
        self.register_buffer("matrix", matrix, persistent=False)
        self.ndim = ndim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The smoothed batch (N, C, *grid)."""
        return self._along_axes(x, self.matrix.T)

    def adjoint(self, g: torch.Tensor) -> torch.Tensor:
        """The transpose of this smoothing applied to a batch: carries gradients back through it."""
        return self._along_axes(g, self.matrix)

    def _along_axes(self, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """x times `matrix` along each spatial axis, as batched products on views (no transposed copies)."""
        shape = x.shape
        x = x.contiguous()
        for axis in range(2, 2 + self.ndim):
            inner = math.prod(shape[axis + 1 :])
            if inner == 1:
                x = x @ matrix
            else:
                x = torch.matmul(matrix.T, x.reshape(-1, shape[axis], inner))
        return x.reshape(shape)


class Encoder(nn.Module):
    """Strided convolution blocks (each with LeakyReLU), then a dense embedding."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.smooth = GaussianSmoothing(arch.smooth, arch.ndim, arch.grid) if arch.smooth > 0 else nn.Identity()
        conv, pad = _conv(arch.ndim), (arch.kernel - arch.stride) // 2
        chans = (arch.in_channels,) + arch.filters
        self.blocks = nn.ModuleList(
            nn.Sequential(conv(chans[i], chans[i + 1], arch.kernel, arch.stride, pad), nn.LeakyReLU(arch.negative_slope))
            for i in range(len(arch.filters))
        )
        self.embed = nn.Linear(arch.filters[-1] * arch.feature_grid**arch.ndim, arch.embedding)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Activations of the last encoder block (after its LeakyReLU)."""
        x = self.smooth(x)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding z of a batch."""
        return self.embed(self.features(x).flatten(1))


class Decoder(nn.Module):
    """Mirror of the encoder: dense, reshape, transposed convolutions."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        deconv, pad = _deconv(arch.ndim), (arch.kernel - arch.stride) // 2
        self.shape = (arch.filters[-1],) + (arch.feature_grid,) * arch.ndim
        self.dense = nn.Sequential(
            nn.Linear(arch.embedding, arch.filters[-1] * arch.feature_grid**arch.ndim),
            nn.LeakyReLU(arch.negative_slope),
        )
        chans = arch.filters[::-1] + (arch.in_channels,)
        layers: list[nn.Module] = []
        for i in range(len(arch.filters)):
            layers.append(deconv(chans[i], chans[i + 1], arch.kernel, arch.stride, pad))
            if i < len(arch.filters) - 1:
                layers.append(nn.LeakyReLU(arch.negative_slope))
        self.blocks = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction of a batch of embeddings."""
        return self.blocks(self.dense(z).view(-1, *self.shape))


class ClusterHead(nn.Module):
    """Student-t soft assignment (alpha = 1) of a cohort-centred, cohort-scaled embedding to k centroids."""

    def __init__(self, k: int, embedding: int) -> None:
        super().__init__()
        self.centroids = nn.Parameter(torch.zeros(k, embedding))
        self.register_buffer("center", torch.zeros(embedding))
        self.register_buffer("scale", torch.ones(embedding))

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """Embedding centred and scaled by the cohort's statistics."""
        return (z - self.center) / self.scale

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Unnormalised log soft assignment, -log(1 + |z - mu_j|^2)."""
        d2 = torch.cdist(self.normalise(z), self.centroids).pow(2)
        return -torch.log1p(d2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Soft assignment q (rows sum to 1)."""
        return torch.softmax(self.logits(z), dim=1)


class ClusterNet(nn.Module):
    """The DCEC network: autoencoder plus clustering head."""

    def __init__(self, arch: Architecture, k: int) -> None:
        super().__init__()
        if k < 1:
            raise InputError(f"k must be at least 1, not {k}.")
        self.arch, self.k = arch, k
        self.encoder = Encoder(arch)
        self.decoder = Decoder(arch)
        self.head = ClusterHead(k, arch.head_inputs)

    def head_input(self, a: torch.Tensor) -> torch.Tensor:
        """What the clustering head reads, from last-block activations: the embedding, the zone means, or both."""
        parts = []
        if self.arch.head in ("dense", "dense+zones"):
            parts.append(self.encoder.embed(a.flatten(1)))
        if self.arch.head in ("zones", "dense+zones"):
            pool = nn.functional.adaptive_avg_pool3d if a.ndim == 5 else nn.functional.adaptive_avg_pool2d
            parts.append(pool(a, (2,) + (1,) * (a.ndim - 3)).flatten(1))
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft assignment and reconstruction of a batch."""
        a = self.encoder.features(x)
        return self.head(self.head_input(a)), self.decoder(self.encoder.embed(a.flatten(1)))

    def soft_assign(self, x: torch.Tensor) -> torch.Tensor:
        """Soft assignment q of a batch of images."""
        return self.soft_assign_features(self.encoder.features(x))

    def soft_assign_features(self, a: torch.Tensor) -> torch.Tensor:
        """Soft assignment q from last-block activations."""
        return self.head(self.head_input(a))
