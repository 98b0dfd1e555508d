"""Fuzzing regressions: the seed corpus, the crash reproducers and a bounded random fuzz.

Every input goes through the fuzz target's own check (fuzz/decode_check.py): it must end
in a successful decode or in an error the CLI reports cleanly, within a time bound.
The reproducers in fuzz/crashes/ and the random fuzz run in a child process, so that a
native crash (the rANS decoder is C++) fails one test instead of killing pytest.
No atheris needed: see fuzz/README.md for the coverage-guided fuzzer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FUZZ = ROOT / "fuzz"
CHECK_SCRIPT = FUZZ / "decode_check.py"

spec = importlib.util.spec_from_file_location("ulbc_fuzz_decode_check", CHECK_SCRIPT)
dc = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = dc  # (dataclasses look their module up while it executes)
spec.loader.exec_module(dc)

# Work is bounded by counts (inputs, mutations, the fuzz limits on decoded size), never by
# the clock: the time bounds below are hang guards only, generous enough for a machine
# under any load (seeds decode in ~0.05 s, 2,000 mutations in ~15-20 s here).
SECONDS_PER_INPUT = 120.0
CHILD_RSS_MB = 2048  # a child decoding small inputs peaks at ~0.6 GB (torch + tiny model)
CHILD_ADDRESS_SPACE = 4 << 30
MUTATIONS, MUTATION_HANG_GUARD_S = 2000, 3600.0


def _files(folder: Path):
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".ulb") if folder.is_dir() else []


CORPUS = _files(dc.CORPUS_DIR)
CRASHES = _files(dc.CRASHES_DIR)

# Reproducers run with the limits the CLI would apply. The size bombs that declare a huge
# image over a few bytes of anchor are refused by the format's anchor-size rule
# (bitstream.MAX_CODED_PIXELS_PER_ANCHOR_BYTE) whatever the limit; the valid 11 KB stream
# relabelled 32768x8192 with downscale 8 really is a 268 MP image, and what refuses it is
# the memory check (the CLI's default is 3/4 of the machine's memory; 2 GiB here, as
# `ulbc decode --max-memory 2G`, so that the child stays small on any machine).
REPRODUCER_ARGS = {"size-bomb-downscale8-valid-stream.ulb": ["--max-memory", "2G"]}


@pytest.fixture(scope="module")
def fuzz_model(tmp_path_factory) -> Path:
    return dc.build_package(tmp_path_factory.mktemp("fuzz-model"))


@pytest.fixture(scope="module")
def fuzz_codec(fuzz_model):
    import torch

    threads = torch.get_num_threads()
    codec = dc.build_codec(fuzz_model)
    yield codec
    torch.set_num_threads(threads)


def _limit_memory():  # in the child: a runaway decode fails there instead of swapping the machine
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (CHILD_ADDRESS_SPACE, CHILD_ADDRESS_SPACE))


def _run_child(args, timeout: float):
    """Run fuzz/decode_check.py; returns (returncode or None on timeout, stdout, stderr)."""
    cmd = [sys.executable, str(CHECK_SCRIPT), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            preexec_fn=_limit_memory)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return None, out, err
    return proc.returncode, out, err


def test_corpus_is_present_and_small():
    assert len(CORPUS) >= 40, "regenerate with: .venv/bin/python fuzz/make_seeds.py"
    assert sum(p.stat().st_size for p in CORPUS) < 200_000
    assert (dc.CRASHES_DIR / "README.md").is_file()


def test_valid_seeds_match_the_fuzz_model(fuzz_codec):
    # Seeds carry the fuzz model's digest; if building the model ever changes (a new torch,
    # a new AnchorCodec init), they would all become "wrong model" files and stop reaching
    # the entropy decoder: regenerate them with fuzz/make_seeds.py.
    valid = [p for p in CORPUS if p.name.startswith("valid-")]
    assert any(p.name.endswith("-video.ulb") for p in valid) and any(not p.name.endswith("-video.ulb") for p in valid)
    for path in valid:
        header = dc.Container.from_bytes(path.read_bytes()).header
        codec = fuzz_codec.for_header(header)
        assert header.model_digest == codec.package.short_digest, f"{path.name}: run fuzz/make_seeds.py"


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_corpus_input_is_clean(path, fuzz_codec):
    outcome = dc.check_input(path.read_bytes(), fuzz_codec, dc.NO_LIMITS, strict=True)  # as the CLI decodes
    if path.name.startswith("valid-") or path.name in (
        "edge-unknown-ancillary-chunk.ulb", "edge-reserved-params.ulb", "edge-y-extra-words.ulb",
        "edge-gops-in-image.ulb", "edge-video-anchored-round.ulb", "edge-video-long-term.ulb",
    ):
        assert outcome.status == "decoded", outcome
    elif path.name.startswith("edge-"):
        assert outcome.status == "rejected", outcome


def _child_check(paths, model: Path, extra=(), timeout=SECONDS_PER_INPUT):
    """Check files in a child process; returns (returncode or None on timeout, JSON lines, stderr)."""
    rc, out, err = _run_child(["--model-dir", model, *extra, *paths], timeout + 20)  # + start-up
    return rc, [json.loads(line) for line in out.splitlines() if line.startswith("{")], err


@pytest.mark.parametrize("path", CRASHES, ids=[p.name for p in CRASHES])
def test_crash_reproducer_is_clean(path, fuzz_model):
    rc, lines, err = _child_check([path], fuzz_model, REPRODUCER_ARGS.get(path.name, ()))
    assert rc is not None, f"{path.name}: no result within {SECONDS_PER_INPUT} s"
    assert rc == 0, f"{path.name}: child exited with {rc}\n{err[-2000:]}"
    assert len(lines) == 1 and lines[0]["status"] in ("decoded", "rejected"), lines
    assert lines[0]["peak_rss_mb"] < CHILD_RSS_MB, lines[0]


def test_rans_overread_reproducers_are_refused_without_any_guard(fuzz_model):
    """The inputs that made CompressAI's rANS decoder read past its strings (and crash)
    are refused cleanly by the plain decoder. The first ones found are now stopped by the
    format's minimum anchor size before any decoding; the "sized" one meets it, reaches
    the rANS decoder (which crashed on it unpadded) and is refused there: the decoder
    pads the strings itself (ulbcodec.entropy.coding.rans_safe)."""
    paths = [p for p in CRASHES if p.name.startswith("rans-overread-")]
    sized = [p for p in paths if "-sized-" in p.name]
    assert sized and len(paths) > len(sized)
    rc, lines, err = _child_check(paths, fuzz_model, timeout=SECONDS_PER_INPUT * len(paths))
    assert rc == 0, err[-2000:]
    assert [line["status"] for line in lines] == ["rejected"] * len(paths), lines
    for line in lines:
        reached_rans = "-sized-" in line["file"]
        assert ("entropy decoding" in line["error"]) == reached_rans, line
        assert ("cannot describe a" in line["error"]) != reached_rans, line


def test_size_bombs_are_refused_before_decoding(fuzz_model):
    """A few bytes of anchor declaring a huge image: refused by the anchor-size rule,
    before entropy decoding, whatever the memory limit (none here)."""
    paths = [p for p in CRASHES if p.name.startswith("size-bomb-") and "valid-stream" not in p.name]
    assert len(paths) >= 2
    rc, lines, err = _child_check(paths, fuzz_model, timeout=SECONDS_PER_INPUT * len(paths))
    assert rc == 0, err[-2000:]
    for line in lines:
        assert line["status"] == "rejected" and "cannot describe a" in line["error"], line
        assert line["peak_rss_mb"] < CHILD_RSS_MB, line


def test_random_mutations_are_clean(fuzz_model, tmp_path):
    """A bounded random fuzz of the seeds (structure-aware mutations, no atheris)."""
    last = tmp_path / "last-input.ulb"
    args = ["--model-dir", fuzz_model, "--max-memory", dc.FUZZ_LIMITS.max_memory,
            "--max-video-pixels", dc.FUZZ_LIMITS.max_video_pixels,
            "--mutate", MUTATIONS, "--seed", 20240611, "--last-input", last]
    rc, out, err = _run_child(args, MUTATION_HANG_GUARD_S)
    assert rc is not None, f"random fuzz did not finish; last input: {last.read_bytes().hex()}"
    assert rc == 0, (f"crash on a mutated input (saved as {last}; copy it to fuzz/crashes/):\n"
                     f"{out[-1000:]}\n{err[-3000:]}")
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["inputs"] == MUTATIONS
    assert summary["outcomes"].get("decoded:decode", 0) > 0, summary  # the mutations do reach the decoder
