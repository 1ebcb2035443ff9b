"""Convert an official DICE checkpoint (a plain pickle of {'model': <Sharpener>}) to .safetensors
WITHOUT executing anything from the file.

The file is never given to `pickle.load` or `torch.load`. A small interpreter of its own walks the
pickle opcodes (decoded by `pickletools.genops`, which only reads) and builds inert values:

- Globals resolve to markers, never to Python objects from the file: the nn.Module classes an
  official snapshot names become stand-ins that only record their state; OrderedDict; torch's
  tensor / parameter rebuild functions and storage types become our own validating builders.
- The one other reference a real snapshot holds: `builtins.getattr(<module>, "forward")`.
  The official script trains under `accelerate launch --mixed_precision=bf16`; accelerate swaps
  the module's `forward` for a wrapped bound method, `unwrap_model` keeps it, and pickle writes a
  bound method as getattr(instance, name). Only exactly that (a module stand-in, the name
  "forward") is accepted, and it is never evaluated: it becomes an inert marker.
- Anything else (os.system, eval, any other getattr, REDUCE of something that is not one of our
  builders, persistent ids outside torch's storage format) is refused with a message.

Allocation is bounded: the file size, the number of opcodes, memo entries, stack / mark depth,
module nesting, tensor dimensions, and each tensor's element count (at most its storage's, whose
bytes must be present in the file). Storages are torch's legacy `torch.save` bytes nested in the
pickle; they are parsed here too, by the same interpreter, and their raw data is read with the
declared sizes checked against what the file holds."""
from __future__ import annotations

import io
import os
import pickletools
import struct

import torch

from .refiner import PARAMETER_NAMES

MAX_FILE_BYTES = 512 * 2**20   # official snapshots are 7 MB (SD1.5) to ~21 MB (PixArt), fp32
MAX_OPCODES = 200_000          # a real SD1.5 snapshot has ~1,000
MAX_MEMO = 20_000
MAX_STACK = 10_000
MAX_MARK_DEPTH = 64
MAX_MODULE_DEPTH = 16
MAX_TENSOR_DIMS = 8
MAX_STRING_CHARS = 4096        # names, keys, locations: all short in a real file
MAX_TOKEN_DIM = 16384          # official: 768 (SD1.5), 2048 (SDXL), 4096 (PixArt)
MAX_INNER_DIM = 4096

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch's legacy serialization magic number
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "DoubleStorage": torch.float64,
}


class RefusedPickle(ValueError):
    pass


def _refuse(msg: str) -> RefusedPickle:
    return RefusedPickle(f"{msg}. Nothing from the file was executed.")


# ---- inert values the interpreter builds ------------------------------------------------------

class _Global:
    """A global the file names and we accept; it is only a tag, never the real object."""

    def __init__(self, kind: str, name: str, payload=None):
        self.kind, self.name, self.payload = kind, name, payload


class _ModuleState:
    """Inert stand-in for an nn.Module: records the state pickle would have restored."""

    def __init__(self, class_name: str):
        self.class_name = class_name
        self.state: dict = {}


class _ForwardReference:
    """What getattr(<module>, "forward") stands for; kept only so the state dict is complete."""


class _Storage:
    def __init__(self, dtype: torch.dtype, numel: int):
        self.dtype, self.numel = dtype, numel
        self.data: torch.Tensor | None = None  # flat tensor, filled once the raw bytes are read


_MODULE_CLASSES = {
    ("torch.nn.modules.linear", "Linear"), ("torch.nn.modules.container", "Sequential"),
    ("torch.nn.modules.dropout", "Dropout"), ("torch.nn.modules.activation", "ReLU"),
}
_OFFICIAL_CLASS_NAMES = {"Sharpener", "Attention"}  # their module is wherever the training ran
_SAFE_KEY_TYPES = (str, int, float, bool, bytes, type(None))


def _describe(v) -> str:
    if isinstance(v, _Global):
        return v.name
    if isinstance(v, _ModuleState):
        return f"<{v.class_name} module>"
    if isinstance(v, str):
        return repr(v[:60])
    return type(v).__name__


