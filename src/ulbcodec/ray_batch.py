"""Batch jobs on Ray Data: ``ulbc encode|decode --engine ray``, for folders or lists of
files too large for one machine.

The same jobs as the local process pool of :mod:`ulbcodec.batch`, run by a pool of Ray
actors instead, each loading the model once::

    driver (ulbc)                         Ray actors (--jobs of them, 1 CPU each)
    plan: Task(src, dst) ...  ─► Dataset ─► map(_Coder)  __init__: factory() (one model load)
    print records, summary  ◄─ iter_rows ◄─            __call__: batch.guard(job, codec, task)

A record is the JSON of exactly what a local worker returns, so ``--json`` lines, the
files written and the summary are those of ``--jobs N`` (order aside: completion order,
as with local workers). Inputs and outputs are paths: on a cluster they must be on
storage that every node sees under the same path.

Where the cluster is: ``RAY_ADDRESS`` (Ray's own variable; ``auto`` joins the cluster of
this node). Without it a private local instance is started with ``--jobs`` CPUs and shut
down at the end. Ray is an optional extra (``pip install 'ulbc[ray]'``).

Failures: a job's own failure is its record, as locally. An actor that dies (out of
memory, a lost node) is restarted by Ray and its file retried up to ``ACTOR_RETRIES``
times; if Ray gives up, the files not yet reported fail with one line each and the batch
ends (``--skip-existing`` finishes it later).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ulbcodec.task import Task, guard

ACTOR_RETRIES = 2


class RayUnavailable(RuntimeError):
    """Ray (with Ray Data) is not installed."""


def import_ray():
    """The ray module, or :class:`RayUnavailable` with the line that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (pyarrow and pandas behind it)
    except ImportError as exc:
        raise RayUnavailable(f"--engine ray needs Ray Data ({exc.name or exc} is not installed): "
                             "pip install 'ulbc[ray]'") from None
    return ray


class _Coder:
    """One Ray actor: the model loaded once, then one task per row."""

    def __init__(self, factory: Callable[[], object], job: Callable[[object, Task], dict]):
        import torch

        from ulbcodec.resources import keep_freed_memory

        torch.set_num_threads(1)  # the actors are the parallelism, as with local workers
        keep_freed_memory()
        self.codec, self.job = factory(), job

    def __call__(self, row: dict) -> dict:
        task = Task(Path(row["src"]), Path(row["dst"]), bool(row["planned"]))
        return {"record": json.dumps(guard(self.job, self.codec, task))}


def run(tasks: Sequence[Task], factory: Callable[[], object], job: Callable[[object, Task], dict],
        jobs: int) -> Iterator[dict]:
    """Yield one record per task, as :func:`ulbcodec.batch.run` does, with ``jobs`` actors."""
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        address = os.environ.get("RAY_ADDRESS") or None
        # ULBC_* settings (model search path, memory limit) travel to the actors, which
        # on a cluster do not share this process's environment.
        settings = {k: v for k, v in os.environ.items() if k.startswith("ULBC_")}
        ray.init(address=address, num_cpus=None if address else jobs, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.ERROR, configure_logging=False,
                 runtime_env={"env_vars": settings} if settings else None)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the CLI has its own bar; quiet by default
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        rows = [{"src": str(t.src), "dst": str(t.dst), "planned": t.planned} for t in tasks]
        dataset = ray.data.from_items(rows, override_num_blocks=max(1, len(rows))).map(
            _Coder, fn_constructor_args=(factory, job), concurrency=jobs, num_cpus=1,
            max_restarts=ACTOR_RETRIES, max_task_retries=ACTOR_RETRIES)
        reported = set()
        try:
            for row in dataset.iter_rows():
                record = json.loads(row["record"])
                reported.add(record["input"])
                yield record
        except ray.exceptions.RayError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            for task in tasks:
                if str(task.src) not in reported:
                    yield {"input": str(task.src), "output": str(task.dst), "ok": False,
                           "error": f"{task.src}: the Ray job failed before this file was done ({reason}); "
                                    "re-run with --skip-existing to finish the batch"}
    finally:
        if started_here:
            ray.shutdown()
