"""modules.devices: autocast() wraps text encoding and sampling on the GPU (a1111.md "Training from
a tab": devices.autocast()); on this CPU stand-in it is a no-op context."""
import contextlib

import torch

cpu = torch.device("cpu")
device = cpu


def autocast(disable=False):
    return contextlib.nullcontext()


def without_autocast(disable=False):
    return contextlib.nullcontext()
