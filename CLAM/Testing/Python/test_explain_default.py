"""The default map (integrated gradients of the cluster log-odds): completeness and Adebayo et al. sanity checks."""

import numpy as np
import pytest
import torch
from CLAMLib.explain import DEFAULT_METHOD, ExplainContext, explain, ig_attribution, resolve_method, smooth
from CLAMLib.model import Architecture, ClusterNet
from CLAMLib.train import TrainConfig, Trainer
from scipy.stats import spearmanr

ARCH = Architecture(ndim=2, grid=16, filters=(4, 8, 8), embedding=6)


@pytest.fixture(scope="module")
def trained() -> tuple[ClusterNet, np.ndarray, np.ndarray]:
    """A small 2D model trained on discs whose position decides the cluster, and the images."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]
    images, labels = [], []
    for label, (cy, cx) in enumerate([(4, 4), (11, 11)]):
        for _ in range(10):
            jy, jx = rng.normal(0, 0.7, 2)
            disc = ((yy - cy - jy) ** 2 + (xx - cx - jx) ** 2 < 6).astype(np.float32)
            images.append(0.7 * disc + rng.normal(0, 0.03, (16, 16)).astype(np.float32))
            labels.append(label)
    x = np.stack(images).astype(np.float32)
    net, summary = Trainer(ARCH, TrainConfig(k=2, pretrain_epochs=30, finetune_epochs=10, seed=0, device="cpu"),
                           verbose=False).fit(x)
    return net, x, np.array(summary.labels)


def test_default_is_integrated_gradients() -> None:
    assert DEFAULT_METHOD == "ig" and resolve_method("default") == "ig"


def test_attribution_is_complete(trained) -> None:
    """Integrated gradients add up to the change in log-odds between the baseline and the image."""
    net, x, _ = trained
    xi = torch.as_tensor(x[:1])[:, None]
    base = torch.as_tensor(x.mean(0))[None, None]
    attr = ig_attribution(net, xi, base, steps=128)[:, 0]
    with torch.no_grad():
        q = net.soft_assign(torch.cat([xi, base])).clamp(1e-7, 1 - 1e-7)
    odds = torch.log(q) - torch.log1p(-q)
    np.testing.assert_allclose(attr.sum(dim=(1, 2)).numpy(), (odds[0] - odds[1]).numpy(), rtol=0.05, atol=0.02)


def test_map_points_at_the_disc_sites(trained) -> None:
    """The evidence for a cluster lies where a disc is, or where the other cluster's disc is missing."""
    net, x, labels = trained
    base = torch.as_tensor(x.mean(0))[None, None]
    _, maps = explain(net, torch.as_tensor(x)[:, None], "default", ExplainContext(baseline=base))
    sites = x.mean(0) > 0.1
    hits = [sites.reshape(-1)[maps[i, labels[i]].argmax()] for i in range(len(x))]
    assert np.mean(hits) >= 0.9
    assert sites.mean() < 0.25


def test_map_changes_when_weights_are_randomised(trained) -> None:
    """Adebayo et al. 2018, model randomisation: a map that survives random weights explains nothing."""
    net, x, labels = trained
    xt = torch.as_tensor(x)[:, None]
    base = torch.as_tensor(x.mean(0))[None, None]
    _, maps = explain(net, xt, "default", ExplainContext(baseline=base))
    torch.manual_seed(123)
    random = ClusterNet(ARCH, 2)
    random.head.load_state_dict(net.head.state_dict())
    _, rand_maps = explain(random, xt, "default", ExplainContext(baseline=base))
    rho = [spearmanr(maps[i, labels[i]].ravel(), rand_maps[i, labels[i]].ravel())[0] for i in range(len(x))]
    assert np.median(rho) < 0.5


def test_maps_follow_permuted_cluster_labels(trained) -> None:
    """Adebayo et al. 2018, label randomisation: permuting the clusters permutes their maps."""
    net, x, _ = trained
    xt = torch.as_tensor(x[:4])[:, None]
    base = torch.as_tensor(x.mean(0))[None, None]
    q, maps = explain(net, xt, "default", ExplainContext(baseline=base))
    permuted = ClusterNet(ARCH, 2)
    permuted.load_state_dict(net.state_dict())
    with torch.no_grad():
        permuted.head.centroids.copy_(net.head.centroids.flip(0))
    q2, maps2 = explain(permuted, xt, "default", ExplainContext(baseline=base))
    np.testing.assert_allclose(q2, q[:, ::-1], atol=1e-6)
    np.testing.assert_allclose(maps2, maps[:, ::-1], atol=1e-5)
    assert not np.allclose(maps[:, 0], maps[:, 1], atol=1e-3)


def test_smoothing_keeps_mass_and_spreads_a_point() -> None:
    m = torch.zeros(1, 9, 9, 9)
    m[0, 4, 4, 4] = 1.0
    s = smooth(m, 1.0)
    assert s.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert s[0, 4, 4, 4] < 1.0 and s[0, 4, 4, 5] > 0
