"""Latent-conditional P frames: the keyframe codec's symbols coded under a temporal prior
(tiny random models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ulbcodec.models.anchor_codec import AnchorCodec
from ulbcodec.models.latent_conditional_codec import LatentConditionalCodec, TemporalLatentPrior
from ulbcodec.packages import ModelPackage
from ulbcodec.video import VideoCodec

from conftest import TINY_CONFIG, make_tiny_video_package, tiny_video_trainer_args
from test_pframe import assert_thread_count_invariant, encode, force_residual, frames_tensor
from test_video_codec import clip


@pytest.fixture(scope="module")
def keyframe_codec():
    torch.manual_seed(11)
    codec = AnchorCodec(**TINY_CONFIG)
    with torch.no_grad():  # a random g_a's y is far below the quantisation step: scale it up
        codec.gain.mul_(30)
    codec.update(force=True)
    return codec.eval()


def random_prior(seed: int = 12) -> TemporalLatentPrior:
    """A prior whose output layers are not at their (keyframe-equivalent) start."""
    torch.manual_seed(seed)
    prior = TemporalLatentPrior(M=TINY_CONFIG["M"], num_slices=TINY_CONFIG["num_slices"], width=8)
    for net in prior.nets:
        torch.nn.init.normal_(net[-1].weight, std=0.1)
        torch.nn.init.zeros_(net[-1].bias)
    return prior.eval()


@pytest.fixture(scope="module")
def codec(keyframe_codec):
    return LatentConditionalCodec(keyframe_codec, random_prior())


def test_compress_decompress_round_trip(codec):
    x, ref = frames_tensor(0), frames_tensor(1)
    coded = codec.compress(x, ref, 1)
    out = codec.decompress(coded["strings"], coded["shape"], ref, 1)
    assert out["symbols_crc32"] == coded["symbols_crc32"]
    assert torch.equal(out["x_hat"], coded["x_hat"])


def test_a_p_frame_decodes_to_the_keyframe_of_the_same_frame(codec, keyframe_codec):
    """Only the symbols' distribution changes: ŷ, and so the decoded frame, are the keyframe's."""
    x, ref = frames_tensor(2), frames_tensor(3)
    keyframe = keyframe_codec.compress(x, rate_level=2)
    expected = keyframe_codec.decompress(keyframe["strings"], keyframe["shape"], rate_level=2)["anchor_frame"]
    coded = codec.compress(x, ref, 2)
    assert torch.equal(coded["x_hat"], expected)
    assert coded["strings"][1] == keyframe["strings"][1][0]  # the same z string
    assert coded["strings"][0] != keyframe["strings"][0][0]  # y coded differently


def test_rate_distortion_optimised_symbols_decode_exactly_and_cost_fewer_bytes(codec):
    """The encoder's quantisation towards the prior's prediction needs nothing of the
    decoder: it rebuilds the encoder's frame from the chosen symbols; a smaller λ moves
    more symbols and saves bytes, and the same target again (remembered) codes the same file."""
    x, ref = frames_tensor(4), frames_tensor(5)
    plain = codec.compress(x, ref, 1)
    sizes = []
    for rdo_lambda in (100.0, 1.0):
        coded = codec.compress(x.clone(), ref, 1, rdo_lambda=rdo_lambda)
        assert coded["strings"] == codec.compress(x, ref, 1, rdo_lambda=rdo_lambda)["strings"]
        out = codec.decompress(coded["strings"], coded["shape"], ref, 1)
        assert out["symbols_crc32"] == coded["symbols_crc32"]
        assert torch.equal(out["x_hat"], coded["x_hat"])
        sizes.append(len(coded["strings"][0]))
    assert len(plain["strings"][0]) >= sizes[0] >= sizes[1] and sizes[1] < len(plain["strings"][0])
    assert not torch.equal(coded["x_hat"], plain["x_hat"])
    with pytest.raises(ValueError, match="rdo_lambda"):
        codec.compress(x, ref, 1, rdo_lambda=-1.0)


def test_an_encoder_trying_several_references_runs_each_transform_once(keyframe_codec, monkeypatch):
    """One target against two references: its ŷ (and so x̂), and what the keyframe codec's
    context models compute, are the same, so the synthesis and the context pass run once;
    each reference is analysed once, however often it recurs. The strings are those of
    codings from scratch."""
    prior = random_prior()
    x, refs = frames_tensor(16), [frames_tensor(17), frames_tensor(18)]
    expected = [LatentConditionalCodec(keyframe_codec, prior).compress(x, ref, 1) for ref in refs]
    fresh = LatentConditionalCodec(keyframe_codec, prior)
    calls = {"analyze": 0, "synthesize": 0, "_run_slices": 0}
    for name in calls:
        original = getattr(AnchorCodec, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(AnchorCodec, name, counted)
    got = [fresh.compress(x.clone(), ref.clone(), 1) for ref in refs + refs]
    assert calls == {"analyze": 1 + 2, "synthesize": 1, "_run_slices": 1}
    assert all(g["strings"] == e["strings"] and g["symbols_crc32"] == e["symbols_crc32"]
               and torch.equal(g["x_hat"], e["x_hat"]) for g, e in zip(got, expected + expected))
    # a skip map changes ŷ: that coding runs its own context pass and keeps none
    skip = torch.zeros(x.shape[-2] // 16, x.shape[-1] // 16, dtype=torch.bool)
    skip[0, 0] = True
    fresh.compress(x, refs[0], 1, skip=skip)
    assert calls["_run_slices"] == 2
    fresh.compress(x, refs[1], 1)
    assert calls["_run_slices"] == 2


def test_a_kept_latent_context_serves_only_its_own_plain_coding(keyframe_codec):
    y = keyframe_codec.analyze(frames_tensor(19), rate_level=1)
    out = keyframe_codec.encode_latent(y, keep_context=True)
    again = keyframe_codec.encode_latent(y.clone(), context=out["context"])
    assert again["strings"] == out["strings"] and torch.equal(again["y_hat"], out["y_hat"])
    with pytest.raises(ValueError, match="another y"):
        keyframe_codec.encode_latent(y + 1, context=out["context"])
    with pytest.raises(ValueError, match="no symbol chooser or skip map"):
        keyframe_codec.encode_latent(y, context=out["context"], skip=torch.zeros(y.shape[-2:], dtype=torch.bool))
    everywhere = torch.ones(y.shape[-2:], dtype=torch.bool)
    skipped = keyframe_codec.encode_latent(y, keep_context=True, skip=everywhere)
    assert skipped["context"] is None and skipped["strings"][0] == [b""]  # nothing left to code
    decoded = keyframe_codec.decode_latent(skipped["strings"], skipped["shape"], skip=everywhere)
    assert torch.equal(decoded["y_hat"], skipped["y_hat"])


def test_an_untrained_prior_codes_exactly_as_a_keyframe(keyframe_codec):
    untrained = LatentConditionalCodec(keyframe_codec, TemporalLatentPrior(TINY_CONFIG["M"], TINY_CONFIG["num_slices"]))
    x = frames_tensor(4)
    keyframe = keyframe_codec.compress(x, rate_level=1)
    coded = untrained.compress(x, frames_tensor(5), 1)
    assert coded["strings"] == [keyframe["strings"][0][0], keyframe["strings"][1][0]]


def test_training_lowers_the_rate_of_a_predictable_frame(keyframe_codec):
    """A few steps on a frame whose reference is itself: the prior learns to trust the
    reference and the conditional bits fall below the keyframe's."""
    codec = LatentConditionalCodec(keyframe_codec, TemporalLatentPrior(TINY_CONFIG["M"], TINY_CONFIG["num_slices"],
                                                                       width=8).train())
    opt = torch.optim.Adam(codec.prior.parameters(), lr=3e-2)
    x = frames_tensor(6, (2, 3, 64, 64))
    first = None
    for _ in range(30):
        bits, keyframe_bits = codec.rates(x, x, 2)
        first = first if first is not None else (bits.item(), keyframe_bits.item())
        opt.zero_grad()
        bits.backward()
        opt.step()
    assert first[0] == pytest.approx(first[1], rel=1e-4)  # untrained: the keyframe's rate
    assert bits.item() < 0.7 * keyframe_bits.item()
    assert all(p.grad is None for p in keyframe_codec.parameters())


