"""Decode time and peak device memory of generative decoding on one device, next to the
estimate that ``ulbc decode`` prints before a job (ulbcodec/placement.py).

    PYTHONPATH=src python benchmarks/gpu.py --device cuda [--model generative] [--model /path/to/nefic-pkg]
                                            [--sizes 768x512 2048x1536] [--offload none model] [--repeat 3]

For each model, size and offload mode: the image (a crop or resize of the bundled
photograph) is encoded once, then decoded ``--repeat`` times in this process (the model
loaded once, the first decode a warm-up); reported are the best decode seconds, seconds
per megapixel, the peak memory torch allocated on the device (``max_memory_allocated``)
and the estimate's peak without the CUDA context (which torch does not count). On the
CPU the memory columns are empty: use benchmarks/speed.py for peak RSS there.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "src" / "ulbcodec" / "data" / "coffee.png"


def test_image(width: int, height: int) -> np.ndarray:
    im = Image.open(SAMPLE).convert("RGB")
    scale = max(width / im.width, height / im.height)
    im = im.resize((max(width, round(im.width * scale)), max(height, round(im.height * scale))), Image.LANCZOS)
    return np.asarray(im)[:height, :width].copy()


def measure(model: str, device: torch.device, offload: str, width: int, height: int, repeat: int) -> dict:
    from ulbcodec.image import ImageCodec
    from ulbcodec.packages import ModelPackage, resolve
    from ulbcodec.placement import Placement, device_estimate

    package = ModelPackage.load_manifest(resolve(model))
    placement = Placement(device, offload)
    codec = ImageCodec(package, placement)
    rgb = test_image(width, height)
    data = codec.encode(rgb, codec.default_level).data
    cuda = device.type == "cuda"
    times = []
    for _ in range(max(2, repeat)):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        codec.decode(data)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    estimate = device_estimate(package, width, height, package.is_generative, codec.placement)
    best = min(times[1:])
    return {"model": package.name, "size": f"{width}x{height}", "offload": codec.placement.offload,
            "decode_s": best, "s_per_mp": best / (width * height / 1e6), "bytes": len(data),
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
            "estimate_gib": (estimate.peak - estimate.context) / 2**30}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", action="append", help="model name or package (repeatable) [default: generative]")
    p.add_argument("--sizes", nargs="+", default=["768x512", "2048x1536"])
    p.add_argument("--offload", nargs="+", default=["none", "model"], choices=["none", "model"])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    from ulbcodec.placement import resolve_device

    device = resolve_device(args.device)
    if device.type == "cpu":
        args.offload = ["none"]  # nothing to offload to
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), torch {torch.__version__}\n")
    print("| model | size | offload | bytes | decode s | s/MP | peak allocated GiB | estimate GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for model in args.model or ["generative"]:
        for size in args.sizes:
            width, height = (int(v) for v in size.lower().split("x"))
            for offload in args.offload:
                r = measure(model, device, offload, width, height, args.repeat)
                peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
                print(f"| {r['model']} | {r['size']} | {r['offload']} | {r['bytes']} | {r['decode_s']:.3f} | "
                      f"{r['s_per_mp']:.3f} | {peak} | {r['estimate_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
