"""What encoder-side latent refinement buys, per objective (ulbcodec.refinement).

    PYTHONPATH=src python benchmarks/refine_objectives.py --images DIR [--model generative] [--levels 1,3] [--count 3]

For each image and rate level the same image is coded three times: without refinement,
refined on the anchor codec's training loss alone (``perceptual_weight=0``), and refined
on the shipped objective (training loss + detail and VIF terms), ``--steps`` steps each.
Every file is decoded by the unchanged decoder, anchor-only and generative (when the
model has a generative decoder). Prints the mean change in file size against the
unrefined file and the mean PSNR / VMAF of both decodes, per level and objective.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ulbcodec.eval.image_sweep import list_images, load_image

OBJECTIVES = ("none (g_a alone)", "training loss only", "+ detail and VIF (ulbc's)")


def measure(model: str, paths: list[str], levels: list[int], steps: int) -> list[dict]:
    from ulbcodec import metrics
    from ulbcodec.image import ImageCodec
    from ulbcodec.refinement import RefineSettings

    codec = ImageCodec.from_pretrained(model)
    decoders = (("anchor", True), ("generative", False)) if codec.is_generative else (("anchor", True),)
    settings = (None, RefineSettings(steps=steps, perceptual_weight=0.0), RefineSettings(steps=steps))
    rows = []
    for path in paths:
        ref = load_image(path)
        for level in levels:
            for label, refine in zip(OBJECTIVES, settings):
                result = codec.encode(ref, level, refine=refine)
                row = {"image": Path(path).name, "level": level, "objective": label, "bytes": len(result.data),
                       "seconds": sum(result.timings.values())}
                for name, anchor_only in decoders:
                    decoded = codec.decode(result.data, anchor_only=anchor_only)
                    row[f"{name}_psnr"], row[f"{name}_vmaf"] = metrics.psnr(ref, decoded), metrics.vmaf(ref, decoded)
                rows.append(row)
                print(f"  {row['image']} level {level} {label}: {row['bytes']} bytes", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict], levels: list[int]) -> str:
    decoders = [d for d in ("anchor", "generative") if f"{d}_psnr" in rows[0]]
    lines = ["| level | objective | bytes vs unrefined | encode s | "
             + " | ".join(f"{d} PSNR / VMAF" for d in decoders) + " |", "|---" * (4 + len(decoders)) + "|"]
    for level in levels:
        plain = {r["image"]: r["bytes"] for r in rows if r["level"] == level and r["objective"] == OBJECTIVES[0]}
        for label in OBJECTIVES:
            group = [r for r in rows if r["level"] == level and r["objective"] == label]
            change = np.mean([r["bytes"] / plain[r["image"]] - 1 for r in group])
            cells = [f"{np.mean([r[f'{d}_psnr'] for r in group]):.2f} / {np.mean([r[f'{d}_vmaf'] for r in group]):.1f}"
                     for d in decoders]
            seconds = np.mean([r["seconds"] for r in group])
            lines.append(f"| {level} | {label} | {100 * change:+.1f} % | {seconds:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True)
    p.add_argument("--model", default="generative")
    p.add_argument("--levels", default="1,3")
    p.add_argument("--count", type=int, default=3, help="use the first N images (0: all)")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args(argv)
    paths = list_images(args.images, args.count)
    levels = [int(v) for v in args.levels.split(",")]
    rows = measure(args.model, paths, levels, args.steps)
    print(f"model `{args.model}`, {len(paths)} images ({', '.join(Path(q).name for q in paths)}), "
          f"{args.steps} refinement steps; means over images, full-size coding")
    print()
    print(table(rows, levels))


if __name__ == "__main__":
    main()
