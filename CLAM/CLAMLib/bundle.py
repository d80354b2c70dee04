"""Model bundles: safetensors weights plus a JSON card, checked on load (never pickle)."""

from __future__ import annotations

import json
import os
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import BundleError, CLAMError
from .fingerprint import sha256_file, sha256_json
from .imageio import atomic_path
from .model import Architecture, ClusterNet

FORMAT = "clam-bundle"
FORMAT_VERSION = 2
"""2: model.json carries `sha256`, the hash of every other field (canonical JSON), which covers the weights' hash."""
WEIGHTS = "model.safetensors"
CARD = "model.json"
SEAL = "sha256"
"""The field of model.json that holds the SHA-256 of the rest of the card."""
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
    _write_card(folder, card)
    return folder


def _write_card(folder: Path, card: dict[str, Any]) -> None:
    """Write model.json atomically, sealed with the SHA-256 of its other fields."""
    fields = {k: v for k, v in card.items() if k != SEAL}
    sealed = {**fields, SEAL: sha256_json(json.loads(json.dumps(fields)))}
    with atomic_path(folder / CARD) as tmp:
        Path(tmp).write_text(json.dumps(sealed, indent=2) + "\n")


def card_hash(card: dict[str, Any]) -> str:
    """SHA-256 of a card's fields but the seal (canonical JSON): the bundle's identity."""
    return sha256_json({k: v for k, v in card.items() if k != SEAL})


def reseal(path: PathLike) -> Path:
    """Bring a bundle of an older format to this one: check its weights, then seal its model.json."""
    folder, card = read_card(path, upgrade=True)
    _check_weights(folder, card)
    _write_card(folder, {**card, "format_version": FORMAT_VERSION})
    return folder


def _fail(folder: Path, what: str, fix: str) -> BundleError:
    return BundleError(f"model bundle {folder}: {what}. {fix}")


def read_card(path: PathLike, upgrade: bool = False) -> tuple[Path, dict[str, Any]]:
    """The bundle folder and its parsed, version-checked and seal-checked JSON card.

    A card of format version 1 (before the seal) is read with a warning that says how to seal it (`upgrade` is
    reseal's own reading, without the warning).
    """
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
    if version >= 2 and card.get(SEAL) != card_hash(card):
        raise _fail(folder, f"{CARD} was changed after the bundle was written (its SHA-256 does not match the "
                            f"'{SEAL}' field)", "Use the original bundle, or retrain; any edit changes the results.")
    if version < 2 and not upgrade:
        warnings.warn(f"model bundle {folder} is of the older format version {version}, whose {CARD} is not "
                      f"protected against edits; seal it with: python -m CLAMLib.bundle {folder}", stacklevel=3)
    for key in ("architecture", "k", "centroids", "weights"):
        if key not in card:
            raise _fail(folder, f"{CARD} lacks the field {key!r}", "Retrain or re-save the bundle.")
    return folder, card


def _check_weights(folder: Path, card: dict[str, Any]) -> Path:
    """The weights file, after checking its size and SHA-256 against the card."""
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
    return weights


def load(path: PathLike, device: str | torch.device = "cpu") -> tuple[ClusterNet, dict[str, Any], dict[str, np.ndarray]]:
    """Network, JSON card and extra arrays of a bundle, after checking its integrity and compatibility."""
    folder, card = read_card(path)
    weights = _check_weights(folder, card)
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


if __name__ == "__main__":
    try:
        for argument in sys.argv[1:]:
            print(f"sealed {reseal(argument)}")
    except CLAMError as exc:
        sys.exit(f"error: {exc}")
