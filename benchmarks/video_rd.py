"""Video rate-distortion benchmark: ulbc (threshold sweep) against x264, x265, SVT-AV1, VVenC.

    PYTHONPATH=src python benchmarks/video_rd.py --clips DIR --out OUT [--frames 30]

For each validation clip (the first ``--frames`` frames) it codes
  * ulbc with the video model (``ulbcodec.video.VideoCodec``) at every operating point
    of ``--levels`` x ``--thresholds`` (keyframe rate level, perceptual threshold): each
    ``.ulb`` is written, then decoded by the decoder from the file alone, and the decoded
    frames are checked to equal the encoder's reconstruction bit for bit;
  * every baseline of ``ulbcodec.video_baselines`` over its quantiser grid, charged for
    its elementary stream without SEI (container size reported beside it);
and measures bpp (bytes x 8 / (width x height x frames)), PSNR (RGB, mean over frames),
MS-SSIM (RGB, mean over frames; SSIM for clips under 161 px, where MS-SSIM is undefined)
and VMAF (vmaf_v0.6.1 over the sequence, BT.709 yuv420p; ``ulbcodec.metrics``).

BD-rates are computed per clip (PCHIP over log rate, ``ulbcodec.eval.rd.bd_rate``, on each
codec's monotone envelope) and averaged over the clips where the curves overlap, over
the whole range and restricted to <= 0.03 bpp (plus the nearest point above). Also
``--speed``: encode and decode frames per second at 256x256 and the peak RSS of
``ulbc encode``/``decode`` on a 60- and a 300-frame clip (memory must not grow with
length). Outputs in OUT: points.csv / points.json, rd_<metric>.png, summary.md (printed).
Metrics, the bit-exact ulbc round trip, envelopes and per-clip BD-rates are
``ulbcodec.eval``'s, shared with ``ulbc eval``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

from ulbcodec import video_baselines
from ulbcodec.eval.rd import bd_cell, envelope, mean_bd_rate
from ulbcodec.eval.runner import read_clip, ulbc_video_round_trip
from ulbcodec.eval.scoring import label, video_scores

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("psnr", "ms_ssim", "vmaf", "vmaf_neg")
LABELS = {m: label(m, "video") for m in METRICS}
# 176x144 .. 640x360; city-a (dusk city, low light) and cockatoo are real clips the project never trains on
DEFAULT_CLIPS = ("carphone", "digits-1000", "pan-Path-256x256", "bikes", "city-a", "cockatoo")
ULBC, ULBC_ANCHORED, ULBC_NO_PREDICTOR = "ulbc", "ulbc-anchored", "ulbc-no-predictor"


def measure(ref: np.ndarray, dist: np.ndarray) -> dict:
    return video_scores(ref, dist, METRICS, vmaf_threads=2)


def run_ulbc(codec, name: str, frames: np.ndarray, fps: Fraction, levels, thresholds, out: Path,
             anchored: bool = False, predictor: bool = True, pframe_offset: int = 0, **options) -> list[dict]:
    """Rows of ulbc at each level (and threshold, with the predictor); ``options`` are
    further :class:`~ulbcodec.video.VideoSettings` fields, the same for every point."""
    from ulbcodec.video import VideoSettings

    rows = []
    t, h, w = frames.shape[:3]
    curve = ULBC_ANCHORED if anchored else ULBC if predictor else ULBC_NO_PREDICTOR
    for level in levels:
        for threshold in thresholds if predictor else [0.0]:
            settings = VideoSettings(threshold=threshold, rate_level=level, anchored=anchored, predictor=predictor,
                                     pframe_level=max(level - pframe_offset, 0) if pframe_offset else None,
                                     **options)
            path = out / f"{name}-{curve}-q{level}-t{threshold}.ulb"
            _, gops, decoded, encode_s, decode_s = ulbc_video_round_trip(codec, frames, fps, settings, path)
            rows.append({"clip": name, "codec": curve, "setting": f"q{level} t{threshold}",
                         "bpp": path.stat().st_size * 8 / (w * h * t), "bytes": path.stat().st_size,
                         "keyframes": gops.keyframes, "anchored_rounds": gops.anchored_rounds,
                         "pframes": gops.pframes, "predicted": gops.predicted_frames,
                         "residual_pframes": gops.residual_frames, "fused_pframes": gops.fused_frames,
                         "skip_block_pframes": gops.skip_block_frames,
                         "motion_pframes": gops.coded_inter_frames - gops.residual_frames,
                         "frame_types": gops.frame_types(),
                         "encode_fps": t / encode_s, "decode_fps": t / decode_s, **measure(frames, decoded)})
            print(f"  {name} {curve} q{level} t{threshold}: {rows[-1]['bpp']:.4f} bpp, {gops.frame_types()}, "
                  f"VMAF {rows[-1]['vmaf']:.1f}", file=sys.stderr, flush=True)
    return rows


def run_baselines(name: str, frames: np.ndarray, fps: Fraction, codecs, max_bpp: float) -> list[dict]:
    rows = []
    for codec in codecs:
        for q in video_baselines.QUALITIES[codec]:  # lowest rate first; stop once past max_bpp
            result = video_baselines.encode_decode(frames, codec, q, float(fps))
            rows.append({"clip": name, "codec": codec, "setting": f"q{q}", "bpp": result.bpp(frames.shape),
                         "bytes": result.charged_bytes, "container_bytes": result.mp4_bytes,
                         **measure(frames, result.decoded)})
            if rows[-1]["bpp"] > max_bpp:
                break
    return rows


def bd_table(rows: list[dict], codecs, hi: float | None, ours: str = ULBC) -> str:
    """Mean over clips of the per-clip BD-rate of ulbc (curve ``ours``) against each baseline."""
    lines = ["| anchor | " + " | ".join(LABELS[m] for m in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for codec in codecs:
        cells = []
        for m in METRICS:
            bd = mean_bd_rate(rows, ours, codec, m, item_key="clip", hi=hi)
            cells.append(f"{bd.value:+.1f}% ({bd.items_used}/{bd.items} clips)" if bd.value is not None else
                         "n/a (no overlap)")
        lines.append(f"| {codec} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_clip_table(rows: list[dict], codecs, ours: str) -> str:
    """BD-rate of ``ours`` against each baseline on every clip (the targets are per clip),
    and whether the curves overlap over 0.005-0.05 bpp."""
    names = ("ms_ssim", "vmaf", "vmaf_neg")
    lines = ["| clip | baseline | " + " | ".join(LABELS[m] for m in names) + " | ulbc / baseline bpp span |",
             "|---" * (len(names) + 3) + "|"]
    for clip in sorted({r["clip"] for r in rows}):
        mine = [r for r in rows if r["clip"] == clip and r["codec"] == ours]
        if not mine:
            continue
        for codec in codecs:
            theirs = [r for r in rows if r["clip"] == clip and r["codec"] == codec]
            cells = [bd_cell(envelope(theirs, m), envelope(mine, m), m) for m in names]
            span = lambda pts: f"{min(p['bpp'] for p in pts):.4f}-{max(p['bpp'] for p in pts):.4f}" if pts else "-"  # noqa: E731
            lines.append(f"| {clip} | {codec} | " + " | ".join(cells) + f" | {span(mine)} / {span(theirs)} |")
    return "\n".join(lines)


def frame_table(rows: list[dict]) -> str:
    """Where a clip's frames come from: keyframes, P frames (coded with a residual, of which
    fused with their reference, warped along a coded motion field alone, or their reference
    repeated) and accepted predictions."""
    lines = ["| clip | codec | setting | keyframes | P frames (residual [fused] / motion only / repeat) | "
             "predicted (zero bits) | bpp |", "|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r["codec"] in (ULBC, ULBC_NO_PREDICTOR)),
                    key=lambda r: (r["clip"], r["codec"], r["bpp"])):
        split = ""
        if "residual_pframes" in r:  # points files before the split have the total alone
            repeats = r["pframes"] - r["residual_pframes"] - r["motion_pframes"]
            fused = f" [{r['fused_pframes']}]" if "fused_pframes" in r else ""
            split = f" ({r['residual_pframes']}{fused} / {r['motion_pframes']} / {repeats})"
        lines.append(f"| {r['clip']} | {r['codec']} | {r['setting']} | {r['keyframes']} | {r['pframes']}{split} | "
                     f"{r['predicted']} | {r['bpp']:.4f} |")
    return "\n".join(lines)


def predictor_value(rows: list[dict]) -> str:
    """BD-rate of ulbc with the diffusion predictor against ulbc without it (P frames only)."""
    cells = []
    for m in METRICS:
        bd = mean_bd_rate(rows, ULBC, ULBC_NO_PREDICTOR, m, item_key="clip", hi=None)
        cells.append(f"{bd.value:+.1f}% ({bd.items_used}/{bd.items} clips)" if bd.value is not None else "n/a")
    return ("| | " + " | ".join(LABELS[m] for m in METRICS) + " |\n" + "|---" * (len(METRICS) + 1) + "|\n"
            + "| with the predictor vs without | " + " | ".join(cells) + " |")


def anchored_table(rows: list[dict]) -> str:
    """Anchored rounds against plain ulbc at the same settings (same clip, level, threshold):
    how many rounds used an anchor, and what that did to the rate and the quality."""
    plain = {(r["clip"], r["setting"]): r for r in rows if r["codec"] == ULBC}
    lines = ["| clip | setting | anchored rounds | bpp plain / anchored | VMAF plain / anchored | "
             "MS-SSIM plain / anchored |", "|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["codec"] == ULBC_ANCHORED):
        p = plain.get((r["clip"], r["setting"]))
        if p is not None:
            lines.append(f"| {r['clip']} | {r['setting']} | {r['anchored_rounds']} | {p['bpp']:.4f} / {r['bpp']:.4f} | "
                         f"{p['vmaf']:.1f} / {r['vmaf']:.1f} | {p['ms_ssim']:.4f} / {r['ms_ssim']:.4f} |")
    return "\n".join(lines)


def plot(rows: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clips = sorted({r["clip"] for r in rows})
    fig, axes = plt.subplots(1, len(clips), figsize=(4.5 * len(clips), 4), squeeze=False)
    for ax, clip in zip(axes[0], clips):
        for codec in (ULBC, ULBC_NO_PREDICTOR, ULBC_ANCHORED, *video_baselines.CODECS):
            pts = envelope([r for r in rows if r["clip"] == clip and r["codec"] == codec], metric)
            if pts:
                ours = codec.startswith(ULBC)
                ax.plot([p["bpp"] for p in pts], [p[metric] for p in pts], marker="*" if ours else "o",
                        lw=2.2 if ours else 1.2, ms=7 if ours else 3, label=codec, ls="-" if codec == ULBC
                        else "--" if codec == ULBC_ANCHORED else ":", color="black" if ours else None)
        ax.set_xscale("log")
        ax.set_title(clip, fontsize=9)
        ax.set_xlabel("bpp (real bytes; baselines: elementary stream)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(LABELS[metric])
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def predictor_vs_copy(codec, clips: dict) -> str:
    """Does the diffusion predictor beat "nothing moves"? From the originals of frames
    t-1, t (clean history), predict t+1..t+P and compare with repeating frame t, both
    through the same VAE (which alone costs the "VAE" column), at t = 1, 8, 15, ..."""
    import collections

    import torch

    from ulbcodec.image import to_uint8
    from ulbcodec.video import frame_distance

    fp = codec.predictor
    lines = ["| clip | windows | 1 - MS-SSIM: VAE round trip | copy of frame t | prediction | latent MSE: copy | "
             "prediction |", "|---|---|---|---|---|---|---|"]
    for name, frames in clips.items():
        h, w = frames.shape[1:3]
        vae, copy, pred, mse_copy, mse_pred = [], [], [], [], []
        starts = range(codec.cond_frames - 1, len(frames) - codec.pred_frames, 7)
        for t in starts:
            lat = {i: codec._latent(frames[i]) for i in range(t - codec.cond_frames + 1, t + codec.pred_frames + 1)}
            history = collections.deque((frames[i], lat[i]) for i in range(t - codec.cond_frames + 1, t + 1))
            predicted = fp.predict_latents(torch.stack([x for _, x in history]), 0, t + 1, codec.steps)
            copied = to_uint8(fp.decode_frame(lat[t])[None, :, :h, :w])
            vae.append(frame_distance(frames[t], copied))
            for j in range(codec.pred_frames):
                target = frames[t + 1 + j]
                copy.append(frame_distance(target, copied))
                pred.append(frame_distance(target, to_uint8(fp.decode_frame(predicted[j])[None, :, :h, :w])))
                mse_copy.append(float((lat[t] - lat[t + 1 + j]).pow(2).mean()))
                mse_pred.append(float((predicted[j] - lat[t + 1 + j]).pow(2).mean()))
        lines.append(f"| {name} | {len(starts)} | {np.mean(vae):.3f} | {np.mean(copy):.3f} | {np.mean(pred):.3f} | "
                     f"{np.mean(mse_copy):.4f} | {np.mean(mse_pred):.4f} |")
    return "\n".join(lines)


def speed(model: str, clips: Path, out: Path) -> str:
    """fps at 256x256 through the CLI, and peak RSS at 60 vs 300 frames (128x128)."""
    from ulbcodec.io import write_video
    from ulbcodec.train.video_data import load_digits, moving_digits, read_frames

    pan = clips / "pan-Path-256x256.mkv"
    src30 = out / "speed-256.mkv"
    write_video(src30, (f for _, f in zip(range(30), read_frames(pan))), Fraction(25), force=True, lossless=True)
    with tempfile.TemporaryDirectory() as tmp:
        digits = load_digits(Path(tmp))
    lines = ["| clip | frames | step | frames/s (coding) | command wall s | peak RSS MB | file |",
             "|---|---|---|---|---|---|---|"]
    cases = [(src30, "256x256 pan")]
    for n in (60, 300):
        path = out / f"speed-digits-{n}.mkv"
        write_video(path, moving_digits(digits, 1000, frames=n), Fraction(25), force=True, lossless=True)
        cases.append((path, "128x128 digits"))
    for src, label in cases:
        ulb, dec = src.with_suffix(".ulb"), src.with_suffix(".out.mkv")
        for verb, cmd in (("encode", ["encode", src, "-o", ulb, "--model", model, "-f", "--json"]),
                          ("decode", ["decode", ulb, "-o", dec, "-f", "--json"])):
            rec, wall, peak = run_cli(cmd)
            lines.append(f"| {label} | {rec['frames']} | {verb} | {rec['timings']['frames_per_s']:.2f} | {wall:.1f} "
                         f"| {peak:.0f} | {rec['bytes']} B, {rec['bpp']:.4f} bpp |")
    return "\n".join(lines)


def run_cli(cmd) -> tuple[dict, float, float]:
    """One `ulbc` command, 2 threads: its JSON record, wall seconds and peak RSS (MB)."""
    code = ("import resource, subprocess, sys, time; t = time.time(); "
            "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(p.stdout.strip().splitlines()[-1] if p.returncode == 0 else 'FAILED ' + p.stderr); "
            "print(time.time() - t); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    env_cmd = [sys.executable, "-c", code, "env", "OMP_NUM_THREADS=2", sys.executable, "-m", "ulbcodec",
               *map(str, cmd)]
    out = subprocess.run(env_cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()
    if out[0].startswith("FAILED"):
        raise RuntimeError(f"ulbc {' '.join(map(str, cmd))}: {out[0]}")
    return json.loads(out[0]), float(out[1]), int(out[2]) / 1024


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", required=True, type=Path, help="folder of validation clips (make data: videos/val)")
    p.add_argument("--names", nargs="+", default=list(DEFAULT_CLIPS))
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--model", default="video")
    p.add_argument("--levels", type=int, nargs="*", default=[0, 1, 2, 3, 4],
                   help="rate levels of ulbc with the predictor (none: only the P-frames-only curve)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.3])
    p.add_argument("--no-predictor-levels", type=int, nargs="*", default=[0, 1, 2, 3, 4],
                   help="also run ulbc without the diffusion predictor (P frames only) at these levels")
    p.add_argument("--codecs", nargs="*", default=list(video_baselines.CODECS))
    p.add_argument("--baselines-from", type=Path, default=None,
                   help="take the baselines' rows from an earlier run's points.json (same --frames; the baselines "
                        "are deterministic) instead of encoding them again; what it lacks is encoded")
    p.add_argument("--max-bpp", type=float, default=0.1)
    p.add_argument("--out", type=Path, default=ROOT / "out" / "bench" / "video")
    p.add_argument("--plots", type=Path, default=None, help="copy the RD plots here (docs/benchmarks)")
    p.add_argument("--speed", action="store_true")
    p.add_argument("--no-long-term", dest="long_term", action="store_false",
                   help="P frames never reference the last keyframe (the ablation of that reference)")
    p.add_argument("--no-skip-blocks", dest="skip_blocks", action="store_false",
                   help="P frames never leave blocks to their reference (the ablation of skipped blocks)")
    p.add_argument("--pframe-offset", type=int, default=0,
                   help="P frames this many rate levels below the keyframes (ulbc encode --pframe-level)")
    p.add_argument("--perceptual-weight", type=float, default=0.0,
                   help="the encoder's mode decisions also weigh the detail and VIF losses (VideoSettings)")
    p.add_argument("--anchored-levels", type=int, nargs="*", default=[],
                   help="also run ulbc with anchored rounds at these keyframe levels")
    p.add_argument("--anchored-thresholds", type=float, nargs="*", default=[0.5],
                   help="... and these thresholds (the high one: where predictions fail and anchors can help)")
    args = p.parse_args(argv)
    from ulbcodec.video import VideoCodec

    args.out.mkdir(parents=True, exist_ok=True)
    codec = VideoCodec.from_pretrained(args.model)
    rows, shapes, loaded = [], {}, {}
    for name in args.names:
        frames, fps = read_clip(args.clips / f"{name}.mkv", args.frames)
        shapes[name], loaded[name] = frames.shape, frames
        print(f"{name}: {frames.shape[2]}x{frames.shape[1]}, {len(frames)} frames", file=sys.stderr, flush=True)
        options = dict(pframe_offset=args.pframe_offset, long_term=args.long_term,
                       perceptual_weight=args.perceptual_weight, skip_blocks=args.skip_blocks)
        rows += run_ulbc(codec, name, frames, fps, args.levels, args.thresholds, args.out, **options)
        if args.no_predictor_levels:
            rows += run_ulbc(codec, name, frames, fps, args.no_predictor_levels, [], args.out, predictor=False,
                             **options)
        if args.anchored_levels:
            rows += run_ulbc(codec, name, frames, fps, args.anchored_levels, args.anchored_thresholds, args.out,
                             anchored=True, **options)
        reused = []
        if args.baselines_from:
            earlier = json.loads(args.baselines_from.read_text())
            if int(earlier["args"]["frames"]) != args.frames:
                raise SystemExit(f"{args.baselines_from}: measured on {earlier['args']['frames']} frames, not {args.frames}")
            reused = [r for r in earlier["rows"] if r["clip"] == name and r["codec"] in args.codecs]
        done = {r["codec"] for r in reused}
        rows += reused + run_baselines(name, frames, fps, [c for c in args.codecs if c not in done], args.max_bpp)
    keys = sorted({k for r in rows for k in r})
    with open(args.out / "points.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "points.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                      "rows": rows}, indent=1))
    for m in METRICS:
        plot(rows, m, args.out / f"rd_{m}.png")
        if args.plots:
            args.plots.mkdir(parents=True, exist_ok=True)
            (args.plots / f"video_rd_{m}.png").write_bytes((args.out / f"rd_{m}.png").read_bytes())
    clip_lines = "\n".join(f"- {n}: {s[2]}x{s[1]}, {s[0]} frames" for n, s in shapes.items())
    point_lines = ["| clip | codec | setting | bpp | PSNR | MS-SSIM | VMAF | frame types | enc fps | dec fps |",
                   "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["clip"], not r["codec"].startswith(ULBC), r["codec"], r["bpp"])):
        if r["codec"].startswith(ULBC) or r["bpp"] <= 0.1:
            point_lines.append(
                f"| {r['clip']} | {r['codec']} | {r['setting']} | {r['bpp']:.4f} | {r['psnr']:.2f} | "
                f"{r['ms_ssim']:.4f} | {r['vmaf']:.1f} | {r.get('frame_types', '')} | "
                f"{r.get('encode_fps', 0):.2f} | {r.get('decode_fps', 0):.2f} |".replace("| 0.00 | 0.00 |", "| | |"))
    text = f"""Clips (first {args.frames} frames of each, from `{args.clips}`):
{clip_lines}

