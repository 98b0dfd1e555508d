"""Record the conformance pins of the shipped default model (tests/data/default_model_pins.json).

Run after (re)training or after an intentional change to the coding path, and say so in
the commit message: the pins are what tests/test_image_codec.py compares against.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ulbcodec.image import ImageCodec

ROOT = Path(__file__).resolve().parents[1]
PINS = ROOT / "tests" / "data" / "default_model_pins.json"

codec = ImageCodec.from_pretrained("default")
photo = np.asarray(Image.open(ROOT / "src" / "ulbcodec" / "data" / "coffee.png").convert("RGB"))
rgb = np.ascontiguousarray(photo[:128, :192])  # the crop the test uses
data = codec.encode(rgb, 2).data
pixels = codec.decode(data)
pins = json.loads(PINS.read_text()) if PINS.exists() else {}
pins[codec.package.digest[:16]] = {
    "bitstream": hashlib.sha256(data).hexdigest()[:16],
    "pixels": hashlib.sha256(pixels.tobytes()).hexdigest()[:16],
    "bytes": len(data),
}
PINS.write_text(json.dumps(pins, indent=1) + "\n")
print(PINS, pins[codec.package.digest[:16]])
