"""Findings maps: normal parenchyma (with its gradient and noise) and vessels give nothing; findings land in their channel."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from CLAMLib.errors import InputError
from CLAMLib.estimator import CLAMModel
from CLAMLib.explain import ExplainContext, integrated_gradients, presence
from CLAMLib.findings import CHANNELS, ball_radius, findings, parenchyma_level
from CLAMLib.model import Architecture, ClusterNet
from CLAMLib.preprocess import PreprocessConfig, Preprocessor

SPACING = (2.0, 2.0, 2.5)  # x, y, z mm
SHAPE = (40, 60, 60)  # z, y, x


def lung_region(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """HU (z, y, x) of two box lungs with a posterior gradient, noise and vessels; lung mask, sides, coordinates mm."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(SHAPE, dtype=np.float32)
    mm = np.stack([z * SPACING[2], y * SPACING[1], x * SPACING[0]])
    lung = (z > 3) & (z < 36) & (y > 6) & (y < 54) & (((x > 4) & (x < 27)) | ((x > 33) & (x < 56)))
    hu = np.where(lung, -860.0 + 60.0 * y / SHAPE[1] + rng.normal(0, 15, SHAPE), 40.0).astype(np.float32)
    for cx in (15, 45):  # a vessel 4 mm wide running along each lung
        tube = ((x - cx) ** 2 + (y - 30) ** 2) * SPACING[0] ** 2 <= 2.0**2
        hu[tube & lung] = 40.0
    return hu, lung, np.broadcast_to(x >= 30, SHAPE), mm


def image(hu: np.ndarray) -> sitk.Image:
    out = sitk.GetImageFromArray(hu)
    out.SetSpacing(SPACING)
    return out


def ball(mm: np.ndarray, centre_mm: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    return sum((m - c) ** 2 for m, c in zip(mm, centre_mm)) <= radius_mm**2


def test_normal_lung_with_gradient_noise_and_vessels_gives_no_findings():
    hu, lung, sides, _ = lung_region()
    out = findings(image(hu), lung, sides)
    assert out.shape == (len(CHANNELS), *SHAPE) and out.dtype == np.float32
    assert np.abs(out).max() < 30.0  # HU beyond the normal band: noise only, no vessel, no gradient
    assert (out[:, ~lung] == 0).all()
    level = parenchyma_level(hu, lung, sides)
    assert abs(level[lung & (np.indices(SHAPE)[1] > 45)].mean() - level[lung & (np.indices(SHAPE)[1] < 15)].mean()
               - 60.0 * 35 / 60) < 15.0  # the fit follows the posterior gradient


@pytest.mark.parametrize(("hu_value", "channel"), [(30.0, "solid"), (-520.0, "ground glass"), (-990.0, "low attenuation")])
def test_a_finding_lands_in_its_channel_and_only_there(hu_value, channel):
    hu, lung, sides, mm = lung_region(1)
    spot = ball(mm, (50.0, 60.0, 30.0), 10.0) & lung
    hu[spot] = hu_value
    out = findings(image(hu), lung, sides)
    index = CHANNELS.index(channel)
    inner = ball(mm, (50.0, 60.0, 30.0), 5.0)
    assert out[index][inner].min() > 60.0
    for other in set(range(len(CHANNELS))) - {index}:
        assert out[other][inner].max() < 0.2 * out[index][inner].min()
    far = ~ball(mm, (50.0, 60.0, 30.0), 20.0)
    assert np.abs(out[:, far]).max() < 30.0  # the finding does not shift the lung's level elsewhere


def test_findings_narrower_than_the_vessel_ball_are_removed_wider_kept():
    hu, lung, sides, mm = lung_region(2)
    hu[ball(mm, (50.0, 60.0, 30.0), 2.0) & lung] = 30.0  # 4 mm nodule: vessel-sized
    hu[ball(mm, (50.0, 60.0, 90.0), 8.0) & lung] = 30.0  # 16 mm nodule
    out = findings(image(hu), lung, sides, vessel_mm=3.0)
    assert out[2][ball(mm, (50.0, 60.0, 30.0), 2.0)].max() < 30.0
    assert out[2][ball(mm, (50.0, 60.0, 90.0), 4.0)].min() > 100.0
    assert ball_radius((2.0, 2.0, 5.0), 3.0) == [2, 2, 0]  # no ball along an axis coarser than 4/3 of the radius


def test_config_checks_and_states_without_a_representation_are_ct():
    with pytest.raises(InputError, match="representation"):
        PreprocessConfig(representation="raw")
    with pytest.raises(InputError, match="vessel_mm"):
        PreprocessConfig(vessel_mm=-1.0)
    assert PreprocessConfig().channels == 3 and PreprocessConfig(representation="ct").channels == 1
    meta = {"version": 1, "config": {"grid": 32, "ndim": 3}, "scale": 1200.0}
    assert Preprocessor.from_state(meta, {}).config.representation == "ct"  # bundles from before findings


def test_model_channels_follow_the_representation():
    model = CLAMModel(k=2, grid=16, verbose=False)
    assert model.architecture.in_channels == 3 and model.architecture.smooth == 1.0
    assert CLAMModel(k=2, grid=16, preprocess=PreprocessConfig(grid=16, representation="ct"),
                     architecture=Architecture(grid=16)).architecture.in_channels == 1
    with pytest.raises(InputError, match="in_channels=3"):
        CLAMModel(k=2, architecture=Architecture(grid=16), preprocess=PreprocessConfig(grid=16))


def test_present_only_map_is_zero_where_the_image_holds_nothing():
    torch.manual_seed(0)
    net = ClusterNet(Architecture(ndim=2, grid=16, filters=(4, 8, 8), embedding=6, in_channels=3), 2).eval()
    with torch.no_grad():
        net.head.centroids.normal_(0, 1)
    x = torch.zeros(1, 3, 16, 16)
    x[0, 2, 3:6, 3:6] = 0.3  # this image's finding
    base = torch.zeros(1, 3, 16, 16)
    base[0, 2, 10:14, 10:14] = 0.3  # a finding of the cohort mean that this image lacks
    plain = integrated_gradients(net, x, ExplainContext(baseline=base))
    present = integrated_gradients(net, x, ExplainContext(baseline=base, present_only=True))
    weight = presence(x)[0]
    assert torch.equal(present, plain * weight)
    assert float(weight[4, 4]) == 1.0 and float(weight[12, 12]) == 0.0
    assert float(present[:, 11:13, 11:13].abs().max()) == 0.0


def test_findings_scale_makes_a_typical_lung_voxel_the_same_size_in_every_cohort():
    from CLAMLib.findings import SCALE_HU, TYPICAL, lung_scale

    assert lung_scale(0.0, 10) == SCALE_HU and lung_scale(0.0, 0) == SCALE_HU  # a cohort without findings
    scales = []
    for radius in (9.0, 14.0):  # a small and a large finding
        hu, lung, sides, mm = lung_region(3)
        hu[ball(mm, (50.0, 60.0, 30.0), radius) & lung] = 30.0
        pre = Preprocessor(PreprocessConfig(grid=16))
        prepared = pre.fit_transform([image(hu)])[0]
        rms = float(np.sqrt(np.mean(np.square(prepared.array[:, prepared.lung]))))
        assert rms == pytest.approx(TYPICAL, rel=1e-3)
        scales.append(pre.scale_)
    assert scales[1] > 2.0 * scales[0]
