"""Training: autoencoder pretraining, k-means initialisation and DCEC fine-tuning (Guo et al. 2017)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score
from tqdm.auto import tqdm

from .distributed import SINGLE, DistContext
from .errors import InputError
from .imageio import atomic_path
from .model import Architecture, ClusterNet

Progress = Callable[[float, str, str], None]
"""Progress callback: fraction done (0..1), stage name, message."""

CHECKPOINT_FORMAT = "clam-checkpoint"
CHECKPOINT_VERSION = 2
CHECKPOINT_CARD = "checkpoint.json"
EXIT_AFTER_BATCHES_ENV = "CLAM_EXIT_AFTER_BATCHES"
"""Test hook: when set to N > 0, the training process exits abruptly (code 75) after N optimiser steps."""
EXIT_CODE = 75


@dataclass
class TrainConfig:
    """Training settings; k=None chooses k over k_range by the silhouette of the embedding.

    ``restarts`` autoencoders are pretrained from seeds seed, seed + 1, ...; the one whose k-means partition has the
    highest silhouette is fine-tuned (as k-means keeps the best of its initialisations).
    """

    k: Optional[int] = None
    k_range: tuple[int, int] = (2, 8)
    restarts: int = 1
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
    restarts: list[dict] = field(default_factory=list)
    silhouette_kmeans: float = float("nan")
    silhouette_final: float = float("nan")  # of the final labels, in the k-means start's embedding
    reconstruction_r2: float = float("nan")  # of the kept autoencoder before fine-tuning: see reconstruction_r2
    finetune_kept: bool = True
    kmeans_labels: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    cluster_sizes: list[int] = field(default_factory=list)
    head: str = "dense"
    dense_labels: list[int] = field(default_factory=list)  # of the fine-tuned dense head, before another head
    silhouette_head: float = float("nan")  # of the final labels, in what another head reads
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """JSON-able form."""
        return asdict(self)


@dataclass
class Pretrained:
    """An autoencoder pretrained from one seed: the network and its loss per epoch."""

    net: ClusterNet
    loss: list[float]
    seed: int


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device for 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'gpu' or 'mps'."""
    device = device.lower()
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "gpu":
        if not (torch.cuda.is_available() or mps):
            raise InputError("device 'gpu' was asked for but torch sees neither a CUDA nor an Apple (MPS) GPU; "
                             "use --device auto or cpu")
        device = "cuda" if torch.cuda.is_available() else "mps"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device '{device}' was asked for but torch sees no CUDA GPU; use --device auto or cpu")
    if device == "mps" and not mps:
        raise InputError("device 'mps' was asked for but is not available; use --device auto or cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"unknown device {device!r} ({exc}); use --device auto, cpu, cuda, gpu or mps") from None


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
    """What the clustering head reads of every input (the raw embeddings z for the dense head), on the CPU."""
    net.eval()
    return torch.cat([net.head_input(net.encoder.features(x[i : i + batch_size].to(device))).cpu()
                      for i in range(0, len(x), batch_size)])


@torch.no_grad()
def reconstruction_r2(net: ClusterNet, x: torch.Tensor, device: torch.device, batch_size: int = 32) -> float:
    """Share of how the inputs differ from their mean that the autoencoder reconstructs (1 - SSE / SS about the mean)."""
    net.eval()
    def batches():
        return (x[i : i + batch_size].to(device) for i in range(0, len(x), batch_size))

    mean = sum(_target(net, xb).sum(0) for xb in batches()) / len(x)
    sse = total = 0.0
    for xb in batches():
        target = _target(net, xb)
        sse += float((net.decoder(net.encoder(xb)) - target).pow(2).sum())
        total += float((target - mean).pow(2).sum())
    return 1.0 - sse / total if total > 0 else float("nan")


def _silhouette(z: np.ndarray, labels: np.ndarray) -> float:
    if len(np.unique(labels)) < 2 or len(np.unique(labels)) >= len(z):
        return float("nan")
    return float(silhouette_score(z, labels))


def _normalise_latent(net: ClusterNet, z: torch.Tensor) -> torch.Tensor:
    """Set the head's centre and scale from the cohort's head inputs; return the normalised inputs.

    Each dimension is standardised, then each part the head reads (the embedding, the zone means) is divided by
    sqrt(its dimensions * number of parts), so that the cohort's mean squared norm is 1 and every part weighs the
    same: no single dimension or part dominates k-means, and Student-t distances stay of order 1 (without that,
    soft assignments sit near 1/k and DCEC fine-tuning collapses into one cluster).
    """
    blocks = net.arch.head_blocks
    weight = torch.cat([torch.full((b,), float(b * len(blocks)) ** 0.5) for b in blocks]).to(z.device)
    center = z.mean(0)
    scale = ((z - center).pow(2).mean(0).sqrt() * weight).clamp_min(1e-8)
    net.head.center.copy_(center.to(net.head.center.device))
    net.head.scale.copy_(scale.to(net.head.scale.device))
    return (z - center) / scale


@torch.no_grad()
def _target(net: ClusterNet, x: torch.Tensor) -> torch.Tensor:
    """What the autoencoder reconstructs: the input as the encoder sees it (smoothed when the architecture says so)."""
    return net.encoder.smooth(x)


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


class _AutoEncoder(torch.nn.Module):
    """The encoder and decoder of a ClusterNet as one module (for DistributedDataParallel in pretraining)."""

    def __init__(self, net: ClusterNet) -> None:
        super().__init__()
        self.encoder, self.decoder = net.encoder, net.decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of a batch."""
        return self.decoder(self.encoder(x))


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser's state as named tensors plus its JSON-able parameter groups (no pickle)."""
    sd = opt.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for name, value in state.items():
            tensors[f"optim.{pid}.{name}"] = (value if torch.is_tensor(value) else torch.tensor(value)).detach().cpu()
    return tensors, {"param_groups": sd["param_groups"]}


def _unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of _flatten_optimizer, loaded into `opt`."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class Checkpoint:
    """Training state saved after every epoch: safetensors (weights, optimiser, random state) plus a JSON card.

    Each save writes a new state file, then atomically replaces checkpoint.json that names it, then removes
    older state files, so an interruption at any moment leaves a complete, consistent checkpoint.
    """

    def __init__(self, folder: Union[str, Path]) -> None:
        self.folder = Path(folder)

    def exists(self) -> bool:
        """True when a checkpoint card is present."""
        return (self.folder / CHECKPOINT_CARD).is_file()

    def save(self, stage: str, epoch: int, fingerprint: str, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Write the state of `stage` after `epoch` completed epochs."""
        from safetensors.torch import save_file

        from .fingerprint import sha256_file

        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"state-{stage}-{epoch:05d}.safetensors"
        with atomic_path(self.folder / name) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        card = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "stage": stage, "epoch": epoch,
                "fingerprint": fingerprint, "file": name, "sha256": sha256_file(self.folder / name), "meta": meta}
        with atomic_path(self.folder / CHECKPOINT_CARD) as tmp:
            Path(tmp).write_text(json.dumps(card, indent=1) + "\n")
        for old in self.folder.glob("state-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def load(self, fingerprint: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """The card and tensors of the checkpoint, checked against this run's data and settings."""
        from safetensors.torch import load_file

        from .fingerprint import sha256_file

        fix = f"delete {self.folder} to start afresh, or drop --resume"
        try:
            card = json.loads((self.folder / CHECKPOINT_CARD).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"checkpoint {self.folder} cannot be read ({exc}); {fix}.") from exc
        if card.get("format") != CHECKPOINT_FORMAT or card.get("version") != CHECKPOINT_VERSION:
            raise InputError(f"{self.folder / CHECKPOINT_CARD} is not a CLAM checkpoint of version "
                             f"{CHECKPOINT_VERSION}; {fix}.")
        if card.get("fingerprint") != fingerprint:
            raise InputError(f"checkpoint {self.folder} was made with other scans or training settings than this "
                             f"run; give the same scans and options as the interrupted run, or {fix}.")
        state = self.folder / card["file"]
        if not state.is_file() or sha256_file(state) != card.get("sha256"):
            raise InputError(f"checkpoint state {state} is missing or damaged; {fix}.")
        return card, load_file(str(state))

    def describe(self) -> str:
        """Where the saved run stands, in words (e.g. 'pretraining restart 1, 3 epochs done')."""
        try:
            card = json.loads((self.folder / CHECKPOINT_CARD).read_text())
            meta, epochs = card.get("meta", {}), int(card["epoch"])
            done = f"{epochs} epoch{'' if epochs == 1 else 's'} done"
            if card["stage"] == "pretrain":
                return f"autoencoder pretraining, restart {int(meta.get('restart', 0)) + 1}, {done}"
            return f"fine-tuning, {done}"
        except (OSError, ValueError, KeyError, TypeError):
            return "an unreadable checkpoint card"

    def remove(self) -> None:
        """Delete the checkpoint (after the bundle is safely written)."""
        for f in list(self.folder.glob("state-*.safetensors")) + [self.folder / CHECKPOINT_CARD]:
            f.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass


class Trainer:
    """Fits a ClusterNet to a cohort: pretrain, k-means, DCEC fine-tuning.

    With `checkpoint` it saves its state after every epoch and, with `resume`, continues from the saved state to
    the same result as an uninterrupted run. With a multi-process `dist` context (torchrun) it trains with
    DistributedDataParallel on shares of the same global batches; only rank 0 writes checkpoints.
    """

    def __init__(self, arch: Architecture, config: TrainConfig, progress: Optional[Progress] = None,
                 verbose: bool = True, checkpoint: Optional[Union[str, Path]] = None, resume: bool = False,
                 dist: Optional[DistContext] = None) -> None:
        self.arch, self.config, self.progress, self.verbose = arch, config, progress, verbose
        self._dense = replace(arch, head="dense")  # pretraining and DCEC fine-tuning run on the dense embedding
        self.device = resolve_device(config.device)
        self.dist = dist or SINGLE
        self.checkpoint = Checkpoint(checkpoint) if checkpoint is not None else None
        self.resume = resume
        self._fingerprint = ""
        self._saved: Optional[tuple[dict, dict[str, torch.Tensor]]] = None
        self._stage_meta: dict[str, Any] = {}
        self._stage_tensors: dict[str, torch.Tensor] = {}
        self._batches = 0
        self._exit_after = int(os.environ.get(EXIT_AFTER_BATCHES_ENV, "0") or 0)

    def _report(self, fraction: float, stage: str, message: str) -> None:
        if self.progress is not None and self.dist.main:
            self.progress(min(max(fraction, 0.0), 1.0), stage, message)

    def _bar(self, total: int, desc: str, initial: int = 0):
        return tqdm(total=total, initial=initial, desc=desc, disable=not (self.verbose and self.dist.main),
                    leave=False, dynamic_ncols=True)

    # -- distributed and checkpoint plumbing ---------------------------------------------------------------

    def _parallel(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module wrapped in DistributedDataParallel when several processes train, else itself."""
        if not self.dist.active:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" and self.device.index is not None else None
        return DistributedDataParallel(module, device_ids=ids)

    def _step(self, opt: torch.optim.Optimizer, loss: torch.Tensor, weight: float) -> None:
        """One optimiser step; under DDP the loss is weighted so that the averaged gradient is the global mean."""
        opt.zero_grad(set_to_none=True)
        (loss * weight if self.dist.active else loss).backward()
        opt.step()
        self._batches += 1
        if self._exit_after and self._batches >= self._exit_after:
            os._exit(EXIT_CODE)  # test hook: an abrupt interruption, no clean-up

    def _fingerprint_of(self, x: torch.Tensor) -> str:
        """SHA-256 of the training data and every setting that changes the result."""
        h = hashlib.sha256(x.numpy().tobytes())
        settings = {k: v for k, v in self.config.to_dict().items() if k != "device"}
        h.update(json.dumps({"config": settings, "arch": self.arch.to_dict()}, sort_keys=True).encode())
        return h.hexdigest()

    def _save(self, stage: str, epoch: int, net: ClusterNet, opt: torch.optim.Optimizer, gen: torch.Generator,
              meta: dict) -> None:
        if self.checkpoint is None or not self.dist.main:
            return
        tensors, opt_meta = _flatten_optimizer(opt)
        tensors.update({f"net.{k}": v for k, v in net.state_dict().items()})
        tensors["generator"] = gen.get_state()
        tensors.update(self._stage_tensors)
        self.checkpoint.save(stage, epoch, self._fingerprint, {**self._stage_meta, **meta, "optimizer": opt_meta,
                                                               "k": net.k}, tensors)

    def _restore(self, stage: str, net: ClusterNet, opt: torch.optim.Optimizer, gen: torch.Generator) -> int:
        """Load a saved state of `stage` into net, optimiser and generator; the number of epochs already done."""
        if self._saved is None or self._saved[0]["stage"] != stage:
            return 0
        card, tensors = self._saved
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        _unflatten_optimizer(opt, tensors, card["meta"]["optimizer"])
        gen.set_state(tensors["generator"].clone())
        return int(card["epoch"])

    # -- the stages ----------------------------------------------------------------------------------------

    def pretrain(self, net: ClusterNet, x: torch.Tensor, gen: torch.Generator) -> list[float]:
        """Train the autoencoder on reconstruction (MSE)."""
        cfg = self.config
        params = list(net.encoder.parameters()) + list(net.decoder.parameters())
        opt = torch.optim.Adam(params, lr=cfg.lr)
        first = self._restore("pretrain", net, opt, gen)
        losses: list[float] = list(self._saved[0]["meta"]["pretrain_loss"]) if first else []
        model = self._parallel(_AutoEncoder(net))
        with self._bar(cfg.pretrain_epochs, "pretrain autoencoder", first) as bar:
            for epoch in range(first, cfg.pretrain_epochs):
                net.train()
                total = torch.zeros((), device=self.device)
                for idx in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
                    local, weight = self.dist.share(idx)
                    xb = x[local].to(self.device)
                    loss = torch.nn.functional.mse_loss(model(xb), _target(net, xb))
                    self._step(opt, loss, weight)
                    total += loss.detach() * (len(local) if weight else 0)
                losses.append(float(self.dist.all_sum(total)) / len(x))
                bar.set_postfix(mse=f"{losses[-1]:.2e}")
                bar.update()
                self._save("pretrain", epoch + 1, net, opt, gen, {"pretrain_loss": losses})
                self._report(0.6 * (epoch + 1) / cfg.pretrain_epochs, "pretrain", f"epoch {epoch + 1}: mse {losses[-1]:.3e}")
        return losses

    def finetune(self, net: ClusterNet, x: torch.Tensor, gen: torch.Generator) -> tuple[list[float], np.ndarray]:
        """DCEC fine-tuning: gamma * KL(P || Q) + MSE, target and latent normalisation refreshed each epoch."""
        cfg = self.config
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        first = self._restore("finetune", net, opt, gen)
        meta = self._saved[0]["meta"] if first else {}
        losses: list[float] = list(meta.get("finetune_loss", []))
        labels_prev = np.asarray(meta["labels_prev"]) if meta.get("labels_prev") is not None else None
        if self._saved is None or self._saved[0]["stage"] != "finetune":
            self._save("finetune", 0, net, opt, gen, {"finetune_loss": [], "labels_prev": None})
        model = self._parallel(net)
        with self._bar(cfg.finetune_epochs, "fine-tune clustering", first) as bar:
            for epoch in range(first, cfg.finetune_epochs):
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
                    local, weight = self.dist.share(idx)
                    xb, pb = x[local].to(self.device), p[local].to(self.device)
                    qb, recon = model(xb)
                    kl = torch.nn.functional.kl_div(qb.clamp_min(1e-12).log(), pb, reduction="batchmean")
                    loss = cfg.gamma * kl + torch.nn.functional.mse_loss(recon, _target(net, xb))
                    self._step(opt, loss, weight)
                    total += loss.detach() * (len(local) if weight else 0)
                losses.append(float(self.dist.all_sum(total)) / len(x))
                bar.set_postfix(loss=f"{losses[-1]:.2e}")
                bar.update()
                self._save("finetune", epoch + 1, net, opt, gen,
                           {"finetune_loss": losses, "labels_prev": labels_prev.tolist()})
                self._report(0.65 + 0.35 * (epoch + 1) / cfg.finetune_epochs, "finetune", f"epoch {epoch + 1}: loss {losses[-1]:.3e}")
        z = embed(net, x, self.device)
        with torch.no_grad():
            _normalise_latent(net, z.to(self.device))
            labels = net.head(z.to(self.device)).argmax(1).cpu().numpy()
        return losses, labels

    def pretrained(self, arrays: np.ndarray) -> list[Pretrained]:
        """Autoencoders pretrained on an array (N, *grid), one per restart, to fine-tune for several k."""
        x = as_batch(arrays, self.arch)
        return [self._pretrain_restart(x, r, max(self.config.k or 1, 1)) for r in range(self._restarts())]

    def _restarts(self) -> int:
        if int(self.config.restarts) < 1:
            raise InputError(f"restarts must be at least 1, not {self.config.restarts}.")
        return 1 if self.config.k == 1 else int(self.config.restarts)

    def _pretrain_restart(self, x: torch.Tensor, restart: int, k: int) -> Pretrained:
        """Pretrain one autoencoder from seed + restart."""
        seed = self.config.seed + restart
        gen = seed_everything(seed)
        net = ClusterNet(self._dense, k).to(self.device)
        return Pretrained(net, self.pretrain(net, x, gen), seed)

    def _scored(self, candidate: Pretrained, x: torch.Tensor, k_values: range) -> dict[str, Any]:
        """k-means on a pretrained autoencoder's normalised embedding, for every k: the chosen k and its fit."""
        z = embed(candidate.net, x, self.device)
        with torch.no_grad():
            zn = _normalise_latent(candidate.net, z.to(self.device)).cpu().numpy()
        k, table, fits = choose_k(zn, k_values, candidate.seed)
        row = next(r for r in table if r["k"] == k)
        return {"candidate": candidate, "k": k, "table": table, "kmeans": fits[k], "silhouette": row["silhouette"],
                "reconstruction_r2": reconstruction_r2(candidate.net, x, self.device)}

    def _best_restart(self, x: torch.Tensor, k_values: range,
                      given: Optional[list[Pretrained]]) -> tuple[dict[str, Any], list[dict]]:
        """Pretrain (or take) every restart and keep the one whose k-means partition has the highest silhouette.

        Under a checkpoint, the best restart so far is saved with each epoch, so a resumed run continues the
        interrupted restart and still compares it with those finished before.
        """
        def better(a: dict[str, Any], b: Optional[dict[str, Any]]) -> bool:
            return b is None or (np.nan_to_num(a["silhouette"], nan=-np.inf) >
                                 np.nan_to_num(b["silhouette"], nan=-np.inf))

        best: Optional[dict[str, Any]] = None
        rows: list[dict] = []
        first = 0
        if given is None and self._saved is not None and self._saved[0]["stage"] == "pretrain":
            meta, tensors = self._saved[0]["meta"], self._saved[1]
            first, rows = int(meta["restart"]), list(meta["restarts"])
            if rows:
                kept = next(r for r in rows if r["best"])
                net = ClusterNet(self._dense, max(k_values)).to(self.device)
                net.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("best.")})
                best = self._scored(Pretrained(net, list(meta["best_loss"]), kept["seed"]), x, k_values)
        total = len(given) if given is not None else self._restarts()
        for r in range(first, total):
            if given is not None:
                candidate = given[r]
            else:
                self._stage_meta = {"restart": r, "restarts": rows,
                                    "best_loss": best["candidate"].loss if best else []}
                self._stage_tensors = ({f"best.{k}": v for k, v in best["candidate"].net.state_dict().items()}
                                       if best else {})
                candidate = self._pretrain_restart(x, r, max(k_values))
                self._saved = None  # only the interrupted restart resumes from the checkpoint
            scored = self._scored(candidate, x, k_values)
            if better(scored, best):
                best = scored
            rows.append({"restart": r, "seed": candidate.seed, "k": scored["k"], "silhouette": scored["silhouette"],
                         "reconstruction_r2": scored["reconstruction_r2"], "best": False})
            for row in rows:
                row["best"] = row["seed"] == best["candidate"].seed
        return best, rows

    @torch.no_grad()
    def _fit_head(self, dense: ClusterNet, x: torch.Tensor, k: int, seed: int) -> tuple[ClusterNet, np.ndarray, float]:
        """The trained autoencoder with this architecture's head (zones, dense+zones), fitted by k-means on what it reads."""
        self._report(0.99, "head", f"k-means on the {self.arch.head} head's inputs")
        net = ClusterNet(self.arch, k).to(self.device)
        net.load_state_dict({n: t for n, t in dense.state_dict().items() if not n.startswith("head.")}, strict=False)
        h = embed(net, x, self.device)
        hn = _normalise_latent(net, h.to(self.device)).cpu().numpy()
        km = KMeans(n_clusters=k, n_init=20, random_state=seed).fit(hn) if k > 1 else None
        if km is not None:
            net.head.centroids.copy_(torch.as_tensor(km.cluster_centers_, dtype=torch.float32))
        labels = net.head(h.to(self.device)).argmax(1).cpu().numpy()
        return net.eval(), labels, _silhouette(hn, labels)

    def fit(self, arrays: np.ndarray, pretrained: Optional[list[Pretrained]] = None) -> tuple[ClusterNet, TrainSummary]:
        """Train on an array (N, *grid) of preprocessed images; pass pretrained autoencoders to skip pretraining."""
        cfg, start = self.config, time.perf_counter()
        x = as_batch(arrays, self.arch)
        n = len(x)
        k_values = range(cfg.k, cfg.k + 1) if cfg.k else range(cfg.k_range[0], cfg.k_range[1] + 1)
        if cfg.k is not None and cfg.k < 1:
            raise InputError(f"k must be at least 1, not {cfg.k}.")
        if n < max(k_values) + 1:
            raise InputError(f"{n} images cannot form {max(k_values)} clusters; give more images or a smaller k.")
        self._restarts()
        if pretrained is not None and not pretrained:
            raise InputError("pretrained is an empty list; pass None to pretrain here.")
        if self.checkpoint is not None:
            self._fingerprint = self._fingerprint_of(x) + ("" if pretrained is None else ":pretrained")
            if self.resume and self.checkpoint.exists():
                self._saved = self.checkpoint.load(self._fingerprint)
        resumed_finetune = self._saved is not None and self._saved[0]["stage"] == "finetune"
        if resumed_finetune:
            meta, tensors = self._saved[0]["meta"], self._saved[1]
            pretrain_loss, k, table = list(meta["pretrain_loss"]), int(meta["k"]), meta["k_table"]
            km_labels, sil_start = np.asarray(meta["kmeans_labels"]), float(meta["silhouette_kmeans"])
            restarts, seed = meta["restarts"], int(meta["seed"])
            start_state = {k_[6:]: v.clone() for k_, v in tensors.items() if k_.startswith("start.")}
            final = ClusterNet(self._dense, k).to(self.device)
            self._stage_meta = {key: meta[key] for key in ("pretrain_loss", "k_table", "kmeans_labels",
                                                            "silhouette_kmeans", "restarts", "seed")}
            self._stage_tensors = {f"start.{k_}": v for k_, v in start_state.items()}
        else:
            best, restarts = self._best_restart(x, k_values, pretrained)
            self._report(0.62, "kmeans", "k-means on the embedding")
            net, pretrain_loss, seed = best["candidate"].net, best["candidate"].loss, best["candidate"].seed
            k, table, km = best["k"], best["table"], best["kmeans"]
            km_labels = km.labels_
            final = ClusterNet(self._dense, k).to(self.device)
            state = {name: t for name, t in net.state_dict().items() if not name.startswith("head.centroids")}
            final.load_state_dict(state, strict=False)
            with torch.no_grad():
                final.head.centroids.copy_(torch.as_tensor(km.cluster_centers_, dtype=torch.float32))
            start_state = copy.deepcopy(final.state_dict())
            sil_start = best["silhouette"]  # the silhouette of km.labels_ in this embedding, from choose_k
            self._stage_meta = {"pretrain_loss": pretrain_loss, "k_table": table, "restarts": restarts, "seed": seed,
                                "kmeans_labels": km.labels_.tolist(), "silhouette_kmeans": sil_start}
            self._stage_tensors = {f"start.{k_}": v for k_, v in start_state.items()}
        gen = seed_everything(seed)
        finetune_loss, labels = self.finetune(final, x, gen) if k > 1 else ([], km_labels.copy())
        # judge both partitions in the k-means start's embedding: fine-tuning sharpens whatever clusters it drifts
        # to, so its own embedding would always flatter it; in the start's, drifting away from the data's
        # structure shows as a lower silhouette and the k-means start is kept
        start_net = ClusterNet(self._dense, k).to(self.device)
        start_net.load_state_dict(start_state)
        zn_start = start_net.head.normalise(embed(start_net, x, self.device).to(self.device)).detach().cpu().numpy()
        sil_end = _silhouette(zn_start, labels)
        kept = bool(len(np.unique(labels)) == len(np.unique(km_labels)) and not (sil_end < sil_start))
        if not kept:
            final.load_state_dict(start_state)
            labels = km_labels.copy()
        dense_labels, sil_head = labels, float("nan")
        if self.arch.head != "dense":
            final, labels, sil_head = self._fit_head(final, x, k, seed)
        r2 = float(next(r for r in restarts if r["best"]).get("reconstruction_r2", float("nan")))
        summary = TrainSummary(
            k=k, n_subjects=n, device=str(self.device), pretrain_loss=pretrain_loss, finetune_loss=finetune_loss,
            k_table=table, restarts=restarts, silhouette_kmeans=sil_start, silhouette_final=sil_end if kept else sil_start,
            reconstruction_r2=r2, finetune_kept=kept, kmeans_labels=km_labels.tolist(), labels=[int(v) for v in labels],
            cluster_sizes=np.bincount(labels, minlength=k).tolist(), head=self.arch.head,
            dense_labels=[int(v) for v in dense_labels], silhouette_head=sil_head, seconds=time.perf_counter() - start,
        )
        self._report(1.0, "done", f"k={k}, cluster sizes {summary.cluster_sizes}")
        return final.eval(), summary
