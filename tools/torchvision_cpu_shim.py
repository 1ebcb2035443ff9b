"""Test-environment shim: PyPI's torchvision wheel is a CUDA build whose import fails with CPU
torch ("operator torchvision::nms does not exist"). Before torchvision is first imported, define
the two op schemas it registers fake kernels for. Installed only into the project's test venv."""
import importlib.abc
import sys


class _Hook(importlib.abc.MetaPathFinder):
    done = False

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" and not _Hook.done:
            _Hook.done = True
            import torch

            lib = torch.library.Library("torchvision", "DEF")
            for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                           "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
                try:
                    lib.define(schema)
                except RuntimeError:  # already defined by a working build
                    pass
            sys.modules[__name__]._lib = lib  # keep the registration alive
        return None


sys.meta_path.insert(0, _Hook())
