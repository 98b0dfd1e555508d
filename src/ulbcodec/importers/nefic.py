"""Import of the official NeFIC checkpoints into a ulbc model package.

After "Next-frame decoding for ultra-low-bitrate image compression with video diffusion
priors" (NeFIC, Chen et al. 2026; code github UnoC-727/NeFIC, weights Hugging Face
yuUnuo/NeFIC, research use only). Each published rate point
``checkpoints/nefic_lambda{λ}/`` holds an anchor codec (a pickled state dict) and a LoRA
of the base model's transformer; the base model is CogVideoX-1.5-5B in diffusers' layout.
The conversion, once, by ``ulbc models import-nefic``::

    checkpoint dir (one per rate point)                base model dir (diffusers layout)
    ┌────────────────────────────────────────────┐     ┌──────────────────────────────┐
    │ anchor_codec.bin                           │     │ vae/ transformer/ scheduler/ │
    │ pytorch_lora_weights.safetensors           │     └──────────────┬───────────────┘
    │ prompt_embeds.{safetensors,pt} (or in base)│                    │ fingerprint: configs,
    └──────┬───────────────────┬─────────────────┘                    │ sizes, safetensors headers
           │ torch.load(       │ names + shapes checked               │
           │  weights_only)    │ against the transformer ◄────────────┤ (built on the meta
           ▼                   │ (rank, every target layer)           │  device: no weights read)
    ┌──────────────────┐       ▼                                      ▼
    │ flat dict of     │   copied verbatim                 referenced by absolute path
    │ tensors; strict  │       │                                      │
    │ AnchorCodec load │       │                                      │
    └──────┬───────────┘       │                                      │
           ▼                   ▼                                      ▼
    package/  anchor_codec.{level}.safetensors  lora.{level}.safetensors  prompt_embeds.safetensors
              ulbc_model.json: "levels" per rate level, {"external": {path, digest}} for the base

At run time (``ImageCodec``) a rate level's anchor codec codes the anchor; the next-frame
decoder (``models/next_frame.py``) loads the base VAE/transformer/scheduler from the
referenced directory after checking its fingerprint, and :func:`~ulbcodec.models.lora.apply_lora` puts that
level's LoRA on the transformer.

The LoRA runtime (unmerged adapters) is :mod:`ulbcodec.models.lora`.

Nothing here unpickles beyond ``torch.load(..., weights_only=True)``: a pickle holding
anything but tensors and plain containers is refused, never executed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ulbcodec.models.lora import check_lora, key_mismatch, lora_file_shapes
from ulbcodec.packages import LORA, ModelError, ModelPackage, RateLevel, external_digest, write_manifest

ANCHOR_FILE = "anchor_codec.bin"
LORA_FILE = "pytorch_lora_weights.safetensors"
PROMPT_FILES = ("prompt_embeds.safetensors", "prompt_embeds.pt")
#: Base model sub-directories and the classes they may hold.
BASE_COMPONENTS = {"vae": ("AutoencoderKLCogVideoX",), "transformer": ("CogVideoXTransformer3DModel",),
                   "scheduler": ("CogVideoXDPMScheduler", "CogVideoXDDIMScheduler")}
# --------------------------------------------------------------------------- pickles


def load_weights_only(path) -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)``, with its refusals
    (any object but tensors and plain containers) as one-line ModelErrors."""
    import pickle

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's text is lines of advice around one reason, e.g. "WeightsUnpickler error: Unsupported
        # global: GLOBAL mod.name was not an allowed global by default. Please use ...".
        reasons = [ln.strip().removeprefix("WeightsUnpickler error:").strip() for ln in str(exc).splitlines()]
        why = next((r for r in reasons if r.startswith(("Unsupported", "Trying to load"))), "unreadable")
        raise ModelError(f"{path}: refused by weights-only loading, not a pickle of plain tensors "
                         f"({why.split('. Please use')[0]})") from None
    except Exception as exc:  # noqa: BLE001 - corrupt bytes make the unpickler raise anything (IndexError, ...)
        why = (str(exc).splitlines() or ["empty or truncated"])[0]
        raise ModelError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__}: {why})") from None


