"""Continuing training from a shipped package: the anchor trainer's ``--init-from`` (new
run, the package's weights and gains) and the generative trainer's ``--init-from`` on a
different ``--anchor-model`` (the decoder moves onto that anchor codec, bypass head kept)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT_DIR, run_trainer
from safetensors.torch import load_file

TINY_RUN = ["--batch", "1", "--log-every", "1", "--save-every", "0"]
BYPASS_PREFIXES = ("project_in.", "information_transformer_layes.", "spatial_ch_projs.")


def run(args, tmp_path: Path) -> str:
    return run_trainer([sys.executable, "-m", *map(str, args)], tmp_path)


@pytest.fixture(scope="module")
def one_step_anchor(photos, tmp_path_factory) -> Path:
    """An anchor-codec package of the default config after one training step from scratch
    (so its weights differ from the shipped ones)."""
    root = tmp_path_factory.mktemp("anchor")
    run(["ulbcodec.train.anchor", "--data", photos, "--run", root / "run", "--steps", "1", "--crop", "64",
         *TINY_RUN, "--export", root / "package"], root)
    return root / "package"


def weights(package: Path) -> dict:
    return load_file(str(package / "anchor_codec.safetensors"))


def manifest(package: Path) -> dict:
    return json.loads((package / "ulbc_model.json").read_text())


def trained(state: dict) -> dict:
    """The weights the network optimiser moves (not the quantiles, fitted by their own
    optimiser, nor the CDF tables built from them)."""
    return {k: v for k, v in state.items() if not k.startswith("entropy_bottleneck.")
            and not k.startswith("gaussian_conditional.")}


def test_anchor_trainer_continues_from_a_package(photos, one_step_anchor, tmp_path):
    first, second = one_step_anchor, tmp_path / "second"
    # lr 0: a continuation that changes nothing must export the same weights, gains included
    # (no second widening of the gain spread)
    out = run(["ulbcodec.train.anchor", "--data", photos, "--run", tmp_path / "run2", "--init-from", first,
               "--steps", "1", "--crop", "64", "--lr", "0", *TINY_RUN, "--export", second],
              tmp_path)
    assert "resumed" not in out
    before, after = trained(weights(first)), trained(weights(second))
    assert before.keys() == after.keys() and any(k.startswith("gain") for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    record = manifest(second)["extra"]["training"]
    assert record["init_from"]["digest"] == manifest(first)["digest"]
    assert record["init_from"]["training"] == manifest(first)["extra"]["training"] and record["steps"] == 1


def test_generative_continuation_moves_the_decoder_onto_another_anchor_codec(photos, one_step_anchor, tmp_path):
    anchor, out = one_step_anchor, tmp_path / "generative"
    # --crop 192: MS-SSIM in the stage II loss needs more than 160 pixels a side
    run(["ulbcodec.train.generative", "--data", photos, "--run", tmp_path / "run2", "--anchor-model", anchor,
         "--init-from", "generative", "--output", "anchor_residual", "--stage2-steps", "1", "--lr", "0",
         "--crop", "192", *TINY_RUN, "--export", out], tmp_path)
    new, base = weights(out), weights(anchor)
    shipped = weights(ROOT_DIR / "models" / "generative")
    bypass = {k for k in new if k.startswith(BYPASS_PREFIXES)}
    assert bypass and all(torch.equal(new[k], shipped[k]) for k in bypass)  # lr 0: the package's head
    rest = set(new) - bypass
    assert all(torch.equal(new[k], base[k]) for k in rest)  # everything else: --anchor-model's
    first_conv = "g_a.analysis_transform.0.conv1.weight"
    assert not torch.equal(new[first_conv], shipped[first_conv])  # so the two codecs did differ
    training = manifest(out)["extra"]["training"]
    assert training["continuation"]["anchor_model_digest"] == manifest(anchor)["digest"]
