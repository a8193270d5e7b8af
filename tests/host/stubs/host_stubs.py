"""Stand-ins for torchvision and torchaudio, for the host tests only (see sitecustomize.py beside this file).

The host venv has CPU torch but no matching torchvision/torchaudio wheels, and ComfyUI imports both at module
level in places (comfy/sd.py -> audio_vae -> torchaudio; model_base -> cosmos -> torchvision; several
comfy_extras). ``install()`` puts a finder at the front of ``sys.meta_path`` that creates stub modules for
each missing package ``P`` and every ``P.<anything>`` on import. Attribute access on a stub module gives a stub object; calling
it (or anything reached from it) raises RuntimeError naming what was called. Probes through
``importlib.util.find_spec`` are answered with None, so the stub does not make libraries believe torchvision
is installed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys

STUB_VERSION = "0.0.0+physmaster.host.stub"
_ROOTS = ("torchvision", "torchaudio")


def _fail(name: str):
    package = name.split(".", 1)[0]
    raise RuntimeError(
        f"{name} was called, but {package} is not installed on this test host: the PhysMaster host tests run "
        f"ComfyUI with a {package} stub (tests/host/stubs). Install a real {package} to use this feature."
    )


class _Missing:
    """A placeholder for any torchvision object: attribute chains work, calling raises."""

    __slots__ = ("_name",)

    def __init__(self, name: str):
        object.__setattr__(self, "_name", name)

    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        _fail(self._name)

    def __mro_entries__(self, bases):  # subclassing a stub class fails only when instantiated
        return (_missing_base(self._name),)

    def __repr__(self):
        return f"<host-test stub {self._name}>"


def _missing_base(name: str) -> type:
    def __init__(self, *args, **kwargs):
        _fail(name)

    return type(name.rsplit(".", 1)[-1], (), {"__init__": __init__})


def _is_find_spec_probe() -> bool:
    """True when the lookup comes from importlib.util.find_spec (a probe), not from an import statement."""
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return False
        code = frame.f_code
        filename = code.co_filename.replace("\\", "/")
        if code.co_name == "find_spec" and (
            filename.endswith("importlib/util.py") or filename == "<frozen importlib.util>"
        ):
            return True
        if code.co_name in ("_find_and_load_unlocked", "_find_and_load", "import_module", "_gcd_import"):
            return False
        frame = frame.f_back
    return False


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None  # default module creation

    def exec_module(self, module):
        name = module.__name__
        module.__path__ = []  # a package, so any submodule can be imported
        module.__version__ = STUB_VERSION
        module.__physmaster_stub__ = True

        def __getattr__(attr: str, _name=name):
            if attr.startswith("__") and attr.endswith("__"):
                raise AttributeError(f"module {_name!r} has no attribute {attr!r}")
            full = f"{_name}.{attr}"
            if full in sys.modules:
                return sys.modules[full]
            return _Missing(full)

        module.__getattr__ = __getattr__


class _StubFinder(importlib.abc.MetaPathFinder):
    def __init__(self, roots):
        self.roots = tuple(roots)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".", 1)[0] not in self.roots:
            return None
        if _is_find_spec_probe():
            return None
        return importlib.machinery.ModuleSpec(fullname, _StubLoader(), is_package=True)


class _TransformersPatchFinder(importlib.abc.MetaPathFinder):
    """After ``transformers.utils.import_utils`` runs, make its package probe answer "absent" for torchvision.

    transformers decides ``is_torchvision_available()`` with ``importlib.util.find_spec``, which returns the
    stub's spec once ComfyUI has imported the stub. Its probe looks ``_is_package_available`` up in the module
    globals at call time, so wrapping that one function right after the module executes covers every caller.
    """

    _TARGET = "transformers.utils.import_utils"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self._TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        inner = spec.loader
        exec_module = inner.exec_module

        def exec_and_patch(module):
            exec_module(module)
            probe = getattr(module, "_is_package_available", None)
            if callable(probe):

                def _is_package_available(pkg_name, *args, **kwargs):
                    if pkg_name in _STUBBED:
                        return (False, "N/A") if (args[:1] or kwargs.get("return_version")) else (False, None)
                    return probe(pkg_name, *args, **kwargs)

                module._is_package_available = _is_package_available

        inner.exec_module = exec_and_patch
        return spec


_STUBBED: set[str] = set()


def install() -> list[str]:
    """Install stubs for those of torchvision/torchaudio that are not really importable; returns their names."""
    if any(isinstance(f, _StubFinder) for f in sys.meta_path):
        return sorted(_STUBBED)
    missing = [root for root in _ROOTS if importlib.machinery.PathFinder.find_spec(root) is None]
    return stub(missing) if missing else []


def stub(roots) -> list[str]:
    """Serve these packages (and every submodule) as stubs from now on, whether installed or not (modules of them
    already imported are dropped); returns every name stubbed so far."""
    roots = [r for r in roots if r not in _STUBBED]
    if roots:
        for m in [m for m in sys.modules if m.split(".")[0] in roots]:
            del sys.modules[m]
        _STUBBED.update(roots)
        sys.meta_path.insert(0, _StubFinder(roots))
        if not any(isinstance(f, _TransformersPatchFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _TransformersPatchFinder())
    return sorted(_STUBBED)
