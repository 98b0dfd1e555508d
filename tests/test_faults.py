"""Faults and resource bounds: --skip-existing, --max-memory, unwritable and full
outputs, unreadable and changing inputs, SIGTERM during a batch, concurrent runs, a
worker that dies. Every failure must be one ``ulbc: error:`` line, never a traceback,
and must leave no partial or temporary file and every other file intact.

docs/robustness.md ("Faults and resource bounds") lists what each test shows.
"""

from __future__ import annotations

import builtins
import errno
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ulbcodec import batch, bitstream, io as uio, resources
from ulbcodec.cli import cli
from ulbcodec.task import Task, guard

from test_cli import ulbc

def _permissions_bypassed() -> bool:
    """True for root (CAP_DAC_OVERRIDE): chmod does not stop it from reading or writing."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder) / "ro"
        probe.mkdir(mode=0o500)
        try:
            (probe / "x").write_bytes(b"")
        except PermissionError:
            return False
        finally:
            probe.chmod(0o700)
        return True


PERMISSIONS_BYPASSED = _permissions_bypassed()


# ------------------------------------------------------------------ helpers


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run(args, env=None):
    """In-process through click's runner; an exception that escapes is a test failure
    (a traceback in real life)."""
    r = CliRunner().invoke(cli, [str(a) for a in args], env=env)
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return Result(r.exit_code, r.stdout, r.stderr)


def error_lines(stderr: str):
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("ulbc: error:")]


def assert_one_error(r, *fragments, code=1):
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def temp_files(folder: Path):
    return sorted(p.name for p in Path(folder).rglob(".*.part"))


def snapshot(folder: Path) -> dict:
    files = (p for p in Path(folder).rglob("*") if p.is_file())
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


@pytest.fixture()
def images(tmp_path, photo):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        Image.fromarray(photo[40 * i: 40 * i + 64, 30 * i: 30 * i + 96]).save(src / f"im{i}.png")
    return src


@pytest.fixture()
def coded(tiny_model, images, tmp_path):
    """The images encoded with the tiny model, in tmp_path/coded."""
    out = tmp_path / "coded"
    r = run(["encode", images, "--out-dir", out, "--model", "tiny"])
    assert r.returncode == 0, r.stderr
    return out


# ------------------------------------------------------------------ --skip-existing


def test_skip_existing_finishes_an_interrupted_batch(tiny_model, images, coded, tmp_path):
    (coded / "im2.ulb").unlink()  # what a killed run would leave: complete files, one missing
    before = snapshot(coded)
    r = run(["encode", images, "--out-dir", coded, "--model", "tiny", "--skip-existing", "--json"])
    assert r.returncode == 0, r.stderr
    records = {Path(rec["input"]).name: rec for rec in map(json.loads, r.stdout.splitlines())}
    assert len(records) == 4 and all(rec["ok"] for rec in records.values())
    assert [n for n, rec in sorted(records.items()) if rec.get("skipped")] == ["im0.png", "im1.png", "im3.png"]
    assert records["im0.png"]["reason"] == "output exists"
    assert records["im2.png"]["bytes"] == (coded / "im2.ulb").stat().st_size
    assert snapshot(coded).items() >= before.items()  # the existing files were not touched
    # the summary says so, and decode has the same option
    r = run(["encode", images, "--out-dir", coded, "--model", "tiny", "--skip-existing"])
    assert r.returncode == 0 and "encoded 0/4 files" in r.stderr and "4 skipped" in r.stderr
    dec = tmp_path / "dec"
    assert run(["decode", coded / "im1.ulb", "-o", dec / "im1.png"]).returncode == 0
    r = run(["decode", coded, "--out-dir", dec, "--skip-existing", "--json"])
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert sum(bool(rec.get("skipped")) for rec in records) == 1 and len(list(dec.glob("*.png"))) == 4


def test_skip_existing_is_not_combinable_with_force(tiny_model, images, coded, tmp_path):
    for args in (["encode", images, "--out-dir", coded], ["decode", coded, "--out-dir", tmp_path / "dec"]):
        r = run(args + ["--skip-existing", "--force"])
        assert r.returncode == 2 and "--force or --skip-existing" in r.stderr
    assert not (tmp_path / "dec").exists()


def test_skip_existing_when_the_output_appears_during_the_job(tiny_model, images, tmp_path):
    """Another run finished the file while this one was coding it: a skip, not a failure;
    and without --skip-existing, an error that keeps the other run's file."""
    from ulbcodec.jobs import encode_job, load_encoders

    codec = load_encoders(True, False, "tiny", "cpu")
    dst = tmp_path / "a.ulb"
    real_read = uio.read_image

    def read_then_race(path):
        out = real_read(path)
        dst.write_bytes(b"the other run's file")
        return out

    task = Task(images / "im0.png", dst)
    for skip, expect_ok in ((True, True), (False, False)):
        dst.unlink(missing_ok=True)
        job = functools.partial(encode_job, quality=None, bpp=None, downscale=1, force=False, skip_existing=skip)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(uio, "read_image", read_then_race)
            record = guard(job, codec, task)
        assert record["ok"] is expect_ok and record.get("skipped", False) is skip, record
        if not skip:
            assert "already exists" in record["error"]
        assert dst.read_bytes() == b"the other run's file" and temp_files(tmp_path) == []


