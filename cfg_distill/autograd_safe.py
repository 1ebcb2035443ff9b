"""Run a frozen model's forward so that gradients can flow through it although its code updates
tensors in place with augmented assignments (`x += f(x)`), as inference-oriented DiT blocks do
(ComfyUI's Flux-style double / single stream blocks, used by Chroma and HunyuanVideo). Autograd
refuses to back-propagate through a tensor that was saved for backward and then modified in place.

Inside `out_of_place_updates()`, `a += b`, `a -= b`, `a *= b` and `a /= b` on tensors compute a new
tensor instead. That is exact: Python rebinds the name to whatever the in-place operator returns, and
`a[i] += b` writes the new value back with `a[i] = ...`. Torch reports `a += b` as `a.add_(b)`, so the
calling line's bytecode tells the two apart: an explicit `a.add_(b)` (whose result may be ignored) is
left in place.

Custom kernels without a backward formula are replaced by differentiable torch code for the call:
ComfyUI >= 0.8 applies rotary position embeddings (Qwen-Image, Lumina 2, Chroma, HunyuanVideo...)
with comfy_kitchen's `apply_rope` / `apply_rope1` ops, which register no autograd formula.
Scoped to one call through a torch function mode; nothing outlives it."""
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


def _rotate_pairs(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: each (even, odd) channel pair of x times the 2x2 matrix in freqs[..., :, :]
    (freqs shaped [..., pairs, 2, 2]), computed in freqs' dtype, returned in x's."""
    pairs = x.to(freqs.dtype).unflatten(-1, (-1, 1, 2))  # [..., pairs, 1, 2]
    rotated = (freqs * pairs).sum(-1)  # [..., pairs, 2]: row i of the matrix . (x_even, x_odd)
    return rotated.flatten(-2).type_as(x)


def _rope(xq, xk, freqs):
    return _rotate_pairs(xq, freqs), _rotate_pairs(xk, freqs)


_NO_BACKWARD = {"comfy_kitchen.apply_rope1": _rotate_pairs, "comfy_kitchen.apply_rope": _rope}


class _OutOfPlaceUpdates(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name.startswith("comfy_kitchen."):
            replacement = _NO_BACKWARD.get(name.removesuffix(".default"))
            if replacement is not None:
                return replacement(*args, **kwargs)
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
