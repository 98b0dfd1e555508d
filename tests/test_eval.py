"""`ulbc eval`: outputs, resuming, unavailable metrics, codec subsets and bad inputs, with
the tiny random models and tiny inputs (two 64x48 images, one 8-frame 64x64 video)."""

from __future__ import annotations

import csv
import json
from fractions import Fraction

import pytest
from PIL import Image

from ulbcodec import io
from ulbcodec.eval.scoring import metric_problem

from conftest import make_tiny_package, make_tiny_video_package
from test_cli import _invoke
from test_video_codec import clip

# ulbc plus one image and one video baseline; lpips and fid to see "unavailable" handled.
CODECS = "ulbc,jpeg,x264"
METRICS = "psnr,lpips,fid"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-models")
    make_tiny_package(root)
    make_tiny_video_package(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ULBC_MODEL_PATH", str(root))
        yield root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-inputs")
    Image.fromarray(clip(1, 48, 64)[0]).save(folder / "a.png")
    Image.fromarray(clip(3, 48, 64)[2][:, ::-1].copy()).save(folder / "b.png")
    io.write_video(folder / "v.mkv", iter(clip(8, 64, 64)), Fraction(25), lossless=True)
    (folder / "broken.png").write_bytes(b"not a png at all")
    return folder


def eval_args(inputs, out, *extra):
    return ["eval", inputs, "--out", out, "--model", "tiny", "--video-model", "tinyvideo", "--levels", "0,1",
            "--thresholds", "0.3", "--frames", "6", *extra]


@pytest.fixture(scope="module")
def first_run(models, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-out") / "results"
    r = _invoke(eval_args(inputs, out, "--codecs", CODECS, "--metrics", METRICS))
    return out, r


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_outputs_exist_and_rates_are_real_bytes(first_run):
    out, r = first_run
    for name in ("points.csv", "points.json", "aggregate.csv", "aggregate.json", "bd_rates.csv", "summary.md",
                 "rd_image_psnr.png", "rd_video_psnr.png", "crops_image.png", "crops_video.png"):
        assert (out / name).is_file(), name
    assert r.stdout.startswith("# ulbc eval") and (out / "summary.md").read_text() in r.stdout
    rows = json.loads((out / "points.json").read_text())["points"]
    assert {(row["kind"], row["codec"]) for row in rows} == {("image", "ulbc"), ("image", "jpeg"),
                                                             ("video", "ulbc"), ("video", "x264")}
    for row in rows:
        assert row["bpp"] == row["bytes"] * 8 / (row["width"] * row["height"] * row["frames"])
        if row["codec"] == "ulbc":  # the .ulb kept for each ulbc point is exactly what was charged
            assert (out / "streams" / row["stream"]).stat().st_size == row["bytes"]
    video = [row for row in rows if row["kind"] == "video"]
    assert {(row["width"], row["height"], row["frames"]) for row in video} == {(64, 64, 6)}  # --frames 6
    ulbc_images = [row for row in rows if row["kind"] == "image" and row["codec"] == "ulbc"]
    # 2 images x 5 settings x downscale 1, 2, 4: the tiny codec's rate is continuous, so the
    # half levels 0.5 and 1.5 run between its 3 levels
    assert len(ulbc_images) == 2 * 5 * 3
    assert sorted({row["setting"] for row in ulbc_images}) == [0, 0.5, 1, 1.5, 2]
    assert len([row for row in video if row["codec"] == "ulbc"]) == 2  # levels 0, 1 x threshold 0.3
    csv_rows = read_csv(out / "points.csv")
    assert len(csv_rows) == len(rows) and float(csv_rows[0]["psnr"]) == rows[0]["psnr"]
    aggregate = json.loads((out / "aggregate.json").read_text())
    assert set(aggregate["kinds"]) == {"image", "video"}
    for kind, anchor in (("image", "best-jpeg"), ("video", "best-x264")):
        cells = {c["metric"]: c for c in aggregate["kinds"][kind]["bd_rates"] if c["anchor"] == anchor}
        psnr = cells["psnr"]  # a number, or n/a with the reason: never both, never neither
        assert (psnr["bd_rate_percent"] is None) == (psnr["reason"] is not None)


def test_unavailable_metrics_are_reported_not_dropped(first_run):
    out, r = first_run
    head = json.loads((out / "points.json").read_text())
    fid = head["metrics"]["image"]["fid"]
    assert fid["status"] == "unavailable" and "Inception" in fid["reason"]
    assert "metric fid unavailable" in r.stderr
    lpips_problem = metric_problem("lpips")
    if lpips_problem:  # no lpips weights here: an empty column and the reason, never a made-up number
        assert head["metrics"]["video"]["lpips"] == {"status": "unavailable", "reason": lpips_problem}
        assert all(row["lpips"] is None for row in head["points"])
        assert all(row["lpips"] == "" for row in read_csv(out / "points.csv"))
    bd = read_csv(out / "bd_rates.csv")
    assert {row["reason"] for row in bd if row["metric"] == "fid"} == {f"metric unavailable: {fid['reason']}"}
    assert "Unavailable: fid" in (out / "summary.md").read_text()


def test_bad_file_in_a_folder_fails_alone(first_run):
    out, r = first_run
    assert r.returncode == 1
    assert "broken.png: not a readable image" in r.stderr and "Traceback" not in r.stderr
    head = json.loads((out / "points.json").read_text())
    assert [f["item"] for f in head["failures"]] == ["broken.png"]
    assert {row["item"] for row in head["points"]} == {"a.png", "b.png", "v.mkv"}
    assert "## Failures" in (out / "summary.md").read_text()


def test_rerun_skips_finished_tasks(first_run, inputs):
    out, _ = first_run
    stored = {p: p.stat().st_mtime_ns for p in (out / "items").iterdir()}
    assert len(stored) == 6  # (a, b) x (ulbc, jpeg) + v x (ulbc, x264)
    r = _invoke(eval_args(inputs, out, "--codecs", CODECS, "--metrics", METRICS))
    assert "eval: 0 tasks computed, 6 reused" in r.stderr
    assert {p: p.stat().st_mtime_ns for p in (out / "items").iterdir()} == stored


def test_codec_subset_force_and_jobs(models, inputs, tmp_path):
    out = tmp_path / "jpeg"
    args = eval_args(inputs, out, "--codecs", "jpeg", "--metrics", "psnr,psnr_y", "--quality-step", "4")
    serial = _invoke(args)
    assert "eval: 2 tasks computed" in serial.stderr and "none of --codecs applies to videos" in serial.stderr
    rows = json.loads((out / "points.json").read_text())["points"]
    assert {row["codec"] for row in rows} == {"jpeg"} and {row["item"] for row in rows} == {"a.png", "b.png"}
    parallel = _invoke([*args, "--force", "--jobs", "2"])
    assert "eval: 2 tasks computed, 0 reused" in parallel.stderr
    again = json.loads((out / "points.json").read_text())["points"]
    key = lambda row: (row["item"], row["curve"], row["setting"])  # noqa: E731
    assert sorted((key(r), r["bytes"], r["psnr"]) for r in again) == sorted((key(r), r["bytes"], r["psnr"])
                                                                             for r in rows)


@pytest.mark.parametrize("extra,message", [
    (["--codecs", "jpeg2000"], "unknown codec 'jpeg2000'"),
    (["--codecs", "jpeg", "--metrics", "psnr,butteraugli3"], "unknown metric 'butteraugli3'"),
])
def test_bad_names_are_usage_errors(models, inputs, tmp_path, extra, message):
    r = _invoke(eval_args(inputs, tmp_path / "out", *extra))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_one_line(models, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.png").write_bytes(b"junk")
    for path, message in ((tmp_path / "missing", "no such file or folder"),
                          (tmp_path / "empty", "no images or videos"),
                          (tmp_path / "junk.png", "not a readable image")):
        r = _invoke(["eval", path, "--out", tmp_path / "out", "--codecs", "jpeg"])
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("ulbc: error: ") and message in lines[0]
        assert "Traceback" not in r.stderr
