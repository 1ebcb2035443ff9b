"""Convert an official DICE checkpoint (a plain pickle of {'model': <Sharpener>}) to .safetensors
WITHOUT executing code from the file.

A restricted unpickler resolves only the handful of globals such a file names: the module
classes (replaced by inert stand-ins that just record their state), OrderedDict, and torch's
tensor-rebuild functions. Anything else (os.system, eval, builtins, ...) is refused before it can
run. Tensor storages that torch pickles as nested torch.save bytes are read with torch's
weights-only loader, which itself refuses code."""
from __future__ import annotations

import collections
import io
import pickle

import torch

from .refiner import PARAMETER_NAMES

# Module classes an official Sharpener pickle contains: stand-ins are created for these names.
_MODULE_CLASSES = {
    ("torch.nn.modules.linear", "Linear"), ("torch.nn.modules.container", "Sequential"),
    ("torch.nn.modules.dropout", "Dropout"), ("torch.nn.modules.activation", "ReLU"),
}
_OFFICIAL_CLASS_NAMES = {"Sharpener", "Attention"}  # their module is wherever the training ran


class RefusedPickle(pickle.UnpicklingError):
    pass


class _ModuleState:
    """Inert stand-in for an nn.Module: records the state pickle would have restored."""

    def __init__(self, *args, **kwargs):
        self.state = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}


def _module_class(qualname: str):
    return type(qualname, (_ModuleState,), {})


def _rebuild_parameter(data, requires_grad, backward_hooks, *extra):
    return data  # a Parameter wrapper adds nothing we need


def _load_storage_bytes(b: bytes):
    # torch pickles storages as torch.save() bytes; the weights-only loader refuses any code.
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _MODULE_CLASSES or name in _OFFICIAL_CLASS_NAMES and not module.startswith(
                ("builtins", "os", "subprocess", "sys", "posix", "nt")):
            return _module_class(f"{module}.{name}")
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return torch._utils._rebuild_tensor_v2
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _load_storage_bytes
        if module == "torch" and name.endswith("Storage") and hasattr(torch, name):
            return getattr(torch, name)
        raise RefusedPickle(
            f"refused to load {module}.{name}: an official DICE checkpoint contains only the refiner "
            "module and its tensors, so this file is not one (it may be malicious). Nothing was executed.")

    def persistent_load(self, pid):
        raise RefusedPickle("refused: the pickle uses persistent ids (a torch.save zip?), not an official DICE pickle")


def _collect(obj: _ModuleState, prefix: str, out: dict) -> None:
    for key in ("_parameters", "_buffers"):
        for name, t in (obj.state.get(key) or {}).items():
            if t is not None:
                out[prefix + name] = t
    for name, child in (obj.state.get("_modules") or {}).items():
        if isinstance(child, _ModuleState):
            _collect(child, f"{prefix}{name}.", out)


def read_official_state_dict(path: str) -> dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        data = _RestrictedUnpickler(f).load()
    model = data.get("model") if isinstance(data, dict) else data
    if not isinstance(model, _ModuleState):
        raise RefusedPickle("expected a pickle of {'model': <Sharpener>} as the official DICE code writes")
    state: dict[str, torch.Tensor] = {}
    _collect(model, "", state)
    missing = [k for k in PARAMETER_NAMES if k not in state]
    if missing:
        raise RefusedPickle(f"the pickled module lacks {', '.join(missing)}: not a DICE Sharpener")
    return {k: state[k].detach().float().contiguous().clone() for k in PARAMETER_NAMES}
