"""Regenerate BENCHMARKS.md: `make bench` (or `python benchmarks/run_all.py`).

Runs, on the held-out photographs fetched by ``ulbcodec.train.data``:
  1. the image rate-distortion benchmark (benchmarks/image_rd.py) of ulbc's default model
     against JPEG / WebP / AVIF and their downscaled variants, on the 768 px validation set;
  2. the speed / memory benchmark (benchmarks/speed.py) on the 4000x3000 photograph and
     on one 768 px photograph, with 2 threads, and the roofline of every decoding stage
     (benchmarks/roofline.py: FLOPs per pixel, GFLOP/s, fraction of the CPU's peak);
  3. when models/generative is installed: generative vs anchor-only decoding vs AVIF/WebP
     (benchmarks/generative.py, 0.005-0.06 bpp) with its crop sheet, the latent-space
     diagnostic of its prediction (benchmarks/latent_gap.py), VMAF's elementary features
     against the best AVIF at matched bpp (benchmarks/vmaf_features.py), its speed, and the
     same with encoder-side latent refinement (generative.py --refine-steps, refine_objectives.py);
  4. the colour statistics chunk (benchmarks/color_stats.py, issue 27): model default at
     levels 0-3 and, when installed, models/generative at levels 0 and 3, each without and
     with the `colr` chunk;
  5. when models/video is installed: the video benchmark (benchmarks/video_rd.py) on the
     validation clips against x264/x265/SVT-AV1/VVenC, with speed and memory;
and writes BENCHMARKS.md with the machine, date, commands and tables. RD plots go to
docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    import torch

    from ulbcodec.placement import cpu_compute_dtype, cpu_flags

    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags()]
    return (f"{cpu}, {os.cpu_count()} cores{mem}, flags {' '.join(simd) or '(none found)'} (diffusion stages in "
            f"{str(cpu_compute_dtype()).replace('torch.', '')}); Python {platform.python_version()}, torch {torch.__version__}")


def capture(script: str, argv) -> str:
    """The standard output of ``python benchmarks/SCRIPT ARGV`` (its stderr passes through)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, argv)], stdout=subprocess.PIPE,
                          text=True, check=True, env=env).stdout


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=os.path.expanduser("~/.cache/ulbc"))
    p.add_argument("--model", default="default")
    p.add_argument("--generative-model", default="generative")
    p.add_argument("--video-model", default="video")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--refine-steps", type=int, default=30, help="the refined-encoding runs of the generative section")
    p.add_argument("--out", default=str(ROOT / "out" / "bench"))
    args = p.parse_args(argv)

    from ulbcodec import packages
    from ulbcodec.train.data import fetch_photos

    photos = fetch_photos(Path(args.data))
    started = datetime.datetime.now(datetime.timezone.utc)
    rd_out = Path(args.out) / "image_rd"
    rd = capture("image_rd.py", ["--images", str(photos / "val-768"), "--out", str(rd_out),
                                 "--ulbc-model", args.model, "--jobs", str(args.jobs)])
    plots = ROOT / "docs" / "benchmarks"
    plots.mkdir(parents=True, exist_ok=True)
    for png in rd_out.glob("rd_*.png"):
        shutil.copyfile(png, plots / png.name)
    speed_12mp = capture("speed.py", [str(next((photos / "val-12mp").glob("*.png"))), "--model", args.model])
    speed_768 = capture("speed.py", [str(photos / "val-768" / "Garden.png"), "--model", args.model])
    roofline_argv = ["--image", str(photos / "val-768" / "coffee.png"), "--model", args.model,
                     "--generative-model", args.generative_model, "--video-model", args.video_model]
    roofline = capture("roofline.py", roofline_argv)
    gen_section = "Not run: no generative model installed."
    try:
        packages.resolve(args.generative_model)
    except packages.ModelError:
        pass
    else:
        garden, twelve = photos / "val-768" / "Garden.png", next((photos / "val-12mp").glob("*.png"))
        gen = capture("generative.py", ["--images", str(photos / "val-768"), "--out", str(Path(args.out) / "generative"),
                                        "--model", args.generative_model, "--jobs", str(args.jobs),
                                        "--baselines-from", str(rd_out / "points.json"),
                                        "--sheet", str(ROOT / "docs" / "generative_crops.png")])
        for png in (Path(args.out) / "generative").glob("rd_*.png"):
            shutil.copyfile(png, plots / f"generative_{png.name}")

        gap = capture("latent_gap.py", ["--images", str(photos / "val-768"), "--model", args.generative_model])

        gen_points = Path(args.out) / "generative" / "points.json"
        feats = capture("vmaf_features.py", ["--images", str(photos / "val-768"), "--model", args.generative_model,
                                             "--points", str(gen_points)])
        m = ["--model", args.generative_model]
        gen_speed = "\n\n".join(capture("speed.py", argv) for argv in (
            [str(garden), *m, "--anchor-only"], [str(garden), *m], [str(twelve), *m, "--repeat", "1"]))

        steps = str(args.refine_steps)
        refined_argv = ["--images", str(photos / "val-768"), "--model", args.generative_model,
                        "--jobs", str(args.jobs), "--refine-steps", steps, "--levels", "0,1,2,3,4",
                        "--baselines-from", str(rd_out / "points.json")]
        refined = capture("generative.py", [*refined_argv, "--out", str(Path(args.out) / "generative-refined")])
        ablation = capture("refine_objectives.py", ["--images", str(photos / "val-768"),
                                                    "--model", args.generative_model, "--steps", steps])
        refined_speed = capture("speed.py", [str(garden), *m, "--refine-steps", steps, "--repeat", "1"])
        gen_section = f"""Command: `python benchmarks/generative.py --images {photos / "val-768"} --model {args.generative_model}`
Plots: docs/benchmarks/generative_rd_*.png; crops: docs/generative_crops.png

{gen}

### The one-step prediction in the latent space

Command: `python benchmarks/latent_gap.py --images {photos / "val-768"} --model {args.generative_model}`

{gap}

### VMAF's features: generative, anchor-only and the best AVIF at matched bpp

Command: `python benchmarks/vmaf_features.py --images {photos / "val-768"} --model {args.generative_model} --points {gen_points}`

{feats}

### Speed and memory of generative decoding (2 threads)

{gen_speed}

### Encoder-side latent refinement (`ulbc encode --refine-steps {steps}`)

The same decoders; the encoder refines each latent ({steps} steps, `ulbcodec/refinement.py`).
Command: `python benchmarks/generative.py {" ".join(refined_argv)} --out OUT`

{refined}

What each refinement objective buys (command: `python benchmarks/refine_objectives.py --images {photos / "val-768"} --model {args.generative_model} --steps {steps}`):

{ablation}

{refined_speed}"""
    color_argv = ["--images", str(photos / "val-768"), "--model", args.model]
    with contextlib.suppress(packages.ModelError):
        packages.resolve(args.generative_model)
        color_argv += ["--generative", "--generative-model", args.generative_model]
    color = capture("color_stats.py", [*color_argv, "--out", str(Path(args.out) / "color_stats" / "points.json")])
    video_section = "Not run: no video model installed."
    try:
        packages.resolve(args.video_model)
    except packages.ModelError:
        pass
    else:
        from ulbcodec.train.video_data import fetch_videos

        clips = fetch_videos(Path(args.data)) / "val"
        video_argv = ["--clips", str(clips), "--model", args.video_model, "--out", str(Path(args.out) / "video"),
                      "--plots", str(plots), "--speed"]
        video = capture("video_rd.py", video_argv)
        video_section = f"""Command: `python benchmarks/video_rd.py {' '.join(video_argv)}`
Plots: docs/benchmarks/video_rd_*.png

{video}"""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    minutes = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60
    text = f"""# Benchmarks

Regenerated by `make bench` (`python benchmarks/run_all.py`), {started:%Y-%m-%d %H:%M} UTC, commit
{commit.strip() or "?"}, {minutes:.0f} minutes.
Machine: {machine()}.

Every rate is the real file size x 8 / pixels; every ulbc number comes from a written
`.ulb` file decoded by the decoder. Metric protocols: `src/ulbcodec/metrics.py`.
Baselines and their exact settings: `src/ulbcodec/baselines.py`.

## Image rate-distortion (held-out photographs, long side 768 px)

Command: `python benchmarks/image_rd.py --images {photos / "val-768"} --out {rd_out}`
Plots: docs/benchmarks/rd_*.png

{rd}

## Speed and memory (2 threads)

Command: `python benchmarks/speed.py IMAGE --model {args.model}`

{speed_12mp}

{speed_768}

## Roofline: FLOPs per pixel and fraction of the CPU's peak, per decoding stage

Command: `python benchmarks/roofline.py {' '.join(roofline_argv)}`

{roofline}

## Generative (next-frame) decoding

{gen_section}

## Colour statistics chunk (`colr`, issue 27)

Each photograph coded without and with the chunk (the original's per-channel mean/std;
the decoder applies NeFIC's published colour fix; src/ulbcodec/color_stats.py).
Command: `python benchmarks/color_stats.py {" ".join(color_argv)}`

{color}

## Video: keyframes + diffusion prediction against x264, x265, SVT-AV1, VVenC

{video_section}
"""
    (ROOT / "BENCHMARKS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
