"""Import CompressAI on a CPU-only PyTorch that has no torchvision.

CompressAI 1.2.8 imports ``torchvision.transforms`` at import time for one reason only:
``compressai/registry/transforms.py`` copies the public class names of that module into
its transform registry. ulbc never uses that registry. On the CPU build of PyTorch there
is no torchvision that imports (PyPI's wheels are CUDA builds that fail with
"operator torchvision::nms does not exist", and installing torchvision by name replaces
the small CPU torch with a multi-GB CUDA build).

So: if a working torchvision is installed it is used untouched. Otherwise an *empty*
``torchvision`` / ``torchvision.transforms`` placeholder is registered in ``sys.modules``
for the duration of the CompressAI import only, so that registry sees no torchvision
transforms; the placeholder is removed from ``sys.modules`` right after, so other
libraries (diffusers) correctly see torchvision as absent. Any attribute access on the
placeholder raises ImportError, so nothing can silently run against it. ``tests/test_compressai_import.py``
pins this behaviour.
"""

from __future__ import annotations

import sys
import types

PLACEHOLDER_ATTR = "__ulbc_placeholder__"


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


def import_compressai():
    """Return the ``compressai`` module, importing it safely on a torchvision-less torch."""
    if "compressai" in sys.modules:
        return sys.modules["compressai"]
    if not _torchvision_works():
        root = _Placeholder("torchvision")
        transforms = _Placeholder("torchvision.transforms")
        setattr(root, PLACEHOLDER_ATTR, True)
        setattr(transforms, PLACEHOLDER_ATTR, True)
        root.transforms = transforms
        sys.modules["torchvision"] = root
        sys.modules["torchvision.transforms"] = transforms
        try:
            import compressai
        finally:
            del sys.modules["torchvision"], sys.modules["torchvision.transforms"]
    import compressai

    return compressai


compressai = import_compressai()
