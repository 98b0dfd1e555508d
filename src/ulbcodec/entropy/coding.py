"""The bit-exact side of entropy coding: the deterministic path every computation between
``y`` and the bitstream runs in, the symbol check, the rANS buffer guard, and the check
that a z string is exactly the coding of the symbols it decodes to.

Why: the rANS coder needs the encoder and the decoder to compute *identical* scales and
means, whatever machine or thread count either side has, so the entropy path runs in
float32, without autocast, on one intra-op thread (:func:`deterministic_entropy_path`);
independent context networks may run side by side, each whole on one thread
(:func:`side_thread`).
"""

from __future__ import annotations

import contextlib
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ulbcodec.threads import torch_threads

# both(f, g) -> (f(), g()) for two networks that do not depend on each other (side_thread)
Both = Callable[[Callable[[], Tensor], Callable[[], Tensor]], Tuple[Tensor, Tensor]]


@contextlib.contextmanager
def deterministic_entropy_path(device: torch.device, single_thread: bool = True) -> Iterator[int]:
    """Run the entropy-parameter path single-threaded, in fp32, without autocast.

    ``single_thread=False`` (training) keeps fp32 but leaves the thread count alone:
    training needs no bit-exactness and one thread would halve its speed.

    The rANS coder needs the encoder and the decoder to compute *identical* scales and
    means. Multi-threaded CPU kernels may split reductions differently for different
    thread counts, so we pin intra-op parallelism to one thread for the duration and
    restore the caller's setting afterwards. (Process-global: not safe to interleave with
    other Python threads that rely on the thread count at the same moment.) Yields the
    caller's thread count: work split into independent pieces, each computed whole by one
    thread (the local context's bands), may still use that many threads.
    """
    with torch_threads(1 if single_thread else None) as previous, \
            torch.autocast(device_type=device.type, enabled=False):
        yield previous


def without_grad(fn: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """``fn(*args)`` with gradients off: for pool threads, whose grad mode is their own."""
    with torch.no_grad():
        return fn(*args)


@contextlib.contextmanager
def side_thread(enabled: bool) -> Iterator[Both]:
    """Yields ``both(f, g)`` → (f(), g()): with ``enabled``, g runs on a second thread
    meanwhile, without gradients (grad mode is per thread). Each network still runs whole
    on one thread, so its values are those of a serial run: the entropy path uses this
    for context networks that do not depend on each other."""
    if not enabled:
        yield lambda f, g: (f(), g())
        return

    with ThreadPoolExecutor(max_workers=1) as pool:
        def both(f: Callable[[], Tensor], g: Callable[[], Tensor]) -> Tuple[Tensor, Tensor]:
            side = pool.submit(without_grad, g)
            return f(), side.result()

        yield both


SCALE_BOUND = 0.11  # CompressAI's lower bound on a Gaussian's scale
LIKELIHOOD_BOUND = 1e-9


def symbol_likelihood(symbols: Tensor, scales: Tensor) -> Tensor:
    """P(symbol) under a zero-mean Gaussian of ``scales`` integrated over [s − ½, s + ½]
    (CompressAI's GaussianConditional, in its numerically stable form)."""
    scales = scales.clamp_min(SCALE_BOUND)
    values = symbols.abs()
    normal = torch.distributions.Normal(0.0, 1.0)
    upper = normal.cdf((0.5 - values) / scales)
    lower = normal.cdf((-0.5 - values) / scales)
    return (upper - lower).clamp_min(LIKELIHOOD_BOUND)


def scale_indexes(gaussian_conditional, scales: Tensor) -> Tensor:
    """The index of each scale's CDF table (int32): exactly CompressAI's
    ``GaussianConditional.build_indexes`` — the number of table scales below the
    (lower-bounded) scale — as one binary search instead of a pass per table entry."""
    scales = gaussian_conditional.lower_bound_scale(scales)
    table = gaussian_conditional.scale_table[:-1].to(scales.dtype)
    return torch.bucketize(scales, table).int()


def symbols_crc32(symbols: Sequence[int]) -> int:
    """CRC-32 of the coded y symbols as int32 little-endian, in coding order."""
    return zlib.crc32(np.asarray(symbols, dtype="<i4").tobytes()) & 0xFFFFFFFF


def rans_safe(string: bytes, symbols: int) -> bytes:
    """``string`` followed by enough zero bytes that CompressAI's rANS decoder cannot read
    past the end of its buffer while decoding ``symbols`` symbols.

    Its C++ decoder never checks its read pointer: on a short or corrupted string it reads
    the memory after it (a crash when the string lives on the stack; docs/robustness.md,
    finding 1). Per symbol it reads at most one renormalisation word and, in bypass mode,
    one word for the bypass count; longer bypass runs need 0xF nibbles, of which a string
    of n bytes holds at most 2n (+16 in the state), each asking for 15 nibbles more. Zero
    bytes end every bypass run, so 32 bytes per string byte, 16 per symbol and 4 KiB bound
    every read inside the padded buffer. A valid stream is consumed exactly as before and
    decodes to the same symbols (conformance pins); the padding costs ~16 bytes per symbol
    for the duration of the call (~75 MB at 12 MP with models/default).
    """
    return string + bytes(32 * len(string) + 16 * symbols + 4096)


Z_SYMBOL_LIMIT = 1 << 16  # |z symbol| a file may hold: h_a's outputs stay within a few hundred


def check_z_symbols(entropy_bottleneck, z: Tensor, why: str = "(an encoder input far outside the model's range)") -> None:
    """Raise ValueError if a symbol of ``z`` as ``entropy_bottleneck`` codes it lies beyond
    ±:data:`Z_SYMBOL_LIMIT`: the encoder never writes one, the decoder refuses one."""
    symbols = entropy_bottleneck.quantize(z, "symbols", entropy_bottleneck._get_medians())
    if symbols.numel() and int(symbols.abs().max()) > Z_SYMBOL_LIMIT:
        raise ValueError(f"a z symbol beyond ±{Z_SYMBOL_LIMIT} {why}")


def check_z_string(entropy_bottleneck, z_hat: Tensor, z_string: bytes) -> None:
    """Raise ValueError unless ``z_string`` is exactly what ``entropy_bottleneck`` writes
    for ``z_hat`` (the symbols just decoded from it), each within ±:data:`Z_SYMBOL_LIMIT`.

    Why: rANS decoding is the inverse of encoding, so an encoder's z string re-encodes to
    itself, byte for byte. A string decoded for more symbols than it was coded for (a
    file relabelled to a larger size) runs into :func:`rans_safe`'s padding and decodes
    the rest to symbols that re-encode to a longer string, or to absurd escape values
    (which CompressAI's encoder would take minutes to write, hence the limit first). This
    catches it after z, which costs ~1/100 of y, instead of after the whole y decode
    (seconds and GBs at 4096x4096). The factorized prior's tables are integers, so the
    check is exact on every machine."""
    check_z_symbols(entropy_bottleneck, z_hat, "(a corrupted file, or one relabelled to another size)")
    if entropy_bottleneck.compress(z_hat)[0] != z_string:
        raise ValueError("the z string is not the coding of the symbols it holds (a corrupted file, or one "
                         "relabelled to another size)")
