"""The default map's attributions equal Captum's IntegratedGradients, run once per cluster (2D and 3D, k = 2 and 3)."""

import pytest
import torch
from CLAMLib.explain import _log_odds, ig_attribution
from CLAMLib.model import Architecture, ClusterNet, GaussianSmoothing

captum_attr = pytest.importorskip("captum.attr")

TOLERANCE = 1e-5  # max |ours - Captum|, before the positive part and smoothing
STEPS = 8


def _net(ndim: int, k: int, seed: int, smooth: float = 0.0, head: str = "dense",
         channels: int = 1) -> tuple[ClusterNet, torch.Tensor, torch.Tensor]:
    """A seeded random network whose centroids sit near its head inputs of random images, an image and a baseline."""
    torch.manual_seed(seed)
    arch = Architecture(ndim=ndim, grid=16, filters=(4, 8, 8), embedding=6, smooth=smooth, head=head,
                        in_channels=channels)
    net = ClusterNet(arch, k).double().eval()
    shape = (k + 2, channels) + (16,) * ndim
    images = torch.rand(shape, dtype=torch.float64) * torch.linspace(0.2, 1.0, k + 2, dtype=torch.float64).view(
        -1, *[1] * (len(shape) - 1))
    with torch.no_grad():
        z = net.head_input(net.encoder.features(images))
        net.head.center.copy_(z.mean(0))
        net.head.scale.copy_(z.std(0))
        net.head.centroids.copy_(net.head.normalise(z[:k]))
    return net, images[-1:], images.mean(0, keepdim=True)


def _captum(net: ClusterNet, x: torch.Tensor, base: torch.Tensor, steps: int) -> torch.Tensor:
    """Captum's IntegratedGradients of each cluster's log-odds, one call per cluster as a user makes them: (k, C, *grid)."""
    ig = captum_attr.IntegratedGradients(lambda inp: _log_odds(net.soft_assign(inp)))
    return torch.cat([ig.attribute(x, baselines=base, target=c, n_steps=steps, method="riemann_middle",
                                   internal_batch_size=steps) for c in range(net.k)])


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("k", [2, 3])
def test_matches_captum(ndim: int, k: int) -> None:
    net, x, base = _net(ndim, k, seed=10 * ndim + k)
    ours = ig_attribution(net, x, base, STEPS)
    theirs = _captum(net, x, base, STEPS)
    assert ours.shape == theirs.shape == (k, 1) + (16,) * ndim
    assert theirs.abs().max() > 1e-3  # the attributions are not all zero
    assert (ours - theirs).abs().max() < TOLERANCE


@pytest.mark.parametrize("head", ["zones", "dense+zones"])
def test_other_heads_match_captum(head: str) -> None:
    """The heads that read zone means (3D, k = 3) agree with Captum as the paper's does."""
    net, x, base = _net(3, 3, seed=5, head=head)
    ours, theirs = ig_attribution(net, x, base, STEPS), _captum(net, x, base, STEPS)
    assert theirs.abs().max() > 1e-3
    assert (ours - theirs).abs().max() < TOLERANCE


@pytest.mark.parametrize("ndim", [2, 3])
def test_two_baselines_in_one_call_match_captum(ndim: int) -> None:
    """Both baselines of the default map in one call: the mean of Captum's attributions from each."""
    net, x, base = _net(ndim, 3, seed=ndim)
    empty = torch.zeros_like(x)
    ours = ig_attribution(net, x, [base, empty], STEPS)
    theirs = 0.5 * (_captum(net, x, base, STEPS) + _captum(net, x, empty, STEPS))
    assert (ours - theirs).abs().max() < TOLERANCE


def test_float32_matches_captum() -> None:
    """The product's precision (float32) agrees as well, on a 3D network with k = 3."""
    net, x, base = _net(3, 3, seed=7)
    net, x, base = net.float(), x.float(), base.float()
    assert (ig_attribution(net, x, base, STEPS) - _captum(net, x, base, STEPS)).abs().max() < TOLERANCE


def test_input_smoothing_matches_captum() -> None:
    """With a Gaussian in front of the encoder (Architecture.smooth) the first step stays affine and agrees too."""
    net, x, base = _net(3, 3, seed=11, smooth=1.5)
    assert (ig_attribution(net, x, base, STEPS) - _captum(net, x, base, STEPS)).abs().max() < TOLERANCE


@pytest.mark.parametrize("ndim", [2, 3])
def test_findings_channels_with_smoothing_match_captum(ndim: int) -> None:
    """The product's 3D input: three findings channels, smoothed in front of the encoder, in float32."""
    net, x, base = _net(ndim, 3, seed=13, smooth=1.5, channels=3)
    net, x, base = net.float(), x.float(), base.float()
    assert (ig_attribution(net, x, base, STEPS) - _captum(net, x, base, STEPS)).abs().max() < TOLERANCE


@pytest.mark.parametrize("ndim", [2, 3])
def test_smoothing_adjoint_is_its_transpose(ndim: int) -> None:
    """<S x, y> = <x, S' y> for the input smoothing S and its adjoint S', which carries gradients back through it."""
    smoothing = GaussianSmoothing(2.0, ndim, 12).double()
    x, y = torch.rand((2, 3) + (12,) * ndim, dtype=torch.float64), torch.rand((2, 3) + (12,) * ndim, dtype=torch.float64)
    assert torch.allclose((smoothing(x) * y).sum(), (x * smoothing.adjoint(y)).sum(), rtol=1e-12)
    assert not torch.allclose(smoothing.adjoint(y), smoothing(y))  # the edges make it differ from S itself


def test_one_cluster_has_no_evidence() -> None:
    """With k = 1, q is 1 for every input: the attribution is zero, as Captum's is."""
    net, x, base = _net(3, 1, seed=17)
    ours = ig_attribution(net, x, base, STEPS)
    assert ours.shape == (1, *x.shape[1:]) and not ours.any()
    assert _captum(net, x, base, STEPS).abs().max() < TOLERANCE
