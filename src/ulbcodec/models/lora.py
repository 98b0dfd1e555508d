"""The LoRA runtime: an unmerged low-rank adapter on the transformer's linear layers.

The LoRA is applied *unmerged*, as the published loader (peft) does: each target
``nn.Linear`` is wrapped by :class:`LoRALinear`, computing ``base(x) + scale·B(A(x))``
with ``scale = alpha / rank`` (published: rank 256, alpha 256, scale 1.0)::

    x ─┬─► base_layer (untouched) ──────────────┐
       └─► lora_A (in → rank) ─► lora_B (rank → out) ─► × scale ─► + ─► y

Unmerged keeps the base weights untouched, so switching between rate levels' LoRAs swaps
two small matrices per layer instead of reloading the base, and the arithmetic follows
the published one (a merged ``W + B·A`` would be rounded to bf16 as one matrix instead).
Its cost is two rank-r matmuls per target layer. Every decode of a package with a
``lora`` component goes through :func:`apply_lora` (``ImageCodec.next_frame_for``); the
NeFIC importer (:mod:`ulbcodec.importers.nefic`) checks published files with
:func:`check_lora`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

from torch import Tensor, nn

from ulbcodec.packages import ModelError

LORA_PREFIX = "transformer."
#: The layers of every transformer block the published LoRA adapts.
LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "norm1.linear", "norm2.linear")
_SHOWN = 3  # keys named in an error message


def _first(names: Iterable[str]) -> str:
    names = sorted(names)
    more = f", … ({len(names)} in all)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def key_mismatch(source, what: str, expected: Iterable[str], found: Iterable[str]) -> None:
    """Raise one line naming the first few missing and unexpected keys, if any."""
    expected, found = set(expected), set(found)
    missing, unexpected = expected - found, found - expected
    parts = [f"{label} {_first(keys)}" for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if parts:
        raise ModelError(f"{source}: {what}: " + "; ".join(parts))


class LoRALinear(nn.Module):
    """``base_layer(x) + scale · lora_B(lora_A(x))``: an unmerged low-rank adapter."""

    def __init__(self, base_layer: nn.Linear, lora_A: Tensor, lora_B: Tensor, scale: float):
        super().__init__()
        self.base_layer = base_layer
        self.set_weights(lora_A, lora_B, scale)

    def set_weights(self, lora_A: Tensor, lora_B: Tensor, scale: float) -> None:
        like = self.base_layer.weight
        self.lora_A = nn.Linear(lora_A.shape[1], lora_A.shape[0], bias=False, device="meta")
        self.lora_B = nn.Linear(lora_B.shape[1], lora_B.shape[0], bias=False, device="meta")
        self.lora_A.weight = nn.Parameter(lora_A.to(like.device, like.dtype))
        self.lora_B.weight = nn.Parameter(lora_B.to(like.device, like.dtype))
        self.scale = float(scale)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.base_layer(x) + self.scale * self.lora_B(self.lora_A(x))


def lora_targets(transformer: nn.Module) -> Dict[str, nn.Linear]:
    """The layers the LoRA adapts, by name without the ``transformer.`` prefix (the base
    layer where a LoRA is already applied)."""
    targets = {}
    for i in range(len(transformer.transformer_blocks)):
        for suffix in LORA_TARGETS:
            name = f"transformer_blocks.{i}.{suffix}"
            module = transformer.get_submodule(name)
            module = module.base_layer if isinstance(module, LoRALinear) else module
            if not isinstance(module, nn.Linear):
                raise ModelError(f"transformer layer {name} is a {type(module).__name__}, not a Linear")
            targets[name] = module
    return targets


def lora_shapes(transformer: nn.Module, rank: int) -> Dict[str, Tuple[int, int]]:
    """Every tensor a rank-``rank`` LoRA of ``transformer`` holds: name (without the
    ``transformer.`` prefix) → shape. A is [rank, in_features], B [out_features, rank]."""
    shapes = {}
    for name, layer in lora_targets(transformer).items():
        shapes[f"{name}.lora_A.weight"] = (rank, layer.in_features)
        shapes[f"{name}.lora_B.weight"] = (layer.out_features, rank)
    return shapes


def _normalise_key(key: str) -> Optional[str]:
    """The published loader's renaming: keep ``transformer.*``, strip the prefix, and
    name old-style ``.lora.down``/``.lora.up`` tensors ``lora_A``/``lora_B``."""
    if not key.startswith(LORA_PREFIX):
        return None
    return key[len(LORA_PREFIX):].replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.")


def _normalise(keys: Iterable[str], source) -> Dict[str, str]:
    """normalised name → name in the file (keys of other models are left out, as published)."""
    names: Dict[str, str] = {}
    for key in keys:
        name = _normalise_key(key)
        if name is None:
            continue
        if name in names:
            raise ModelError(f"{source}: LoRA holds {names[name]} and {key}, the same tensor twice")
        names[name] = key
    return names


def check_lora(shapes: Mapping[str, Sequence[int]], transformer: nn.Module,
               expected_keys: Optional[Iterable[str]] = None, source="LoRA") -> int:
    """Check a LoRA's tensor names and shapes (file names → shapes) against the target
    layers of ``transformer``; returns its rank. Refuses (ModelError, one line) any
    missing or unexpected key, a wrong shape, or ranks that differ between layers.
    ``expected_keys`` (names as in the file) replaces the key set derived from the
    transformer; shapes are always checked against the layers."""
    names = _normalise(shapes, source)
    if expected_keys is None:
        expected = set(lora_shapes(transformer, 1))
    else:
        expected = set(_normalise(expected_keys, "expected keys"))
    key_mismatch(source, f"LoRA does not match the transformer ({len(transformer.transformer_blocks)} blocks)",
                  (LORA_PREFIX + k for k in expected), (LORA_PREFIX + k for k in names))
    first_a = next((names[k] for k in sorted(names) if k.endswith(".lora_A.weight")), None)
    if first_a is None or len(shapes[first_a]) != 2:
        raise ModelError(f"{source}: LoRA has no 2-D lora_A tensor to read its rank from")
    rank = int(shapes[first_a][0])
    want = lora_shapes(transformer, rank)
    for name in sorted(names):
        if name not in want:
            raise ModelError(f"{source}: LoRA tensor {names[name]} is not for a target layer "
                             f"({', '.join(LORA_TARGETS)} of a transformer block)")
        if tuple(shapes[names[name]]) != want[name]:
            raise ModelError(f"{source}: LoRA tensor {names[name]} has shape {tuple(shapes[names[name]])}, expected "
                             f"{want[name]} (rank {rank}, the layer's in/out features)")
    return rank


def apply_lora(transformer: nn.Module, tensors: Mapping[str, Tensor], alpha: Optional[float] = None,
               expected_keys: Optional[Iterable[str]] = None, source="LoRA") -> int:
    """Apply (or replace) a LoRA given as the file's tensors; returns its rank.

    Checked first (:func:`check_lora`), so a refused file leaves the transformer as it
    was. ``alpha`` defaults to the rank (scale 1.0, as published)."""
    for key, tensor in tensors.items():
        if _normalise_key(key) is not None and not tensor.is_floating_point():
            raise ModelError(f"{source}: LoRA tensor {key} is {tensor.dtype}, not floating point")
    rank = check_lora({k: tuple(v.shape) for k, v in tensors.items()}, transformer, expected_keys, source)
    names = _normalise(tensors, source)
    scale = (rank if alpha is None else float(alpha)) / rank
    for name in lora_targets(transformer):
        a, b = tensors[names[f"{name}.lora_A.weight"]], tensors[names[f"{name}.lora_B.weight"]]
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name)  # (to_out is a ModuleList: child "0")
        current = getattr(parent, child)
        if isinstance(current, LoRALinear):
            current.set_weights(a, b, scale)
        else:
            setattr(parent, child, LoRALinear(current, a, b, scale))
    return rank


def lora_file_shapes(path: Path) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of a safetensors file, from its header (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    if path.suffix != ".safetensors":
        raise ModelError(f"{path}: a LoRA must be a .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as exc:
        raise ModelError(f"{path}: not a readable safetensors file ({exc})") from None


def load_lora(path, transformer: nn.Module, expected_keys: Optional[Iterable[str]] = None,
              alpha: Optional[float] = None) -> int:
    """Read a LoRA safetensors file (safetensors only), check it against ``transformer``
    and apply it unmerged with scale ``alpha / rank`` (default 1.0). Returns the rank."""
    from safetensors.torch import load_file

    path = Path(path)
    check_lora(lora_file_shapes(path), transformer, expected_keys, path)  # before reading 2.7 GB
    return apply_lora(transformer, load_file(str(path)), alpha, expected_keys, path)
