"""Coverage-guided fuzzing (atheris / libFuzzer) of the .ulb reader and the image and video decode paths.

    .venv/bin/python fuzz/fuzz_decode.py --runs 2000                  # short (CI-sized) run
    .venv/bin/python fuzz/fuzz_decode.py --seconds 600                # long local run
    .venv/bin/python fuzz/fuzz_decode.py --seconds 60 --max-memory none   # no memory check

Each input goes through decode_check.check_input: Container.from_bytes, describe (what
`ulbc info` prints), the CLI's memory check (--max-memory, default 1G), then
ImageCodec.decode_container or VideoCodec.decode_container (by the header's media) with
tiny seeded random models built at start-up into a temporary folder. A successful decode
must return arrays of the header's size (and, for a video, its frame count); a failure
must be ValueError or OSError (what the CLI prints as a clean one-line error; --strict:
BitstreamError, DecodeError or MemoryLimitError only). Anything else,
a native crash, an input over --timeout seconds or a process over --rss-limit-mb is a
finding: libFuzzer stops and writes the input to the artifacts folder.

Mutations are structure-aware (decode_check.mutate, with libFuzzer's own byte mutator
inside): chunk lengths, CRCs and the chunk count are recomputed most of the time, so
inputs get past the CRC check to the header, payload and entropy-decoding code.

Corpora: new interesting inputs go to --work-dir/corpus (not committed); the committed
seeds in fuzz/corpus (or the folders given) are read only. The script runs libFuzzer in
a child process, streams its log, and ends with one summary line: executions, exec/s,
coverage edges (libFuzzer `cov:`) and features (`ft:`), and the result.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER_ENV = "ULBC_FUZZ_WORKER"
# Instrumented for coverage: the container reader and the decode pipeline (ulbcodec.bitstream,
# .image, .packages, .tiling). Not the model maths (ulbcodec.models.anchor_codec with the .layers
# and .entropy modules it imports, compressai, torch): they are imported before instrumentation starts, because atheris's
# instrumentation of anchor_codec grows the process by ~5 KB per decode (measured: 16 MB per
# 3000 decodes, flat without it), which ends long runs at -rss_limit_mb. The rANS coder is
# C++ and not instrumented either.
UNINSTRUMENTED_FIRST = ["ulbcodec.models.anchor_codec"]
INSTRUMENT = ["ulbcodec"]
FUZZ_VIDEO_PIXELS = 40 * 64 * 64  # decode_check.FUZZ_LIMITS (not imported here: the driver stays torch-free)


# --------------------------------------------------------------------------- worker (inside libFuzzer)


def worker() -> None:
    import atheris

    config = json.loads(os.environ[WORKER_ENV])
    sys.path.insert(0, str(HERE))
    sys.path.append(str(ROOT / "src"))
    for name in UNINSTRUMENTED_FIRST:
        importlib.import_module(name)
    with atheris.instrument_imports(include=INSTRUMENT):
        import decode_check as dc  # imports ulbcodec.bitstream, .image, ... under instrumentation

    codec = dc.build_codec()
    limits = dc.Limits(config["max_memory"], config["max_video_pixels"], dc.bitstream.DEFAULT_MAX_PIXELS)
    strict = config["strict"]

    outcomes: dict = {}
    stats_file = Path(config["stats_file"])

    def test_one_input(data: bytes) -> None:
        out = dc.check_input(data, codec, limits, strict)
        key = f"{out.status}:{out.stage}" + ("" if out.documented else f":{out.error_type}")
        outcomes[key] = outcomes.get(key, 0) + 1
        if sum(outcomes.values()) % 5000 == 0:  # libFuzzer exits without running Python's atexit
            stats_file.write_text(json.dumps(outcomes))

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.1:
            return atheris.Mutate(data, max_size)
        return dc.mutate(data, max_size, rng, byte_mutator=atheris.Mutate)

    def custom_crossover(data1: bytes, data2: bytes, max_size: int, seed: int) -> bytes:
        # splice whole chunks of two files (keeps the framing valid), else bytes
        rng = random.Random(seed)
        a, b = dc.split_chunks(data1), dc.split_chunks(data2)
        if a is None or b is None or not a[1] or not b[1]:
            cut1, cut2 = rng.randrange(len(data1) + 1), rng.randrange(len(data2) + 1)
            return (data1[:cut1] + data2[cut2:])[:max_size]
        i, j = rng.randrange(len(a[1]) + 1), rng.randrange(len(b[1]) + 1)
        return dc.join_chunks(a[0], dc.fix_chunk_count(a[1][:i] + b[1][j:]))[:max_size]

    atheris.Setup(sys.argv, test_one_input, custom_mutator=custom_mutator, custom_crossover=custom_crossover)
    atheris.Fuzz()


# --------------------------------------------------------------------------- driver

STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+)")
FINDINGS = [  # first match wins
    ("timeout", re.compile(r"ERROR: libFuzzer: timeout")),
    ("oom", re.compile(r"ERROR: libFuzzer: out-of-memory")),
    ("crash", re.compile(r"Uncaught Python exception|ERROR: libFuzzer: ")),  # deadly signal, exited, ...
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("corpus", nargs="*", type=Path, help="seed corpus folders, read only (default: fuzz/corpus)")
    ap.add_argument("--runs", type=int, help="stop after N executions (libFuzzer -runs)")
    ap.add_argument("--seconds", type=int, help="stop after S seconds (libFuzzer -max_total_time)")
    ap.add_argument("--timeout", type=int, default=20, help="per-input time bound in seconds [20]")
    ap.add_argument("--rss-limit-mb", type=int, default=4096, help="memory bound of the process [4096]")
    ap.add_argument("--max-len", type=int, default=4096, help="largest input libFuzzer makes [4096]")
    ap.add_argument("--max-memory", default="1G",
                    help="refuse inputs as `ulbc decode --max-memory` does (2G, 500M, none) [1G]")
    ap.add_argument("--max-video-pixels", default=str(FUZZ_VIDEO_PIXELS),
                    help="skip videos of more frames x width x height than this (none: no bound) "
                         f"[{FUZZ_VIDEO_PIXELS}]")
    ap.add_argument("--strict", action="store_true", help="only BitstreamError/DecodeError are clean")
    ap.add_argument("--work-dir", type=Path, default=ROOT / "out" / "fuzz",
                    help="new corpus entries (work-dir/corpus), artifacts (work-dir/artifacts), log [out/fuzz]")
    ap.add_argument("--seed", type=int, help="libFuzzer -seed (default: random)")
    ap.add_argument("libfuzzer_args", nargs=argparse.REMAINDER,
                    help="after --: extra libFuzzer flags, e.g. -- -only_ascii=0 -dict=...")
    args = ap.parse_args()
    if args.runs is None and args.seconds is None:
        ap.error("give --runs N and/or --seconds S")

    work = args.work_dir.resolve()
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    (work / "artifacts").mkdir(parents=True, exist_ok=True)
    seeds = [p.resolve() for p in (args.corpus or [HERE / "corpus"])]
    flags = [f"-timeout={args.timeout}", f"-rss_limit_mb={args.rss_limit_mb}", f"-max_len={args.max_len}",
             f"-artifact_prefix={work / 'artifacts'}/", "-print_final_stats=1"]
    if args.runs is not None:
        flags.append(f"-runs={args.runs}")
    if args.seconds is not None:
        flags.append(f"-max_total_time={args.seconds}")
    if args.seed is not None:
        flags.append(f"-seed={args.seed}")
    flags += [a for a in args.libfuzzer_args if a != "--"]
    cmd = [sys.executable, str(Path(__file__).resolve()), *flags, str(work / "corpus"), *map(str, seeds)]
    stats_file = work / "outcomes.json"
    stats_file.unlink(missing_ok=True)
    sys.path.insert(0, str(ROOT / "src"))
    from ulbcodec.resources import parse_size  # here, not at the top: the worker must import
                                               # ulbcodec only under instrumentation
    try:
        max_memory = parse_size(args.max_memory)
    except ValueError as exc:
        ap.error(f"--max-memory: {exc}")
    max_video_pixels = None if args.max_video_pixels.lower() == "none" else int(args.max_video_pixels)
    config = {"max_memory": max_memory, "max_video_pixels": max_video_pixels, "strict": args.strict,
              "stats_file": str(stats_file)}
    env = {**os.environ, WORKER_ENV: json.dumps(config), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    stats = {"executions": 0, "cov": 0, "ft": 0, "corpus": 0, "exec_per_s": 0, "peak_rss_mb": 0}
    result, artifact, started = "ok", None, time.time()
    with open(work / "fuzz.log", "w") as log, subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1
    ) as proc:
        try:
            for line in proc.stdout:
                sys.stderr.write(line)
                log.write(line)
                m = STATUS.match(line)
                if m:
                    stats["executions"], stats["cov"], stats["ft"] = int(m[1]), int(m[2]), int(m[3])
                    for key, pattern in (("corpus", r" corp: (\d+)/"), ("exec_per_s", r" exec/s: (\d+)"),
                                         ("peak_rss_mb", r" rss: (\d+)Mb")):
                        found = re.search(pattern, line)
                        if found:
                            stats[key] = int(found[1])
                for key, pattern in (("executions", r"stat::number_of_executed_units:\s+(\d+)"),
                                     ("exec_per_s", r"stat::average_exec_per_sec:\s+(\d+)"),
                                     ("peak_rss_mb", r"stat::peak_rss_mb:\s+(\d+)"),
                                     ("new_units", r"stat::new_units_added:\s+(\d+)")):
                    m = re.search(pattern, line)
                    if m:
                        stats[key] = int(m[1])
                for name, pattern in FINDINGS:
                    if result == "ok" and pattern.search(line):
                        result = name
                        break
                m = re.search(r"^Done (\d+) runs in (\d+) second", line)
                if m:
                    stats["loop_seconds"] = int(m[2])
                m = re.search(r"Test unit written to (\S+)", line)
                if m:
                    artifact = m[1]
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            result = "interrupted"
        rc = proc.wait()
    if not stats["exec_per_s"] and stats.get("loop_seconds"):
        stats["exec_per_s"] = stats["executions"] // stats["loop_seconds"]
    if result == "ok" and rc != 0:
        result = f"exit-{rc}"
    stats.update(seconds=round(time.time() - started, 1), result=result, artifact=artifact,
                 max_memory=args.max_memory, max_video_pixels=max_video_pixels, strict=args.strict)
    if stats_file.is_file():  # outcome counts, sampled every 5000 executions
        stats["outcomes"] = json.loads(stats_file.read_text())
    (work / "summary.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(f"fuzz: executions={stats['executions']} exec/s={stats['exec_per_s']} cov={stats['cov']} "
          f"ft={stats['ft']} corpus={stats['corpus']} seconds={stats['seconds']} "
          f"peak_rss_mb={stats['peak_rss_mb']} result={result}" + (f" artifact={artifact}" if artifact else ""))
    if "outcomes" in stats:
        print("fuzz: outcomes " + " ".join(f"{k}={v}" for k, v in sorted(stats["outcomes"].items())))
    return 0 if result == "ok" else 1

if __name__ == "__main__":
    if os.environ.get(WORKER_ENV):
        worker()
    else:
        sys.exit(main())
