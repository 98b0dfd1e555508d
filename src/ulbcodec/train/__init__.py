"""Trainers of the shipped models (one module per model family; see docs/training.md)."""

import os

# PyTorch 2.13's oneDNN corrupts the heap in bfloat16 convolution backward passes when it
# uses AMX tiles (seen on a Xeon with amx_bf16: "double free or corruption" in the first
# VAE step; fine with AMX off). Training therefore caps oneDNN at AVX-512 with bf16, which
# oneDNN reads once, at its first primitive: this runs before any training code. A user
# who sets ONEDNN_MAX_CPU_ISA keeps their value.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
