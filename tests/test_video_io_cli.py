"""Videos through the command line and the streaming video I/O, with a tiny random video model."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest

from ulbcodec import io
from ulbcodec.bitstream import PFRAME_LETTERS
from ulbcodec.video import VideoCodec, VideoSettings

from conftest import make_tiny_video_package
from test_cli import _invoke, ulbc
from test_video_codec import clip


@pytest.fixture(scope="module")
def video_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("video-models")
    make_tiny_video_package(root)
    return root


@pytest.fixture()
def env(video_models, monkeypatch):
    monkeypatch.setenv("ULBC_MODEL_PATH", str(video_models))
    return video_models


def write_clip(path, frames, fps=Fraction(25)):
    io.write_video(path, iter(frames), fps, lossless=True)
    return path


# ------------------------------------------------------------------ video I/O


@pytest.mark.parametrize("ext,lossless", [("mkv", True), ("mp4", True), ("mp4", False), ("y4m", False)])
def test_video_round_trip_keeps_size_rate_and_count(tmp_path, ext, lossless):
    frames = clip(7, 37, 51)  # odd sides: 4:2:0 is not possible, the size must still be kept
    path = tmp_path / f"a.{ext}"
    assert io.write_video(path, iter(frames), Fraction(30000, 1001), lossless=lossless) == 7
    reader = io.VideoReader(path)
    got = list(reader)
    assert reader.size == (51, 37) and reader.fps == Fraction(30000, 1001) and len(got) == 7
    err = max(np.abs(a.astype(int) - b).max() for a, b in zip(frames, got))
    assert err == 0 if lossless else err < 40


def test_frame_folder_round_trip(tmp_path):
    frames = clip(4)
    assert io.write_video(tmp_path / "frames", iter(frames), Fraction(25)) == 4
    assert sorted(p.name for p in (tmp_path / "frames").iterdir())[0] == "frame-000001.png"
    assert all(np.array_equal(a, b) for a, b in zip(frames, io.VideoReader(tmp_path / "frames")))


def test_failed_writes_leave_nothing(tmp_path):
    def broken():
        yield clip(1)[0]
        raise ValueError("boom")

    for name in ("a.mp4", "frames"):
        with pytest.raises(ValueError, match="boom"):
            io.write_video(tmp_path / name, broken(), Fraction(25))
    assert list(tmp_path.iterdir()) == []


def test_truncated_video_is_an_input_error(tmp_path):
    data = write_clip(tmp_path / "a.mkv", clip(20)).read_bytes()
    (tmp_path / "cut.mkv").write_bytes(data[: len(data) // 2])
    with pytest.raises(io.InputError, match="truncated"):
        list(io.VideoReader(tmp_path / "cut.mkv"))
    (tmp_path / "junk.mp4").write_bytes(b"\0" * 1000)
    with pytest.raises(io.InputError, match="not a readable video"):
        io.VideoReader(tmp_path / "junk.mp4")


# ------------------------------------------------------------------ command line


def test_encode_decode_info_video(env, tmp_path):
    frames = clip(9)
    src = write_clip(tmp_path / "clip.mkv", frames)
    ulb = tmp_path / "clip.ulb"
    r = _invoke(["encode", src, "-o", ulb, "--model", "tinyvideo", "--threshold", "10", "--seed", "3", "--json"])
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["frames"] == 9 and record["bytes"] == ulb.stat().st_size
    assert record["bpp"] == pytest.approx(ulb.stat().st_size * 8 / (72 * 48 * 9), abs=1e-6)

    # The decoder's frames are the encoder's reconstruction, bit for bit (lossless output).
    codec = VideoCodec.from_pretrained(str(env / "tinyvideo"))
    seen = []
    data, gops = codec.encode(iter(frames), Fraction(25), VideoSettings(threshold=10.0, seed=3),
                              reconstruction=seen.append)
    assert data == ulb.read_bytes()
    assert _invoke(["decode", ulb, "-o", tmp_path / "out.mkv", "--lossless"]).returncode == 0
    decoded = list(io.VideoReader(tmp_path / "out.mkv"))
    assert len(decoded) == 9 and all(np.array_equal(a, b) for a, b in zip(seen, decoded))
    assert _invoke(["decode", ulb, "-o", tmp_path / "frames"]).returncode == 0
    assert len(list((tmp_path / "frames").iterdir())) == 9

    info = json.loads(_invoke(["info", ulb, "--json"]).stdout)
    assert info["gop"]["frame_types"] == gops.frame_types() and info["gop"]["keyframes"] == [0, 1]
    text = _invoke(["info", ulb]).stdout
    assert "frame types" in text and gops.frame_types() in text


def test_threshold_zero_codes_keyframes_only(env, tmp_path):
    src = write_clip(tmp_path / "c.mkv", clip(5))
    r = _invoke(["encode", src, "-o", tmp_path / "c.ulb", "--model", "tinyvideo", "--threshold", "0", "--json"])
    assert json.loads(r.stdout)["frame_types"] == "KKKKK"


def test_frame_folder_in_and_batch_of_images_and_videos(env, tmp_path):
    io.write_video(tmp_path / "frames", iter(clip(4)), Fraction(25))
    r = _invoke(["encode", tmp_path / "frames", "-o", tmp_path / "f.ulb", "--model", "tinyvideo", "--json"])
    assert r.returncode == 0 and json.loads(r.stdout)["frames"] == 4

    batch = tmp_path / "batch"
    batch.mkdir()
    write_clip(batch / "v.mkv", clip(5))
    from PIL import Image

    Image.fromarray(clip(1, 64, 64)[0]).save(batch / "i.png")
    (batch / "bad.mp4").write_bytes(b"not a video")
    r = _invoke(["encode", batch, "--out-dir", tmp_path / "coded", "--model", "tinyvideo", "--threshold", "10"])
    assert r.returncode == 1 and "bad.mp4" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in (tmp_path / "coded").iterdir()) == ["i.ulb", "v.ulb"]
    r = _invoke(["decode", tmp_path / "coded", "--out-dir", tmp_path / "dec", "--video-format", "y4m"])
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == ["i.png", "v.y4m"]
    assert len(list(io.VideoReader(tmp_path / "dec" / "v.y4m"))) == 5


def test_bad_video_inputs_and_outputs(env, tmp_path):
    data = write_clip(tmp_path / "a.mkv", clip(20)).read_bytes()
    (tmp_path / "cut.mkv").write_bytes(data[: len(data) // 2])
    r = ulbc(["encode", tmp_path / "cut.mkv", "-o", tmp_path / "cut.ulb", "--model", "tinyvideo"])
    assert r.returncode == 1 and not (tmp_path / "cut.ulb").exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "truncated video" in lines[0], r.stderr

    ulb = tmp_path / "a.ulb"
    assert _invoke(["encode", tmp_path / "a.mkv", "-o", ulb, "--model", "tinyvideo", "--threshold", "10"]).returncode == 0
    r = _invoke(["decode", ulb, "-o", tmp_path / "a.png"])  # a video to an image name
    assert r.returncode == 1 and "is a video" in r.stderr and not (tmp_path / "a.png").exists()
    corrupt = bytearray(ulb.read_bytes())
    corrupt[60] ^= 0x40
    (tmp_path / "bad.ulb").write_bytes(bytes(corrupt))
    r = ulbc(["decode", tmp_path / "bad.ulb", "-o", tmp_path / "bad.mp4"])
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "bad.mp4").exists()
    assert _invoke(["encode", tmp_path / "a.mkv", "-o", ulb, "--model", "tinyvideo",
                    "--metric", "lpips"]).returncode == 2  # no LPIPS weights here: said plainly


def test_video_bpp_target(env, tmp_path):
    src = write_clip(tmp_path / "a.mkv", clip(10))
    sizes = {}
    for level in (0, 2):
        out = tmp_path / f"q{level}.ulb"
        _invoke(["encode", src, "-o", out, "--model", "tinyvideo", "--quality", str(level), "--threshold", "0"])
        sizes[level] = out.stat().st_size * 8 / (72 * 48 * 10)
    target = (sizes[0] + sizes[2]) / 2
    r = _invoke(["encode", src, "-o", tmp_path / "t.ulb", "--model", "tinyvideo", "--bpp", str(target),
                 "--threshold", "0", "--json"])
    record = json.loads(r.stdout)
    assert r.returncode == 0 and record["bpp"] <= target and record["notes"] == []


def test_encoder_streams_the_clip(env):
    """A 300-frame clip: the encoder pulls at most K + P frames ahead of what it has coded,
    so its memory does not grow with the clip (the peak RSS figures are in BENCHMARKS.md)."""
    codec = VideoCodec.from_pretrained(str(env / "tinyvideo"))
    frames, pulled, emitted, ahead = clip(300, 32, 32), [0], [0], []

    def source():
        for f in frames:
            pulled[0] += 1
            ahead.append(pulled[0] - emitted[0])
            yield f

    def emit(_):
        emitted[0] += 1

    codec.encode(source(), Fraction(25), VideoSettings(threshold=10.0, max_gop=8), reconstruction=emit)
    assert emitted[0] == 300 and max(ahead) <= codec.cond_frames + codec.pred_frames


def test_anchored_flag_is_recorded(env, tmp_path):
    src = write_clip(tmp_path / "a.mkv", clip(6))
    r = _invoke(["encode", src, "-o", tmp_path / "a.ulb", "--model", "tinyvideo", "--anchored", "--anchor-level", "1",
                 "--guide-timestep", "400", "--json"])
    assert r.returncode == 0, r.stderr
    info = json.loads(_invoke(["info", tmp_path / "a.ulb", "--json"]).stdout)
    assert info["params"]["anchor_level"] == 1 and info["params"]["guide_timestep"] == 400
    assert _invoke(["decode", tmp_path / "a.ulb", "-o", tmp_path / "a.y4m"]).returncode == 0
    r = _invoke(["encode", src, "-o", tmp_path / "b.ulb", "--model", "tinyvideo", "--anchored", "--anchor-level", "9"])
    assert r.returncode == 2 and "--anchor-level" in r.stderr


def test_still_gif_is_an_image_animated_gif_a_video(tmp_path):
    from PIL import Image

    frames = [Image.fromarray(f) for f in clip(3, 32, 32)]
    frames[0].save(tmp_path / "still.gif")
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:], duration=40)
    assert not io.is_video_path(tmp_path / "still.gif") and io.is_video_path(tmp_path / "moving.gif")
    reader = io.VideoReader(tmp_path / "moving.gif")
    assert reader.size == (32, 32) and len(list(reader)) == 3


def test_p_frames_through_the_command_line(tmp_path, monkeypatch):
    """A package with a P-frame codec: `encode -v` prints one line per frame (type, bytes,
    bpp, the distance that decided it), `info` each frame's type and bytes."""
    make_tiny_video_package(tmp_path / "models", name="tinypvideo", pframe=True)
    monkeypatch.setenv("ULBC_MODEL_PATH", str(tmp_path / "models"))
    src = write_clip(tmp_path / "p.mkv", clip(5))
    ulb = tmp_path / "p.ulb"
    r = _invoke(["encode", src, "-o", ulb, "--model", "tinypvideo", "--threshold", "0", "-v"])
    assert r.returncode == 0, r.stderr
    frame_lines = [line for line in r.stderr.splitlines() if line.lstrip().startswith("frame ")]
    assert len(frame_lines) == 5 and " K " in frame_lines[0] and all("bpp" in line for line in frame_lines)
    info = json.loads(_invoke(["info", ulb, "--json"]).stdout)
    # random tiny models: some P frames may lose to a keyframe (a "cut"); their λ of 0 makes
    # repeats (s, zero bytes) the cheapest inter frames
    types = info["gop"]["frame_types"]
    assert types[0] == "K" and set(types) <= {"K", "P", "F", "s"} and len(info["gop"]["frame_bytes"]) == 5
    assert all((b > 0) == t.isupper() for b, t in zip(info["gop"]["frame_bytes"], types))
    assert info["gop"]["pframes"] == [i for i, t in enumerate(types) if t in PFRAME_LETTERS]
    assert [line.split()[2] for line in frame_lines] == list(types)
    r = _invoke(["encode", src, "-o", tmp_path / "q.ulb", "--model", "tinypvideo", "--no-predictor", "--json"])
    assert set(json.loads(r.stdout)["frame_types"]) <= {"K", "P", "s"}
    assert _invoke(["decode", tmp_path / "q.ulb", "-o", tmp_path / "q.mkv"]).returncode == 0