def test_no_clobber_is_atomic(tmp_path):
    """Without force, a file created between the check and the rename is never replaced
    (the output is linked into place, which fails if the name exists)."""
    dst = tmp_path / "x.bin"

    def write(tmp):
        Path(tmp).write_bytes(b"mine")
        dst.write_bytes(b"theirs")  # appears after check_output, before the rename

    with pytest.raises(uio.OutputExistsError):
        uio.atomic_write(dst, write)
    assert dst.read_bytes() == b"theirs" and temp_files(tmp_path) == []
    uio.write_bytes(dst, b"forced", force=True)
    assert dst.read_bytes() == b"forced"


def test_outputs_get_the_usual_file_mode(tiny_model, coded):
    """Temporary files are created 0600; the renamed output gets 0666 less the umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    for path in coded.glob("*.ulb"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# ------------------------------------------------------------------ --max-memory


def test_memory_model_matches_the_benchmark_figures():
    """resources.py is calibrated on benchmarks/speed.py's peaks (RSS in MiB, models/default
    of 19437668 bytes of weights, models/generative of 33992842); the estimates must stay
    within 2 % of those figures."""
    weights = 19437668
    measured = {("encode", 768, 480): 636, ("encode", 4000, 3000): 1599,
                ("decode", 768, 480): 673, ("decode", 4000, 3000): 1921}
    for (verb, w, h), mib in measured.items():
        estimate = getattr(resources, f"estimate_{verb}")(w, h, weights=weights)
        assert estimate / resources.MiB == pytest.approx(mib, rel=0.02), (verb, w, h)
    anchor = resources.estimate_decode(4000, 3000, weights=weights)
    generative_weights = 33992842
    for (w, h), mib in {(768, 480): 779, (4000, 3000): 2127}.items():
        estimate = resources.estimate_decode(w, h, generative=True, weights=generative_weights)
        assert estimate / resources.MiB == pytest.approx(mib, rel=0.02), (w, h)
    assert resources.estimate_decode(768, 480, generative=True, weights=weights) > \
        resources.estimate_decode(768, 480, weights=weights)
    assert resources.estimate_decode(4000, 3000, downscale=4, weights=weights) < anchor / 2
    assert resources.padded_pixels(1, 1) == 64 * 64 and resources.padded_pixels(4000, 3000, 2) == 2048 * 1536
    # huge weights dominate small images: loading holds them twice
    assert resources.estimate_decode(64, 64, weights=8 * resources.GiB) >= 16 * resources.GiB


KEEP_FREED_PROBE = """
import ctypes, sys
from ulbcodec import resources
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
tuned = resources.keep_freed_memory() if sys.argv[1] == "tuned" else None
block = bytearray(64 << 20)  # a tile's activations
mapped = libc.mallinfo2().hblkhd
del block
print(tuned, mapped, libc.mallinfo2().fordblks)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_memory_serves_large_blocks_from_the_heap():
    """Without it, glibc maps a 64 MiB block on its own and unmaps it on free (the next
    tile faults in fresh pages); with it the block comes from the heap and stays there."""
    def probe(mode):
        out = subprocess.run([sys.executable, "-c", KEEP_FREED_PROBE, mode], capture_output=True, text=True, check=True)
        return out.stdout.split()

    tuned, mapped, free = probe("tuned")
    assert tuned == "True" and int(mapped) < (1 << 20) and int(free) >= (64 << 20)
    _, mapped, _ = probe("plain")
    assert int(mapped) >= (64 << 20)


