"""Model bundles: safetensors weights plus a JSON card, checked on load (never pickle)."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import BundleError
from .fingerprint import sha256_file
from .imageio import atomic_path
from .model import Architecture, ClusterNet

FORMAT = "clam-bundle"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CARD = "model.json"
PathLike = Union[str, "os.PathLike[str]"]


def _versions() -> dict[str, str]:
    import SimpleITK
    import sklearn

    return {"torch": torch.__version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__,
            "SimpleITK": SimpleITK.Version_VersionString()}


def save(path: PathLike, net: ClusterNet, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Path:
    """Write a bundle folder: the network's weights and extra arrays, then the JSON card with their SHA-256."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tensors.update({f"extra.{k}": torch.as_tensor(np.ascontiguousarray(v)) for k, v in arrays.items()})
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    card = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "architecture": net.arch.to_dict(),
        "k": net.k,
        "centroids": net.head.centroids.detach().cpu().tolist(),
        "latent": {"center": net.head.center.cpu().tolist(), "scale": net.head.scale.cpu().tolist()},
        "versions": _versions(),
        **meta,
        "weights": {"file": WEIGHTS, "sha256": sha256_file(folder / WEIGHTS),
                    "bytes": (folder / WEIGHTS).stat().st_size},
    }
    with atomic_path(folder / CARD) as tmp:
        Path(tmp).write_text(json.dumps(card, indent=2) + "\n")
    return folder


def _fail(folder: Path, what: str, fix: str) -> BundleError:
    return BundleError(f"model bundle {folder}: {what}. {fix}")


def read_card(path: PathLike) -> tuple[Path, dict[str, Any]]:
    """The bundle folder and its parsed, version-checked JSON card."""
    folder = Path(path)
    if folder.is_file() and folder.name == CARD:
        folder = folder.parent
    if not folder.exists():
        raise _fail(folder, "does not exist", "Give the folder that holds model.json and model.safetensors.")
    card_path = folder / CARD
    if not card_path.is_file():
        raise _fail(folder, f"has no {CARD}", "Give a folder written by `clam train` or CLAMModel.save.")
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fail(folder, f"{CARD} is not valid JSON ({exc})", "The file is damaged; copy the bundle again.") from exc
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise _fail(folder, f"{CARD} is not a CLAM bundle card", "Give a folder written by `clam train`.")
    version = card.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise _fail(folder, f"format version {version!r} is newer than this CLAM reads ({FORMAT_VERSION})",
                    "Update CLAM (pip install -U clam-explain) or retrain the model.")
    for key in ("architecture", "k", "centroids", "weights"):
        if key not in card:
            raise _fail(folder, f"{CARD} lacks the field {key!r}", "Retrain or re-save the bundle.")
    return folder, card


def load(path: PathLike, device: str | torch.device = "cpu") -> tuple[ClusterNet, dict[str, Any], dict[str, np.ndarray]]:
    """Network, JSON card and extra arrays of a bundle, after checking its integrity and compatibility."""
    folder, card = read_card(path)
    weights = folder / card["weights"].get("file", WEIGHTS)
    if not weights.is_file():
        raise _fail(folder, f"weights file {weights.name} is missing", "Copy the whole bundle folder.")
    size = weights.stat().st_size
    if size != card["weights"].get("bytes", size):
        raise _fail(folder, f"weights file is {size} bytes, the card says {card['weights']['bytes']} (truncated?)",
                    "Copy the bundle again.")
    if sha256_file(weights) != card["weights"].get("sha256"):
        raise _fail(folder, "weights do not match the SHA-256 in model.json (modified or damaged)",
                    "Use the original bundle, or retrain.")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _fail(folder, f"weights cannot be read ({exc})", "Copy the bundle again.") from exc
    try:
        arch = Architecture.from_dict(card["architecture"])
        net = ClusterNet(arch, int(card["k"]))
    except (TypeError, ValueError) as exc:
        raise _fail(folder, f"architecture in {CARD} is invalid ({exc})", "Retrain or re-save the bundle.") from exc
    state = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise _fail(folder, f"weights do not fit the architecture in {CARD}: {' '.join(first)}",
                    "The JSON and the weights come from different models; use a matching pair.") from exc
    centroids = np.asarray(card["centroids"], dtype=np.float32)
    if centroids.shape != tuple(net.head.centroids.shape) or not np.allclose(
        centroids, net.head.centroids.detach().numpy(), atol=1e-5
    ):
        raise _fail(folder, "the centroids in model.json differ from those in the weights",
                    "The JSON and the weights come from different models; use a matching pair.")
    extras = {k[6:]: v.numpy() for k, v in tensors.items() if k.startswith("extra.")}
    return net.to(device).eval(), card, extras
