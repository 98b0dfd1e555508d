"""Importing the official NeFIC checkpoints (importers/nefic.py and models/lora.py, `ulbc models import-nefic`).

The real files (CogVideoX-1.5-5B, six rate points of ~3 GB) cannot be downloaded here, so
every test uses tiny random models of the real classes, saved in the published layouts:
the base model with diffusers' save_pretrained (sharded), anchor_codec.bin with
torch.save of a state dict, the LoRA with the key names of tests/data/lora_expected_keys.json.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ulbcodec.importers import nefic
from ulbcodec.models import lora
from ulbcodec.packages import ModelError, ModelPackage

from conftest import DATA, TINY_CONFIG, TINY_LATENT, TINY_TRANSFORMER, TINY_VAE

RANK = 4
TWO_LAYERS = {**TINY_TRANSFORMER, "num_layers": 2}
# NeFIC's anchor codec: no gain vectors (one codec per rate point), encoder sees the VAE latent.
CODEC_CONFIG = {**TINY_CONFIG, "num_rate_levels": 0, "bypass_channels": TINY_LATENT, "vae_channels": TINY_LATENT}
# CogVideoX-1.5-5B's transformer (48 heads x 64, 42 layers, time embedding 512, T5 4096).
BASE_5B = dict(num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
               text_embed_dim=4096, num_layers=42, sample_width=300, sample_height=300, sample_frames=81,
               patch_size=2, patch_size_t=2, temporal_compression_ratio=4, max_text_seq_length=226,
               use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def _published_names():
    return [name for name, _ in json.loads((DATA / "lora_expected_keys.json").read_text())["keys"]]


def _transformer(seed=0, layers=2):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(**{**TWO_LAYERS, "num_layers": layers}).eval()


def _lora_tensors(transformer, seed=1, rank=RANK):
    """A LoRA named as the published file (its names for the blocks this transformer has),
    shaped from the transformer's own layers."""
    g = torch.Generator().manual_seed(seed)
    blocks = len(transformer.transformer_blocks)
    tensors = {}
    for name in _published_names():
        if int(name.split(".")[2]) >= blocks:
            continue
        layer = transformer.get_submodule(name[len("transformer."):].rsplit(".lora_", 1)[0])
        shape = (rank, layer.in_features) if ".lora_A." in name else (layer.out_features, rank)
        tensors[name] = torch.randn(shape, generator=g) * 0.1
    return tensors


def _run(transformer):
    from ulbcodec.models.rope import rotary_embedding

    torch.manual_seed(5)
    frames = torch.randn(1, 4, TINY_LATENT, 8, 8)
    rope = rotary_embedding(8, 8, TINY_TRANSFORMER["attention_head_dim"], TINY_TRANSFORMER["patch_size"])
    with torch.no_grad():
        return transformer(hidden_states=frames, encoder_hidden_states=torch.randn(1, 3, 8),
                           timestep=torch.tensor([500]), image_rotary_emb=rope, return_dict=False)[0]


def _merged(transformer, tensors, scale=1.0):
    """The explicit computation: W + scale * B @ A in every target layer of a copy."""
    merged = copy.deepcopy(transformer)
    with torch.no_grad():
        for name in lora.lora_targets(merged):
            a = tensors[f"transformer.{name}.lora_A.weight"]
            b = tensors[f"transformer.{name}.lora_B.weight"]
            merged.get_submodule(name).weight += scale * b @ a
    return merged


# ------------------------------------------------------------------ (a) the LoRA loader


