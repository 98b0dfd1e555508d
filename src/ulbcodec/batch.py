"""Batch jobs: map inputs to outputs, run them with one model load per worker, keep going
past failures, and report one record per file.

Used by the ``encode`` and ``decode`` commands. With ``jobs=1`` everything runs in this
process; with ``jobs>1`` a process pool is used, each worker loading the model once in
its initializer and running torch with one thread (the pool is the parallelism); with
``engine="ray"`` the same jobs run on Ray actors (:mod:`ulbcodec.ray_batch`).

Interruption: a KeyboardInterrupt (Ctrl-C, or SIGTERM, which the CLI turns into one) in
the main process cancels the files not started and sends SIGTERM to the workers; a
worker in the middle of a file unwinds (its temporary output is removed) and exits, an
idle one exits at once. A worker that dies (killed by the out-of-memory killer, say)
fails the files it left unfinished with one clear line each instead of a traceback.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence

from ulbcodec.task import Task, display_path, guard, skipped_record

EXIT_INTERRUPTED = 130
# Seconds a worker gets to remove its temporary file after SIGTERM before SIGKILL.
WORKER_STOP_GRACE_S = 10.0


class UsageError(ValueError):
    """The command line asks for something impossible (exit code 2)."""


def _collect(folder: Path, extensions: Iterable[str], recursive: bool) -> List[Path]:
    pattern = "**/*" if recursive else "*"
    exts = {e.lower() for e in extensions}
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in exts
                  and not p.name.startswith("."))


def plan(
    inputs: Sequence[str],
    output: Optional[str],
    out_dir: Optional[str],
    recursive: bool,
    in_extensions: Iterable[str],
    out_suffix: str,
) -> List[Task]:
    """Expand files and folders into (input, output) pairs.

    A single input file goes to ``-o OUTPUT`` (or next to ``--out-dir``); several inputs
    or any folder need ``--out-dir``, under which sub-folders of an input folder are
    mirrored. Without either, each input file's output goes beside it under the input's
    name with ``out_suffix`` (``photo.png`` -> ``photo.ulb``). No output may be an input. Files in a folder are selected by extension; files named explicitly are
    always taken (a bad one then fails clearly rather than being skipped silently).
    """
    if output and out_dir:
        raise UsageError("use either -o/--output or --out-dir, not both")
    single = len(inputs) == 1 and not Path(inputs[0]).is_dir()
    if not single and output:
        raise UsageError("several inputs or a folder need --out-dir instead of -o")
    if not output and not out_dir and any(Path(raw).is_dir() for raw in inputs):
        raise UsageError("a folder input needs --out-dir DIR")
    tasks: List[Task] = []
    for raw in inputs:
        src = Path(raw)
        if src.is_dir():
            for f in _collect(src, in_extensions, recursive):
                rel = f.relative_to(src).with_suffix(out_suffix)
                tasks.append(Task(f, Path(out_dir) / rel, planned=True))
        elif output:
            tasks.append(Task(src, Path(output)))
        elif out_dir:
            tasks.append(Task(src, Path(out_dir) / (src.stem + out_suffix), planned=True))
        else:  # no -o: beside the input, photo.png -> photo.ulb (never over an existing file without --force)
            tasks.append(Task(src, src.with_name(src.stem + out_suffix), planned=True))
    seen = {}
    for t in tasks:
        if t.dst in seen:
            raise UsageError(f"{display_path(seen[t.dst])} and {display_path(t.src)} would both be written to "
                             f"{display_path(t.dst)}")
        seen[t.dst] = t.src
    check_inputs_kept(tasks)
    return tasks


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # hard links and symbolic links too
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_inputs_kept(tasks: Sequence[Task]) -> None:
    """Refuse a plan that would write over one of its inputs (``-o`` naming the input,
    a link to it, or another input of the batch), whatever --force says."""
    inputs = {os.path.realpath(t.src): t.src for t in tasks}
    for t in tasks:
        other = inputs.get(os.path.realpath(t.dst))
        if other is not None or _same_file(t.src, t.dst):
            raise UsageError(f"{display_path(t.dst)} is an input ({display_path(other or t.src)}); refusing to write "
                             "over it, even with --force")


def shard(tasks: Sequence[Task], index: int, count: int) -> List[Task]:
    """The tasks of shard ``index`` of ``count`` (1-based), for job arrays (SLURM and the
    like): every job plans the same inputs and keeps the files whose source path hashes
    to its shard. A hash, not a position in the list, so that a file stays in its shard
    when others are added or removed, and the shards of one plan are disjoint and cover
    it (with --skip-existing a re-run of any shard finishes only its missing files)."""
    if not 1 <= index <= count:
        raise UsageError(f"shard {index}/{count}: need 1 <= I <= N")
    return [t for t in tasks if _shard_of(t.src, count) == index]


def _shard_of(src: Path, count: int) -> int:
    digest = hashlib.sha256(os.fsencode(src)).digest()
    return int.from_bytes(digest[:8], "big") % count + 1


# ------------------------------------------------------------------ execution

_worker_state: dict = {"busy": False}


def interrupt_once(signum, frame) -> None:
    """Signal handler: the first SIGTERM/SIGINT unwinds like Ctrl-C (so that temporary
    files are removed), and later ones are ignored. A second signal must not land inside
    that unwinding: a SIGTERM to the whole process group reaches a worker once from the
    scheduler and once more from the main process stopping its workers, and a second
    KeyboardInterrupt raised inside a ``finally`` skips the cleanup it was doing."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _worker_signal(signum, frame) -> None:
    # In a worker, SIGTERM/SIGINT unwind the current file like in the main process (so
    # that its temporary output is removed); between files there is nothing to clean up
    # and the worker leaves at once, without the traceback multiprocessing would print.
    if _worker_state["busy"]:
        interrupt_once(signum, frame)
    os._exit(EXIT_INTERRUPTED)