def random_context_prior(seed: int = 13) -> TemporalLatentPrior:
    """A prior that sees the decoded parts, with every weight random."""
    torch.manual_seed(seed)
    prior = TemporalLatentPrior.with_decoded_context(random_prior(seed))
    for net in prior.nets:
        torch.nn.init.normal_(net[0].weight, std=0.05)
    return prior.eval()


def test_a_prior_extended_to_decoded_context_codes_as_before(codec, keyframe_codec):
    extended = LatentConditionalCodec(keyframe_codec, TemporalLatentPrior.with_decoded_context(codec.prior))
    assert extended.prior.config["decoded_context"] is True and "decoded_context" not in codec.prior.config
    x, ref = frames_tensor(12), frames_tensor(13)
    assert extended.compress(x, ref, 1)["strings"] == codec.compress(x, ref, 1)["strings"]


def test_decoded_context_round_trips_and_training_sees_what_the_coder_sees(keyframe_codec, monkeypatch):
    context = LatentConditionalCodec(keyframe_codec, random_context_prior())
    x, ref = frames_tensor(14), frames_tensor(15)
    ref = torch.where(torch.rand_like(x) < 0.8, x, ref)  # a reference that mostly agrees
    coded = context.compress(x, ref, 1)
    out = context.decompress(coded["strings"], coded["shape"], ref, 1)
    assert out["symbols_crc32"] == coded["symbols_crc32"] and torch.equal(out["x_hat"], coded["x_hat"])
    assert_thread_count_invariant(context, x, ref)
    C = TINY_CONFIG["M"] // TINY_CONFIG["num_slices"]
    with pytest.raises(ValueError, match="decoded parts"):
        context.prior(0, True, torch.zeros(1, TINY_CONFIG["M"], 4, 8), torch.ones(1, C, 4, 8), torch.zeros(1, C, 4, 8))
    seen = {"coder": [], "training": []}
    forward = TemporalLatentPrior.forward

    def record(self, i, anchor, prior, scales, means, decoded=None):
        seen[path].append(self._decoded_context(i, anchor, prior, decoded))
        return forward(self, i, anchor, prior, scales, means, decoded)

    monkeypatch.setattr(TemporalLatentPrior, "forward", record)
    path = "coder"
    context.compress(x, ref, 1)
    path = "training"
    with torch.no_grad():
        context.rates(x, ref, 1)
    assert len(seen["coder"]) == len(seen["training"]) == 2 * TINY_CONFIG["num_slices"]
    assert all(torch.equal(a, b) for a, b in zip(seen["coder"], seen["training"]))
    assert seen["coder"][-1].abs().sum() > 0  # the last part sees every earlier one