def test_commands_make_openmp_wait_passively_unless_told():
    """Before torch loads, the command sets OMP_WAIT_POLICY=PASSIVE (issue 28: spinning
    waits on a busy 2-core CPU made stages 8-45x slower); a policy in the environment wins,
    and after torch is imported it is too late to change anything."""
    probe = ("import os, sys; from ulbcodec import resources; first = resources.passive_openmp_waits(); "
             "import torch; print(first, os.environ.get('OMP_WAIT_POLICY'), resources.passive_openmp_waits())")
    env = {k: v for k, v in os.environ.items() if k not in resources.OPENMP_WAIT_ENV}

    def run(**extra):
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                              env={**env, **extra}).stdout.split()

    assert run() == ["True", "PASSIVE", "False"]
    assert run(OMP_WAIT_POLICY="ACTIVE") == ["False", "ACTIVE", "False"]


@pytest.mark.parametrize("text, value", [("2G", 2 << 30), ("500M", 500 << 20), ("1.5GiB", 3 << 29), ("64kb", 65536),
                                         ("123456", 123456), (" 2 g ", 2 << 30), ("none", None), ("Unlimited", None)])
def test_parse_size(text, value):
    assert resources.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "2X", "-1G", "0", "G", "1e9"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        resources.parse_size(text)


def test_max_memory_refuses_before_decoding(tiny_model, coded, tmp_path, monkeypatch):
    from ulbcodec.image import ImageCodec

    def never(*a, **k):
        raise AssertionError("decoded although over the limit")

    with monkeypatch.context() as mp:
        mp.setattr(ImageCodec, "decode_container", never)
        r = run(["decode", coded / "im0.ulb", "-o", tmp_path / "a.png", "--max-memory", "300M"])
    assert_one_error(r, "im0.ulb", "decoding 96x64 needs an estimated", "--max-memory limit of 300 MiB")
    assert not (tmp_path / "a.png").exists() and temp_files(tmp_path) == []
    assert run(["decode", coded / "im0.ulb", "-o", tmp_path / "a.png", "--max-memory", "2G"]).returncode == 0
    assert run(["decode", coded / "im0.ulb", "-o", tmp_path / "b.png", "--max-memory", "2X"]).returncode == 2


def test_max_memory_counts_the_generative_decoder(tiny_model, images, tmp_path):
    """A generative package needs more than its anchor path: 700 MiB is enough for
    --anchor-only, not for the next-frame decoder (its tile's working set)."""
    ulb = tmp_path / "g.ulb"
    assert run(["encode", images / "im0.png", "-o", ulb, "--model", "tinygen"]).returncode == 0
    r = run(["decode", ulb, "-o", tmp_path / "g.png", "--max-memory", "700M"])
    assert_one_error(r, "decoding 96x64 needs an estimated 7")
    assert not (tmp_path / "g.png").exists()
    r = run(["decode", ulb, "-o", tmp_path / "g.png", "--max-memory", "700M", "--anchor-only"])
    assert r.returncode == 0, r.stderr


def test_max_memory_encode_uses_the_header_only(tiny_model, images, tmp_path, monkeypatch):
    def never(path):
        raise AssertionError("pixels decoded although over the limit")

    with monkeypatch.context() as mp:
        mp.setattr(uio, "read_image", never)
        r = run(["encode", images / "im0.png", "-o", tmp_path / "a.ulb", "--model", "tiny", "--max-memory", "256M"])
    assert_one_error(r, "encoding 96x64 needs an estimated")
    assert not (tmp_path / "a.ulb").exists()
    r = run(["encode", images / "im0.png", "-o", tmp_path / "a.ulb", "--model", "tiny", "--max-memory", "4G"])
    assert r.returncode == 0, r.stderr


