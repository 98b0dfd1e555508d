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

Each component names where its weights are, as exactly one of:

- ``"weights"``: one safetensors file in the package;
- ``"levels"``: one safetensors file per rate level, ``{"0": file, "1": file, ...}``
  (imported NeFIC checkpoints: one anchor codec and one LoRA per rate point);
- ``"diffusers"``: a sub-directory in diffusers' layout;
- ``"external"``: ``{"path": absolute directory, "digest": fingerprint}``, a diffusers
  directory outside the package (the 5B base model of an imported NeFIC package is
  referenced, not copied; see :func:`external_digest`).

Only JSON and safetensors are ever read from a package: nothing is unpickled or
executed, and a component's class is looked up in a fixed table of ulbc classes, never
imported by name. The *digest* is a SHA-256 over the canonical JSON of every component's
class and config plus the SHA-256 of every weights file; its first 8 bytes go into every
bitstream so that decoding with a different model is refused instead of producing
garbage. Loading verifies the recorded digest against the files on disk. An external
directory enters the digest through its recorded fingerprint, which loading checks
against the directory (its path does not enter the digest: a moved base model only
needs the path edited).

A manifest may also hold ``"next_frame"``, settings of the next-frame decoder that are
not weights (:data:`NEXT_FRAME_SETTINGS`); they change decoded pixels, so they enter the
digest too.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from ulbcodec.threads import torch_threads

MANIFEST = "ulbc_model.json"
FORMAT = "ulbc-model"
FORMAT_VERSION = 3  # 2: components with "levels" or "external"; 3: "next_frame" settings (others: 1)
DIGEST_BYTES = 8
# Next-frame decoder settings a manifest may give, with their allowed values (the first
# is the default): "output" is what the VAE-decoded prediction becomes, see
# ulbcodec/models/next_frame.py.
NEXT_FRAME_SETTINGS = {"output": ("latent", "anchor_residual")}


class ModelError(ValueError):
    """A model package is missing, malformed, or does not match its digest."""


class BadPackageError(ModelError):
    """A model package that exists but cannot be used: one line ``bad model package: ...``."""


# The largest integer a ulbc component's config may hold (channels, slices, levels): a
# config is checked before any module is built from it, so that N = 2^31 cannot allocate
# tens of GB and N = -48 cannot end in an internal error.
MAX_CONFIG_INT = 1 << 16


def _bad(exc: BaseException) -> BadPackageError:
    if isinstance(exc, BadPackageError):
        return exc
    text = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
    return BadPackageError(f"bad model package: {text}")


def _inside(root: Path, file: Path) -> None:
    """Refuse a file whose resolved path leaves the package (a symbolic link out of it)."""
    real, base = os.path.realpath(file), os.path.realpath(root)
    if os.path.commonpath([real, base]) != base:
        raise ModelError(f"{file}: a link to {real}, outside the package")


