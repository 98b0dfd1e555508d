"""Data-parallel training on one or many processes: the runtime every ulbc trainer uses.

:class:`TrainRuntime` sits on an :class:`accelerate.Accelerator`, so the same trainer
runs as a plain ``python -m ulbcodec.train.X`` (one process, CPU or the first GPU) or
under ``accelerate launch`` on N processes, GPUs or nodes (configs/accelerate/,
docs/training.md). Each process holds a full replica of the trained model and draws its
own batch; one optimiser step across N processes::

      process 0               process 1                    process N-1
   +-------------------+   +-------------------+        +-------------------+
   | own crops, noise  |   | own crops, noise  |  ...   | own crops, noise  |
   | (seeds + 0)       |   | (seeds + 1*2^40)  |        | (seeds + r*2^40)  |
   | forward (autocast)|   | forward (autocast)|        | forward (autocast)|
   | backward -> grads |   | backward -> grads |        | backward -> grads |
   +---------+---------+   +---------+---------+        +---------+---------+
             |                       |                            |
             +----- all-reduce (mean) of one flat gradient bucket -+
             |                       |                            |
   +---------+---------+   +---------+---------+        +---------+---------+
   | clip, opt.step()  |   | clip, opt.step()  |  ...   | clip, opt.step()  |
   +-------------------+   +-------------------+        +-------------------+
     same averaged gradients -> same update -> the replicas stay bit-identical;
     process 0 alone prints the log, writes checkpoints and exports the package

Why the gradients are averaged here instead of by torch's DistributedDataParallel: DDP
averages through hooks installed by the wrapped module's ``forward``, and the ulbc stages
mostly train through other doors: the VAE's ``encode``/``decode`` methods,
``NextFramePipeline.velocity``, ``AnchorCodec.aux_loss``, a bare ``nn.Parameter`` (the
prompt embeddings, which belongs to no module), and a discriminator run twice per step
(on the fakes for the generator, then on reals and detached fakes for itself). Wrapping
each of those would need DDP's unused-parameter search and still miss the bare tensor.
So after ``backward`` the runtime all-reduces the gradients of the parameters the step
trains, in one flat bucket per dtype, and divides by N: the same mean DDP computes.
With one process it does nothing extra, so a plain run gives the losses it gave before
this module existed (same seed, same numbers).

What else keeps N processes in step:

- seeds: process 0 keeps the exact seeds of a single-process run; process r adds
  r * 2^40 (:meth:`TrainRuntime.process_seed`) to every seed that draws data or noise,
  and reseeds torch's global generator after the models are built (their initial
  weights must agree; :meth:`TrainRuntime.sync_replicas` also copies process 0's);
- checkpoints: only the main process's wall clock decides when one is due (broadcast to
  all: ranks that disagreed would wait forever in different collectives); at that point
  every process checks that all replicas hold the same parameters (a float64 checksum,
  all-gathered; :class:`ReplicaMismatchError` otherwise, before anything is written),
  the main process writes, everyone waits for it;
- resume: every process reads the same checkpoint, so on several nodes the run
  directory must be on storage all nodes share;
- mixed precision: ``--mixed-precision``, else ``ACCELERATE_MIXED_PRECISION`` (what
  ``accelerate launch`` and its config files set), else bf16, the single-process
  default of these trainers. fp16 is refused: it needs dynamic loss scaling (a
  GradScaler stepping every optimiser, skipped steps, its state in the checkpoints),
  which the trainers do not implement; bf16 has float32's exponent range and needs none
  (CPUs, NVIDIA Ampere and later). ``no`` trains in float32.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta
from typing import Any, Callable, ContextManager, Dict, Iterable, List, Optional

import torch

# PyTorch 2.13's oneDNN corrupts the heap in bfloat16 convolution backward passes when it
# uses AMX tiles (seen on a Xeon with amx_bf16: "double free or corruption" in the first
# VAE step; fine with AMX off). Every trainer imports this module before it runs a model,
# so it caps oneDNN at AVX-512 with bf16 here; oneDNN reads the cap once, at its first
# primitive. Only trainers: inference keeps AMX (the cap doubled the bf16 decode's time).
# A user who sets ONEDNN_MAX_CPU_ISA keeps their value.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

MIXED_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"
DEFAULT_MIXED_PRECISION = "bf16"
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "no": None}
# Seeds of process r are offset by r * 2^40: far beyond any step count or seed in use,
# so no two processes ever draw from the same generator seed.
PROCESS_SEED_STRIDE = 1 << 40
# How long a process waits in a collective for the others: the main process alone writes
# checkpoints and, once per run, encodes the predictor's training clips (minutes on a CPU).
COLLECTIVE_TIMEOUT = timedelta(hours=1)


class ReplicaMismatchError(RuntimeError):
    """The processes' copies of the trained parameters differ: they no longer train one model."""


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every trainer takes for the runtime."""
    parser.add_argument("--mixed-precision", choices=("bf16", "fp16", "no"), default=None,
                        help=f"autocast dtype (default: ${MIXED_PRECISION_ENV}, as set by `accelerate launch`, "
                        f"else {DEFAULT_MIXED_PRECISION}); fp16 is refused (no loss scaling)")


def resolve_mixed_precision(option: Optional[str]) -> str:
    """``option``, else the launcher's environment, else bf16; fp16 and fp8 refused with the reason."""
    source, value = "--mixed-precision", option
    if not value:
        source, value = MIXED_PRECISION_ENV, os.environ.get(MIXED_PRECISION_ENV)
    value = (value or DEFAULT_MIXED_PRECISION).lower()
    if value in ("fp16", "fp8"):
        raise SystemExit(f"{source}={value}: not supported by the ulbc trainers: float16 needs dynamic loss scaling, "
                         "which they do not implement. Use bf16 (CPUs, NVIDIA Ampere or newer) or no (float32).")
    if value not in AUTOCAST_DTYPES:
        raise SystemExit(f"{source}={value}: unknown mixed precision (choose bf16 or no)")
    return value