def test_lora_output_equals_explicit_merged_weights(tmp_path):
    base = _transformer()
    reference = _run(base)
    tensors = _lora_tensors(base)
    save_file(tensors, str(tmp_path / "lora.safetensors"))
    expected = _run(_merged(base, tensors))
    original = {k: v.clone() for k, v in base.state_dict().items()}

    assert lora.load_lora(tmp_path / "lora.safetensors", base) == RANK
    out = _run(base)
    assert not torch.allclose(out, reference, atol=1e-3)  # the LoRA does something ...
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)  # ... exactly W + B @ A
    for name, layer in lora.lora_targets(base).items():  # unmerged: base weights untouched
        assert torch.equal(layer.weight, original[f"{name}.weight"])
        assert isinstance(base.get_submodule(name), lora.LoRALinear)

    # A second LoRA replaces the first (no adapter stacked on an adapter), with alpha/rank.
    second = _lora_tensors(base, seed=2)
    assert lora.apply_lora(base, second, alpha=2 * RANK) == RANK
    torch.testing.assert_close(_run(base), _run(_merged(_transformer(), second, scale=2.0)), rtol=1e-5, atol=1e-5)


def test_old_style_names_and_other_models_keys_are_handled_as_published(tmp_path):
    base = _transformer()
    tensors = _lora_tensors(base)
    renamed = {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v for k, v in tensors.items()}
    renamed["text_encoder.encoder.block.0.lora_A.weight"] = torch.zeros(RANK, 8)  # not the transformer's: left out
    save_file(renamed, str(tmp_path / "old.safetensors"))
    lora.load_lora(tmp_path / "old.safetensors", base)
    torch.testing.assert_close(_run(base), _run(_merged(_transformer(), tensors)), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ (b) refusals


@pytest.mark.parametrize("change, message", [
    ("missing", r"missing transformer\.transformer_blocks\.1\.norm2\.linear\.lora_B\.weight"),
    ("unexpected", r"unexpected transformer\.transformer_blocks\.0\.ff\.net\.0\.proj\.lora_A\.weight"),
    ("shape", r"transformer_blocks\.0\.attn1\.to_k\.lora_A\.weight has shape \(4, 31\), expected \(4, 32\)"),
    ("rank", r"to_v\.lora_B\.weight has shape \(32, 3\), expected \(32, 4\) \(rank 4"),
    ("extra block", r"unexpected transformer\.transformer_blocks\.2\.attn1\.to_k\.lora_A\.weight, .* \(12 in all\)$"),
])
def test_mismatched_lora_is_refused_with_one_clear_line(tmp_path, change, message):
    base = _transformer()
    tensors = _lora_tensors(base)
    if change == "missing":
        del tensors["transformer.transformer_blocks.1.norm2.linear.lora_B.weight"]
    elif change == "unexpected":
        tensors["transformer.transformer_blocks.0.ff.net.0.proj.lora_A.weight"] = torch.zeros(RANK, 32)
    elif change == "shape":
        tensors["transformer.transformer_blocks.0.attn1.to_k.lora_A.weight"] = torch.zeros(RANK, 31)
    elif change == "rank":
        tensors["transformer.transformer_blocks.0.attn1.to_v.lora_B.weight"] = torch.zeros(32, RANK - 1)
    else:  # a LoRA of a deeper model
        tensors = _lora_tensors(_transformer(layers=3))
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    before = _run(base)
    with pytest.raises(ModelError, match=message) as err:
        lora.load_lora(path, base)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert not any(isinstance(m, lora.LoRALinear) for m in base.modules())  # left as it was
    assert torch.equal(_run(base), before)


def test_lora_must_be_safetensors(tmp_path):
    base = _transformer()
    torch.save(_lora_tensors(base), tmp_path / "lora.bin")
    with pytest.raises(ModelError, match="must be a .safetensors file"):
        lora.load_lora(tmp_path / "lora.bin", base)
    (tmp_path / "fake.safetensors").write_bytes(b"\x80\x04 not safetensors")
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        lora.load_lora(tmp_path / "fake.safetensors", base)


# ------------------------------------------------------------------ (c) the published key names


def test_published_lora_names_match_the_loaders_targets_for_42_layers():
    meta = nefic.meta_transformer(BASE_5B)  # shapes only: nothing allocated
    assert next(meta.parameters()).is_meta and len(meta.transformer_blocks) == 42
    keys = json.loads((DATA / "lora_expected_keys.json").read_text())["keys"]
    published = {name: tuple(shape) for name, shape in keys}
    expected = {"transformer." + k: v for k, v in lora.lora_shapes(meta, 256).items()}
    assert set(published) == set(expected) and len(published) == 504
    assert published == expected  # the shapes agree too (rank 256)
    assert lora.check_lora(published, meta) == 256


# ------------------------------------------------------------------ (d) import end to end


def _write_base(root: Path) -> Path:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler

    from ulbcodec.models.next_frame import SCHEDULER_CONFIG

    torch.manual_seed(3)
    AutoencoderKLCogVideoX(**TINY_VAE).save_pretrained(str(root / "vae"))
    _transformer().save_pretrained(str(root / "transformer"), max_shard_size="20KB")  # sharded, like the 5B
    CogVideoXDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(str(root / "scheduler"))
    (root / "model_index.json").write_text('{"_class_name": "CogVideoXPipeline"}')
    return root


def _write_checkpoint(root: Path, seed: int, prompt=True) -> Path:
    from ulbcodec.models.anchor_codec import AnchorCodec

    root.mkdir(parents=True)
    torch.manual_seed(seed)
    codec = AnchorCodec(**CODEC_CONFIG)
    codec.update(force=True)
    torch.save(codec.state_dict(), root / "anchor_codec.bin")  # the published format: a pickled state dict
    save_file(_lora_tensors(_transformer(), seed=seed), str(root / "pytorch_lora_weights.safetensors"))
    if prompt:
        save_file({"prompt_embeds": torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(9))},
                  str(root / "prompt_embeds.safetensors"))
    return root


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("nefic")
    base = _write_base(root / "CogVideoX1.5-5B")
    checkpoints = [_write_checkpoint(root / "checkpoints" / f"nefic_lambda{lm}", seed) for lm, seed in (("1", 11),
                                                                                                      ("5", 12))]
    return root, base, checkpoints


