"""One task of a batch (an input and its output) and the record a job makes of it.

Shared by the two batch engines: local processes (:mod:`ulbcodec.batch`) and Ray actors
(:mod:`ulbcodec.ray_batch`). Every failure becomes a record with one error line, so a
batch goes on past it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


class Skipped(Exception):
    """Raised by a job that has nothing to do (its output exists and the user asked to
    skip existing outputs); becomes a record with ``"skipped": true``, not a failure."""


@dataclass(frozen=True)
class Task:
    src: Path
    dst: Path
    planned: bool = False  # dst derived under --out-dir (its suffix a default), not given with -o


def skipped_record(task: Task, reason: str = "output exists") -> dict:
    return {"input": str(task.src), "output": str(task.dst), "ok": True, "skipped": True, "reason": reason}


def guard(job, codec, task: Task) -> dict:
    """Run one job; every failure becomes a record (``ok: False`` and one error line)."""
    t0 = time.perf_counter()
    base = {"input": str(task.src), "output": str(task.dst)}
    try:
        record = job(codec, task)
    except KeyboardInterrupt:
        raise
    except Skipped as exc:
        return {**skipped_record(task, str(exc) or "output exists"), "seconds": round(time.perf_counter() - t0, 3)}
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear record line
        return {**base, "ok": False, "error": describe_error(exc, task.src)}
    return {**base, "ok": True, **record, "seconds": round(time.perf_counter() - t0, 3)}


def display_path(path) -> str:
    """A path on one line: control characters (a newline in a file name) escaped as in
    Python's repr, so that an error line never splits."""
    text = os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def describe_error(exc: BaseException, src: Path) -> str:
    """One line; prefixed with the input path unless the message already names it (the
    path shown with :func:`display_path`)."""
    shown, raw = display_path(src), str(exc).strip()
    raw = raw.replace(str(src), shown) if str(src) else raw
    text = raw.splitlines()[0] if raw else exc.__class__.__name__
    if isinstance(exc, OSError) and exc.strerror and shown not in text:
        filename = os.fsdecode(exc.filename) if isinstance(exc.filename, (str, bytes, os.PathLike)) else ""
        text = exc.strerror + (f" ({display_path(filename)})" if filename and filename != str(src) else "")
    elif not isinstance(exc, (ValueError, OSError)):
        text = f"internal error ({exc.__class__.__name__}: {text}); please report it"
    return text if shown in text else f"{shown}: {text}"
