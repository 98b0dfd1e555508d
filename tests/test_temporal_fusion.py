import pytest
import torch

from ulbcodec.models.temporal_fusion import TemporalFusion


def test_untrained_fusion_is_almost_the_warped_reference():
    torch.manual_seed(0)
    net = TemporalFusion(width=8).eval()
    decoded, reference = torch.rand(2, 3, 32, 48), torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        fused = net(decoded, reference, 1.0, 4.0)
    blend = torch.sigmoid(torch.tensor(-4.0))
    assert torch.allclose(fused, reference + blend * (decoded - reference), atol=1e-6)
    assert TemporalFusion.from_config(net.config).config == {"width": 8}


def test_fusion_learns_to_take_the_decode_where_it_is_right():
    """A few steps on frames whose decode is exact and whose reference is noise move the
    output towards the decode: the blend and the correction both train."""
    torch.manual_seed(0)
    net = TemporalFusion(width=8)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    target = torch.rand(2, 3, 16, 16)
    reference = torch.rand(2, 3, 16, 16)
    before = torch.nn.functional.mse_loss(net(target, reference, 0, 3), target).item()
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(net(target, reference, 0, 3), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * before


def test_fusion_refuses_mismatched_frames():
    net = TemporalFusion(width=8)
    with pytest.raises(ValueError, match="equal"):
        net(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 20), 0, 1)
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.rand(1, 3, 18, 16), torch.rand(1, 3, 18, 16), 0, 1)
