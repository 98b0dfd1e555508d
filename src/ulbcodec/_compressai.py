"""Import the parts of CompressAI ulbc uses, quickly, on a CPU-only PyTorch without torchvision.

Two problems, one module.

**Start-up.** ``import compressai`` runs its package ``__init__``, which imports every
sub-package: ``compressai.datasets`` (point-cloud datasets that pull in torch_geometric and
torch._dynamo, ~2 s), ``compressai.registry`` (the same, plus torchvision), the model zoo,
and ``scipy.stats`` (~0.9 s, used only to build a Gaussian scale table at export time).
ulbc uses the entropy models, the rANS coder, a few layers and ``CompressionModel``. So the
packages ``compressai``, ``compressai.models`` and ``compressai.latent_codecs`` are
registered as *lazy packages*: the real package objects (same ``__path__``, ``__spec__``)
whose ``__init__`` has not run yet. Importing a submodule (``compressai.entropy_models``,
``compressai.models.base``) works as usual and loads only that submodule and what it
imports; reading any other attribute of a lazy package runs its real ``__init__`` first,
so ``compressai.zoo``, ``compressai.models.bmshj2018_factorized`` or ``import_compressai()``
give the complete CompressAI, unchanged. ``scipy.stats`` (imported by the entropy models
for one call at model-export time) is left to load on first use.

**torchvision.** CompressAI 1.2.8 imports ``torchvision.transforms`` at import time for one
reason only: ``compressai/registry/transforms.py`` copies the public class names of that
module into its transform registry. ulbc never uses that registry. On the CPU build of
PyTorch there is no torchvision that imports (PyPI's wheels are CUDA builds that fail with
"operator torchvision::nms does not exist", and installing torchvision by name replaces
the small CPU torch with a multi-GB CUDA build).

So: if a working torchvision is installed it is used untouched. Otherwise an *empty*
``torchvision`` / ``torchvision.transforms`` placeholder is registered in ``sys.modules``
for the duration of each CompressAI module import only (an import hook on ``compressai.*``),
so that registry sees no torchvision transforms; the placeholder is removed from
``sys.modules`` right after, so other libraries (diffusers) correctly see torchvision as
absent. Any attribute access on the placeholder raises ImportError, so nothing can silently
run against it. ``tests/test_compressai_import.py`` pins this behaviour.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

PLACEHOLDER_ATTR = "__ulbc_placeholder__"

# The packages whose __init__ is deferred, and the submodules ulbc loads (tests pin that
# importing the codec loads none of the heavy rest).
LAZY_PACKAGES = ("compressai", "compressai.models", "compressai.latent_codecs")
CORE_MODULES = ("compressai.ans", "compressai.entropy_models", "compressai.layers", "compressai.ops",
                "compressai.models.base")


class _Placeholder(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(
            f"torchvision is not installed (ulbc registered an empty placeholder so that "
            f"compressai imports on CPU-only torch); '{self.__name__}.{name}' is unavailable"
        )


def _torchvision_works() -> bool:
    try:
        import torchvision  # noqa: F401
        import torchvision.transforms  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


_placeholder_depth = 0


@contextlib.contextmanager
def _torchvision_placeholder():
    """The empty torchvision placeholder in ``sys.modules`` for the duration of the block
    (nested blocks share one; removed when the outermost ends)."""
    global _placeholder_depth
    if _placeholder_depth == 0:
        root = _Placeholder("torchvision")
        transforms = _Placeholder("torchvision.transforms")
        setattr(root, PLACEHOLDER_ATTR, True)
        setattr(transforms, PLACEHOLDER_ATTR, True)
        root.transforms = transforms
        sys.modules["torchvision"] = root
        sys.modules["torchvision.transforms"] = transforms
    _placeholder_depth += 1
    try:
        yield
    finally:
        _placeholder_depth -= 1
        if _placeholder_depth == 0:
            sys.modules.pop("torchvision", None)
            sys.modules.pop("torchvision.transforms", None)


class _PlaceholderLoader(importlib.abc.Loader):
    """Runs a CompressAI module's loader with the torchvision placeholder registered."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self.loader
        with _torchvision_placeholder():
            self.loader.exec_module(module)

    def __getattr__(self, name):  # get_resource_reader, get_source, ... of the real loader
        return getattr(self.loader, name)


class _PlaceholderFinder(importlib.abc.MetaPathFinder):
    """Finds ``compressai.*`` modules as usual and loads them under the placeholder."""

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith("compressai.") or path is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _PlaceholderLoader(spec.loader)
        return spec


