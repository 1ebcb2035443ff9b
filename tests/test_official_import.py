"""Official DICE checkpoints are pickles: they are converted without executing anything.

The bf16 snapshot test makes its file the way the official launch script does: `accelerate launch
--mixed_precision=bf16` (the real accelerate from PyPI, a test-only dependency), prepare, train a
step, `pickle.dump(dict(model=accelerator.unwrap_model(sharpener)), f)`."""
import collections
import io
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

from cfg_distill import load_refiner
from cfg_distill.official_import import (
    MAX_FILE_BYTES, MAX_MARK_DEPTH, MAX_MEMO, MAX_MODULE_DEPTH, RefusedPickle, read_official_state_dict)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A module with the official class names and layout, so the pickle names dice_sharpener.Sharpener.
OFFICIAL_MODULE = textwrap.dedent('''
    import torch
    class Attention(torch.nn.Module):
        def __init__(self, query_dim=512, context_dim=512, heads=8, dim_head=64):
            super().__init__()
            inner = heads * dim_head
            self.heads, self.scale = heads, dim_head ** -0.5
            self.to_q = torch.nn.Linear(query_dim, inner, bias=False)
            self.to_k = torch.nn.Linear(context_dim, inner, bias=False)
            self.to_v = torch.nn.Linear(context_dim, inner, bias=False)
            self.to_out = torch.nn.Sequential(torch.nn.Linear(inner, query_dim), torch.nn.Dropout(0.0))
        def forward(self, x, context):
            b, n, _ = x.shape
            h = self.heads
            sp = lambda t: t.reshape(t.shape[0], t.shape[1], h, -1).permute(0, 2, 1, 3)
            q, k, v = sp(self.to_q(x)), sp(self.to_k(context)), sp(self.to_v(context))
            a = (torch.einsum("bhid,bhjd->bhij", q, k) * self.scale).softmax(-1)
            o = torch.einsum("bhij,bhjd->bhid", a, v).permute(0, 2, 1, 3).reshape(b, n, -1)
            return self.to_out(o)
    class Sharpener(torch.nn.Module):
        def __init__(self, input_dim, output_dim, nhead, inner_dim=512):
            super().__init__()
            self.fc1 = torch.nn.Linear(input_dim, inner_dim)
            self.attention = Attention(inner_dim, inner_dim, nhead, inner_dim // nhead)
            self.fc2 = torch.nn.Linear(inner_dim, output_dim)
            self.act = torch.nn.ReLU()
        def forward(self, a, b):
            h = self.attention(self.act(self.fc1(a)), self.act(self.fc1(b)))
            return self.fc2(self.act(h))
''')


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cfg_distill", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_official_pickle_converts_and_matches(tmp_path, monkeypatch):
    (tmp_path / "dice_sharpener.py").write_text(OFFICIAL_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import dice_sharpener

    torch.manual_seed(0)
    model = dice_sharpener.Sharpener(input_dim=768, output_dim=768, nhead=8, inner_dim=512)
    pkl = tmp_path / "sharpener-snapshot.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": model}, f)  # exactly how the official training script saves
    out = tmp_path / "dice_sd15.safetensors"
    res = _cli("import-official", str(pkl), str(out), "--family", "sd15")
    assert res.returncode == 0, res.stderr
    loaded = load_refiner(str(out))
    assert loaded.info.base_family == "sd15" and loaded.info.guidance_scale == 5.0
    c, uc = torch.randn(1, 77, 768), torch.randn(1, 77, 768)
    with torch.no_grad():
        assert (loaded.module(c, uc) - model(c, uc)).abs().max() <= 1e-6


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    pkl = tmp_path / "evil.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": _Evil(marker)}, f)
    res = _cli("import-official", str(pkl), str(tmp_path / "out.safetensors"))
    assert res.returncode == 2
    assert "refused" in res.stderr and "system" in res.stderr
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_builtins_eval_refused(tmp_path):
    class EvalBomb:
        def __reduce__(self):
            return (eval, ("__import__('os').getcwd()",))
    pkl = tmp_path / "eval.pkl"
    pkl.write_bytes(pickle.dumps({"model": EvalBomb()}))
    res = _cli("import-official", str(pkl), str(tmp_path / "o.safetensors"))
    assert res.returncode == 2 and "builtins.eval" in res.stderr


# ---- a snapshot made the way the official launch script makes it (accelerate, bf16) ----------------

