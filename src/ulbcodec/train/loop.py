"""The bookkeeping every trainer repeats around its own step.

::

    loop = TrainLoop(rt, meta, steps, args.log_every, args.save_every)
    while meta["step"] < steps:
        ... one optimisation step ...; meta["step"] += 1
        loop.record(row)                        # this step's numbers
        logged = loop.flush_log()               # every log_every steps: every process's rows
        if logged: elapsed, rows = logged; loop.log(elapsed, **summary); rt.print(...)
        if loop.checkpoint_due(): save ...      # every save_every s, and at the last step

The training clock (``meta["seconds"]``) carries over resumes: it counts the time
between checkpoints, so a run that is stopped and resumed reports its trained minutes,
not its wall time.
"""

from __future__ import annotations

import time
from typing import Any, List, Optional, Tuple


class TrainLoop:
    """Log window, training clock and checkpoint schedule of one training run (see the
    module docstring); ``rt`` is the run's :class:`~ulbcodec.train.distributed.TrainRuntime`."""

    def __init__(self, rt, meta: dict, steps: int, log_every: int, save_every: float):
        self.rt, self.meta, self.steps = rt, meta, steps
        self.log_every, self.save_every = log_every, save_every
        self.started = self.last_save = time.time()
        self.window: List[Any] = []

    def record(self, row: Any) -> None:
        """Add this step's numbers (picklable) to the log window."""
        self.window.append(row)

    def flush_log(self) -> Optional[Tuple[float, List[Any]]]:
        """Every ``log_every`` steps: (trained seconds, every process's rows since the last
        log, in process order); otherwise None. A collective on those steps."""
        if self.meta["step"] % self.log_every:
            return None
        elapsed = self.meta["seconds"] + time.time() - self.started
        rows, self.window = self.rt.gather_rows(self.window), []
        return elapsed, rows

    def log(self, elapsed: float, **fields) -> None:
        """One entry of ``meta["log"]``: the step, the trained minutes and ``fields``."""
        self.meta["log"].append({"step": self.meta["step"], "minutes": round(elapsed / 60, 2), **fields})

    def checkpoint_due(self) -> bool:
        """Whether to save now (every ``save_every`` seconds, and at the last step); when
        it is, the clock is banked into ``meta["seconds"]``. A collective: call it every
        step on every process (the time test comes first, so every process runs it)."""
        if not (self.rt.checkpoint_due(self.last_save, self.save_every) or self.meta["step"] == self.steps):
            return False
        self.meta["seconds"] += time.time() - self.started
        self.started = self.last_save = time.time()
        return True