def test_entropy_path_is_thread_count_invariant(codec):
    assert_thread_count_invariant(codec, frames_tensor(7), frames_tensor(8))


def test_a_wrong_reference_desynchronises_and_the_check_sees_it(codec):
    x, ref = frames_tensor(9), frames_tensor(10)
    coded = codec.compress(x, ref, 2)
    out = codec.decompress(coded["strings"], coded["shape"], frames_tensor(11), 2)
    assert out["symbols_crc32"] != coded["symbols_crc32"]


def test_bad_inputs_are_refused(codec, keyframe_codec):
    with pytest.raises(ValueError, match="multiples of 64"):
        codec.compress(torch.zeros(1, 3, 60, 64), torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match="rate_level"):
        codec.compress(frames_tensor(0), frames_tensor(1), 5)
    coded = codec.compress(frames_tensor(0), frames_tensor(1), 0)
    with pytest.raises(ValueError, match="does not match"):
        codec.decompress(coded["strings"], (2, 2), frames_tensor(1), 0)
    with pytest.raises(ValueError, match="slices"):
        LatentConditionalCodec(keyframe_codec, TemporalLatentPrior(M=TINY_CONFIG["M"], num_slices=1))
    with pytest.raises(ValueError, match="multiple of num_slices"):
        TemporalLatentPrior(M=10, num_slices=4)