SNAPSHOT_SCRIPT = textwrap.dedent('''
    import pickle, sys
    import torch
    from accelerate import Accelerator
    from dice_sharpener import Sharpener
    torch.manual_seed(0)
    torch.set_num_threads(1)
    accelerator = Accelerator()  # mixed precision comes from `accelerate launch --mixed_precision`
    sharpener = Sharpener(input_dim=768, output_dim=768, inner_dim=512, nhead=8)
    sharpener.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(sharpener.parameters(), lr=2e-4, weight_decay=1e-2)
    sharpener, optimizer = accelerator.prepare(sharpener, optimizer)
    c, uc = torch.randn(2, 77, 768), torch.randn(1, 77, 768).expand(2, -1, -1)
    for _ in range(2):  # a couple of real optimizer steps through the prepared (autocast) module
        loss = (c + sharpener(c, uc)).abs().mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    model = accelerator.unwrap_model(sharpener)
    with open(sys.argv[1], "wb") as f:
        pickle.dump(dict(model=model), f)
    torch.save({"c": c[:1], "uc": uc[:1], "wrapped_forward": "forward" in vars(model),
                "mixed_precision": accelerator.mixed_precision,
                "out_autocast": model(c[:1], uc[:1]).detach(),
                "out_fp32": type(model).forward(model, c[:1], uc[:1]).detach()}, sys.argv[2])
''')


def _globals_in(blob: bytes) -> set:
    """(module, name) of every global a pickle names, read with pickletools (nothing executed)."""
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(blob):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            found.add(tuple(strings[-2:]))
        elif op.name == "GLOBAL":
            found.add(tuple(arg.split(" ", 1)))
    return found


def test_accelerate_bf16_snapshot_imports_and_matches(tmp_path):
    (tmp_path / "dice_sharpener.py").write_text(OFFICIAL_MODULE)
    (tmp_path / "make_snapshot.py").write_text(SNAPSHOT_SCRIPT)
    pkl, ref = tmp_path / "sharpener-snapshot.pkl", tmp_path / "reference.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(tmp_path))
    launch = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes=1",
         "--num_machines=1", "--dynamo_backend=no", "--mixed_precision=bf16",
         str(tmp_path / "make_snapshot.py"), str(pkl), str(ref)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert launch.returncode == 0, launch.stderr[-3000:]
    reference = torch.load(ref, weights_only=True)  # our own test output, not the snapshot
    assert reference["mixed_precision"] == "bf16"
    assert reference["wrapped_forward"], "accelerate did not replace forward: not the official situation"
    blob = pkl.read_bytes()
    names = _globals_in(blob)
    assert ("builtins", "getattr") in names, sorted(names)  # the reference that used to be refused
    assert any(op.name in ("SHORT_BINUNICODE", "BINUNICODE") and arg == "forward"
               for op, arg, _ in pickletools.genops(blob))

    out = tmp_path / "dice_sd15.safetensors"
    res = _cli("import-official", str(pkl), str(out), "--family", "sd15")
    assert res.returncode == 0, res.stderr
    loaded = load_refiner(str(out))
    with torch.no_grad():
        ours = loaded.module(reference["c"], reference["uc"])
    diff_fp32 = (ours - reference["out_fp32"]).abs().max().item()
    diff_autocast = (ours - reference["out_autocast"]).abs().max().item()
    print(f"max abs diff vs the module's fp32 forward {diff_fp32:.3g}, vs its bf16-autocast forward "
          f"{diff_autocast:.3g} (output scale {reference['out_fp32'].abs().max().item():.3g})")
    assert diff_fp32 <= 1e-6
    # accelerate's forward computes in bf16 (8-bit mantissa): close, not equal
    assert 0 < diff_autocast <= 0.02 * reference["out_fp32"].abs().max().item()


# ---- hostile files: refused with a message, nothing runs, allocation bounded --------------------------


def _refused(tmp_path, blob: bytes, *fragments: str, name="hostile.pkl"):
    path = tmp_path / name
    path.write_bytes(blob)
    with pytest.raises(RefusedPickle) as e:
        read_official_state_dict(str(path))
    msg = str(e.value)
    assert "Nothing from the file was executed" in msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


def test_getattr_import_chain_refused(tmp_path):
    marker = tmp_path / "pwned"
    # getattr(__import__("os"), "system")("touch ...") written as protocol-0 opcodes
    blob = (b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V"
            + f"touch {marker}".encode() + b"\ntR.")
    pickletools.dis(blob, out=io.StringIO())  # a well-formed pickle
    _refused(tmp_path, blob, "builtins.__import__")
    assert not marker.exists()


