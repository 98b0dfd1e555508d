"""A map of per-block yes/no flags, coded with a context-adaptive binary range coder.

Binary arithmetic coding with adaptive probabilities, as in H.264's CABAC (Marpe,
Schwarz and Wiegand, "Context-based adaptive binary arithmetic coding in the H.264/AVC
video compression standard", IEEE TCSVT 2003) and LZMA's range coder: each flag is coded
with the probability that its context (the flags to its left and above) has shown so
far. A map of mostly contiguous regions costs a fraction of a bit per flag.

::

    flags [H, W] ─raster order─► context = left + 2·above ─► p(flag = 1) in 1/2048,
                                                             updated after every flag
                                          │
                                          ▼
                                    range coder ─► bytes (trailing zero bytes dropped)

Integers only, so every machine decodes the same map. The decoder knows H and W (the
frame size gives them), reads zeros past the end of the string, and refuses a string
longer than the encoder could have written for that many flags.
"""

from __future__ import annotations

import numpy as np

__all__ = ["encode_flags", "decode_flags"]

_PROB_BITS = 11  # probabilities in units of 1/2048, as LZMA's
_ADAPT_SHIFT = 4  # each flag moves its context's probability 1/16 of the way
_TOP = 1 << 24  # renormalise when the range falls below this
_CONTEXTS = 4


def _context(flags: np.ndarray, row: int, col: int) -> int:
    left = int(flags[row, col - 1]) if col else 0
    above = int(flags[row - 1, col]) if row else 0
    return left + 2 * above


def encode_flags(flags: np.ndarray) -> bytes:
    """The bytes of a 2-D boolean map (read back by :func:`decode_flags` given its shape)."""
    flags = np.asarray(flags, dtype=bool)
    if flags.ndim != 2:
        raise ValueError(f"flags must be a 2-D map, got shape {flags.shape}")
    probs = [1 << (_PROB_BITS - 1)] * _CONTEXTS  # P(flag = 0)
    low, span, shifts = 0, 0xFFFFFFFF, 0  # low is exact (Python int): carries need no cache
    for row in range(flags.shape[0]):
        for col in range(flags.shape[1]):
            ctx = _context(flags, row, col)
            bound = (span >> _PROB_BITS) * probs[ctx]
            if flags[row, col]:
                low += bound
                span -= bound
                probs[ctx] -= probs[ctx] >> _ADAPT_SHIFT
            else:
                span = bound
                probs[ctx] += ((1 << _PROB_BITS) - probs[ctx]) >> _ADAPT_SHIFT
            while span < _TOP:
                span <<= 8
                low <<= 8
                shifts += 1
    # any value in [low, low + span) decodes the same: the one with the most trailing zero bytes
    size = shifts + 4
    for drop in range(size, 0, -1):
        unit = 1 << (8 * drop)
        value = -(-low // unit) * unit
        if value < low + span:
            return value.to_bytes(size, "big").rstrip(b"\0") if value else b""
    return low.to_bytes(size, "big")


def decode_flags(data: bytes, shape) -> np.ndarray:
    """The boolean map of ``shape`` (rows, cols) that :func:`encode_flags` wrote to ``data``.
    Raises ValueError on a string longer than that many flags can need."""
    rows, cols = (int(s) for s in shape)
    if rows < 0 or cols < 0:
        raise ValueError(f"flag map shape must be non-negative, got {shape!r}")
    data = bytes(data)
    flags = np.zeros((rows, cols), dtype=bool)
    probs = [1 << (_PROB_BITS - 1)] * _CONTEXTS
    padded = data + b"\0" * 4
    code, span, position = int.from_bytes(padded[:4], "big"), 0xFFFFFFFF, 4
    for row in range(rows):
        for col in range(cols):
            ctx = _context(flags, row, col)
            bound = (span >> _PROB_BITS) * probs[ctx]
            if code >= bound:
                code -= bound
                span -= bound
                probs[ctx] -= probs[ctx] >> _ADAPT_SHIFT
                flags[row, col] = True
            else:
                span = bound
                probs[ctx] += ((1 << _PROB_BITS) - probs[ctx]) >> _ADAPT_SHIFT
            while span < _TOP:
                span <<= 8
                code = (code << 8) | (data[position] if position < len(data) else 0)
                position += 1
    if len(data) > position:
        raise ValueError(f"flag map string has {len(data) - position} bytes past its {rows}x{cols} flags")
    return flags
