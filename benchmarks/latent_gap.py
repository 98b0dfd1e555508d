"""Does the one-step prediction move the anchor's latent toward the original's?

    PYTHONPATH=src python benchmarks/latent_gap.py --images DIR [--model generative]

A diagnostic of the next-frame decoder in the VAE latent space (scaled latents, the
space the transformer works in). For centre crops of each image and each rate level:
A = latent of the decoded anchor frame, x0 = the one-step prediction from [A, A, Z, Z],
X = latent of the original. It prints the mean squared errors ‖A − X‖² and ‖x0 − X‖²,
the size of the change ‖x0 − A‖², and the share of A's error that the best scaling
λ·(x0 − A) of the change could remove, ⟨x0 − A, X − A⟩² / (‖x0 − A‖²·‖A − X‖²): 0 when
the change is unrelated to the missing detail, 1 when it points exactly at it.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ulbcodec.eval.image_sweep import list_images, load_image


@torch.no_grad()
def latent_gap(model: str, paths, levels, crop: int) -> list[dict]:
    from ulbcodec.image import ImageCodec

    codec = ImageCodec.from_pretrained(model)
    pipe = codec.next_frame
    rows = []
    for level in levels:
        sums = np.zeros(4)
        for path in paths:
            rgb = load_image(path)
            h, w = rgb.shape[:2]
            y, x = (h - crop) // 2, (w - crop) // 2
            image = torch.from_numpy(rgb[y : y + crop, x : x + crop].copy()).permute(2, 0, 1)[None].float() / 255
            codec.model.train()  # rounding as in decompress(), whole crop at once
            try:
                out = codec.model(image, rate_level=level, with_bypass=True)
            finally:
                codec.model.eval()
            a = pipe.encode_latent(out["anchor_frame"].clamp(0, 1))
            target = pipe.encode_latent(image)
            x0 = pipe.predict_clean(a, out["bypass_latent"][:, 0])
            change, missing = x0 - a, target - a
            sums += [missing.pow(2).mean().item(), (x0 - target).pow(2).mean().item(), change.pow(2).mean().item(),
                     (change * missing).mean().item()]
        m = sums / len(paths)
        rows.append({"level": level, "anchor": m[0], "prediction": m[1], "change": m[2],
                     "removable": m[3] ** 2 / max(m[2] * m[0], 1e-12) if m[3] > 0 else 0.0})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", required=True)
    p.add_argument("--model", default="generative")
    p.add_argument("--levels", default="0,1,2,3")
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--count", type=int, default=0, help="use the first N images (0: all)")
    args = p.parse_args(argv)
    paths = list_images(args.images, args.count)
    torch.set_num_threads(2)
    rows = latent_gap(args.model, paths, [int(v) for v in args.levels.split(",")], args.crop)
    print(f"model `{args.model}`, {len(paths)} images, centre crops of {args.crop}²; scaled-latent MSE")
    print()
    print("| level | anchor ‖A − X‖² | prediction ‖x0 − X‖² | change ‖x0 − A‖² | share of A's error a scaled change removes |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['level']} | {r['anchor']:.4f} | {r['prediction']:.4f} | {r['change']:.4f} | {100 * r['removable']:.1f} % |")


if __name__ == "__main__":
    main()