def test_getattr_other_than_forward_refused(tmp_path, monkeypatch):
    (tmp_path / "dice_sharpener.py").write_text(OFFICIAL_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import dice_sharpener
    model = dice_sharpener.Sharpener(input_dim=8, output_dim=8, nhead=2, inner_dim=8)
    model.hook = model.train  # a bound method pickles as getattr(model, "train")
    msg = _refused(tmp_path, pickle.dumps({"model": model}), "getattr(<", "'train'")
    assert "only getattr(<module>, 'forward')" in msg


def _str(b: bytes) -> bytes:
    return b"\x8c" + bytes([len(b)]) + b  # SHORT_BINUNICODE


def test_getattr_forward_of_a_non_module_refused(tmp_path):
    # getattr("text", "forward"): the accepted pattern needs a module stand-in as the object
    blob = b"\x80\x04cbuiltins\ngetattr\n" + _str(b"text") + _str(b"forward") + b"\x86R."
    _refused(tmp_path, blob, "builtins.getattr('text', 'forward')")


def test_reduce_of_a_non_builder_refused(tmp_path):
    # REDUCE with a dict as the callable (not a global): refused, not attempted
    _refused(tmp_path, b"\x80\x04}" + _str(b"x") + b"\x85R.", "refused a call of dict")
    # REDUCE of an allowed module class with arguments of a known builder used wrongly
    _refused(tmp_path, b"\x80\x04ccollections\nOrderedDict\nK\x01\x85R.", "collections.OrderedDict")


def test_module_names_from_other_places_refused(tmp_path):
    for module, name in [("os", "system"), ("subprocess", "Popen"), ("torch", "load"),
                         ("torch.serialization", "load"), ("numpy", "load")]:
        blob = f"c{module}\n{name}\n(Vx\ntR.".encode()
        _refused(tmp_path, blob, f"{module}.{name}")


def _legacy_storage_record(numel_declared: int, data: bytes, dtype_name="FloatStorage", location="cpu") -> bytes:
    """torch's legacy torch.save() layout of one storage, with a declared size of our choosing."""
    f = io.BytesIO()
    pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
    pickle.dump(1001, f, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": True,
                 "type_sizes": {"short": 2, "int": 4, "long": 4}}, f, protocol=2)
    storage_type = getattr(torch, dtype_name)

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", storage_type, "0", location, numel_declared) if obj == "S" else None
    P(f, protocol=2).dump("S")
    pickle.dump(["0"], f, protocol=2)
    f.write(struct.pack("<q", numel_declared) + data)
    return f.getvalue()


class _TensorFrom:
    """Pickles as torch._utils._rebuild_tensor_v2(<storage record>, offset, size, stride, ...)."""

    def __init__(self, record: bytes, size, stride, offset=0):
        self.args = (record, offset, size, stride)

    def __reduce__(self):
        record, offset, size, stride = self.args
        return (torch._utils._rebuild_tensor_v2,
                (_StorageBytes(record), offset, size, stride, False, collections.OrderedDict()))


class _StorageBytes:
    def __init__(self, record):
        self.record = record

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.record,))



def test_storages_of_gpu_runs_and_half_types_read_on_cpu():
    # official runs train on GPUs: their storages say "cuda:0"; bf16 / fp16 storages are read too
    import cfg_distill.official_import as oi
    values = torch.tensor([1.5, -2.0, 0.25, 3.0])
    records = [_TensorFrom(_legacy_storage_record(4, values.to(dt).numpy().tobytes() if dt != torch.bfloat16
                                                  else values.to(dt).view(torch.int16).numpy().tobytes(),
                                                  name, location="cuda:0"), (2, 2), (2, 1))
               for dt, name in ((torch.float32, "FloatStorage"), (torch.float16, "HalfStorage"),
                                (torch.bfloat16, "BFloat16Storage"))]
    out = oi._Interpreter(io.BytesIO(pickle.dumps(records)), outer=True).run()
    assert [t.dtype for t in out] == [torch.float32, torch.float16, torch.bfloat16]
    for t in out:
        assert t.device.type == "cpu" and torch.equal(t.float(), values.reshape(2, 2))