class _LazyPackage(types.ModuleType):
    """A package whose ``__init__`` runs on first access to an attribute it lacks (a
    submodule of that name is imported instead, without running the ``__init__``)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        full = f"{self.__name__}.{name}"
        if importlib.machinery.PathFinder.find_spec(full, self.__path__) is not None:
            return importlib.import_module(full)
        _complete(self)
        try:
            return self.__dict__[name]
        except KeyError:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}") from None


def _complete(module: types.ModuleType) -> None:
    """Run a lazy package's real ``__init__`` (once) in its module object."""
    if not isinstance(module, _LazyPackage):
        return
    module.__class__ = types.ModuleType  # no more laziness, also while __init__ runs
    with _torchvision_placeholder() if not _TORCHVISION else contextlib.nullcontext():
        module.__spec__.loader.exec_module(module)


def _lazy_package(name: str, path) -> types.ModuleType:
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None:
        raise ImportError(f"No module named {name!r}")
    module = _LazyPackage(name)
    module.__spec__, module.__loader__, module.__file__ = spec, spec.loader, spec.origin
    module.__path__, module.__package__ = list(spec.submodule_search_locations), name
    sys.modules[name] = module
    if "." in name:
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, module)
    return module


@contextlib.contextmanager
def _scipy_stats_deferred():
    """``import scipy.stats`` inside the block binds ``scipy`` only (a stand-in sits in
    ``sys.modules`` meanwhile); ``scipy.stats`` then loads on first use, through scipy's own
    lazy submodule ``__getattr__``. A no-op when scipy.stats is already imported."""
    if "scipy.stats" in sys.modules:
        yield
        return
    stand_in = types.ModuleType("scipy.stats")
    sys.modules["scipy.stats"] = stand_in
    try:
        yield
    finally:
        if sys.modules.get("scipy.stats") is stand_in:
            del sys.modules["scipy.stats"]
        scipy = sys.modules.get("scipy")
        if scipy is not None and scipy.__dict__.get("stats") is stand_in:
            delattr(scipy, "stats")


def _install_root(root: types.ModuleType) -> None:
    """What ``compressai/__init__.py`` defines besides its imports (the entropy coder
    choice), so the entropy models work before (or without) the real ``__init__``."""
    state = {"coder": "ans", "available": ["ans"]}

    def available_entropy_coders():
        return state["available"]

    def get_entropy_coder():
        return root.__dict__.get("_entropy_coder", state["coder"])

    def set_entropy_coder(entropy_coder):
        if entropy_coder not in available_entropy_coders():
            raise ValueError(f'Invalid entropy coder "{entropy_coder}", choose from'
                             f'({", ".join(available_entropy_coders())}).')
        root._entropy_coder = entropy_coder

    root._entropy_coder = "ans"
    root.available_entropy_coders = available_entropy_coders
    root.get_entropy_coder = get_entropy_coder
    root.set_entropy_coder = set_entropy_coder
    from compressai.version import __version__

    root.__version__ = __version__


def _import_core():
    """The lazy CompressAI packages and the submodules ulbc uses; returns the root package."""
    if "compressai" in sys.modules:  # imported before ulbc (complete, or by this module)
        return sys.modules["compressai"]
    if not _TORCHVISION:
        sys.meta_path.insert(0, _PlaceholderFinder())
    root = _lazy_package("compressai", None)
    try:
        _install_root(root)
        _lazy_package("compressai.models", root.__path__)
        _lazy_package("compressai.latent_codecs", root.__path__)
        # what compressai.models.base, then ulbc, read off the lazy packages
        from compressai.latent_codecs.base import LatentCodec

        sys.modules["compressai.latent_codecs"].LatentCodec = LatentCodec
        with _scipy_stats_deferred():
            for name in CORE_MODULES:
                importlib.import_module(name)
        sys.modules["compressai.models"].CompressionModel = sys.modules["compressai.models.base"].CompressionModel
    except BaseException:
        for name in [m for m in sys.modules if m == "compressai" or m.startswith("compressai.")]:
            del sys.modules[name]
        raise
    return root


def import_compressai():
    """Return the complete ``compressai`` module (every sub-package imported), importing it
    safely on a torchvision-less torch."""
    root = _import_core()
    for name in LAZY_PACKAGES:
        _complete(sys.modules[name])
    return root


_TORCHVISION = "compressai" in sys.modules or _torchvision_works()
compressai = _import_core()
