"""CLAMModel: fit a deep clustering to CT scans, predict clusters, explain them with maps on the native grid."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from . import bundle as _bundle
from .errors import InputError
from .explain import ExplainContext, explain, normalise_map, resolve_method
from .model import Architecture, ClusterNet, default_head, default_smooth
from .preprocess import Prepared, PreprocessConfig, Preprocessor
from .train import Progress, TrainConfig, Trainer, TrainSummary, as_batch, resolve_device

ImageLike = Union[sitk.Image, Prepared]


@dataclass
class ImageExplanation:
    """One image's soft assignment, assigned cluster and maps (0..1) on the image's own grid."""

    probabilities: np.ndarray
    assignment: int
    maps: dict[int, sitk.Image]
    method: str
    grid_maps: dict[int, np.ndarray] = field(default_factory=dict)


class CLAMModel:
    """Deep clustering of CT scans (DCEC) with cluster activation maps, scikit-learn style."""

    def __init__(self, k: Optional[int] = None, *, k_range: tuple[int, int] = (2, 8), grid: int = 88, ndim: int = 3,
                 architecture: Optional[Architecture] = None, preprocess: Optional[PreprocessConfig] = None,
                 train: Optional[TrainConfig] = None, seed: int = 0, device: str = "auto", verbose: bool = True) -> None:
        if architecture is None:
            pre = preprocess or PreprocessConfig(grid=grid, ndim=ndim)
            architecture = Architecture(ndim=pre.ndim, grid=pre.grid, in_channels=pre.channels,
                                        smooth=default_smooth(pre.grid), head=default_head(pre.ndim))
        self.architecture = architecture
        self.preprocess = preprocess or PreprocessConfig(
            grid=architecture.grid, ndim=architecture.ndim,
            representation="ct" if architecture.in_channels == 1 else "findings")
        if (self.preprocess.grid, self.preprocess.ndim) != (self.architecture.grid, self.architecture.ndim):
            raise InputError("the preprocessing grid and the architecture's grid differ; set them to the same value.")
        if self.preprocess.channels != self.architecture.in_channels:
            raise InputError(f"the {self.preprocess.representation!r} representation gives {self.preprocess.channels} "
                             f"input channels but the architecture takes {self.architecture.in_channels}; set "
                             f"Architecture(in_channels={self.preprocess.channels}).")
        self.train = train or TrainConfig(k=k, k_range=k_range, seed=seed, device=device)
        self.device = device
        self.verbose = verbose
        self.net_: Optional[ClusterNet] = None
        self.preprocessor_: Optional[Preprocessor] = None
        self.summary_: Optional[TrainSummary] = None
        self.cohort_mean_: Optional[np.ndarray] = None
        self.card_: dict[str, Any] = {}
        self.bundle_sha256_: Optional[str] = None

    # -- fitting -------------------------------------------------------------------------------------------

    def fit(self, images: Sequence[ImageLike], progress: Optional[Progress] = None,
            trained_on: str = "", trainer_options: Optional[dict[str, Any]] = None) -> CLAMModel:
        """Fit preprocessing and the clustering network to a cohort of CT images (HU); trainer_options go to Trainer."""
        if len(images) == 0:
            raise InputError("no images to train on; give at least k + 1 scans.")
        if all(isinstance(im, Prepared) for im in images):
            if self.preprocessor_ is None:
                raise InputError("prepared inputs need a fitted preprocessor; pass SimpleITK images instead.")
            prepared = list(images)
        else:
            self.preprocessor_ = Preprocessor(self.preprocess)
            prepared = self.preprocessor_.fit_transform(images)
        arrays = np.stack([p.array for p in prepared])
        self.cohort_mean_ = arrays.mean(0).astype(np.float32)
        trainer = Trainer(self.architecture, self.train, progress=progress, verbose=self.verbose,
                          **(trainer_options or {}))
        self.net_, self.summary_ = trainer.fit(arrays)
        self.card_ = {"trained_on": trained_on or f"{len(images)} images", "n_subjects": len(images)}
        return self

    @classmethod
    def from_parts(cls, net: ClusterNet, preprocessor: Preprocessor, cohort_mean: np.ndarray,
                   summary: Optional[TrainSummary] = None, train: Optional[TrainConfig] = None,
                   card: Optional[dict[str, Any]] = None) -> CLAMModel:
        """A fitted model from a trained network and a fitted preprocessor (as `clam demo` makes them)."""
        model = cls(architecture=net.arch, preprocess=preprocessor.config, train=train, verbose=False)
        model.net_, model.preprocessor_, model.summary_ = net, preprocessor, summary
        model.cohort_mean_ = np.asarray(cohort_mean, dtype=np.float32)
        model.card_ = dict(card or {})
        return model

    def _check_fitted(self) -> None:
        if self.net_ is None or self.preprocessor_ is None:
            raise InputError("this CLAMModel is not fitted; call fit() or load a bundle with load_bundle().")

    @property
    def k(self) -> int:
        """Number of clusters."""
        self._check_fitted()
        return self.net_.k

    @property
    def card(self) -> dict[str, Any]:
        """Model card summary: k, grid, what it was trained on, training summary."""
        self._check_fitted()
        s = self.summary_.to_dict() if self.summary_ else {}
        return {"k": self.k, "grid": self.architecture.grid, "ndim": self.architecture.ndim,
                "register": self.preprocess.register, **self.card_,
                "cluster_sizes": s.get("cluster_sizes"), "silhouette": s.get("silhouette_final")}

    # -- inference -----------------------------------------------------------------------------------------

    def prepare(self, images: Sequence[ImageLike]) -> list[Prepared]:
        """Preprocessed model inputs of images (already prepared ones pass through)."""
        self._check_fitted()
        return [im if isinstance(im, Prepared) else self.preprocessor_.transform(im) for im in images]

    def _tensor(self, prepared: Sequence[Prepared]) -> torch.Tensor:
        return as_batch(np.stack([p.array for p in prepared]), self.architecture)

    def _net(self, device: Optional[str]) -> ClusterNet:
        return self.net_.to(resolve_device(device or self.device)).eval()

    @torch.no_grad()
    def predict_proba(self, images: Sequence[ImageLike], device: Optional[str] = None) -> np.ndarray:
        """Soft assignment q (N, k) of every image."""
        net = self._net(device)
        x = self._tensor(self.prepare(images))
        dev = next(net.parameters()).device
        return torch.cat([net.soft_assign(x[i : i + 16].to(dev)).cpu() for i in range(0, len(x), 16)]).numpy()

    def predict(self, images: Sequence[ImageLike], device: Optional[str] = None) -> np.ndarray:
        """Assigned cluster of every image."""
        return self.predict_proba(images, device).argmax(1)

    def context(self) -> ExplainContext:
        """What the map methods need beyond the network: the cohort mean image."""
        base = as_batch(self.cohort_mean_[None], self.architecture) if self.cohort_mean_ is not None else None
        return ExplainContext(baseline=base, present_only=self.preprocess.representation == "findings")

    def explain(self, images: Sequence[ImageLike], method: str = "default", device: Optional[str] = None,
                progress: Optional[Callable[[int], None]] = None) -> tuple[np.ndarray, np.ndarray]:
        """Soft assignments (N, k) and raw maps of every cluster on the model grid (N, k, *grid)."""
        net, prepared = self._net(device), self.prepare(images)
        return explain(net, self._tensor(prepared), method, self.context(), progress=progress)

    def chosen_clusters(self, clusters: Union[str, Sequence[int]], assignment: int) -> list[int]:
        """The clusters to map: 'all', 'assigned' (the given assignment) or a list, checked against k."""
        if clusters == "all":
            return list(range(self.k))
        if clusters == "assigned":
            return [assignment]
        chosen = [int(c) for c in clusters]
        bad = [c for c in chosen if not 0 <= c < self.k]
        if bad:
            raise InputError(f"clusters {bad} do not exist; this model has clusters 0..{self.k - 1}.")
        return chosen

    def explain_image(self, image: sitk.Image, clusters: Union[str, Sequence[int]] = "all", method: str = "default",
                      device: Optional[str] = None, progress: Optional[Callable[[float, str], None]] = None
                      ) -> ImageExplanation:
        """Soft assignment, cluster and 0..1 maps on the image's exact native geometry."""
        self._check_fitted()
        method = resolve_method(method)
        report = progress or (lambda f, m: None)
        report(0.05, "preprocessing")
        prepared = self.prepare([image])[0]
        report(0.3, f"computing {method} maps")
        q, maps = self.explain([prepared], method, device)
        q, maps = q[0], maps[0]
        assignment = int(q.argmax())
        chosen = self.chosen_clusters(clusters, assignment)
        report(0.8, "resampling maps to the input grid")
        grid_maps = {c: normalise_map(maps[c]) for c in chosen}
        native = {c: self.preprocessor_.to_native(m, prepared) for c, m in grid_maps.items()}
        report(1.0, "done")
        return ImageExplanation(probabilities=q, assignment=assignment, maps=native, method=method,
                                grid_maps=grid_maps)

    # -- persistence ---------------------------------------------------------------------------------------

    def save(self, path: Union[str, Path]) -> Path:
        """Write the model as a bundle folder (safetensors + JSON card)."""
        self._check_fitted()
        pre_meta, pre_arrays = self.preprocessor_.state()
        arrays = {f"preprocess.{k}": v for k, v in pre_arrays.items()}
        arrays["cohort_mean"] = self.cohort_mean_
        meta = {"preprocess": pre_meta, "train_config": self.train.to_dict(),
                "training": self.summary_.to_dict() if self.summary_ else {}, "card": self.card_}
        return _bundle.save(path, self.net_.cpu(), meta, arrays)

    @classmethod
    def load(cls, path: Union[str, Path], device: str = "auto", verbose: bool = False) -> CLAMModel:
        """Read a bundle written by save(), checking it first."""
        net, card, extras = _bundle.load(path)
        try:
            pre = Preprocessor.from_state(card["preprocess"], {k[11:]: v for k, v in extras.items()
                                                               if k.startswith("preprocess.")})
            train_cfg = TrainConfig(**{**card.get("train_config", {}),
                                       "k_range": tuple(card.get("train_config", {}).get("k_range", (2, 8)))})
        except (KeyError, TypeError, ValueError) as exc:
            raise _bundle.BundleError(f"model bundle {path}: its preprocessing or training settings are invalid "
                                      f"({exc}). Retrain or re-save the bundle.") from exc
        model = cls(architecture=net.arch, preprocess=pre.config, train=train_cfg, device=device, verbose=verbose)
        model.net_, model.preprocessor_ = net, pre
        model.cohort_mean_ = extras.get("cohort_mean")
        training = card.get("training") or {}
        model.summary_ = TrainSummary(**training) if training else None
        model.card_ = card.get("card", {})
        model.bundle_sha256_ = _bundle.card_hash(card)
        return model


def load_bundle(path: Union[str, Path], device: str = "auto") -> CLAMModel:
    """A fitted CLAMModel from a bundle folder."""
    return CLAMModel.load(path, device=device)