def test_huge_declared_storage_refused(tmp_path):
    tiny = struct.pack("<4f", 1, 2, 3, 4)
    # 10^12 elements declared: over the bound, refused before anything is allocated
    _refused(tmp_path, pickle.dumps(_TensorFrom(_legacy_storage_record(10**12, tiny), (4,), (1,))),
             "invalid storage size")
    # 10^8 elements (400 MB) declared, 16 bytes present: refused, nothing of that size allocated
    _refused(tmp_path, pickle.dumps(_TensorFrom(_legacy_storage_record(10**8, tiny), (4,), (1,))),
             "declares 400000000 bytes but the file holds 16")
    rec = _legacy_storage_record(4, tiny)
    # a tensor view far larger than its storage (stride 0 over 10^12 elements): refused
    _refused(tmp_path, pickle.dumps(_TensorFrom(rec, (10**6, 10**6), (0, 0))), "does not fit in its storage")
    _refused(tmp_path, pickle.dumps(_TensorFrom(rec, (2,), (1,), offset=3)), "does not fit in its storage")
    _refused(tmp_path, pickle.dumps(_TensorFrom(rec, (1,) * 20, (1,) * 20)), "at most 8 dimensions")
    # the same storage record referred to several times cannot add up past the file's own size:
    # pickle memoizes the bytes, so the 1 MB file holds them once but names them three times
    big = _legacy_storage_record(250_000, b"\0" * 1_000_000)
    rep = pickle.dumps([_StorageBytes(big), _StorageBytes(big), _StorageBytes(big)])
    assert len(rep) < 1_100_000
    _refused(tmp_path, rep, "more data than the file itself")


def test_file_size_bound(tmp_path, monkeypatch):
    import cfg_distill.official_import as oi
    monkeypatch.setattr(oi, "MAX_FILE_BYTES", 1000)
    _refused(tmp_path, b"\x80\x04" + b"N0" * 1000 + b"N.", "the importer reads at most")
    assert MAX_FILE_BYTES >= 64 * 2**20  # real snapshots (7 to 21 MB) fit


def test_deep_nesting_memo_and_opcode_bounds(tmp_path):
    marker = tmp_path / "pwned"
    # MARK nesting
    _refused(tmp_path, b"\x80\x04" + b"(" * (MAX_MARK_DEPTH + 5) + b"N.", f"deeper than {MAX_MARK_DEPTH}")
    # memo: more entries than the bound (each a separate index)
    memo = b"".join(b"N" + b"r" + struct.pack("<I", i) + b"0" for i in range(MAX_MEMO + 1))
    _refused(tmp_path, b"\x80\x04" + memo + b"N.", f"more than {MAX_MEMO} memo entries")
    # a memo index of 2**32 - 1: a list-based memo would be resized to it; ours is a dict
    _refused(tmp_path, b"\x80\x04Nr\xff\xff\xff\xff.", "expected a pickle of {'model'")
    # a 150,000-deep tuple chain: built without recursion, then refused as not a Sharpener
    _refused(tmp_path, b"\x80\x04N" + b"\x85" * 150_000 + b".", "expected a pickle of {'model'")
    # too many opcodes
    _refused(tmp_path, b"\x80\x04" + b"N0" * 150_000 + b"N.", "opcodes")
    # BINBYTES8 declaring 2**60 bytes: read from memory, never allocated
    _refused(tmp_path, b"\x80\x04\x8e" + struct.pack("<Q", 2**60) + b"xx.", "not a valid pickle")
    # a truncated file
    _refused(tmp_path, pickle.dumps({"model": 1})[:-3], "not a valid pickle")
    assert not marker.exists()


def test_self_containing_module_refused(tmp_path, monkeypatch):
    (tmp_path / "dice_sharpener.py").write_text(OFFICIAL_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import dice_sharpener
    model = dice_sharpener.Sharpener(input_dim=8, output_dim=8, nhead=2, inner_dim=8)
    model._modules["loop"] = model  # pickles fine (memo); walking it would never end
    _refused(tmp_path, pickle.dumps({"model": model}), f"nested deeper than {MAX_MODULE_DEPTH}")


def test_wrong_shapes_refused_with_names(tmp_path, monkeypatch):
    (tmp_path / "dice_sharpener.py").write_text(OFFICIAL_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import dice_sharpener
    model = dice_sharpener.Sharpener(input_dim=8, output_dim=8, nhead=2, inner_dim=8)
    model.fc2 = torch.nn.Linear(8, 6)  # output dim != input dim
    _refused(tmp_path, pickle.dumps({"model": model}), "fc2.weight has shape (6, 8), expected (8, 8)")


def test_hostile_files_refused_through_the_cli_without_side_effects(tmp_path):
    marker = tmp_path / "pwned"
    pkl = tmp_path / "evil.pkl"
    blob = (b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V"
            + f"touch {marker}".encode() + b"\ntR.")
    pkl.write_bytes(blob)
    res = _cli("import-official", str(pkl), str(tmp_path / "o.safetensors"))
    assert res.returncode == 2 and "refused" in res.stderr and "Traceback" not in res.stderr
    assert not marker.exists() and not (tmp_path / "o.safetensors").exists()
