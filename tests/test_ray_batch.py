"""Batch coding on Ray Data (``--engine ray``, a local 2-CPU instance, the tiny model) and
input lists (``--from-list``): the same files and records as local ``--jobs``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

VOLATILE = {"seconds", "timings", "output"}  # wall-clock numbers and the output folder differ by design


def ulbc(args, env=None):
    exe = shutil.which("ulbc", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "ulbcodec"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("RAY_ADDRESS", None)  # a private local instance, never a cluster the machine may know
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture()
def photos(tmp_path, photo):
    src = tmp_path / "in"
    src.mkdir()
    for i, (y, x) in enumerate([(0, 0), (100, 60), (200, 300), (40, 400)]):
        Image.fromarray(photo[y:y + 64, x:x + 80]).save(src / f"p{i}.png")
    return src


def _records(stdout: str):
    rows = [json.loads(line) for line in stdout.splitlines()]
    return sorted(({k: v for k, v in r.items() if k not in VOLATILE} for r in rows), key=lambda r: r["input"])


def test_ray_engine_codes_a_batch_like_local_workers(tiny_model, photos, tmp_path):
    pytest.importorskip("ray.data")
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    r_local = ulbc(["encode", photos, "--out-dir", local, "--model", "tiny", "-j", "2", "--json"])
    assert r_local.returncode == 0, r_local.stderr
    r_ray = ulbc(["encode", photos, "--out-dir", on_ray, "--model", "tiny", "-j", "2", "--json", "--engine", "ray"])
    assert r_ray.returncode == 0, r_ray.stderr
    # quiet by default: no Ray banners or progress bars (a warning Ray itself prints about
    # its environment, such as a small /dev/shm, is the machine's, so not asserted away)
    assert "ulbc:" not in r_ray.stderr and "Traceback" not in r_ray.stderr and "Running" not in r_ray.stderr
    assert _records(r_ray.stdout) == _records(r_local.stdout)
    names = sorted(p.name for p in local.iterdir())
    assert names == sorted(p.name for p in on_ray.iterdir()) and len(names) == 4
    for name in names:  # bit-identical streams
        assert (on_ray / name).read_bytes() == (local / name).read_bytes()

    # decode on Ray, with one corrupt file in the batch: it fails alone, the rest decode
    (on_ray / "zz-broken.ulb").write_bytes((on_ray / names[0]).read_bytes()[:40])
    r = ulbc(["decode", on_ray, "--out-dir", tmp_path / "dec-ray", "-j", "2", "--engine", "ray"])
    assert r.returncode == 1 and "zz-broken.ulb" in r.stderr and "Traceback" not in r.stderr
    assert "decoded 4/5 files" in r.stderr
    r = ulbc(["decode", local, "--out-dir", tmp_path / "dec-local", "-j", "2"])
    assert r.returncode == 0, r.stderr
    decoded = sorted(p.name for p in (tmp_path / "dec-ray").iterdir())
    assert decoded == sorted(p.name for p in (tmp_path / "dec-local").iterdir()) and len(decoded) == 4
    for name in decoded:
        assert (tmp_path / "dec-ray" / name).read_bytes() == (tmp_path / "dec-local" / name).read_bytes()


def test_ray_engine_without_ray_is_one_line(tiny_model, photos, tmp_path):
    fake = tmp_path / "no-ray"
    (fake / "ray").mkdir(parents=True)  # shadows an installed ray with one that cannot be imported
    (fake / "ray" / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\", name='ray')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")])}
    r = ulbc(["encode", photos, "--out-dir", tmp_path / "out", "--model", "tiny", "--engine", "ray"], env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "ulbc: error: --engine ray needs Ray Data (ray is not installed): pip install 'ulbc[ray]'"]
    assert not (tmp_path / "out").exists()


def test_from_list_adds_inputs_from_a_file_or_stdin(tiny_model, photos, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{photos / 'p0.png'}\n\n{photos / 'p2.png'}\n")
    r = ulbc(["encode", "--from-list", listing, photos / "p3.png", "--out-dir", tmp_path / "out", "--model", "tiny"])
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p0.ulb", "p2.ulb", "p3.ulb"]
    exe = shutil.which("ulbc", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "ulbcodec"]
    done = subprocess.run(cmd + ["decode", "--from-list", "-", "--out-dir", str(tmp_path / "dec")],
                          input=f"{tmp_path / 'out' / 'p2.ulb'}\n", capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in (tmp_path / "dec").iterdir()] == ["p2.png"]
    r = ulbc(["encode", "--from-list", tmp_path / "missing.txt", "--out-dir", tmp_path / "x", "--model", "tiny"])
    assert r.returncode == 1 and r.stderr.startswith("ulbc: error: ") and "missing.txt" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
