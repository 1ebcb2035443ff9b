"""Test-environment shim: ComfyUI 0.33 imports torchaudio at start-up (comfy/sd.py imports audio VAEs
and text encoders that do `import torchaudio` at module level), and PyPI has no CPU torchaudio wheel
for torch 2.13 (the newest torchaudio is a CUDA build for an older torch). Where no real torchaudio
can be found, `import torchaudio` (and any submodule) gets a stand-in: it imports, and every name in
it is a placeholder class whose use (a call, an instance) raises ImportError naming this shim. So
ComfyUI starts and runs everything that is not audio; audio nodes fail clearly when they run.
A real torchaudio, where one is installed, always wins. Installed only into the project's ComfyUI
0.33 test venv by tools/setup_env.sh (a .pth start-up hook, like torchvision_cpu_shim.py).
stand_in_if_missing(NAME) does the same for another package (benchmarks/gpu_dynamic_vram_check.py:
PyAV, whose 36 MB wheel does not fit what travels to a lent GPU machine; only video I/O uses it)."""
import importlib.abc
import importlib.machinery
import sys
import types

MESSAGE = ("{package} is not installed: this test environment has only cfg-distill's stand-in "
           "(tools/torchaudio_cpu_shim.py){why}")


def _placeholder(qualname):
    package = qualname.split(".")[0]

    def refuse(*_args, **_kwargs):
        raise ImportError(f"{qualname}: " + MESSAGE.format(package=package, why=_REASONS.get(package, "")))

    # A class, so that module-level `class X(torchaudio.transforms.Y)` still imports; calling it
    # (a function call or an instance) refuses.
    return type(qualname.rsplit(".", 1)[-1], (), {"__new__": refuse, "__module__": package})


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _placeholder(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []  # a package: every submodule comes from this finder too
        module.__version__ = "0.0.0+cfg_distill_shim"
        module.CFG_DISTILL_SHIM = True


_REASONS: dict[str, str] = {}


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, package: str):
        self.package = package

    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top != self.package:
            return None
        # This finder is the last one on sys.meta_path: it is asked only when no other finder
        # found the name, i.e. when there is no real installation.
        if name != top and not getattr(sys.modules.get(top), "CFG_DISTILL_SHIM", False):
            return None  # a missing submodule of a real installation
        return importlib.machinery.ModuleSpec(name, _Loader(), is_package=True)


def stand_in_if_missing(package: str, why: str = "") -> None:
    """Give `import PACKAGE` a stand-in where no real PACKAGE is installed (a real one always wins)."""
    if not any(isinstance(f, _Finder) and f.package == package for f in sys.meta_path):
        _REASONS[package] = why
        sys.meta_path.append(_Finder(package))


stand_in_if_missing("torchaudio", ", because PyPI has no CPU torchaudio for this torch")