def convert_anchor_codec(checkpoint_file) -> Dict[str, Tensor]:
    """The published ``anchor_codec.bin`` as a state dict that loads strictly into
    :class:`AnchorCodec` (config from :meth:`AnchorCodec.infer_config`).

    Read only through weights-only ``torch.load``; must be a flat dict of tensors. A file
    whose CDF tables are empty gets them built once here (``update(force=True)``);
    otherwise the file's own tables are kept, as the released bitstreams need them.
    """
    from ulbcodec.models.anchor_codec import AnchorCodec

    path = Path(checkpoint_file)
    state = load_weights_only(path)
    if not isinstance(state, dict):
        raise ModelError(f"{path}: not a state dict (a {type(state).__name__})")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise ModelError(f"{path}: not a flat dict of tensors (entry {key!r} is a {type(value).__name__})")
    try:
        model = AnchorCodec(**AnchorCodec.infer_config(state))
    except ValueError as exc:
        raise ModelError(f"{path}: {exc}") from None
    key_mismatch(path, "not a NeFIC anchor codec state dict", model.state_dict(), state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # "Error(s) in loading state_dict ...:" then one line per error
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise ModelError(f"{path}: not a NeFIC anchor codec state dict ({lines[min(1, len(lines) - 1)]})") from None
    if any(state[k].numel() == 0 for k in state if k.endswith("_quantized_cdf")):
        model.update(force=True)
        return {k: v.contiguous() for k, v in model.state_dict().items()}
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def _read_prompt_embeds(dirs: Sequence[Path], text_dim: int) -> Tensor:
    """The fixed prompt embeddings, [1, L, text_dim], from the first directory that has
    them; every copy found must be equal."""
    from safetensors.torch import load_file

    found: List[Tuple[Path, Tensor]] = []
    for folder in dirs:
        for name in PROMPT_FILES:
            path = folder / name
            if not path.is_file():
                continue
            data = load_file(str(path)) if path.suffix == ".safetensors" else load_weights_only(path)
            if isinstance(data, dict):
                data = data.get("prompt_embeds", next(iter(data.values())) if len(data) == 1 else None)
            if not isinstance(data, Tensor) or data.ndim not in (2, 3) or data.shape[-1] != text_dim \
                    or (data.ndim == 3 and data.shape[0] != 1):
                shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
                raise ModelError(f"{path}: prompt embeddings must be one tensor [1, L, {text_dim}], got {shape}")
            found.append((path, data.reshape(1, -1, text_dim).float()))
    if not found:
        raise ModelError(f"no prompt embeddings: put the base model's T5 embedding of the NeFIC prompt ([1, 226, "
                         f"{text_dim}]) as {' or '.join(PROMPT_FILES)} in a checkpoint or the base directory")
    for path, tensor in found[1:]:
        if tensor.shape != found[0][1].shape or not torch.equal(tensor, found[0][1]):
            raise ModelError(f"{path}: prompt embeddings differ from those in {found[0][0]}")
    return found[0][1].contiguous()


# --------------------------------------------------------------------------- import


def read_base_config(folder: Path, component: str, classes: Sequence[str]) -> dict:
    """The diffusers config of one component directory of a base model, checked to be
    one of ``classes``."""
    config_path = folder / ("scheduler_config.json" if component == "scheduler" else "config.json")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config_path}: unreadable base model config ({exc})") from None
    if config.get("_class_name") not in classes:
        raise ModelError(f"{config_path}: {component} is a {config.get('_class_name')!r}, expected "
                         + " or ".join(classes))
    return config


def meta_transformer(config: dict):
    """The transformer of ``config`` on the meta device: its layers' shapes, no memory."""
    from diffusers import CogVideoXTransformer3DModel

    with torch.device("meta"):
        return CogVideoXTransformer3DModel.from_config(config)


_LAMBDA = re.compile(r"lambda_?([0-9]+(?:\.[0-9]+)?)$")


def _ordered_checkpoints(checkpoint_dirs: Sequence) -> List[Tuple[Path, float]]:
    """Checkpoint dirs as rate levels, level 0 the lowest rate. When every name ends in
    ``lambda{λ}`` (as published), by decreasing λ (NeFIC: λ 5 is the lowest rate);
    otherwise in the order given."""
    dirs = [Path(d).resolve() for d in checkpoint_dirs]
    if not dirs:
        raise ModelError("no checkpoint directory given")
    if len(set(dirs)) != len(dirs):
        raise ModelError("a checkpoint directory is given twice")
    for d in dirs:
        for name in (ANCHOR_FILE, LORA_FILE):
            if not (d / name).is_file():
                raise ModelError(f"{d}: not a NeFIC checkpoint directory (no {name})")
    lambdas = [_LAMBDA.search(d.name) for d in dirs]
    if all(lambdas):
        return sorted(((d, float(m.group(1))) for d, m in zip(dirs, lambdas)), key=lambda p: -p[1])
    return [(d, 0.0) for d in dirs]