def _import(base, checkpoints, out, *extra):
    from ulbcodec.cli import cli

    args = ["models", "import-nefic", "--base", base, *sum((["--checkpoint", c] for c in checkpoints), []), "-o", out]
    return CliRunner().invoke(cli, [str(a) for a in args + list(extra)])


@pytest.fixture(scope="module")
def imported(published):
    root, base, checkpoints = published
    r = _import(base, checkpoints, root / "models" / "nefic")
    assert r.exit_code == 0, r.output
    assert "imported 2 rate level(s)" in r.stdout
    return root / "models" / "nefic"


def test_import_writes_a_package_referencing_the_base(published, imported):
    root, base, (lambda1, lambda5) = published
    manifest = json.loads((imported / "ulbc_model.json").read_text())
    comps = manifest["components"]
    for name in ("vae", "transformer", "scheduler"):
        assert comps[name]["external"]["path"] == str(base / name) and not (imported / name).exists()
    # level 0 = the lowest rate = the largest lambda (NeFIC: lambda 5)
    assert [(lv["level"], lv["note"]) for lv in manifest["rate_levels"]] == [(0, "nefic_lambda5"), (1, "nefic_lambda1")]
    assert (imported / "lora.0.safetensors").read_bytes() == (lambda5 / "pytorch_lora_weights.safetensors").read_bytes()
    state = torch.load(lambda5 / "anchor_codec.bin", weights_only=True)
    converted = load_file(str(imported / comps["anchor_codec"]["levels"]["0"]))
    assert set(converted) == set(state) and all(torch.equal(converted[k], state[k]) for k in state)
    assert comps["lora"]["config"] == {"rank": RANK, "alpha": RANK, "target": "transformer"}
    pkg = ModelPackage.load_manifest(imported)
    assert pkg.is_generative and pkg.per_level("anchor_codec") and not pkg.per_level("vae")
    assert not [p for p in imported.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_imported_package_encodes_and_decodes_generatively(published, imported, photo):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXTransformer3DModel

    from ulbcodec.image import ImageCodec
    from ulbcodec.models.next_frame import NextFramePipeline
    from ulbcodec.packages import _load_diffusers

    _, base, (lambda1, lambda5) = published
    rgb = np.ascontiguousarray(photo[:60, :90])
    codec = ImageCodec.from_pretrained(str(imported))
    assert codec.rate_levels == [0, 1]
    low, high = codec.encode(rgb, 0).data, codec.encode(rgb, 1).data
    first = codec.decode(low)
    assert first.shape == rgb.shape and not np.array_equal(first, codec.decode(low, anchor_only=True))
    other = codec.decode(high)  # swaps in level 1's anchor codec and LoRA ...
    lora1 = load_file(str(lambda1 / "pytorch_lora_weights.safetensors"))
    to_q = codec.next_frame.transformer.get_submodule("transformer_blocks.0.attn1.to_q")
    assert torch.equal(to_q.lora_A.weight, lora1["transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"])
    assert other.shape == rgb.shape and np.array_equal(codec.decode(low), first)  # ... and back

    # The package's decoder is exactly the base model plus that level's published LoRA,
    # decoding as published (models/nefic_decode.py; tests/test_nefic_conformance.py).
    transformer = _load_diffusers(CogVideoXTransformer3DModel, base / "transformer", "cpu")
    lora.load_lora(lambda5 / "pytorch_lora_weights.safetensors", transformer)
    prompt = load_file(str(lambda5 / "prompt_embeds.safetensors"))["prompt_embeds"]
    manual = NextFramePipeline(_load_diffusers(AutoencoderKLCogVideoX, base / "vae", "cpu"), transformer,
                               _load_diffusers(CogVideoXDPMScheduler, base / "scheduler", "cpu"), prompt,
                               published=True)
    reference = ImageCodec.from_pretrained(str(imported))
    reference._next_frame, reference._lora_level = manual, 0
    assert np.array_equal(reference.decode(low), first)


def test_changed_base_model_is_refused(published, imported):
    from ulbcodec.image import ImageCodec

    _, base, _ = published
    config, shard = base / "transformer" / "config.json", next((base / "transformer").glob("*.safetensors"))
    for path, edit in ((config, lambda b: b.replace(b'"num_layers": 2', b'"num_layers": 2 ')),  # same value, new text
                       (shard, lambda b: b + b"\0")):  # one byte more
        original = path.read_bytes()
        path.write_bytes(edit(original))
        try:
            with pytest.raises(ModelError, match="base model differs from the one imported") as err:
                ImageCodec.from_pretrained(str(imported))
            assert "\n" not in str(err.value)
        finally:
            path.write_bytes(original)
        ModelPackage.load_manifest(imported)  # restored: accepted again


def test_failed_import_leaves_nothing_behind(published, tmp_path):
    root, base, checkpoints = published
    out = tmp_path / "pkg"
    no_prompt = _write_checkpoint(tmp_path / "nefic_lambda3", 13, prompt=False)
    bad_lora = _write_checkpoint(tmp_path / "nefic_lambda2", 14)
    save_file(_lora_tensors(_transformer(layers=3)), str(bad_lora / "pytorch_lora_weights.safetensors"))
    for dirs, message in (([no_prompt], "no prompt embeddings"),
                          ([checkpoints[0], bad_lora], "unexpected transformer.transformer_blocks.2"),
                          ([tmp_path], "not a NeFIC checkpoint directory")):
        r = _import(base, dirs, out)
        assert r.exit_code == 1 and r.stderr.startswith("ulbc: error: ") and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert _import(base, checkpoints[:1], out).exit_code == 0
    r = _import(base, checkpoints[:1], out)
    assert r.exit_code == 1 and "already exists" in r.stderr
    assert _import(base, checkpoints, out, "--force").exit_code == 0
    assert len(ModelPackage.load_manifest(out).rate_levels) == 2


def test_prompt_embeds_from_the_published_pt_file(tmp_path):
    # The published assets/prompt_embeds.pt: torch.save of one bf16 tensor [1, 226, 4096].
    ckpt, base = tmp_path / "ckpt", tmp_path / "base"
    ckpt.mkdir(), base.mkdir()
    embeds = torch.randn(1, 3, 8).bfloat16()
    torch.save(embeds, base / "prompt_embeds.pt")
    found = nefic._read_prompt_embeds([ckpt, base], 8)
    assert found.dtype == torch.float32 and torch.equal(found, embeds.float())
    save_file({"prompt_embeds": torch.zeros(1, 3, 8)}, str(ckpt / "prompt_embeds.safetensors"))
    with pytest.raises(ModelError, match="prompt embeddings differ from those in"):
        nefic._read_prompt_embeds([ckpt, base], 8)
    with pytest.raises(ModelError, match=r"must be one tensor \[1, L, 16\], got \(1, 3, 8\)"):
        nefic._read_prompt_embeds([ckpt], 16)


def test_models_still_lists_with_json(imported, monkeypatch):
    from ulbcodec.cli import cli

    monkeypatch.setenv("ULBC_MODEL_PATH", str(imported.parent))
    r = CliRunner().invoke(cli, ["models", "--json"])
    row = next(json.loads(line) for line in r.stdout.splitlines() if json.loads(line)["name"] == "nefic")
    assert r.exit_code == 0 and row["rate_levels"] == [0, 1] and row["generative"] is True


# ------------------------------------------------------------------ (e) weights-only loading


def _touch(path):  # what an unpickled payload would run
    Path(path).write_text("executed")


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _touch, (str(self.marker),)


def test_anchor_codec_pickle_with_an_object_is_refused(tmp_path):
    from ulbcodec.models.anchor_codec import AnchorCodec

    marker = tmp_path / "marker"
    state = AnchorCodec(**CODEC_CONFIG).state_dict()
    torch.save({**state, "extra": Payload(marker)}, tmp_path / "evil.bin")
    with pytest.raises(ModelError, match=r"refused by weights-only loading.*GLOBAL test_nefic_import\._touch") as err:
        nefic.convert_anchor_codec(tmp_path / "evil.bin")
    assert "\n" not in str(err.value) and not marker.exists()
    torch.save({"state_dict": state}, tmp_path / "nested.bin")
    with pytest.raises(ModelError, match="not a flat dict of tensors"):
        nefic.convert_anchor_codec(tmp_path / "nested.bin")
    for seed in range(20):  # corrupt bytes: whatever the unpickler trips on, one clear ModelError
        (tmp_path / "junk.bin").write_bytes(random.Random(seed).randbytes(64))
        with pytest.raises(ModelError, match="refused by weights-only loading|not a PyTorch checkpoint"):
            nefic.convert_anchor_codec(tmp_path / "junk.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="not a PyTorch checkpoint"):
        nefic.convert_anchor_codec(tmp_path / "empty.bin")
    del state["g_s.synthesis_transform.0.conv1.weight"]
    torch.save(state, tmp_path / "short.bin")
    with pytest.raises(ModelError, match=r"missing g_s\.synthesis_transform\.0\.conv1\.weight"):
        nefic.convert_anchor_codec(tmp_path / "short.bin")


def test_published_tiny_anchor_codec_converts_strictly_and_keeps_its_tables(tmp_path):
    from ulbcodec.models.anchor_codec import AnchorCodec

    published = load_file(str(DATA / "anchor_codec_tiny_weights.safetensors"))
    torch.save(published, tmp_path / "anchor_codec.bin")
    state = nefic.convert_anchor_codec(tmp_path / "anchor_codec.bin")
    assert all(torch.equal(state[k], v) for k, v in published.items()) and set(state) == set(published)
    AnchorCodec.load_pretrained_state_dict(state)  # strict
