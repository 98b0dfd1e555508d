"""Encode/decode speed and peak memory of ulbc on one image, each run in a fresh process.

    PYTHONPATH=src python benchmarks/speed.py IMAGE [--model default] [--threads 2] [--level L] [--repeat 2]
                                                    [--anchor-only] [--refine-steps N]

Each measurement runs ``ulbc encode`` / ``ulbc decode`` in a child process (so peak RSS is
that of the command a user runs, model load included) and reports wall seconds of the
coding itself (model load excluded, taken from the command's own per-stage timings with
``--json -v``), seconds per megapixel, and the child's peak RSS. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

CHILD = "import sys, torch; torch.set_num_threads(%d); from ulbcodec.cli import main; main(sys.argv[1:])"


def run_child(args, threads: int) -> tuple[dict, float]:
    """Run ``ulbc ARGS`` in a child with ``threads`` torch threads; return (json record, wall s)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD % threads, *map(str, args)], capture_output=True, text=True,
                          env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"child failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("image")
    p.add_argument("--model", default="default")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--level", type=int, default=None)
    p.add_argument("--repeat", type=int, default=2, help="best of N runs")
    p.add_argument("--anchor-only", action="store_true", help="decode with --anchor-only (generative models)")
    p.add_argument("--refine-steps", type=int, default=0, help="encode with --refine-steps N")
    args = p.parse_args(argv)
    decode_flags = ["--anchor-only"] if args.anchor_only else []
    w, h = Image.open(args.image).size
    mp = w * h / 1e6
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ulb, png = Path(tmp) / "x.ulb", Path(tmp) / "x.png"
        encode_flags = [] if args.level is None else ["--quality", args.level]
        encode_flags += ["--refine-steps", args.refine_steps] if args.refine_steps else []
        encode = ["encode", args.image, "-o", ulb, "--model", args.model, "--json", "-f", *encode_flags]
        best = {}
        for _ in range(args.repeat):
            rec, wall = run_child(encode, args.threads)
            coding = sum(rec["timings"].values())
            best["encode"] = min(best.get("encode", (1e9,)), (coding, wall, rec))
            rec, wall = run_child(["decode", ulb, "-o", png, "--model", args.model, "--json", "-f", *decode_flags],
                                  args.threads)
            coding = sum(rec["timings"].values())
            best["decode"] = min(best.get("decode", (1e9,)), (coding, wall, rec))
        # Peak RSS per command: measure each once more in isolation (RUSAGE_CHILDREN is a max).
        for verb, cmd in (("encode", encode),
                          ("decode", ["decode", ulb, "-o", png, "--model", args.model, "--json", "-f", *decode_flags])):
            peak = _isolated_peak(cmd, args.threads)
            coding, wall, rec = best[verb]
            rows.append((verb, coding, coding / mp, wall, peak, rec))
    mode = (f", encode --refine-steps {args.refine_steps}" if args.refine_steps else "") + \
        (", decode --anchor-only" if args.anchor_only else "")
    print(f"image {args.image} ({w}x{h}, {mp:.2f} MP), model {args.model}{mode}, {args.threads} threads, "
          f"level {rows[0][5]['rate_level']}, {rows[0][5]['bytes']} bytes ({rows[0][5]['bpp']:.4f} bpp)\n")
    print("| step | coding s | s/MP | command wall s (incl. start-up, model load) | peak RSS MB | stages |")
    print("|---|---|---|---|---|---|")
    for verb, coding, per_mp, wall, peak, rec in rows:
        print(f"| {verb} | {coding:.2f} | {per_mp:.3f} | {wall:.2f} | {peak:.0f} | {rec['timings']} |")


def _isolated_peak(cmd, threads: int) -> float:
    """Peak RSS (MB) of one child, measured by a wrapper process so maxima don't mix."""
    code = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code, sys.executable, "-c", CHILD % threads, *map(str, cmd)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


if __name__ == "__main__":
    main()
