"""Model packages: a plain directory with a JSON manifest and safetensors weights.

::

    models/generative/
      ulbc_model.json            manifest: format version, components, classes, configs,
                                 rate levels, digest
      anchor_codec.safetensors   weights of the component "anchor_codec"
      prompt_embeds.safetensors  a fixed tensor ("prompt_embeds")
      vae/                       diffusers components in diffusers' own layout:
        config.json                config.json + diffusion_pytorch_model.safetensors,
        diffusion_pytorch_model.safetensors     read by ``from_pretrained``
      transformer/ ...
      scheduler/scheduler_config.json

An image-only package (models/default) has just the manifest and anchor_codec.

Only JSON and safetensors are ever read from a package: nothing is unpickled or
executed, and a component's class is looked up in a fixed table of ulbc classes, never
imported by name. The *digest* is a SHA-256 over the canonical JSON of every component's
class and config plus the SHA-256 of every weights file; its first 8 bytes go into every
bitstream so that decoding with a different model is refused instead of producing
garbage. Loading verifies the recorded digest against the files on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "ulbc_model.json"
FORMAT = "ulbc-model"
FORMAT_VERSION = 1
DIGEST_BYTES = 8


class ModelError(ValueError):
    """A model package is missing, malformed, or does not match its digest."""


PROMPT_EMBEDS = "PromptEmbeddings"  # pseudo class: one tensor named "prompt_embeds"
# Files a diffusers component directory may hold: configs and safetensors, nothing else
# (a stray pickle such as diffusion_pytorch_model.bin is refused, not ignored).
DIFFUSERS_SUFFIXES = (".json", ".safetensors")


# A fixed table: a manifest can only name these classes (never a module path to import).
DIFFUSERS_CLASSES = ("AutoencoderKLCogVideoX", "CogVideoXTransformer3DModel", "CogVideoXDDIMScheduler",
                     "CogVideoXDPMScheduler", "UNet2DModel")
KNOWN_CLASSES = ("AnchorCodec", PROMPT_EMBEDS) + DIFFUSERS_CLASSES


def _component_class(name: str) -> Callable:
    # Imported on use: an image-only package never imports diffusers.
    if name == "AnchorCodec":
        from ulbcodec.models.anchor_codec import AnchorCodec

        return AnchorCodec
    if name in DIFFUSERS_CLASSES:
        import diffusers

        return getattr(diffusers, name)
    raise ModelError(f"unknown component class {name!r}")


def _component_files(root: Path, comp: dict) -> List[Path]:
    """The files a component's digest covers, in a fixed order."""
    if comp.get("weights"):
        return [root / comp["weights"]]
    if comp.get("diffusers"):
        folder = root / comp["diffusers"]
        return sorted(p for p in folder.rglob("*") if p.is_file())
    return []


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def compute_digest(components: Dict[str, dict], root: Path) -> str:
    """SHA-256 over canonical component descriptions and the hashes of their weights."""
    h = hashlib.sha256()
    for name in sorted(components):
        comp = components[name]
        desc = {"name": name, "class": comp["class"], "config": comp.get("config", {})}
        h.update(json.dumps(desc, sort_keys=True, separators=(",", ":")).encode())
        for path in _component_files(root, comp):
            if comp.get("diffusers"):
                h.update(path.relative_to(root).as_posix().encode())
            h.update(_sha256_file(path).encode())
    return h.hexdigest()


@dataclass
class RateLevel:
    """One operating point of a model (a gain-vector index of the anchor codec)."""

    level: int
    lmbda: float = 0.0
    note: str = ""