def import_nefic(base_dir, checkpoint_dirs: Sequence, out_dir, force: bool = False,
                 lora_alpha: Optional[float] = None) -> ModelPackage:
    """Write a ulbc model package from the published NeFIC files (see the module docstring).

    ``base_dir``: CogVideoX-1.5-5B in diffusers' layout (vae/, transformer/, scheduler/),
    referenced by absolute path and fingerprint, not copied. ``checkpoint_dirs``: one or
    more ``nefic_lambda*`` directories, one rate level each. The package is built in a
    temporary directory next to ``out_dir`` and renamed into place: a failed or
    interrupted import leaves nothing behind (``force`` replaces an existing package).
    """
    from safetensors.torch import save_file

    from ulbcodec.models.anchor_codec import AnchorCodec

    out = Path(out_dir).absolute()
    if out.exists() and not force:
        raise ModelError(f"{out}: already exists (use --force to replace it)")
    base = Path(base_dir).resolve()
    if not base.is_dir():
        raise ModelError(f"{base}: base model directory not found")
    configs, components = {}, {}
    for name, classes in BASE_COMPONENTS.items():
        folder = base / name
        if not folder.is_dir():
            raise ModelError(f"{base}: not a CogVideoX base model in diffusers' layout (no {name}/)")
        configs[name] = read_base_config(folder, name, classes)
        components[name] = {"class": configs[name]["_class_name"],
                            "external": {"path": str(folder), "digest": external_digest(folder)}}
    transformer = meta_transformer(configs["transformer"])
    latent = configs["vae"].get("latent_channels")
    if latent != transformer.config.in_channels:
        raise ModelError(f"{base}: VAE latent channels {latent} and transformer input channels "
                         f"{transformer.config.in_channels} differ")
    checkpoints = _ordered_checkpoints(checkpoint_dirs)
    prompt = _read_prompt_embeds([d for d, _ in checkpoints] + [base], transformer.config.text_embed_dim)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        config, rank, anchor_files, lora_files = None, None, {}, {}
        for level, (folder, _) in enumerate(checkpoints):
            state = convert_anchor_codec(folder / ANCHOR_FILE)
            level_config = AnchorCodec.infer_config(state)
            if config is not None and level_config != config:
                raise ModelError(f"{folder / ANCHOR_FILE}: anchor codec config differs from {checkpoints[0][0]}'s")
            config = level_config
            if config["bypass_channels"] != latent or config["vae_channels"] not in (0, latent):
                raise ModelError(f"{folder / ANCHOR_FILE}: anchor codec bypass/VAE channels "
                                 f"{config['bypass_channels']}/{config['vae_channels']} do not match the base "
                                 f"model's {latent} latent channels")
            anchor_files[str(level)] = f"anchor_codec.{level}.safetensors"
            save_file(state, str(tmp / anchor_files[str(level)]))
            del state
            lora_rank = check_lora(lora_file_shapes(folder / LORA_FILE), transformer, source=folder / LORA_FILE)
            if rank is not None and lora_rank != rank:
                raise ModelError(f"{folder / LORA_FILE}: LoRA rank {lora_rank} differs from {rank} of the first")
            rank = lora_rank
            lora_files[str(level)] = f"lora.{level}.safetensors"
            shutil.copyfile(folder / LORA_FILE, tmp / lora_files[str(level)])
        save_file({"prompt_embeds": prompt}, str(tmp / "prompt_embeds.safetensors"))
        components.update({
            "anchor_codec": {"class": "AnchorCodec", "config": config, "levels": anchor_files},
            "lora": {"class": LORA, "config": {"rank": rank, "alpha": rank if lora_alpha is None else lora_alpha,
                                               "target": "transformer"}, "levels": lora_files},
            "prompt_embeds": {"class": "PromptEmbeddings", "weights": "prompt_embeds.safetensors"},
        })
        levels = [RateLevel(level, lmbda, folder.name) for level, (folder, lmbda) in enumerate(checkpoints)]
        write_manifest(tmp, out.name, components, levels,
                       description=f"NeFIC (Chen et al. 2026), {len(levels)} rate point(s), base {base}",
                       extra={"nefic": {"base": str(base), "checkpoints": [str(d) for d, _ in checkpoints]}})
        if out.exists():  # --force: the old package goes only once the new one is complete
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "package")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ModelPackage.load_manifest(out, verify=False)  # digest computed from these files just now
