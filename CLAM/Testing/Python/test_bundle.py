"""Model bundles: a round trip that keeps predictions, and a clear refusal of every bad bundle."""

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from CLAMLib import BundleError, CLAMModel, load_bundle
from CLAMLib.bundle import CARD, SEAL, WEIGHTS, card_hash, reseal
from CLAMLib.model import Architecture
from CLAMLib.preprocess import PreprocessConfig
from CLAMLib.simulate import make_cohort
from CLAMLib.train import TrainConfig


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[CLAMModel, list, Path]:
    cohort = make_cohort("size", n_per_cluster=4, seed=1, anatomy_variation=0.5)
    images = [s.image for s in cohort.subjects]
    arch = Architecture(grid=16, filters=(4, 8, 8), embedding=6, in_channels=3)
    model = CLAMModel(architecture=arch, preprocess=PreprocessConfig(grid=16, ndim=3),
                      train=TrainConfig(k=2, pretrain_epochs=3, finetune_epochs=2, seed=0, device="cpu"),
                      verbose=False).fit(images, trained_on="unit-test phantoms")
    folder = tmp_path_factory.mktemp("bundle") / "model"
    model.save(folder)
    return model, images, folder


def copy_bundle(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def sealed(b: Path, card: dict) -> None:
    """Write an edited card with a matching seal, as a forger who knows the format would."""
    (b / CARD).write_text(json.dumps({**card, SEAL: card_hash(card)}))


def test_round_trip_keeps_predictions_and_maps(fitted) -> None:
    model, images, folder = fitted
    loaded = load_bundle(folder, device="cpu")
    assert loaded.k == model.k == 2
    np.testing.assert_allclose(loaded.predict_proba(images[:3]), model.predict_proba(images[:3]), atol=1e-6)
    a = model.explain_image(images[0], method="clam", device="cpu")
    b = loaded.explain_image(images[0], method="clam", device="cpu")
    for c in a.maps:
        assert a.maps[c].GetSize() == images[0].GetSize()
        np.testing.assert_allclose(a.grid_maps[c], b.grid_maps[c], atol=1e-6)
    card = json.loads((folder / CARD).read_text())
    for key in ("architecture", "k", "centroids", "preprocess", "training", "format_version", "weights"):
        assert key in card
    assert len(card["weights"]["sha256"]) == 64
    assert loaded.card["trained_on"] == "unit-test phantoms"


def test_missing_folder(tmp_path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_missing_card(fitted, tmp_path) -> None:
    b = copy_bundle(fitted[2], tmp_path)
    (b / CARD).unlink()
    with pytest.raises(BundleError, match="has no model.json"):
        load_bundle(b)


def test_corrupt_card(fitted, tmp_path) -> None:
    b = copy_bundle(fitted[2], tmp_path)
    (b / CARD).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(b)


def test_newer_format_version(fitted, tmp_path) -> None:
    b = copy_bundle(fitted[2], tmp_path)
    card = json.loads((b / CARD).read_text())
    card["format_version"] = 99
    (b / CARD).write_text(json.dumps(card))
    with pytest.raises(BundleError, match="newer than this CLAM reads"):
        load_bundle(b)


def test_missing_weights(fitted, tmp_path) -> None:
    b = copy_bundle(fitted[2], tmp_path)
    (b / WEIGHTS).unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(b)


def test_truncated_weights(fitted, tmp_path) -> None:
    b = copy_bundle(fitted[2], tmp_path)
    data = (b / WEIGHTS).read_bytes()
    (b / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated"):
        load_bundle(b)


def test_tampered_weights(fitted, tmp_path) -> None:
    b = copy_bundle(fitted[2], tmp_path)
    data = bytearray((b / WEIGHTS).read_bytes())
    data[-10] ^= 0xFF
    (b / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="SHA-256"):
        load_bundle(b)


def test_pickle_is_never_loaded(fitted, tmp_path) -> None:
    b = copy_bundle(fitted[2], tmp_path)
    payload = pickle.dumps({"net.encoder": torch.zeros(2)})
    (b / WEIGHTS).write_bytes(payload)
    card = json.loads((b / CARD).read_text())
    import hashlib

    card["weights"].update(sha256=hashlib.sha256(payload).hexdigest(), bytes=len(payload))
    sealed(b, card)
    with pytest.raises(BundleError, match="cannot be read"):
        load_bundle(b)


def test_weights_that_do_not_match_the_json(fitted, tmp_path) -> None:
    b = copy_bundle(fitted[2], tmp_path)
    card = json.loads((b / CARD).read_text())
    card["architecture"]["embedding"] = 7
    sealed(b, card)
    with pytest.raises(BundleError, match="do not fit the architecture"):
        load_bundle(b)


def test_centroids_that_do_not_match_the_weights(fitted, tmp_path) -> None:
    b = copy_bundle(fitted[2], tmp_path)
    card = json.loads((b / CARD).read_text())
    card["centroids"][0][0] += 1.0
    sealed(b, card)
    with pytest.raises(BundleError, match="centroids"):
        load_bundle(b)


def test_saving_leaves_no_temporary_files(fitted) -> None:
    assert sorted(p.name for p in fitted[2].iterdir()) == sorted([CARD, WEIGHTS])


@pytest.mark.parametrize("edit", [
    lambda card: card["preprocess"].update(scale=card["preprocess"]["scale"] * 2),
    lambda card: card["preprocess"].update(closing_mm=6.0),
    lambda card: card.update(k=3),
    lambda card: card["card"].update(trained_on="something else"),
])
def test_any_edit_of_the_card_is_refused(fitted, tmp_path, edit) -> None:
    b = copy_bundle(fitted[2], tmp_path)
    card = json.loads((b / CARD).read_text())
    edit(card)
    (b / CARD).write_text(json.dumps(card, indent=2))
    with pytest.raises(BundleError) as refused:
        load_bundle(b)
    message = str(refused.value)
    assert "model.json was changed after the bundle was written" in message and "\n" not in message
    assert "state_dict" not in message


def test_older_format_is_read_with_a_warning_and_can_be_sealed(fitted, tmp_path) -> None:
    b = copy_bundle(fitted[2], tmp_path)
    card = json.loads((b / CARD).read_text())
    del card[SEAL]
    card["format_version"] = 1
    (b / CARD).write_text(json.dumps(card, indent=2))
    with pytest.warns(UserWarning, match=r"older format version 1.*seal it with: python -m CLAMLib.bundle"):
        old = load_bundle(b)
    reseal(b)
    upgraded = json.loads((b / CARD).read_text())
    assert upgraded["format_version"] == 2 and upgraded[SEAL] == card_hash(upgraded)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = load_bundle(b)
    assert new.k == old.k and new.bundle_sha256_ == card_hash(upgraded)
