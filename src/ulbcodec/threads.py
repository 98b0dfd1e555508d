"""Torch's intra-op thread count, set for one block and restored afterwards.

Why a fixed count: multi-threaded CPU kernels may split reductions differently for
different thread counts, so computations that must give the same floats on both sides of
the codec (the entropy parameters, the frame predictions, each tile of the transforms)
run on a count that does not depend on the machine. Small computations (MS-SSIM of one
image) also run faster on one thread than through a busy pool's synchronisation.

The setting is process-global for the calling thread's OpenMP team: not safe to
interleave with other Python threads that rely on the count at the same moment.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional


@contextlib.contextmanager
def torch_threads(count: Optional[int]) -> Iterator[int]:
    """Run the block with ``count`` intra-op threads (``None``: leave the count as it
    is), restoring the caller's count afterwards. Yields the caller's count."""
    import torch

    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield previous
    finally:
        torch.set_num_threads(previous)
