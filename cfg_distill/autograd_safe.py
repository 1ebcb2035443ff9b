"""Run a frozen model's forward so that gradients can flow through it although its code updates
tensors in place with augmented assignments (`x += f(x)`), as inference-oriented DiT blocks do
(ComfyUI's Flux-style double / single stream blocks, used by Chroma and HunyuanVideo). Autograd
refuses to back-propagate through a tensor that was saved for backward and then modified in place.

Inside `out_of_place_updates()`, `a += b`, `a -= b`, `a *= b` and `a /= b` on tensors compute a new
tensor instead. That is exact: Python rebinds the name to whatever the in-place operator returns, and
`a[i] += b` writes the new value back with `a[i] = ...`. Torch reports `a += b` as `a.add_(b)`, so the
calling line's bytecode tells the two apart: an explicit `a.add_(b)` (whose result may be ignored) is
left in place. Scoped to one call through a torch function mode; nothing outlives it."""
from __future__ import annotations

import contextlib
import dis
import sys

import torch
from torch.overrides import TorchFunctionMode

_OUT_OF_PLACE = {
    torch.Tensor.add_: (torch.add, "+="),
    torch.Tensor.sub_: (torch.sub, "-="),
    torch.Tensor.mul_: (torch.mul, "*="),
    torch.Tensor.div_: (torch.div, "/="),
}
_BINARY_OP = dis.opmap.get("BINARY_OP")  # Python >= 3.11: one opcode, the operator in its argument
_NB_ARGS = {sym: i for i, (_, sym) in enumerate(getattr(dis, "_nb_ops", []))}
_OLD_OPCODES = {"+=": "INPLACE_ADD", "-=": "INPLACE_SUBTRACT", "*=": "INPLACE_MULTIPLY", "/=": "INPLACE_TRUE_DIVIDE"}


def _is_augmented_assignment(frame, symbol: str) -> bool:
    code, i = frame.f_code.co_code, frame.f_lasti
    if i < 0 or i + 1 >= len(code):
        return False
    if _BINARY_OP is not None:
        return code[i] == _BINARY_OP and code[i + 1] == _NB_ARGS.get(symbol)
    return code[i] == dis.opmap.get(_OLD_OPCODES[symbol])


class _OutOfPlaceUpdates(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        swap = _OUT_OF_PLACE.get(func)
        if swap is not None and _is_augmented_assignment(sys._getframe(1), swap[1]):
            return swap[0](*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def out_of_place_updates(enabled: bool = True):
    if not enabled:
        yield
        return
    with _OutOfPlaceUpdates():
        yield