@dataclass
class ModelPackage:
    root: Path
    name: str
    components: Dict[str, dict]
    rate_levels: List[RateLevel]
    digest: str
    description: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def short_digest(self) -> bytes:
        return bytes.fromhex(self.digest)[:DIGEST_BYTES]

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    @property
    def is_generative(self) -> bool:
        """Has a next-frame decoder (VAE + transformer + scheduler + prompt embeddings)."""
        return all(c in self.components for c in ("vae", "transformer", "scheduler", "prompt_embeds"))

    @classmethod
    def load_manifest(cls, root, verify: bool = True) -> "ModelPackage":
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise ModelError(f"{root}: not a ulbc model package (no {MANIFEST})")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path}: unreadable manifest ({exc})") from None
        if manifest.get("format") != FORMAT:
            raise ModelError(f"{path}: not a ulbc model manifest")
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise ModelError(f"{path}: model format version {manifest['format_version']} is newer than this ulbc")
        components = manifest.get("components") or {}
        for name, comp in components.items():
            if comp.get("class") not in KNOWN_CLASSES:
                raise ModelError(f"{path}: component {name!r} has unknown class {comp.get('class')!r}")
            weights, folder = comp.get("weights"), comp.get("diffusers")
            if (weights is None) == (folder is None):
                raise ModelError(f"{path}: component {name!r} needs exactly one of 'weights' or 'diffusers'")
            if weights is not None:
                if not weights.endswith(".safetensors") or "/" in weights or weights.startswith("."):
                    raise ModelError(f"{path}: component {name!r} weights must be a .safetensors file in the package")
                if not (root / weights).is_file():
                    raise ModelError(f"{root}: missing weights file {weights}")
            if folder is not None:
                if not isinstance(folder, str) or "/" in folder or folder.startswith(".") or not (root / folder).is_dir():
                    raise ModelError(f"{root}: component {name!r} needs a sub-directory, got {folder!r}")
                for file in (root / folder).rglob("*"):
                    if file.is_file() and not file.name.endswith(DIFFUSERS_SUFFIXES):
                        raise ModelError(f"{file}: only JSON and safetensors files may be in a model package")
        digest = manifest.get("digest", "")
        if verify:
            actual = compute_digest(components, root)
            if actual != digest:
                raise ModelError(
                    f"{root}: files do not match the recorded digest (recorded {digest[:16]}, "
                    f"found {actual[:16]}); the package was modified or is incomplete"
                )
        levels = [RateLevel(**lv) for lv in manifest.get("rate_levels", [])]
        return cls(root, manifest.get("name", root.name), components, levels, digest,
                   manifest.get("description", ""), manifest.get("extra", {}))

    def build(self, component: str, device: str = "cpu"):
        """Instantiate a component and load its weights strictly.

        ulbc classes are built from the manifest's config; diffusers components through
        their own ``from_pretrained`` on the sub-directory, safetensors only, offline.
        A prompt-embeddings component is returned as a tensor.
        """
        if component not in self.components:
            raise ModelError(f"model {self.name!r} has no component {component!r}")
        comp = self.components[component]
        if comp["class"] == PROMPT_EMBEDS:
            tensors = load_file(str(self.root / comp["weights"]), device="cpu")
            if set(tensors) != {"prompt_embeds"}:
                raise ModelError(f"{self.root / comp['weights']}: expected one tensor named 'prompt_embeds'")
            return tensors["prompt_embeds"].float().to(device)
        cls = _component_class(comp["class"])
        if comp.get("diffusers"):
            return _load_diffusers(cls, self.root / comp["diffusers"], device)
        module = cls(**comp.get("config", {}))
        state = load_file(str(self.root / comp["weights"]), device="cpu")
        module.load_state_dict(state, strict=True)
        return module.to(device).eval()


def _load_diffusers(cls, folder: Path, device: str):
    if not hasattr(cls, "save_pretrained") or not hasattr(cls, "parameters"):  # a scheduler: config only
        return cls.from_pretrained(str(folder))
    try:
        module = cls.from_pretrained(str(folder), use_safetensors=True, local_files_only=True, torch_dtype=torch.float32,
                                     low_cpu_mem_usage=False)  # accelerate is not a dependency
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{folder}: cannot load {cls.__name__} ({str(exc).splitlines()[0]})") from None
    # Tensors loaded from a file are not 64-byte aligned, which made some kernels differ by
    # ~1e-6 from a freshly built model (DESIGN.md §4); owned copies restore bit-exactness.
    with torch.no_grad():
        for param in module.parameters():
            param.data = param.data.clone()
    return module.to(device).eval()