def _small_int(v, what: str, lo: int = 0, hi: int = 2**40) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _refuse(f"invalid {what} ({_describe(v) if not isinstance(v, int) else 'out of range'})")
    return v


# ---- the interpreter ----------------------------------------------------------------------------

class _Interpreter:
    """Evaluates one pickle from `stream` with a fixed set of opcodes and builders."""

    def __init__(self, stream: io.BytesIO, outer: bool, budget: list[int] | None = None):
        self.stream, self.outer = stream, outer
        self.storages: dict[str, _Storage] = {}
        # bytes of storage data still allowed (shared with nested storage records): a file cannot
        # make the importer hold more tensor data than its own size, however often it refers to it
        self.budget = budget if budget is not None else [len(stream.getbuffer())]

    # globals ------------------------------------------------------------------------------------
    def find_global(self, module: str, name: str) -> _Global:
        if not isinstance(module, str) or not isinstance(name, str):
            raise _refuse("malformed global reference")
        full = f"{module}.{name}"
        if self.outer:
            if (module, name) in _MODULE_CLASSES or name in _OFFICIAL_CLASS_NAMES:
                return _Global("module_class", full)
            if (module, name) == ("collections", "OrderedDict"):
                return _Global("ordered_dict", full)
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return _Global("rebuild_tensor", full)
            if (module, name) == ("torch._utils", "_rebuild_parameter"):
                return _Global("rebuild_parameter", full)
            if (module, name) == ("torch.storage", "_load_from_bytes"):
                return _Global("storage_bytes", full)
            if (module, name) == ("builtins", "getattr"):
                return _Global("getattr", full)  # only getattr(<module>, "forward") is accepted below
        elif module == "torch" and name in _STORAGE_DTYPES:
            return _Global("storage_type", full, _STORAGE_DTYPES[name])
        raise _refuse(
            f"refused to load {full}: an official DICE checkpoint contains only the refiner module, "
            "its tensors and accelerate's getattr(<module>, 'forward'), so this file is not one "
            "(it may be malicious)")

    # calls (REDUCE / NEWOBJ): only our own builders ---------------------------------------------
    def call(self, fn, args):
        if not isinstance(fn, _Global) or not isinstance(args, tuple):
            raise _refuse(f"refused a call of {_describe(fn)}: only the tensor / module builders of "
                          "an official snapshot may be called")
        kind = fn.kind
        if kind == "module_class":
            return _ModuleState(fn.name)
        if kind == "ordered_dict" and not args:
            return {}
        if kind == "getattr":
            if len(args) == 2 and isinstance(args[0], _ModuleState) and args[1] == "forward":
                return _ForwardReference()
            shown = ", ".join(_describe(a) for a in args[:3])
            raise _refuse(f"refused builtins.getattr({shown}): only getattr(<module>, 'forward'), "
                          "which accelerate's mixed precision leaves in a snapshot, is accepted")
        if kind == "rebuild_tensor":
            return _rebuild_tensor(args)
        if kind == "rebuild_parameter":
            if len(args) < 3 or not isinstance(args[0], torch.Tensor):
                raise _refuse("malformed torch._utils._rebuild_parameter call")
            return args[0]  # a Parameter wrapper adds nothing we need
        if kind == "storage_bytes":
            if len(args) != 1 or not isinstance(args[0], bytes):
                raise _refuse("malformed torch.storage._load_from_bytes call")
            return _read_legacy_storage(args[0], self.budget)
        raise _refuse(f"refused a call of {fn.name} with {len(args)} arguments")

    def persistent_load(self, pid):
        if self.outer:
            raise _refuse("refused: the pickle uses persistent ids (a torch.save zip?), not an "
                          "official DICE pickle")
        # torch's legacy format: ('storage', <StorageType>, key, location, numel[, view_metadata])
        if (not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage"
                or not isinstance(pid[1], _Global) or pid[1].kind != "storage_type"
                or not isinstance(pid[2], str) or (len(pid) == 6 and pid[5] is not None)):
            raise _refuse("malformed tensor storage reference")
        numel = _small_int(pid[4], "storage size", 0, MAX_FILE_BYTES)
        key = pid[2]
        if key not in self.storages:
            if len(self.storages) >= 64:
                raise _refuse("too many storages in one storage record")
            self.storages[key] = _Storage(pid[1].payload, numel)
        st = self.storages[key]
        if st.numel != numel or st.dtype != pid[1].payload:
            raise _refuse("one storage is declared with two different sizes / types")
        return st

    # the opcode loop ----------------------------------------------------------------------------
    def run(self):
        stack: list = []
        marks: list[list] = []
        memo: dict[int, object] = {}
        count = 0
        try:
            for op, arg, pos in pickletools.genops(self.stream):
                count += 1
                if count > MAX_OPCODES:
                    raise _refuse(f"the pickle has more than {MAX_OPCODES} opcodes; an official "
                                  "snapshot has about a thousand")
                if len(stack) > MAX_STACK:
                    raise _refuse(f"the pickle stack grows beyond {MAX_STACK} items")
                name = op.name
                if isinstance(arg, str) and len(arg) > MAX_STRING_CHARS:
                    raise _refuse(f"a string of {len(arg)} characters at byte {pos}")
                if name in ("PROTO", "FRAME"):
                    continue
                if name == "STOP":
                    if len(stack) != 1 or marks:
                        raise _refuse("malformed pickle (stack not a single value at STOP)")
                    return stack[0]
                if name == "MARK":
                    if len(marks) >= MAX_MARK_DEPTH:
                        raise _refuse(f"nesting deeper than {MAX_MARK_DEPTH} levels")
                    marks.append(stack)
                    stack = []
                elif name in ("NONE",):
                    stack.append(None)
                elif name in ("NEWTRUE", "NEWFALSE"):
                    stack.append(name == "NEWTRUE")
                elif name in ("BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT",
                              "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8",
                              "SHORT_BINBYTES", "BINBYTES", "BINBYTES8"):
                    if name == "LONG1" and abs(arg) > 2**128:  # torch's magic number is 80 bits
                        raise _refuse(f"an integer out of range at byte {pos}")
                    stack.append(arg)
                elif name == "EMPTY_TUPLE":
                    stack.append(())
                elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                    n = int(name[-1])
                    if len(stack) < n:
                        raise _refuse(f"malformed pickle at byte {pos}")
                    items = tuple(stack[-n:])
                    del stack[-n:]
                    stack.append(items)
                elif name == "TUPLE":
                    items = tuple(stack)
                    stack = marks.pop()
                    stack.append(items)
                elif name == "EMPTY_LIST":
                    stack.append([])
                elif name == "LIST":
                    items = list(stack)
                    stack = marks.pop()
                    stack.append(items)
                elif name in ("APPEND", "APPENDS"):
                    items = [stack.pop()] if name == "APPEND" else stack
                    if name == "APPENDS":
                        stack = marks.pop()
                    target = stack[-1]
                    if not isinstance(target, list):
                        raise _refuse(f"malformed pickle (append to {_describe(target)})")
                    target.extend(items)
                elif name == "EMPTY_DICT":
                    stack.append({})
                elif name in ("SETITEM", "SETITEMS", "DICT"):
                    if name == "SETITEM":
                        items = stack[-2:]
                        del stack[-2:]
                    else:
                        items = stack
                        stack = marks.pop()
                    if len(items) % 2:
                        raise _refuse(f"malformed pickle at byte {pos}")
                    if name == "DICT":
                        stack.append({})
                    target = stack[-1]
                    if not isinstance(target, dict):
                        raise _refuse(f"malformed pickle (set item on {_describe(target)})")
                    for k, v in zip(items[::2], items[1::2]):
                        if not isinstance(k, _SAFE_KEY_TYPES):
                            raise _refuse(f"a dictionary key of type {type(k).__name__}")
                        target[k] = v
                elif name == "EMPTY_SET":
                    stack.append(set())
                elif name == "ADDITEMS":
                    items = stack
                    stack = marks.pop()
                    if not isinstance(stack[-1], set) or not all(isinstance(i, _SAFE_KEY_TYPES) for i in items):
                        raise _refuse("malformed pickle (set items)")
                    stack[-1].update(items)
                elif name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
                    idx = len(memo) if name == "MEMOIZE" else arg
                    if len(memo) >= MAX_MEMO or not isinstance(idx, int) or not 0 <= idx < 2**32:
                        raise _refuse(f"more than {MAX_MEMO} memo entries")
                    memo[idx] = stack[-1]
                elif name in ("BINGET", "LONG_BINGET", "GET"):
                    if arg not in memo:
                        raise _refuse(f"malformed pickle (memo {arg} read before it was written)")
                    stack.append(memo[arg])
                elif name == "POP":
                    stack.pop()
                elif name == "GLOBAL":
                    module, _, gname = arg.partition(" ")
                    stack.append(self.find_global(module, gname))
                elif name == "STACK_GLOBAL":
                    gname, module = stack.pop(), stack.pop()
                    stack.append(self.find_global(module, gname))
                elif name == "REDUCE":
                    args, fn = stack.pop(), stack.pop()
                    stack.append(self.call(fn, args))
                elif name == "NEWOBJ":
                    args, cls = stack.pop(), stack.pop()
                    if not isinstance(cls, _Global) or cls.kind != "module_class":
                        raise _refuse(f"refused to create an instance of {_describe(cls)}")
                    stack.append(self.call(cls, args))
                elif name == "BUILD":
                    state = stack.pop()
                    inst = stack[-1]
                    if not isinstance(inst, _ModuleState) or not isinstance(state, dict):
                        raise _refuse(f"refused to set the state of {_describe(inst)}: only module "
                                      "stand-ins receive state")
                    inst.state = state
                elif name == "BINPERSID":
                    stack.append(self.persistent_load(stack.pop()))
                else:
                    raise _refuse(f"refused opcode {name} at byte {pos}: not used by an official "
                                  "DICE snapshot")
        except RefusedPickle:
            raise
        except (ValueError, IndexError, KeyError, TypeError, struct.error, UnicodeDecodeError,
                AttributeError) as e:
            raise _refuse(f"the file is not a valid pickle ({type(e).__name__}: {str(e)[:200]})") from None
        raise _refuse("the pickle ends without a STOP opcode (truncated file?)")


