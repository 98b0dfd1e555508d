"""Record the conformance pins of the shipped default models (tests/data/default_model_pins.json):
the image model and the generative image model on a crop of the sample photograph, the
video model on a slow pan over it.

Run after (re)training or after an intentional change to the coding path, and say so in
the commit message: the pins are what tests/test_image_codec.py and tests/test_video_codec.py
compare against. Besides the digests it writes the decoded pixels as reference PNGs
(tests/data/pins/): on another CPU the last bits of synthesis may differ, and the tests then
compare with those. ``--only video`` (or default, generative; repeatable) records those
models alone and keeps the others' pins and reference PNGs as they are, so that retraining
one model on another CPU does not move the references of the others.
"""

import argparse
import hashlib
from fractions import Fraction
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ulbcodec import packages
from ulbcodec.image import ImageCodec
from ulbcodec.video import VideoCodec, VideoSettings

ROOT = Path(__file__).resolve().parents[1]
PINS = ROOT / "tests" / "data" / "default_model_pins.json"
REFERENCES = ROOT / "tests" / "data" / "pins"


def save_reference(pixels: np.ndarray, name: str) -> None:
    """The decoded pixels as a PNG (video frames stacked top to bottom)."""
    REFERENCES.mkdir(exist_ok=True)
    Image.fromarray(pixels.reshape(-1, *pixels.shape[-2:])).save(REFERENCES / name)


def short_digest(data: bytes) -> str:
    """The pinned form of a digest: the first 16 hex digits of SHA-256."""
    return hashlib.sha256(data).hexdigest()[:16]


PHOTO = np.asarray(Image.open(ROOT / "src" / "ulbcodec" / "data" / "coffee.png").convert("RGB"))
CROP = np.ascontiguousarray(PHOTO[:128, :192])  # the crop the image tests use


def pin_default() -> tuple:
    codec = ImageCodec.from_pretrained("default")
    data = codec.encode(CROP, 2).data
    pixels = codec.decode(data)
    save_reference(pixels, "default.png")
    return codec.package.digest[:16], {
        "bitstream": short_digest(data),
        "pixels": short_digest(pixels.tobytes()),
        "bytes": len(data),
    }


def pin_generative() -> tuple:
    generative = ImageCodec.from_pretrained("generative")
    data = generative.encode(CROP, 2).data
    generated = generative.decode(data)
    anchor = generative.decode(data, anchor_only=True)
    save_reference(generated, "generative.png")
    save_reference(anchor, "generative-anchor.png")
    return generative.package.digest[:16], {
        "bitstream": short_digest(data),
        "pixels": short_digest(generated.tobytes()),
        "anchor_pixels": short_digest(anchor.tobytes()),
        "bytes": len(data),
    }


def pin_video() -> tuple:
    video = VideoCodec.from_pretrained("video")
    clip = [np.ascontiguousarray(PHOTO[:128, 2 * t : 2 * t + 192]) for t in range(8)]  # the pan the test uses
    data, gops = video.encode(iter(clip), Fraction(25), VideoSettings(threshold=0.5, rate_level=2))
    frames = np.stack(list(video.decode(data)))
    pins = {
        "bitstream": short_digest(data),
        "pixels": short_digest(frames.tobytes()),
        "bytes": len(data),
        "frame_types": gops.frame_types(),
    }
    save_reference(frames, "video.png")
    # P frames coded by the package's P-frame codec: the pan without a motion field or the predictor
    log = []
    # one pixel a frame at level 5: at two pixels, or below level 5, this package's encoder,
    # given the unwarped reference, keeps repeats and keyframes and codes no residual
    pan = [np.ascontiguousarray(PHOTO[:128, t : t + 192]) for t in range(6)]
    data, gops = video.encode(iter(pan), Fraction(25), VideoSettings(rate_level=5, predictor=False, motion=False),
                              frame_log=log.append)
    frames = np.stack(list(video.decode(data)))
    pins["pframes"] = {
        "bitstream": short_digest(data),
        "pixels": short_digest(frames.tobytes()),
        "bytes": len(data),
        "frame_types": gops.frame_types(),
        "parts": [r.parts for r in log],
    }
    save_reference(frames, "video-pframes.png")
    return video.package.digest[:16], pins


RECORDERS = {"default": pin_default, "generative": pin_generative, "video": pin_video}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", choices=sorted(RECORDERS),
                   help="record this model alone, keeping the others' pins (repeatable)")
    args = p.parse_args()
    names = args.only or list(RECORDERS)
    old = json.loads(PINS.read_text()) if PINS.exists() else {}
    pins = {}  # only the shipped models: the reference PNGs are their pixels
    for name, record in RECORDERS.items():
        if name in names:
            digest, entry = record()
            pins[digest] = entry
            print(name, digest, entry)
        else:
            digest = packages.ModelPackage.load_manifest(packages.resolve(name)).digest[:16]
            if digest not in old:
                raise SystemExit(f"no pins recorded for {name} ({digest}): record it too (--only {name})")
            pins[digest] = old[digest]
    PINS.write_text(json.dumps(pins, indent=1) + "\n")
    print(PINS)


if __name__ == "__main__":
    main()
