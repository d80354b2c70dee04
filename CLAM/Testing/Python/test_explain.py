"""CLAM maps: the fast batched implementation against naive references, channels and passes counted."""

import pytest
import torch
import torch.nn.functional as F
from CLAMLib.errors import InputError
from CLAMLib.explain import ExplainContext, explain, resolve_method
from CLAMLib.model import Architecture, ClusterNet


def make_net(ndim: int, k: int, grid: int = 16, seed: int = 0) -> ClusterNet:
    torch.manual_seed(seed)
    net = ClusterNet(Architecture(ndim=ndim, grid=grid, filters=(4, 6, 8), embedding=5), k).eval()
    with torch.no_grad():
        net.head.centroids.normal_(0, 1.0)
        net.head.scale.fill_(0.5)
    return net


def naive_clam(net: ClusterNet, x: torch.Tensor, softmax: bool = False) -> torch.Tensor:
    """The paper's definition written out channel by channel and cluster by cluster."""
    size = tuple(x.shape[2:])
    mode = "trilinear" if len(size) == 3 else "bilinear"
    acts = net.encoder.features(x)[0]
    maps = []
    for c in range(net.k):
        scores, ups = [], []
        for k in range(acts.shape[0]):
            u = F.interpolate(acts[k][None, None], size=size, mode=mode, align_corners=False)[0, 0]
            h = (u - u.min()) / (u.max() - u.min()) if u.max() > u.min() else torch.zeros_like(u)
            scores.append(net.soft_assign(x * h)[0, c])
            ups.append(u)
        w = torch.softmax(torch.stack(scores), 0) if softmax else torch.stack(scores)
        maps.append(torch.relu(sum(wk * u for wk, u in zip(w, ups))))
    return torch.stack(maps)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("method,softmax", [("clam", False), ("scorecam", True)])
def test_fast_clam_equals_naive(ndim: int, method: str, softmax: bool) -> None:
    net = make_net(ndim, k=3)
    x = torch.rand(2, 1, *(16,) * ndim)
    _, fast = explain(net, x, method)
    with torch.no_grad():
        for i in range(len(x)):
            ref = naive_clam(net, x[i : i + 1], softmax)
            assert torch.allclose(torch.as_tensor(fast[i]), ref, atol=1e-5, rtol=1e-5)
            assert ref.max() > 0


def test_every_channel_of_last_block_is_used() -> None:
    net = make_net(3, k=2)
    x = torch.rand(1, 1, 16, 16, 16)
    seen = []
    hook = net.encoder.blocks[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    explain(net, x, "clam")
    hook.remove()
    channels = net.arch.filters[-1]
    assert sum(seen) == 1 + channels  # one pass for q and the activations, one masked input per channel
    _, base = explain(net, x, "clam")
    conv = net.encoder.blocks[-1][0]
    for k in range(channels):  # silencing any one channel changes the map
        saved_w, saved_b = conv.weight[k].clone(), conv.bias[k].clone()
        with torch.no_grad():
            conv.weight[k].zero_()
            conv.bias[k].fill_(-10.0)
        _, changed = explain(net, x, "clam")
        with torch.no_grad():
            conv.weight[k].copy_(saved_w)
            conv.bias[k].copy_(saved_b)
        assert not torch.allclose(torch.as_tensor(changed), torch.as_tensor(base)), f"channel {k} unused"


@pytest.mark.parametrize("k", [2, 4])
def test_all_clusters_come_from_one_set_of_passes(k: int) -> None:
    net = make_net(3, k=k)
    x = torch.rand(1, 1, 16, 16, 16)
    seen = []
    hook = net.encoder.blocks[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    q, maps = explain(net, x, "clam")
    hook.remove()
    assert maps.shape == (1, k, 16, 16, 16)
    assert sum(seen) == 1 + net.arch.filters[-1]  # independent of k


def test_gradient_matches_per_cluster_autograd() -> None:
    net = make_net(2, k=3)
    x = torch.rand(1, 1, 16, 16)
    _, maps = explain(net, x, "gradient")
    for c in range(3):
        xi = x.clone().requires_grad_(True)
        net.soft_assign(xi)[0, c].backward()
        assert torch.allclose(torch.as_tensor(maps[0, c]), xi.grad[0, 0].abs(), atol=1e-7)


def test_occlusion_matches_naive_loop() -> None:
    net = make_net(2, k=2)
    x = torch.rand(1, 1, 16, 16)
    mean = torch.rand(1, 1, 16, 16)
    _, maps = explain(net, x, "occlusion", ExplainContext(baseline=mean))
    with torch.no_grad():
        q0 = net.soft_assign(x)[0]
        ref = torch.zeros(2, 16, 16)
        for i in range(0, 16, 8):
            for j in range(0, 16, 8):
                xo = x.clone()
                xo[..., i : i + 8, j : j + 8] = mean[..., i : i + 8, j : j + 8]
                ref[:, i : i + 8, j : j + 8] = torch.relu(q0 - net.soft_assign(xo)[0])[:, None, None]
    assert torch.allclose(torch.as_tensor(maps[0]), ref, atol=1e-6)


def test_soft_assignment_is_student_t() -> None:
    net = make_net(2, k=3)
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        z = net.head.normalise(net.encoder(x))
        num = 1.0 / (1.0 + torch.cdist(z, net.head.centroids) ** 2)
        ref = num / num.sum(1, keepdim=True)
        q, _ = explain(net, x, "random")
    assert torch.allclose(torch.as_tensor(q), ref, atol=1e-6)


def test_unknown_method_is_refused() -> None:
    with pytest.raises(InputError, match="unknown map method"):
        resolve_method("lime")
