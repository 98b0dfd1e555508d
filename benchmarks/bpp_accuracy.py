"""``--bpp`` accuracy: for each photograph and target, the file ``encode_to_bpp`` writes
and how far under the target it lands (issue 24: within 3 % under, every photo).

    PYTHONPATH=src python benchmarks/bpp_accuracy.py --images DIR [--model default] \
        [--targets 0.01,0.02,0.035,0.05,0.08] [--count N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ulbcodec.eval.image_sweep import list_images, load_image


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", required=True)
    p.add_argument("--model", default="default")
    p.add_argument("--targets", default="0.01,0.02,0.035,0.05,0.08")
    p.add_argument("--count", type=int, default=0, help="only the first N images")
    args = p.parse_args(argv)
    from ulbcodec.image import ImageCodec

    codec = ImageCodec.from_pretrained(args.model)
    targets = [float(t) for t in args.targets.split(",")]
    print(f"model `{args.model}`, continuous levels: {codec.continuous_levels}\n")
    print("| image | target bpp | file bpp | file / target | level | downscale | encodes s |")
    print("|---|---|---|---|---|---|---|")
    worst = []
    for path in list_images(args.images, args.count):
        rgb = load_image(path)
        for target in targets:
            t0 = time.perf_counter()
            result, met = codec.encode_to_bpp(rgb, target)
            ratio = result.bpp / target
            worst.append(ratio if met else float("nan"))
            print(f"| {Path(path).name} | {target:g} | {result.bpp:.5f} | {ratio:.4f}{'' if met else ' (not met)'} | "
                  f"{result.rate_level:g} | {result.downscale} | {time.perf_counter() - t0:.1f} |", flush=True)
    within = sum(0.97 <= r <= 1 for r in worst)
    print(f"\n{within} of {len(worst)} files within 3 % under the target; lowest ratio {min(worst):.4f}, "
          f"highest {max(worst):.4f}")


if __name__ == "__main__":
    main()