def die_with_parent(parent: int) -> None:
    """Have the kernel send this process SIGTERM when its parent dies (Linux
    PR_SET_PDEATHSIG), so that SIGKILL of the main process leaves no worker behind (the
    SIGTERM unwinds the file in progress: its temporary output is removed). Elsewhere, and
    as a backstop, a thread watches the parent id."""
    import sys
    import threading

    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    if os.getppid() != parent:  # died before the call
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="ulbc-parent-watch", daemon=True).start()


def _init_worker(factory: Callable[[], object], parent: Optional[int] = None, memory=None) -> None:
    from ulbcodec import resources

    resources.install_pool(memory)
    signal.signal(signal.SIGTERM, _worker_signal)
    signal.signal(signal.SIGINT, _worker_signal)
    if parent is not None:
        die_with_parent(parent)
    import torch

    torch.set_num_threads(1)
    _worker_state["codec"] = factory()


def run(
    tasks: Sequence[Task],
    factory: Callable[[], object],
    job: Callable[[object, Task], dict],
    jobs: int = 1,
    skip_existing: bool = False,
    engine: str = "local",
    budget=None,
) -> Iterator[dict]:
    """Yield one record per task, in completion order for jobs>1.

    ``job(codec, task)`` returns a record dict and must raise only for real failures;
    a failure becomes ``{"input", "output", "ok": False, "error": "..."}`` and the batch
    goes on. ``factory`` builds the codec (model loaded once per process). With
    ``skip_existing``, tasks whose output file exists are reported as skipped first and
    never reach a worker (a job may still raise :class:`Skipped` if the output appears
    while it runs). ``engine="ray"`` runs the jobs on ``jobs`` Ray actors instead of
    local processes (:mod:`ulbcodec.ray_batch`), with the same records. A pooled
    ``budget`` (:class:`ulbcodec.resources.Budget`, the one the jobs check) makes the local
    workers share one memory pool: a file starts only when its estimate fits what the
    running files leave, so large files run fewer at a time.
    """
    if skip_existing:
        todo = []
        for task in tasks:
            if task.dst.is_file():
                yield skipped_record(task)
            else:
                todo.append(task)
        tasks = todo
    if engine == "ray":
        from ulbcodec import ray_batch

        if tasks:
            yield from ray_batch.run(tasks, factory, job, jobs)
        return
    if jobs <= 1 or len(tasks) <= 1:
        codec = factory()
        for task in tasks:
            yield guard(job, codec, task)
        return
    import multiprocessing

    from ulbcodec.resources import MemoryPool

    ctx = multiprocessing.get_context()
    memory = None
    if budget is not None and budget.pooled:
        memory = MemoryPool(max(0, budget.limit - budget.base), ctx)
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=ctx, initializer=_init_worker,
                               initargs=(factory, os.getpid(), memory))
    futures = {}
    try:
        futures = {pool.submit(_guarded_in_worker, job, task): task for task in tasks}
        for future in as_completed(futures):
            try:
                record = future.result()
            except BrokenProcessPool:
                task = futures[future]
                record = {"input": str(task.src), "output": str(task.dst), "ok": False,
                          "error": f"{task.src}: a worker process died while this file was pending or "
                                   f"running (out of memory?); re-run with --skip-existing to finish the batch"}
            yield record
    except BaseException:  # KeyboardInterrupt, or the consumer stopped early (GeneratorExit)
        _stop_workers(pool, futures)
        raise
    pool.shutdown(wait=True)


def _stop_workers(pool: ProcessPoolExecutor, futures) -> None:
    # Futures are not cancelled one by one: once the workers are gone the pool fails every
    # pending one itself (and Python 3.11's pool thread raises InvalidStateError on a
    # future cancelled behind its back). ProcessPoolExecutor has no public way to stop
    # running work before Python 3.14.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        if process.is_alive():
            process.terminate()  # SIGTERM: the worker removes its temporary file and exits
    deadline = time.monotonic() + WORKER_STOP_GRACE_S
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(timeout=1.0)
    # Wait for the pool's manager thread, which sees its workers gone and ends: left
    # running, it races Python's exit hook for the pool (CPython 3.11 wakes it through a
    # pipe the thread may be closing), which now and then printed "Bad file descriptor"
    # with a traceback after the one-line "interrupted" message.
    pool.shutdown(wait=True, cancel_futures=True)


def _guarded_in_worker(job, task: Task) -> dict:
    _worker_state["busy"] = True
    try:
        return guard(job, _worker_state["codec"], task)
    except KeyboardInterrupt:
        os._exit(EXIT_INTERRUPTED)  # the job has unwound (temporary file removed); nothing else to do
    finally:
        _worker_state["busy"] = False
        from ulbcodec.resources import release_reservation

        release_reservation()  # the file's share of the memory pool, if it took one
