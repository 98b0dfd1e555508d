"""Roofline of every decoding stage: FLOPs per pixel, achieved GFLOP/s, fraction of the CPU's peak.

    PYTHONPATH=src python benchmarks/roofline.py [--image PNG] [--threads 2] [--repeat 3]
                                                 [--dtype auto|float32|bfloat16] [--stages a,b,...]

Per stage, on one 768x512 photograph (the frame predictor and the P-frame codec on a 256x256
crop, their video size): the FLOPs of one run counted by ``torch.utils.flop_counter.FlopCounterMode``
(convolutions, matmuls, attention: the multiply-adds, 2 FLOPs each; element-wise work and
the rANS coder are not counted), its time as best of ``--repeat`` runs after one warm-up
(wall and CPU seconds), and the achieved GFLOP/s as a fraction of this CPU's measured peak
(per wall second, and per CPU second, which load from other processes distorts less):
a 2048x2048 float32 matmul (MKL) on the same threads, measured in the same run (and a
bfloat16 one when the diffusion stages run in bfloat16). That fraction is how far each stage
is from the physical limit of its arithmetic, and so where the next gain is.

Stages: ``entropy`` (the anchor codec's entropy decode: hyper-synthesis, context models,
rANS; float32, one thread by design), ``synthesis`` (g_s, tiled), ``vae_encode`` /
``vae_decode`` (the next-frame decoder's VAE, tiled), ``transformer`` (its one-step
prediction, tiled), ``predictor`` (the video model's latent frame predictor UNet, one
denoising step), ``pframe`` (the video model's P-frame decode of a 256x256 frame, the
analysis of its reference included: for the shipped package a latent-conditional P frame).
The diffusion stages run in the precision
:func:`ulbcodec.placement.cpu_compute_dtype` picks for this CPU unless ``--dtype`` says.
OpenMP threads wait passively, as in the ``ulbc`` command (``resources.passive_openmp_waits``).
Prints a markdown table (stdout) and the CPU line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ulbcodec import resources  # noqa: E402

resources.passive_openmp_waits()  # as the ulbc command does, before torch loads

import numpy as np  # noqa: E402
import torch  # noqa: E402

STAGES = ("entropy", "synthesis", "vae_encode", "transformer", "vae_decode", "predictor", "pframe")


def cpu_line() -> str:
    """Model name, core count and the SIMD flags that matter here (for every speed figure)."""
    from ulbcodec.placement import cpu_flags

    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    shown = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    load = ""
    try:
        load = "; load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} logical cores, flags {' '.join(shown) or '(none found)'}; torch "
            f"{torch.__version__} (capability {torch.backends.cpu.get_cpu_capability()}){load}")


def best_time(fn, repeat: int):
    """(best wall s, best CPU s) of ``repeat`` runs after one warm-up run."""
    fn()
    wall, cpu = float("inf"), float("inf")
    for _ in range(repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    return wall, cpu


def count_flops(fn) -> int:
    """FLOPs of one run, on one thread (the counter sees only the calling thread's ops, so
    tile and side-thread pools must run inline)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ulbcodec.threads import torch_threads

    with torch_threads(1), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_gflops(threads: int, dtype=torch.float32, n: int = 2048, repeat: int = 5):
    """(GFLOP per wall second, GFLOP per CPU second) of an n x n matmul on ``threads``."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.set_num_threads(threads)
    wall, cpu = best_time(lambda: torch.mm(a, b), repeat)
    return 2 * n ** 3 / wall / 1e9, 2 * n ** 3 / cpu / 1e9


def load_rgb(path: str, width: int, height: int) -> np.ndarray:
    from PIL import Image

    if path and Path(path).is_file():
        rgb = np.asarray(Image.open(path).convert("RGB"))
    else:  # a smooth synthetic image (no photograph fetched)
        y, x = np.mgrid[0:height, 0:width]
        rgb = np.stack([(x * 255 // width), (y * 255 // height), ((x + y) * 127 // (width + height))], -1)
    return np.ascontiguousarray(rgb[:height, :width].astype(np.uint8))


def stage_calls(args, names):
    """{stage: (fn, pixels, note)} for the stages asked for (models loaded once)."""
    from ulbcodec import bitstream, packages
    from ulbcodec.bitstream import AnchorPayload, Container
    from ulbcodec.image import PAD_MULTIPLE, TILE_CORE, TILE_MARGIN, ImageCodec, pad_replicate, tile_workers, to_tensor
    from ulbcodec.tiling import blended_tiles, tile_batch, tiled_apply

    calls = {}
    rgb = load_rgb(args.image, 768, 512)
    h, w = rgb.shape[:2]
    if {"entropy", "synthesis"} & set(names):
        codec = ImageCodec.from_pretrained(args.model)
        level = codec.default_level
        data = codec.encode(rgb, level).data
        payload = AnchorPayload.from_bytes(Container.from_bytes(data).find(bitstream.CHUNK_ANCHOR)[0].payload)
        model, lv = codec._anchor_codec(level)
        strings = [[payload.y_string], [payload.z_string]]
        y_hat = model.decode_latent(strings, payload.z_shape)["y_hat"]
        core, margin = TILE_CORE // 16, TILE_MARGIN // 16
        calls["entropy"] = (lambda: model.decode_latent(strings, payload.z_shape), h * w,
                            f"{args.model}, {len(data)} B")
        calls["synthesis"] = (lambda: tiled_apply(lambda t: model.synthesize(t, rate_level=lv, with_bypass=False)[0],
                                                  y_hat, Fraction(16), core, margin, tile_workers()), h * w, args.model)
    gen_stages = {"vae_encode", "transformer", "vae_decode"} & set(names)
    try:
        gen = ImageCodec.from_pretrained(args.generative_model) if gen_stages else None
    except packages.ModelError:
        gen = None
    if gen is not None:
        pipe = gen.next_frame
        if args.dtype != "auto":
            pipe.dtype = getattr(torch, args.dtype)
        x = pad_replicate(to_tensor(rgb), PAD_MULTIPLE)
        from ulbcodec import tiling

        tile = tiling.vae_tile(pipe.full_resolution_channels)
        # workers as NextFramePipeline.decode_image on the CPU (1 while FLOPs are counted)
        enc = lambda: blended_tiles(pipe.encode_latent, x, tile=tile, overlap=tiling.VAE_OVERLAP,  # noqa: E731
                                    scale=Fraction(1, 8), even=True, workers=tiling.tile_workers())
        anchor_latent = enc()
        bypass = anchor_latent + 0.1 * torch.randn_like(anchor_latent)
        pred = lambda: blended_tiles(pipe.predict_clean, anchor_latent, bypass, tile=pipe.latent_tile,  # noqa: E731
                                     overlap=pipe.latent_overlap, batch=tile_batch(pipe.latent_tile),
                                     workers=tiling.tile_workers())
        if pipe.output == "latent":
            dec = lambda: blended_tiles(pipe.decode_latent, anchor_latent, tile=tile // 8,  # noqa: E731
                                        overlap=tiling.VAE_OVERLAP // 8, scale=Fraction(8), even=True,
                                        workers=tiling.tile_workers())
        else:  # anchor_residual: VAE.decode(x0) - VAE.decode(A), two decodes per tile
            dec = lambda: blended_tiles(pipe.pixel_change, bypass, anchor_latent, tile=tile // 8,  # noqa: E731
                                        overlap=tiling.VAE_OVERLAP // 8, scale=Fraction(8), even=True,
                                        workers=tiling.tile_workers())
        note = f"{args.generative_model}, {str(pipe.dtype or torch.float32).replace('torch.', '')}"
        calls.update(vae_encode=(enc, h * w, note), transformer=(pred, h * w, note),
                     vae_decode=(dec, h * w, f"{note}, {pipe.output}"))
    if "predictor" in names:
        try:
            from ulbcodec.video import VideoCodec

            video = VideoCodec.from_pretrained(args.video_model)
            pp = video.predictor
            size = 256 // 8
            cond = torch.randn(1, pp.cond_frames, pp.channels, size, size)
            noise = torch.randn(1, pp.pred_frames, pp.channels, size, size)
            calls["predictor"] = (lambda: pp.velocity(cond, noise, 500), 256 * 256 * pp.pred_frames,
                                  f"{args.video_model}, one step, K={pp.cond_frames} P={pp.pred_frames}")
        except (packages.ModelError, KeyError, AttributeError) as exc:
            print(f"roofline: predictor skipped ({exc})", file=sys.stderr)
    if "pframe" in names:
        try:
            from ulbcodec.models.latent_conditional_codec import LatentConditionalCodec
            from ulbcodec.video import VideoCodec

            pf = VideoCodec.from_pretrained(args.video_model).pframe_codec
        except (packages.ModelError, KeyError, AttributeError) as exc:
            pf = None
            print(f"roofline: pframe skipped ({exc})", file=sys.stderr)
        if pf is not None:
            # a 256x256 frame of the photograph and its reference four pixels to the left:
            # the P frame's whole decode, the reference's analysis included
            wide = to_tensor(load_rgb(args.image, 260, 256))
            frame, ref = wide[..., 4:], (wide[..., :256] * 255).round() / 255
            level = pf.num_rate_levels - 2
            with torch.no_grad():
                coded = pf.compress(frame, ref, level)

            def decode_pframe():  # a codec with nothing cached, as at a new frame of a file
                codec = pf
                if isinstance(pf, LatentConditionalCodec):
                    codec = LatentConditionalCodec(pf.keyframe_codec, pf.prior)
                return codec.decompress(coded["strings"], coded["shape"], ref, level)

            note = f"{args.video_model}, {type(pf).__name__}, level {level}, {sum(map(len, coded['strings']))} B"
            calls["pframe"] = (decode_pframe, 256 * 256, note)
    return calls


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image", default=os.path.expanduser("~/.cache/ulbc/photos/val-768/coffee.png"))
    p.add_argument("--model", default="default")
    p.add_argument("--generative-model", default="generative")
    p.add_argument("--video-model", default="video")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="the diffusion stages' compute dtype (auto: ulbcodec.placement.cpu_compute_dtype)")
    p.add_argument("--stages", default=",".join(STAGES))
    args = p.parse_args(argv)
    names = [s for s in args.stages.split(",") if s]
    unknown = set(names) - set(STAGES)
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")

    torch.set_num_threads(args.threads)
    peak32 = peak_gflops(args.threads)
    calls = stage_calls(args, names)
    rows = []
    with torch.no_grad():
        for name in names:
            if name not in calls:
                continue
            fn, pixels, note = calls[name]
            flops = count_flops(fn)
            torch.set_num_threads(args.threads)
            wall, cpu = best_time(fn, args.repeat)
            rows.append((name, note, pixels, flops, wall, cpu))
    peak16 = peak_gflops(args.threads, torch.bfloat16) if any("bfloat16" in r[1] for r in rows) else None
    again = peak_gflops(args.threads)  # measured before and after the stages: the better one
    peak32 = (max(peak32[0], again[0]), max(peak32[1], again[1]))

    print(f"CPU: {cpu_line()}")
    print(f"Peak: {peak32[0]:.1f} GFLOP/s float32, {peak32[1]:.1f} GFLOP per CPU second (2048x2048 matmul, "
          f"{args.threads} threads)" + (f"; bfloat16 {peak16[0]:.1f} GFLOP/s, {peak16[1]:.1f} per CPU s" if peak16 else ""))
    print()
    print("| stage | run | pixels | GFLOP | FLOP/pixel | best wall s | s/MP | GFLOP/s | of peak | CPU s | of peak (CPU s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, note, pixels, flops, wall, cpu in rows:
        peak = peak16 if "bfloat16" in note and peak16 else peak32
        rate, rate_cpu = flops / wall / 1e9, flops / cpu / 1e9
        print(f"| {name} | {note} | {pixels} | {flops / 1e9:.2f} | {flops / pixels / 1e3:.1f} k | {wall:.3f} | "
              f"{wall / pixels * 1e6:.2f} | {rate:.1f} | {rate / peak[0]:.1%} | {cpu:.3f} | {rate_cpu / peak[1]:.1%} |")
    print()
    print("FLOPs: torch.utils.flop_counter (convolutions, matmuls, attention; element-wise work and rANS not "
          "counted). Wall and CPU seconds: best of %d after a warm-up; \"of peak (CPU s)\" compares GFLOP per "
          "CPU second with the matmul's, which a busy machine distorts less than wall time. A 3x3 convolution "
          "can pass 100%%: its FLOPs are counted as a direct convolution, and oneDNN computes it with fewer." % args.repeat)


if __name__ == "__main__":
    main()