def save_package(
    root,
    name: str,
    modules: Dict[str, torch.nn.Module],
    rate_levels: List[RateLevel],
    description: str = "",
    extra: Optional[dict] = None,
    half_parameters: bool = False,
    diffusers_dtype: torch.dtype = torch.float32,
) -> ModelPackage:
    """Write a package: one safetensors file (or diffusers directory) per component plus
    the manifest. ``modules`` maps component names to ulbc modules, diffusers models or
    schedulers, or a tensor (prompt embeddings).

    ``half_parameters`` stores learnable parameters as float16 (half the size) and is only
    allowed when they are exactly representable in float16 (round them first, then build
    the CDF tables: see ``ulbcodec.train.anchor.export``); buffers such as CDF and scale
    tables stay in their own dtype. Loading casts them back to float32 exactly.
    ``diffusers_dtype`` (e.g. bfloat16, the dtype they run in) stores diffusers models
    rounded to it; they are loaded back as float32.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    components = {}
    for cname, module in modules.items():
        if isinstance(module, torch.Tensor):
            save_file({"prompt_embeds": module.detach().cpu().contiguous()}, str(root / f"{cname}.safetensors"))
            components[cname] = {"class": PROMPT_EMBEDS, "weights": f"{cname}.safetensors"}
            continue
        if type(module).__name__ in DIFFUSERS_CLASSES:
            _save_diffusers(module, root / cname, diffusers_dtype)
            components[cname] = {"class": type(module).__name__, "diffusers": cname}
            continue
        weights = f"{cname}.safetensors"
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        if half_parameters:
            for pname, _ in module.named_parameters():
                half = state[pname].half()
                if not torch.equal(half.float(), state[pname]):
                    raise ValueError(f"parameter {pname} is not exactly representable in float16")
                state[pname] = half
        save_file(state, str(root / weights))
        components[cname] = {"class": type(module).__name__, "config": module.config, "weights": weights}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "description": description,
        "components": components,
        "rate_levels": [vars(lv) for lv in rate_levels],
        "digest": compute_digest(components, root),
        "extra": extra or {},
    }
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, root / MANIFEST)
    return ModelPackage.load_manifest(root)


def _save_diffusers(module, folder: Path, dtype: torch.dtype) -> None:
    import shutil

    if folder.exists():
        shutil.rmtree(folder)
    if hasattr(module, "parameters"):
        # diffusers' own layout (config.json + diffusion_pytorch_model.safetensors), written
        # from a rounded copy of the state dict so the module itself is left untouched.
        module.save_config(str(folder))
        state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
                 for k, v in module.state_dict().items()}
        save_file(state, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    else:
        module.save_pretrained(str(folder))


# --------------------------------------------------------------------------- registry


def search_paths() -> List[Path]:
    """Where named models live: $ULBC_MODEL_PATH (colon-separated), then the project's models/."""
    paths = [Path(p) for p in os.environ.get("ULBC_MODEL_PATH", "").split(os.pathsep) if p]
    paths.append(Path(__file__).resolve().parents[3] / "models")
    return paths


def available_models() -> List[Path]:
    found, seen = [], set()
    for base in search_paths():
        if not base.is_dir():
            continue
        for child in sorted(base.iterdir()):
            if (child / MANIFEST).is_file() and child.name not in seen:
                seen.add(child.name)
                found.append(child)
    return found


def resolve(name_or_path: str) -> Path:
    """A model name from the search path, or a directory path."""
    path = Path(name_or_path)
    if (path / MANIFEST).is_file():
        return path
    for candidate in available_models():
        if candidate.name == name_or_path:
            return candidate
    known = ", ".join(p.name for p in available_models()) or "none"
    raise ModelError(f"unknown model {name_or_path!r} (available: {known}); pass a model name or package directory")


def find_by_digest(short_digest: bytes) -> Optional[Path]:
    """The installed package whose digest starts with these bytes, if any."""
    for candidate in available_models():
        try:
            manifest = json.loads((candidate / MANIFEST).read_text())
            if bytes.fromhex(manifest.get("digest", ""))[:DIGEST_BYTES] == short_digest:
                return candidate
        except (OSError, ValueError):
            continue
    return None
