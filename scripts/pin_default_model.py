"""Record the conformance pins of the shipped default models (tests/data/default_model_pins.json):
the image model and the generative image model on a crop of the sample photograph, the
video model on a slow pan over it.

Run after (re)training or after an intentional change to the coding path, and say so in
the commit message: the pins are what tests/test_image_codec.py and tests/test_video_codec.py compare against.
Besides the digests it writes the decoded pixels as reference PNGs (tests/data/pins/): on
another CPU the last bits of synthesis may differ, and the tests then compare with those.
"""

import hashlib
from fractions import Fraction
import json
from pathlib import Path

import numpy as np
from PIL import Image

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


codec = ImageCodec.from_pretrained("default")
photo = np.asarray(Image.open(ROOT / "src" / "ulbcodec" / "data" / "coffee.png").convert("RGB"))
rgb = np.ascontiguousarray(photo[:128, :192])  # the crop the test uses
data = codec.encode(rgb, 2).data
pixels = codec.decode(data)
pins = {}  # only the shipped models: the reference PNGs below are their pixels
pins[codec.package.digest[:16]] = {
    "bitstream": short_digest(data),
    "pixels": short_digest(pixels.tobytes()),
    "bytes": len(data),
}
save_reference(pixels, "default.png")

generative = ImageCodec.from_pretrained("generative")
data = generative.encode(rgb, 2).data
generated = generative.decode(data)
anchor = generative.decode(data, anchor_only=True)
pins[generative.package.digest[:16]] = {
    "bitstream": short_digest(data),
    "pixels": short_digest(generated.tobytes()),
    "anchor_pixels": short_digest(anchor.tobytes()),
    "bytes": len(data),
}
save_reference(generated, "generative.png")
save_reference(anchor, "generative-anchor.png")

video = VideoCodec.from_pretrained("video")
clip = [np.ascontiguousarray(photo[:128, 2 * t : 2 * t + 192]) for t in range(8)]  # the pan the test uses
data, gops = video.encode(iter(clip), Fraction(25), VideoSettings(threshold=0.5, rate_level=2))
frames = np.stack(list(video.decode(data)))
pins[video.package.digest[:16]] = {
    "bitstream": short_digest(data),
    "pixels": short_digest(frames.tobytes()),
    "bytes": len(data),
    "frame_types": gops.frame_types(),
}
save_reference(frames, "video.png")
# P frames coded by the package's P-frame codec: the pan without a motion field or the predictor
log = []
# one pixel a frame: at two, this package's P-frame codec, given the unwarped reference, costs
# more than a keyframe and the encoder codes none
pan = [np.ascontiguousarray(photo[:128, t : t + 192]) for t in range(6)]
data, gops = video.encode(iter(pan), Fraction(25), VideoSettings(rate_level=4, predictor=False, motion=False),
                          frame_log=log.append)
frames = np.stack(list(video.decode(data)))
pins[video.package.digest[:16]]["pframes"] = {
    "bitstream": short_digest(data),
    "pixels": short_digest(frames.tobytes()),
    "bytes": len(data),
    "frame_types": gops.frame_types(),
    "parts": [r.parts for r in log],
}
save_reference(frames, "video-pframes.png")
PINS.write_text(json.dumps(pins, indent=1) + "\n")
print(PINS, *(pins[c.package.digest[:16]] for c in (codec, generative, video)))
