"""Training: autoencoder pretraining, k-means initialisation and DCEC fine-tuning (Guo et al. 2017)."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score
from tqdm.auto import tqdm

from .errors import InputError
from .model import Architecture, ClusterNet

Progress = Callable[[float, str, str], None]
"""Progress callback: fraction done (0..1), stage name, message."""


@dataclass
class TrainConfig:
    """Training settings; k=None chooses k over k_range by the silhouette of the embedding."""

    k: Optional[int] = None
    k_range: tuple[int, int] = (2, 8)
    pretrain_epochs: int = 60
    finetune_epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    gamma: float = 0.1
    tol: float = 0.001
    seed: int = 0
    device: str = "auto"

    def to_dict(self) -> dict:
        """JSON-able form."""
        d = asdict(self)
        d["k_range"] = list(self.k_range)
        return d


@dataclass
class TrainSummary:
    """What training did, for the bundle's model card and the training report."""

    k: int
    n_subjects: int
    device: str
    pretrain_loss: list[float] = field(default_factory=list)
    finetune_loss: list[float] = field(default_factory=list)
    k_table: list[dict] = field(default_factory=list)
    silhouette_kmeans: float = float("nan")
    silhouette_final: float = float("nan")
    finetune_kept: bool = True
    kmeans_labels: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    cluster_sizes: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """JSON-able form."""
        return asdict(self)


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device for 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'gpu' or 'mps'."""
    device = device.lower()
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "gpu":
        device = "cuda" if torch.cuda.is_available() else "mps"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but torch sees no CUDA GPU; use device 'auto' or 'cpu'.")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("device 'mps' was asked for but is not available; use device 'auto' or 'cpu'.")
    return torch.device(device)


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch and return a CPU generator for batch order."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def as_batch(arrays: np.ndarray, arch: Architecture) -> torch.Tensor:
    """Model input tensor (N, 1, *grid) from an array (N, *grid), checked against the architecture."""
    x = torch.as_tensor(np.ascontiguousarray(arrays, dtype=np.float32))
    if x.ndim == arch.ndim + 1:
        x = x.unsqueeze(1)
    if tuple(x.shape[1:]) != arch.input_shape:
        raise InputError(
            f"inputs of shape {tuple(x.shape[1:])} do not fit the model's {arch.input_shape}; "
            "preprocess the images with the model's own preprocessing."
        )
    return x


@torch.no_grad()
def embed(net: ClusterNet, x: torch.Tensor, device: torch.device, batch_size: int = 32) -> torch.Tensor:
    """Raw embeddings z of every input, on the CPU."""
    net.eval()
    return torch.cat([net.encoder(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


def _silhouette(z: np.ndarray, labels: np.ndarray) -> float:
    if len(np.unique(labels)) < 2 or len(np.unique(labels)) >= len(z):
        return float("nan")
    return float(silhouette_score(z, labels))


def _normalise_latent(net: ClusterNet, z: torch.Tensor) -> torch.Tensor:
    """Set the head's centre and scale from the cohort's embeddings; return the normalised embeddings."""
    center = z.mean(0)
    scale = (z - center).pow(2).sum(1).mean().sqrt().clamp_min(1e-8)
    net.head.center.copy_(center.to(net.head.center.device))
    net.head.scale.copy_(scale.to(net.head.scale.device))
    return (z - center) / scale


def target_distribution(q: torch.Tensor) -> torch.Tensor:
    """DEC's sharpened target p_ij = (q_ij^2 / f_j) / sum_j' (q_ij'^2 / f_j')."""
    w = q.pow(2) / q.sum(0)
    return w / w.sum(1, keepdim=True)


def choose_k(zn: np.ndarray, k_values: range, seed: int) -> tuple[int, list[dict], dict[int, KMeans]]:
    """Pick k by the highest silhouette of k-means on the normalised embedding; return the table too."""
    table, fits = [], {}
    for k in k_values:
        km = KMeans(n_clusters=k, n_init=20, random_state=seed).fit(zn)
        fits[k] = km
        several = len(np.unique(km.labels_)) > 1
        table.append(
            {
                "k": k,
                "silhouette": _silhouette(zn, km.labels_),
                "calinski_harabasz": float(calinski_harabasz_score(zn, km.labels_)) if several else float("nan"),
                "davies_bouldin": float(davies_bouldin_score(zn, km.labels_)) if several else float("nan"),
                "inertia": float(km.inertia_),
            }
        )
    best = max(table, key=lambda r: -np.inf if np.isnan(r["silhouette"]) else r["silhouette"])
    for row in table:
        row["chosen"] = row["k"] == best["k"]
    return best["k"], table, fits


class Trainer:
    """Fits a ClusterNet to a cohort: pretrain, k-means, DCEC fine-tuning."""

    def __init__(self, arch: Architecture, config: TrainConfig, progress: Optional[Progress] = None,
                 verbose: bool = True) -> None:
        self.arch, self.config, self.progress, self.verbose = arch, config, progress, verbose
        self.device = resolve_device(config.device)

    def _report(self, fraction: float, stage: str, message: str) -> None:
        if self.progress is not None:
            self.progress(min(max(fraction, 0.0), 1.0), stage, message)

    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=not self.verbose, leave=False, dynamic_ncols=True)

    def pretrain(self, net: ClusterNet, x: torch.Tensor, gen: torch.Generator) -> list[float]:
        """Train the autoencoder on reconstruction (MSE)."""
        cfg, losses = self.config, []
        params = list(net.encoder.parameters()) + list(net.decoder.parameters())
        opt = torch.optim.Adam(params, lr=cfg.lr)
        with self._bar(cfg.pretrain_epochs, "pretrain autoencoder") as bar:
            for epoch in range(cfg.pretrain_epochs):
                net.train()
                total = torch.zeros((), device=self.device)
                for idx in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
                    xb = x[idx].to(self.device)
                    loss = torch.nn.functional.mse_loss(net.decoder(net.encoder(xb)), xb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.detach() * len(idx)
                losses.append(float(total) / len(x))
                bar.set_postfix(mse=f"{losses[-1]:.2e}")
                bar.update()
                self._report(0.6 * (epoch + 1) / cfg.pretrain_epochs, "pretrain", f"epoch {epoch + 1}: mse {losses[-1]:.3e}")
        return losses

    def finetune(self, net: ClusterNet, x: torch.Tensor, gen: torch.Generator) -> tuple[list[float], np.ndarray]:
        """DCEC fine-tuning: gamma * KL(P || Q) + MSE, target and latent normalisation refreshed each epoch."""
        cfg, losses = self.config, []
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        labels_prev = None
        with self._bar(cfg.finetune_epochs, "fine-tune clustering") as bar:
            for epoch in range(cfg.finetune_epochs):
                z = embed(net, x, self.device)
                with torch.no_grad():
                    _normalise_latent(net, z.to(self.device))
                    q = net.head(z.to(self.device)).cpu()
                p = target_distribution(q)
                labels = q.argmax(1).numpy()
                if labels_prev is not None and np.mean(labels != labels_prev) < cfg.tol:
                    break
                labels_prev = labels
                net.train()
                total = torch.zeros((), device=self.device)
                for idx in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
                    xb, pb = x[idx].to(self.device), p[idx].to(self.device)
                    zb = net.encoder(xb)
                    qb = net.head(zb)
                    kl = torch.nn.functional.kl_div(qb.clamp_min(1e-12).log(), pb, reduction="batchmean")
                    loss = cfg.gamma * kl + torch.nn.functional.mse_loss(net.decoder(zb), xb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.detach() * len(idx)
                losses.append(float(total) / len(x))
                bar.set_postfix(loss=f"{losses[-1]:.2e}")
                bar.update()
                self._report(0.65 + 0.35 * (epoch + 1) / cfg.finetune_epochs, "finetune", f"epoch {epoch + 1}: loss {losses[-1]:.3e}")
        z = embed(net, x, self.device)
        with torch.no_grad():
            _normalise_latent(net, z.to(self.device))
            labels = net.head(z.to(self.device)).argmax(1).cpu().numpy()
        return losses, labels

    def pretrained(self, arrays: np.ndarray) -> tuple[ClusterNet, list[float]]:
        """An autoencoder pretrained on an array (N, *grid), to fine-tune for several k."""
        gen = seed_everything(self.config.seed)
        net = ClusterNet(self.arch, self.config.k or 1).to(self.device)
        return net, self.pretrain(net, as_batch(arrays, self.arch), gen)

    def fit(self, arrays: np.ndarray, net: Optional[ClusterNet] = None) -> tuple[ClusterNet, TrainSummary]:
        """Train on an array (N, *grid) of preprocessed images; pass a pretrained net to skip pretraining."""
        cfg, start = self.config, time.perf_counter()
        x = as_batch(arrays, self.arch)
        n = len(x)
        k_values = range(cfg.k, cfg.k + 1) if cfg.k else range(cfg.k_range[0], cfg.k_range[1] + 1)
        if cfg.k is not None and cfg.k < 1:
            raise InputError(f"k must be at least 1, not {cfg.k}.")
        if n < max(k_values) + 1:
            raise InputError(f"{n} images cannot form {max(k_values)} clusters; give more images or a smaller k.")
        gen = seed_everything(cfg.seed)
        if net is None:
            net = ClusterNet(self.arch, max(k_values)).to(self.device)
            pretrain_loss = self.pretrain(net, x, gen)
        else:
            net = copy.deepcopy(net).to(self.device)
            pretrain_loss = []
        z = embed(net, x, self.device)
        with torch.no_grad():
            zn = _normalise_latent(net, z.to(self.device)).cpu().numpy()
        self._report(0.62, "kmeans", "k-means on the embedding")
        k, table, fits = choose_k(zn, k_values, cfg.seed)
        km = fits[k]
        final = ClusterNet(self.arch, k).to(self.device)
        state = {name: t for name, t in net.state_dict().items() if not name.startswith("head.centroids")}
        final.load_state_dict(state, strict=False)
        with torch.no_grad():
            final.head.centroids.copy_(torch.as_tensor(km.cluster_centers_, dtype=torch.float32))
        start_state = copy.deepcopy(final.state_dict())
        sil_start = _silhouette(zn, km.labels_)
        finetune_loss, labels = self.finetune(final, x, gen) if k > 1 else ([], km.labels_.copy())
        zn_end = final.head.normalise(embed(final, x, self.device).to(self.device)).detach().cpu().numpy()
        sil_end = _silhouette(zn_end, labels)
        kept = bool(len(np.unique(labels)) == len(np.unique(km.labels_)) and not (sil_end < sil_start))
        if not kept:
            final.load_state_dict(start_state)
            labels = km.labels_.copy()
        summary = TrainSummary(
            k=k, n_subjects=n, device=str(self.device), pretrain_loss=pretrain_loss, finetune_loss=finetune_loss,
            k_table=table, silhouette_kmeans=sil_start, silhouette_final=sil_end if kept else sil_start,
            finetune_kept=kept, kmeans_labels=km.labels_.tolist(), labels=[int(v) for v in labels],
            cluster_sizes=np.bincount(labels, minlength=k).tolist(), seconds=time.perf_counter() - start,
        )
        self._report(1.0, "done", f"k={k}, cluster sizes {summary.cluster_sizes}")
        return final.eval(), summary