def test_max_memory_environment_override(tiny_model, coded, tmp_path):
    env = {"ULBC_MAX_MEMORY": "256M"}
    r = run(["decode", coded / "im0.ulb", "-o", tmp_path / "a.png"], env=env)
    assert_one_error(r, "ULBC_MAX_MEMORY limit of 256 MiB")
    assert run(["decode", coded / "im0.ulb", "-o", tmp_path / "a.png", "--max-memory", "none"], env=env).returncode == 0
    r = run(["decode", coded / "im0.ulb", "-o", tmp_path / "b.png"], env={"ULBC_MAX_MEMORY": "lots"})
    assert r.returncode == 2 and "ULBC_MAX_MEMORY" in r.stderr


def test_default_memory_limit_is_a_fraction_of_the_machine(tiny_model, coded, tmp_path, monkeypatch):
    """Without --max-memory or $ULBC_MAX_MEMORY the limit is 3/4 of the physical memory:
    a file the machine cannot hold is refused with one line saying how to lift it."""
    limit = resources.default_limit()
    assert limit is not None and 0.5 * limit < os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") < 1.5 * limit
    monkeypatch.delenv(resources.ENV_VAR, raising=False)
    monkeypatch.setattr(resources, "default_limit", lambda: 300 * resources.MiB)  # a small machine
    runner = CliRunner()
    r = runner.invoke(cli, ["decode", str(coded / "im0.ulb"), "-o", str(tmp_path / "a.png")])
    assert r.exit_code == 1 and not (tmp_path / "a.png").exists()
    assert "needs an estimated" in r.output and "over the default limit of 300 MiB" in r.output, r.output
    assert "--max-memory SIZE or none" in r.output
    r = runner.invoke(cli, ["decode", str(coded / "im0.ulb"), "-o", str(tmp_path / "a.png"), "--max-memory", "none"])
    assert r.exit_code == 0 and (tmp_path / "a.png").is_file(), r.output