# ---- tensors and storages -------------------------------------------------------------------------

def _rebuild_tensor(args) -> torch.Tensor:
    # torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])
    if len(args) not in (6, 7) or not isinstance(args[0], _Storage):
        raise _refuse("malformed torch._utils._rebuild_tensor_v2 call")
    storage, offset, size, stride = args[:4]
    if storage.data is None:
        raise _refuse("a tensor refers to a storage whose data is missing")
    if (not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride)
            or len(size) > MAX_TENSOR_DIMS):
        raise _refuse(f"a tensor with an invalid shape (at most {MAX_TENSOR_DIMS} dimensions)")
    offset = _small_int(offset, "tensor offset")
    size = tuple(_small_int(s, "tensor size") for s in size)
    stride = tuple(_small_int(s, "tensor stride") for s in stride)
    numel = 1
    for s in size:
        numel *= s
    extent = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1 if numel else offset
    if numel > storage.numel or extent > storage.numel:
        raise _refuse(f"a tensor of {numel} elements (reaching element {extent}) does not fit in "
                      f"its storage of {storage.numel} elements")
    return storage.data.as_strided(size, stride, offset)  # a view: no new allocation


def _read_legacy_storage(blob: bytes, budget: list[int]) -> _Storage:
    """torch.storage._load_from_bytes: a legacy torch.save() of one storage, parsed here."""
    f = io.BytesIO(blob)
    magic = _Interpreter(f, outer=False, budget=budget).run()
    if magic != _LEGACY_MAGIC:
        raise _refuse("a tensor storage record without torch's magic number")
    _Interpreter(f, outer=False).run()  # protocol version
    sys_info = _Interpreter(f, outer=False).run()
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise _refuse("a tensor storage written on a big-endian machine (not supported)")
    reader = _Interpreter(f, outer=False, budget=budget)
    result = reader.run()
    keys = _Interpreter(f, outer=False).run()
    if not isinstance(result, _Storage) or not isinstance(keys, list) or sorted(keys) != sorted(reader.storages):
        raise _refuse("a malformed tensor storage record")
    for key in keys:
        st = reader.storages[key]
        head = f.read(8)
        if len(head) != 8 or struct.unpack("<q", head)[0] != st.numel:
            raise _refuse(f"storage {key!r}: its data does not have the declared {st.numel} elements")
        nbytes = st.numel * torch.empty((), dtype=st.dtype).element_size()
        left = len(blob) - f.tell()
        if nbytes > left:
            raise _refuse(f"storage {key!r} declares {nbytes} bytes but the file holds {left} "
                          "(truncated or hostile file)")
        if nbytes > budget[0]:
            raise _refuse("the storages hold more data than the file itself (one storage record "
                          "read repeatedly: a hostile file)")
        budget[0] -= nbytes
        raw = f.read(nbytes)
        st.data = torch.frombuffer(bytearray(raw), dtype=st.dtype) if nbytes else torch.empty(0, dtype=st.dtype)
    return result


