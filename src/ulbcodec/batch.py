"""Batch jobs: map inputs to outputs, run them with one model load per worker, keep going
past failures, and report one record per file.

Used by the ``encode`` and ``decode`` commands. With ``jobs=1`` everything runs in this
process; with ``jobs>1`` a process pool is used, each worker loading the model once in
its initializer and running torch with one thread (the pool is the parallelism).
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence


class UsageError(ValueError):
    """The command line asks for something impossible (exit code 2)."""


@dataclass(frozen=True)
class Task:
    src: Path
    dst: Path


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
    mirrored. Files in a folder are selected by extension; files named explicitly are
    always taken (a bad one then fails clearly rather than being skipped silently).
    """
    if output and out_dir:
        raise UsageError("use either -o/--output or --out-dir, not both")
    single = len(inputs) == 1 and not Path(inputs[0]).is_dir()
    if not single and output:
        raise UsageError("several inputs or a folder need --out-dir instead of -o")
    if not output and not out_dir:
        raise UsageError("missing output: give -o OUTPUT (one input) or --out-dir DIR")
    tasks: List[Task] = []
    for raw in inputs:
        src = Path(raw)
        if src.is_dir():
            for f in _collect(src, in_extensions, recursive):
                rel = f.relative_to(src).with_suffix(out_suffix)
                tasks.append(Task(f, Path(out_dir) / rel))
        elif output:
            tasks.append(Task(src, Path(output)))
        else:
            tasks.append(Task(src, Path(out_dir) / (src.stem + out_suffix)))
    seen = {}
    for t in tasks:
        if t.dst in seen:
            raise UsageError(f"{seen[t.dst]} and {t.src} would both be written to {t.dst}")
        seen[t.dst] = t.src
    return tasks


# ------------------------------------------------------------------ execution

_worker_state: dict = {}


def _init_worker(factory: Callable[[], object]) -> None:
    import torch

    torch.set_num_threads(1)
    _worker_state["codec"] = factory()


def run(
    tasks: Sequence[Task],
    factory: Callable[[], object],
    job: Callable[[object, Task], dict],
    jobs: int = 1,
) -> Iterator[dict]:
    """Yield one record per task, in completion order for jobs>1.

    ``job(codec, task)`` returns a record dict and must raise only for real failures;
    a failure becomes ``{"input", "output", "ok": False, "error": "..."}`` and the batch
    goes on. ``factory`` builds the codec (model loaded once per process).
    """
    if jobs <= 1 or len(tasks) <= 1:
        codec = factory()
        for task in tasks:
            yield _guarded(job, codec, task)
        return
    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), initializer=_init_worker,
                             initargs=(factory,)) as pool:
        futures = [pool.submit(_guarded_in_worker, job, task) for task in tasks]
        for future in as_completed(futures):
            yield future.result()


def _guarded_in_worker(job, task: Task) -> dict:
    return _guarded(job, _worker_state["codec"], task)


def _guarded(job, codec, task: Task) -> dict:
    t0 = time.perf_counter()
    base = {"input": str(task.src), "output": str(task.dst)}
    try:
        record = job(codec, task)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear record line
        return {**base, "ok": False, "error": describe_error(exc, task.src)}
    return {**base, "ok": True, **record, "seconds": round(time.perf_counter() - t0, 3)}


def describe_error(exc: BaseException, src: Path) -> str:
    """One line; prefixed with the input path unless the message already names it."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    if isinstance(exc, OSError) and exc.strerror and not str(src) in text:
        text = exc.strerror + (f" ({exc.filename})" if exc.filename and exc.filename != str(src) else "")
    elif not isinstance(exc, (ValueError, OSError)):
        text = f"internal error ({exc.__class__.__name__}: {text}); please report it"
    return text if str(src) in text else f"{src}: {text}"
