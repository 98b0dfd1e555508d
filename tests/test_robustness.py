"""A command people can trust in scripts (issue 26): bounded decode work, no lost inputs,
stdin/stdout, model packages checked up front, workers that die with their parent, and
the smaller cases. docs/robustness.md lists each case with its outcome and test."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ulbcodec import bitstream as bs
from ulbcodec.bitstream import Chunk, Container, GopStructure, Header, Round
from ulbcodec.cli import cli
from test_faults import many_images  # noqa: F401 - a fixture: 24 photographs

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "fuzz" / "corpus"


def invoke(args, input=None):
    r = CliRunner().invoke(cli, [str(a) for a in args], input=input)
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r


def _fuzz_check():
    spec = importlib.util.spec_from_file_location("ulbc_fuzz_decode_check", ROOT / "fuzz" / "decode_check.py")
    if spec.name in sys.modules:
        return sys.modules[spec.name]
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def video_file(frames: int, units, k: int = 2, max_gop: int = 4096, pred_frames: int = 3, anchors: int = 2,
               width: int = 16, height: int = 16) -> bytes:
    """A video container (not decodable: the anchors are filler) with the given GOP units."""
    header = Header(bs.MEDIA_VIDEO, width, height, b"\1" * 8, 1, frames, 25, 1,
                    params={"cond_frames": 2, "pred_frames": pred_frames, "steps": 1, "max_gop": max_gop})
    gops = GopStructure([(k, list(units))])
    chunks = [Chunk(bs.CHUNK_GOPS, gops.to_bytes())] + [Chunk(bs.CHUNK_ANCHOR, b"\1" * 40)] * anchors
    return Container(header, chunks).to_bytes()


# ------------------------------------------------------------------ decode-work budget


@pytest.mark.parametrize("name, limited, unlimited", [
    ("edge-video-run-over-max-gop.ulb", "run of 7 predicted frames, the header's max_gop is 2", "same"),
    ("edge-video-max-gop-4097.ulb", "max_gop 4097 outside 0..4096", "same"),
    ("edge-video-round-of-2e20-frames.ulb", "over the --max-pixels limit", "pred_frames 1048576 outside 1..256"),
    ("edge-video-2e20-frames-declared.ulb", "over the --max-pixels limit", "GOP chunk describes 9 frames"),
])
def test_decode_work_is_refused_from_the_header(name, limited, unlimited):
    container = Container.from_bytes((CORPUS / name).read_bytes())
    with pytest.raises(bs.BitstreamError, match=limited):
        bs.check_work(container)
    with pytest.raises(bs.BitstreamError, match=limited if unlimited == "same" else unlimited):
        bs.check_work(container, max_pixels=None)  # the format rules hold without a limit


def test_issue_case_one_round_of_a_million_frames_is_refused_in_one_line(tmp_path):
    # The issue's file: 2^20 frames, one round of 1,048,574 predicted frames; max_gop 64.
    data = video_file(1 << 20, [Round((1 << 20) - 2)], max_gop=64, pred_frames=1 << 20)
    path = tmp_path / "bomb.ulb"
    path.write_bytes(data)
    for extra in ([], ["--max-pixels", "none"]):
        r = invoke(["decode", path, "-o", tmp_path / "out.y4m", *extra])
        assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.stderr
        assert ("--max-pixels limit" if not extra else "pred_frames 1048576 outside 1..256") in r.stderr
    assert not (tmp_path / "out.y4m").exists()
    # P in range, the run over max_gop
    path.write_bytes(video_file(200, [Round(3)] * 66, max_gop=64))
    r = invoke(["decode", path, "-o", tmp_path / "out.y4m"])
    assert r.exit_code == 1 and "run of 198 predicted frames, the header's max_gop is 64" in r.stderr, r.stderr


def test_work_out_of_proportion_to_the_file_size(tmp_path):
    # 4,097 frames (one keyframe group, then max_gop predicted frames): ~1.5 KB of file for
    # 4097 x 65536 pixels of work, within the per-byte rule; the same at 2048x2048 is not.
    small = Container.from_bytes(video_file(4098, [Round(3)] * 1365 + [Round(1)], max_gop=4096))
    assert bs.check_work(small) == 4098 * bs.FRAME_WORK_FLOOR
    big = Container.from_bytes(video_file(4098, [Round(3)] * 1365 + [Round(1)], max_gop=4096, width=2048,
                                          height=2048))
    with pytest.raises(bs.BitstreamError, match="out of proportion to its size"):
        bs.check_work(big, max_pixels=1 << 40)
    assert bs.check_work(big, max_pixels=None)  # `--max-pixels none` lifts the limits
    with pytest.raises(bs.BitstreamError, match="over the --max-pixels limit of 1,000,000"):
        bs.check_work(small, max_pixels=1_000_000)


def test_max_pixels_option_parses_and_refuses(tmp_path):
    path = tmp_path / "v.ulb"
    path.write_bytes(video_file(5, [Round(3)]))
    r = invoke(["decode", path, "-o", tmp_path / "v.y4m", "--max-pixels", "100k"])
    assert r.exit_code == 1 and "decoding 5 frames of 16x16 (327,680 pixels of work) is over the --max-pixels " \
                                "limit of 100,000" in r.stderr, r.stderr
    r = invoke(["decode", path, "-o", tmp_path / "v.y4m", "--max-pixels", "lots"])
    assert r.exit_code == 2 and "not a positive pixel count" in r.stderr


def test_info_prints_long_gop_structures_on_short_lines(tmp_path):
    path = tmp_path / "long.ulb"
    path.write_bytes(video_file(2 + 3 * 400, [Round(3)] * 400))
    r = invoke(["info", path])
    assert r.exit_code == 0, r.stderr
    assert max(map(len, r.stdout.splitlines())) < 400 and "(1202 in all)" in r.stdout
    assert len(json.loads(invoke(["info", path, "--json"]).stdout)["gop"]["frame_types"]) == 1202


def test_fuzz_seeds_cover_the_work_cases():
    dc = _fuzz_check()
    names = {p.name for p in CORPUS.iterdir()}
    assert {"edge-video-run-over-max-gop.ulb", "edge-video-max-gop-4097.ulb", "edge-video-round-of-2e20-frames.ulb",
            "edge-video-2e20-frames-declared.ulb"} <= names
    assert dc.FUZZ_LIMITS.max_pixels == bs.DEFAULT_MAX_PIXELS


# ------------------------------------------------------------------ inputs are never lost; stdin/stdout


@pytest.fixture()
def png(tmp_path, photo) -> Path:
    from PIL import Image

    path = tmp_path / "a.png"
    Image.fromarray(photo[:48, :64]).save(path)
    return path


def test_an_input_is_never_written_over(tiny_model, png, tmp_path):
    before = png.read_bytes()
    r = invoke(["encode", png, "-o", png, "--force", "--model", "tiny"])
    assert r.exit_code == 2 and "is an input" in r.stderr and "even with --force" in r.stderr, r.stderr
    link = tmp_path / "link.ulb"
    import os

    os.link(png, link)  # the same file under another name
    r = invoke(["encode", png, "-o", link, "--force", "--model", "tiny"])
    assert r.exit_code == 2 and "is an input" in r.stderr, r.stderr
    r = invoke(["encode", png, "-o", tmp_path / "y.png", "--model", "tiny"])
    assert r.exit_code == 2 and "encode writes a .ulb file, not .png; name it" in r.stderr, r.stderr
    assert png.read_bytes() == before and not (tmp_path / "y.png").exists()


def test_default_output_name_beside_the_input_never_overwrites(tiny_model, png, tmp_path):
    r = invoke(["encode", png, "--model", "tiny"])
    assert r.exit_code == 0, r.stderr
    ulb = tmp_path / "a.ulb"
    data = ulb.read_bytes()
    r = invoke(["encode", png, "--model", "tiny"])
    assert r.exit_code == 1 and "already exists" in r.stderr and ulb.read_bytes() == data
    before = png.read_bytes()
    r = invoke(["decode", ulb, "--model", "tiny"])  # a.png, the original, exists: kept
    assert r.exit_code == 1 and "already exists" in r.stderr and png.read_bytes() == before
    png.unlink()
    assert invoke(["decode", ulb, "--model", "tiny"]).exit_code == 0 and png.is_file()


def test_dash_is_standard_input_and_output(tiny_model, png, tmp_path):
    r = CliRunner().invoke(cli, ["encode", "-", "-o", "-", "--model", "tiny"], input=png.read_bytes())
    assert r.exit_code == 0, r.stderr
    ulb = r.stdout_bytes
    assert ulb[:3] == b"ULB" and Container.from_bytes(ulb).header.width == 64
    r = CliRunner().invoke(cli, ["decode", "-", "-o", "-", "--model", "tiny"], input=ulb)
    assert r.exit_code == 0, r.stderr
    assert r.stdout_bytes[:8] == b"\x89PNG\r\n\x1a\n"
    r = CliRunner().invoke(cli, ["decode", "-", "-o", str(tmp_path / "x.png"), "--model", "tiny", "--json"], input=ulb)
    assert r.exit_code == 0 and json.loads(r.stdout)["input"] == "-" and (tmp_path / "x.png").is_file()
    r = CliRunner().invoke(cli, ["decode", "-", "-o", "-", "--model", "tiny"], input=b"not a ulb")
    assert r.exit_code == 1 and r.stderr.startswith("ulbc: error: -: not a .ulb file"), r.stderr
    r = CliRunner().invoke(cli, ["encode", "-", "--model", "tiny"], input=png.read_bytes())
    assert r.exit_code == 2 and "standard input needs -o" in r.stderr


def test_a_terminal_is_refused_as_binary_output(tiny_model, png):
    import os
    import pty
    import subprocess

    main_fd, tty = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "ulbcodec", "encode", str(png), "-o", "-", "--model", "tiny"],
                              stdout=tty, stderr=subprocess.PIPE, text=True, env=os.environ)
    finally:
        os.close(tty)
        os.close(main_fd)
    assert proc.returncode == 2 and "refusing to write binary data to a terminal" in proc.stderr, proc.stderr


def test_a_newline_in_a_file_name_keeps_the_error_on_one_line(tiny_model, tmp_path):
    bad = tmp_path / "bad\nname.png"
    bad.write_bytes(b"not an image")
    r = invoke(["encode", bad, "-o", tmp_path / "x.ulb", "--model", "tiny"])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "bad\\nname.png: not a readable image" in r.stderr
    r = invoke(["encode", bad, "-o", tmp_path / "x.ulb", "--model", "tiny", "--json"])
    record = json.loads(r.stdout)
    assert record["input"] == str(bad) and "not a readable image" in record["error"]


# ------------------------------------------------------------------ model packages checked up front


def _edited_package(tiny_model: Path, tmp_path: Path, edit, redigest: bool = True) -> Path:
    """A copy of the tiny package, changed by ``edit(root, manifest)``, its digest recomputed
    (so that only the new checks can refuse it)."""
    import shutil

    from ulbcodec import packages

    root = tmp_path / "pkg"
    shutil.copytree(tiny_model, root)
    manifest = json.loads((root / packages.MANIFEST).read_text())
    edit(root, manifest)
    if redigest:
        manifest["digest"] = packages.compute_digest(manifest["components"], root, manifest.get("next_frame"))
    (root / packages.MANIFEST).write_text(json.dumps(manifest))
    return root


def _config(key, value):
    def edit(root, manifest):
        manifest["components"]["anchor_codec"]["config"][key] = value
    return edit


def _outside_link(root, manifest):
    import shutil

    outside = root.parent / "elsewhere.safetensors"
    shutil.copy(root / "anchor_codec.safetensors", outside)
    (root / "anchor_codec.safetensors").unlink()
    (root / "anchor_codec.safetensors").symlink_to(outside)


def _huge_shape(root, manifest):
    from ulbcodec import packages

    weights = root / "anchor_codec.safetensors"
    header = json.loads(packages.safetensors_header(weights)[8:])
    name = next(k for k in header if k != "__metadata__" and "weight" in k)
    header[name]["shape"] = [1 << 31, 1 << 31]
    data = weights.read_bytes()
    size = int.from_bytes(data[:8], "little")
    text = json.dumps(header).encode()
    weights.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size:])


@pytest.mark.parametrize("edit, message", [
    (_config("N", -48), "config N = -48 outside 0..65536"),
    (_config("N", 1 << 31), "config N = 2147483648 outside 0..65536"),
    (_config("N", 40), "has shape"),  # in range, but not the weights' shapes
    (_outside_link, "outside the package"),
    (_huge_shape, "has shape (2147483648, 2147483648)"),
], ids=["N=-48", "N=2^31", "N-mismatch", "symlink-out", "shape-2^31"])
def test_bad_model_packages_are_one_line_before_any_allocation(tiny_model, png, tmp_path, edit, message):
    import resource

    root = _edited_package(tiny_model, tmp_path, edit)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = invoke(["encode", png, "-o", tmp_path / "a.ulb", "--model", root])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("ulbc: error: bad model package: ") and message in r.stderr, r.stderr
    assert "internal error" not in r.stderr
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB: nothing of N=2^31 allocated


def test_a_passed_shape_check_is_remembered_per_file_version(tiny_model, tmp_path, monkeypatch):
    """The meta-device build of check_shapes runs once per package file version and
    machine (it costs a cold start ~0.5 s of imports); a copy, or a rewritten file, is
    checked again."""
    import shutil

    from ulbcodec import packages

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    pkg = packages.ModelPackage.load_manifest(tiny_model)
    marker = pkg._shape_check_marker("anchor_codec")
    assert marker is not None and not marker.exists()
    pkg.check_shapes("anchor_codec")
    assert marker.exists()
    monkeypatch.setattr(packages, "_component_class", lambda name: pytest.fail("checked again"))
    pkg.check_shapes("anchor_codec")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    assert packages.ModelPackage.load_manifest(copy)._shape_check_marker("anchor_codec") != marker


def test_an_edited_manifest_is_a_bad_package(tiny_model, png, tmp_path):
    root = _edited_package(tiny_model, tmp_path, lambda root, m: m.update(rate_levels=[{"levl": 0}]), redigest=False)
    r = invoke(["encode", png, "-o", tmp_path / "a.ulb", "--model", root])
    assert r.exit_code == 1 and r.stderr.startswith("ulbc: error: bad model package: "), r.stderr
    root2 = _edited_package(tiny_model, tmp_path / "b", _config("num_slices", 1), redigest=False)
    r = invoke(["encode", png, "-o", tmp_path / "a.ulb", "--model", root2])
    assert r.exit_code == 1 and "bad model package: " in r.stderr and "recorded digest" in r.stderr, r.stderr


def test_models_check_marks_broken_packages(tiny_model, tmp_path, monkeypatch):
    (tmp_path / "b").mkdir()
    _edited_package(tiny_model, tmp_path / "b", _config("N", 40))
    monkeypatch.setenv("ULBC_MODEL_PATH", f"{tmp_path / 'b'}:{tiny_model.parent}")
    r = invoke(["models", "--check"])
    assert r.exit_code == 1, r.output
    pkg_line = next(line for line in r.stdout.splitlines() if line.startswith("pkg ") and "BROKEN" in line)
    assert "bad model package: " in pkg_line and "has shape" in pkg_line
    assert any(line.startswith("tiny ") and "digest" in line for line in r.stdout.splitlines())


# ------------------------------------------------------------------ workers die with their parent


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_workers_die_when_the_main_process_is_killed(tiny_model, tmp_path, many_images):
    """SIGKILL of the main process of a --jobs 2 batch (it cannot stop its workers): the
    workers get SIGTERM from the kernel (PR_SET_PDEATHSIG), unwind and exit. Bounded by
    events; the time limits are hang guards only."""
    import os
    import signal

    from test_faults import _batch_at_first_output, _group_alive, _wait_group_gone

    out = tmp_path / "out"
    p = _batch_at_first_output(many_images, out, 2, 600)
    try:
        assert p.poll() is None, "the batch finished before it could be killed"
        workers = [pid for pid in _group_alive(p.pid) if pid != p.pid]
        assert workers
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        assert _wait_group_gone(p.pid, 600) == []
    finally:
        if _group_alive(p.pid):
            os.killpg(p.pid, signal.SIGKILL)
    assert not [f for f in out.iterdir() if f.name.endswith(".part")]
    assert len(list(out.glob("*.ulb"))) < 24


# ------------------------------------------------------------------ smaller cases


def test_bpp_nan_is_a_usage_error(tiny_model, png, tmp_path):
    for value in ("nan", "inf"):
        r = invoke(["encode", png, "-o", tmp_path / "a.ulb", "--model", "tiny", "--bpp", value])
        assert r.exit_code == 2 and "not a finite number" in r.stderr, r.stderr


def test_grey_and_16_bit_inputs_are_warned(tiny_model, photo, tmp_path):
    import numpy as np
    from PIL import Image

    from ulbcodec.io import read_image

    grey = tmp_path / "grey.png"
    Image.fromarray(photo[:16, :16, 0]).save(grey)
    assert any("greyscale" in n for n in read_image(grey)[1])
    deep = tmp_path / "deep.png"
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pixels = (photo[:16, :16].astype(">u2") * 257).reshape(16, -1)  # 16-bit RGB: Pillow cannot write one
    rows = b"".join(b"\0" + row.tobytes() for row in pixels)
    deep.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    assert any("16-bit" in n for n in read_image(deep)[1])


def test_one_pixel_image_is_replicate_padded(tiny_codec):
    """Issue 26: the 1x1 input (200,30,40) decodes far from its colour ((132,50,52) with
    models/default at level 3). Not a padding bug: the encoder replicate-pads it to the
    64x64 flat image, whose coded strings and decoded top-left pixel are the 1x1 file's;
    the colour error is the synthesis transform's corner (docs/robustness.md). The colour
    statistics chunk, on by default, carries the pixel's colour and fixes it."""
    import numpy as np

    colour = np.array([200, 30, 40], np.uint8)
    one = tiny_codec.encode(colour.reshape(1, 1, 3), tiny_codec.default_level, 1, color_stats=False)
    flat = tiny_codec.encode(np.broadcast_to(colour, (64, 64, 3)).copy(), tiny_codec.default_level, 1,
                             color_stats=False)
    strings = [[c.payload for c in Container.from_bytes(r.data).chunks] for r in (one, flat)]
    assert strings[0] == strings[1]
    assert np.array_equal(tiny_codec.decode(one.data)[0, 0], tiny_codec.decode(flat.data)[0, 0])
    fixed = tiny_codec.decode(tiny_codec.encode(colour.reshape(1, 1, 3), tiny_codec.default_level, 1).data)
    assert np.abs(fixed[0, 0].astype(int) - colour).max() <= 1


