"""The ulbc command line, through click's runner and as the installed command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ulbcodec.batch import shard
from ulbcodec.cli import cli
from ulbcodec.task import Task

from conftest import SAMPLE


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _invoke(args):
    """In-process, through click's test runner (fast: no interpreter start, model cached)."""
    r = CliRunner().invoke(cli, [str(a) for a in args])
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return Result(r.exit_code, r.stdout, r.stderr)


def ulbc(args, cwd=None):
    """The installed console command in a subprocess (exit codes as scripts see them)."""
    exe = shutil.which("ulbc", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "ulbcodec"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=os.environ)


@pytest.fixture()
def images(tmp_path, photo):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(photo[:64, :96]).save(src / "a.png")
    Image.fromarray(photo[100:180, 50:110]).save(src / "sub" / "b.jpg", quality=95)
    Image.fromarray(photo[:40, :40]).convert("L").save(src / "gray.png")
    Image.fromarray(photo[:40, :50]).convert("RGBA").save(src / "alpha.png")
    Image.fromarray((photo[:30, :20, 0].astype(np.uint16) * 257)).save(src / "deep16.png")
    return src


def test_encode_decode_info_single_file(tiny_model, images, tmp_path):
    out = tmp_path / "a.ulb"
    r = ulbc(["encode", images / "a.png", "-o", out, "--model", "tiny", "--quality", "1"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""  # quiet by default
    r = ulbc(["info", out, "--json"])
    desc = json.loads(r.stdout)
    assert desc["width"] == 96 and desc["height"] == 64 and desc["rate_level"] == 1
    assert desc["bytes"] == out.stat().st_size
    assert desc["bpp"] == pytest.approx(out.stat().st_size * 8 / (96 * 64))
    for ext in ("png", "jpg", "webp", "tiff"):
        r = ulbc(["decode", out, "-o", tmp_path / f"a.{ext}", "--model", "tiny"])
        assert r.returncode == 0, r.stderr
        assert Image.open(tmp_path / f"a.{ext}").size == (96, 64)


def test_decode_finds_model_by_digest_hint(tiny_model, images, tmp_path):
    out = tmp_path / "a.ulb"
    assert _invoke(["encode", images / "a.png", "-o", out, "--model", "tiny"]).returncode == 0
    r = _invoke(["decode", out, "-o", tmp_path / "a.png", "--model", str(SAMPLE.parent / "nonexistent")])
    assert r.returncode == 1 and "unknown model" in r.stderr and "Traceback" not in r.stderr


def test_folder_batch_mirrors_and_reports_json(tiny_model, images, tmp_path):
    out = tmp_path / "out"
    r = _invoke(["encode", str(images), "--out-dir", str(out), "-r", "--model", "tiny", "--json"])
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(records) == 5 and all(rec["ok"] for rec in records)
    assert (out / "sub" / "b.ulb").is_file()
    notes = {Path(rec["input"]).name: rec["notes"] for rec in records}
    assert notes["alpha.png"] == ["alpha channel dropped"]
    assert notes["deep16.png"] == ["16-bit samples reduced to 8 bits"]
    dec = tmp_path / "dec"
    r = _invoke(["decode", str(out), "--out-dir", str(dec), "-r", "--model", "tiny", "--format", "png"])
    assert r.returncode == 0, r.stderr
    assert Image.open(dec / "sub" / "b.png").size == (60, 80)


def test_shards_spread_a_folder_over_every_part():
    tasks = [Task(Path(f"/data/photos/img{i:03d}.png"), Path(f"/out/img{i:03d}.ulb")) for i in range(60)]
    parts = [shard(tasks, i, 3) for i in (1, 2, 3)]
    assert sorted(t.src for part in parts for t in part) == sorted(t.src for t in tasks)
    assert all(12 <= len(part) <= 28 for part in parts)  # 20 each, give or take the hash


def test_shards_split_a_batch_into_disjoint_parts_that_cover_it(tiny_model, images, tmp_path):
    out = tmp_path / "out"
    done = []
    for i in (1, 2, 3):
        r = _invoke(["encode", str(images), "--out-dir", str(out), "-r", "--model", "tiny", "--json",
                     "--shard", f"{i}/3"])
        assert r.returncode == 0, r.stderr
        done.append(sorted(Path(json.loads(line)["input"]).name for line in r.stdout.splitlines()))
    names = [n for part in done for n in part]
    assert sorted(names) == ["a.png", "alpha.png", "b.jpg", "deep16.png", "gray.png"]  # each file exactly once
    # each file in the shard its path hashes to (which of them that is depends on where
    # the folder lies: five files can all land in one shard, about once in 81 folders)
    tasks = [Task(path, out / path.name) for path in (next(images.rglob(name)) for name in names)]
    assert done == [sorted(t.src.name for t in shard(tasks, i, 3)) for i in (1, 2, 3)]
    assert len(list(out.rglob("*.ulb"))) == 5
    for bad in ("0/3", "4/3", "2", "a/b"):
        r = _invoke(["encode", str(images), "--out-dir", str(tmp_path / "x"), "--shard", bad])
        assert r.returncode == 2 and "--shard" in r.stderr and "Traceback" not in r.stderr


def test_batch_keeps_going_past_a_corrupt_image(tiny_model, images, tmp_path):
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    r = ulbc(["encode", images, "--out-dir", tmp_path / "out", "--model", "tiny", "--jobs", "2"])
    assert r.returncode == 1
    assert "broken.png" in r.stderr and "Traceback" not in r.stderr
    assert "encoded 4/5 files" in r.stderr
    assert not (tmp_path / "out" / "broken.ulb").exists()
    assert len(list((tmp_path / "out").glob("*.ulb"))) == 4
    assert not list((tmp_path / "out").glob(".*part"))


def test_no_overwrite_without_force(tiny_model, images, tmp_path):
    out = tmp_path / "a.ulb"
    out.write_bytes(b"precious")
    r = _invoke(["encode", images / "a.png", "-o", out, "--model", "tiny"])
    assert r.returncode == 1 and "already exists" in r.stderr
    assert out.read_bytes() == b"precious"
    assert _invoke(["encode", images / "a.png", "-o", out, "--model", "tiny", "-f"]).returncode == 0
    assert out.read_bytes()[:3] == b"ULB"


@pytest.mark.parametrize("mangle, message", [
    (lambda d: d[: len(d) // 2], "truncated"),
    (lambda d: d[:10] + bytes([d[10] ^ 0x40]) + d[11:], "CRC mismatch"),
    (lambda d: b"GIF89a" + d[6:], "wrong magic"),
    (lambda d: d[:3] + bytes([9]) + d[4:], "newer"),
])
def test_bad_files_give_one_line_and_no_output(tiny_model, images, tmp_path, mangle, message):
    good = tmp_path / "a.ulb"
    assert _invoke(["encode", images / "a.png", "-o", good, "--model", "tiny"]).returncode == 0
    bad = tmp_path / "bad.ulb"
    bad.write_bytes(mangle(good.read_bytes()))
    for args in (["decode", bad, "-o", tmp_path / "bad.png", "--model", "tiny"], ["info", bad]):
        r = ulbc(args)
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "bad.png").exists()


def test_wrong_model_refused(tiny_model, images, tmp_path):
    from conftest import make_tiny_package

    make_tiny_package(tmp_path / "m", "other", seed=3)
    out = tmp_path / "a.ulb"
    assert _invoke(["encode", images / "a.png", "-o", out, "--model", str(tmp_path / "m" / "other")]).returncode == 0
    r = _invoke(["decode", out, "-o", tmp_path / "a.png", "--model", "tiny"])
    assert r.returncode == 1 and "encoded with model" in r.stderr
    assert not (tmp_path / "a.png").exists()


def test_usage_errors_exit_2(tiny_model, images, tmp_path):
    assert _invoke(["encode", images, "--model", "tiny"]).returncode == 2  # a folder needs --out-dir
    assert _invoke(["encode", images / "a.png", images / "a.png", "-o", tmp_path / "x.ulb"]).returncode == 2  # -o: one input
    r = _invoke(["encode", images / "a.png", "-o", tmp_path / "x.ulb", "--model", "tiny", "--quality", "9"])
    assert r.returncode == 2 and "rate levels" in r.stderr
    assert _invoke(["encode", images / "a.png", "-o", tmp_path / "x.ulb", "--quality", "1", "--bpp", "0.1"]).returncode == 2
    assert _invoke(["decode", tmp_path / "x.ulb", "-o", tmp_path / "x.gif"]).returncode == 2
    assert _invoke(["frobnicate"]).returncode == 2


def test_missing_input_is_a_clean_failure(tiny_model, tmp_path):
    r = _invoke(["encode", tmp_path / "nope.png", "-o", tmp_path / "x.ulb", "--model", "tiny"])
    assert r.returncode == 1 and "no such file" in r.stderr and "Traceback" not in r.stderr


def test_bpp_target(tiny_model, images, tmp_path):
    r = _invoke(["encode", str(images / "a.png"), "-o", str(tmp_path / "a.ulb"), "--model", "tiny",
                 "--bpp", "100", "--json"])
    rec = json.loads(r.stdout)
    assert rec["ok"] and rec["rate_level"] == 2 and rec["bpp"] <= 100


def test_models_lists_tiny(tiny_model):
    r = _invoke(["models", "--json"])
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    tiny = next(row for row in rows if row["name"] == "tiny")
    assert tiny["rate_levels"] == [0, 1, 2] and len(tiny["digest"]) == 16


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "ulbcodec", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "ulbc" in r.stdout


def test_decode_picks_the_installed_model_named_by_the_file(tiny_model, images, tmp_path, monkeypatch):
    out = tmp_path / "a.ulb"
    assert _invoke(["encode", images / "a.png", "-o", out, "--model", "tiny"]).returncode == 0
    r = _invoke(["decode", out, "-o", tmp_path / "a.png"])  # no --model
    assert r.returncode == 0, r.stderr
    monkeypatch.setenv("ULBC_MODEL_PATH", str(tmp_path / "empty"))
    from ulbcodec.jobs import load_decoders

    load_decoders.cache_clear()
    r = _invoke(["decode", out, "-o", tmp_path / "b.png"])
    assert r.returncode == 1 and "which is not installed" in r.stderr
    assert not (tmp_path / "b.png").exists()
