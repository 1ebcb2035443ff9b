"""Official DICE checkpoints are pickles: they are converted without executing anything."""
import os
import pickle
import subprocess
import sys
import textwrap

import torch

from cfg_distill import load_refiner

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