def _check_config(path: Path, name: str, config) -> None:
    if not isinstance(config, dict):
        raise ModelError(f"{path}: component {name!r} config must be an object")
    for key, value in config.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, int) and not 0 <= value <= MAX_CONFIG_INT:
            raise ModelError(f"{path}: component {name!r} config {key} = {value} outside 0..{MAX_CONFIG_INT}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ModelError(f"{path}: component {name!r} config {key} = {value} is not finite")


def safetensors_shapes(path: Path) -> Dict[str, Tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header, without reading the tensors."""
    try:
        header = json.loads(safetensors_header(path)[8:])
        return {k: tuple(int(n) for n in v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ModelError(f"{path}: unreadable safetensors header ({exc.__class__.__name__})") from None


PROMPT_EMBEDS = "PromptEmbeddings"  # pseudo class: one tensor named "prompt_embeds"
LORA = "LoRA"  # pseudo class: LoRA tensors for the transformer, as published (models/lora.py)
SOURCES = ("weights", "levels", "diffusers", "external")  # where a component's weights are
# Files a diffusers component directory may hold: configs and safetensors, nothing else
# (a stray pickle such as diffusion_pytorch_model.bin is refused, not ignored).
DIFFUSERS_SUFFIXES = (".json", ".safetensors")


# A fixed table: a manifest can only name these classes (never a module path to import).
DIFFUSERS_CLASSES = ("AutoencoderKLCogVideoX", "CogVideoXTransformer3DModel", "CogVideoXDDIMScheduler",
                     "CogVideoXDPMScheduler", "UNet2DModel")
KNOWN_CLASSES = ("AnchorCodec", "PFrameCodec", "TemporalLatentPrior", "TemporalFusion", PROMPT_EMBEDS,
                 LORA) + DIFFUSERS_CLASSES


def _component_class(name: str) -> Callable:
    # Imported on use: an image-only package never imports diffusers.
    if name == "AnchorCodec":
        from ulbcodec.models.anchor_codec import AnchorCodec

        return AnchorCodec
    if name == "PFrameCodec":
        from ulbcodec.models.pframe_codec import PFrameCodec

        return PFrameCodec
    if name == "TemporalLatentPrior":
        from ulbcodec.models.latent_conditional_codec import TemporalLatentPrior

        return TemporalLatentPrior
    if name == "TemporalFusion":
        from ulbcodec.models.temporal_fusion import TemporalFusion

        return TemporalFusion
    if name in DIFFUSERS_CLASSES:
        import diffusers

        return getattr(diffusers, name)
    raise ModelError(f"unknown component class {name!r}")


# torch.nn.init's in-place initialisers: a module built only to receive a whole checked
# state dict need not draw random weights first (most of the anchor codec's build time).
_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                 "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                 "sparse_")
_INIT_LOCK = threading.Lock()


@contextlib.contextmanager
def skipped_weight_init() -> Iterator[None]:
    """Within: torch.nn.init's initialisers leave their tensor as allocated. Only for a
    module whose every parameter and buffer a strict ``load_state_dict`` then fills."""
    with _INIT_LOCK:  # one build at a time swaps them, so the originals are always what is restored
        saved = {name: getattr(torch.nn.init, name) for name in _INITIALISERS}
        try:
            for name in _INITIALISERS:
                setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
            yield
        finally:
            for name, function in saved.items():
                setattr(torch.nn.init, name, function)


def _component_files(root: Path, comp: dict) -> List[Path]:
    """The package files a component's digest covers, in a fixed order (an external
    directory is covered by its fingerprint instead)."""
    if comp.get("weights"):
        return [root / comp["weights"]]
    if comp.get("levels"):
        return [root / comp["levels"][k] for k in sorted(comp["levels"], key=int)]
    if comp.get("diffusers"):
        folder = root / comp["diffusers"]
        return sorted(p for p in folder.rglob("*") if p.is_file())
    return []


def weight_file_sets(root: Path, comp: dict) -> List[List[Path]]:
    """The safetensors files a component loads, as alternatives: one set, or one per
    rate level for a per-level component (one level's file is loaded at a time). An
    external directory counts; a missing file or folder is left out (for estimates)."""
    root = Path(root)
    if comp.get("weights"):
        return [[root / comp["weights"]]]
    if comp.get("levels"):
        return [[root / f] for f in comp["levels"].values()]
    folder = component_folder(root, comp)
    return [sorted(folder.rglob("*.safetensors")) if folder.is_dir() else []]


def component_folder(root: Path, comp: dict) -> Path:
    """The diffusers directory of a component: its sub-directory, or the external one."""
    return Path(comp["external"]["path"]) if comp.get("external") else Path(root) / comp.get("diffusers", "")


def sha256_file(path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def safetensors_header(path: Path) -> bytes:
    """The 8-byte length and the JSON header (names, dtypes, shapes, offsets) of a file."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < size <= min(100 << 20, path.stat().st_size - 8):
            raise ModelError(f"{path}: not a safetensors file")
        return head + f.read(size)


def external_digest(folder) -> str:
    """Fingerprint of a diffusers directory outside the package.

    SHA-256 over every ``.json`` and ``.safetensors`` file (sorted relative paths; hidden
    paths skipped): its path and size, the whole of a JSON file (configs, shard index)
    and the header of a safetensors file (every tensor's name, dtype, shape and offsets).
    It reads a few hundred KB where hashing the 5B base model's ~20 GB would cost about a
    minute on every load, and it catches another model or revision, a changed config, a
    truncated, re-sharded or re-typed download. It does not catch an in-place edit of
    tensor values that keeps every size: the base model is the user's own download.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(DIFFUSERS_SUFFIXES)
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise ModelError(f"{folder}: no JSON or safetensors files")
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.relative_to(folder).as_posix()}\0{path.stat().st_size}\0".encode())
        h.update(path.read_bytes() if path.suffix == ".json" else safetensors_header(path))
    return h.hexdigest()


def compute_digest(components: Dict[str, dict], root: Path, next_frame: Optional[dict] = None) -> str:
    """SHA-256 over canonical component descriptions and the hashes of their weights
    (and the next-frame settings, when there are any: older digests are unchanged)."""
    h = hashlib.sha256()
    if next_frame:
        h.update(json.dumps({"next_frame": next_frame}, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(components):
        comp = components[name]
        desc = {"name": name, "class": comp["class"], "config": comp.get("config", {})}
        if comp.get("levels"):  # (added only when present: older digests are unchanged)
            desc["levels"] = comp["levels"]
        if comp.get("external"):
            desc["external"] = comp["external"]["digest"]
        h.update(json.dumps(desc, sort_keys=True, separators=(",", ":")).encode())
        for path in _component_files(root, comp):
            if comp.get("diffusers"):
                h.update(path.relative_to(root).as_posix().encode())
            h.update(sha256_file(path).encode())
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
    next_frame: dict = field(default_factory=dict)  # next-frame decoder settings (NEXT_FRAME_SETTINGS)

    @property
    def short_digest(self) -> bytes:
        return bytes.fromhex(self.digest)[:DIGEST_BYTES]

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def per_level(self, component: str) -> bool:
        """Whether ``component`` has one weights file per rate level."""
        return bool(self.components.get(component, {}).get("levels"))

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
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ModelError(f"{path}: not a ulbc model manifest")
        try:
            return cls._checked(root, path, manifest, verify)
        except (ModelError, TypeError, KeyError, AttributeError, ValueError, OSError) as exc:
            raise _bad(exc) from None

    @classmethod
    def _checked(cls, root: Path, path: Path, manifest: dict, verify: bool) -> "ModelPackage":
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise ModelError(f"{path}: model format version {manifest['format_version']} is newer than this ulbc")
        components = manifest.get("components") or {}
        levels = [RateLevel(**lv) for lv in manifest.get("rate_levels", [])]
        for name, comp in components.items():
            _check_component(root, name, comp, {str(lv.level) for lv in levels})
        next_frame = manifest.get("next_frame") or {}
        _check_next_frame(path, next_frame)
        digest = manifest.get("digest", "")
        if verify:
            for comp in components.values():
                if comp.get("external"):
                    _verify_external(root, comp["external"])
            actual = compute_digest(components, root, next_frame)
            if actual != digest:
                raise ModelError(
                    f"{root}: files do not match the recorded digest (recorded {digest[:16]}, "
                    f"found {actual[:16]}); the package was modified or is incomplete"
                )
        return cls(root, manifest.get("name", root.name), components, levels, digest,
                   manifest.get("description", ""), manifest.get("extra", {}), next_frame)

    def next_frame_setting(self, key: str) -> str:
        return self.next_frame.get(key, NEXT_FRAME_SETTINGS[key][0])

    def build(self, component: str, device: str = "cpu", level: Optional[int] = None,
              dtype: torch.dtype = torch.float32):
        """Instantiate a component and load its weights strictly.

        ulbc classes are built from the manifest's config; diffusers components through
        their own ``from_pretrained`` on the sub-directory (or external directory),
        safetensors only, offline. A prompt-embeddings component is returned as a tensor,
        a LoRA as the file's tensors (``models/lora.py`` applies them). ``level`` picks
        the file of a per-level component and is ignored by the others; ``dtype`` is the
        one diffusers modules are loaded in (ulbcodec/placement.py: bfloat16 on a GPU).
        """
        if component not in self.components:
            raise ModelError(f"model {self.name!r} has no component {component!r}")
        try:
            return self._build(component, device, level, dtype)
        except (ModelError, RuntimeError, TypeError, KeyError, ValueError, OSError) as exc:
            if isinstance(exc, ModelError) and "has no weights for rate level" in str(exc):
                raise
            raise _bad(exc if str(self.root) in str(exc) else type(exc)(f"{self.root}: {component}: {exc}")) from None

    def check_shapes(self, component: str) -> None:
        """Build a ulbc component on the meta device (no memory) from its config and
        compare every tensor shape with its safetensors headers, before any weight is
        read: a header of 2^31 x 2^31 or a config that does not match its weights is
        refused here. Diffusers components are checked by diffusers' own loader."""
        comp = self.components[component]
        if comp["class"] in (PROMPT_EMBEDS, LORA) or comp["class"] in DIFFUSERS_CLASSES:
            return
        marker = self._shape_check_marker(component)
        if marker is not None and marker.exists():
            return
        from unittest import mock

        cls = _component_class(comp["class"])  # imports CompressAI (ulbcodec/_compressai.py)
        from compressai.ops.parametrizers import NonNegativeParametrizer

        # GDN's parametrizer mixes a CPU constant into its init, which a meta tensor refuses;
        # only shapes are wanted here. Arithmetic on meta tensors runs Python reference
        # kernels that import sympy and torch._dynamo (~0.5 s of a cold start,
        # docs/measurements.md), so GDN's one product (gain x identity) is done on a CPU
        # square instead (at most 4096² floats: the constructors bound the channels).
        with torch.device("meta"), mock.patch.object(NonNegativeParametrizer, "init", lambda self, x: x), \
                mock.patch.object(torch, "eye", lambda n, *args, **kwargs: torch.empty(n, n, device="cpu")), \
                skipped_weight_init():
            module = cls(**comp.get("config", {}))
        # Parameters have the config's shapes; buffers (CompressAI's CDF tables) take the
        # file's shapes at load, so only their names are compared.
        expected = {k: tuple(v.shape) for k, v in module.named_parameters()}
        names = set(module.state_dict())
        for files in weight_file_sets(self.root, comp):
            for file in files:
                found = safetensors_shapes(file)
                wrong = [k for k in names | found.keys()
                         if k not in names or k not in found or (k in expected and expected[k] != found[k])]
                if wrong:
                    k = sorted(wrong)[0]
                    raise ModelError(f"{file}: tensor {k} has shape {found.get(k, 'missing')}, the config makes "
                                     f"{expected.get(k, 'none')} ({len(wrong)} tensors differ)")
        if marker is not None:
            try:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
            except OSError:
                pass  # a read-only cache only costs the check next time

    def _shape_check_marker(self, component: str) -> Optional[Path]:
        """Where a passed :meth:`check_shapes` is remembered on this machine, so that the
        next process skips its meta-device build (which imports sympy and torch._dynamo:
        ~0.5 s of every cold start). Keyed by the manifest's digest, the component's entry
        and each weight file's real path, size, mtime and inode: a changed, replaced or
        new file is checked again. None when a file cannot be read (the check reports it)."""
        comp = self.components[component]
        key = hashlib.sha256(json.dumps([self.digest, component, comp], sort_keys=True).encode())
        try:
            for files in weight_file_sets(self.root, comp):
                for f in files:
                    st = os.stat(f)
                    key.update(f"\0{os.path.realpath(f)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
                               f"\0{st.st_dev}".encode())
        except OSError:
            return None
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(cache) / "ulbc" / "shape-checks" / key.hexdigest()

    def _build(self, component: str, device, level, dtype):
        comp = self.components[component]
        if comp.get("levels"):
            if str(level) not in comp["levels"]:
                raise ModelError(f"model {self.name!r}: component {component!r} has no weights for rate level {level}")
            weights = self.root / comp["levels"][str(level)]
        else:
            weights = self.root / comp["weights"] if comp.get("weights") else None
        if comp["class"] == PROMPT_EMBEDS:
            tensors = load_file(str(weights), device="cpu")
            if set(tensors) != {"prompt_embeds"}:
                raise ModelError(f"{weights}: expected one tensor named 'prompt_embeds'")
            return tensors["prompt_embeds"].float().to(device)
        if comp["class"] == LORA:
            return load_file(str(weights), device="cpu")
        cls = _component_class(comp["class"])
        if not comp.get("diffusers") and not comp.get("external"):
            self.check_shapes(component)  # before any allocation
        # One intra-op thread: building and loading is hundreds of small init and copy ops
        # (from the memory-mapped safetensors file), each of which would otherwise wake and
        # wait for an OpenMP team (docs/measurements.md).
        with torch_threads(1):
            if comp.get("diffusers"):
                return _load_diffusers(cls, self.root / comp["diffusers"], device, dtype)
            if comp.get("external"):
                return _load_diffusers(cls, Path(comp["external"]["path"]), device, dtype)
            with skipped_weight_init():
                module = cls(**comp.get("config", {}))
            state = load_file(str(weights), device="cpu")
            module.load_state_dict(state, strict=True)  # every parameter and buffer: none left unset
            return module.to(device).eval()


def _check_next_frame(path: Path, settings) -> None:
    if not isinstance(settings, dict):
        raise ModelError(f"{path}: \"next_frame\" must be an object")
    for key, value in settings.items():
        if key not in NEXT_FRAME_SETTINGS:
            raise ModelError(f"{path}: unknown next_frame setting {key!r}")
        if value not in NEXT_FRAME_SETTINGS[key]:
            raise ModelError(f"{path}: next_frame {key} must be one of {', '.join(NEXT_FRAME_SETTINGS[key])}, "
                             f"got {value!r}")


def _check_weights_name(root: Path, name: str, weights) -> None:
    if (not isinstance(weights, str) or not weights.endswith(".safetensors") or "/" in weights
            or weights.startswith(".")):
        raise ModelError(f"{root / MANIFEST}: component {name!r} weights must be a .safetensors file in the package")
    if not (root / weights).is_file():
        raise ModelError(f"{root}: missing weights file {weights}")
    _inside(root, root / weights)


def _check_component(root: Path, name: str, comp: dict, level_names) -> None:
    """Refuse a manifest entry that names an unknown class, a file outside the package,
    a non-safetensors file, or levels other than the package's rate levels."""
    path = root / MANIFEST
    if comp.get("class") not in KNOWN_CLASSES:
        raise ModelError(f"{path}: component {name!r} has unknown class {comp.get('class')!r}")
    given = [key for key in SOURCES if comp.get(key) is not None]
    if len(given) != 1:
        raise ModelError(f"{path}: component {name!r} needs exactly one of " + ", ".join(map(repr, SOURCES)))
    weights, levels, folder, external = (comp.get(key) for key in SOURCES)
    if comp.get("config") is not None:
        _check_config(path, name, comp["config"])
    if weights is not None:
        _check_weights_name(root, name, weights)
    if levels is not None:
        if not isinstance(levels, dict) or set(levels) != set(level_names) or comp["class"] in DIFFUSERS_CLASSES:
            raise ModelError(f"{path}: component {name!r} needs one weights file per rate level "
                             f"({', '.join(sorted(level_names, key=int)) or 'none declared'})")
        for file in levels.values():
            _check_weights_name(root, name, file)
    if folder is not None:
        if not isinstance(folder, str) or "/" in folder or folder.startswith(".") or not (root / folder).is_dir():
            raise ModelError(f"{root}: component {name!r} needs a sub-directory, got {folder!r}")
        _inside(root, root / folder)
        for file in (root / folder).rglob("*"):
            if file.is_file() and not file.name.endswith(DIFFUSERS_SUFFIXES):
                raise ModelError(f"{file}: only JSON and safetensors files may be in a model package")
            _inside(root, file)
    if external is not None:
        if (comp["class"] not in DIFFUSERS_CLASSES or not isinstance(external, dict)
                or not isinstance(external.get("digest"), str) or not os.path.isabs(str(external.get("path", "")))):
            raise ModelError(f"{path}: component {name!r}: 'external' needs an absolute 'path' and a 'digest' "
                             "of a diffusers directory")
        if not Path(external["path"]).is_dir():
            raise ModelError(f"{external['path']}: base model directory not found (component {name!r} of {root})")


def _verify_external(root: Path, external: dict) -> None:
    found = external_digest(external["path"])
    if found != external["digest"]:
        raise ModelError(
            f"{external['path']}: the base model differs from the one imported into {root} (fingerprint "
            f"recorded {external['digest'][:16]}, found {found[:16]}); restore it or import the package again"
        )


def _load_diffusers(cls, folder: Path, device: str, dtype: torch.dtype = torch.float32):
    if not hasattr(cls, "save_pretrained") or not hasattr(cls, "parameters"):  # a scheduler: config only
        return cls.from_pretrained(str(folder))
    try:
        # low_cpu_mem_usage builds the module on the meta device and fills it from the
        # file (with accelerate installed): no random initialisation of a 5B model in
        # float32 (minutes and ~20 GB) before its weights replace it.
        module = cls.from_pretrained(str(folder), use_safetensors=True, local_files_only=True, torch_dtype=dtype,
                                     low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
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
    next_frame: Optional[dict] = None,
) -> ModelPackage:
    """Write a package: one safetensors file (or diffusers directory) per component plus
    the manifest. ``modules`` maps component names to ulbc modules, diffusers models or
    schedulers, or a tensor (prompt embeddings).

    ``half_parameters`` stores learnable parameters as float16 (half the size) and is only
    allowed when they are exactly representable in float16 (round them first, then build
    the CDF tables: see ``ulbcodec.train.anchor.export``); buffers such as CDF and scale
    tables stay in their own dtype. Loading casts them back to float32 exactly.
    ``diffusers_dtype`` (e.g. bfloat16, the dtype they run in) stores diffusers models
    rounded to it; they are loaded back as float32. ``next_frame``: the next-frame
    decoder's settings (:data:`NEXT_FRAME_SETTINGS`), if not the defaults.
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
    write_manifest(root, name, components, rate_levels, description, extra, next_frame)
    return ModelPackage.load_manifest(root)


def save_derived_package(base: "ModelPackage", root, components: Dict[str, torch.nn.Module], extra: dict,
                         name: Optional[str] = None, description: Optional[str] = None,
                         rate_levels: Optional[List[RateLevel]] = None) -> "ModelPackage":
    """``base`` written to ``root`` with ``components`` added or replacing its own; every
    other component, its rate levels (unless ``rate_levels`` are given) and next-frame
    settings unchanged, ``extra`` merged into its extra. Stored as the shipped packages
    are: parameters in float16 (round them and rebuild CDF tables first), diffusers
    models in bfloat16. How trainers add a model (a predictor, a P-frame codec, a
    fine-tuned keyframe codec) to a package."""
    modules = {n: base.build(n) for n in base.components if n not in components}
    modules.update(components)
    return save_package(root, name or base.name, modules, rate_levels or base.rate_levels, half_parameters=True,
                        diffusers_dtype=torch.bfloat16, extra={**base.extra, **extra}, next_frame=base.next_frame,
                        description=base.description if description is None else description)


def write_manifest(root, name: str, components: Dict[str, dict], rate_levels: List[RateLevel], description: str = "",
                   extra: Optional[dict] = None, next_frame: Optional[dict] = None) -> str:
    """Write ``ulbc_model.json`` for components whose files are already in ``root``
    (atomically: a temporary file renamed into place). Returns the digest."""
    root = Path(root)
    next_frame = next_frame or {}
    _check_next_frame(root / MANIFEST, next_frame)
    version = 3 if next_frame else 2 if any(c.get("levels") or c.get("external") for c in components.values()) else 1
    manifest = {
        "format": FORMAT,
        "format_version": version,
        "name": name,
        "description": description,
        "components": components,
        "rate_levels": [vars(lv) for lv in rate_levels],
        "digest": compute_digest(components, root, next_frame),
        "extra": extra or {},
    }
    if next_frame:
        manifest["next_frame"] = next_frame
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, root / MANIFEST)
    return manifest["digest"]


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
    paths.append(Path(__file__).resolve().parents[2] / "models")  # src/ulbcodec/packages.py -> the project
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