def test_a_video_package_with_it_decodes_exactly(tmp_path_factory, monkeypatch):
    """P frames under the temporal prior in a file: the decoder rebuilds exactly the
    encoder's reconstruction, on any thread count."""
    root = make_tiny_video_package(tmp_path_factory.mktemp("lvideo"), pframe="latent")
    assert ModelPackage.load_manifest(root).components["pframe"]["class"] == "TemporalLatentPrior"
    codec = VideoCodec.from_pretrained(str(root))
    assert isinstance(codec.pframe_codec, LatentConditionalCodec)
    with torch.no_grad():  # a prior that is not a keyframe's coding
        for net in codec.pframe_codec.prior.nets:
            torch.nn.init.normal_(net[-1].weight, std=0.1)
    force_residual(monkeypatch)
    data, gops, seen, log = encode(codec, clip(5), threshold=0.0)
    assert gops.frame_types() == "KPPPP" and all(r.parts == "residual" for r in log[1:])
    fresh = VideoCodec.from_pretrained(str(root))
    fresh.pframe_codec.prior.load_state_dict(codec.pframe_codec.prior.state_dict())
    decoded = list(fresh.decode(data))
    assert all(np.array_equal(a, b) for a, b in zip(seen, decoded))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        again = list(fresh.decode(data))
    finally:
        torch.set_num_threads(previous)
    assert all(np.array_equal(a, b) for a, b in zip(decoded, again))


def test_the_trainer_resumes_at_a_new_rate_and_exports_without_training_further(tmp_path):
    """train.pframe_latent: two steps, two more at a smaller learning rate (recorded in the
    schedule), then an export alone, which must not take another step."""
    import json

    from ulbcodec.train import pframe_latent

    package = make_tiny_video_package(tmp_path / "models", pframe="latent", half_parameters=True)
    common = tiny_video_trainer_args(tmp_path, package, clip(4, 64, 96), "--batch", "2")
    run = tmp_path / "run"
    pframe_latent.main(common + ["--steps", "2"])
    pframe_latent.main(common + ["--steps", "4", "--lr", "1e-4"])
    state = json.loads((run / "state.json").read_text())
    assert state["step"] == 4 and state["lr_schedule"] == [[0, 3e-3], [2, 1e-4]]
    weights = (run / "weights.safetensors").read_bytes()
    pframe_latent.main(common + ["--export", str(tmp_path / "exported")])
    assert (run / "weights.safetensors").read_bytes() == weights
    training = ModelPackage.load_manifest(tmp_path / "exported").extra["pframe_training"]
    assert training["steps"] == 4 and training["lr_schedule"] == [[0, 3e-3], [2, 1e-4]]
    with pytest.raises(SystemExit):
        pframe_latent.main(common)
    extended = [a if a != str(run) else str(tmp_path / "extended") for a in common]
    pframe_latent.main(extended + ["--steps", "1", "--init-from", str(tmp_path / "exported"), "--decoded-context"])
    state = json.loads((tmp_path / "extended" / "state.json").read_text())
    assert state["config"]["decoded_context"] is True and state["init_from"]["steps"] == 4
    pframe_latent.main(extended + ["--steps", "2"])  # resumes with the run's own architecture