def test_image_relabelled_to_4096_is_refused_after_its_z_string(tmp_path):
    """Issue 26: a 5.3 KB file of the shipped model relabelled 4096x4096 (3,140 coded
    pixels per byte: it passes the anchor-size floor and the default work limits) is
    refused in one line once its z string, decoded for the larger grid, fails to re-encode
    to itself: before the y decode that cost 46 s and 2.1 GB at that size."""
    import dataclasses

    from ulbcodec.bitstream import AnchorPayload

    photo = Path(__file__).resolve().parents[1] / "src" / "ulbcodec" / "data" / "coffee.png"
    coded = tmp_path / "coffee.ulb"
    assert invoke(["encode", photo, "-o", coded, "--quality", "5"]).exit_code == 0
    container = Container.from_bytes(coded.read_bytes())
    payload = AnchorPayload.from_bytes(container.chunks[0].payload)
    payload.z_shape = (64, 64)
    relabelled = dataclasses.replace(container.header, width=4096, height=4096)
    path = tmp_path / "relabelled.ulb"
    path.write_bytes(Container(relabelled, [Chunk(bs.CHUNK_ANCHOR, payload.to_bytes())]).to_bytes())
    assert bs.check_work(Container.from_bytes(path.read_bytes())) == 4096 * 4096  # the limits let it through
    r = invoke(["decode", path, "-o", tmp_path / "out.png"])
    assert r.exit_code == 1 and not (tmp_path / "out.png").exists()
    assert "(a corrupted file, or one relabelled to another size)" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_small_image_relabelled_4096_is_refused_by_max_pixels(tmp_path):
    """Issue 26: a 5.5 KB image file relabelled 4096x4096 (3,050 coded pixels per byte)
    passes the anchor-size floor (4,096 per byte) and the default work limits; no cheaper
    rule is safe for valid files yet (docs/robustness.md), so --max-pixels is what refuses
    it up front, in one line and before any decoding."""
    header = Header(bs.MEDIA_IMAGE, 4096, 4096, b"\1" * 8, 1, 1, 0, 1, params={"downscale": 1})
    path = tmp_path / "relabelled.ulb"
    path.write_bytes(Container(header, [Chunk(bs.CHUNK_ANCHOR, b"\1" * 5500)]).to_bytes())
    container = Container.from_bytes(path.read_bytes())
    assert bs.check_work(container) == 4096 * 4096  # the default limits let it through
    r = invoke(["decode", path, "-o", tmp_path / "out.png", "--max-pixels", "4M"])
    assert r.exit_code == 1 and not (tmp_path / "out.png").exists()
    assert "decoding 4096x4096" in r.stderr and "over the --max-pixels limit of 4,000,000" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
