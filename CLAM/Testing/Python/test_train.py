"""Training: seeded determinism, k choice, and fine-tuning that never ends below its k-means start."""

import numpy as np
import pytest
import torch
from CLAMLib.errors import InputError
from CLAMLib.metrics import cluster_accuracy
from CLAMLib.model import Architecture
from CLAMLib.train import TrainConfig, Trainer, reconstruction_r2, target_distribution

ARCH = Architecture(ndim=2, grid=16, filters=(4, 8, 8), embedding=6)


def blobs(n_per: int, centres: list, seed: int = 0, noise: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Images with one bright disc whose position depends on the cluster."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:16, :16]
    images, labels = [], []
    for label, (cy, cx) in enumerate(centres):
        for _ in range(n_per):
            jy, jx = rng.normal(0, 0.7, 2)
            disc = ((yy - cy - jy) ** 2 + (xx - cx - jx) ** 2 < 6).astype(np.float32)
            images.append(0.2 + 0.6 * disc + rng.normal(0, noise, (16, 16)).astype(np.float32))
            labels.append(label)
    return np.stack(images).astype(np.float32), np.array(labels)


def config(**kw) -> TrainConfig:
    base = dict(k=2, pretrain_epochs=15, finetune_epochs=10, batch_size=8, seed=3, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_seeded_training_is_deterministic() -> None:
    x, _ = blobs(8, [(4, 4), (11, 11)])
    net1, s1 = Trainer(ARCH, config(), verbose=False).fit(x)
    net2, s2 = Trainer(ARCH, config(), verbose=False).fit(x)
    for (name, a), b in zip(net1.state_dict().items(), net2.state_dict().values()):
        assert torch.equal(a, b), name
    assert s1.labels == s2.labels
    net3, _ = Trainer(ARCH, config(seed=4), verbose=False).fit(x)
    assert not torch.equal(net1.encoder.embed.weight, net3.encoder.embed.weight)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finetuning_never_ends_below_its_kmeans_start(seed: int) -> None:
    x, y = blobs(10, [(4, 4), (11, 11)], seed=seed, noise=0.15)
    net, s = Trainer(ARCH, config(seed=seed), verbose=False).fit(x)
    assert cluster_accuracy(y, np.array(s.labels)) >= cluster_accuracy(y, np.array(s.kmeans_labels))
    assert not s.silhouette_final < s.silhouette_kmeans
    q = net.soft_assign(torch.as_tensor(x)[:, None]).detach().numpy()
    assert np.array_equal(q.argmax(1), np.array(s.labels))


def test_a_damaging_finetune_is_rolled_back() -> None:
    x, y = blobs(10, [(4, 4), (11, 11)], noise=0.1)
    net, s = Trainer(ARCH, config(lr=0.5, gamma=50.0), verbose=False).fit(x)
    assert not s.silhouette_final < s.silhouette_kmeans
    if not s.finetune_kept:
        assert s.labels == s.kmeans_labels
    assert cluster_accuracy(y, np.array(s.labels)) >= cluster_accuracy(y, np.array(s.kmeans_labels))


def test_k_is_chosen_by_silhouette_and_reported() -> None:
    x, y = blobs(8, [(3, 3), (3, 12), (12, 8)], noise=0.03)
    _, s = Trainer(ARCH, config(k=None, k_range=(2, 4), finetune_epochs=3), verbose=False).fit(x)
    assert [r["k"] for r in s.k_table] == [2, 3, 4]
    assert all(np.isfinite(r["silhouette"]) for r in s.k_table)
    best = max(s.k_table, key=lambda r: r["silhouette"])
    assert best["chosen"] and s.k == best["k"]
    assert s.k == 3 and cluster_accuracy(y, np.array(s.labels)) == 1.0


def test_latent_is_centred_and_scaled_over_the_cohort() -> None:
    x, _ = blobs(8, [(4, 4), (11, 11)])
    net, _ = Trainer(ARCH, config(), verbose=False).fit(x)
    with torch.no_grad():
        zn = net.head.normalise(net.encoder(torch.as_tensor(x)[:, None]))
    assert torch.allclose(zn.mean(0), torch.zeros(6), atol=1e-4)
    assert torch.allclose(zn.std(0, unbiased=False), torch.full((6,), 6**-0.5), atol=1e-3)
    assert zn.pow(2).sum(1).mean().sqrt().item() == pytest.approx(1.0, abs=1e-3)


def test_target_distribution_sharpens_and_normalises() -> None:
    q = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
    p = target_distribution(q)
    assert torch.allclose(p.sum(1), torch.ones(3))
    assert p[0, 0] > q[0, 0] and p[1, 1] > q[1, 1]


def test_too_few_images_for_k_is_refused() -> None:
    x, _ = blobs(1, [(4, 4), (11, 11)])
    with pytest.raises(InputError, match="cannot form 3 clusters"):
        Trainer(ARCH, config(k=3), verbose=False).fit(x)


def test_restarts_keep_the_autoencoder_whose_clusters_separate_best() -> None:
    x, y = blobs(10, [(4, 4), (11, 11)], noise=0.15)
    net, s = Trainer(ARCH, config(restarts=3), verbose=False).fit(x)
    assert [r["seed"] for r in s.restarts] == [3, 4, 5]
    best = [r for r in s.restarts if r["best"]]
    assert len(best) == 1 and best[0]["silhouette"] == max(r["silhouette"] for r in s.restarts)
    assert s.silhouette_kmeans == pytest.approx(best[0]["silhouette"])
    # each restart is the single-restart run of its seed; the kept one is fine-tuned exactly as that run
    single, s1 = Trainer(ARCH, config(seed=best[0]["seed"]), verbose=False).fit(x)
    assert s.labels == s1.labels
    for (name, a), b in zip(net.state_dict().items(), single.state_dict().values()):
        assert torch.equal(a, b), name
    # pretraining once and fitting from the pretrained autoencoders gives the same model
    trainer = Trainer(ARCH, config(restarts=3), verbose=False)
    again, s2 = trainer.fit(x, trainer.pretrained(x))
    assert s2.restarts == s.restarts and s2.labels == s.labels
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))


