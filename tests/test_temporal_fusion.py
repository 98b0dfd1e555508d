"""The temporal fusion of fused P frames: the network, its trainer, and fused P frames in
files (tiny random models)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ulbcodec.bitstream import (CHUNK_GOPS, MAX_FUSION_DROP, BitstreamError, Chunk, Container, GopStructure,
                                describe)
from ulbcodec.image import DecodeError
from ulbcodec.models.temporal_fusion import TemporalFusion
from ulbcodec.packages import ModelPackage
from ulbcodec.video import VideoCodec

from conftest import make_tiny_video_package, tiny_video_trainer_args
from test_pframe import encode
from test_video_codec import clip


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


# ---------------------------------------------------------------------- fused P frames in a file


def prefer_fused(monkeypatch):
    """Fused P frames win every mode decision (a random fusion would rarely win on cost)."""
    candidate = VideoCodec._candidate

    def cheap_if_fused(self, target, level, unit, *rest):
        cost, *other = candidate(self, target, level, unit, *rest)
        return (-1.0 if unit.fusion_drop else cost, *other)

    monkeypatch.setattr(VideoCodec, "_candidate", cheap_if_fused)


@pytest.fixture(scope="module")
def fused_package(tmp_path_factory):
    return make_tiny_video_package(tmp_path_factory.mktemp("fvideo"), pframe="latent", fusion=True)


def test_fused_p_frames_decode_exactly_on_any_thread_count(fused_package, monkeypatch):
    prefer_fused(monkeypatch)
    codec = VideoCodec.from_pretrained(str(fused_package))
    top = max(codec.image.rate_levels)
    data, gops, seen, log = encode(codec, clip(5), threshold=0.0, rate_level=top)
    assert gops.syntax == 5 and gops.frame_types()[0] == "K"
    drops = [u.fusion_drop for _, units in gops.segments for u in units]
    assert len(drops) == gops.fused_frames == 4 and all(0 < d <= top for d in drops)
    assert all("fused-" in r.parts for r in log[1:])
    assert describe(Container.from_bytes(data))["gop"]["fused"] == [1, 2, 3, 4]  # what `ulbc info` lists
    fresh = VideoCodec.from_pretrained(str(fused_package))
    decoded = list(fresh.decode(data))
    assert len(decoded) == 5 and all(np.array_equal(a, b) for a, b in zip(seen, decoded))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert all(np.array_equal(a, b) for a, b in zip(decoded, fresh.decode(data)))
    finally:
        torch.set_num_threads(previous)
    # the fusion is what decodes them: the P frames' decodes alone are other frames
    assert any(not np.array_equal(a, b) for a, b in zip(decoded[1:], seen[:-1]))


def test_a_file_with_fused_p_frames_is_refused_where_it_cannot_decode(fused_package, monkeypatch):
    prefer_fused(monkeypatch)
    codec = VideoCodec.from_pretrained(str(fused_package))
    data, gops, _, _ = encode(codec, clip(3), threshold=0.0, rate_level=max(codec.image.rate_levels))
    without = VideoCodec.from_pretrained(str(fused_package))
    without.has_fusion = False  # the same package as one without a fusion would read it
    with pytest.raises(DecodeError, match="no temporal fusion"):
        next(without.decode(data))
    container = Container.from_bytes(data)
    too_far = GopStructure([(k, [u._replace(fusion_drop=MAX_FUSION_DROP) for u in units])
                            for k, units in gops.segments])
    chunks = [Chunk(CHUNK_GOPS, too_far.to_bytes()) if c.type == CHUNK_GOPS else c for c in container.chunks]
    with pytest.raises(BitstreamError, match="not a level"):
        next(codec.decode(Container(container.header, chunks).to_bytes()))


def test_the_trainer_exports_a_package_whose_codec_fuses(tmp_path):
    """train.temporal_fusion: two steps, one more on longer windows with the perceptual
    terms (both recorded), then an export alone (no further step): the exported package is
    a video package with fused P frames."""
    from ulbcodec.train import temporal_fusion

    package = make_tiny_video_package(tmp_path / "models", pframe="latent", half_parameters=True)
    common = tiny_video_trainer_args(tmp_path, package, clip(4, 64, 96), "--batch", "1", "--width", "4")
    run = tmp_path / "run"
    with pytest.raises(SystemExit):  # nothing to export yet
        temporal_fusion.main(common + ["--export", str(tmp_path / "exported")])
    temporal_fusion.main(common + ["--steps", "2"])
    temporal_fusion.main(common + ["--steps", "3", "--window", "4", "--perceptual-weight", "500"])
    state = json.loads((run / "state.json").read_text())
    assert state["window_schedule"] == [[0, 3], [2, 4]] and state["perceptual_schedule"] == [[0, 0.0], [2, 500.0]]
    assert set(state["log"][-1]) >= {"psnr_fused", "perceptual_fused", "perceptual_warp"}
    with pytest.raises(ValueError, match="5 frames"):  # the one clip has 4
        temporal_fusion.main(common + ["--steps", "4", "--window", "5"])
    weights = (run / "weights.safetensors").read_bytes()
    temporal_fusion.main(common + ["--export", str(tmp_path / "exported"), "--width", "8"])
    assert (run / "weights.safetensors").read_bytes() == weights
    exported = ModelPackage.load_manifest(tmp_path / "exported")
    training = exported.extra["temporal_fusion_training"]
    assert training["steps"] == 3 and training["window_schedule"] == [[0, 3], [2, 4]]
    assert exported.components["temporal_fusion"]["config"] == {"width": 4}
    codec = VideoCodec.from_pretrained(str(tmp_path / "exported"))
    assert codec.has_fusion and codec._fusion_levels(2) == [0]


def test_perceptual_mode_decisions_are_the_encoders_alone(fused_package, monkeypatch):
    """--perceptual-weight changes what the encoder weighs (the detail and VIF losses join
    MSE in every mode's cost), not what the decoder does: its files decode exactly."""
    codec = VideoCodec.from_pretrained(str(fused_package))
    codec.pframe_lambdas = dict.fromkeys(codec.pframe_lambdas, 1e-3)  # the tiny package's λ are 0
    frames = clip(3, 64, 96)
    costs = {}
    for weight in (0.0, 500.0):
        seen_costs = []
        candidate = VideoCodec._candidate

        def recording(self, *args, _seen=seen_costs):
            out = candidate(self, *args)
            _seen.append(out[0])
            return out

        monkeypatch.setattr(VideoCodec, "_candidate", recording)
        data, _, seen, _ = encode(codec, frames, threshold=0.0, rate_level=1, perceptual_weight=weight)
        monkeypatch.undo()
        costs[weight] = seen_costs
        assert all(np.array_equal(a, b) for a, b in zip(seen, VideoCodec.from_pretrained(str(fused_package))
                                                         .decode(data)))
    # the first P frame's modes (repeat, P frame, fused P frame at least) from the same
    # keyframe: each now with a perceptual cost
    assert len(costs[0.0]) >= 3 and all(b > a for a, b in zip(costs[0.0][:3], costs[500.0][:3]))