# ---- the official module ----------------------------------------------------------------------------

def _collect(obj: _ModuleState, prefix: str, out: dict, depth: int = 0) -> None:
    if depth > MAX_MODULE_DEPTH:
        raise _refuse(f"modules nested deeper than {MAX_MODULE_DEPTH} levels: not a DICE Sharpener")
    for key in ("_parameters", "_buffers"):
        entries = obj.state.get(key) or {}
        if not isinstance(entries, dict):
            raise _refuse(f"{prefix or 'the module'}: {key} is not a dictionary")
        for name, t in entries.items():
            if isinstance(t, torch.Tensor):
                out[prefix + str(name)] = t
    children = obj.state.get("_modules") or {}
    if not isinstance(children, dict):
        raise _refuse(f"{prefix or 'the module'}: _modules is not a dictionary")
    for name, child in children.items():
        if isinstance(child, _ModuleState):
            _collect(child, f"{prefix}{name}.", out, depth + 1)


def _check_shapes(state: dict[str, torch.Tensor]) -> None:
    w1 = state["fc1.weight"]
    if w1.ndim != 2:
        raise _refuse(f"fc1.weight has shape {tuple(w1.shape)}, expected [inner, token_dim]")
    inner, dim = w1.shape
    if not (1 <= dim <= MAX_TOKEN_DIM and 1 <= inner <= MAX_INNER_DIM):
        raise _refuse(f"fc1.weight has shape {tuple(w1.shape)}: a Sharpener's token dim is at most "
                      f"{MAX_TOKEN_DIM} and its inner dim at most {MAX_INNER_DIM} (official: 512)")
    expected = {
        "fc1.bias": (inner,), "attention.to_q.weight": (inner, inner), "attention.to_k.weight": (inner, inner),
        "attention.to_v.weight": (inner, inner), "attention.to_out.0.weight": (inner, inner),
        "attention.to_out.0.bias": (inner,), "fc2.weight": (dim, inner), "fc2.bias": (dim,),
    }
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise _refuse(f"{k} has shape {tuple(state[k].shape)}, expected {shape} for a Sharpener "
                          f"with token dim {dim} and inner dim {inner}")
    if not all(t.is_floating_point() for t in state.values()):
        raise _refuse("the refiner's tensors are not floating point")


def read_official_state_dict(path: str) -> dict[str, torch.Tensor]:
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise _refuse(f"{path} is {size / 2**20:.0f} MB; an official DICE snapshot is a few tens of MB "
                      f"and the importer reads at most {MAX_FILE_BYTES // 2**20} MB")
    with open(path, "rb") as f:
        blob = f.read(MAX_FILE_BYTES + 1)
    data = _Interpreter(io.BytesIO(blob), outer=True).run()
    model = data.get("model") if isinstance(data, dict) else data
    if not isinstance(model, _ModuleState):
        raise _refuse("expected a pickle of {'model': <Sharpener>} as the official DICE code writes")
    state: dict[str, torch.Tensor] = {}
    _collect(model, "", state)
    missing = [k for k in PARAMETER_NAMES if k not in state]
    if missing:
        raise _refuse(f"the pickled module lacks {', '.join(missing)}: not a DICE Sharpener")
    _check_shapes(state)
    return {k: state[k].detach().float().contiguous().clone() for k in PARAMETER_NAMES}
