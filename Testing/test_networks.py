"""U-Net: shapes, softmax output, SPECT-only input, parameter budget, the pointwise head."""
import pytest
import torch

from FCMSegmentationLib.networks import UNet, build_network, count_parameters, pointwise_head_logits


def test_default_3d_network_is_under_two_million_parameters():
    assert count_parameters(UNet()) < 2_000_000


@pytest.mark.parametrize("spatial_dims, shape", [(3, (2, 3, 16, 24, 8)), (2, (2, 3, 32, 16))])
def test_output_is_softmax_memberships_of_input_size(spatial_dims, shape):
    torch.manual_seed(0)
    network = UNet(spatial_dims=spatial_dims, channels=(4, 8, 16, 32)).eval()
    with torch.no_grad():
        u = network(torch.randn(shape))
    assert u.shape == (shape[0], 3) + shape[2:]
    assert torch.all(u >= 0)
    assert torch.allclose(u.sum(dim=1), torch.ones(()), atol=1e-5)


def test_runs_without_ct_and_the_ct_channel_matters():
    torch.manual_seed(0)
    network = UNet(channels=(4, 8, 16, 32)).eval()
    x = torch.rand(1, 3, 16, 16, 16)
    without_ct = x.clone()
    without_ct[:, 1:] = 0.0  # CT channel and ct_present flag off: SPECT alone
    with torch.no_grad():
        a, b = network(x), network(without_ct)
    assert torch.isfinite(b).all()
    assert not torch.allclose(a, b)


def test_features_then_head_equals_forward():
    torch.manual_seed(0)
    network = UNet(channels=(4, 8, 16, 32)).eval()
    x = torch.rand(1, 3, 16, 16, 16)
    with torch.no_grad():
        expected = network(x)
        features = network.features(x)
        flat = torch.softmax(pointwise_head_logits(network.head, features.reshape(features.shape[1], -1)), dim=0)
    assert torch.allclose(flat.reshape(expected.shape), expected, atol=1e-5)


def test_build_network_round_trips_config():
    network = UNet(channels=(4, 8, 16), head_channels=8)
    clone = build_network(network.config)
    assert clone.config == network.config
    assert count_parameters(clone) == count_parameters(network)


def test_rejects_bad_configuration():
    with pytest.raises(ValueError):
        UNet(spatial_dims=4)
    with pytest.raises(ValueError):
        UNet(channels=(8,))