def test_max_memory_is_shared_by_the_jobs(tiny_model, images, tmp_path):
    """With --jobs N the limit covers the whole command (issue 26): the main process and
    each worker keep a runtime base, the files running at once share the rest. A file over
    an equal share per worker but within what is left while the other worker idles runs
    (the batch runs fewer files at a time); a file over that is refused in one line."""
    from ulbcodec.packages import ModelPackage

    weights = resources.weights_bytes(ModelPackage.load_manifest(tiny_model), ["anchor_codec"])
    one = resources.estimate_encode(96, 64, weights=weights)
    base = resources.ENCODE_BASE_BYTES
    extra = one - base
    total = 3 * base + extra + extra // 2  # three runtimes and room for one file at a time
    budget = resources.Budget.shared(total, 2, "encode", pooled=True)
    assert (total - base) // 2 < one <= budget.limit  # an equal share each would refuse every file
    r = run(["encode", images, "--out-dir", tmp_path / "two", "--model", "tiny", "--jobs", "2",
             "--max-memory", str(total)])
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [f"im{i}.ulb" for i in range(4)]

    r = run(["encode", images, "--out-dir", tmp_path / "none", "--model", "tiny", "--jobs", "2",
             "--max-memory", str(3 * base + extra // 2)])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len([ln for ln in lines if ln.startswith("ulbc: error:")]) == 4, r.stderr
    assert "one file can use under --max-memory" in lines[0] and "with --jobs 2" in lines[0]
    assert "fewer --jobs leave more" in lines[0]

    share = resources.Budget.shared(total, 2, "encode")  # Ray actors: an equal part each
    with pytest.raises(resources.MemoryLimitError, match="per job left by --max-memory .* with --jobs 2"):
        share.check(one, "encoding 96x64")


def test_memory_pool_runs_a_file_when_its_share_is_free():
    """The pool a local batch's workers share: a file waits (holding nothing) until its
    share fits what the running files leave, and a budget check in a worker takes it."""
    import multiprocessing
    import threading

    pool = resources.MemoryPool(10, multiprocessing.get_context())
    pool.reserve(6)
    waiter = threading.Thread(target=pool.reserve, args=(6,))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and pool.free == 4  # 6 + 6 > 10: the second file waits
    pool.release(6)
    waiter.join(60)
    assert not waiter.is_alive() and pool.free == 4

    budget = resources.Budget.shared(100 * resources.GiB, 2, "decode", pooled=True)
    resources.install_pool(resources.MemoryPool(budget.limit - budget.base, multiprocessing.get_context()))
    try:
        budget.check(budget.base + resources.GiB, "decoding 4000x3000")
        assert resources._POOL["pool"].free == budget.limit - budget.base - resources.GiB
        resources.release_reservation()
        assert resources._POOL["pool"].free == budget.limit - budget.base
    finally:
        resources.install_pool(None)


# ------------------------------------------------------------------ unwritable / full outputs


@pytest.mark.skipif(PERMISSIONS_BYPASSED, reason="running as root (CAP_DAC_OVERRIDE): a 0o500 folder does not "
                    "stop writes; test_output_under_a_regular_file covers an unwritable destination as root")
def test_unwritable_output_folder(tiny_model, images, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    out.chmod(0o500)
    try:
        r = run(["encode", images / "im0.png", "-o", out / "a.ulb", "--model", "tiny"])
        assert_one_error(r, "not writable")
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    finally:
        out.chmod(0o700)


def test_output_under_a_regular_file(tiny_model, images, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep")
    r = run(["encode", images / "im0.png", "-o", blocker / "a.ulb", "--model", "tiny"])
    assert_one_error(r, "blocker: not a folder")
    r = run(["encode", images / "im0.png", "-o", blocker / "sub" / "a.ulb", "--model", "tiny"])
    assert_one_error(r, "cannot create folder", "Not a directory")
    r = run(["encode", images, "--out-dir", blocker, "--model", "tiny"])  # --out-dir must be a folder
    assert r.returncode == 2 and "is a file" in r.stderr
    assert blocker.read_text() == "keep" and temp_files(tmp_path) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_device_output_is_never_replaced(tiny_model, images):
    """--force onto /dev/full (or /dev/null...) must not replace the device node by a file."""
    r = run(["encode", images / "im0.png", "-o", "/dev/full", "--model", "tiny", "--force"])
    assert_one_error(r, "/dev/full: not a regular file")
    assert not Path("/dev/full").is_file()


def _disk_full_open(real_open):
    """builtins.open whose files under a temporary output name fail like a full disk."""

    class FullFile:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and str(file).endswith(".part") and "w" in mode:
            return FullFile(f)
        return f

    return fake_open


@pytest.mark.parametrize("verb", ["encode", "decode"])
def test_full_disk(tiny_model, images, coded, tmp_path, monkeypatch, verb):
    """ENOSPC while writing: one line, the previous output (with --force) kept whole,
    no temporary file, other files intact."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "other.txt").write_text("other")
    if verb == "encode":
        args, dst = ["encode", images / "im0.png", "-o", out / "a.ulb", "--model", "tiny"], out / "a.ulb"
    else:
        args, dst = ["decode", coded / "im0.ulb", "-o", out / "a.png"], out / "a.png"
    dst.write_bytes(b"previous version")
    monkeypatch.setattr(builtins, "open", _disk_full_open(builtins.open))
    r = run(args + ["--force"])
    monkeypatch.undo()
    assert_one_error(r, str(dst), "No space left on device")
    assert dst.read_bytes() == b"previous version"
    assert (out / "other.txt").read_text() == "other" and temp_files(tmp_path) == []


def test_file_size_limit_in_a_real_process(tiny_model, coded, tmp_path):
    """The kernel refuses the write (RLIMIT_FSIZE: EFBIG, as a quota or full disk would):
    the real command prints one line and leaves nothing behind."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    out = tmp_path / "out"
    out.mkdir()
    exe = [sys.executable, "-m", "ulbcodec"]
    r = subprocess.run(exe + ["decode", str(coded / "im0.ulb"), "-o", str(out / "a.png")], capture_output=True,
                       text=True, preexec_fn=limit, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert_one_error(r, "a.png: cannot write (File too large)")
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------ unreadable / changing inputs


def test_directory_given_as_an_input_file(tiny_model, images, coded, tmp_path):
    # one folder with -o is a sequence of frames (a video): an image model cannot code it
    r = run(["encode", images, "-o", tmp_path / "x.ulb", "--model", "tiny"])
    assert r.returncode == 1 and "not a video model" in r.stderr and not (tmp_path / "x.ulb").exists()
    # several inputs with -o: --out-dir is needed (usage error)
    r = run(["encode", images, images, "-o", tmp_path / "x.ulb", "--model", "tiny"])
    assert r.returncode == 2 and "need --out-dir" in r.stderr
    # a folder named like an input inside a batch is not an input; a named one that is a
    # folder by the time the job runs is one clear failure
    (images / "folder.png").mkdir()
    r = run(["encode", images, "--out-dir", tmp_path / "o", "--model", "tiny"])
    assert r.returncode == 0 and sorted(p.name for p in (tmp_path / "o").iterdir()) == [f"im{i}.ulb" for i in range(4)]
    for check in (uio.check_input, uio.read_image, bitstream.read_file):
        with pytest.raises((uio.InputError, OSError), match="[Ii]s a directory"):
            check(images / "folder.png")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_device_input_is_refused(tiny_model, tmp_path):
    """/dev/zero as a .ulb would be read forever; a FIFO would block: only regular files."""
    r = run(["decode", "/dev/zero", "-o", tmp_path / "z.png"])
    assert_one_error(r, "/dev/zero: not a regular file")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    r = run(["encode", fifo, "-o", tmp_path / "p.ulb", "--model", "tiny"])
    assert_one_error(r, "not a regular file")


def _deny(monkeypatch, path: Path):
    """Mode 000, or (as root, who reads anything) open() of that file failing with EACCES."""
    if not PERMISSIONS_BYPASSED:
        path.chmod(0)
        return
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) == str(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)


@pytest.mark.parametrize("verb", ["encode", "decode"])
def test_unreadable_input(tiny_model, images, coded, tmp_path, monkeypatch, verb):
    src = images / "im1.png" if verb == "encode" else coded / "im1.ulb"
    folder = src.parent
    out = tmp_path / f"{verb}-out"
    _deny(monkeypatch, src)
    try:
        extra = ["--model", "tiny"] if verb == "encode" else []
        r = run([verb, folder, "--out-dir", out, *extra])
    finally:
        monkeypatch.undo()
        src.chmod(0o644)
    line = assert_one_error(r, str(src), "permission denied")
    assert line.count("im1") == 1  # the path once, not repeated by the OSError
    assert "3/4 files" in r.stderr and len(list(out.iterdir())) == 3 and temp_files(out) == []


def test_truncated_ulb_and_truncated_between_stat_and_read(tiny_model, coded, tmp_path, monkeypatch):
    good = coded / "im0.ulb"
    data = good.read_bytes()
    short = tmp_path / "short.ulb"
    short.write_bytes(data[: len(data) - 5])
    assert_one_error(run(["decode", short, "-o", tmp_path / "s.png"]), "short.ulb", "truncated")
    # the file shrinks after read_file looked at its size and before it reads it
    real_getsize = os.path.getsize

    def getsize_then_truncate(path):
        size = real_getsize(path)
        if str(path).endswith("victim.ulb"):
            with open(path, "r+b") as f:
                f.truncate(size // 2)
        return size

    victim = tmp_path / "victim.ulb"
    victim.write_bytes(data)
    monkeypatch.setattr(bitstream.os.path, "getsize", getsize_then_truncate)
    r = run(["decode", victim, "-o", tmp_path / "v.png"])
    monkeypatch.undo()
    assert_one_error(r, "victim.ulb", "truncated")
    assert not (tmp_path / "v.png").exists() and not (tmp_path / "s.png").exists() and temp_files(tmp_path) == []


def test_image_truncated_between_header_and_pixels(tiny_model, images, tmp_path, monkeypatch):
    """With --max-memory the header is read first; the file is cut before the pixels are."""
    victim = images / "im3.png"
    real_size = uio.image_size

    def size_then_truncate(path):
        size = real_size(path)
        if Path(path) == victim:
            with open(path, "r+b") as f:
                f.truncate(victim.stat().st_size // 2)
        return size

    monkeypatch.setattr(uio, "image_size", size_then_truncate)
    r = run(["encode", images, "--out-dir", tmp_path / "o", "--model", "tiny", "--max-memory", "8G"])
    monkeypatch.undo()
    assert_one_error(r, "im3.png", "corrupt or truncated image")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["im0.ulb", "im1.ulb", "im2.ulb"]


# ------------------------------------------------------------------ signals, concurrency, dead workers


_SECOND_SIGNAL_IN_CLEANUP = """
import os, signal, sys, time
from ulbcodec.batch import interrupt_once
signal.signal(signal.SIGTERM, interrupt_once)
try:
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # a second one while cleaning up
        time.sleep(0.2)
        open(sys.argv[1], "w").write("cleaned up")
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_a_second_sigterm_does_not_cut_the_cleanup_short(tmp_path):
    """A SIGTERM to a process group reaches a worker twice (from the scheduler, then from
    the main process stopping its workers); the second must not interrupt the unwinding
    that removes temporary files."""
    marker = tmp_path / "marker"
    r = subprocess.run([sys.executable, "-c", _SECOND_SIGNAL_IN_CLEANUP, str(marker)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 130, r.stderr
    assert marker.read_text() == "cleaned up"


def _group_alive(pgid: int) -> list:
    """Live (non-zombie) processes of a process group, from /proc."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def _wait_group_gone(pgid: int, seconds: float) -> list:
    """Poll until no process of the group is alive or ``seconds`` pass; what is left."""
    deadline = time.monotonic() + seconds
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _group_alive(pgid)


def _batch_at_first_output(images: Path, out: Path, jobs: int, seconds: float) -> subprocess.Popen:
    """`ulbc encode images --out-dir out --jobs N` in a session of its own, returned once
    its first output exists (or it ended, or ``seconds`` passed): a batch to interrupt."""
    p = subprocess.Popen([sys.executable, "-m", "ulbcodec", "encode", str(images), "--out-dir", str(out),
                          "--model", "tiny", "--jobs", str(jobs)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    deadline = time.monotonic() + seconds
    while not list(out.glob("*.ulb")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return p


@pytest.fixture()
def many_images(tmp_path, photo):
    src = tmp_path / "many"
    src.mkdir()
    for i in range(24):
        Image.fromarray(np.ascontiguousarray(np.roll(photo, 7 * i, axis=1)[:320, :480])).save(src / f"p{i:02d}.png")
    return src


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("jobs, target", [(1, "main"), (2, "main"), (2, "group")])
def test_sigterm_during_a_batch_leaves_no_partial_file(tiny_model, many_images, tmp_path, jobs, target):
    """The real command, SIGTERM once the first output exists (to the main process, as
    `kill PID` does, or to the whole group, as a scheduler does): exit 130, one line, no
    temporary file, every output complete, no worker left running."""
    out = tmp_path / "out"
    p = _batch_at_first_output(many_images, out, jobs, 120)
    try:
        assert p.poll() is None, "the batch finished before it could be interrupted"
        (os.killpg if target == "group" else os.kill)(p.pid, signal.SIGTERM)
        _, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr.splitlines()[-1]
    assert _wait_group_gone(p.pid, 20) == []
    assert temp_files(out) == []
    written = sorted(out.glob("*.ulb"))
    assert 1 <= len(written) < 24
    for path in written:
        bitstream.read_file(path)  # complete: parses, CRCs match


@pytest.mark.parametrize("mode", ["--force", "--skip-existing"])
def test_two_concurrent_batches_into_one_folder(tiny_model, tiny_codec, many_images, tmp_path, mode):
    out = tmp_path / "out"
    exe = [sys.executable, "-m", "ulbcodec"]
    cmd = exe + ["encode", str(many_images), "--out-dir", str(out), "--model", "tiny", mode]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr
        assert error_lines(stderr) == []
    assert temp_files(out) == [] and sorted(p.name for p in out.iterdir()) == [f"p{i:02d}.ulb" for i in range(24)]
    for path in out.iterdir():
        rgb = tiny_codec.decode(path.read_bytes())
        assert rgb.shape == (320, 480, 3)


def _factory_none():
    return None


def _job_dies_on_b(codec, task):
    if task.src.name == "b":
        os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does
    time.sleep(0.2)
    return {"width": 1, "height": 1}


def test_a_worker_that_dies_fails_its_files_cleanly(tmp_path):
    tasks = [Task(tmp_path / n, tmp_path / f"{n}.out") for n in ("a", "b", "c", "d")]
    records = list(batch.run(tasks, _factory_none, _job_dies_on_b, jobs=2))
    assert sorted(r["input"] for r in records) == sorted(str(t.src) for t in tasks)
    dead = {Path(r["input"]).name: r for r in records if not r["ok"]}
    assert "b" in dead and "worker process died" in dead["b"]["error"] and "--skip-existing" in dead["b"]["error"]