ulbc operating points: rate levels {args.levels} (keyframes and P frames) x thresholds {args.thresholds}
(1 - MS-SSIM per frame; 1 - SSIM under 161 px), model `{args.model}`; without the predictor at levels
{args.no_predictor_levels}. Every ulbc file was decoded from the file alone and matched the
encoder's reconstruction bit for bit. Baselines: elementary-stream bytes without SEI (`ulbcodec.video_baselines`).

### The predictor against copying the last frame (P = {codec.pred_frames} frames ahead, clean history, {codec.steps} sampler step(s))

{predictor_vs_copy(codec, loaded) if args.levels else "not run (no predictor curve)"}

### Where the frames come from

{frame_table(rows)}

### The predictor's value: ulbc with it against ulbc with P frames only (same levels)

{predictor_value(rows) if args.no_predictor_levels else "not run"}

### Mean per-clip BD-rate of ulbc against each baseline (negative: ulbc needs fewer bits)

Whole range:

{bd_table(rows, args.codecs, None)}

At most 0.03 bpp (plus the nearest point above):

{bd_table(rows, args.codecs, 0.03)}

The same without the diffusion predictor (P frames only), whole range:

{bd_table(rows, args.codecs, None, ULBC_NO_PREDICTOR) if args.no_predictor_levels else "not run"}

Per clip, P frames only, whole range (negative: ulbc needs fewer bits):

{per_clip_table(rows, args.codecs, ULBC_NO_PREDICTOR) if args.no_predictor_levels else "not run"}

### Anchored rounds: ulbc-anchored against plain ulbc at the same settings (levels {args.anchored_levels}, thresholds {args.anchored_thresholds})

{anchored_table(rows) if args.anchored_levels else "not run"}

### Every point (baselines up to 0.1 bpp)

{chr(10).join(point_lines)}
"""
    if args.speed:
        text += f"""
### Speed and memory through the CLI (2 threads)

{speed(args.model, args.clips, args.out)}
"""
    (args.out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
