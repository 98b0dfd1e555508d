"""Import of a pretrained image-to-video model (CogVideoX I2V) as a video package's
frame predictor (``ulbc models import-video-predictor``).

::

    image model package ──copied──────────────────┐
    I2V model dir (transformer/ vae/ scheduler/) ──┼─► referenced by path + fingerprint
    prompt embeddings (T5, [1, L, D] safetensors) ─┘   (not copied)  ─► video package
                                                       extra.video.predictor = "cogvideox-i2v"

The runtime predictor is :mod:`ulbcodec.models.i2v_predictor`; the package is checked by
building the video codec and its predictor before it gets its name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from torch import Tensor

from ulbcodec.importers.nefic import meta_transformer, read_base_config
from ulbcodec.models.i2v_predictor import KIND
from ulbcodec.packages import ModelError, ModelPackage, RateLevel, external_digest, resolve, write_manifest
from ulbcodec.video import VideoCodec

BASE_COMPONENTS = {"transformer": ("CogVideoXTransformer3DModel",), "vae": ("AutoencoderKLCogVideoX",),
                   "scheduler": ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler")}
PROMPT_FILE = "prompt_embeds.safetensors"


def import_i2v_predictor(base_dir, image_model: str, out_dir, pred_frames: int = 4, steps: int = 50,
                         guidance_scale: float = 1.0, prompt_embeds=None, negative_embeds=None,
                         dtype: str = "bfloat16", force: bool = False):
    """Write a video package: the image model ``image_model`` (a package name or path; its
    files copied, its own external references kept) plus the image-to-video model in
    ``base_dir`` (diffusers layout: transformer/, vae/, scheduler/), referenced by absolute
    path and fingerprint. ``prompt_embeds`` / ``negative_embeds``: safetensors files of one
    tensor [1, L, D] (the T5 embeddings of the prompt; ulbc does not run T5); default
    ``prompt_embeds.safetensors`` in ``base_dir``. Built in a temporary directory next to
    ``out_dir`` and renamed into place, so that a failed import leaves nothing behind."""
    from safetensors.torch import load_file, save_file

    out = Path(out_dir).absolute()
    if out.exists() and not force:
        raise ModelError(f"{out}: already exists (use --force to replace it)")
    base = Path(base_dir).resolve()
    missing = [name for name in BASE_COMPONENTS if not (base / name).is_dir()]
    if missing:
        raise ModelError(f"{base}: not an image-to-video model in diffusers' layout (no {', '.join(missing)})")
    components, configs = {}, {}
    for name, classes in BASE_COMPONENTS.items():
        folder = base / name
        configs[name] = read_base_config(folder, name, classes)
        components["predictor" if name == "transformer" else f"predictor_{name}"] = {
            "class": configs[name]["_class_name"], "external": {"path": str(folder), "digest": external_digest(folder)}}
    text_dim = meta_transformer(configs["transformer"]).config.text_embed_dim

    def read_embeds(path, what: str) -> Tensor:
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types on junk
            raise ModelError(f"{path}: {what} must be a safetensors file of one tensor ({exc})") from None
        tensor = next(iter(tensors.values())) if len(tensors) == 1 else None
        if tensor is None or tensor.ndim != 3 or tensor.shape[0] != 1 or tensor.shape[2] != text_dim:
            raise ModelError(f"{path}: {what} must be one tensor [1, L, {text_dim}]")
        return tensor.float().contiguous()

    prompt_path = Path(prompt_embeds) if prompt_embeds else base / PROMPT_FILE
    if not prompt_path.is_file():
        raise ModelError(f"no prompt embeddings: give --prompt-embeds FILE (the T5 embedding of the prompt, [1, L, "
                         f"{text_dim}], as safetensors) or put {PROMPT_FILE} in {base}")
    embeds = {"predictor_prompt_embeds": read_embeds(prompt_path, "prompt embeddings")}
    if negative_embeds:
        embeds["predictor_negative_embeds"] = read_embeds(negative_embeds, "negative prompt embeddings")
    image = ModelPackage.load_manifest(resolve(image_model))
    video = {"predictor": KIND, "cond_frames": 1, "pred_frames": pred_frames, "steps": steps,
             "guidance_scale": guidance_scale, "dtype": dtype}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        package_dir = tmp / "package"
        shutil.copytree(image.root, package_dir, ignore=shutil.ignore_patterns(".*"))
        manifest = json.loads((package_dir / "ulbc_model.json").read_text())
        for name, tensor in embeds.items():
            save_file({"prompt_embeds": tensor}, str(package_dir / f"{name}.safetensors"))
            components[name] = {"class": "PromptEmbeddings", "weights": f"{name}.safetensors"}
        levels = [RateLevel(**lv) for lv in manifest["rate_levels"]]
        write_manifest(package_dir, out.name, {**manifest["components"], **components}, levels,
                       description=f"{image.name} + image-to-video predictor {base}",
                       extra={**manifest.get("extra", {}), "video": video}, next_frame=manifest.get("next_frame"))
        # Check that it loads and the predictor fits, before it gets its name.
        try:
            VideoCodec(ModelPackage.load_manifest(package_dir, verify=False)).predictor
        except ValueError as exc:
            raise ModelError(f"{base}: {exc}") from None
        if out.exists():  # --force: the old package goes only once the new one is complete
            os.replace(out, tmp / "old")
        os.replace(package_dir, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ModelPackage.load_manifest(out, verify=False)
