"""What the colour statistics chunk (``colr``, issue 27) costs and buys on ulbc's own models.

    PYTHONPATH=src python benchmarks/color_stats.py [--images DIR] [--model default --levels 0,1,2,3]
        [--generative [--generative-model generative --generative-levels 0,3 --generative-count 3]] [--out points.json]

For each photo and each (model, level): encode without and with the chunk
(``ImageCodec.encode(..., color_stats=False/True)``), write the ``.ulb`` file, read it
back and decode it; the rate is the real file size x 8 / pixels. Prints one markdown row
per (model, level): the mean over the photos of each variant, and the difference
(with - without), plus the chunk's size (file size difference). Metrics that cannot run
here (``ulbcodec.metrics.available_metrics()``) are skipped and named under the table.
``--out`` writes every per-image point as JSON (rewritten after each image, so a run
that is stopped keeps what it measured; ``--resume`` reuses those points).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ulbcodec import baselines
from ulbcodec.eval.image_sweep import list_images, load_image
from ulbcodec.eval.scoring import image_scores, metric_problem

#: reported metrics, in table order, with whether higher is better
WANTED = (("psnr", "PSNR dB"), ("ms_ssim", "MS-SSIM"), ("vmaf", "VMAF"), ("vmaf_neg", "VMAF NEG"),
          ("ssimulacra2", "SSIMULACRA2"), ("color_shift", "colour drift ΔE (lower better)"))
VARIANTS = (("off", False), ("on", True))


def _levels(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def code_one(codec, rgb: np.ndarray, level: int, color_stats: bool, folder: Path, metrics: tuple) -> dict:
    """Encode, write, read back, decode, score one image at one level."""
    t0 = time.perf_counter()
    data = codec.encode(rgb, rate_level=level, color_stats=color_stats).data
    encode_s = time.perf_counter() - t0
    path = folder / f"l{level}_{'on' if color_stats else 'off'}.ulb"
    path.write_bytes(data)
    stream = path.read_bytes()
    t0 = time.perf_counter()
    decoded = codec.decode(stream)
    decode_s = time.perf_counter() - t0
    return {"bytes": len(stream), "bpp": baselines.bpp(stream, rgb.shape), **image_scores(rgb, decoded, metrics),
            "encode_s": encode_s, "decode_s": decode_s}


def run(model: str, levels: list[int], paths: list[str], metrics: tuple, points: list[dict], save) -> None:
    from ulbcodec.image import ImageCodec

    codec = ImageCodec.from_pretrained(model)
    done = {(p["model"], p["level"], p["image"]) for p in points}
    with tempfile.TemporaryDirectory(prefix="ulbc-colr-") as tmp:
        for level in levels:
            for path in paths:
                name = Path(path).name
                if (model, level, name) in done:
                    continue
                rgb = load_image(path)
                row = {"model": model, "level": level, "image": name}
                for key, flag in VARIANTS:
                    row[key] = code_one(codec, rgb, level, flag, Path(tmp), metrics)
                points.append(row)
                save()
                off, on = row["off"], row["on"]
                print(f"  {model} level {level} {name}: {off['bpp']:.4f} -> {on['bpp']:.4f} bpp, "
                      f"PSNR {off['psnr']:.2f} -> {on['psnr']:.2f}, decode {on['decode_s']:.1f} s",
                      file=sys.stderr, flush=True)


def _mean(values) -> float:
    values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else math.nan


def table(points: list[dict], metrics: tuple) -> str:
    cols = [("bpp", "bpp", 4)] + [(m, label, 4 if m == "ms_ssim" else 2) for m, label in WANTED if m in metrics]
    head = "| model | level | photos | `colr` bytes | " + " | ".join(
        f"{label}: off → on (Δ)" for _, label, _ in cols) + " |"
    lines = [head, "|" + "---|" * (4 + len(cols))]
    groups: dict = {}
    for p in points:
        groups.setdefault((p["model"], p["level"]), []).append(p)
    for (model, level), rows in groups.items():
        chunk = sorted({r["on"]["bytes"] - r["off"]["bytes"] for r in rows})
        cells = [model, str(level), str(len(rows)), "/".join(map(str, chunk))]
        for key, _, digits in cols:
            off, on = _mean(r["off"][key] for r in rows), _mean(r["on"][key] for r in rows)
            cells.append(f"{off:.{digits}f} → {on:.{digits}f} ({on - off:+.{digits}f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", default=os.path.expanduser("~/.cache/ulbc/photos/val-768"))
    p.add_argument("--count", type=int, default=0, help="the first N photos (sorted by name) for --model; 0: all")
    p.add_argument("--model", default="default")
    p.add_argument("--levels", default="0,1,2,3")
    p.add_argument("--generative", action="store_true", help="also run --generative-model")
    p.add_argument("--generative-model", default="generative")
    p.add_argument("--generative-levels", default="0,3")
    p.add_argument("--generative-count", type=int, default=0, help="the first N photos for the generative model")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", help="write the per-image points as JSON")
    p.add_argument("--resume", action="store_true", help="reuse the points already in --out")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    metrics, skipped = [], []
    for m, _ in WANTED:
        problem = metric_problem(m)
        (skipped.append(f"{m} ({problem})") if problem else metrics.append(m))
    metrics = tuple(metrics)
    points: list[dict] = []
    if args.resume and args.out and Path(args.out).is_file():
        points = json.loads(Path(args.out).read_text())["points"]
    runs = [(args.model, _levels(args.levels), list_images(args.images, args.count))]
    if args.generative:
        runs.append((args.generative_model, _levels(args.generative_levels),
                     list_images(args.images, args.generative_count)))
    config = {"images": args.images, "runs": [{"model": m, "levels": lv, "photos": [Path(x).name for x in ps]}
                                              for m, lv, ps in runs], "metrics": metrics, "skipped": skipped}

    def save() -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"config": config, "points": points}, indent=1))

    for model, levels, paths in runs:
        run(model, levels, paths, metrics, points, save)
    save()
    print(table(points, metrics))
    print()
    photos = "; ".join(f"{r['model']}: {', '.join(r['photos'])}" for r in config["runs"])
    print(f"Means over the photos ({photos}). off: no `colr` chunk; on: with it (the decoder applies the published "
          f"colour fix); Δ = on - off. `colr` bytes: file size difference.")
    if skipped:
        print(f"Not measured here: {'; '.join(skipped)}.")


if __name__ == "__main__":
    main()