def _refuse_lone_cpu_launch(num_processes: int) -> None:
    """``accelerate launch --cpu --num_processes N`` starts ONE process (accelerate spreads
    CPU processes only through MPI); it sets MASTER_ADDR but no WORLD_SIZE. Training would
    silently run on 1/N of the intended batch, so refuse and say what works."""
    launched_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if num_processes == 1 and launched_cpu and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        raise SystemExit("accelerate launch --cpu started a single process although more were asked for "
                         "(accelerate starts several CPU processes only through MPI). For N CPU processes use "
                         "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...` "
                         "(docs/training.md).")


class TrainRuntime:
    """Device, precision and the cross-process steps of one training process (see the module docstring)."""

    def __init__(self, mixed_precision: Optional[str] = None):
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        self.mixed_precision = resolve_mixed_precision(mixed_precision)
        # Without CUDA, say "CPU" outright: processes started by torchrun (`accelerate launch
        # --multi_gpu`) on a machine without GPUs otherwise find no backend and each trains alone.
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(), mixed_precision=self.mixed_precision,
            kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)],
        )
        self.device: torch.device = self.accelerator.device
        self.num_processes: int = self.accelerator.num_processes
        self.process_index: int = self.accelerator.process_index
        self.is_main: bool = self.accelerator.is_main_process
        self.seed_offset = self.process_index * PROCESS_SEED_STRIDE
        _refuse_lone_cpu_launch(self.num_processes)

    # ------------------------------------------------------------------ precision and seeds

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        """The dtype under autocast (None: float32), for code that opens its own autocast."""
        return AUTOCAST_DTYPES[self.mixed_precision]

    def autocast(self) -> ContextManager:
        """The accelerator's autocast: bf16 on this process's device, or nothing for ``no``."""
        return self.accelerator.autocast()

    def process_seed(self, seed: int) -> int:
        """``seed`` on process 0 (a single-process run's exact seeds), ``seed + r * 2^40`` on process r."""
        return seed + self.seed_offset

    def decorrelate_global_rng(self, seed: int) -> None:
        """Reseed torch's global generator on processes r > 0 with their own seed, so that
        in-model randomness (quantisation noise, VAE sampling) differs between processes.
        Call it after the models are built: their initial weights must be the same
        everywhere. Process 0's generator is left untouched."""
        if self.process_index > 0:
            torch.manual_seed(self.process_seed(seed))

    # ------------------------------------------------------------------ replicas

    def sync_replicas(self, tensors: Iterable[torch.Tensor]) -> None:
        """Copy the main process's values of ``tensors`` (parameters) to every process, as
        DDP does when it wraps a model: all replicas start from the same weights."""
        if self.num_processes == 1:
            return
        with torch.no_grad():
            for t in tensors:
                torch.distributed.broadcast(t.data, src=0)

    def backward(self, loss: torch.Tensor, params: Iterable[torch.nn.Parameter]) -> None:
        """``loss.backward()``, then the gradients of ``params`` averaged over the processes."""
        self.accelerator.backward(loss)
        self.average_gradients(params)

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace each gradient of ``params`` by its mean over the processes (nothing with one).

        A parameter without a gradient on some process (a branch its batch did not take)
        counts as a zero gradient there; one without a gradient on every process keeps
        ``grad = None``, so optimisers skip it exactly as in a single-process run.
        """
        if self.num_processes == 1:
            return
        params = [p for p in params if p.requires_grad]
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.device)
        torch.distributed.all_reduce(has_grad)
        buckets: Dict[torch.dtype, List[torch.nn.Parameter]] = {}
        for p, used in zip(params, has_grad.tolist()):
            if used:
                buckets.setdefault(p.dtype, []).append(p)
        for group in buckets.values():  # dict order: the same on every process
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
            torch.distributed.all_reduce(flat)
            flat.div_(self.num_processes)
            offset = 0
            for p in group:
                mean = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                if p.grad is None:
                    p.grad = mean.clone()
                else:
                    p.grad.copy_(mean)

    def clip_grad_norm_(self, params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip the (already averaged) gradients' global norm; the same on every process."""
        return self.accelerator.clip_grad_norm_(params, max_norm)

    def check_replicas(self, tensors: Iterable[torch.Tensor], step: int) -> None:
        """Raise :class:`ReplicaMismatchError` unless every process holds the same ``tensors``.

        Compares a float64 fingerprint (sum of each tensor weighted by its position, and
        the sum of absolute values) gathered from all processes: replicas that took the
        same averaged steps are bit-identical, so the fingerprints must be equal exactly.
        """
        if self.num_processes == 1:
            return
        tensors = [t.detach() for t in tensors]
        sums = torch.stack([t.double().sum() for t in tensors])
        weights = torch.arange(1, len(tensors) + 1, dtype=torch.float64, device=sums.device)
        abs_sum = torch.stack([t.double().abs().sum() for t in tensors]).sum()
        fingerprint = torch.stack([(sums * weights).sum(), abs_sum]).to(self.device)
        everyone = self.accelerator.gather(fingerprint[None]).cpu()
        differ = [r for r in range(self.num_processes) if not torch.equal(everyone[r], everyone[0])]
        if differ:
            raise ReplicaMismatchError(
                f"step {step}: the trained parameters of process(es) {differ} differ from process 0's "
                f"(fingerprints {everyone.tolist()}): the replicas no longer train one model (a trained "
                "parameter whose gradients are not averaged, or replicas that started from different "
                "weights). Nothing was written; the last checkpoint is intact.")

    # ------------------------------------------------------------------ checkpoints and logs

    def checkpoint_due(self, last_save: float, every: float) -> bool:
        """Whether ``every`` seconds have passed since ``last_save`` by the main process's
        clock; the same answer on every process (they must all enter the save together)."""
        return bool(self.from_main(float(time.time() - last_save > every)))

    def save_checkpoint(self, write: Callable[[], Any], trained: Iterable[torch.Tensor], step: int) -> None:
        """Check the replicas, let the main process ``write()``, and wait until it has."""
        self.check_replicas(trained, step)
        if self.is_main:
            write()
        self.accelerator.wait_for_everyone()

    def wait_for_everyone(self) -> None:
        self.accelerator.wait_for_everyone()

    def from_main(self, value: float) -> float:
        """The main process's ``value``, on every process."""
        if self.num_processes == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.broadcast(t, src=0)
        return t.item()

    def gather_rows(self, rows: List[Any]) -> List[Any]:
        """Every process's ``rows`` (picklable), concatenated in process order, on every process:
        the training log then describes the whole global batch."""
        if self.num_processes == 1:
            return rows
        from accelerate.utils import gather_object

        return gather_object(rows)

    def print(self, *args) -> None:
        """Print from the main process only (every process would repeat the same line)."""
        if self.is_main:
            print(*args, flush=True)

    def describe(self, batch: int) -> dict:
        """What the checkpoints and manifests record about the runtime."""
        return {"world_size": self.num_processes, "global_batch": self.num_processes * batch,
                "mixed_precision": self.mixed_precision}

    def record(self, meta: dict, batch: int) -> dict:
        """Put :meth:`describe` into a run's ``meta``; a resumed run whose runtime changed
        (another process count, batch or precision) keeps the earlier one in
        ``meta["runtime_changes"]`` with the step it changed at."""
        now = self.describe(batch)
        before = {k: meta[k] for k in now if k in meta}
        if before and before != now:
            meta.setdefault("runtime_changes", []).append({"step": meta.get("step", 0), "before": before})
        meta.update(now)
        return meta

    def end(self) -> None:
        """Leave the process group (no-op with one process)."""
        self.accelerator.end_training()


def training_runtime(meta: dict, batch: int) -> dict:
    """The runtime a run's checkpoint recorded (:meth:`TrainRuntime.record`), for the
    training info of an exported manifest; runs checkpointed before it was recorded
    trained on one process."""
    info = {"world_size": meta.get("world_size", 1), "global_batch": meta.get("global_batch", batch)}
    for key in ("mixed_precision", "runtime_changes"):
        if key in meta:
            info[key] = meta[key]
    return info