def test_bad_restarts_are_refused() -> None:
    x, _ = blobs(4, [(4, 4), (11, 11)])
    with pytest.raises(InputError, match="restarts must be at least 1"):
        Trainer(ARCH, config(restarts=0), verbose=False).fit(x)


def test_input_smoothing_is_a_fixed_gaussian_in_front_of_the_encoder() -> None:
    from dataclasses import replace

    from CLAMLib.model import ClusterNet, GaussianSmoothing
    from scipy import ndimage

    x = np.random.default_rng(0).normal(size=(2, 1, 16, 16)).astype(np.float32)
    smoothed = GaussianSmoothing(1.5, 2, 16)(torch.as_tensor(x)).numpy()
    expected = np.stack([ndimage.gaussian_filter(v[0], 1.5, mode="nearest") for v in x])[:, None]
    assert np.abs(smoothed - expected).max() < 1e-5
    with pytest.raises(InputError, match="smooth"):
        replace(ARCH, smooth=-1.0)
    torch.manual_seed(0)
    net = ClusterNet(replace(ARCH, smooth=1.5), 2)
    plain = ClusterNet(ARCH, 2)
    plain.load_state_dict(net.state_dict())  # the Gaussian holds no weights: bundles stay compatible
    with torch.no_grad():
        assert torch.allclose(net.encoder(torch.as_tensor(x)), plain.encoder(torch.as_tensor(smoothed)), atol=1e-5)
    images, _ = blobs(6, [(4, 4), (11, 11)])
    _, s = Trainer(replace(ARCH, smooth=1.5), config(finetune_epochs=2), verbose=False).fit(images)
    assert len(s.labels) == 12 and s.pretrain_loss[-1] < s.pretrain_loss[0]


def test_reconstruction_r2_measures_what_the_autoencoder_learnt() -> None:
    x, _ = blobs(10, [(4, 4), (11, 11)], noise=0.05)
    xb = torch.as_tensor(x)[:, None]
    net, s = Trainer(ARCH, config(pretrain_epochs=60), verbose=False).fit(x)
    kept = next(r for r in s.restarts if r["best"])
    assert s.reconstruction_r2 == kept["reconstruction_r2"]
    # the kept restart's value is 1 - SSE / SS about the mean, of its pretrained autoencoder
    pretrained = Trainer(ARCH, config(pretrain_epochs=60), verbose=False).pretrained(x)[0].net
    with torch.no_grad():
        sse = float((pretrained.decoder(pretrained.encoder(xb)) - xb).pow(2).sum())
        ss = float((xb - xb.mean(0)).pow(2).sum())
    assert s.reconstruction_r2 == pytest.approx(1 - sse / ss, rel=1e-4)
    assert reconstruction_r2(pretrained, xb, torch.device("cpu"), batch_size=3) == pytest.approx(1 - sse / ss, rel=1e-4)
    assert s.reconstruction_r2 > 0.3
    _, short = Trainer(ARCH, config(pretrain_epochs=1, lr=1e-5), verbose=False).fit(x)
    assert short.reconstruction_r2 < 0.1 < s.reconstruction_r2