def test_decode_into_an_existing_frame_folder(env, tmp_path):
    """Issue 26: without --force an existing frame folder is refused in one line; with
    --force a folder of frames is replaced once the new one is complete (built beside it,
    then swapped); a folder holding anything but frames is refused even with --force."""
    src = write_clip(tmp_path / "clip.mkv", clip(5))
    ulb = tmp_path / "clip.ulb"
    assert _invoke(["encode", src, "-o", ulb, "--model", "tinyvideo", "--threshold", "10"]).returncode == 0
    out = tmp_path / "frames"
    assert _invoke(["decode", ulb, "-o", out]).returncode == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(first) == 5

    r = _invoke(["decode", ulb, "-o", out])
    assert r.returncode == 1 and "already exists (use --force to overwrite)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    (out / "frame-000099.png").write_bytes(b"stale frame")  # a frame of an earlier, longer decode
    r = _invoke(["decode", ulb, "-o", out, "--force"])
    assert r.returncode == 0, r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mkv", "clip.ulb", "frames"]  # no temporary left

    (out / "notes.txt").write_text("mine")
    r = _invoke(["decode", ulb, "-o", out, "--force"])
    assert r.returncode == 1 and "not decoded frames (first: 'notes.txt'); refusing to replace it" in r.stderr
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mkv", "clip.ulb", "frames"]

    r = _invoke(["encode", src, "-o", out, "--model", "tinyvideo"])
    assert r.returncode == 2 and "is a folder; encode writes a .ulb file" in r.stderr
